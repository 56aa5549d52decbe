"""Loading a rebuilt object over a running one: a new pin generation beside the old, maps reused, copied or
left to be re-filled by what changed in their layout, every filter swapped in place, the old pins removed.
Runs in a namespace made here with a veth pair of its own."""

import subprocess

import pytest

from netplugin.kernel.bpf import build, loader, maps
from netplugin.lab.netns import NamespaceSet, nsexec

pytestmark = pytest.mark.functional

# Three maps: np_same keeps its layout, np_bigger grows (same key/value sizes), np_wider changes its value.
SOURCE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct wide { __u64 a, b; };
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 16); __type(key, __u32); __type(value, __u64); }
    np_same SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, BIGGER); __type(key, __u32); __type(value, __u64); }
    np_bigger SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 16); __type(key, __u32); __type(value, WIDER); }
    np_wider SEC(".maps");
SEC("tc")
int from_container(struct __sk_buff *skb)
{
	__u32 k = 0;
	bpf_map_lookup_elem(&np_same, &k);
	bpf_map_lookup_elem(&np_bigger, &k);
	bpf_map_lookup_elem(&np_wider, &k);
	return RESULT;
}
char LICENSE[] SEC("license") = "GPL";
"""


def compile_variant(tmp_path, name, bigger=16, wider="__u64", result=0):
    src = tmp_path / f"{name}.c"
    text = SOURCE.replace("BIGGER", str(bigger)).replace("WIDER", wider).replace("RESULT", str(result))
    src.write_text(text)
    return build.compile_one(src, tmp_path / name)


@pytest.fixture
def veth_ns():
    nss = NamespaceSet()
    try:
        ns = nss.add()
        nsexec(ns, "ip link add up0 type veth peer name up1")
        nsexec(ns, "ip link set up0 up")
        yield f"/run/netns/{ns}"
    finally:
        nss.close()


def map_id(pins, name):
    with maps.Map.pinned(pins.maps / name) as m:
        return m.id


def test_an_unchanged_object_is_left_running(bpf_objects, bpffs):
    first = loader.stage(bpf_objects[""], bpffs)
    ids = first.pins.prog_ids()
    again = loader.stage(bpf_objects[""], bpffs)
    assert not again.pending and again.pins.generation == first.pins.generation
    assert again.pins.prog_ids() == ids
    assert loader.current(bpffs) == loader.GEN_PREFIX + loader.digest(bpf_objects[""])


def test_a_changed_object_gets_a_new_generation_and_every_filter_swaps(tmp_path, bpffs, veth_ns):
    old_obj = compile_variant(tmp_path, "old")
    new_obj = compile_variant(tmp_path, "new", bigger=64, wider="struct wide", result=0)
    assert loader.digest(old_obj) != loader.digest(new_obj)
    old = loader.load(old_obj, bpffs)
    old_gen = loader.current(bpffs)
    loader.attach(old.prog("from_container"), "up0", netns=veth_ns)
    old_prog = old.prog_ids()["from_container"]
    assert list(loader.programs(veth_ns).values()) == [{"from_container": old_prog}]
    with old.map("np_same") as m:
        m.update(b"\1\0\0\0", b"same\0\0\0\0")
    with old.map("np_bigger") as m:
        m.update(b"\2\0\0\0", b"bigger\0\0")
    same_id = map_id(old, "np_same")

    st = loader.stage(new_obj, bpffs)
    assert st.pending and st.old.generation == old_gen
    assert (st.reused, st.copied, st.fresh) == (["np_same"], ["np_bigger"], ["np_wider"])
    # staged, not running: the filter and "current" still name the old generation
    assert loader.current(bpffs) == old_gen
    assert list(loader.programs(veth_ns).values()) == [{"from_container": old_prog}]
    assert map_id(st.pins, "np_same") == same_id  # the same map, not a copy
    with maps.Map.pinned(st.pins.maps / "np_bigger") as m:
        assert m.max_entries == 64 and m.lookup(b"\2\0\0\0") == b"bigger\0\0"
    with maps.Map.pinned(st.pins.maps / "np_wider") as m:
        assert m.value_size == 16 and m.keys() == []

    done = loader.commit(st, veth_ns)
    new_prog = st.pins.prog_ids()["from_container"]
    assert new_prog != old_prog and len(done["swapped"]) == 1
    assert list(loader.programs(veth_ns).values()) == [{"from_container": new_prog}]
    assert loader.current(bpffs) == st.pins.generation
    assert sorted(p.name for p in bpffs.iterdir() if p.name.startswith(loader.GEN_PREFIX)) == [st.pins.generation]
    assert map_id(loader.Pins(bpffs), "np_same") == same_id  # readers following "current" see the kept map


def test_pins_of_the_layout_before_generations_are_upgraded(tmp_path, bpffs, veth_ns):
    obj = compile_variant(tmp_path, "old")
    legacy = loader.Pins(bpffs, loader.LEGACY)
    for d in (legacy.progs, legacy.maps):
        d.mkdir()
    subprocess.run(
        ["bpftool", "prog", "loadall", str(obj), str(legacy.progs), "type", "tc", "pinmaps", str(legacy.maps)],
        check=True,
    )
    assert loader.current(bpffs) == loader.LEGACY
    loader.attach(legacy.prog("from_container"), "up0", netns=veth_ns)
    with legacy.map("np_same") as m:
        m.update(b"\1\0\0\0", b"kept\0\0\0\0")
    new = loader.load(compile_variant(tmp_path, "new", result=1), bpffs, netns=veth_ns)
    assert loader.current(bpffs).startswith(loader.GEN_PREFIX)
    assert not legacy.progs.exists() and not (bpffs / "maps").exists()
    with new.map("np_same") as m:
        assert m.lookup(b"\1\0\0\0") == b"kept\0\0\0\0"
    assert list(loader.programs(veth_ns).values()) == [new.prog_ids()]
