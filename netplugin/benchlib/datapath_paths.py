"""The data path benchmark's paths: for each technology, a pair of host namespaces with a client and a server
endpoint (scripts/bench_datapath.py measures them). netplugin is a real two-host lab (netplugin/lab); the others
are built by hand beside it, each on its own hosts so no technology's rules tax another's traffic.
"""

import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

from netplugin.benchlib import tools
from netplugin.lab import Lab, LabSpec, system
from netplugin.lab.plan import ns_prefix
from netplugin.lab.topology import add_bridge, plug_host

FABRIC_PREFIX = "10.77.0"  # fabric addresses: only ever inside the namespaces this script makes
NETPLUGIN_POOL = "10.20.0.0/16"
PTP_SUBNETS = ("10.30.1.0/24", "10.30.2.0/24")
VXLAN_NET = "10.99.0"
DOCKER_NET = "172.17.0"
CNI_DIR = "/usr/lib/cni"
PUBLISHED = ((tools.IPERF3_PORT, "tcp"), (tools.IPERF3_PORT, "udp"), (tools.SOCKPERF_PORT, "tcp"))


@dataclass
class Path:
    id: str
    label: str
    description: str
    client_ns: str
    server_ns: str
    bind: str  # the address the servers listen on (inside server_ns)
    target: str  # the address the client connects to (differs from bind behind NAT)


def log(msg):
    """Progress goes to stderr; stdout carries only the final summary (the convention of scripts/bench_*.py)."""
    print(msg, file=sys.stderr, flush=True)


class Testbed:
    """Every namespace of one run, named under the lab prefixes of netplugin/lab (``lab-<name>-``), so the lab's
    safety rules hold (nothing else is ever touched) and ``Lab.destroy`` removes them with whatever still runs in
    them. The netplugin path is a real lab (``Lab.up``, named ``<name>n``); the other paths' hosts and containers
    are plain namespaces beside it, on a fabric bridge of their own. Undo steps are registered before the thing
    exists."""

    def __init__(self, cleanup):
        self.cleanup = cleanup
        self.name = f"bdp{os.getpid() % 100000}"
        self.prefix = ns_prefix(self.name)
        cleanup.push(f"remove namespaces {self.prefix}*", Lab.destroy, self.name)
        self.workdir = os.path.join(tempfile.gettempdir(), f"npt-bench-{os.getpid()}-{int(time.time())}")
        cleanup.push(f"remove {self.workdir}", shutil.rmtree, self.workdir, ignore_errors=True)
        os.mkdir(self.workdir)
        self._count = 0
        self.fabric = self._ns("fabric")
        add_bridge(self.fabric)
        self.netplugin = None

    @staticmethod
    def sh(ns, cmd, check=True, input=None, timeout=60):
        """Run ``cmd`` (a string or an argv) in lab namespace ``ns``; LabError when it fails and ``check``."""
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return system.ns_run(ns, argv, f"{argv[0]} in {ns}", check=check, input=input, timeout=timeout)

    def _ns(self, kind):
        self._count += 1
        ns = f"{self.prefix}{kind}{self._count}"
        system.add_netns(ns)
        return ns

    def host(self, index, forward=True):
        """A host namespace with eth0 = FABRIC_PREFIX.index/24 on the fabric bridge."""
        ns = self._ns("h")
        plug_host(ns, self.fabric, f"f{self._count}", f"{FABRIC_PREFIX}.{index}/24")
        if forward:
            system.sysctl(ns, {"net.ipv4.ip_forward": 1}, f"enabling forwarding in {ns}")
        return ns, f"{FABRIC_PREFIX}.{index}"

    def container(self):
        return self._ns("c")

    def link(self, ctr, host, address, ctr_if, host_if):
        """A veth from container ``ctr`` (``ctr_if``, with ``address``) to ``host`` (``host_if``), both up."""
        system.veth(ctr, ctr_if, host, host_if)
        system.ip_batch(ctr, [f"addr add {address} dev {ctr_if}", f"link set {ctr_if} up"], f"addressing {ctr}")
        system.ip_batch(host, [f"link set {host_if} up"], f"bringing up {host_if} in {host}")

    def leftovers(self):
        """Namespaces this run made that still exist (should be none after cleanup)."""
        return system.list_netns(self.prefix) + system.list_netns(ns_prefix(self.name + "n"))

    def spawn(self, what, start):
        """Start a long-lived process with ``start()``; it is killed at cleanup."""
        holder = []

        def stop():
            for proc in holder:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)

        self.cleanup.push(f"stop {what}", stop)
        holder.append(start())
        return holder[0]


# --- paths -------------------------------------------------------------------------------------------------------


def build_host(lab):
    b1, _ = lab.host(1, forward=False)
    b2, ip2 = lab.host(2, forward=False)
    return [
        Path(
            "host",
            "host ↔ host (host networking)",
            "iperf3/sockperf between the fabric addresses of two host namespaces: one veth pair each into the "
            "fabric bridge, no container, no rules.",
            b1,
            b2,
            ip2,
            ip2,
        )
    ]


def build_netplugin(lab, cleanup):
    """A two-host lab (netplugin/lab: etcd, BIRD and an agent per host, --routing bgp) and three containers made
    through the CNI binary: two on the first host, one on the second."""
    spec = LabSpec(name=lab.name + "n", hosts=2, routing="bgp", pool=NETPLUGIN_POOL)
    cleanup.push(f"remove lab {spec.name}", Lab.destroy, spec.name, log)
    cluster = Lab.up(spec, out=log)
    (c1, ip1), (c2, ip2), (c3, _) = [
        (rec["netns"], rec["ip"])
        for rec in (cluster.run_container(host, name) for host, name in (("h1", "c1"), ("h2", "c2"), ("h1", "c3")))
    ]
    lab.netplugin = {
        "hosts": [h.namespace for h in cluster.plan.hosts],
        "agents": [cluster.agent_pid(h.name) for h in cluster.plan.hosts],
    }  # for --diagnose
    if not wait_ping(lab, c1, ip2, timeout=60):
        raise RuntimeError(
            f"netplugin containers on two hosts cannot reach each other after 60 s; see "
            f"{cluster.plan.state_dir}/hosts/*/agent.log"
        )
    return [
        Path(
            "netplugin-2h",
            "netplugin, 2 hosts (BGP)",
            "Containers on two hosts: a veth per container with a /32 route, proxy-ARP gateway, per-endpoint "
            "policy chains (the default allow within the network), host blocks learned over BGP from BIRD.",
            c1,
            c2,
            ip2,
            ip2,
        ),
        Path(
            "netplugin-1h",
            "netplugin, 1 host",
            "Two containers on the same host: veth → host routing → veth, policy chains as above.",
            c3,
            c1,
            ip1,
            ip1,
        ),
    ]


def wait_ping(lab, ns, target, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.sh(ns, f"ping -c1 -W1 {target}", check=False).returncode == 0:
            return True
        time.sleep(0.5)
    return False


def docker_rules(container_ip):
    """The iptables rules Docker 20.10 writes for docker0 and a container publishing our ports."""
    filt = [
        "*filter",
        ":FORWARD DROP [0:0]",
        ":DOCKER - [0:0]",
        ":DOCKER-ISOLATION-STAGE-1 - [0:0]",
        ":DOCKER-ISOLATION-STAGE-2 - [0:0]",
        ":DOCKER-USER - [0:0]",
        "-A FORWARD -j DOCKER-USER",
        "-A FORWARD -j DOCKER-ISOLATION-STAGE-1",
        "-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A FORWARD -o docker0 -j DOCKER",
        "-A FORWARD -i docker0 ! -o docker0 -j ACCEPT",
        "-A FORWARD -i docker0 -o docker0 -j ACCEPT",
    ]
    filt += [
        f"-A DOCKER -d {container_ip}/32 ! -i docker0 -o docker0 -p {proto} -m {proto} --dport {port} -j ACCEPT"
        for port, proto in PUBLISHED
    ]
    filt += [
        "-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2",
        "-A DOCKER-ISOLATION-STAGE-1 -j RETURN",
        "-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP",
        "-A DOCKER-ISOLATION-STAGE-2 -j RETURN",
        "-A DOCKER-USER -j RETURN",
        "COMMIT",
    ]
    nat = [
        "*nat",
        ":DOCKER - [0:0]",
        "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
        "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
        f"-A POSTROUTING -s {DOCKER_NET}.0/16 ! -o docker0 -j MASQUERADE",
    ]
    nat += [
        f"-A POSTROUTING -s {container_ip}/32 -d {container_ip}/32 -p {proto} -m {proto} --dport {port} -j MASQUERADE"
        for port, proto in PUBLISHED
    ]
    nat += ["-A DOCKER -i docker0 -j RETURN"]
    nat += [
        f"-A DOCKER ! -i docker0 -p {proto} -m {proto} --dport {port} -j DNAT --to-destination {container_ip}:{port}"
        for port, proto in PUBLISHED
    ]
    nat += ["COMMIT"]
    return "\n".join(filt + nat) + "\n"


def build_docker_nat(lab):
    out = []
    container_ip = f"{DOCKER_NET}.2"
    for index in (21, 22):
        host, host_ip = lab.host(index)
        lab.sh(host, "ip link add docker0 type bridge")
        lab.sh(host, f"ip addr add {DOCKER_NET}.1/16 dev docker0")
        lab.sh(host, "ip link set docker0 up")
        ctr = lab.container()
        lab.link(ctr, host, f"{container_ip}/16", "eth0", "veth0")
        lab.sh(host, "ip link set veth0 master docker0")
        lab.sh(ctr, f"ip route add default via {DOCKER_NET}.1")
        lab.sh(host, "iptables-restore -w 5 --noflush", input=docker_rules(container_ip))
        out.append((host, host_ip, ctr))
    (_, _, client), (_, server_host_ip, server) = out
    return [
        Path(
            "docker-nat",
            "Docker bridge + published port (emulated)",
            "Emulation of `docker run -p`: docker0 bridge and a veth per container on each host, with the "
            "filter and nat rules Docker 20.10 writes (DOCKER chains, DNAT of the published ports, MASQUERADE "
            "of the client container's traffic). Client container → server host's fabric address → DNAT → "
            "server container. Not real dockerd; no br_netfilter (the path is routed, not bridged).",
            client,
            server,
            container_ip,
            server_host_ip,
        )
    ]


def build_vxlan(lab):
    hosts = [lab.host(31, forward=False), lab.host(32, forward=False)]
    ctrs = []
    for i, (host, ip) in enumerate(hosts):
        peer_ip = hosts[1 - i][1]
        lab.sh(host, f"ip link add vxlan0 type vxlan id 42 local {ip} remote {peer_ip} dstport 4789 dev eth0")
        lab.sh(host, "ip link add vxbr0 type bridge")
        lab.sh(host, "ip link set vxlan0 master vxbr0")
        lab.sh(host, "ip link set vxlan0 up")
        lab.sh(host, "ip link set vxbr0 up")
        ctr = lab.container()
        lab.link(ctr, host, f"{VXLAN_NET}.{i + 1}/24", "eth0", "vh0")
        lab.sh(ctr, "ip link set eth0 mtu 1450")
        lab.sh(host, "ip link set vh0 mtu 1450")
        lab.sh(host, "ip link set vh0 master vxbr0")
        ctrs.append(ctr)
    return [
        Path(
            "vxlan",
            "kernel VXLAN overlay",
            "Containers on a Linux bridge with a vxlan device (VNI 42, UDP 4789, unicast to the other host) "
            "on each host: one L2 segment over the fabric, container MTU 1450, as Docker overlay and flannel "
            "vxlan use.",
            ctrs[0],
            ctrs[1],
            f"{VXLAN_NET}.2",
            f"{VXLAN_NET}.2",
        )
    ]


def cni_ptp_add(lab, host, ctr, subnet, data_dir):
    conf = {
        "cniVersion": "1.0.0",
        "name": "benchptp",
        "type": "ptp",
        "ipMasq": False,
        "mtu": 1500,
        "ipam": {"type": "host-local", "subnet": subnet, "dataDir": data_dir, "routes": [{"dst": "0.0.0.0/0"}]},
    }
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": ctr,
        "CNI_NETNS": f"/run/netns/{ctr}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": CNI_DIR,
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    }
    p = system.run(
        system.in_ns(host, [os.path.join(CNI_DIR, "ptp")]),
        f"CNI ptp ADD in {host}",
        check=False,
        input=json.dumps(conf),
        env=env,
        timeout=30,
    )
    if p.returncode != 0:
        raise RuntimeError(f"CNI ptp ADD in {host} failed (rc={p.returncode}): {(p.stdout + p.stderr).strip()[-300:]}")
    return json.loads(p.stdout)["ips"][0]["address"].split("/")[0]


def build_ptp(lab):
    if not os.access(os.path.join(CNI_DIR, "ptp"), os.X_OK):
        raise RuntimeError(f"{CNI_DIR}/ptp not found: install Debian's containernetworking-plugins")
    hosts = [lab.host(41), lab.host(42)]
    ctrs, ips = [], []
    for i, (host, _) in enumerate(hosts):
        ctr = lab.container()
        ips.append(cni_ptp_add(lab, host, ctr, PTP_SUBNETS[i], os.path.join(lab.workdir, f"host-local{i}")))
        ctrs.append(ctr)
    for i, (host, _) in enumerate(hosts):
        lab.sh(host, f"ip route add {PTP_SUBNETS[1 - i]} via {hosts[1 - i][1]}")
    if not wait_ping(lab, ctrs[0], ips[1], timeout=10):
        raise RuntimeError("ptp containers on two hosts cannot reach each other")
    return [
        Path(
            "ptp",
            "CNI ptp + host-local",
            "The reference CNI `ptp` plugin with `host-local` IPAM (Debian's containernetworking-plugins): a "
            "veth per container with a /32 on the host side, one /24 per host, routes between hosts set by "
            "hand, no iptables (ipMasq off).",
            ctrs[0],
            ctrs[1],
            ips[1],
            ips[1],
        )
    ]


BUILDERS = {
    "host": lambda lab, cleanup: build_host(lab),
    "netplugin": build_netplugin,
    "docker-nat": lambda lab, cleanup: build_docker_nat(lab),
    "vxlan": lambda lab, cleanup: build_vxlan(lab),
    "ptp": lambda lab, cleanup: build_ptp(lab),
}
