"""A block this host just claimed reaches BIRD while the ADD that claimed it still holds the host lock: routing
runs before the dataplane reconciler. At 200 hosts waiting for the ADD put the route's advertisement after the ADD
returned (100-350 ms of every new block's convergence). The dataplane's part of a new block (its blackhole) does
not wait for the lock either, and the whole pass, which does, is not run for it."""

import threading

from netplugin.agent.reconcilers import build_reconcilers
from netplugin.agent.rwlock import RWLock
from netplugin.agent.view import ClusterView, ViewChanges
from netplugin.config import AgentConfig
from netplugin.datastore import keys

HOST = "h1"
BLOCK = "10.244.0.0/26"


class Dataplane:
    """The backend's calls a pass makes for this change, recorded (the kernel work is not what is tested)."""

    def __init__(self):
        self.reconciled = threading.Event()
        self.blocks = None

    def reconcile(self, desired, blocks, deletable=()):
        self.reconciled.set()
        return {}

    def converge_blocks(self, blocks):
        self.blocks = blocks
        return {}

    def apply_policy(self, *a, **kw):
        return {}


class Service:
    def list(self, host):
        return []

    def spec_of(self, ep):
        raise AssertionError("no endpoint in this test")


class Routing:
    def __init__(self):
        self.synced = threading.Event()

    def sync(self, view, full=False):
        self.synced.set()


def test_routing_sees_a_new_own_block_while_an_add_holds_the_host_lock():
    lock, routing, dataplane = RWLock(), Routing(), Dataplane()
    parts = build_reconcilers(AgentConfig(hostname=HOST, routing="bgp"), dataplane, Service(), lock, routing)
    view = ClusterView(revision=2, blocks={HOST: [BLOCK]})
    changes = ViewChanges(everything=False, keys=frozenset({keys.affinity(HOST, BLOCK)}))

    def one_pass():
        for part in parts:
            try:
                part.sync(view, full=False, changes=changes)
            except Exception:  # noqa: BLE001 - the policy and NAT parts have no real dataplane here
                pass

    with lock.shared():  # an ADD in flight
        t = threading.Thread(target=one_pass, daemon=True)
        t.start()
        assert routing.synced.wait(5), "routing waited for the ADD's host lock"
        t.join(5)
        assert not t.is_alive(), "the pass waited for the ADD's host lock"
    assert dataplane.blocks == [BLOCK] and not dataplane.reconciled.is_set()
