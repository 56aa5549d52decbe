"""The resource kinds ``netctl apply/delete/get`` know: one table from a kind to what handles it.

A kind turns a document into a record, checked by the same functions its own ``netctl`` command uses (``pool
add``, ``bgp peer add``, ``node set``, ``policy apply``); turns a record back into the document ``apply -f`` takes
unchanged; names its etcd key; and plans its writes into a ``Plan`` (see ``netplugin.resources.writer``), which
guards every key it touches by the mod-revision it was read at.

A Kubernetes NetworkPolicy is stored translated, as the Policy ``k8s.<namespace>.<name>``: ``get`` shows it in that
form, which ``apply -f`` takes back as it is.

Why one module of about 500 lines: it is the table itself (a base class and six kinds of 40–80 lines each, all
shaped alike); a newcomer adding a kind reads the neighbours it copies from in one place.
"""

import difflib
from dataclasses import dataclass, field, replace

from netplugin.datastore import keys
from netplugin.datastore.client import prefix_unchanged_since
from netplugin.datastore.models import (
    BgpPeer,
    Block,
    ClusterConfig,
    Node,
    Pool,
    check_as_number,
    check_ip,
    check_pool_cidr,
)
from netplugin.errors import InvalidInput, NetpluginError
from netplugin.ipam.allocator import check_no_overlap, check_pool_empty, new_pool
from policy import k8s
from policy.model import API_VERSION, parse_policy
from policy.store import decode_policy
from policy.validation import (
    FieldError,
    Problems,
    expect_bool,
    expect_int,
    expect_mapping,
    expect_str,
    reject_unknown,
    show,
)


@dataclass(frozen=True)
class Resource:
    """One resource of an input: its kind's handler, its name, the validated record, where it was read."""

    kind: object
    name: str
    record: object
    path: tuple = ()

    @property
    def key(self):
        return self.kind.key(self.name)


class Kind:
    """The handler of one kind; subclasses fill in its names, key, fields and any writes beyond a plain put."""

    kind = ""  # as documents spell it
    label = ""  # as messages and netctl's other commands call it
    aliases = ()  # more words ``netctl get`` takes, besides the kind in lower case and its plural
    prefix = ""  # where its records live
    reads = None  # prefixes a plan reads into its snapshot (None: the kind's own prefix)
    spec_fields = ()
    metadata_fields = ("name",)

    def read_prefixes(self):
        return self.reads or (self.prefix,)

    def names_in(self, kvs):
        """Names of the stored records ``kvs`` (for "similar names" in a not-found error)."""
        return [keys.last_segment(kv.key) for kv in kvs]

    def words(self):
        return {self.kind.lower(), self.kind.lower() + "s", *self.aliases}

    def key(self, name):
        raise NotImplementedError

    def full_name(self, name, namespace):
        """The stored name of ``name`` given with ``-n``: only policies live in (Kubernetes) namespaces."""
        if namespace is not None:
            raise InvalidInput(f"{self.label} names have no namespace: drop -n/--namespace")
        return name

    def selects(self, name, namespace):
        """Whether ``get KIND`` (with ``-n namespace``, or None) lists the record named ``name``."""
        return True

    def decode(self, kv):
        """A stored KV -> record (NetpluginError when it does not decode)."""
        raise NotImplementedError

    def name_of(self, record):
        return record.name

    def lookup(self, ds, name):
        kv = ds.get(self.key(name))
        return None if kv is None else self._decoded(kv)

    def list(self, ds):
        """Every stored record, and the names of those that did not decode (skipped, never fatal)."""
        out, bad = [], []
        for kv in ds.list(self.prefix):
            try:
                out.append(self._decoded(kv))
            except NetpluginError:
                bad.append(keys.last_segment(kv.key))
        return out, bad

    def _decoded(self, kv):
        try:
            return self.decode(kv)
        except (TypeError, AttributeError, ValueError, NetpluginError) as err:  # written by something else than netctl
            why = err.msg if isinstance(err, NetpluginError) else err
            raise InvalidInput(f"stored {self.label} {keys.last_segment(kv.key)} does not decode ({why})") from None

    def similar(self, name, names):
        return difflib.get_close_matches(name, names, n=3, cutoff=0.6)

    def not_found(self, name):
        return f"{self.label} {name} does not exist"

    # --- documents ------------------------------------------------------------------------------------------------

    def parse(self, doc, path, problems):
        """A document at ``path`` -> Resource, or None after recording its problems."""
        before = len(problems.items)
        meta, spec = _envelope(doc, path, problems, self)
        if meta is None:
            return None
        mine = Problems()  # parse_fields judges its own findings only
        record = self.parse_fields(meta, spec, tuple(path), mine)
        problems.items.extend(mine.items)
        if record is None or len(problems.items) != before:
            return None
        return Resource(self, self.name_of(record), record, tuple(path))

    def parse_fields(self, meta, spec, path, problems):
        raise NotImplementedError

    def document(self, record):
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": {"name": self.name_of(record)},
            "spec": self.spec_of(record),
        }

    def spec_of(self, record):
        raise NotImplementedError

    # --- writes ---------------------------------------------------------------------------------------------------

    def apply(self, plan, res):
        plan.put(res, res.record.to_dict())

    def delete(self, plan, res):
        if plan.current(res.key) is None:
            plan.missing(res)
        else:
            plan.remove(res.key)
            plan.done(res, "deleted")


def _envelope(doc, path, problems, kind):
    """apiVersion, kind, metadata (with a name) and spec of one of our documents: (metadata, spec) or Nones."""
    path = tuple(path)
    if problems.attempt(expect_mapping, doc, path) is None:
        return None, None
    problems.items.extend(reject_unknown(doc, ("apiVersion", "kind", "metadata", "spec"), path))
    if doc.get("apiVersion") != API_VERSION:
        problems.add(path + ("apiVersion",), f"{show(doc.get('apiVersion'))} is not {API_VERSION}")
    mpath, spath = path + ("metadata",), path + ("spec",)
    meta, spec = doc.get("metadata"), doc.get("spec")
    if meta is None:
        problems.add(mpath, "required (with a name)")
        return None, None
    if problems.attempt(expect_mapping, meta, mpath) is None:
        return None, None
    problems.items.extend(reject_unknown(meta, kind.metadata_fields, mpath))
    if meta.get("name") is None:
        problems.add(mpath + ("name",), "required")
        return None, None
    if problems.attempt(expect_str, meta["name"], mpath + ("name",)) is None:
        return None, None
    spec = {} if spec is None else spec
    if problems.attempt(expect_mapping, spec, spath) is None:
        return None, None
    problems.items.extend(reject_unknown(spec, kind.spec_fields, spath))
    return meta, spec


def _field(problems, path, check, *args):
    """``check(*args)``; an InvalidInput it raises becomes a problem at ``path``."""
    try:
        return check(*args)
    except FieldError as err:
        problems.items.append(err)
    except InvalidInput as err:
        problems.add(path, err.msg)
    return None


def _optional(spec, name, expect, path, problems, check=None):
    """``spec[name]`` (None when absent) if it has the type ``expect`` wants and passes the model's ``check``."""
    if spec.get(name) is None:
        return None
    value = problems.attempt(expect, spec[name], path + ("spec", name))
    if value is None or check is None:
        return value
    return None if _field(problems, path + ("spec", name), check, value) is None else value


# --- the kinds ---------------------------------------------------------------------------------------------------


class PolicyKind(Kind):
    kind = "Policy"
    label = "policy"
    aliases = ("policies", "pol")
    prefix = keys.POLICIES

    def key(self, name):
        return keys.policy(name)

    def full_name(self, name, namespace):
        return name if namespace is None else k8s.policy_name(namespace, name)

    def selects(self, name, namespace):
        return namespace is None or name.startswith(k8s.policy_name(namespace, ""))

    def decode(self, kv):
        return decode_policy(kv)

    parse_policy = staticmethod(parse_policy)

    def parse(self, doc, path, problems):
        policy = self.parse_policy(doc, path, problems)
        return None if policy is None else Resource(self, policy.name, policy, tuple(path))

    def document(self, record):
        return record.to_dict()

    def similar(self, name, names):
        """Close names, and first the Kubernetes ones whose own name is ``name`` (``k8s.<ns>.<name>``)."""
        translated = [n for n in names if n.startswith("k8s.") and n.count(".") >= 2 and n.split(".", 2)[2] == name]
        close = [n for n in super().similar(name, names) if n not in translated]
        return [f"{n} (-n {n.split('.')[1]} {name})" for n in translated] + close


class NetworkPolicyKind(PolicyKind):
    """Written as a Kubernetes document, stored and shown as the Policy it translates to."""

    kind = k8s.KIND
    aliases = ("networkpolicies", "netpol")

    def full_name(self, name, namespace):
        return k8s.policy_name(namespace or "default", name)

    parse_policy = staticmethod(k8s.translate)

    def selects(self, name, namespace):
        return name.startswith(k8s.policy_name(namespace, "") if namespace else "k8s.")


class PoolKind(Kind):
    """Named by its CIDR: ``metadata.name: 10.10.0.0/24``."""

    kind = "Pool"
    label = "pool"
    aliases = ("ippool", "ippools")
    prefix = keys.POOLS
    reads = (keys.POOLS, keys.BLOCKS)
    spec_fields = ("blockSize", "natOutgoing", "disabled")

    def key(self, name):
        return keys.pool(str(check_pool_cidr(name)))

    def decode(self, kv):
        return Pool.from_dict(kv.value)

    def names_in(self, kvs):
        return [keys.segment_cidr(name) for name in super().names_in(kvs)]

    def name_of(self, record):
        return record.cidr

    def parse_fields(self, meta, spec, path, problems):
        cidr = _field(problems, path + ("metadata", "name"), check_pool_cidr, meta["name"])
        size = _optional(spec, "blockSize", expect_int, path, problems)
        nat = _optional(spec, "natOutgoing", expect_bool, path, problems)
        disabled = _optional(spec, "disabled", expect_bool, path, problems)
        if cidr is None or problems.items:
            return None
        return _field(problems, path + ("spec", "blockSize"), new_pool, str(cidr), size, bool(nat), bool(disabled))

    def spec_of(self, pool):
        return {"blockSize": pool.block_size, "natOutgoing": pool.nat_outgoing, "disabled": pool.disabled}

    def apply(self, plan, res):
        pool, current = res.record, plan.current(res.key)
        if current is None:
            others = [Pool.from_dict(kv.value) for kv in plan.snapshot.under(keys.POOLS)]
            others += [r.record for r in plan.created(self)]
            try:
                check_no_overlap(pool, others)
            except NetpluginError as err:
                plan.problem(res, ("metadata", "name"), err.msg)
                return
            plan.guard(prefix_unchanged_since(keys.POOLS, plan.snapshot.revision))  # no overlapping pool appeared
        elif Pool.from_dict(current.value).block_size != pool.block_size:
            old = Pool.from_dict(current.value).block_size
            plan.problem(
                res,
                ("spec", "blockSize"),
                f"pool {pool.cidr} already cuts /{old} blocks; remove the "
                "pool and add it again to change its block size",
            )
            return
        plan.put(res, pool.to_dict())

    def delete(self, plan, res):
        """As ``netctl pool rm``: refused while an address is allocated; the pool's empty blocks and their
        affinities go with it. New blocks are claimed under a guard on the pool's record, which this deletes; a
        block claimed or changed since the snapshot fails the range guard."""
        current = plan.current(res.key)
        if current is None:
            plan.missing(res)
            return
        pool = Pool.from_dict(current.value)
        blocks = [
            (Block.from_dict(kv.value), kv.key)
            for kv in plan.snapshot.under(keys.BLOCKS)
            if isinstance(kv.value, dict) and kv.value.get("pool") == pool.cidr
        ]
        try:
            check_pool_empty(pool, [b for b, _ in blocks])
        except NetpluginError as err:
            plan.refuse(res, err)
        for block, key in blocks:
            plan.remove(key)
            if block.affinity:
                plan.remove(keys.affinity(block.affinity, block.cidr), guard=False)
        plan.guard(prefix_unchanged_since(keys.pool_blocks_prefix(pool.cidr), plan.snapshot.revision))
        plan.remove(res.key)
        plan.done(res, "deleted")


class BgpPeerKind(Kind):
    kind = "BGPPeer"
    label = "peer"
    aliases = ("bgppeers", "peer", "peers")
    prefix = keys.BGP_PEERS
    spec_fields = ("address", "asNumber", "node", "password")

    def key(self, name):
        return keys.bgp_peer(name)

    def decode(self, kv):
        return BgpPeer.from_dict(kv.value)

    def parse_fields(self, meta, spec, path, problems):
        sp = path + ("spec",)
        for required in ("address", "asNumber"):
            if spec.get(required) is None:
                problems.add(sp + (required,), "required")
        address = _optional(spec, "address", expect_str, path, problems, lambda a: check_ip(a, "peer address"))
        as_number = _optional(spec, "asNumber", expect_int, path, problems, check_as_number)
        node = _optional(spec, "node", expect_str, path, problems)
        password = _optional(spec, "password", expect_str, path, problems)
        if problems.items:
            return None
        peer = BgpPeer(name=meta["name"], address=address, as_number=as_number, node=node, password=password)
        return _field(problems, path + ("metadata", "name"), peer.validate)

    def spec_of(self, peer):
        spec = {"address": peer.address, "asNumber": peer.as_number}
        spec.update({k: v for k, v in (("node", peer.node), ("password", peer.password)) if v is not None})
        return spec


@dataclass(frozen=True)
class BgpSettings:
    """The BGP part of the cluster config; its other settings (reclaim grace) are kept as they are."""

    name: str = "default"
    as_number: int = ClusterConfig.as_number
    mesh: bool = ClusterConfig.mesh

    def merged_into(self, config):
        return replace(config, as_number=self.as_number, mesh=self.mesh)


class BgpConfigKind(Kind):
    """The cluster's one BGP configuration, named ``default`` (as calicoctl's BGPConfiguration)."""

    kind = "BGPConfig"
    label = "bgpconfig"
    aliases = ("bgpconfigs", "bgpconfiguration", "bgpconfigurations")
    prefix = keys.CLUSTER_CONFIG
    spec_fields = ("asNumber", "mesh")

    def key(self, name):
        return keys.CLUSTER_CONFIG

    def decode(self, kv):
        config = ClusterConfig.from_dict(kv.value if kv else None)
        return BgpSettings(as_number=config.as_number, mesh=config.mesh)

    def lookup(self, ds, name):
        return self.list(ds)[0][0] if name == "default" else None

    def names_in(self, kvs):
        return ["default"]

    def similar(self, name, names):
        return ["default"]

    def list(self, ds):
        kv = ds.get(keys.CLUSTER_CONFIG)
        return [self.decode(kv)], []

    def parse_fields(self, meta, spec, path, problems):
        if meta["name"] != "default":
            problems.add(
                path + ("metadata", "name"),
                f'{show(meta["name"])} is not "default" (the cluster has one BGP configuration)',
            )
        as_number = _optional(spec, "asNumber", expect_int, path, problems, check_as_number)
        mesh = _optional(spec, "mesh", expect_bool, path, problems)
        if problems.items:
            return None
        defaults = BgpSettings()
        return BgpSettings(
            as_number=defaults.as_number if as_number is None else as_number,
            mesh=defaults.mesh if mesh is None else mesh,
        )

    def spec_of(self, settings):
        return {"asNumber": settings.as_number, "mesh": settings.mesh}

    def _write(self, plan, res, settings, verb):
        current = plan.current(res.key)
        old = ClusterConfig.from_dict(current.value) if current else ClusterConfig()
        new = settings.merged_into(old)
        if new == old:
            plan.done(res, "unchanged")
        else:
            plan.put(res, new.to_dict(), verb=verb)

    def apply(self, plan, res):
        self._write(plan, res, res.record, None)

    def delete(self, plan, res):
        """Back to the defaults: the cluster always has a BGP configuration."""
        self._write(plan, res, BgpSettings(), "reset to defaults")


@dataclass(frozen=True)
class NodeSettings:
    """What an operator sets on a registered node (``netctl node set``); the agent owns the rest."""

    name: str
    labels: dict = field(default_factory=dict)
    address: str | None = None  # None: leave the registered address (autodetected or given to the agent)
    as_number: int | None = None
    route_reflector: bool = False

    def merged_into(self, node):
        out = replace(node, labels=dict(self.labels), as_number=self.as_number, route_reflector=self.route_reflector)
        if self.address is not None:
            out.set_address(self.address)
        return out


class NodeKind(Kind):
    kind = "Node"
    label = "node"
    aliases = ("nodes",)
    prefix = keys.NODES
    spec_fields = ("address", "asNumber", "routeReflector")
    metadata_fields = ("name", "labels")

    def key(self, name):
        return keys.node(name)

    def not_found(self, name):
        return f"node {name} is not registered"

    def decode(self, kv):
        node = Node.from_dict(kv.value)
        return NodeSettings(
            name=node.name,
            labels=dict(node.labels),
            as_number=node.as_number,
            route_reflector=node.route_reflector,
            address=None if node.address_autodetected else node.address,
        )

    def parse_fields(self, meta, spec, path, problems):
        mpath = path + ("metadata",)
        _field(problems, mpath + ("name",), keys.node, meta["name"])
        labels = problems.attempt(expect_mapping, meta.get("labels") or {}, mpath + ("labels",)) or {}
        for key, value in labels.items():
            # As `node set --label KEY=VALUE`: a key is any non-empty text without "=", a value any text.
            if not key or "=" in key:
                problems.add(mpath + ("labels", key), f"{show(key)} is not a label key (non-empty, without '=')")
            problems.attempt(expect_str, value, mpath + ("labels", key))
        address = _optional(spec, "address", expect_str, path, problems, lambda a: check_ip(a, "node address"))
        as_number = _optional(spec, "asNumber", expect_int, path, problems, check_as_number)
        reflector = _optional(spec, "routeReflector", expect_bool, path, problems)
        if problems.items:
            return None
        return NodeSettings(
            name=meta["name"],
            labels=dict(labels),
            address=address,
            as_number=as_number,
            route_reflector=bool(reflector),
        )

    def document(self, settings):
        doc = super().document(settings)
        doc["metadata"]["labels"] = dict(settings.labels)
        return doc

    def spec_of(self, settings):
        spec = {"routeReflector": settings.route_reflector}
        spec.update(
            {k: v for k, v in (("address", settings.address), ("asNumber", settings.as_number)) if v is not None}
        )
        return spec

    def apply(self, plan, res):
        current = plan.current(res.key)
        if current is None:
            plan.problem(
                res, ("metadata", "name"), f"node {res.name} is not registered (its agent registers it when it starts)"
            )
            return
        plan.put(res, res.record.merged_into(Node.from_dict(current.value)).to_dict())

    def delete(self, plan, res):
        plan.done(res, "kept (a node's record belongs to its agent)")


KINDS = (PolicyKind(), NetworkPolicyKind(), PoolKind(), BgpPeerKind(), BgpConfigKind(), NodeKind())
POLICY_KINDS = KINDS[:2]


def kind_named(word):
    """The kind ``netctl get`` means by ``word``: singular, plural or lower case."""
    for kind in KINDS:
        if word.lower() in kind.words():
            return kind
    raise InvalidInput(f"unknown kind {word!r} (one of: {', '.join(k.kind for k in KINDS)})")
