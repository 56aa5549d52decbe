"""A multi-host netplugin cluster in network namespaces: etcd, a fabric, one agent (and BIRD) per host, and
"containers" started through the real CNI binary.

``Lab.up(spec)`` builds everything the LabPlan describes, recording each thing in the state file before making
it, and removes it all again if any step fails or is interrupted. ``Lab.open(name)`` finds a running lab from its
state file; ``Lab.destroy(name)`` removes a lab even when its state file is damaged (every namespace of a lab
starts with ``lab-<name>-``, and nothing else is ever matched).

The cluster is configured the way an operator would: ``netctl`` for the pool, the mesh switch, per-node peers
and route reflectors. Per-host AS numbers (racks) are agent flags, so the first BIRD config already has the
right AS: a session first opened with a wrong AS fails and BIRD then waits out its error delay.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from netplugin.errors import InvalidInput
from netplugin.lab import etcd, system
from netplugin.lab.plan import LabSpec, check_container_name, make_plan, ns_prefix, state_dir
from netplugin.lab.router import render_router_config
from netplugin.lab.state import LabState, locked
from netplugin.lab.system import LabError

BIN = os.path.dirname(sys.executable)  # the virtualenv's bin: netplugin, netctl
CNI_NETWORK = "netplugin"
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


class Lab:
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
    def up(cls, spec, out=None, converge_timeout=None):
        """Build the lab for ``spec`` and wait until its routing has converged; on any failure or interrupt,
        remove everything made so far and re-raise."""
        plan = make_plan(spec)
        for tool in ("etcd", "socat", "bird", "birdc", "ip"):
            if shutil.which(tool) is None:
                raise LabError(f"building lab {spec.name}: {tool} is not installed (scripts/setup.sh installs it)")
        if os.geteuid() != 0:
            raise LabError(f"building lab {spec.name}: needs root (network namespaces)")
        leftovers = system.list_netns(ns_prefix(spec.name))
        if leftovers and not os.path.isdir(plan.state_dir):
            raise LabError(f"building lab {spec.name}: namespaces {', '.join(leftovers)} exist without a state "
                           f"file; remove them with 'down --name {spec.name}'")
        state = LabState.create(plan.state_dir, spec.name)
        lab = cls(plan, state, out)
        try:
            lab._build(converge_timeout)
        except BaseException as e:
            lab.out(f"lab {spec.name}: {'interrupted' if isinstance(e, KeyboardInterrupt) else 'failed'}; "
                    "removing what was built")
            try:
                lab.down()
            except Exception as cleanup_error:  # report, but keep the original error
                lab.out(f"lab {spec.name}: cleanup failed: {cleanup_error}")
            raise
        lab.out(lab.summary())
        return lab

    def _build(self, converge_timeout):
        spec, plan, state = self.plan.spec, self.plan, self.state
        started = time.monotonic()
        state.data["spec"] = spec.to_dict()
        state.data["hosts"] = {h.name: {"killed": False} for h in plan.hosts}
        state.add_dir(plan.etcd_dir)
        self.out(f"lab {spec.name}: {spec.hosts} hosts in {spec.racks} rack(s), routing: {spec.bgp_mode}, "
                 f"etcd: {spec.etcd_members} member(s)")

        members = etcd.member_specs(plan.etcd_dir, spec.etcd_members)
        state.data["etcd"] = {"members": members, "endpoints": etcd.endpoints(members)}
        state.save()
        etcd.start(state, members, token=f"netplugin-lab-{spec.name}")
        self._timing("etcd", started)

        self.netctl("pool", "add", spec.pool)
        if spec.routing == "bgp" and not spec.mesh:
            self.netctl("bgp", "config", "--no-mesh")
        if plan.router:
            for h in plan.hosts:
                self.netctl("bgp", "peer", "add", TOR_PEER.format(host=h.name), "--address", h.gateway,
                            "--as-number", str(plan.router.as_number), "--node", h.name)

        t = time.monotonic()
        self._build_fabric()
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

    def _build_fabric(self):
        plan, state = self.plan, self.state
        for rack in plan.racks:
            state.add_namespace(rack.namespace)
            system.add_netns(rack.namespace)
            system.ip_batch(rack.namespace, ["link add br0 type bridge", "link set br0 up"],
                            f"creating the bridge of rack {rack.index}")
        if plan.router:
            r = plan.router
            state.add_namespace(r.namespace)
            system.add_netns(r.namespace)
            system.sysctl(r.namespace, {"net.ipv4.ip_forward": 1}, "enabling forwarding in the router")
            for rack_index, ifname, address in r.interfaces:
                rack = plan.racks[rack_index - 1]
                system.veth(r.namespace, ifname, rack.namespace, "spine")
                system.ip_batch(r.namespace, [f"addr add {address} dev {ifname}", f"link set {ifname} up"],
                                f"addressing the router's {ifname}")
                system.ip_batch(rack.namespace, ["link set spine master br0", "link set spine up"],
                                f"plugging the router into rack {rack_index}")
        for h in plan.hosts:
            state.add_namespace(h.namespace)
            system.add_netns(h.namespace)
            rack = plan.racks[h.rack - 1]
            system.veth(h.namespace, "eth0", rack.namespace, h.port)
            cmds = [f"addr add {h.address}/24 dev eth0", "link set eth0 up"]
            if h.gateway:
                cmds.append(f"route add default via {h.gateway}")
            system.ip_batch(h.namespace, cmds, f"addressing host {h.name}")
            system.ip_batch(rack.namespace, [f"link set {h.port} master br0", f"link set {h.port} up"],
                            f"plugging host {h.name} into rack {h.rack}")
        members = self.state.data["etcd"]["members"]
        for h in plan.hosts:
            etcd.bridge_into(state, h.namespace, members)

    def _start_router(self):
        from netplugin.routing.bird import BirdConfigWriter, BirdProcess
        r = self.plan.router
        bird = BirdProcess(os.path.join(r.run_dir, "bird"), netns=r.namespace)
        BirdConfigWriter(bird).apply(render_router_config(self.plan))
        bird.start()
        self.state.add_process("bird spine", bird.pid(), system.start_time(bird.pid()))

    def agent_command(self, h):
        spec = self.plan.spec
        args = [os.path.join(BIN, "netplugin"), "agent", "--hostname", h.name,
                "--etcd-endpoints", ",".join(self.endpoints), "--run-dir", h.run_dir,
                "--routing", spec.routing, "--node-address", h.address, "--label", f"rack=rack{h.rack}",
                "--liveness-ttl", "8", "--resync-interval", "60"]
        if h.as_number is not None:
            args += ["--as-number", str(h.as_number)]
        return system.in_ns(h.namespace, args)

    def _start_agents(self):
        from cni.install import install_cni
        plan = self.plan
        procs = {}
        for h in plan.hosts:
            os.makedirs(h.run_dir, mode=0o700, exist_ok=True)
            install_cni(plan.cni_bin_dir, h.conf_dir, network=CNI_NETWORK, agent_socket=h.agent_socket,
                        python=sys.executable)
            proc = system.spawn(self.agent_command(h), os.path.join(h.run_dir, "agent.log"))
            procs[h.name] = proc
            self.state.add_process(f"agent {h.name}", proc.pid, system.start_time(proc.pid), save=False)
        self.state.save()
        deadline = time.monotonic() + 30 + 0.5 * len(plan.hosts)
        for h in plan.hosts:
            while not os.path.exists(h.agent_socket):
                if procs[h.name].poll() is not None:
                    raise LabError(f"starting the agent on {h.name}: it exited with {procs[h.name].returncode}; "
                                   f"{_tail(os.path.join(h.run_dir, 'agent.log'))}")
                if time.monotonic() > deadline:
                    raise LabError(f"starting the agent on {h.name}: no API socket within the time limit; "
                                   f"{_tail(os.path.join(h.run_dir, 'agent.log'))}")
                time.sleep(0.05)
        self.out(f"agents: {len(plan.hosts)} started")

    # --- the cluster ----------------------------------------------------------------------------------------------

    @property
    def endpoints(self):
        return self.state.data["etcd"]["endpoints"]

    @property
    def name(self):
        return self.plan.spec.name

    def netctl(self, *args, check=True, echo=True):
        """Run ``netctl`` against the lab's etcd (from the root namespace: etcd listens there)."""
        if echo:
            self.out(f"  $ netctl {' '.join(args)}")
        env = dict(os.environ, NETPLUGIN_ETCD_ENDPOINTS=",".join(self.endpoints))
        return system.run([os.path.join(BIN, "netctl")] + list(args), f"netctl {' '.join(args)}", check=check,
                          env=env)

    def live_hosts(self):
        return [h for h in self.plan.hosts if not self.state.data["hosts"].get(h.name, {}).get("killed")]

    def expected_sessions(self, host):
        """How many BGP sessions ``host`` should have Established in this lab's topology."""
        plan, spec = self.plan, self.plan.spec
        others = [h for h in self.live_hosts() if h.name != host.name]
        if plan.router:
            return 1
        if spec.mesh:
            return len(others)
        if host.route_reflector:
            return len(others)
        return sum(1 for h in others if h.route_reflector)

    def bgp_sessions(self, host_name):
        """BgpStatusRows of a host's BIRD (the same rows ``netctl node status`` shows)."""
        from netplugin.routing.bird import bgp_status
        h = self.plan.host(host_name)
        return bgp_status(h.bird_socket)

    def router_sessions(self):
        from netplugin.routing.bird import bgp_status
        if not self.plan.router:
            return []
        return bgp_status(os.path.join(self.plan.router.run_dir, "bird", "bird.ctl"))

    def established(self, host_name):
        from netplugin.routing.bird import BirdError
        try:
            return sum(1 for r in self.bgp_sessions(host_name) if r.state == "Established")
        except BirdError:
            return 0

    def wait_established(self, timeout):
        """Poll every host's BIRD (and the router's) until each has all its sessions Established."""
        from netplugin.routing.bird import BirdError
        started = time.monotonic()
        deadline = started + timeout
        pending = {h.name: h for h in self.live_hosts()}
        router_done = self.plan.router is None
        while True:
            for name in list(pending):
                if self.established(name) >= self.expected_sessions(pending[name]):
                    del pending[name]
            if not router_done:
                try:
                    up = sum(1 for r in self.router_sessions() if r.state == "Established")
                except BirdError:
                    up = 0
                router_done = up >= len(self.live_hosts())
            if not pending and router_done:
                break
            if time.monotonic() > deadline:
                detail = ", ".join(f"{n}: {self.established(n)}/{self.expected_sessions(h)}"
                                   for n, h in sorted(pending.items()))
                raise LabError(f"BGP did not converge within {timeout:.0f}s ({detail or 'router sessions down'}); "
                               f"see {self.plan.state_dir}/hosts/*/bird/bird.log")
            time.sleep(0.25)
        total = sum(self.expected_sessions(h) for h in self.live_hosts())
        self.out(f"BGP: {total} sessions Established after {time.monotonic() - started:.1f}s")

    def routes(self, host_name):
        """A host's main routing table as ``ip -j route`` dicts."""
        h = self.plan.host(host_name)
        p = system.run(["ip", "-n", system.check_ns(h.namespace), "-j", "route", "show"],
                       f"reading routes of {host_name}")
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

    # --- containers -----------------------------------------------------------------------------------------------

    def containers(self):
        return dict(self.state.data["containers"])

    def container(self, name):
        try:
            return self.state.data["containers"][name]
        except KeyError:
            raise LabError(f"lab {self.name} has no container {name!r}") from None

    def run_container(self, host_name, name, ip=None, labels=None):
        """A "container" (a namespace) on ``host_name`` wired by the real CNI binary (ADD), exactly as a runtime
        would call it. Returns its record: name, host, netns, ip, labels. Nothing is left behind on failure."""
        check_container_name(name)
        h = self.plan.host(host_name)
        if self.state.data["hosts"].get(h.name, {}).get("killed"):
            raise LabError(f"starting container {name}: host {host_name} was killed")
        labels = dict(labels or {})
        for k, v in labels.items():
            if not k or not isinstance(v, str):
                raise InvalidInput(f"invalid label {k!r}={v!r}")
        ns = self.plan.container_namespace(name)
        with locked(self.plan.state_dir, f"starting container {name}"):
            self.state.data = LabState.load(self.state.dir, self.name).data  # another command may have added one
            if name in self.state.data["containers"]:
                raise LabError(f"container {name} already exists on {self.state.data['containers'][name]['host']}")
            rec = {"name": name, "host": h.name, "netns": ns, "container_id": f"{self.name}-{name}",
                   "ip": None, "labels": labels, "created": time.time()}
            self.state.data["containers"][name] = rec
            self.state.add_namespace(ns)
            try:
                system.add_netns(ns)
                result = self._cni(h, "ADD", rec, ip=ip)
                rec["ip"] = result["ips"][0]["address"].split("/")[0]
                rec["mac"] = (result.get("interfaces") or [{}])[-1].get("mac")
                self.state.save()
            except BaseException:
                try:
                    self._cni(h, "DEL", rec, check=False)
                finally:
                    system.delete_netns(ns)
                    self.state.data["containers"].pop(name, None)
                    self.state.forget_namespace(ns)
                raise
        return dict(rec)

    def remove_container(self, name):
        """CNI DEL, then the namespace goes. Idempotent for a container the state knows."""
        with locked(self.plan.state_dir, f"removing container {name}"):
            self.state.data = LabState.load(self.state.dir, self.name).data
            rec = self.container(name)
            h = self.plan.host(rec["host"])
            if not self.state.data["hosts"].get(h.name, {}).get("killed"):
                self._cni(h, "DEL", rec)
            system.delete_netns(rec["netns"])
            del self.state.data["containers"][name]
            self.state.forget_namespace(rec["netns"])

    def _cni(self, h, command, rec, ip=None, check=True):
        with open(os.path.join(h.conf_dir, f"10-{CNI_NETWORK}.conflist")) as f:
            conflist = json.load(f)
        conf = dict(conflist["plugins"][0], cniVersion=conflist["cniVersion"], name=conflist["name"])
        if rec["labels"]:
            conf["args"] = {"labels": rec["labels"]}
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": rec["container_id"],
               "CNI_NETNS": f"/run/netns/{rec['netns']}",
               "CNI_IFNAME": "eth0", "CNI_PATH": self.plan.cni_bin_dir, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        if ip:
            env["CNI_ARGS"] = f"IP={ip}"
        # The runtime runs the plugin in the host's namespace; it forwards to the agent's unix socket.
        p = system.run(system.in_ns(h.namespace, [os.path.join(self.plan.cni_bin_dir, "netplugin")]),
                       f"CNI {command} of {rec['name']} on {h.name}", check=False, input=json.dumps(conf), env=env)
        out = {}
        if p.stdout.strip():
            try:
                out = json.loads(p.stdout)
            except ValueError:
                out = {"msg": p.stdout.strip()}
        if check and p.returncode != 0:
            msg = out.get("msg") or p.stderr.strip() or f"exit status {p.returncode}"
            details = f" ({out['details']})" if out.get("details") else ""
            raise LabError(f"CNI {command} of container {rec['name']} on {h.name} failed: {msg}{details}")
        return out

    def exec(self, name, argv, capture=True, timeout=60):
        """Run ``argv`` inside container ``name``; the CompletedProcess (never raises on a non-zero exit)."""
        rec = self.container(name)
        cmd = system.in_ns(rec["netns"], argv)
        if capture:
            return system.run(cmd, f"running {argv[0]} in {name}", check=False, timeout=timeout)
        return subprocess.run(cmd)

    def ping(self, src, address, timeout=1):
        """One echo from container ``src`` to ``address``; True when answered."""
        return self.exec(src, ["ping", "-c", "1", "-W", str(timeout), "-q", address]).returncode == 0

    def ping_matrix(self, names=None, timeout=1):
        """{(src, dst): reachable} for every ordered pair of containers, pinged in parallel."""
        names = sorted(names or self.state.data["containers"])
        pairs = [(s, d) for s in names for d in names if s != d]
        with ThreadPoolExecutor(max_workers=8) as pool:
            ok = list(pool.map(lambda p: self.ping(p[0], self.container(p[1])["ip"], timeout), pairs))
        return dict(zip(pairs, ok))

    def wait_reachable(self, names=None, timeout=30):
        """Poll until every container reaches every other; the matrix of the last round."""
        deadline = time.monotonic() + timeout
        while True:
            matrix = self.ping_matrix(names)
            if all(matrix.values()) or time.monotonic() > deadline:
                return matrix
            time.sleep(0.2)

    # --- reporting ------------------------------------------------------------------------------------------------

    def summary(self):
        plan, spec = self.plan, self.plan.spec
        cluster_as = "64512"
        rows = [("HOST", "NAMESPACE", "RACK", "ADDRESS", "AS", "ROLE")]
        for h in plan.hosts:
            role = "route reflector" if h.route_reflector else ""
            rows.append((h.name, h.namespace, str(h.rack), h.address, str(h.as_number or cluster_as), role))
        lines = [f"lab {spec.name} is up ({spec.hosts} hosts, {spec.bgp_mode}) in "
                 f"{self.state.data['timings'].get('total', 0):.1f}s", ""]
        lines += _table(rows)
        if plan.router:
            lines += ["", f"router {plan.router.namespace}: AS {plan.router.as_number}, "
                          + ", ".join(f"rack {r}: {a}" for r, _, a in plan.router.interfaces)]
        lines += [
            "",
            f"etcd:  {','.join(self.endpoints)}  (the same URL inside every host)",
            f"pool:  {spec.pool}",
            f"CNI:   {plan.cni_bin_dir}/netplugin with a conflist per host in {plan.state_dir}/hosts/H/net.d",
            f"state: {self.state.path}",
            "",
            "try:",
            f"  python scripts/lab.py run h1 web --label app=web{_name_opt(spec.name)}",
            f"  NETPLUGIN_ETCD_ENDPOINTS={','.join(self.endpoints)} netctl ipam show",
        ]
        if spec.routing == "bgp":
            lines.append(f"  netctl node status --run-dir {plan.hosts[0].run_dir}")
        lines.append(f"  python scripts/lab.py down{_name_opt(spec.name)}")
        return "\n".join(lines)

    def status(self):
        """A dict describing every host (agent and BIRD alive, sessions) and container."""
        from netplugin.routing.bird import BirdError
        procs = {p["role"]: p for p in self.state.data["processes"]}
        hosts = []
        for h in self.plan.hosts:
            killed = self.state.data["hosts"].get(h.name, {}).get("killed", False)
            agent = procs.get(f"agent {h.name}")
            row = {"host": h.name, "namespace": h.namespace, "address": h.address, "as": h.as_number,
                   "route_reflector": h.route_reflector, "killed": killed,
                   "agent": bool(agent and system.alive(agent["pid"], agent["start"])) and not killed}
            if self.plan.spec.routing == "bgp" and not killed:
                try:
                    rows = self.bgp_sessions(h.name)
                    row["bgp"] = f"{sum(r.state == 'Established' for r in rows)}/{len(rows)} Established"
                except BirdError:
                    row["bgp"] = "BIRD not running"
            hosts.append(row)
        return {"name": self.name, "spec": self.plan.spec.to_dict(), "status": self.state.data["status"],
                "etcd": self.endpoints,
                "etcd_healthy": [etcd.healthy(u) for u in self.endpoints], "hosts": hosts,
                "containers": list(self.state.data["containers"].values())}


def _name_opt(name):
    return "" if name == "demo" else f" --name {name}"


def _table(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _tail(path, n=3):
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-n:]) or "(empty log)"
    except OSError:
        return "(no log)"


def format_matrix(matrix, names):
    """The ping matrix as text: rows are sources, columns destinations."""
    names = sorted(names)
    rows = [["from \\ to"] + names]
    for s in names:
        rows.append([s] + ["-" if s == d else ("ok" if matrix.get((s, d)) else "FAIL") for d in names])
    return "\n".join(_table(rows))
