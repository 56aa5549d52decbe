"""Load a BPF object once per host into a bpffs directory, and attach its programs with netlink.

Layout under the caller's bpffs directory ``PIN``: one generation per build of the object,
``PIN/gen-<digest>/progs/<function>`` and ``PIN/gen-<digest>/maps/<map>`` (the digest is the object's
SHA-256: bpffs holds no plain files, so the directory's name is the metadata), and ``PIN/current``, a symlink
naming the generation that runs. Pins outlive the loading process, and a tc filter holds its program, so
traffic keeps flowing while the agent restarts; the same object again is a no-op. A rebuilt object is
``stage``d beside the running one (maps whose layout is unchanged are the old maps themselves) and
``commit``ted once the caller has re-filled the rest: every filter swapped with ``replace-filter``, then
``current`` flipped and the old generation unpinned. Loading is one ``bpftool prog loadall`` per object
(libbpf does the ELF, BTF and kfunc work); attaching is a netlink request per interface from this process,
with the program's fd taken from its pin, so there is no process per endpoint.

Namespaces: ``IPRoute(netns=...)`` opens its netlink socket inside the namespace (pyroute2 does the
setns in a short-lived child), while requests go out from this process, so a program fd of ours is valid
in them.  Never use ``ip netns exec`` or ``tc -n`` around pins: both remount /sys privately and hide them.
"""

import ctypes
import errno
import hashlib
import os
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netplugin.kernel.bpf import maps, records

BPF_FS_MAGIC = 0xCAFE4A11
INGRESS, EGRESS = "ffff:fff2", "ffff:fff3"
PRIO = 1  # our filter's priority on each hook: replacing it is how re-attach stays idempotent
HANDLE = 1
CURRENT = "current"  # a symlink on bpffs naming the generation that runs
GEN_PREFIX = "gen-"  # + the object's digest: the directory of one build's programs and maps
LEGACY = "."  # the generation of pins made before generations: progs/ and maps/ right under the root
TCA_BPF_ID = 11  # the attached program's id in a filter dump (pyroute2 0.9 does not decode it)


class LoadError(RuntimeError):
    pass


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]  # struct statfs, f_type first


def is_bpffs(path):
    """True when ``path`` is on a bpf filesystem (pins anywhere else fail with EPERM)."""
    st = _Statfs()
    if ctypes.CDLL(None, use_errno=True).statfs(os.fsencode(str(path)), ctypes.byref(st)) != 0:
        return False
    return st.f_type & 0xFFFFFFFF == BPF_FS_MAGIC


class Pins:
    """Where one loaded object's programs and maps are pinned: ``generation`` (a ``gen-<digest>`` directory
    under ``root``, or ``LEGACY`` for the layout before generations), or, with None, whatever ``root/current``
    points at when a path is asked for (so readers such as netctl follow an upgrade), else ``root`` itself."""

    def __init__(self, root, generation=None):
        self.root = Path(root)
        self.generation = generation

    @property
    def dir(self):
        if self.generation:
            return self.root / self.generation
        cur = self.root / CURRENT
        return cur if os.path.lexists(cur) else self.root

    @property
    def progs(self):
        return self.dir / "progs"

    @property
    def maps(self):
        return self.dir / "maps"

    def prog(self, name):
        return self.progs / name

    def map(self, name):
        """Open a pinned map (caller closes it), checking its layout against ``records``."""
        m = maps.Map.pinned(self.maps / name)
        want = records.SIZES.get(name)
        if want and (m.key_size, m.value_size) != want:
            m.close()
            raise LoadError(
                f"map {name} at {self.maps}: key/value sizes {m.key_size}/{m.value_size}, "
                f"records.py expects {want[0]}/{want[1]} (object and Python out of step)"
            )
        return m

    def loaded(self):
        return self.progs.is_dir() and any(self.progs.iterdir())

    def prog_ids(self) -> dict:
        """Program name -> the kernel's id of its pinned program."""
        out = {}
        for pin in sorted(self.progs.iterdir()) if self.progs.is_dir() else ():
            fd = maps.obj_get(pin)
            try:
                out[pin.name] = maps.prog_id(fd)
            finally:
                os.close(fd)
        return out


def digest(obj) -> str:
    """What identifies a build of the programs: the object file's SHA-256 (its first 16 hex digits)."""
    return hashlib.sha256(Path(obj).read_bytes()).hexdigest()[:16]


def current(root):
    """The generation ``root/current`` names, LEGACY for the layout before generations, None if nothing is
    loaded."""
    root = Path(root)
    if os.path.lexists(root / CURRENT):
        return os.readlink(root / CURRENT)
    return LEGACY if Pins(root, LEGACY).loaded() else None


def _object_maps(obj) -> dict:
    """Map name -> (type, key size, value size, max entries, flags) as the object declares them (libbpf
    opens the ELF without loading anything)."""
    lb = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lb.bpf_object__open_file.restype = ctypes.c_void_p
    lb.bpf_object__open_file.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lb.bpf_object__next_map.restype = ctypes.c_void_p
    lb.bpf_object__next_map.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lb.bpf_map__name.restype = ctypes.c_char_p
    lb.bpf_object__close.argtypes = [ctypes.c_void_p]
    getters = ("type", "key_size", "value_size", "max_entries", "map_flags")
    for g in ("name",) + getters:
        getattr(lb, f"bpf_map__{g}").argtypes = [ctypes.c_void_p]
    for g in getters:
        getattr(lb, f"bpf_map__{g}").restype = ctypes.c_uint32
    o = lb.bpf_object__open_file(os.fsencode(str(obj)), None)
    if not o:
        raise LoadError(f"reading the maps of {obj}: libbpf: {os.strerror(ctypes.get_errno())}")
    out, m = {}, None
    try:
        while m := lb.bpf_object__next_map(o, m):
            out[lb.bpf_map__name(m).decode()] = tuple(getattr(lb, f"bpf_map__{g}")(m) for g in getters)
    finally:
        lb.bpf_object__close(o)
    return out


def _pinned_layout(path):
    with maps.Map.pinned(path) as m:
        return m.type, m.key_size, m.value_size, m.max_entries, m.flags


def _copy(src, dst):
    """Every entry of the map pinned at ``src`` into the one at ``dst`` (same key and value sizes)."""
    with maps.Map.pinned(src) as a, maps.Map.pinned(dst) as b:
        for key, value in a.items():
            b.update(key, value)


def _remove(pins):
    """Unpin a generation's programs and maps (filters and programs hold what is still in use)."""
    for d in (pins.progs, pins.maps):
        if d.is_dir():
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    if pins.generation != LEGACY and pins.dir.is_dir():
        pins.dir.rmdir()


def _point_current(root, generation):
    """Flip ``root/current`` to ``generation`` in one rename (bpffs names may not contain dots)."""
    tmp = root / f"{CURRENT}-new"
    if os.path.lexists(tmp):
        tmp.unlink()
    os.symlink(generation, tmp)
    os.replace(tmp, root / CURRENT)


@dataclass
class Stage:
    """A loaded generation: ``pins`` (fixed to it), ``old`` (the generation it replaces, or None when it is
    already current), and how each of its maps was obtained (``reused``: the old map itself, ``copied``: the
    old map's entries, ``fresh``: empty, to be re-filled by the caller before ``commit``)."""

    pins: Pins
    old: Pins | None = None
    reused: list = field(default_factory=list)
    copied: list = field(default_factory=list)
    fresh: list = field(default_factory=list)

    @property
    def pending(self):
        return self.old is not None


def stage(obj, pin_root) -> Stage:
    """Load ``obj`` as a new generation beside the current one, or return the current one if it is ``obj``.

    Maps whose type, sizes, capacity and flags did not change are the old maps themselves (``bpftool ... map
    name N pinned OLD``); maps with the same key and value sizes but another capacity or flags get the old
    entries copied; any other map starts empty. Nothing attached changes: ``commit`` swaps the filters.
    """
    root = Path(pin_root)
    root.mkdir(parents=True, exist_ok=True)
    if not is_bpffs(root):
        raise LoadError(f"loading {obj}: {root} is not on a bpf filesystem (mount -t bpf bpf DIR)")
    gen = GEN_PREFIX + digest(obj)
    cur = current(root)
    old = Pins(root, cur) if cur is not None else None
    for d in root.iterdir():  # leftovers of an upgrade that died half-way (current is never among them)
        if d.name.startswith(GEN_PREFIX) and d.name != cur and d.is_dir():
            _remove(Pins(root, d.name))
    new = Pins(root, gen)
    if cur == gen:
        return Stage(new)
    out = Stage(new, old)
    args = []
    for name, layout in _object_maps(obj).items():
        was = old.maps / name if old else None
        if was is None or not os.path.lexists(was):
            out.fresh.append(name)
        elif _pinned_layout(was) == layout:
            out.reused.append(name)
            args += ["map", "name", name, "pinned", str(was)]
        elif _pinned_layout(was)[1:3] == layout[1:3]:
            out.copied.append(name)
        else:
            out.fresh.append(name)
    new.dir.mkdir()
    for d in (new.progs, new.maps):
        d.mkdir()
    p = subprocess.run(
        ["bpftool", "prog", "loadall", str(obj), str(new.progs), "type", "tc", *args, "pinmaps", str(new.maps)],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        _remove(new)
        lines = (p.stderr or p.stdout).strip().splitlines()
        tail = "\n".join(lines[-15:])  # the verifier log is long; its last lines say what it refused
        raise LoadError(f"loading {obj} into {new.dir}: {_verdict(lines)} (bpftool rc={p.returncode})\n{tail}")
    for name in out.copied:
        _copy(old.maps / name, new.maps / name)
    if old is None:
        _point_current(root, gen)  # a first load: nothing runs the programs yet
        out.old = None
    return out


def _verdict(lines) -> str:
    """The verifier's refusal in one line: the line before its "processed N insns" summary, else libbpf's
    last word on the load."""
    for i, line in enumerate(lines):
        if line.startswith("processed ") and " insns" in line and i > 0:
            return f"the verifier refused it: {lines[i - 1].strip()}"
    failed = [line.strip() for line in lines if "failed to load" in line]
    return failed[0] if failed else (lines[-1].strip() if lines else "no output")


def commit(st: Stage, netns=None) -> dict:
    """Make a staged generation the one that runs: replace every filter of ours in ``netns`` whose program
    is not the new one (``replace-filter``: the hook never goes without a program), point ``current`` at
    it, and unpin the old generation. The caller has re-filled ``st.fresh`` first."""
    if not st.pending:
        return {}
    began = time.monotonic()
    swapped = swap(st.pins, netns)
    _point_current(st.pins.root, st.pins.generation)
    _remove(st.old)
    replaced = "(before generations)" if st.old.generation == LEGACY else st.old.generation
    done = {"generation": st.pins.generation, "replaced": replaced}
    done["swapped"] = swapped
    done["ms"] = round((time.monotonic() - began) * 1000, 1)
    st.old = None
    return done


def load(obj, pin_root, netns=None):
    """Load ``obj`` and pin it under ``pin_root`` (on bpffs); a no-op if it is what runs already, else an
    upgrade with no re-fill (``stage`` + ``commit``). Returns Pins that follow ``current``."""
    commit(stage(obj, pin_root), netns)
    return Pins(pin_root)


def _ifindex(ipr, dev):
    if isinstance(dev, int):
        return dev
    idx = ipr.link_lookup(ifname=dev)
    if not idx:
        raise LoadError(f"attaching BPF: interface {dev!r} not found")
    return idx[0]


def _replace(ipr, idx, fd, name, hook):
    try:
        ipr.tc("add", "clsact", idx)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise
    ipr.tc("replace-filter", "bpf", idx, handle=HANDLE, prio=PRIO, parent=hook, fd=fd, name=name, direct_action=True)


def attach(prog_pin, dev, netns=None, hook=INGRESS):
    """Attach the pinned program to ``dev``'s clsact hook in direct-action mode (replacing ours if present)."""
    fd = maps.obj_get(prog_pin)
    name = os.path.basename(prog_pin)
    try:
        with IPRoute(netns=netns) as ipr:
            _replace(ipr, _ifindex(ipr, dev), fd, name, hook)
    except NetlinkError as e:
        raise LoadError(f"attaching {name} to {dev} (netns {netns or 'own'}): {os.strerror(e.code)}") from e
    finally:
        os.close(fd)


def _bpf_filters(ipr, idx, hook):
    """(name, program id) of each BPF filter on the hook; [] without a clsact qdisc."""
    try:
        filters = ipr.get_filters(idx, parent=hook)
    except NetlinkError as e:
        if e.code in (errno.EINVAL, errno.ENODEV):  # no clsact qdisc, or the link just went
            return []
        raise
    out = []
    for f in filters:
        opts = f.get_attr("TCA_OPTIONS")
        if f.get_attr("TCA_KIND") != "bpf" or opts is None or not opts.get_attr("TCA_BPF_NAME"):
            continue
        raw, prog = opts.data[opts.offset : opts.offset + opts.length], 0
        i = 4
        while i + 4 <= len(raw):
            length, kind = struct.unpack_from("<HH", raw, i)
            if kind & 0x3FFF == TCA_BPF_ID and length >= 8:
                prog = struct.unpack_from("<I", raw, i + 4)[0]
            i += max(4, (length + 3) & ~3)
        out.append((opts.get_attr("TCA_BPF_NAME"), prog))
    return out


def probe_tc(prog_pin, netns=None) -> str | None:
    """Why tc cannot run ``prog_pin`` here (no clsact qdisc, no cls_bpf in direct-action mode), or None: tried
    on a throwaway veth pair in ``netns`` (this kernel has no dummy links), deleted again whatever happens."""
    name = f"bpfprobe{os.getpid() & 0xFFFF:04x}"
    fd = maps.obj_get(prog_pin)
    step = f"creating the probe veth {name}"
    try:
        with IPRoute(netns=netns) as ipr:
            try:
                ipr.link("add", ifname=name, kind="veth", peer=f"{name}p")
                idx = _ifindex(ipr, name)
                step = "adding a clsact qdisc (CONFIG_NET_SCH_INGRESS)"
                ipr.tc("add", "clsact", idx)
                step = "attaching a cls_bpf filter in direct-action mode (CONFIG_NET_CLS_BPF)"
                ipr.tc(
                    "add-filter",
                    "bpf",
                    idx,
                    handle=HANDLE,
                    prio=PRIO,
                    parent=INGRESS,
                    fd=fd,
                    name=os.path.basename(prog_pin),
                    direct_action=True,
                )
            except NetlinkError as e:
                return f"tc refused {step}: {os.strerror(e.code)}"
            finally:
                for i in ipr.link_lookup(ifname=name):
                    ipr.link("del", index=i)
    finally:
        os.close(fd)
    return None


def discard(st: Stage):
    """Unpin a staged generation that will not run (the old one keeps running)."""
    if st.pending:
        _remove(st.pins)
        st.old = None


def attached(dev, netns=None, hook=INGRESS):
    """Names of the BPF programs attached as tc filters on ``dev``'s hook (as the kernel reports them)."""
    with IPRoute(netns=netns) as ipr:
        return [name for name, _ in _bpf_filters(ipr, _ifindex(ipr, dev), hook)]


def programs(netns=None, hook=INGRESS) -> dict:
    """ifindex -> {program name: program id} of the BPF filters on every link's hook: one socket, one dump
    per link."""
    with IPRoute(netns=netns) as ipr:
        out = {}
        for link in ipr.get_links():
            found = _bpf_filters(ipr, link["index"], hook)
            if found:
                out[link["index"]] = dict(found)
        return out


def swap(pins, netns=None, hook=INGRESS) -> list:
    """Replace, on every link in ``netns``, each filter of ours whose program is not ``pins``' program of
    that name; returns the ifindexes changed. ``replace-filter`` swaps the program in place."""
    ids = pins.prog_ids()
    fds = {name: maps.obj_get(pins.prog(name)) for name in ids}
    changed = []
    try:
        with IPRoute(netns=netns) as ipr:
            for link in ipr.get_links():
                idx = link["index"]
                for name, prog in _bpf_filters(ipr, idx, hook):
                    if name in ids and prog != ids[name]:
                        _replace(ipr, idx, fds[name], name, hook)
                        changed.append(idx)
    except NetlinkError as e:
        raise LoadError(f"swapping programs in netns {netns or 'own'}: {os.strerror(e.code)}") from e
    finally:
        for fd in fds.values():
            os.close(fd)
    return changed


def detach(dev, netns=None):
    """Remove the clsact qdisc (and with it our filters) from ``dev``; absent is fine."""
    with IPRoute(netns=netns) as ipr:
        try:
            ipr.tc("del", "clsact", _ifindex(ipr, dev))
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise
