"""A snapshot of the cluster state the agent's reconcilers need, and the in-memory model that keeps it current.

``read_view`` reads every prefix in one transaction (one consistent revision). ``ViewCache`` does that once, then
advances its copy with the watch's events (Felix's in-memory model): a sync pass then costs no etcd round trip and
no JSON decoding of records that did not change, and it says which keys changed (``ViewChanges``), so each
reconciler can skip work that change cannot affect. Events are applied a whole watch response at a time, and etcd
never splits one revision across responses, so a view still reflects one revision.

Bad data is data (STYLE.md #15): a record that does not decode, or does not fit its key, is skipped wherever it
is read (full read or watch event), logged once per (key, revision) with why, counted and listed
(``SkippedRecords``: the agent's health answer; ``netctl check`` finds the same with ``decode``). It never fails a
view, so one stray ``etcdctl put`` cannot stop every agent's sync.
"""

import logging
import threading
from dataclasses import dataclass, field

from netplugin.datastore import keys
from netplugin.datastore.models import BadRecord, BgpPeer, ClusterConfig, Endpoint, Network, Node, Pool
from netplugin.errors import DatastoreUnavailable, InvalidInput

LOG = logging.getLogger(__name__)

PREFIXES = (
    keys.CLUSTER_CONFIG,
    keys.NODES,
    keys.LIVENESS,
    keys.BGP_PEERS,
    keys.AFFINITY,
    keys.ENDPOINTS,
    keys.POLICIES,
    keys.NETWORKS,
    keys.POOLS,
)


@dataclass
class ClusterView:
    revision: int = 0
    config: ClusterConfig = field(default_factory=ClusterConfig)
    nodes: dict = field(default_factory=dict)  # name -> Node
    alive: set = field(default_factory=set)
    peers: list = field(default_factory=list)
    blocks: dict = field(default_factory=dict)  # host -> sorted list of block CIDRs affine to it
    endpoints: list = field(default_factory=list)  # every host's
    policies: list = field(default_factory=list)  # raw dicts, validated by policy/
    networks: dict = field(default_factory=dict)
    pools: list = field(default_factory=list)

    def endpoints_of(self, host):
        return [e for e in self.endpoints if e.host == host]


@dataclass(frozen=True)
class ViewChanges:
    """What changed since the previous view handed out. ``everything`` (a full read, or the first view) means
    any part may have changed; otherwise ``keys`` lists the changed keys (puts and deletes)."""

    everything: bool = True
    keys: frozenset = frozenset()

    def touches(self, *prefixes):
        """Did a key under any of ``prefixes`` (or an exact key) change?"""
        return self.everything or any(k.startswith(prefixes) for k in self.keys)

    def __bool__(self):
        return self.everything or bool(self.keys)


EVERYTHING = ViewChanges()


def relevant(key):
    """Does a change to ``key`` concern the reconcilers? (handles and block records do not: they churn.)"""
    return key.startswith(PREFIXES)


def _decode(key, value):
    """The model object one stored record stands for in a ClusterView; BadRecord when it is not usable."""
    name = keys.last_segment(key)
    if key.startswith(keys.CLUSTER_CONFIG):
        if key != keys.CLUSTER_CONFIG:
            raise BadRecord("not a key netplugin uses")
        return ClusterConfig.from_dict(value)
    if key.startswith(keys.NODES):
        return _named(Node.from_dict(value), "name", name)
    if key.startswith(keys.LIVENESS):
        if "/" in key[len(keys.LIVENESS) :]:
            raise BadRecord("a liveness key is liveness/<host>")
        return name  # only the key (and its lease) matters
    if key.startswith(keys.BGP_PEERS):
        return _named(BgpPeer.from_dict(value), "name", name)
    if key.startswith(keys.AFFINITY):
        host, _, segment = key[len(keys.AFFINITY) :].partition("/")
        if not host or not segment or "/" in segment:
            raise BadRecord("an affinity key is ipam/affinity/<host>/<block>")
        return (host, keys.segment_cidr(segment))
    if key.startswith(keys.ENDPOINTS):
        host, _, ep_id = key[len(keys.ENDPOINTS) :].partition("/")
        return _named(_named(Endpoint.from_dict(value), "host", host), "id", ep_id)
    if key.startswith(keys.POLICIES):
        # Validated by the policy reconciler, and only where it selects a local endpoint (policy.py).
        meta = value.get("metadata") if isinstance(value, dict) else None
        if not isinstance(meta, dict) or meta.get("name") != name:
            raise BadRecord(f"a policy stored here must be a JSON object with metadata.name {name!r}")
        return value
    if key.startswith(keys.NETWORKS):
        return _named(Network.from_dict(value), "name", name)
    if key.startswith(keys.POOLS):
        pool = Pool.from_dict(value)
        if keys.cidr_segment(pool.cidr) != name:
            raise BadRecord(f"pool {pool.cidr} is stored under another pool's key")
        return pool
    raise BadRecord("not a key netplugin uses")


def _named(record, attr, expected):
    """A record whose ``attr`` disagrees with its key would stand in for another (a node, an endpoint)."""
    if getattr(record, attr) != expected:
        raise BadRecord(f"its {attr} {getattr(record, attr)!r} does not match the key ({expected!r})")
    return record


def decode(key, value):
    """``_decode`` behind the one boundary where bad data becomes a BadRecord, whatever went wrong."""
    try:
        return _decode(key, value)
    except BadRecord:
        raise
    except InvalidInput as e:
        raise BadRecord(e.msg) from None
    except Exception as e:  # noqa: BLE001 - any failure to read a stored record is the record's fault
        raise BadRecord(f"{type(e).__name__}: {e}") from None


class SkippedRecords:
    """Records the agent could not use, so the operator can see them (health answer, ``netctl check``).

    Each (key, revision) is logged once with why; ``total`` counts them. A key leaves the list when a valid value
    or a delete replaces it. The view keeps what it had from a key whose new value is bad: a stray write never
    removes an endpoint, node or policy the agent is acting on, only a delete does."""

    def __init__(self):
        self._lock = threading.Lock()
        self._bad = {}  # key -> (mod revision, why)
        self.total = 0

    def note(self, key, revision, why):
        with self._lock:
            if self._bad.get(key, (None,))[0] == revision:
                return
            self._bad[key] = (revision, why)
            self.total += 1
        LOG.warning("event=record.skipped key=%s revision=%s error=%s", key, revision, why)

    def clear(self, key):
        with self._lock:
            self._bad.pop(key, None)

    def keep_only(self, bad_keys):
        with self._lock:
            self._bad = {k: v for k, v in self._bad.items() if k in bad_keys}

    def snapshot(self):
        with self._lock:
            return [{"key": k, "revision": r, "error": why} for k, (r, why) in sorted(self._bad.items())]


def _build(records, revision):
    """A ClusterView from {key: decoded record}, in key order within each prefix (as a range read returns)."""
    view = ClusterView(revision=revision)
    for k in sorted(records):
        obj = records[k]
        if k == keys.CLUSTER_CONFIG:
            view.config = obj
        elif k.startswith(keys.NODES):
            view.nodes[obj.name] = obj
        elif k.startswith(keys.LIVENESS):
            view.alive.add(obj)
        elif k.startswith(keys.BGP_PEERS):
            view.peers.append(obj)
        elif k.startswith(keys.AFFINITY):
            view.blocks.setdefault(obj[0], []).append(obj[1])
        elif k.startswith(keys.ENDPOINTS):
            view.endpoints.append(obj)
        elif k.startswith(keys.POLICIES):
            view.policies.append(obj)
        elif k.startswith(keys.NETWORKS):
            view.networks[obj.name] = obj
        elif k.startswith(keys.POOLS):
            view.pools.append(obj)
    return view


def _read_records(ds, skipped, previous=None):
    """({key: decoded record}, revision) of every view prefix, read in one transaction (one revision). A bad
    record is noted in ``skipped`` and stands for what ``previous`` held for its key, if anything."""
    lists, revision = ds.get_prefixes(PREFIXES)
    records, bad = {}, set()
    for kvs in lists:
        for kv in kvs:
            try:
                records[kv.key] = decode(kv.key, kv.value)
            except BadRecord as e:
                bad.add(kv.key)
                skipped.note(kv.key, kv.mod_revision, e.msg)
                if previous and kv.key in previous:
                    records[kv.key] = previous[kv.key]
    skipped.keep_only(bad)
    return records, revision


def read_view(ds, skipped=None):
    records, revision = _read_records(ds, skipped if skipped is not None else SkippedRecords())
    return _build(records, revision)


class ViewCache:
    """The ClusterView in memory, advanced by watch events.

    The watch thread calls ``add_events`` (cheap: it only queues them); the sync thread calls ``view`` to apply
    what is queued and get the current view with what changed since its previous call. ``invalidate`` (etcd
    compacted past the watch) makes the next ``view`` read everything again, as does ``view(reload=True)`` (the
    periodic full resync, which also repairs a model that drifted for any reason). Events at or below the revision
    of the last full read are dropped, so a read racing the watch never applies a change twice or backwards.
    """

    def __init__(self, ds):
        self.ds = ds
        self._cond = threading.Condition()
        self._pending = []  # (revision, [Event]) not applied yet
        self._seen = 0  # the highest revision the watch has delivered
        self._records = None  # key -> decoded record; None: read everything at the next view()
        self._revision = 0  # the revision _records reflects
        self._changed = set()  # keys changed since the last view handed out
        self._floor = 0  # a full read must reach this revision (the watch resumes after it)
        self.reloads = 0  # full reads done (a metric and a test hook)
        self.skipped = SkippedRecords()
        self._last_records = None  # the model before an invalidate: what a bad record stands for meanwhile

    def add_events(self, events):
        """Queue one watch response's events; returns True when one of them concerns the reconcilers. Others
        (IPAM handles and blocks churn) only advance the revision."""
        revision = max(e.kv.mod_revision for e in events)
        wanted = [e for e in events if relevant(e.kv.key)]
        with self._cond:
            if not wanted and self._pending and not self._pending[-1][1]:
                self._pending[-1] = (revision, wanted)
            else:
                self._pending.append((revision, wanted))
            self._seen = max(self._seen, revision)
            self._cond.notify_all()
        return bool(wanted)

    def invalidate(self, revision=0):
        """Forget the model: the watch lost events (compaction) and resumes after ``revision``. A ``revision``
        below one already seen means etcd's history went backwards (restored from an older snapshot): what the
        old history said is void, so the floor and the seen revision come down to it."""
        with self._cond:
            self._last_records = self._records or self._last_records
            self._records = None
            if revision < self._seen:
                self._pending, self._floor, self._seen = [], revision, revision
            self._floor = max(self._floor, revision)

    def wait_seen(self, revision, timeout):
        """Wait until the watch has delivered ``revision`` (a write this host made); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._seen >= revision, timeout)

    def view(self, reload=False, min_revision=0):
        """(ClusterView, ViewChanges). A full read happens when asked, after ``invalidate``, on the first call,
        or when the watch has not delivered ``min_revision`` yet."""
        with self._cond:
            if not reload and self._records is not None and self._seen >= min_revision:
                self._apply_pending()
                return self._take(ViewChanges(everything=False, keys=frozenset(self._changed)))
        for _ in range(3):
            records, revision = _read_records(self.ds, self.skipped, self._records or self._last_records)
            with self._cond:
                if revision < self._floor:
                    continue  # this read began before an invalidate: the watch resumes after what it missed
                self._records, self._revision, self._last_records = records, revision, None
                self._seen = max(self._seen, revision)
                self.reloads += 1
                self._apply_pending()
                return self._take(EVERYTHING)
        raise DatastoreUnavailable(
            f"reading the cluster state: etcd answered at revision {revision}, older than"
            f" revision {self._floor} it reported before"
        )

    def _take(self, changes):
        self._changed.clear()
        return _build(self._records, self._revision), changes

    def _apply_pending(self):
        pending, self._pending = self._pending, []
        for revision, events in pending:
            if revision <= self._revision:
                continue  # the last full read already holds it
            for e in events:
                key = e.kv.key
                if e.kind == "delete":
                    self._records.pop(key, None)
                else:
                    try:
                        self._records[key] = decode(key, e.kv.value)
                    except BadRecord as err:
                        self.skipped.note(key, e.kv.mod_revision, err.msg)
                        continue  # keep what the key held before (see SkippedRecords)
                self.skipped.clear(key)
                self._changed.add(key)
            self._revision = revision
