"""Building a lab's topology: the rack bridges, the spine router's BIRD, and one agent per host.

A mixin of ``Lab`` (netplugin/lab/lab.py), which owns ``plan``, ``state``, ``out`` and ``endpoints``: every
namespace is recorded in the state before it is made, every process right after it starts, so ``down`` finds
all of it even after a crash half-way.
"""

import os
import sys
import time

from netplugin.lab import etcd, system
from netplugin.lab.agents import agent_argv
from netplugin.lab.router import render_router_config
from netplugin.lab.system import LabError

BIN = os.path.dirname(sys.executable)  # the virtualenv's bin: netplugin, netctl
CNI_NETWORK = "netplugin"
AGENT_START_TIMEOUT = 60.0  # seconds from one agent's spawn to its API socket (it waits for etcd meanwhile)


def add_bridge(segment_ns):
    """The L2 segment's bridge ``br0`` in ``segment_ns`` (a rack, or a benchmark's fabric)."""
    system.ip_batch(segment_ns, ["link add br0 type bridge", "link set br0 up"], f"creating the bridge in {segment_ns}")


def plug_host(host_ns, segment_ns, port, address, gateway=None):
    """``eth0`` of ``host_ns`` (address ``a.b.c.d/len``) on the bridge of ``segment_ns`` through port ``port``,
    with a default route via ``gateway`` when one is given."""
    system.veth(host_ns, "eth0", segment_ns, port)
    cmds = [f"addr add {address} dev eth0", "link set eth0 up"]
    if gateway:
        cmds.append(f"route add default via {gateway}")
    system.ip_batch(host_ns, cmds, f"addressing {host_ns}")
    system.ip_batch(
        segment_ns, [f"link set {port} master br0", f"link set {port} up"], f"plugging {host_ns} into {segment_ns}"
    )


class Topology:
    def _build_fabric(self):
        plan, state = self.plan, self.state
        for rack in plan.racks:
            state.add_namespace(rack.namespace)
            system.add_netns(rack.namespace)
            add_bridge(rack.namespace)
        if plan.router:
            r = plan.router
            state.add_namespace(r.namespace)
            system.add_netns(r.namespace)
            system.sysctl(r.namespace, {"net.ipv4.ip_forward": 1}, "enabling forwarding in the router")
            for rack_index, ifname, address in r.interfaces:
                rack = plan.racks[rack_index - 1]
                system.veth(r.namespace, ifname, rack.namespace, "spine")
                system.ip_batch(
                    r.namespace,
                    [f"addr add {address} dev {ifname}", f"link set {ifname} up"],
                    f"addressing the router's {ifname}",
                )
                system.ip_batch(
                    rack.namespace,
                    ["link set spine master br0", "link set spine up"],
                    f"plugging the router into rack {rack_index}",
                )
        for h in plan.hosts:
            state.add_namespace(h.namespace)
            system.add_netns(h.namespace)
            plug_host(h.namespace, plan.racks[h.rack - 1].namespace, h.port, f"{h.address}/24", h.gateway)
        members = self.state.data["etcd"]["members"]
        for h in plan.hosts:
            etcd.bridge_lab_host(state, h.namespace, members)

    def _start_router(self):
        from netplugin.routing.bird import BirdConfigWriter, BirdProcess

        r = self.plan.router
        bird = BirdProcess(os.path.join(r.run_dir, "bird"), netns=r.namespace)
        BirdConfigWriter(bird).apply(render_router_config(self.plan))
        bird.start()
        self.state.add_process("bird spine", bird.pid(), system.start_time(bird.pid()))

    def agent_command(self, h):
        spec = self.plan.spec
        extra = [
            "--node-address",
            h.address,
            "--label",
            f"rack=rack{h.rack}",
            "--liveness-ttl",
            "8",
            "--resync-interval",
            "60",
        ]
        if h.as_number is not None:
            extra += ["--as-number", str(h.as_number)]
        if spec.dataplane == "bpf":
            extra += ["--dataplane", "bpf", "--bpffs", self.plan.host_bpffs(h)]
        return system.in_ns(
            h.namespace,
            agent_argv(h.name, self.endpoints, h.run_dir, spec.routing, extra, program=os.path.join(BIN, "netplugin")),
        )

    def _start_agents(self):
        """Start every host's agent, at most ``starting_at_once()`` of them between spawn and API socket.

        Each agent's start-up costs CPU (about a second of imports and its first full sync) and a burst of etcd
        requests; 200 spawned at once on a small machine share the CPU 200 ways, so every one of them takes
        minutes and etcd answers late. A sliding window keeps the machine and etcd at a pace they sustain, and
        each agent has its own deadline from its own spawn."""
        from cni.install import install_cni

        plan = self.plan
        if plan.spec.dataplane == "bpf":
            self.state.add_mount(plan.bpffs)  # recorded first: down unmounts it even if we stop half-way
            system.mount_bpffs(plan.bpffs)
        env = self._agent_env()
        window = starting_at_once()
        pending, starting = list(plan.hosts), {}  # host -> (Popen, deadline)
        took = self.state.data.setdefault("agent_start_s", {})  # host -> seconds from spawn to API socket
        while pending or starting:
            while pending and len(starting) < window:
                h = pending.pop(0)
                os.makedirs(h.run_dir, mode=0o700, exist_ok=True)
                install_cni(
                    plan.cni_bin_dir,
                    h.conf_dir,
                    network=CNI_NETWORK,
                    agent_socket=h.agent_socket,
                )
                proc = system.spawn(self.agent_command(h), os.path.join(h.run_dir, "agent.log"), env=env)
                self.state.add_process(f"agent {h.name}", proc.pid, system.start_time(proc.pid))
                starting[h] = (proc, time.monotonic() + AGENT_START_TIMEOUT)
            for h, (proc, deadline) in list(starting.items()):
                if _agent_ready(h, proc, deadline):
                    took[h.name] = round(time.monotonic() - deadline + AGENT_START_TIMEOUT, 3)
                    del starting[h]
            time.sleep(0.05)
        self.state.save()
        self.out(f"agents: {len(plan.hosts)} started, at most {window} at once")

    def _agent_env(self):
        """The agents' environment: bytecode cached in the lab's state directory, compiled once here.

        A checkout run with PYTHONDONTWRITEBYTECODE (editable installs, CI) would otherwise compile every module
        of the project in every agent: a quarter of an agent's start-up CPU, paid 200 times. An installed
        package has its bytecode from pip; the cache goes with the lab."""
        env = dict(os.environ, PYTHONPYCACHEPREFIX=os.path.join(self.plan.state_dir, "pycache"))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        system.run(
            [sys.executable, "-c", "import netplugin.agent.daemon, netplugin.agent.cni_api, netplugin.agent.routing"],
            "compiling the agent's modules for the lab",
            env=env,
        )
        return env

    @staticmethod
    def _wait_sockets(procs, hosts):
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        for h in hosts:
            while not _agent_ready(h, procs[h.name], deadline):
                time.sleep(0.05)

    def restart_agent(self, host_name, extra_args=()):
        """Stop a host's agent (TERM) and start it again with ``extra_args`` after the lab's own (a later flag
        wins, e.g. ``--resync-interval 1``); returns once its API socket is back."""
        h = self.plan.host(host_name)
        role = f"agent {h.name}"
        system.stop_processes([(p["pid"], p["start"]) for p in self.state.processes(role)])
        self.state.data["processes"] = [p for p in self.state.data["processes"] if p["role"] != role]
        if os.path.exists(h.agent_socket):
            os.unlink(h.agent_socket)
        proc = system.spawn(
            self.agent_command(h) + list(extra_args), os.path.join(h.run_dir, "agent.log"), env=self._agent_env()
        )
        self.state.add_process(role, proc.pid, system.start_time(proc.pid))
        self._wait_sockets({h.name: proc}, [h])

    def agent_pid(self, host_name):
        """The pid of a host's running agent, or None."""
        for p in self.state.processes(f"agent {host_name}"):
            if system.alive(p["pid"], p["start"]):
                return p["pid"]
        return None


def starting_at_once(cpus=None):
    """How many agents a lab lets start at the same time: enough to keep every core busy while some wait for
    etcd, few enough that each finishes its start-up in seconds."""
    return max(4, 4 * (cpus or os.cpu_count() or 1))


def _agent_ready(h, proc, deadline):
    """True once host ``h``'s agent serves its API socket; raises if it exited or ran past ``deadline``."""
    if os.path.exists(h.agent_socket):
        return True
    if proc.poll() is not None:
        raise LabError(
            f"starting the agent on {h.name}: it exited with {proc.returncode}; "
            f"{_tail(os.path.join(h.run_dir, 'agent.log'))}"
        )
    if time.monotonic() > deadline:
        raise LabError(
            f"starting the agent on {h.name}: no API socket within {AGENT_START_TIMEOUT:.0f}s; "
            f"{_tail(os.path.join(h.run_dir, 'agent.log'))}"
        )
    return False


def _tail(path, n=3):
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-n:]) or "(empty log)"
    except OSError:
        return "(no log)"
