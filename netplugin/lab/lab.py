"""A multi-host netplugin cluster in network namespaces: etcd, a fabric, one agent (and BIRD) per host, and
"containers" started through the real CNI binary.

``Lab.up(spec)`` builds everything the LabPlan describes, recording each thing in the state file before making
it, and removes it all again if any step fails or is interrupted. ``Lab.open(name)`` finds a running lab from its
state file; ``Lab.destroy(name)`` removes a lab even when its state file is damaged (every namespace of a lab
starts with ``lab-<name>-``, and nothing else is ever matched).

The cluster is configured the way an operator would: ``netctl`` for the pool, the mesh switch, per-node peers
and route reflectors. Per-host AS numbers (racks) are agent flags, so the first BIRD config already has the
right AS: a session first opened with a wrong AS fails and BIRD then waits out its error delay.

The class is split by concern into mixins, each in its own module: building the topology (topology.py), BGP
introspection (bgp.py), containers (containers.py) and what the operator is shown (report.py). This module
finds, builds, changes and removes a lab as a whole.
"""

import json
import os
import shutil
import time

from netplugin.lab import etcd, system
from netplugin.lab.bgp import BgpSessions
from netplugin.lab.containers import Containers
from netplugin.lab.plan import LabSpec, make_plan, ns_prefix, state_dir
from netplugin.lab.report import Reporting
from netplugin.lab.state import LabState, locked
from netplugin.lab.system import LabError
from netplugin.lab.topology import BIN, Topology

TOR_PEER = "tor-{host}"  # name of the per-node BGP peer record for a host's rack router


def _quiet(_line):
    pass


def _guarded(out):
    """``out`` that never raises: a closed terminal or pipe must not turn into a failed (and removed) lab."""

    def write(line):
        try:
            out(line)
        except (OSError, ValueError):
            pass

    return write


class Lab(Topology, BgpSessions, Containers, Reporting):
    def __init__(self, plan, state, out=None):
        self.plan = plan
        self.state = state
        self.out = _guarded(out or _quiet)

    # --- finding and removing ---------------------------------------------------------------------------------------

    @classmethod
    def open(cls, name, out=None):
        sdir = state_dir(name)
        state = LabState.load(sdir, name)
        spec = LabSpec(**state.data["spec"])
        return cls(make_plan(spec), state, out)

    @staticmethod
    def exists(name):
        return os.path.isdir(state_dir(name))

    @staticmethod
    def names():
        root = os.path.dirname(state_dir("x"))
        try:
            return sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
        except FileNotFoundError:
            return []

    @classmethod
    def destroy(cls, name, out=None):
        """Remove lab ``name``: processes, namespaces, files. Idempotent; works without a readable state."""
        out = _guarded(out or _quiet)
        sdir = state_dir(name)
        data = {}
        try:
            data = LabState.load(sdir, name).data
        except LabError:
            pass
        procs = [(p["pid"], p["start"]) for p in data.get("processes", [])]
        namespaces = list(data.get("namespaces", []))
        found = system.list_netns(ns_prefix(name))
        if not (procs or namespaces or found or os.path.isdir(sdir)):
            return False
        # Agents first (TERM: a clean stop), then everything else still running in the lab's namespaces.
        system.stop_processes(procs)
        for ns in reversed(namespaces + [n for n in found if n not in namespaces]):
            if ns.startswith(ns_prefix(name)):
                system.delete_netns(ns)
        for mount in data.get("mounts", []):
            if mount.startswith(sdir + os.sep):  # only what this lab mounted under its own state directory
                system.unmount_bpffs(mount)
        for d in data.get("dirs", []):
            if os.path.basename(d).startswith("netplugin-lab-"):
                shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(sdir, ignore_errors=True)
        out(f"lab {name}: removed {len(set(namespaces) | set(found))} namespaces and {len(procs)} processes")
        return True

    def down(self):
        return Lab.destroy(self.plan.spec.name, self.out)

    # --- building ---------------------------------------------------------------------------------------------------

    @classmethod
    def up(cls, spec, out=None, converge_timeout=None, after_fabric=None):
        """Build the lab for ``spec`` and wait until its routing has converged; on any failure or interrupt,
        remove everything made so far and re-raise. ``after_fabric(lab)`` runs once the hosts are plugged in,
        before any agent starts (a benchmark pins the fabric's neighbours there, so BGP's own ARP entries
        never overflow the shared kernel's table at 200 hosts)."""
        plan = make_plan(spec)
        for tool in ("etcd", "socat", "bird", "birdc", "ip"):
            if shutil.which(tool) is None:
                raise LabError(f"building lab {spec.name}: {tool} is not installed (scripts/setup.sh installs it)")
        if os.geteuid() != 0:
            raise LabError(f"building lab {spec.name}: needs root (network namespaces)")
        leftovers = system.list_netns(ns_prefix(spec.name))
        if leftovers and not os.path.isdir(plan.state_dir):
            raise LabError(
                f"building lab {spec.name}: namespaces {', '.join(leftovers)} exist without a state "
                f"file; remove them with 'down --name {spec.name}'"
            )
        state = LabState.create(plan.state_dir, spec.name)
        lab = cls(plan, state, out)
        try:
            lab._build(converge_timeout, after_fabric)
        except BaseException as e:
            lab.out(
                f"lab {spec.name}: {'interrupted' if isinstance(e, KeyboardInterrupt) else 'failed'}; "
                "removing what was built"
            )
            try:
                lab.down()
            except Exception as cleanup_error:  # report, but keep the original error
                lab.out(f"lab {spec.name}: cleanup failed: {cleanup_error}")
            raise
        lab.out(lab.summary())
        return lab

    def _build(self, converge_timeout, after_fabric=None):
        spec, plan, state = self.plan.spec, self.plan, self.state
        started = time.monotonic()
        state.data["spec"] = spec.to_dict()
        state.data["hosts"] = {h.name: {"killed": False} for h in plan.hosts}
        state.add_dir(plan.etcd_dir)
        self.out(
            f"lab {spec.name}: {spec.hosts} hosts in {spec.racks} rack(s), routing: {spec.bgp_mode}, "
            f"etcd: {spec.etcd_members} member(s)"
        )

        members = etcd.member_specs(plan.etcd_dir, spec.etcd_members)
        state.data["etcd"] = {"members": members, "endpoints": etcd.endpoints(members)}
        state.save()
        etcd.start_lab_cluster(state, members, token=f"netplugin-lab-{spec.name}")
        self._timing("etcd", started)

        self.netctl("pool", "add", spec.pool)
        if spec.routing == "bgp" and not spec.mesh:
            self.netctl("bgp", "config", "--no-mesh")
        if plan.router:
            for h in plan.hosts:
                self.netctl(
                    "bgp",
                    "peer",
                    "add",
                    TOR_PEER.format(host=h.name),
                    "--address",
                    h.gateway,
                    "--as-number",
                    str(plan.router.as_number),
                    "--node",
                    h.name,
                )

        t = time.monotonic()
        self._build_fabric()
        if after_fabric:
            after_fabric(self)
        self._timing("fabric", t)
        if plan.router:
            self._start_router()
        t = time.monotonic()
        self._start_agents()
        self._timing("agents", t)
        for h in plan.hosts:
            if h.route_reflector:
                self.netctl("node", "set", h.name, "--route-reflector")
        t = time.monotonic()
        if spec.routing == "bgp":
            self.wait_established(converge_timeout or 60 + spec.hosts)
            self._timing("bgp", t)
        state.data["status"] = "up"
        self._timing("total", started)

    def _timing(self, what, since):
        self.state.data["timings"][what] = round(time.monotonic() - since, 2)
        self.state.save()

    # --- the cluster ----------------------------------------------------------------------------------------------

    @property
    def endpoints(self):
        return self.state.data["etcd"]["endpoints"]

    @property
    def name(self):
        return self.plan.spec.name

    def netctl(self, *args, check=True, echo=True, input=None):
        """Run ``netctl`` against the lab's etcd (from the root namespace: etcd listens there); ``input`` is its
        stdin (``-f -``)."""
        if echo:
            self.out(f"  $ netctl {' '.join(args)}")
        env = dict(os.environ, NETPLUGIN_ETCD_ENDPOINTS=",".join(self.endpoints))
        return system.run(
            [os.path.join(BIN, "netctl")] + list(args), f"netctl {' '.join(args)}", check=check, env=env, input=input
        )

    def live_hosts(self):
        return [h for h in self.plan.hosts if not self.state.data["hosts"].get(h.name, {}).get("killed")]

    def routes(self, host_name):
        """A host's main routing table as ``ip -j route`` dicts."""
        h = self.plan.host(host_name)
        p = system.run(
            ["ip", "-n", system.check_ns(h.namespace), "-j", "route", "show"], f"reading routes of {host_name}"
        )
        return json.loads(p.stdout or "[]")

    def kill_host(self, host_name, silent=True):
        """Crash a host: SIGKILL its agent, BIRD and etcd bridge, then delete its namespace. Its containers'
        namespaces stay, cut off.

        ``silent`` first unplugs the host from its rack, as a power loss would: the TCP FINs of the dying BIRD then
        reach nobody, and peers must notice by themselves (hold timer, failed sends). Otherwise the peers see the
        sessions close at once."""
        h = self.plan.host(host_name)
        with locked(self.plan.state_dir, f"killing host {host_name}"):
            if silent:
                rack = self.plan.racks[h.rack - 1]
                system.ip_batch(rack.namespace, [f"link del {h.port}"], f"unplugging host {host_name}")
            system.delete_netns(h.namespace)
            self.state.data["hosts"][h.name] = {"killed": True, "killed_at": time.time()}
            self.state.save()
