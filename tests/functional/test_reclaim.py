"""Reclaiming what dead hosts held, against a real etcd with real lease expiry: only after the grace period, never
a live host's addresses (not even those borrowed inside the dead host's block), never a host that came back; the
ABA guard; and the leak report behind ``netctl ipam check``."""

import time

import pytest

from netplugin.datastore import keys
from netplugin.datastore.election import Election
from netplugin.datastore.models import Allocation, Block, Endpoint, Node
from netplugin.errors import Conflict
from netplugin.ipam import reclaim
from netplugin.ipam.allocator import IPAM
from netplugin.ipam.reclaim import Reclaimer
from netplugin.nodes import Liveness, NodeRegistry

pytestmark = pytest.mark.functional

TTL = 2
GRACE = 2.0
STEP = 0.25


@pytest.fixture
def ipam(etcd):
    allocator = IPAM(etcd)
    allocator.add_pool("10.10.0.0/24")
    allocator.add_pool("fd00:9::/112")
    return allocator


@pytest.fixture
def lives(etcd):
    """Liveness per host name, revoked at the end so no lease outlives the test."""
    made = {}

    def make(host):
        made[host] = Liveness(etcd, host, ttl=TTL)
        assert made[host].beat()
        return made[host]

    yield make
    for life in made.values():
        if life.lease:
            etcd.revoke_lease(life.lease)


def under(ds, *prefixes):
    return {k: v for k, v in ds.dump().items() if k.startswith(prefixes)}


def test_dead_host_is_reclaimed_after_grace_and_live_host_is_untouched(etcd, ipam, lives):
    live, _dead = lives("live"), lives("dead")  # the dead host beats until the test lets its lease lapse
    # The dead-to-be host: a block, a dual-stack handle, an endpoint record, and a leaked allocation (no handle).
    dead_addrs = [ipam.auto_assign(f"d{i}", "dead") for i in range(3)]
    ipam.auto_assign("d-v6", "dead", version=6)
    etcd.put(
        keys.endpoint("dead", "e1"),
        Endpoint(
            id="e1", host="dead", network="n", container_id="c", netns="/x", ifname="eth0", host_ifname="np0"
        ).to_dict(),
    )
    block_kv = etcd.get(keys.block("10.10.0.0/26"))
    block = Block.from_dict(block_kv.value)
    block.allocations["40"] = Allocation("ghost", "dead", block.next_seq)
    block.next_seq += 1
    etcd.put(keys.block("10.10.0.0/26"), block.to_dict())
    # The live host: its own block, and one address borrowed inside the dead host's block.
    for i in range(2):
        ipam.auto_assign(f"l{i}", "live")
    borrowed = ipam.assign_ip("l-borrowed", "live", "10.10.0.50")
    assert all(a.startswith("10.10.0.") for a in dead_addrs) and borrowed == "10.10.0.50"
    live_keys = (
        keys.affinity_prefix("live"),
        keys.handle("l0"),
        keys.handle("l1"),
        keys.handle("l-borrowed"),
        keys.block("10.10.0.64/26"),
    )
    live_before = under(etcd, *live_keys)
    assert len(live_before) == 5

    reclaimer = Reclaimer(etcd, IPAM(etcd), grace=GRACE)
    election = Election(etcd, "reclaimer", "live", live)
    # The dead host beats no more from here on: its lease lapses after TTL seconds.
    t_stop = time.monotonic()
    lapsed_at = reclaimed_at = None
    reports = []
    try:
        deadline = time.monotonic() + TTL + GRACE + 10
        while time.monotonic() < deadline and reclaimed_at is None:
            assert live.beat()
            if election.campaign():  # only the leader reclaims
                reports.append(reclaimer.run_once())
            if lapsed_at is None and etcd.get(keys.liveness("dead")) is None:
                lapsed_at = time.monotonic()
            if "dead" in reports[-1]["reclaimed"]:
                reclaimed_at = time.monotonic()
            time.sleep(STEP)
    finally:
        etcd.delete(election.key)  # the leadership rode on the live host's lease, which stays
    assert lapsed_at is not None and reclaimed_at is not None, reports[-3:]
    assert lapsed_at - t_stop >= TTL - 0.5  # the lease really ran its course
    assert reclaimed_at - lapsed_at >= GRACE - 2 * STEP, "reclaimed before the grace period was over"
    assert any("dead" in r["waiting"] for r in reports)
    assert reports[-1]["reclaimed"]["dead"] == 5  # 3 + IPv6 + the leaked one

    # Everything of the dead host is gone ...
    dump = etcd.dump()
    assert not any(k.startswith((keys.affinity_prefix("dead"), keys.endpoint_prefix("dead"), keys.DEAD)) for k in dump)
    assert not any(v.get("host") == "dead" for k, v in dump.items() if k.startswith(keys.HANDLES))
    assert keys.block("fd00:9::/122") not in dump  # its emptied block was deleted
    # ... except the block that still holds the live host's borrowed address: kept, with no owner.
    kept = Block.from_dict(dump[keys.block("10.10.0.0/26")])
    assert kept.affinity is None
    assert {kept.address(o): a.handle for o, a in kept.allocations.items()} == {borrowed: "l-borrowed"}
    # The live host's records are byte-for-byte what they were.
    assert under(etcd, *live_keys) == live_before
    assert reclaim.check(etcd) == []
    # The freed addresses are usable again.
    assert ipam.assign_ip("new", "live", dead_addrs[0]) == dead_addrs[0]


def test_host_back_before_grace_keeps_everything(etcd, ipam, lives):
    flaky = lives("flaky")
    addrs = [ipam.auto_assign(f"f{i}", "flaky") for i in range(2)]
    assert len(addrs) == 2
    held = under(etcd, keys.affinity_prefix("flaky"), keys.HANDLES, keys.BLOCKS)
    reclaimer = Reclaimer(etcd, IPAM(etcd), grace=GRACE)
    # flaky stops beating (a partition, a paused agent); its lease lapses after TTL seconds.
    deadline = time.monotonic() + TTL + 10
    while time.monotonic() < deadline:  # until the reclaimer's clock runs for flaky
        if "flaky" in reclaimer.run_once()["waiting"]:
            break
        time.sleep(STEP)
    assert etcd.get(keys.dead("flaky")) is not None
    assert flaky.beat()  # back, well within the grace period (on a new lease)
    report = reclaimer.run_once()
    assert report["revived"] == ["flaky"] and etcd.get(keys.dead("flaky")) is None
    end = time.monotonic() + GRACE + 1
    while time.monotonic() < end:  # longer than the grace period: still nothing reclaimed
        assert flaky.beat()
        assert reclaimer.run_once()["reclaimed"] == {}
        time.sleep(STEP)
    assert under(etcd, keys.affinity_prefix("flaky"), keys.HANDLES, keys.BLOCKS) == held


def test_release_is_guarded_by_absent_liveness(etcd, ipam, lives):
    """The host comes back between the reclaimer's check and its write: the guarded transactions refuse."""
    lives("racer")
    ipam.auto_assign("r0", "racer")
    before = etcd.dump()
    reclaimer = Reclaimer(etcd, IPAM(etcd), grace=0)
    with pytest.raises(Conflict, match="guard"):
        reclaimer.reclaim_host("racer", [ipam.get_handle("r0")[0]])
    with pytest.raises(Conflict, match="came back"):
        reclaimer.reclaim_host("racer", [])
    assert etcd.dump() == before


def test_hosts_that_hold_nothing_are_never_marked(etcd, ipam, lives):
    NodeRegistry(etcd).register(Node(name="idle"))  # registered, but holds no address
    reclaimer = Reclaimer(etcd, IPAM(etcd), grace=0)
    assert reclaimer.run_once() == {"waiting": {}, "reclaimed": {}, "revived": []}
    etcd.put(keys.dead("gone"), {"host": "gone", "since": 0})  # a stale marker of a host with nothing left
    reclaimer.run_once()
    assert etcd.get(keys.dead("gone")) is None


def test_aba_guard_refuses_a_stale_release(etcd, ipam):
    addr = ipam.assign_ip("c1", "h1", "10.10.0.9")
    first_seq = ipam.get_handle("c1")[0].addresses[addr]["seq"]
    ipam.release_handle("c1")
    assert ipam.assign_ip("c2", "h1", addr) == addr  # the address is reused by someone else
    second_seq = ipam.get_handle("c2")[0].addresses[addr]["seq"]
    assert second_seq > first_seq
    before = etcd.dump()
    with pytest.raises(Conflict, match="re-allocated"):
        ipam.release_address(addr, seq=first_seq)  # e.g. a slow collector acting on what it saw earlier
    assert etcd.dump() == before
    assert ipam.release_address(addr, seq=second_seq) == "c2"
    assert etcd.get(keys.handle("c2")) is None


def test_check_reports_each_kind_of_leak(etcd, ipam, lives):
    lives("h1")
    assert reclaim.check(etcd) == []
    ipam.auto_assign("ok", "h1")
    assert reclaim.check(etcd) == []
    ipam.auto_assign("z0", "zombie")  # a host with no liveness at all
    # An allocation whose handle has no record of it, and a handle claiming an address nobody allocated.
    kv = etcd.get(keys.block("10.10.0.0/26"))
    block = Block.from_dict(kv.value)
    block.allocations["30"] = Allocation("orphan", "h1", block.next_seq)
    block.next_seq += 1
    etcd.put(keys.block("10.10.0.0/26"), block.to_dict())
    handle, _ = ipam.get_handle("ok")
    handle.addresses["10.10.0.31"] = {"block": "10.10.0.0/26", "seq": 99}
    etcd.put(keys.handle("ok"), handle.to_dict())
    found = {(f["kind"], f.get("address") or f.get("block")) for f in reclaim.check(etcd)}
    assert found == {
        ("block-of-dead-host", "10.10.0.64/26"),
        ("owner-not-alive", "10.10.0.64"),
        ("orphan-allocation", "10.10.0.30"),
        ("dangling-handle", "10.10.0.31"),
    }
    assert all("\n" not in f["detail"] for f in reclaim.check(etcd))
