"""Compile the tc programs in ``progs/`` into BPF objects, outside the source tree.

The C sources are part of the package; objects never are.  ``vmlinux.h`` comes from the running kernel's
BTF (``bpftool btf dump``) at build time, so no kernel headers package is needed and the types always match
the kernel the programs load into.  Set-up runs ``python -m netplugin.kernel.bpf.build DIR``.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

PROGS = Path(__file__).with_name("progs")
KERNEL_BTF = "/sys/kernel/btf/vmlinux"

# Variants the lab measures beside the default (full policy in BPF); see progs/netplugin.c.
VARIANTS = {"": (), "noFlows": ("-DNP_NO_FLOWS",), "noPolicy": ("-DNP_NO_POLICY",), "ctGate": ("-DNP_CT_GATE",)}


class BuildError(RuntimeError):
    pass


def _run(args, what):
    try:
        p = subprocess.run(args, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise BuildError(f"{what}: {args[0]} not found (scripts/setup.sh installs clang and bpftool)") from e
    if p.returncode != 0:
        raise BuildError(f"{what}: {' '.join(map(str, args))} -> rc={p.returncode}\n{p.stderr.strip()}")
    return p.stdout


def vmlinux_h(out_dir):
    """Write ``out_dir/vmlinux.h`` from the kernel's BTF (atomically, so a concurrent build never sees half)."""
    out = Path(out_dir) / "vmlinux.h"
    if out.exists():
        return out
    if not os.path.exists(KERNEL_BTF):
        raise BuildError(f"generating vmlinux.h: {KERNEL_BTF} is missing (kernel built without CONFIG_DEBUG_INFO_BTF)")
    text = _run(["bpftool", "btf", "dump", "file", KERNEL_BTF, "format", "c"], "generating vmlinux.h")
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.rename(out)
    return out


def object_path(out_dir, source, variant=""):
    stem = Path(source).stem
    return Path(out_dir) / (f"{stem}-{variant}.o" if variant else f"{stem}.o")


def compile_one(source, out_dir, variant=""):
    """Compile one C source (with a variant's defines) into ``out_dir``; returns the object's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vmlinux_h(out_dir)
    obj = object_path(out_dir, source, variant)
    tmp = obj.with_suffix(f".tmp{os.getpid()}.o")
    _run(
        [
            "clang",
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-Wall",
            "-Werror",
            *VARIANTS[variant],
            "-I",
            str(out_dir),
            "-c",
            str(source),
            "-o",
            str(tmp),
        ],
        f"compiling {Path(source).name} {variant}".strip(),
    )
    tmp.rename(obj)
    return obj


def build(out_dir, variants=("",)):
    """Compile every ``progs/*.c`` in each variant; returns the objects' paths."""
    sources = sorted(PROGS.glob("*.c"))
    if not sources:
        raise BuildError(f"building BPF programs: no C sources under {PROGS}")
    return [compile_one(s, out_dir, v) for s in sources for v in variants]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="netplugin-bpf-build", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="where the objects go (not the source tree)")
    ap.add_argument("--all-variants", action="store_true", help="also the lab's measurement variants")
    a = ap.parse_args(argv)
    try:
        objs = build(a.out_dir, tuple(VARIANTS) if a.all_variants else ("",))
    except BuildError as e:
        print(f"netplugin-bpf-build: {e}", file=sys.stderr)
        return 1
    print("netplugin-bpf-build: " + " ".join(str(o) for o in objs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
