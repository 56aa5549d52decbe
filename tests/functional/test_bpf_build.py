"""The tc programs compile from the repository's C and the kernel's verifier accepts every variant."""

import pytest

from netplugin.kernel.bpf import build, loader, records

pytestmark = pytest.mark.functional

BROKEN = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
SEC("tc")
int from_container(struct __sk_buff *skb)
{
	unsigned char *data = (void *)(long)skb->data;
	return data[20]; /* no bounds check against data_end: the verifier must refuse it */
}
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.mark.parametrize("variant", sorted(build.VARIANTS))
def test_programs_compile_and_load(bpf_objects, bpffs, variant):
    pins = loader.load(bpf_objects[variant], bpffs / (variant or "default"))
    assert sorted(p.name for p in pins.progs.iterdir()) == ["from_container", "to_container"]
    for name in records.SIZES:
        with pins.map(name):  # checks the map's key and value sizes against records.py
            pass


def test_load_is_idempotent(bpf_objects, bpffs):
    first = loader.load(bpf_objects[""], bpffs)
    before = sorted(p.stat().st_ino for p in first.progs.iterdir())
    second = loader.load(bpf_objects[""], bpffs)
    assert sorted(p.stat().st_ino for p in second.progs.iterdir()) == before


def test_verifier_refusal_is_reported(tmp_path, bpffs):
    src = tmp_path / "broken.c"
    src.write_text(BROKEN)
    obj = build.compile_one(src, tmp_path / "out")
    with pytest.raises(loader.LoadError, match="invalid access to packet|bpftool rc="):
        loader.load(obj, bpffs)
    left = [p.name for p in bpffs.iterdir() if p.name.startswith((loader.GEN_PREFIX, loader.CURRENT))]
    assert left == []  # nothing half-loaded left behind, no generation made current


def test_compile_error_names_the_source(tmp_path):
    src = tmp_path / "bad.c"
    src.write_text("int x = ;\n")
    with pytest.raises(build.BuildError, match="compiling bad.c"):
        build.compile_one(src, tmp_path / "out")


def test_load_refuses_a_directory_off_bpffs(bpf_objects, tmp_path):
    with pytest.raises(loader.LoadError, match="not on a bpf filesystem"):
        loader.load(bpf_objects[""], tmp_path)
