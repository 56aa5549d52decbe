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
        from cni.install import install_cni

        plan = self.plan
        if plan.spec.dataplane == "bpf":
            self.state.add_mount(plan.bpffs)  # recorded first: down unmounts it even if we stop half-way
            system.mount_bpffs(plan.bpffs)
        procs = {}
        for h in plan.hosts:
            os.makedirs(h.run_dir, mode=0o700, exist_ok=True)
            install_cni(
                plan.cni_bin_dir, h.conf_dir, network=CNI_NETWORK, agent_socket=h.agent_socket, python=sys.executable
            )
            proc = system.spawn(self.agent_command(h), os.path.join(h.run_dir, "agent.log"))
            procs[h.name] = proc
            self.state.add_process(f"agent {h.name}", proc.pid, system.start_time(proc.pid), save=False)
        self.state.save()
        self._wait_sockets(procs, plan.hosts)
        self.out(f"agents: {len(plan.hosts)} started")

    @staticmethod
    def _wait_sockets(procs, hosts):
        deadline = time.monotonic() + 30 + 0.5 * len(hosts)
        for h in hosts:
            while not os.path.exists(h.agent_socket):
                if procs[h.name].poll() is not None:
                    raise LabError(
                        f"starting the agent on {h.name}: it exited with {procs[h.name].returncode}; "
                        f"{_tail(os.path.join(h.run_dir, 'agent.log'))}"
                    )
                if time.monotonic() > deadline:
                    raise LabError(
                        f"starting the agent on {h.name}: no API socket within the time limit; "
                        f"{_tail(os.path.join(h.run_dir, 'agent.log'))}"
                    )
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
        proc = system.spawn(self.agent_command(h) + list(extra_args), os.path.join(h.run_dir, "agent.log"))
        self.state.add_process(role, proc.pid, system.start_time(proc.pid))
        self._wait_sockets({h.name: proc}, [h])

    def agent_pid(self, host_name):
        """The pid of a host's running agent, or None."""
        for p in self.state.processes(f"agent {host_name}"):
            if system.alive(p["pid"], p["start"]):
                return p["pid"]
        return None


def _tail(path, n=3):
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-n:]) or "(empty log)"
    except OSError:
        return "(no log)"
