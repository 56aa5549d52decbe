"""Load a BPF object once per host into a bpffs directory, and attach its programs with netlink.

Layout under the caller's bpffs directory ``PIN``: ``PIN/progs/<function>`` and ``PIN/maps/<map>``.
Pins outlive the loading process, and a tc filter holds its program, so traffic keeps flowing while the
agent restarts.  Loading is one ``bpftool prog loadall`` per object at host set-up (libbpf does the ELF,
BTF and kfunc work); attaching is a netlink request per interface from this process, with the program's
fd taken from its pin, so there is no process per endpoint.

Namespaces: ``IPRoute(netns=...)`` opens its netlink socket inside the namespace (pyroute2 does the
setns in a short-lived child), while requests go out from this process, so a program fd of ours is valid
in them.  Never use ``ip netns exec`` or ``tc -n`` around pins: both remount /sys privately and hide them.
"""

import ctypes
import errno
import os
import subprocess
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netplugin.kernel.bpf import maps, records

BPF_FS_MAGIC = 0xCAFE4A11
INGRESS, EGRESS = "ffff:fff2", "ffff:fff3"
PRIO = 1  # our filter's priority on each hook: replacing it is how re-attach stays idempotent
HANDLE = 1


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
    """Where one loaded object's programs and maps are pinned."""

    def __init__(self, root):
        self.root = Path(root)
        self.progs = self.root / "progs"
        self.maps = self.root / "maps"

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


def load(obj, pin_root):
    """Load ``obj``'s programs and maps and pin them under ``pin_root`` (on bpffs); no-op if already there."""
    pins = Pins(pin_root)
    pins.root.mkdir(parents=True, exist_ok=True)
    if not is_bpffs(pins.root):
        raise LoadError(f"loading {obj}: {pins.root} is not on a bpf filesystem (mount -t bpf bpf DIR)")
    if pins.loaded():
        return pins
    for d in (pins.progs, pins.maps):
        d.mkdir(exist_ok=True)
    p = subprocess.run(
        ["bpftool", "prog", "loadall", str(obj), str(pins.progs), "type", "tc", "pinmaps", str(pins.maps)],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        # the verifier log is long; its last lines say what it refused
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
        for d in (pins.progs, pins.maps):
            for f in d.iterdir():
                f.unlink()
        raise LoadError(f"loading {obj} into {pins.root}: bpftool rc={p.returncode}\n{tail}")
    return pins


def _ifindex(ipr, dev):
    if isinstance(dev, int):
        return dev
    idx = ipr.link_lookup(ifname=dev)
    if not idx:
        raise LoadError(f"attaching BPF: interface {dev!r} not found")
    return idx[0]


def attach(prog_pin, dev, netns=None, hook=INGRESS):
    """Attach the pinned program to ``dev``'s clsact hook in direct-action mode (replacing ours if present)."""
    fd = maps.obj_get(prog_pin)
    name = os.path.basename(prog_pin)
    try:
        with IPRoute(netns=netns) as ipr:
            idx = _ifindex(ipr, dev)
            try:
                ipr.tc("add", "clsact", idx)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            ipr.tc(
                "replace-filter",
                "bpf",
                idx,
                handle=HANDLE,
                prio=PRIO,
                parent=hook,
                fd=fd,
                name=name,
                direct_action=True,
            )
    except NetlinkError as e:
        raise LoadError(f"attaching {name} to {dev} (netns {netns or 'own'}): {os.strerror(e.code)}") from e
    finally:
        os.close(fd)


def attached(dev, netns=None, hook=INGRESS):
    """Names of the BPF programs attached as tc filters on ``dev``'s hook (as the kernel reports them)."""
    with IPRoute(netns=netns) as ipr:
        idx = _ifindex(ipr, dev)
        try:
            filters = ipr.get_filters(idx, parent=hook)
        except NetlinkError as e:
            if e.code == errno.EINVAL:  # no clsact qdisc
                return []
            raise
        out = []
        for f in filters:
            opts = f.get_attr("TCA_OPTIONS")
            if f.get_attr("TCA_KIND") == "bpf" and opts is not None and opts.get_attr("TCA_BPF_NAME"):
                out.append(opts.get_attr("TCA_BPF_NAME"))
        return out


def detach(dev, netns=None):
    """Remove the clsact qdisc (and with it our filters) from ``dev``; absent is fine."""
    with IPRoute(netns=netns) as ipr:
        try:
            ipr.tc("del", "clsact", _ifindex(ipr, dev))
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise
