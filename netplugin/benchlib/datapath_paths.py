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
from collections.abc import Callable
from dataclasses import dataclass

from netplugin.benchlib import tools
from netplugin.benchlib.parse import parse_snmp
from netplugin.benchlib.policy_bench import distinct_cidrs
from netplugin.kernel.bpf import loader, records
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
    counters: Callable[[], dict] | None = None  # the path's own packet counters (bpf: np_counters per end)


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
        self.lab_hosts = {}  # dataplane -> the host namespaces of that netplugin lab

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
        return system.list_netns(self.prefix) + [
            ns for suffix in DATAPLANE_LAB.values() for ns in system.list_netns(ns_prefix(self.name + suffix))
        ]

    def forwarded(self):
        """{dataplane: {host namespace: packets its kernel IP-forwarded so far}} of the netplugin labs (a
        redirect skips the kernel's forwarding, so the bpf lab's count shows how much traffic took the stack)."""
        return {
            dp: {ns: parse_snmp(self.sh(ns, "cat /proc/net/snmp").stdout, "Ip", "ForwDatagrams") for ns in hosts}
            for dp, hosts in self.lab_hosts.items()
        }

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


# The container pairs of a netplugin lab, each h1 → h2 (client on h1, servers on h2): what policy covers them.
CASES = ("policy", "nopolicy", "cidr10k")
PAIR_LABELS = {"bench": "pair"}  # both ends of the "policy" pair
CIDR_LABELS = {"bench": "cidr10k"}  # the receiver of the "cidr10k" pair
CIDR_COUNT = 10_000


def policy_doc(name, labels, **spec):
    """A netplugin/v1 Policy named ``name`` selecting endpoints with ``labels``, with the rest of its ``spec``."""
    return {
        "apiVersion": "netplugin/v1",
        "kind": "Policy",
        "metadata": {"name": name},
        "spec": {"order": 10, "selector": {"matchLabels": dict(labels)}, **spec},
    }


def pair_policy():
    """Selects both containers of the "policy" pair and allows their traffic, each way, and nothing else."""
    peers = [{"selector": {"matchLabels": dict(PAIR_LABELS)}}]
    return policy_doc(
        "bench-pair",
        PAIR_LABELS,
        types=["Ingress", "Egress"],
        ingress=[{"action": "allow", "from": peers}],
        egress=[{"action": "allow", "to": peers}],
    )


def cidr_policy(sender_ip, count=CIDR_COUNT):
    """Selects the "cidr10k" receiver; its one allow rule lists ``count`` CIDRs, the sender's /32 among them
    (in the middle, so neither end of the list is the match)."""
    cidrs = distinct_cidrs(count - 1)
    cidrs.insert(len(cidrs) // 2, f"{sender_ip}/32")
    return policy_doc("bench-cidr10k", CIDR_LABELS, ingress=[{"action": "allow", "from": [{"cidr": c} for c in cidrs]}])


def build_netplugin(lab, cleanup, dataplane="iptables", cases=CASES, one_host=True):
    """A two-host lab (netplugin/lab: etcd, BIRD and an agent per host, --routing bgp, ``dataplane``; bpf pins
    on the lab's own bpffs) with one container pair h1 → h2 per case in ``cases``, plus (``one_host``) a second
    container on h1 for the one-host path. Policies are applied through ``netctl`` and proven in force before
    anything is measured: the pair's ends reach each other, a container outside the policy does not."""
    spec = LabSpec(
        name=lab.name + DATAPLANE_LAB[dataplane], hosts=2, routing="bgp", pool=NETPLUGIN_POOL, dataplane=dataplane
    )
    cleanup.push(f"remove lab {spec.name}", Lab.destroy, spec.name, log)
    cluster = Lab.up(spec, out=log)
    if dataplane == "bpf":
        check_dataplane(cluster, dataplane)
    labels = {"policy": (PAIR_LABELS, PAIR_LABELS), "nopolicy": ({}, {}), "cidr10k": ({}, CIDR_LABELS)}
    pairs = {}
    for case in cases:
        s_labels, r_labels = labels[case]
        pairs[case] = tuple(
            cluster.run_container(host, f"{case}-{end}", labels=lbl)
            for host, end, lbl in (("h1", "s", s_labels), ("h2", "r", r_labels))
        )
    outsider = cluster.run_container("h1", "outsider")
    docs = [pair_policy()] if "policy" in cases else []
    if "cidr10k" in cases:
        docs.append(cidr_policy(pairs["cidr10k"][0]["ip"]))
    for doc in docs:
        cluster.netctl("policy", "apply", "-f", "-", input=json.dumps(doc), echo=False)
    for case, (snd, rcv) in pairs.items():
        if not wait_ping(lab, snd["netns"], rcv["ip"], timeout=60):
            raise RuntimeError(
                f"netplugin ({dataplane}) {case} containers on two hosts cannot reach each other after 60 s; see "
                f"{cluster.plan.state_dir}/hosts/*/agent.log"
            )
        if case != "nopolicy" and not wait_refused(lab, outsider["netns"], rcv["ip"], timeout=60):
            raise RuntimeError(f"netplugin ({dataplane}) {case}: the policy does not stop a container outside it")
    lab.lab_hosts[dataplane] = [h.namespace for h in cluster.plan.hosts]
    if dataplane == "iptables":
        lab.netplugin = {
            "hosts": [h.namespace for h in cluster.plan.hosts],
            "agents": [cluster.agent_pid(h.name) for h in cluster.plan.hosts],
        }  # for --diagnose
    counters = None
    if dataplane == "bpf":
        pins = [cluster.plan.host_bpffs(h) for h in cluster.plan.hosts]
    paths = []
    for case, (snd, rcv) in pairs.items():
        if dataplane == "bpf":
            counters = endpoint_counters_reader({"sender": (pins[0], snd["ip"]), "receiver": (pins[1], rcv["ip"])})
        pid, label, what = CASE_PATHS[dataplane][case]
        paths.append(Path(pid, label, what, snd["netns"], rcv["netns"], rcv["ip"], rcv["ip"], counters))
    if one_host and dataplane == "iptables" and "nopolicy" in pairs:
        c3 = cluster.run_container("h1", "one-host")
        snd = pairs["nopolicy"][0]
        paths.append(
            Path(
                "netplugin-1h",
                "netplugin, 1 host",
                "Two containers on the same host: veth → host routing → veth, policy chains as above.",
                c3["netns"],
                snd["netns"],
                snd["ip"],
                snd["ip"],
            )
        )
    return paths


DATAPLANE_LAB = {"iptables": "n", "bpf": "b"}  # lab name suffix per dataplane
_SHAPE = "a veth per container with a /32 route, proxy-ARP gateway, host blocks learned over BGP from BIRD"
_BPF = (
    "tc programs on the host veths and the fabric interface (--dataplane bpf, pins on the lab's own bpffs): "
    "anti-spoofing and policy in BPF, forwarding by bpf_redirect_peer / FIB lookup + redirect where the "
    "programs decide, the stack for what they hand back"
)
CASE_PATHS = {
    "iptables": {
        "nopolicy": (
            "netplugin-2h",
            "netplugin iptables, 2 hosts, no policy",
            f"Containers on two hosts: {_SHAPE}; per-endpoint iptables chains with the default (allow within "
            "the network); no policy selects them.",
        ),
        "policy": (
            "netplugin-iptables",
            "netplugin iptables, 2 hosts, policy",
            "As above, with a policy selecting both containers that allows their traffic (ingress and egress, "
            "peers by label selector, an ipset), enforced by the iptables chains with conntrack.",
        ),
        "cidr10k": (
            "netplugin-iptables-10k",
            "netplugin iptables, 10,000 CIDRs",
            f"As the no-policy pair, but a policy selects the receiver with one allow rule listing {CIDR_COUNT:,} "
            "CIDRs, the sender's /32 among them (one hash:net ipset behind one rule).",
        ),
    },
    "bpf": {
        "nopolicy": (
            "netplugin-bpf-nopolicy",
            "netplugin bpf, 2 hosts, no policy",
            f"Containers on two hosts: {_SHAPE}; {_BPF}; no policy selects them (the network's default).",
        ),
        "policy": (
            "netplugin-bpf",
            "netplugin bpf, 2 hosts, policy",
            f"Containers on two hosts: {_SHAPE}; {_BPF}; a policy selecting both containers allows their traffic.",
        ),
        "cidr10k": (
            "netplugin-bpf-10k",
            "netplugin bpf, 10,000 CIDRs",
            f"As the bpf no-policy pair, but a policy selects the receiver with one allow rule listing "
            f"{CIDR_COUNT:,} CIDRs, the sender's /32 among them (LPM entries in np_pol_peers, looked up once per flow).",
        ),
    },
}


def check_dataplane(cluster, dataplane):
    """Every agent of ``cluster`` says it runs ``dataplane``: a silent fallback would measure the wrong thing."""
    for h in cluster.plan.hosts:
        with open(os.path.join(h.run_dir, "agent.log"), errors="replace") as f:
            text = f.read()
        if f"event=dataplane.selected dataplane={dataplane}" not in text:
            line = next((ln for ln in text.splitlines() if "event=dataplane.selected" in ln), "no selection line")
            raise RuntimeError(f"the agent on {h.name} does not run the {dataplane} dataplane: {line}")


def endpoint_counters_reader(ends):
    """A function returning {end: np_counters of the endpoint with that address} for ``ends`` = {end: (pin
    directory of its host, address)}; None for an end the maps do not hold."""

    def read():
        return {end: bpf_counters(pin_dir, address) for end, (pin_dir, address) in ends.items()}

    return read


def bpf_counters(pin_dir, address):
    """The summed per-CPU np_counters of the endpoint that owns ``address`` in one host's pinned maps, or None."""
    pins = loader.Pins(pin_dir)
    ep_id = None
    with pins.map("np_endpoints") as m:
        for key in m.keys():
            value = m.lookup(key)
            if value is not None and address in records.endpoint_entry(key, value)["addresses"]:
                ep_id = records.endpoint_entry(key, value)["id"]
    if ep_id is None:
        return None
    with pins.map("np_counters") as m:
        raw = m.lookup(records.ifindex_key(ep_id))
    return records.counters(raw) if raw else None


def wait_refused(lab, ns, target, timeout):
    """True once ``ns`` no longer gets an answer from ``target`` (a policy is in force), within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.sh(ns, f"ping -c1 -W1 {target}", check=False).returncode != 0:
            return True
        time.sleep(0.5)
    return False


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
    "netplugin-bpf": lambda lab, cleanup: build_netplugin(lab, cleanup, dataplane="bpf"),
    "docker-nat": lambda lab, cleanup: build_docker_nat(lab),
    "vxlan": lambda lab, cleanup: build_vxlan(lab),
    "ptp": lambda lab, cleanup: build_ptp(lab),
}
