#!/usr/bin/env python3
"""Data path benchmark: netplugin's routed containers against host networking and what a user would pick instead.

Builds, on one fabric bridge in a namespace, a pair of host namespaces per technology (so no technology's rules
tax another's traffic) and measures, in interleaved rounds:

  host          iperf3/sockperf between two host namespaces' fabric addresses (the baseline)
  netplugin-2h  netplugin containers on two hosts: real agents (--routing bgp, BIRD), CNI ADD via the plugin binary
  netplugin-1h  two netplugin containers on one host
  docker-nat    Docker's bridge + published port, emulated: docker0 bridge, veths and Docker's own iptables rules
  vxlan         kernel VXLAN overlay: containers on a bridge with a vxlan device on each host, MTU 1450
  ptp           the reference CNI ptp plugin + host-local IPAM (/usr/lib/cni), routes between hosts set by hand

Run as root with the project's virtualenv: ``.venv/bin/python scripts/bench_datapath.py`` (``--quick`` for a
short smoke run, ``--render docs/benchmarks/datapath.json`` to redraw the report from saved results). Every
namespace, process and file it makes is removed at the end, also on Ctrl-C or SIGTERM.
"""
import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from netplugin.benchlib import datapath_metrics, datapath_report, machine, stats, tools  # noqa: E402
from netplugin.benchlib.markdown import fmt_num  # noqa: E402
from netplugin.benchlib.cleanup import CleanupStack, Interrupted  # noqa: E402
from netplugin.errors import NetpluginError  # noqa: E402
from netplugin.lab import Lab, LabSpec, system  # noqa: E402
from netplugin.lab.plan import ns_prefix  # noqa: E402
from netplugin.lab.topology import add_bridge, plug_host  # noqa: E402
from policy.compiler import CompileOptions  # noqa: E402

FABRIC_PREFIX = "10.77.0"  # fabric addresses: only ever inside the namespaces this script makes
NETPLUGIN_POOL = "10.20.0.0/16"
PTP_SUBNETS = ("10.30.1.0/24", "10.30.2.0/24")
VXLAN_NET = "10.99.0"
DOCKER_NET = "172.17.0"
CNI_DIR = "/usr/lib/cni"
PUBLISHED = ((tools.IPERF3_PORT, "tcp"), (tools.IPERF3_PORT, "udp"), (tools.SOCKPERF_PORT, "tcp"))
MAX_CONSECUTIVE_FAILURES = 4
NCPU = len(os.sched_getaffinity(0))


@dataclass
class Path:
    id: str
    label: str
    description: str
    client_ns: str
    server_ns: str
    bind: str     # the address the servers listen on (inside server_ns)
    target: str   # the address the client connects to (differs from bind behind NAT)


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
    return [Path("host", "host ↔ host (host networking)",
                 "iperf3/sockperf between the fabric addresses of two host namespaces: one veth pair each into the "
                 "fabric bridge, no container, no rules.", b1, b2, ip2, ip2)]


def build_netplugin(lab, cleanup):
    """A two-host lab (netplugin/lab: etcd, BIRD and an agent per host, --routing bgp) and three containers made
    through the CNI binary: two on the first host, one on the second."""
    spec = LabSpec(name=lab.name + "n", hosts=2, routing="bgp", pool=NETPLUGIN_POOL)
    cleanup.push(f"remove lab {spec.name}", Lab.destroy, spec.name, log)
    cluster = Lab.up(spec, out=log)
    (c1, ip1), (c2, ip2), (c3, _) = [(rec["netns"], rec["ip"]) for rec in (
        cluster.run_container(host, name) for host, name in (("h1", "c1"), ("h2", "c2"), ("h1", "c3")))]
    lab.netplugin = {"hosts": [h.namespace for h in cluster.plan.hosts],
                     "agents": [cluster.agent_pid(h.name) for h in cluster.plan.hosts]}  # for --diagnose
    if not wait_ping(lab, c1, ip2, timeout=60):
        raise RuntimeError(f"netplugin containers on two hosts cannot reach each other after 60 s; see "
                           f"{cluster.plan.state_dir}/hosts/*/agent.log")
    return [
        Path("netplugin-2h", "netplugin, 2 hosts (BGP)",
             "Containers on two hosts: a veth per container with a /32 route, proxy-ARP gateway, per-endpoint "
             "policy chains (the default allow within the network), host blocks learned over BGP from BIRD.",
             c1, c2, ip2, ip2),
        Path("netplugin-1h", "netplugin, 1 host",
             "Two containers on the same host: veth → host routing → veth, policy chains as above.",
             c3, c1, ip1, ip1),
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
        "*filter", ":FORWARD DROP [0:0]", ":DOCKER - [0:0]", ":DOCKER-ISOLATION-STAGE-1 - [0:0]",
        ":DOCKER-ISOLATION-STAGE-2 - [0:0]", ":DOCKER-USER - [0:0]",
        "-A FORWARD -j DOCKER-USER",
        "-A FORWARD -j DOCKER-ISOLATION-STAGE-1",
        "-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A FORWARD -o docker0 -j DOCKER",
        "-A FORWARD -i docker0 ! -o docker0 -j ACCEPT",
        "-A FORWARD -i docker0 -o docker0 -j ACCEPT",
    ]
    filt += [f"-A DOCKER -d {container_ip}/32 ! -i docker0 -o docker0 -p {proto} -m {proto} --dport {port} -j ACCEPT"
             for port, proto in PUBLISHED]
    filt += [
        "-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2",
        "-A DOCKER-ISOLATION-STAGE-1 -j RETURN",
        "-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP",
        "-A DOCKER-ISOLATION-STAGE-2 -j RETURN",
        "-A DOCKER-USER -j RETURN",
        "COMMIT",
    ]
    nat = [
        "*nat", ":DOCKER - [0:0]",
        "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
        "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
        f"-A POSTROUTING -s {DOCKER_NET}.0/16 ! -o docker0 -j MASQUERADE",
    ]
    nat += [f"-A POSTROUTING -s {container_ip}/32 -d {container_ip}/32 -p {proto} -m {proto} --dport {port} "
            f"-j MASQUERADE" for port, proto in PUBLISHED]
    nat += ["-A DOCKER -i docker0 -j RETURN"]
    nat += [f"-A DOCKER ! -i docker0 -p {proto} -m {proto} --dport {port} -j DNAT "
            f"--to-destination {container_ip}:{port}" for port, proto in PUBLISHED]
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
    return [Path("docker-nat", "Docker bridge + published port (emulated)",
                 "Emulation of `docker run -p`: docker0 bridge and a veth per container on each host, with the "
                 "filter and nat rules Docker 20.10 writes (DOCKER chains, DNAT of the published ports, MASQUERADE "
                 "of the client container's traffic). Client container → server host's fabric address → DNAT → "
                 "server container. Not real dockerd; no br_netfilter (the path is routed, not bridged).",
                 client, server, container_ip, server_host_ip)]


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
    return [Path("vxlan", "kernel VXLAN overlay",
                 "Containers on a Linux bridge with a vxlan device (VNI 42, UDP 4789, unicast to the other host) "
                 "on each host: one L2 segment over the fabric, container MTU 1450, as Docker overlay and flannel "
                 "vxlan use.", ctrs[0], ctrs[1], f"{VXLAN_NET}.2", f"{VXLAN_NET}.2")]


def cni_ptp_add(lab, host, ctr, subnet, data_dir):
    conf = {"cniVersion": "1.0.0", "name": "benchptp", "type": "ptp", "ipMasq": False, "mtu": 1500,
            "ipam": {"type": "host-local", "subnet": subnet, "dataDir": data_dir,
                     "routes": [{"dst": "0.0.0.0/0"}]}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": ctr, "CNI_NETNS": f"/run/netns/{ctr}", "CNI_IFNAME": "eth0",
           "CNI_PATH": CNI_DIR, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    p = system.run(system.in_ns(host, [os.path.join(CNI_DIR, "ptp")]), f"CNI ptp ADD in {host}", check=False,
                   input=json.dumps(conf), env=env, timeout=30)
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
    return [Path("ptp", "CNI ptp + host-local",
                 "The reference CNI `ptp` plugin with `host-local` IPAM (Debian's containernetworking-plugins): a "
                 "veth per container with a /32 on the host side, one /24 per host, routes between hosts set by "
                 "hand, no iptables (ipMasq off).", ctrs[0], ctrs[1], ips[1], ips[1])]


# --- measurement -------------------------------------------------------------------------------------------------

TESTS = [("tcp", n) for n in datapath_metrics.TCP_SIZES] + [("udp", n) for n in datapath_metrics.UDP_SIZES] \
    + [("lat", None)]


class Servers:
    """iperf3 and sockperf servers per path; an iperf3 server is restarted after a failed test."""

    def __init__(self, lab):
        self.lab = lab
        self.iperf = {}
        self.sockperf = {}

    def start(self, path):
        self.start_iperf(path)
        self.sockperf[path.id] = self.lab.spawn(f"sockperf server for {path.id}",
                                                lambda: tools.start_sockperf_server(path.server_ns, path.bind))
        for port in (tools.IPERF3_PORT, tools.SOCKPERF_PORT):
            if not tools.wait_listening(path.server_ns, port):
                raise RuntimeError(f"server on port {port} for path {path.id} did not start")

    def start_iperf(self, path):
        self.iperf[path.id] = self.lab.spawn(f"iperf3 server for {path.id}",
                                             lambda: tools.start_iperf3_server(path.server_ns, path.bind))

    def restart_iperf(self, path):
        proc = self.iperf.get(path.id)
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        self.start_iperf(path)
        tools.wait_listening(path.server_ns, tools.IPERF3_PORT)


def run_one(path, kind, size, args, servers=None, cpu=None):
    """One test: returns {metric_id: value}. A latency test pins both ends to ``cpu`` (see tools.pin)."""
    if kind == "tcp":
        r = tools.iperf3_tcp(path.client_ns, path.target, size, args.duration)
        out = {f"tcp_{size}": r["bps"] / 1e9,
               f"cpu_tcp_{size}": stats.seconds_per_gb(r["cpu_busy_s"], r["bytes"])}
        if size == 131072:
            procs = None
            if r["cpu_host_pct"] is not None and r["cpu_remote_pct"] is not None:
                procs = (r["cpu_host_pct"] + r["cpu_remote_pct"]) / 100.0 * r["seconds"]
            out["cpu_iperf_tcp_131072"] = stats.seconds_per_gb(procs, r["bytes"])
            out["retrans_tcp_131072"] = r["retransmits"]
        return out
    if kind == "udp":
        r = tools.iperf3_udp(path.client_ns, path.target, size, args.duration, args.udp_bandwidth)
        return {f"udp_{size}_rate": r["recv_bps"] / 1e9, f"udp_{size}_loss": r["loss_percent"]}
    if cpu is not None:
        tools.pin(servers.sockperf[path.id].pid, cpu)
    r = tools.sockperf_tcp_pingpong(path.client_ns, path.target, args.duration, cpu=cpu)
    return {"lat_avg": r["avg_us"], "lat_p50": r["p50_us"], "lat_p99": r["p99_us"]}


def measure(paths, servers, args, doc, started):
    rounds = args.rounds
    samples = {p.id: {m.id: [None] * rounds for m in datapath_metrics.METRICS} for p in paths}
    doc["samples"] = samples
    errors = doc["errors"]
    failures = {p.id: 0 for p in paths}
    deadline = started + args.max_minutes * 60
    for r in range(rounds):
        for ti, (kind, size) in enumerate(TESTS):
            for path in stats.rotated(paths, r + ti):
                if time.monotonic() > deadline:
                    doc["complete"] = False
                    doc["note"] = f"stopped at the {args.max_minutes}-minute budget during round {r + 1}"
                    return r
                name = f"{kind}{'' if size is None else ' ' + str(size)}"
                if failures[path.id] >= MAX_CONSECUTIVE_FAILURES:
                    continue
                try:
                    values = run_one(path, kind, size, args, servers, cpu=r % NCPU)
                except (ValueError, subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
                    failures[path.id] += 1
                    msg = f"round {r + 1}, {name}, {path.id}: {str(e).splitlines()[0][:200]}"
                    errors.append(msg)
                    log(f"  ! {msg}")
                    if kind != "lat":
                        servers.restart_iperf(path)
                    if failures[path.id] == MAX_CONSECUTIVE_FAILURES:
                        errors.append(f"{path.id}: {MAX_CONSECUTIVE_FAILURES} failures in a row, path skipped")
                    continue
                failures[path.id] = 0
                for mid, v in values.items():
                    samples[path.id][mid][r] = v
                log(f"[{fmt_elapsed(time.monotonic() - started)}] round {r + 1}/{rounds} {name:<9} "
                    f"{path.id:<13} {short(values)}")
    return rounds


def short(values):
    parts = []
    for mid, v in values.items():
        if v is None or mid.startswith(("cpu_iperf", "retrans")):
            continue
        unit = datapath_metrics.METRIC_BY_ID[mid].unit
        parts.append(f"{mid}={fmt_num(v)}{'' if unit == '%' else ' '}{unit}")
    return "  ".join(parts)


def fmt_elapsed(seconds):
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


# --- diagnosis ---------------------------------------------------------------------------------------------------

# nft texts for the states below (nft 1.0.6 wants ';' after a one-line chain's closing brace).
CT_ONLY_NFT = ("table ip npdiag { chain out { type filter hook output priority 0; "
               "ct state established accept; }; }\n")
EMPTY_CHAIN_NFT = "table ip npdiag { chain forward { type filter hook forward priority 0; }; }\n"
FLOWTABLE_PROBE_DEV = "npdiagprobe0"


def flowtable_nft(devices):
    """The candidate fast path: a flowtable on the host's veths and uplink, fed by a forward chain that runs after
    iptables' filter chain, so only flows the policy accepted (and conntrack saw established) are offloaded."""
    devs = ", ".join(f'"{d}"' for d in sorted(devices))
    return (f"table inet npdiag {{\n  flowtable ft {{ hook ingress priority 0; devices = {{ {devs} }}; }}\n"
            f"  chain forward {{ type filter hook forward priority filter + 10; policy accept;\n"
            f"    ct state established flow add @ft\n  }}\n}}\n")


def flowtable_support(lab, ns):
    """(supported, reason): ask the kernel with ``nft -c`` (check only, nothing is committed) in ``ns``."""
    dev = FLOWTABLE_PROBE_DEV
    lab.sh(ns, f"ip link add {dev} type veth peer name {dev}p")
    try:
        p = lab.sh(ns, "nft -c -f -", input=flowtable_nft([dev]), check=False)
    finally:
        lab.sh(ns, f"ip link del {dev}", check=False)
    if p.returncode == 0:
        return True, "the kernel accepts flowtables"
    err = (p.stderr or p.stdout).strip().splitlines()
    first = err[0].split("Error: ", 1)[-1] if err else f"exit status {p.returncode}"
    return False, f"`nft` answers '{first}' to a flowtable{kernel_config_note('CONFIG_NF_FLOW_TABLE')}"


def kernel_config_note(option):
    """', and the kernel is built without OPTION' when /proc/config.gz says so; else ''."""
    import gzip
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            unset = f"# {option} is not set" in f.read()
    except OSError:
        return ""
    return f": the kernel is built without {option}" if unset else ""


def host_devices(lab, ns):
    """Every device of a netplugin host but lo: its container veths (np*) and its uplink (eth0)."""
    out = []
    for line in lab.sh(ns, "ip -o link show").stdout.splitlines():
        dev = line.split(":")[1].strip().split("@")[0]
        if dev != "lo":
            out.append(dev)
    return out


def _reset(lab, saved, strict_rpf=True):
    """Every netfilter table of the host emptied, then the agent's rules as saved put back."""
    for ns in lab.netplugin["hosts"]:
        lab.sh(ns, "nft flush ruleset")
        lab.sh(ns, "iptables-restore -w 5", input=saved[ns][0])
        lab.sh(ns, "ip6tables-restore -w 5", input=saved[ns][1])
        _rp_filter(lab, ns, strict_rpf)


def _flush(lab, strict_rpf=True, nft=None):
    for ns in lab.netplugin["hosts"]:
        lab.sh(ns, "nft flush ruleset")
        if nft:
            lab.sh(ns, "nft -f -", input=nft)
        _rp_filter(lab, ns, strict_rpf)


def _rp_filter(lab, ns, strict):
    for dev in host_devices(lab, ns):
        if dev.startswith("np"):
            lab.sh(ns, f"sysctl -qw net.ipv4.conf.{dev}.rp_filter={1 if strict else 0}")


def _ct_first(lab, saved):
    _reset(lab, saved)
    for ns in lab.netplugin["hosts"]:
        lab.sh(ns, "iptables -w 5 -I FORWARD 1 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")


# The conntrack mark bit netplugin's policy sets on connections it accepted (policy/compiler.py).
FAST_CTMARK = f"{CompileOptions().accepted_mark:#x}"
FAST_ACCEPT = f"-m connmark --mark {FAST_CTMARK}/{FAST_CTMARK} -j ACCEPT"


def _ct_mark(lab, saved):
    """As built, with the policy's fast-accept rule (the first of np-FORWARD: packets of connections it accepted
    before) also at the very top of FORWARD, one jump earlier. Other writers' traffic is untouched."""
    _reset(lab, saved)
    for ns in lab.netplugin["hosts"]:
        lab.sh(ns, f"iptables -w 5 -I FORWARD 1 {FAST_ACCEPT}")


def _ct_mark_hits(lab):
    """Packets the fast-accept rule took on each host (proof that established flows stopped there)."""
    out = {}
    for ns in lab.netplugin["hosts"]:
        first = lab.sh(ns, "iptables -w 5 -L FORWARD 1 -v -x -n").stdout.split()
        out[ns] = int(first[0]) if first and first[0].isdigit() else None
    return out


def _notrack(lab, saved):
    _reset(lab, saved)
    for ns in lab.netplugin["hosts"]:
        for chain in ("PREROUTING", "OUTPUT"):
            lab.sh(ns, f"iptables -w 5 -t raw -I {chain} 1 -j NOTRACK")


def _flowtable(lab, saved):
    _reset(lab, saved)
    for ns in lab.netplugin["hosts"]:
        lab.sh(ns, "nft -f -", input=flowtable_nft(host_devices(lab, ns)))


@dataclass(frozen=True)
class DiagState:
    id: str
    label: str
    description: str
    apply: object  # (lab, saved) -> None


# Ordered from the full cost to none: the first is as built, the last has nothing of netplugin's per-packet work.
DIAG_STATES = (
    DiagState("as-built", "as built", "netplugin's iptables rules (policy chains, the conntrack they use) and strict "
              "rp_filter on the host veths, as the agent made them", _reset),
    DiagState("flowtable", "as built + flowtable", "as built, plus an nftables flowtable on the host's veths and "
              "uplink, fed by a forward chain after iptables' filter chain (`ct state established flow add`): the "
              "software fast path for established, policy-accepted flows", _flowtable),
    DiagState("ct-mark", "fast accept in FORWARD", "as built, with the policy's fast-accept rule (packets of "
              "connections its chains accepted before, by their conntrack mark; today the first rule of np-FORWARD) "
              "also at the top of FORWARD itself, one jump earlier (others' traffic untouched)", _ct_mark),
    DiagState("ct-first", "conntrack + one rule", "as built, plus one rule at the top of FORWARD accepting "
              "established flows: the least per-packet work a conntrack-based policy can do (a layout for "
              "comparison, not what the policy writes)", _ct_first),
    DiagState("notrack", "as built, untracked", "as built, plus NOTRACK for every IPv4 packet in the raw table: "
              "the policy chains run in full for every packet (no established shortcut) and conntrack does nothing "
              "(what keeping traffic out of conntrack costs with today's chains)", _notrack),
    DiagState("ct-only", "conntrack, no filter chain", "every rule removed, conntrack kept on (its hooks held by "
              "one rule on the output hook, which forwarded packets never reach)",
              lambda lab, saved: _flush(lab, nft=CT_ONLY_NFT)),
    DiagState("empty-chain", "one empty forward chain", "every rule removed and no conntrack, but one empty filter "
              "chain on the forward hook: what one netfilter hook costs by itself",
              lambda lab, saved: _flush(lab, nft=EMPTY_CHAIN_NFT)),
    DiagState("no-rules", "no netfilter rules", "every netfilter table flushed on both hosts (no conntrack, no "
              "hooks); rp_filter still strict", lambda lab, saved: _flush(lab)),
    DiagState("bare", "no rules, no rp_filter", "as above, and rp_filter off on the host veths",
              lambda lab, saved: _flush(lab, strict_rpf=False)),
)
DIAG_STATE_IDS = tuple(st.id for st in DIAG_STATES)


def diagnose(args):
    """Host, netplugin across hosts and ptp, with netplugin's hosts switched between DIAG_STATES each round."""
    import signal
    started = time.monotonic()
    doc = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
           "machine": machine.machine_info(tools=("iperf3", "sockperf")),
           "settings": {"rounds": args.rounds, "duration_s": args.duration, "latency_pinned": True},
           "baseline": "host"}
    with CleanupStack() as cleanup:
        lab = Testbed(cleanup)
        paths = [p for p in build_host(lab) + build_netplugin(lab, cleanup) + build_ptp(lab) if p.id != "netplugin-1h"]
        states = [st for st in DIAG_STATES if st.id in args.states]
        if any(st.id == "flowtable" for st in states):
            supported, reason = flowtable_support(lab, lab.netplugin["hosts"][0])
            doc["flowtable"] = {"supported": supported, "reason": reason}
            if not supported:
                log(f"flowtable state skipped: {reason}")
                states = [st for st in states if st.id != "flowtable"]
        doc["states"] = [{"id": st.id, "label": st.label, "description": st.description} for st in states]
        servers = Servers(lab)
        for p in paths:
            servers.start(p)
        agent_pids = lab.netplugin["agents"]
        cleanup.push("resume agents", lambda: [os.kill(pid, signal.SIGCONT) for pid in agent_pids])
        for pid in agent_pids:
            os.kill(pid, signal.SIGSTOP)  # so they do not put back what a state removes
        saved = {ns: (lab.sh(ns, "iptables-save").stdout, lab.sh(ns, "ip6tables-save").stdout)
                 for ns in lab.netplugin["hosts"]}
        doc["paths"] = [{"id": p.id, "label": p.label, "description": p.description} for p in paths]
        metrics = ("tcp_131072", "lat_avg", "lat_p50", "lat_p99")
        samples = {st.id: {p.id: {m: [None] * args.rounds for m in metrics} for p in paths} for st in states}
        doc["samples"] = samples
        deadline = started + args.max_minutes * 60
        for r in range(args.rounds):
            for st in stats.rotated(states, r):
                st.apply(lab, saved)
                for path in stats.rotated(paths, r):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"diagnosis exceeded {args.max_minutes} minutes")
                    for kind, size in (("tcp", 131072), ("lat", None)):
                        try:
                            values = run_one(path, kind, size, args, servers, cpu=r % NCPU)
                        except (ValueError, subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
                            log(f"  ! round {r + 1}, {st.id}, {path.id}: {str(e).splitlines()[0][:200]}")
                            if kind == "tcp":
                                servers.restart_iperf(path)
                            continue
                        for mid in metrics:
                            if mid in values:
                                samples[st.id][path.id][mid][r] = values[mid]
                        log(f"[{fmt_elapsed(time.monotonic() - started)}] round {r + 1}/{args.rounds} {st.id:<11} "
                            f"{path.id:<13} {short({k: v for k, v in values.items() if k in metrics})}")
                if st.id == "ct-mark":  # read before the next state resets the counters
                    doc["ct_mark_hits"] = _ct_mark_hits(lab)
        if "flowtable" in samples:
            doc["flowtable"]["offloaded"] = {ns: lab.sh(ns, "nft list flowtable inet npdiag ft", check=False).stdout
                                             for ns in lab.netplugin["hosts"]}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "datapath-diagnosis.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.output_dir, "datapath-diagnosis.md"), "w") as f:
        f.write(datapath_report.render_diagnosis(doc))
    for line in datapath_report.diagnosis_lines(doc):
        print(line)
    print(f"report: {args.output_dir}/datapath-diagnosis.md")
    return 0


# --- main ---------------------------------------------------------------------------------------------------------

BUILDERS = {
    "host": lambda lab, cleanup: build_host(lab),
    "netplugin": build_netplugin,
    "docker-nat": lambda lab, cleanup: build_docker_nat(lab),
    "vxlan": lambda lab, cleanup: build_vxlan(lab),
    "ptp": lambda lab, cleanup: build_ptp(lab),
}


def write_report(doc, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "datapath.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    png = os.path.join(out_dir, "datapath.png")
    problem = datapath_report.render_chart(doc, png)
    diagnosis = None
    diag_path = os.path.join(out_dir, "datapath-diagnosis.json")
    if os.path.exists(diag_path):
        with open(diag_path) as f:
            diagnosis = json.load(f)
    md = datapath_report.render_markdown(doc, chart_file=None if problem else "datapath.png", diagnosis=diagnosis)
    with open(os.path.join(out_dir, "datapath.md"), "w") as f:
        f.write(md)
    return problem


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--duration", type=int, default=2, help="seconds per test (default 2)")
    ap.add_argument("--udp-bandwidth", default="1G", help="offered UDP rate, iperf3 -b syntax (default 1G)")
    ap.add_argument("--paths", default=",".join(BUILDERS),
                    help=f"comma-separated subset of {','.join(BUILDERS)} (host is always included)")
    ap.add_argument("--max-minutes", type=float, default=20.0, help="stop measuring after this long (default 20)")
    ap.add_argument("--output-dir", default=os.path.join(REPO, "docs", "benchmarks"))
    ap.add_argument("--quick", action="store_true", help="2 rounds of 1 s tests: a smoke run")
    ap.add_argument("--render", metavar="JSON", help="only redraw datapath.md/.png from saved results")
    ap.add_argument("--diagnose", action="store_true",
                    help="instead: host, netplugin (2 hosts) and ptp with netplugin's hosts switched between states "
                         "from as built to no netfilter at all (see --states; writes datapath-diagnosis.md; default "
                         "6 rounds)")
    ap.add_argument("--states", default=",".join(DIAG_STATE_IDS),
                    help=f"with --diagnose: comma-separated subset of {','.join(DIAG_STATE_IDS)} (in that order; "
                         f"flowtable is skipped when the kernel lacks flowtables)")
    args = ap.parse_args(argv)
    args.states = [s.strip() for s in args.states.split(",") if s.strip()]
    bad = [s for s in args.states if s not in DIAG_STATE_IDS]
    if bad or not args.states:
        ap.error(f"unknown state(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(DIAG_STATE_IDS)}")
    if args.diagnose and "--rounds" not in (argv if argv is not None else sys.argv):
        args.rounds = 6
    if args.quick:
        args.rounds, args.duration = 2, 1
    if not 1 <= args.rounds <= 50 or not 1 <= args.duration <= 30:
        ap.error("--rounds must be 1..50 and --duration 1..30")
    chosen = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in BUILDERS]
    if unknown:
        ap.error(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")
    args.paths = ["host"] + [p for p in chosen if p != "host"]
    return args


def preflight():
    if os.geteuid() != 0:
        sys.exit("bench_datapath: must run as root (it creates network namespaces)")
    missing = [t for t in ("iperf3", "sockperf", "socat", "bird", "iptables-restore", "nft") if not shutil.which(t)]
    if missing:
        sys.exit(f"bench_datapath: missing tools: {', '.join(missing)} (see scripts/setup.sh)")
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "netplugin")):
        sys.exit("bench_datapath: run with the project's virtualenv: .venv/bin/python scripts/bench_datapath.py")


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            doc = json.load(f)
        problem = write_report(doc, args.output_dir)
        log(f"rendered {args.output_dir}/datapath.md" + (f" ({problem})" if problem else " and datapath.png"))
        return 0
    preflight()
    if args.diagnose:
        try:
            return diagnose(args)
        except Interrupted as e:
            log(f"bench_datapath: {e}; cleaned up")
            return 130
        except (RuntimeError, AssertionError, OSError, NetpluginError) as e:
            log(f"bench_datapath: diagnosis failed: {e}")
            return 1
    started = time.monotonic()
    doc = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine.machine_info(tools=("iperf3", "sockperf")),
        "settings": {"rounds": args.rounds, "duration_s": args.duration, "udp_bandwidth": args.udp_bandwidth,
                     "quick": args.quick, "latency_pinned": True},
        "baseline": "host", "complete": True, "errors": [], "paths": [], "samples": {},
    }
    lab = None
    try:
        with CleanupStack() as cleanup:
            lab = Testbed(cleanup)
            paths = []
            for name in args.paths:
                t0 = time.monotonic()
                paths += BUILDERS[name](lab, cleanup)
                log(f"[{fmt_elapsed(time.monotonic() - started)}] built {name} in {time.monotonic() - t0:.1f} s")
            servers = Servers(lab)
            for p in paths:
                servers.start(p)
            doc["paths"] = [{"id": p.id, "label": p.label, "description": p.description} for p in paths]
            rounds_done = measure(paths, servers, args, doc, started)
            doc["settings"]["rounds_done"] = rounds_done
    except Interrupted as e:
        log(f"bench_datapath: {e}; cleaned up")
        return 130
    except (RuntimeError, AssertionError, OSError, NetpluginError) as e:
        log(f"bench_datapath: failed: {e}")
        return 1
    finally:
        left = lab.leftovers() if lab else []
        if left:
            log(f"bench_datapath: WARNING: namespaces left behind: {' '.join(left)}")
    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    doc["machine"]["loadavg_end"] = machine.load_average()
    problem = write_report(doc, args.output_dir)
    for line in datapath_report.summary_lines(doc):
        print(line)
    print(f"report: {args.output_dir}/datapath.md" + (f"; no chart: {problem}" if problem else " and datapath.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
