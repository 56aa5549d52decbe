"""maps.py against real kernel maps made with BPF_MAP_CREATE (no object file needed), and records.py's layouts."""

import errno
import ipaddress

import pytest

from netplugin.kernel.bpf import maps, records


@pytest.fixture
def hmap():
    with maps.Map.create(maps.MAP_HASH, 4, 8, 64, name="t_hash") as m:
        yield m


def k(i):
    return i.to_bytes(4, "little")


def test_update_lookup_delete(hmap):
    assert hmap.lookup(k(1)) is None
    hmap.update(k(1), b"a" * 8)
    assert hmap.lookup(k(1)) == b"a" * 8
    hmap.update(k(1), b"b" * 8)
    assert hmap.lookup(k(1)) == b"b" * 8
    assert hmap.delete(k(1)) is True
    assert hmap.delete(k(1)) is False
    assert hmap.lookup(k(1)) is None


def test_update_flags_are_the_kernels(hmap):
    hmap.update(k(2), b"x" * 8, maps.BPF_NOEXIST)
    with pytest.raises(maps.BpfError) as e:
        hmap.update(k(2), b"y" * 8, maps.BPF_NOEXIST)
    assert e.value.errno == errno.EEXIST and "t_hash" in str(e.value)
    with pytest.raises(maps.BpfError) as e:
        hmap.update(k(3), b"y" * 8, maps.BPF_EXIST)
    assert e.value.errno == errno.ENOENT


def test_keys_and_items_walk_everything(hmap):
    for i in range(40):
        hmap.update(k(i), i.to_bytes(8, "little"))
    assert sorted(hmap.keys()) == sorted(k(i) for i in range(40))
    assert dict(hmap.items()) == {k(i): i.to_bytes(8, "little") for i in range(40)}


def test_wrong_sizes_are_refused_before_the_kernel(hmap):
    with pytest.raises(ValueError, match="key of 3 bytes"):
        hmap.lookup(b"abc")
    with pytest.raises(ValueError, match="value of 7 bytes"):
        hmap.update(k(1), b"x" * 7)


def test_percpu_values_one_per_cpu():
    with maps.Map.create(maps.MAP_PERCPU_HASH, 4, records.COUNTERS.size, 8, name="t_pcpu") as m:
        n = maps.possible_cpus()
        assert m.ncpus == n
        per_cpu = [records.COUNTERS.pack(i + 1, 0, 0, 0, 0) for i in range(n)]
        m.update(k(7), per_cpu)
        assert m.lookup(k(7)) == per_cpu
        assert records.counters(m.lookup(k(7)))["allowed"] == n * (n + 1) // 2


def test_lpm_policy_key_gives_the_longest_prefix():
    """The np_pol_peers layout: (endpoint, direction) matched in full, then the address by longest prefix."""
    with maps.Map.create(maps.MAP_LPM_TRIE, records.POL_KEY.size, 8, 1024, maps.BPF_F_NO_PREALLOC, name="t_lpm") as m:
        for net, bits in (("10.0.0.0/8", 1), ("10.1.0.0/16", 3), ("fd00::/16", 4)):
            m.update(records.pol_key(5, records.DIR_INGRESS, net), bits.to_bytes(8, "little"))

        def match(ep, direction, ip):
            v = m.lookup(records.pol_key(ep, direction, ipaddress.ip_network(ip)))
            return int.from_bytes(v, "little") if v else None

        assert match(5, records.DIR_INGRESS, "10.1.2.3") == 3
        assert match(5, records.DIR_INGRESS, "10.2.0.1") == 1
        assert match(5, records.DIR_INGRESS, "fd00::1") == 4
        assert match(5, records.DIR_INGRESS, "11.0.0.1") is None
        assert match(5, records.DIR_EGRESS, "10.1.2.3") is None  # another direction is another trie
        assert match(4, records.DIR_INGRESS, "10.1.2.3") is None
        # an IPv4 /0 is ::ffff:0:0/96, not all of IPv6
        m.update(records.pol_key(5, records.DIR_INGRESS, "0.0.0.0/0"), (8).to_bytes(8, "little"))
        assert match(5, records.DIR_INGRESS, "11.0.0.1") == 8
        assert match(5, records.DIR_INGRESS, "fe80::1") is None


def test_pin_and_reopen(bpffs):
    with maps.Map.create(maps.MAP_HASH, 4, 8, 4, name="t_pin") as m:
        m.update(k(9), b"z" * 8)
        m.pin(bpffs / "t_pin")
    with maps.Map.pinned(bpffs / "t_pin") as again:  # the creator's fd is closed: the pin kept the map
        assert (again.key_size, again.value_size, again.max_entries) == (4, 8, 4)
        assert again.lookup(k(9)) == b"z" * 8


def test_missing_pin_says_which(tmp_path):
    with pytest.raises(maps.BpfError, match="opening pinned BPF object .*nope"):
        maps.Map.pinned(tmp_path / "nope")


def test_records_layouts():
    assert records.ENDPOINT.size == 96 and records.LOCAL.size == 20 and records.RULE.size == 36
    ep = records.endpoint(3, ["10.0.0.1", "fd00::1", "10.0.0.2"])
    assert records.ENDPOINT.unpack(ep)[:3] == (3, 2, 1)
    assert records.addr16("10.0.0.1") == bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
    key = records.pol_key(3, records.DIR_INGRESS, "10.1.0.0/16")
    assert records.POL_KEY.unpack(key) == (32 + 96 + 16, (13).to_bytes(4, "big"), records.addr16("10.1.0.0"))
    # the second copy of a list (double-buffered) differs in the slot bit only
    key = records.pol_key(3, records.DIR_INGRESS, "10.1.0.0/16", slot=1)
    assert records.POL_KEY.unpack(key)[1] == (15).to_bytes(4, "big")
    assert records.split_ep_dir(records.pol_key_ep_dir(key)) == (3, 1, records.DIR_INGRESS)
    assert records.endpoint_slot(records.with_slot(ep, 1)) == 1 and records.endpoint_slot(ep) == 0
    assert records.with_slot(records.with_slot(ep, 1), 0) == ep
    with pytest.raises(ValueError, match="more than 4 addresses"):
        records.endpoint(1, [f"10.0.0.{i}" for i in range(5)])
    with pytest.raises(ValueError, match="more than 64 rules"):
        records.rules([records.rule(records.ACT_ALLOW)] * 65, records.ACT_DENY)
