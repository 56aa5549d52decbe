"""IPAM against a real etcd: concurrent allocators on many hosts never hand out one address twice; IPv6, ranges,
static addresses, idempotent assignment and release; every error leaves the datastore as it was."""

import multiprocessing
import time

import netaddr
import pytest

from netplugin.config import EtcdConfig
from netplugin.datastore import keys
from netplugin.datastore.client import Datastore
from netplugin.datastore.models import Block, Handle, Pool
from netplugin.errors import AddressInUse, AddressNotInPool, AlreadyExists, InUse, InvalidInput, NotFound, PoolExhausted
from netplugin.ipam import reclaim
from netplugin.ipam.allocator import IPAM, AssignRequest
from netplugin.nodes import Liveness

pytestmark = pytest.mark.functional


@pytest.fixture
def ipam(etcd):
    return IPAM(etcd)


def blocks_in(ds):
    return {kv.value["cidr"]: Block.from_dict(kv.value) for kv in ds.list(keys.BLOCKS)}


def handles_in(ds):
    return {kv.value["handle"]: Handle.from_dict(kv.value) for kv in ds.list(keys.HANDLES)}


def affinities_in(ds):
    """{(host, block cidr)} of every affinity key."""
    out = set()
    for kv in ds.list(keys.AFFINITY):
        host, segment = kv.key[len(keys.AFFINITY) :].split("/")
        out.add((host, keys.segment_cidr(segment)))
    return out


def assert_consistent(ds):
    """Blocks, handles and affinities agree with each other: the invariants every operation must keep."""
    blocks, handles, affinities = blocks_in(ds), handles_in(ds), affinities_in(ds)
    held = set()
    for block in blocks.values():
        assert block.next_seq > max([a.seq for a in block.allocations.values()] or [0])
        for ordinal, alloc in block.allocations.items():
            addr = block.address(ordinal)
            assert addr in handles[alloc.handle].addresses, f"{addr} has no handle record"
            assert handles[alloc.handle].addresses[addr] == {"block": block.cidr, "seq": alloc.seq}
            held.add(addr)
    assert held == {a for h in handles.values() for a in h.addresses}
    assert affinities == {(b.affinity, b.cidr) for b in blocks.values() if b.affinity}
    return blocks, handles


# --- many hosts, many processes ----------------------------------------------------------------------------------


def _allocate(endpoint, host, proc, count, out):
    """One allocator process: its own Datastore and IPAM, ``count`` automatic assignments for ``host``."""
    try:
        allocator = IPAM(Datastore(EtcdConfig(endpoints=[endpoint])))
        got = [(f"{host}.p{proc}.{i}", allocator.auto_assign(f"{host}.p{proc}.{i}", host)) for i in range(count)]
        out.put((proc, got, allocator.stats))
    except BaseException as e:  # report, never hang the parent
        out.put((proc, f"{type(e).__name__}: {e}", None))


def _release(endpoint, handles, proc, out):
    try:
        allocator = IPAM(Datastore(EtcdConfig(endpoints=[endpoint])))
        released = [a for h in handles for a in allocator.release_handle(h)]
        out.put((proc, released, allocator.stats))
    except BaseException as e:
        out.put((proc, f"{type(e).__name__}: {e}", None))


def _run_processes(target, args_list, timeout):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=args + (out,), daemon=True) for args in args_list]
    try:
        for p in procs:
            p.start()
        results = {}
        deadline = time.monotonic() + timeout
        while len(results) < len(procs):
            proc, value, stats = out.get(timeout=max(0.1, deadline - time.monotonic()))
            assert stats is not None, f"process {proc} failed: {value}"
            results[proc] = (value, stats)
        return results
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()


def test_eight_processes_four_hosts_4000_distinct_addresses(etcd, etcd_server, ipam):
    """8 processes x 500 allocations for 4 hosts from one pool of 4096 addresses: the pool is nearly full, so
    late allocators borrow under contention. No address twice, every block affine to exactly one host, and
    releasing every handle leaves the pool empty with a clean ``ipam check``."""
    hosts = [f"host{i}" for i in range(4)]
    lives = [Liveness(etcd, h, ttl=60) for h in hosts]
    for life in lives:
        assert life.beat()
    try:
        ipam.add_pool("10.64.0.0/20")  # 64 blocks of /26
        per_proc = 500
        args = [(etcd_server.endpoint, hosts[p % 4], p, per_proc) for p in range(8)]
        t0 = time.monotonic()
        results = _run_processes(_allocate, args, timeout=60)
        elapsed = time.monotonic() - t0

        pairs = [pair for got, _ in results.values() for pair in got]
        addresses = [a for _, a in pairs]
        assert len(pairs) == 4000
        assert len(set(addresses)) == 4000, "an address was handed out twice"
        assert all(netaddr.IPAddress(a) in netaddr.IPNetwork("10.64.0.0/20") for a in addresses)

        blocks, handles = assert_consistent(etcd)
        assert len(handles) == 4000
        recorded = {
            block.address(o): (a.handle, a.host) for block in blocks.values() for o, a in block.allocations.items()
        }
        assert recorded == {a: (h, h.split(".")[0]) for h, a in pairs}
        # Each block is affine to exactly one host: its record names it, exactly one affinity key matches it.
        affinities = affinities_in(etcd)
        assert len(affinities) == len({cidr for _, cidr in affinities}) == len(blocks)
        assert all(b.affinity in hosts for b in blocks.values())
        assert {h for h, _ in affinities} == set(hosts)
        # One more address is one too many: the pool is reported exhausted only now that it is.
        for _ in range(96):
            ipam.auto_assign(f"extra-{_}", "host0")
        before = etcd.dump()
        with pytest.raises(PoolExhausted):
            ipam.auto_assign("one-too-many", "host0")
        assert etcd.dump() == before
        for i in range(96):
            ipam.release_handle(f"extra-{i}")

        by_proc = {p: [h for h, _ in got] for p, (got, _) in results.items()}
        released = _run_processes(_release, [(etcd_server.endpoint, by_proc[p], p) for p in range(8)], timeout=60)
        assert sorted(a for got, _ in released.values() for a in got) == sorted(addresses)
        assert handles_in(etcd) == {}
        assert all(not b.allocations for b in blocks_in(etcd).values())
        assert reclaim.check(etcd) == []
        stats = [s for _, s in results.values()]
        print(
            f"4000 allocations by 8 processes in {elapsed:.1f}s; "
            f"CAS conflicts {sum(s['cas_conflicts'] for s in stats)}, claims {sum(s['claims'] for s in stats)}"
        )
    finally:
        for life in lives:
            etcd.revoke_lease(life.lease)


# --- pools -------------------------------------------------------------------------------------------------------


def test_add_pool_defaults_and_listing(ipam):
    p4 = ipam.add_pool("10.10.0.0/16")
    p6 = ipam.add_pool("fd10::/112")
    small = ipam.add_pool("10.20.0.0/28")
    assert (p4.block_size, p6.block_size, small.block_size) == (26, 122, 28)
    assert {p.cidr for p in ipam.list_pools()} == {"10.10.0.0/16", "fd10::/112", "10.20.0.0/28"}
    assert Pool("fd10::/112", 122) in ipam.list_pools()


@pytest.mark.parametrize(
    "cidr,kwargs,error",
    [
        ("10.10.5.0/24", {}, InvalidInput),  # inside the existing pool
        ("10.0.0.0/8", {}, InvalidInput),  # around it
        ("10.10.0.0/16", {}, AlreadyExists),
        ("10.11.0.0/33", {}, InvalidInput),
        ("bogus", {}, InvalidInput),
        ("10.11.0.1/16", {}, InvalidInput),  # host bits
        ("10.11.0.0/16", {"block_size": 12}, InvalidInput),
    ],
)
def test_add_pool_errors_change_nothing(etcd, ipam, cidr, kwargs, error):
    ipam.add_pool("10.10.0.0/16")
    before = etcd.dump()
    with pytest.raises(error):
        ipam.add_pool(cidr, **kwargs)
    assert etcd.dump() == before


def test_remove_pool(etcd, ipam):
    ipam.add_pool("10.10.0.0/24")
    ipam.add_pool("10.30.0.0/24")
    addr = ipam.auto_assign("c1", "h1", pools=["10.10.0.0/24"])
    ipam.auto_assign("c2", "h1", pools=["10.30.0.0/24"])
    before = etcd.dump()
    with pytest.raises(InUse):
        ipam.remove_pool("10.10.0.0/24")
    assert etcd.dump() == before
    with pytest.raises(NotFound):
        ipam.remove_pool("10.99.0.0/24")
    with pytest.raises(InvalidInput):
        ipam.remove_pool("nonsense")
    assert etcd.dump() == before

    ipam.release_handle("c1")
    ipam.remove_pool("10.10.0.0/24")
    assert [p.cidr for p in ipam.list_pools()] == ["10.30.0.0/24"]
    assert [b.pool for b in blocks_in(etcd).values()] == ["10.30.0.0/24"]  # its blocks and affinities went too
    assert_consistent(etcd)
    with pytest.raises(AddressNotInPool):
        ipam.assign_ip("c3", "h1", addr)


def test_no_new_block_in_a_pool_removed_or_disabled_behind_the_cache(etcd, ipam):
    """An allocator that listed the pools earlier must not claim blocks in a pool removed or disabled since."""
    ipam.add_pool("10.10.0.0/24")
    ipam.add_pool("10.20.0.0/24")
    ipam.add_pool("10.30.0.0/24")
    ipam.auto_assign("c0", "h1", pools=["10.10.0.0/24"])  # pools now cached
    other = IPAM(etcd)
    other.remove_pool("10.20.0.0/24")
    disabled = Pool("10.30.0.0/24", 26, disabled=True)
    etcd.put(keys.pool("10.30.0.0/24"), disabled.to_dict())
    before = etcd.dump()
    for gone in ("10.20.0.0/24", "10.30.0.0/24"):
        with pytest.raises(PoolExhausted, match=f"no enabled IPv4 pool matching {gone}"):
            ipam.auto_assign("c1", "h1", pools=[gone])
        with pytest.raises(AddressNotInPool):
            ipam.assign_ip("c1", "h1", gone.replace("0/24", "9"))
    assert etcd.dump() == before
    assert_consistent(etcd)


# --- automatic assignment ------------------------------------------------------------------------------------------


def test_host_fills_its_own_block_then_claims_the_next(etcd, ipam):
    ipam.add_pool("10.10.0.0/24")
    got = [ipam.auto_assign(f"c{i}", "h1") for i in range(65)]
    assert got[:64] == [f"10.10.0.{i}" for i in range(64)]
    assert got[64] == "10.10.0.64"
    other = ipam.auto_assign("d0", "h2")
    assert other == "10.10.0.128"  # another host claims a block of its own
    blocks, _ = assert_consistent(etcd)
    assert {c: b.affinity for c, b in blocks.items()} == {
        "10.10.0.0/26": "h1",
        "10.10.0.64/26": "h1",
        "10.10.0.128/26": "h2",
    }


def test_borrows_before_reporting_exhaustion(etcd, ipam):
    ipam.add_pool("10.10.0.0/29", block_size=30)  # two blocks of four
    mine = [ipam.auto_assign(f"a{i}", "h1") for i in range(6)]  # h1 claims both blocks
    assert len(set(mine)) == 6
    borrowed = [ipam.auto_assign("b0", "h2"), ipam.auto_assign("b1", "h2")]
    assert set(borrowed) == {"10.10.0.6", "10.10.0.7"}
    blocks, _ = assert_consistent(etcd)
    assert all(b.affinity == "h1" for b in blocks.values())  # borrowing never moves a block
    before = etcd.dump()
    with pytest.raises(PoolExhausted, match="10.10.0.0/29"):
        ipam.auto_assign("b2", "h2")
    assert etcd.dump() == before


def test_ipv6_uses_122_blocks(etcd, ipam):
    ipam.add_pool("fd00:1::/112")
    got = [ipam.auto_assign(f"c{i}", "h1", version=6) for i in range(70)]
    assert len(set(got)) == 70
    assert got[0] == "fd00:1::" and got[64] == "fd00:1::40"
    blocks, handles = assert_consistent(etcd)
    assert sorted(blocks) == ["fd00:1::/122", "fd00:1::40/122"]
    assert all(b.size == 64 and b.affinity == "h1" for b in blocks.values())
    assert ipam.assign_ip("s1", "h2", "fd00:1::ff00") == "fd00:1::ff00"
    assert ipam.release_handle("c0") == ["fd00:1::"]
    assert ipam.auto_assign("again", "h1", version=6) == "fd00:1::"
    assert_consistent(etcd)


def test_no_pool_of_the_family(etcd, ipam):
    ipam.add_pool("10.10.0.0/24")
    before = etcd.dump()
    with pytest.raises(PoolExhausted, match="IPv6"):
        ipam.auto_assign("c1", "h1", version=6)
    with pytest.raises(PoolExhausted, match="10.99.0.0/24"):
        ipam.auto_assign("c1", "h1", pools=["10.99.0.0/24"])
    assert etcd.dump() == before


def test_within_restricts_to_a_range(etcd, ipam):
    ipam.add_pool("10.10.0.0/16")
    ipam.auto_assign("first", "h1")  # h1 already owns 10.10.0.0/26, outside the range
    got = [ipam.auto_assign(f"c{i}", "h1", within="10.10.7.128/29") for i in range(8)]
    assert sorted(got, key=netaddr.IPAddress) == [f"10.10.7.{i}" for i in range(128, 136)]
    before = etcd.dump()
    with pytest.raises(PoolExhausted, match="within 10.10.7.128/29"):
        ipam.auto_assign("c8", "h1", within="10.10.7.128/29")
    assert etcd.dump() == before
    # A range spanning several blocks, IPv6 alike.
    ipam.add_pool("fd00:2::/112")
    six = [ipam.auto_assign(f"v6-{i}", "h2", version=6, within="fd00:2::1000/120") for i in range(70)]
    assert all(netaddr.IPAddress(a) in netaddr.IPNetwork("fd00:2::1000/120") for a in six)
    assert len(set(six)) == 70
    assert_consistent(etcd)


def test_assign_is_idempotent_per_handle(etcd, ipam):
    ipam.add_pool("10.10.0.0/24")
    ipam.add_pool("fd00:3::/112")
    a = ipam.auto_assign("c1.eth0", "h1", attrs={"container": "c1"})
    rev = etcd.revision()
    assert ipam.auto_assign("c1.eth0", "h1") == a
    assert IPAM(etcd).auto_assign("c1.eth0", "h1") == a  # another process (cold cache) agrees
    assert etcd.revision() == rev  # nothing written
    # Asking for more than the handle holds adds only what is missing.
    both = ipam.assign("c1.eth0", "h1", [AssignRequest(4), AssignRequest(6)])
    assert both[0] == a and netaddr.IPAddress(both[1]).version == 6
    assert ipam.assign("c1.eth0", "h1", [AssignRequest(4), AssignRequest(6)]) == both
    handle, _ = ipam.get_handle("c1.eth0")
    assert sorted(handle.addresses) == sorted(both) and handle.attrs == {"container": "c1"}
    assert_consistent(etcd)


def test_dual_stack_in_one_call(etcd, ipam):
    ipam.add_pool("10.10.0.0/24")
    ipam.add_pool("fd00:4::/112")
    rev = etcd.revision()
    v4, v6 = ipam.assign("c1", "h1", [AssignRequest(4), AssignRequest(6)])
    assert netaddr.IPAddress(v4).version == 4 and netaddr.IPAddress(v6).version == 6
    assert etcd.revision() == rev + 1  # one transaction: both blocks, both affinities, the handle
    _, handles = assert_consistent(etcd)
    assert set(handles["c1"].addresses) == {v4, v6}
    assert sorted(ipam.release_handle("c1")) == sorted([v4, v6])
    assert handles_in(etcd) == {}


def test_two_addresses_of_one_family_for_one_handle(etcd, ipam):
    ipam.add_pool("10.10.0.0/24")
    a, b = ipam.assign("c1", "h1", [AssignRequest(4), AssignRequest(4)])
    assert (a, b) == ("10.10.0.0", "10.10.0.1")
    assert list(blocks_in(etcd)) == ["10.10.0.0/26"]  # one block claimed, not one per address
    assert ipam.assign("c1", "h1", [AssignRequest(4), AssignRequest(4)]) == [a, b]
    # Three addresses claiming two blocks of one pool in one transaction.
    ipam.add_pool("10.20.0.0/29", block_size=31)
    got = ipam.assign("c2", "h1", [AssignRequest(4, pools=("10.20.0.0/29",))] * 3)
    assert got == ["10.20.0.0", "10.20.0.1", "10.20.0.2"]
    assert_consistent(etcd)


def test_all_or_nothing_when_one_request_fails(etcd, ipam):
    ipam.add_pool("10.10.0.0/24")
    before = etcd.dump()
    with pytest.raises(PoolExhausted):
        ipam.assign("c1", "h1", [AssignRequest(4), AssignRequest(6)])  # no IPv6 pool
    assert etcd.dump() == before


def test_failed_assignment_does_not_poison_the_cache(etcd, ipam):
    """A request that borrows from another host's block, followed by one that fails, must leave no trace in the
    allocator's cache: later writes of that block carry only real allocations."""
    ipam.add_pool("10.10.0.0/30", block_size=31)  # two blocks of two
    for i in range(3):
        ipam.auto_assign(f"a{i}", "h1")  # h1 owns both blocks, one address left
    before = etcd.dump()
    with pytest.raises(PoolExhausted):
        ipam.assign("c1", "h2", [AssignRequest(4), AssignRequest(6)])  # borrows 10.10.0.3, then finds no IPv6
    assert etcd.dump() == before
    ipam.release_handle("a2")  # rewrites 10.10.0.2/31 from the cache
    assert_consistent(etcd)
    assert reclaim.check(etcd) == [] or all(f["kind"] != "orphan-allocation" for f in reclaim.check(etcd))
    assert {ipam.auto_assign("c2", "h2"), ipam.auto_assign("c3", "h2")} == {"10.10.0.2", "10.10.0.3"}


def test_in_use_is_checked_against_etcd_not_a_stale_cache(etcd, ipam):
    ipam.add_pool("10.10.0.0/24")
    ipam.assign_ip("c1", "h1", "10.10.0.7")  # ipam's cache now says .7 is taken
    IPAM(etcd).release_handle("c1")  # ... but another process released it
    assert ipam.assign_ip("c2", "h1", "10.10.0.7") == "10.10.0.7"
    assert_consistent(etcd)


# --- static addresses ----------------------------------------------------------------------------------------------


def test_static_address(etcd, ipam):
    ipam.add_pool("10.10.0.0/24")
    ipam.auto_assign("c0", "h1")  # h1 owns 10.10.0.0/26
    assert ipam.assign_ip("s1", "h2", "10.10.0.50") == "10.10.0.50"  # inside h1's block: borrowed
    assert ipam.assign_ip("s2", "h2", "10.10.0.200/24") == "10.10.0.200"  # claims the block that holds it
    assert ipam.assign_ip("s2", "h2", "10.10.0.200") == "10.10.0.200"  # idempotent
    blocks, _ = assert_consistent(etcd)
    assert blocks["10.10.0.0/26"].affinity == "h1"
    assert blocks["10.10.0.192/26"].affinity == "h2"
    # h1 keeps allocating around the borrowed address.
    got = {ipam.auto_assign(f"c{i}", "h1") for i in range(1, 63)}
    assert "10.10.0.50" not in got and len(got) == 62


@pytest.mark.parametrize(
    "address,error",
    [
        ("10.10.0.5", AddressInUse),
        ("10.99.0.5", AddressNotInPool),
        ("fd00::1", AddressNotInPool),
        ("999.1.1.1", InvalidInput),
        ("bogus", InvalidInput),
    ],
)
def test_static_errors_change_nothing(etcd, ipam, address, error):
    ipam.add_pool("10.10.0.0/24")
    ipam.assign_ip("taken", "h1", "10.10.0.5")
    before = etcd.dump()
    with pytest.raises(error) as err:
        ipam.assign_ip("c1", "h2", address)
    assert "\n" not in str(err.value)
    assert etcd.dump() == before


def test_static_from_a_named_pool_only(etcd, ipam):
    ipam.add_pool("10.10.0.0/24")
    ipam.add_pool("10.20.0.0/24")
    with pytest.raises(AddressNotInPool, match="among 10.20.0.0/24"):
        ipam.assign_ip("c1", "h1", "10.10.0.9", pools=["10.20.0.0/24"])
    assert ipam.assign_ip("c1", "h1", "10.20.0.9", pools=["10.20.0.0/24"]) == "10.20.0.9"


# --- release -----------------------------------------------------------------------------------------------------


def test_release_handle_is_idempotent(etcd, ipam):
    ipam.add_pool("10.10.0.0/24")
    a = ipam.auto_assign("c1", "h1")
    assert ipam.release_handle("c1") == [a]
    after = etcd.dump()
    assert ipam.release_handle("c1") == []
    assert IPAM(etcd).release_handle("c1") == []
    assert ipam.release_handle("never-existed") == []
    assert etcd.dump() == after
    assert ipam.auto_assign("c2", "h1") == a  # the address is free again


def test_release_from_another_process_with_a_stale_cache(etcd, ipam):
    ipam.add_pool("10.10.0.0/24")
    other = IPAM(etcd)
    a = ipam.auto_assign("c1", "h1")
    b = other.auto_assign("c2", "h1")  # changes the block behind ipam's cache
    assert ipam.release_handle("c1") == [a]
    blocks, _ = assert_consistent(etcd)
    assert [blocks["10.10.0.0/26"].address(o) for o in blocks["10.10.0.0/26"].allocations] == [b]


def test_release_address(etcd, ipam):
    ipam.add_pool("10.10.0.0/24")
    ipam.add_pool("fd00:6::/112")
    v4, v6 = ipam.assign("c1", "h1", [AssignRequest(4), AssignRequest(6)])
    assert ipam.release_address(v4) == "c1"
    _, handles = assert_consistent(etcd)
    assert list(handles["c1"].addresses) == [v6]  # the handle keeps its other address
    assert ipam.release_address(v6) == "c1"
    assert handles_in(etcd) == {}
    before = etcd.dump()
    for address, error in ((v4, NotFound), ("10.99.0.1", AddressNotInPool), ("nope", InvalidInput)):
        with pytest.raises(error):
            ipam.release_address(address)
    assert etcd.dump() == before


def test_usage_report(etcd, ipam):
    ipam.add_pool("10.10.0.0/24")
    ipam.add_pool("fd00:7::/112")
    for i in range(3):
        ipam.auto_assign(f"c{i}", "h1")
    ipam.auto_assign("v6", "h2", version=6)
    assert ipam.usage() == [
        {"block": "10.10.0.0/26", "pool": "10.10.0.0/24", "host": "h1", "used": 3, "free": 61},
        {"block": "fd00:7::/122", "pool": "fd00:7::/112", "host": "h2", "used": 1, "free": 63},
    ]
