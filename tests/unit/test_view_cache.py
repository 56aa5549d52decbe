"""The agent's in-memory model (view.ViewCache) against the full read it replaces.

Real etcd (the session's loopback server) and the real PrefixWatch deliver the events: after any sequence of
puts, deletes and multi-key transactions, the model's view must equal what ``read_view`` returns at that revision,
and its ViewChanges must name exactly the keys that changed.
"""

import dataclasses

import pytest

from netplugin.agent.reconcilers import RoutingGate
from netplugin.agent.view import EVERYTHING, ViewCache, ViewChanges, read_view
from netplugin.datastore import keys
from netplugin.datastore.client import KV, delete_op, put_op
from netplugin.datastore.models import BgpPeer, ClusterConfig, Endpoint, Network, Node, Pool
from netplugin.datastore.watch import Event, PrefixWatch
from netplugin.errors import DatastoreUnavailable
from tests.badrecords import bad_records, put_raw

WAIT = 10.0


def _endpoint(host, n, labels=None):
    return Endpoint(
        id=f"ep{n}",
        host=host,
        network="blue",
        container_id=f"c{n}",
        netns=f"/run/netns/c{n}",
        ifname="eth0",
        host_ifname=f"np{n:011x}",
        addresses=[f"10.0.0.{n}/32"],
        labels=labels or {},
    )


def _populate(ds):
    ds.put(keys.CLUSTER_CONFIG, ClusterConfig(as_number=64600).to_dict())
    for h in ("h1", "h2", "h3"):
        ds.put(keys.node(h), Node(h, f"192.168.0.{h[1]}").to_dict())
        ds.put(keys.affinity(h, f"10.0.{h[1]}.0/26"), {"host": h, "cidr": f"10.0.{h[1]}.0/26"})
    ds.put(keys.liveness("h1"), {"host": "h1"})
    ds.put(keys.bgp_peer("tor"), BgpPeer("tor", "192.168.0.254", 65001).to_dict())
    ds.put(keys.pool("10.0.0.0/16"), Pool("10.0.0.0/16", 26).to_dict())
    ds.put(keys.network("blue"), Network("blue").to_dict())
    ds.put(keys.policy("p1"), {"metadata": {"name": "p1"}, "spec": {"selector": {}}})
    for n in (1, 2):
        ds.put(keys.endpoint("h1", f"ep{n}"), _endpoint("h1", n).to_dict())
    ds.put(keys.block("10.0.1.0/26"), {"cidr": "10.0.1.0/26"})  # not part of the view


class Model:
    """A ViewCache fed by a real watch, as the agent wires it."""

    def __init__(self, ds):
        self.ds = ds
        self.cache = ViewCache(ds)
        view, changes = self.cache.view()
        assert changes is EVERYTHING
        self.watch = PrefixWatch(ds, keys.ROOT, view.revision, self.cache.add_events, self._resync, name="t")
        self.watch.start()

    def _resync(self):
        revision = self.ds.revision()
        self.cache.invalidate(revision)
        return revision

    def caught_up(self):
        """(view, changes) once the watch delivered everything written so far."""
        assert self.cache.wait_seen(self.ds.revision(), WAIT), "the watch did not deliver in time"
        return self.cache.view()

    def close(self):
        self.watch.stop()


@pytest.fixture
def model(etcd):
    _populate(etcd)
    m = Model(etcd)
    try:
        yield m
    finally:
        m.close()


def test_events_give_the_same_view_as_a_full_read(etcd, model):
    assert model.cache.reloads == 1
    steps = [
        lambda: etcd.put(keys.endpoint("h2", "ep3"), _endpoint("h2", 3).to_dict()),
        lambda: etcd.put(keys.endpoint("h1", "ep1"), _endpoint("h1", 1, {"app": "web"}).to_dict()),  # relabel
        lambda: etcd.delete(keys.endpoint("h1", "ep2")),
        lambda: etcd.txn(
            [],
            [
                put_op(keys.affinity("h2", "10.0.2.64/26"), {}),
                put_op(keys.handle("x"), {}),
                delete_op(keys.affinity("h3", "10.0.3.0/26")),
                put_op(keys.node("h4"), Node("h4", "192.168.0.4", route_reflector=True).to_dict()),
            ],
        ),
        lambda: etcd.delete(keys.liveness("h1")),
        lambda: etcd.put(keys.CLUSTER_CONFIG, ClusterConfig(as_number=64601, mesh=False).to_dict()),
        lambda: etcd.delete_prefix(keys.POLICIES),
        lambda: etcd.put(keys.policy("p2"), {"metadata": {"name": "p2"}}),
        lambda: etcd.delete(keys.bgp_peer("tor")),
        lambda: etcd.put(keys.network("red"), Network("red").to_dict()),
    ]
    for step in steps:
        step()
        view, changes = model.caught_up()
        full = read_view(etcd)
        assert view == full
        assert view.revision == full.revision == etcd.revision()
    assert model.cache.reloads == 1  # never read everything again


def test_changes_name_exactly_the_keys_written_since_the_last_view(etcd, model):
    _, changes = model.caught_up()
    assert not changes and not changes.everything
    etcd.put(keys.endpoint("h2", "ep3"), _endpoint("h2", 3).to_dict())
    etcd.put(keys.handle("h"), {"handle": "h"})  # IPAM churn: advances the revision, changes nothing
    etcd.txn([], [put_op(keys.affinity("h2", "10.0.2.64/26"), {}), delete_op(keys.endpoint("h1", "ep1"))])
    view, changes = model.caught_up()
    assert changes.keys == {keys.endpoint("h2", "ep3"), keys.affinity("h2", "10.0.2.64/26"), keys.endpoint("h1", "ep1")}
    assert changes.touches(keys.ENDPOINTS) and changes.touches(keys.affinity_prefix("h2"))
    assert not changes.touches(keys.affinity_prefix("h1"), keys.NODES, keys.POLICIES)
    assert view.revision == etcd.revision()  # the handle's revision counts too
    _, changes = model.caught_up()
    assert not changes


def test_compaction_makes_the_next_view_a_full_read_that_loses_nothing(etcd, model):
    model.caught_up()
    etcd.put(keys.endpoint("h2", "ep3"), _endpoint("h2", 3).to_dict())
    model.cache.invalidate(etcd.revision())  # as the watch does when etcd compacted past it
    etcd.put(keys.endpoint("h2", "ep4"), _endpoint("h2", 4).to_dict())
    view, changes = model.caught_up()
    assert changes is EVERYTHING and model.cache.reloads == 2
    assert view == read_view(etcd)


def test_a_full_read_drops_queued_events_it_already_holds_and_applies_newer_ones(etcd, model):
    model.caught_up()
    etcd.put(keys.endpoint("h2", "ep3"), _endpoint("h2", 3).to_dict())
    model.cache.wait_seen(etcd.revision(), WAIT)
    # A replayed old event (a watch resumed from an older revision) must not undo the newer state.
    stale = KV(key=keys.endpoint("h1", "ep1"), value=None, mod_revision=2, create_revision=2)
    model.cache.add_events([Event("delete", stale)])
    view, changes = model.cache.view(reload=True)
    assert changes is EVERYTHING and view == read_view(etcd)
    etcd.put(keys.endpoint("h2", "ep4"), _endpoint("h2", 4).to_dict())
    view, changes = model.caught_up()
    assert changes.keys == {keys.endpoint("h2", "ep4")} and view == read_view(etcd)


def test_a_revision_the_watch_has_not_delivered_is_read_from_etcd(etcd):
    _populate(etcd)
    cache = ViewCache(etcd)  # no watch feeds this one
    cache.view()
    etcd.put(keys.endpoint("h2", "ep3"), _endpoint("h2", 3).to_dict())
    view, changes = cache.view()
    assert not changes and view != read_view(etcd)  # nothing delivered yet: the model is behind
    view, changes = cache.view(min_revision=etcd.revision())
    assert changes is EVERYTHING and view == read_view(etcd)


def _same(a, b):
    return dataclasses.replace(a, revision=0) == dataclasses.replace(b, revision=0)


def test_bad_records_under_every_prefix_are_skipped_counted_and_listed(etcd, model):
    """Full reads and watch events alike: a bad record is skipped (the view keeps what the key held before) and
    listed with why; fixing or deleting it takes it off the list."""
    _populate(etcd)
    before, _ = model.caught_up()
    put_raw(etcd, keys.endpoint("h1", "ep1"), '{"truncated')  # a good record overwritten with garbage
    for key, text in bad_records("h1"):
        put_raw(etcd, key, text)
    view, changes = model.caught_up()  # through the watch's events
    assert _same(view, before), "a bad record changed the view"
    listed = {r["key"]: r for r in model.cache.skipped.snapshot()}
    assert set(listed) == {k for k, _ in bad_records("h1")} | {keys.endpoint("h1", "ep1")}
    assert all(r["error"] and r["revision"] > 0 for r in listed.values()), listed
    assert "does not match the key" in listed[keys.node("z")]["error"]
    total = model.cache.skipped.total
    view, changes = model.cache.view(reload=True)  # a full read sees the same, and counts nothing twice
    assert changes is EVERYTHING and _same(view, before) and model.cache.skipped.total == total
    assert read_view(etcd).endpoints_of("h1") == [e for e in before.endpoints_of("h1") if e.id != "ep1"]
    etcd.put(keys.endpoint("h1", "ep1"), _endpoint("h1", 1).to_dict())
    for key, _ in bad_records("h1"):
        etcd.delete(key)
    view, _ = model.caught_up()
    assert model.cache.skipped.snapshot() == [] and view == read_view(etcd)


def test_a_read_older_than_an_invalidation_is_refused(etcd):
    _populate(etcd)
    cache = ViewCache(etcd)
    cache.invalidate(etcd.revision() + 1000)  # etcd claims a revision it then never reaches
    with pytest.raises(DatastoreUnavailable, match="older than revision"):
        cache.view()


def test_a_history_gone_backwards_resets_the_floor_instead_of_refusing_forever(etcd):
    """etcd restored from an older snapshot: the watch had seen (and a compaction resync floored at) revisions
    the store will not reach again; its resync with the store's lower revision must make views work again."""
    _populate(etcd)
    cache = ViewCache(etcd)
    cache.view()
    future = etcd.revision() + 1000  # the revisions of the history the restore threw away
    cache.add_events([Event("put", KV(keys.policy("gone"), {}, future, future))])
    cache.invalidate(future)  # a compaction resync in the old history
    with pytest.raises(DatastoreUnavailable, match="older than revision"):
        cache.view()
    cache.invalidate(etcd.revision())  # the watch saw the revision go backwards and resyncs
    view, changes = cache.view()
    assert changes is EVERYTHING and view == read_view(etcd)
    assert cache.wait_seen(etcd.revision(), 0) and not cache.wait_seen(etcd.revision() + 1, 0)


def test_view_changes_touches():
    changes = ViewChanges(everything=False, keys=frozenset({keys.endpoint("h1", "a")}))
    assert changes.touches(keys.ENDPOINTS) and changes.touches(keys.POLICIES, keys.endpoint_prefix("h1"))
    assert not changes.touches(keys.endpoint_prefix("h2"))
    assert EVERYTHING.touches(keys.NODES) and EVERYTHING
    assert not ViewChanges(everything=False)


class _Counting:
    def __init__(self):
        self.calls = []

    def sync(self, view, full=False):
        self.calls.append(full)


@pytest.mark.parametrize("mode,other_blocks_matter", [("bgp", False), ("direct", True)])
def test_routing_runs_unless_only_keys_it_never_reads_changed(mode, other_blocks_matter):
    inner = _Counting()
    gate = RoutingGate(inner, "h1", mode)

    def changed(*ks):
        return ViewChanges(everything=False, keys=frozenset(ks))

    gate.sync(
        None, changes=changed(keys.endpoint("h2", "a"), keys.policy("p"), keys.network("n"), keys.pool("10.0.0.0/16"))
    )
    assert inner.calls == []
    gate.sync(None, changes=changed(keys.affinity("h2", "10.0.2.0/26")))
    assert len(inner.calls) == int(other_blocks_matter)
    for k in (
        keys.affinity("h1", "10.0.1.0/26"),
        keys.node("h9"),
        keys.bgp_peer("tor"),
        keys.CLUSTER_CONFIG,
        keys.liveness("h2"),
    ):
        before = len(inner.calls)
        gate.sync(None, changes=changed(k, keys.endpoint("h2", "b")))
        assert len(inner.calls) == before + 1, k
    gate.sync(None, full=True, changes=changed())
    gate.sync(None)  # no changes given: everything may have changed
    assert inner.calls[-2:] == [True, False]
