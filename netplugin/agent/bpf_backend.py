"""The eBPF dataplane backend: today's veth builder for the wiring, tc programs for anti-spoofing and redirects.

It implements netplugin.dataplane.backend.Backend. The programs (netplugin/kernel/bpf) are loaded and pinned
once per host under ``bpffs``; each endpoint's host veth gets ``from_container`` on its ingress and entries in
``np_endpoints`` (the addresses it may send from) and ``np_locals`` (where redirect_peer delivers to it); the
fabric interfaces get ``to_container``. Map entries are written with the bpf() syscall from this process, and
filters attached by netlink with the pinned program's fd: no process per endpoint. Pins and filters outlive
the agent, so traffic keeps flowing while it restarts; every reconcile recomputes the wanted map contents from
the desired endpoints, diffs them against the maps and re-attaches missing filters (level-triggered).

Policy and NAT-outgoing: still written by the iptables writers. The programs write no policy lists yet
(``np_pol_*`` stay empty), and a packet of an endpoint without lists goes to the stack after anti-spoofing,
where the filter table enforces the compiled policy exactly as with the iptables backend.
"""

import logging
import os
import shutil
from pathlib import Path

from netplugin.agent.backend import IptablesBackend, iptables_backend
from netplugin.dataplane.docker_link import CONTAINER_END_PREFIX
from netplugin.dataplane.model import host_ifname, is_host_ifname
from netplugin.errors import NetpluginError
from netplugin.kernel.bpf import build, loader, records
from netplugin.kernel.netlink import netlink

LOG = logging.getLogger(__name__)
OBJECT = "netplugin.o"
FROM_CONTAINER, TO_CONTAINER = "from_container", "to_container"


def default_object_dir():
    """Where scripts/setup.sh builds the objects: build/bpf beside the package's source tree."""
    return str(Path(build.__file__).resolve().parents[3] / "build" / "bpf")


class BpfBackend(IptablesBackend):
    """The iptables backend's writers for wiring, policy and NAT, plus the programs and their maps."""

    background_link_deletion = False  # remove_endpoint prunes the maps of veths that are gone: wait for it

    def __init__(self, inner: IptablesBackend, pins: loader.Pins):
        super().__init__(inner.endpoints, inner.policy, inner.nat)
        self.pins = pins
        self.name = "bpf"

    # --- host ---------------------------------------------------------------------------------------------------

    def setup_host(self) -> dict:
        out = dict(super().setup_host())
        out["bpf_fabric"] = self._attach_fabric()
        return out

    def _fabric_links(self, nl):
        return [
            m
            for m in nl.links()
            if m.get("ifname") not in (None, "lo")
            and not is_host_ifname(m.get("ifname"))
            and not m.get("ifname").startswith(CONTAINER_END_PREFIX)
        ]

    def _attach_fabric(self) -> list:
        """``to_container`` on every interface that is neither loopback nor an endpoint's veth; names attached."""
        with netlink(self.host_netns) as nl:
            links = self._fabric_links(nl)
        done = []
        for m in links:
            if TO_CONTAINER not in loader.attached(m["index"], netns=self.host_netns):
                loader.attach(self.pins.prog(TO_CONTAINER), m["index"], netns=self.host_netns)
                done.append(m.get("ifname"))
        return done

    # --- endpoints ------------------------------------------------------------------------------------------------

    def add_endpoint(self, spec):
        state = super().add_endpoint(spec)
        self._converge([spec])
        return state

    def remove_endpoint(self, endpoint_id, netns=None, ifname="eth0"):
        super().remove_endpoint(endpoint_id, netns, ifname)
        self._prune_gone()

    def reconcile(self, desired, blocks, deletable=frozenset()) -> dict:
        summary = super().reconcile(desired, blocks, deletable=deletable)
        summary = dict(summary) if isinstance(summary, dict) else {"endpoints": summary}
        summary["bpf"] = self._converge(desired, prune=True)
        summary["bpf"]["fabric_attached"] = self._attach_fabric()
        return summary

    def _known_macs(self) -> dict:
        """Container MACs np_locals already holds, by host veth ifindex: a resync need not open every netns."""
        with self.pins.map("np_locals") as m:
            out = {}
            for key in m.keys():
                value = m.lookup(key)
                if value is not None:
                    _, idx, cmac, _ = records.LOCAL.unpack(value)
                    out[idx] = cmac.hex(":")
            return out

    def _container_mac(self, spec):
        try:
            with netlink(spec.netns) as cnl:
                cont = cnl.link(name=spec.ifname)
        except (OSError, NetpluginError):  # a namespace that vanished has no endpoint to program
            return None
        return cont.get("address") if cont else None

    def _wanted(self, specs) -> tuple:
        """(np_endpoints, np_locals, host veths) wanted for ``specs``: computed from the kernel's links."""
        eps, locs, veths = {}, {}, {}
        known = self._known_macs()
        with netlink(self.host_netns) as hnl:
            for spec in specs:
                host = hnl.link(name=host_ifname(spec.endpoint_id))
                if host is None or not spec.addresses:
                    continue
                idx = host["index"]  # the endpoint's id in the maps: unique on this host while its veth lives
                mac = spec.mac or known.get(idx) or self._container_mac(spec)
                if not mac:
                    continue
                addrs = [str(a).split("/")[0] for a in spec.addresses]
                eps[records.ifindex_key(idx)] = records.endpoint(idx, addrs)
                for a in addrs:
                    locs[records.addr16(a)] = records.local(idx, idx, mac, host.get("address"))
                veths[idx] = host.get("ifname")
        return eps, locs, veths

    def _converge(self, specs, prune=False) -> dict:
        eps, locs, veths = self._wanted(specs)
        changed = {
            "np_endpoints": self._sync_map("np_endpoints", eps, prune),
            "np_locals": self._sync_map("np_locals", locs, prune),
        }
        attached = []
        for idx, name in veths.items():
            if FROM_CONTAINER not in loader.attached(idx, netns=self.host_netns):
                loader.attach(self.pins.prog(FROM_CONTAINER), idx, netns=self.host_netns)
                attached.append(name)
        with self.pins.map("np_counters") as m:
            for key in eps:
                if m.lookup(key) is None:
                    m.update(key, bytes(records.COUNTERS.size))
        changed["attached"] = attached
        return changed

    def _prune_gone(self):
        """Drop the map entries whose host veth is gone."""
        with netlink(self.host_netns) as hnl:
            alive = {m["index"] for m in hnl.links()}
        for name, owner in (
            ("np_endpoints", lambda k, v: records.IFINDEX.unpack(k)[0]),
            ("np_locals", lambda k, v: records.LOCAL.unpack(v)[1]),
        ):
            with self.pins.map(name) as m:
                for key in list(m.keys()):
                    v = m.lookup(key)
                    if v is not None and owner(key, v) not in alive:
                        m.delete(key)

    def _sync_map(self, name, want: dict, prune: bool) -> int:
        """Write ``want`` into the map; with ``prune`` delete every key not wanted. The number of changes."""
        n = 0
        with self.pins.map(name) as m:
            for key, value in want.items():
                if m.lookup(key) != value:
                    m.update(key, value)
                    n += 1
            if prune:
                for key in list(m.keys()):
                    if key not in want:
                        m.delete(key)
                        n += 1
        return n


def _probe(bpffs, object_dir) -> str | None:
    """Why the kernel or host cannot run the bpf dataplane, or None when it can (before loading)."""
    if not os.path.exists("/proc/sys/kernel/unprivileged_bpf_disabled"):
        return "the kernel has no BPF syscall (CONFIG_BPF_SYSCALL)"
    if not os.path.exists(build.KERNEL_BTF):
        return f"no kernel BTF at {build.KERNEL_BTF}"
    if shutil.which("bpftool") is None:
        return "bpftool is not installed (scripts/setup.sh installs it)"
    obj = os.path.join(object_dir, OBJECT)
    if not os.path.isfile(obj):
        return f"no BPF object {obj} (build it: python -m netplugin.kernel.bpf.build {object_dir})"
    os.makedirs(bpffs, exist_ok=True)
    if not loader.is_bpffs(bpffs):
        return f"{bpffs} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)"
    return None


def select_backend(config):
    """The backend ``config.dataplane`` asks for if this host can run it, else iptables: (backend, name, why).
    The agent logs ``why`` in one line (``log_selection``) when it starts: never a silent fallback."""
    inner = iptables_backend(config.mtu)
    if config.dataplane != "bpf":
        reason = "iptables requested"
        name, backend = "iptables", inner
    else:
        object_dir = config.bpf_objects or default_object_dir()
        why = _probe(config.bpffs, object_dir)
        pins = None
        if why is None:
            try:
                pins = loader.load(os.path.join(object_dir, OBJECT), config.bpffs)  # the verifier's verdict
            except (loader.LoadError, OSError) as e:
                why = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        if why is None:
            name, backend = "bpf", BpfBackend(inner, pins)
            reason = f"kernel offers BPF and BTF and verified the programs; pinned under {config.bpffs}"
        else:
            name, backend = "iptables", inner
            reason = f"bpf requested but {why}: falling back"
    return backend, name, reason


def log_selection(wanted, name, reason):
    """The one line saying which dataplane runs and why (a fallback at WARNING)."""
    LOG.log(
        logging.WARNING if name != wanted else logging.INFO,
        "event=dataplane.selected dataplane=%s reason=%r",
        name,
        reason,
    )
