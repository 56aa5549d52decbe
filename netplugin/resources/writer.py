"""``apply -f``, ``delete -f`` and ``get``: every document checked before anything is written, then one transaction.

A file is loaded whole (``policy.loader``: every problem as ``file:line: field: message``). Apply and delete then
read one snapshot of the prefixes the file's kinds need (a single consistent read), plan every resource against
it, and commit the plan as **one** etcd transaction guarded by the mod-revision each touched key had in the
snapshot (a key that was absent must still be absent) plus the range guards a kind asks for. A lost race re-reads
and re-plans; a file is never half written. What only etcd can tell (a pool overlapping a stored one, a node not
registered, a pool still in use, a name that does not exist) is refused before the transaction, with the line of
the document it concerns.
"""

from netplugin.datastore.client import MAX_TXN_OPS, delete_op, mod_is, put_op
from netplugin.errors import Conflict, InvalidInput, NotFound
from netplugin.resources.kinds import KINDS, Resource
from policy.loader import load_resources, read_source
from policy.validation import PolicyValidationError, Problems, line_of, show, to_problems

ATTEMPTS = 10


def load(path, kinds=KINDS):
    """Every resource in the YAML file ``path`` (``-``: stdin), as Resources of ``kinds``."""
    text, source = read_source(path, what="resource")
    return load_text(text, source, kinds)


def load_text(text, source, kinds=KINDS):
    by_kind = {k.kind: k for k in kinds}

    def parse(doc, path, problems):
        if not isinstance(doc, dict):
            problems.add(path, f"must be a mapping with apiVersion, kind, metadata and spec, not {show(doc)}")
            return None
        kind = by_kind.get(doc.get("kind"))
        if kind is not None:
            return kind.parse(doc, path, problems)
        expected = ", ".join(sorted(by_kind))
        if doc.get("kind") is None:
            problems.add(path + ("kind",), f"required (one of: {expected})")
        else:
            elsewhere = " (netctl apply -f takes it)" if doc["kind"] in {k.kind for k in KINDS} else ""
            problems.add(path + ("kind",), f"{show(doc['kind'])} is not one of: {expected}{elsewhere}")
        return None

    return load_resources(text, source, parse, key=lambda r: r.key, name=lambda r: r.name)


def apply(ds, loaded):
    """Create or update every resource of ``loaded``; returns (Resource, what happened) per resource."""
    return _commit(ds, loaded.items, "apply", loaded)


def delete(ds, loaded, ignore_not_found=False):
    """Delete every resource ``loaded`` defines, or none."""
    return _commit(ds, loaded.items, "delete", loaded, ignore_not_found)


def delete_named(ds, kind, names, ignore_not_found=False):
    """Delete resources of ``kind`` by their stored names (``netctl policy delete NAME``)."""
    return _commit(ds, [Resource(kind, name, None) for name in names], "delete", None, ignore_not_found)


def get(ds, kind, name=None, namespace=None):
    """The document of one resource, or a ``List`` of every one ``namespace`` (None: any) selects, plus the names of
    stored records that did not decode (shown to the operator, never fatal)."""
    if name is not None:
        full = kind.full_name(name, namespace)
        record = kind.lookup(ds, full)
        if record is None:
            raise NotFound(kind.not_found(full) + _similar(kind, full, kind.names_in(ds.list(kind.prefix))))
        return kind.document(record), []
    if namespace is not None:
        kind.full_name("", namespace)  # refuses -n for kinds without namespaces
    records, bad = kind.list(ds)
    docs = [kind.document(r) for r in sorted(records, key=kind.name_of) if kind.selects(kind.name_of(r), namespace)]
    return {"apiVersion": "v1", "kind": "List", "items": docs}, bad


def _similar(kind, name, names):
    similar = kind.similar(name, [n for n in names if n != name])
    return f"; similar names: {', '.join(similar)}" if similar else ""


# --- planning ----------------------------------------------------------------------------------------------------


class Snapshot:
    """The prefixes a plan needs, read at one revision."""

    def __init__(self, ds, prefixes):
        self.prefixes = sorted(set(prefixes))
        lists, self.revision = ds.get_prefixes(self.prefixes)
        self._kvs = {kv.key: kv for kvs in lists for kv in kvs}

    def get(self, key):
        assert any(key.startswith(p) for p in self.prefixes), f"{key} is outside the snapshot"
        return self._kvs.get(key)

    def under(self, prefix):
        return [kv for key, kv in sorted(self._kvs.items()) if key.startswith(prefix)]


class Plan:
    """The compare and the operations of one transaction, built by the kinds' ``apply``/``delete``."""

    def __init__(self, snapshot, loaded=None):
        self.snapshot = snapshot
        self.loaded = loaded
        self.compare, self.ops, self.results = [], [], []
        self.problems = Problems()
        self._missing, self._created = [], []

    def current(self, key):
        return self.snapshot.get(key)

    def put(self, res, value, verb=None):
        current = self.current(res.key)
        if current is not None and current.value == value:
            self.done(res, "unchanged")
            return
        self.compare.append(mod_is(res.key, current.mod_revision if current else 0))
        self.ops.append(put_op(res.key, value))
        if current is None:
            self._created.append(res)
        self.done(res, verb or ("configured" if current else "created"))

    def remove(self, key, guard=True):
        if guard:
            current = self.current(key)
            self.compare.append(mod_is(key, current.mod_revision if current else 0))
        self.ops.append(delete_op(key))

    def guard(self, compare):
        if compare not in self.compare:
            self.compare.append(compare)

    def done(self, res, verb):
        self.results.append((res, verb))

    def created(self, kind):
        return [r for r in self._created if r.kind is kind]

    def missing(self, res):
        self._missing.append(res)

    def problem(self, res, path, msg):
        self.problems.add(res.path + tuple(path), msg)

    def refuse(self, res, err):
        """Stop at an error etcd's state causes (a pool in use), saying which document it concerns."""
        raise type(err)(self.where(res) + err.msg)

    def where(self, res):
        if self.loaded is None:
            return ""
        line = line_of(self.loaded.marks, res.path + ("metadata", "name"))
        return f"{self.loaded.source}:{line}: " if line else f"{self.loaded.source}: "

    def check(self, ignore_not_found):
        if self.problems.items:
            if self.loaded is not None:
                raise self.loaded.error(self.problems)
            raise PolicyValidationError(to_problems(self.problems.items))
        if self._missing and not ignore_not_found:
            res = self._missing[0]
            more = len(self._missing) - 1
            names = res.kind.names_in(self.snapshot.under(res.kind.prefix))
            raise NotFound(
                self.where(res)
                + res.kind.not_found(res.name)
                + _similar(res.kind, res.name, names)
                + (f" (and {more} more that do not exist)" if more else "")
            )
        size = max(len(self.ops), len(self.compare))
        if size > MAX_TXN_OPS:
            source = f"{self.loaded.source}: " if self.loaded else ""
            raise InvalidInput(
                f"{source}this needs {size} operations in one transaction, more than the "
                f"{MAX_TXN_OPS} etcd takes: split the file"
            )


def _commit(ds, resources, action, loaded=None, ignore_not_found=False):
    if not resources:
        return []
    prefixes = {p for res in resources for p in res.kind.read_prefixes()}
    for _ in range(ATTEMPTS):
        plan = Plan(Snapshot(ds, prefixes), loaded)
        for res in resources:
            getattr(res.kind, action)(plan, res)
        plan.check(ignore_not_found)
        if not plan.ops or ds.txn(plan.compare, plan.ops).succeeded:
            return plan.results
    raise Conflict(
        f"could not {action} {loaded.source if loaded else 'that'}: what it touches kept changing in etcd; try again"
    )
