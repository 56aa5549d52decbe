#!/usr/bin/env python3
"""Policy at scale through the real agents: packet cost, apply and resync time, and propagation to 5 hosts.

Everything runs in one throwaway lab (netplugin/lab: its own etcd, a fabric bridge, five host namespaces each
running ``netplugin agent --routing direct``), with containers made by the real CNI plugin.

1. Packet cost. A client container on host1 and a server on host2 (one network), under five configurations run
   interleaved (round r starts at a rotated position): no policy; a policy denying 1,000 / 10,000 source CIDRs
   on the server (one ipset behind one rule, applied with ``netctl policy apply``); and the same CIDRs as a plain
   linear chain of ``-s CIDR -j DROP`` rules that every packet to the server crosses (jumped to from FORWARD on
   host2, the way a hand-written firewall does it). Per run: iperf3 TCP throughput (``--iperf-seconds``) and new
   TCP connections per second (a Python client: connect, reset; bounded by ``--conn-seconds`` and a count).
   Medians over ``--rounds``, and ratios to the no-policy median.
2. Apply: from starting ``netctl policy apply`` (10,000 CIDRs) to host2's agent having finished the sync that
   wrote it (its log line's timestamp), and the agent's own sync time.
3. Full resync of 10,000 rules: host2's agent restarted with ``--resync-interval 1``: its start-up sync, steady
   periodic full resyncs (nothing to repair), and one repair after our chain and set were flushed by hand.
4. Propagation: a prober container on host1 sends UDP to a target container on each of the 5 hosts every 2 ms;
   each apply opens a new port for it, so the first echo from a target is the moment that host enforces the
   change. Measured from the etcd commit (seen by a watch here) and from starting ``netctl``; p50/p99 over
   ``--applies`` (netplugin/benchlib/stats.py: p99 of 20 samples lies between the two largest; the maximum is
   reported beside it).

Bounded throughout (every subprocess has a timeout, every loop a count and a deadline); Ctrl-C or SIGTERM
cleans up (agents, namespaces, etcd, temp files).

    sudo .venv/bin/python scripts/bench_policy.py [--rounds 3] [--applies 20] [--rules 1000,10000]

Why one script of about 500 lines: it is the benchmark's three measurements and their report; the lab view it
drives lives in netplugin/benchlib/policy_bench.py.
"""

import argparse
import ast
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from netplugin.benchlib.policy_bench import PolicyBench, distinct_cidrs
from netplugin.benchlib.stats import median, percentile
from netplugin.errors import NetpluginError
from netplugin.lab import Lab, LabSpec, system
from netplugin.lab.netns import stop_process
from policy.compiler import policy_chain

POOL = "10.30.0.0/16"
LINEAR = "bench-linear"  # not np-: the agent must neither own nor remove it
IPERF_PORT, CONN_PORT, PROBE_PORT = 5201, 5002, 9000

CONN_SERVER = (
    r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", %d)); s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""
    % CONN_PORT
)

CONN_CLIENT = (
    r"""
import json, socket, struct, sys, time
dst, seconds, limit = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
reset = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT piling up across runs
done = failed = 0
t0 = time.monotonic(); end = t0 + seconds
while done + failed < limit and time.monotonic() < end:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset); s.settimeout(1)
    try:
        s.connect((dst, %d)); done += 1
    except OSError:
        failed += 1
    s.close()
print(json.dumps({"done": done, "failed": failed, "seconds": time.monotonic() - t0}))
"""
    % CONN_PORT
)

ECHO = r"""
import select, socket, sys
socks = []
for port in range(int(sys.argv[1]), int(sys.argv[2])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port)); socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(64); s.sendto(data, peer)
"""

# Reads "PORT LIMIT" lines; sends to every target every 2 ms until each echoed once (or LIMIT seconds), then
# prints {target: monotonic time of its first echo}. CLOCK_MONOTONIC is shared by every network namespace.
PROBER = r"""
import json, select, socket, sys, time
targets = sys.argv[1].split(",")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
print("ready", flush=True)
for line in sys.stdin:
    port, limit = int(line.split()[0]), float(line.split()[1])
    tag = b"p%d" % port
    first = {}
    end = time.monotonic() + limit
    next_send = time.monotonic()
    print("sending", flush=True)
    while len(first) < len(targets) and time.monotonic() < end:
        if time.monotonic() >= next_send:
            for t in targets:
                if t not in first:
                    s.sendto(tag, (t, port))
            next_send += 0.002
        if select.select([s], [], [], max(0.0, next_send - time.monotonic()))[0]:
            while True:
                try:
                    data, addr = s.recvfrom(64)
                except BlockingIOError:
                    break
                if data == tag and addr[1] == port and addr[0] not in first:
                    first[addr[0]] = time.monotonic()
    print(json.dumps(first), flush=True)
"""


class Interrupted(Exception):
    pass


def _on_term(*_):
    raise KeyboardInterrupt


def deny_policy(name, n):
    rule = {"action": "deny", "from": [{"cidr": c} for c in distinct_cidrs(n)]}
    return json.dumps(
        {
            "apiVersion": "netplugin/v1",
            "kind": "Policy",
            "metadata": {"name": name},
            "spec": {
                "order": 10,
                "selector": {"matchLabels": {"role": "server"}},
                "ingress": [rule, {"action": "allow"}],
            },
        }
    )


def policy_file(lab, n):
    path = os.path.join(lab.workdir, f"deny-{n}.yaml")  # JSON is YAML
    with open(path, "w") as f:
        f.write(deny_policy("bench-deny", n))
    return path


class Configs:
    """Switches host2 between the packet-cost configurations; only one is in force at a time."""

    def __init__(self, lab, sizes):
        self.lab = lab
        self.sizes = sizes
        self.current = "none"
        self.apply_times = {}  # n -> [(seconds from netctl start to enforced, agent sync ms, {phase: ms})]
        self.policy_files = {n: policy_file(lab, n) for n in sizes}

    @property
    def names(self):
        return ["none"] + [f"policy-{n}" for n in self.sizes] + [f"linear-{n}" for n in self.sizes]

    def switch(self, name):
        if name == self.current:
            return
        lab = self.lab
        if self.current.startswith("linear-"):
            lab.sh(2, ["iptables", "-D", "FORWARD", "-o", lab.ep["S"]["host_ifname"], "-j", LINEAR])
            lab.sh(2, ["iptables", "-F", LINEAR])
            lab.sh(2, ["iptables", "-X", LINEAR])
        if self.current.startswith("policy-") and not name.startswith("policy-"):
            lab.netctl("policy", "delete", "bench-deny")
            lab.wait_sync(2, lab.changes.last_relevant())
        if name.startswith("policy-"):
            n = int(name.split("-")[1])
            t0 = time.time()
            lab.netctl("policy", "apply", "-f", self.policy_files[n])
            enforced, took_ms, lines = lab.wait_sync(2, lab.changes.last_relevant())
            phases = [
                ast.literal_eval(m.group(1))
                for m in (re.search(r"event=policy.applied .*timings=(\{.*\})", line) for line in lines)
                if m
            ]
            self.apply_times.setdefault(n, []).append((enforced - t0, took_ms, phases[-1] if phases else {}))
            # Confirm the kernel holds it: one set of n members behind the server's ingress.
            sets = lab.sh(2, ["ipset", "list", "-t"]).stdout
            if f"Number of entries: {n}\n" not in sets:
                raise RuntimeError(f"host2 holds no ipset of {n} entries after applying {name}")
        if name.startswith("linear-"):
            n = int(name.split("-")[1])
            batch = ["*filter", f":{LINEAR} - [0:0]"] + [f"-A {LINEAR} -s {c} -j DROP" for c in distinct_cidrs(n)]
            batch += [f"-I FORWARD 1 -o {lab.ep['S']['host_ifname']} -j {LINEAR}", "COMMIT"]
            lab.sh(2, ["iptables-restore", "--noflush", "-w", "5"], input="\n".join(batch) + "\n", timeout=60)
        self.current = name


def iperf(lab, seconds):
    p = system.ns_run(
        lab.ns["C"],
        ["iperf3", "-c", lab.ip["S"], "-p", str(IPERF_PORT), "-t", str(seconds), "-l", "128K", "-J"],
        "iperf3 in C",
        timeout=seconds + 20,
    )
    return json.loads(p.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9


def conn_rate(lab, seconds, limit=20000):
    p = system.ns_run(
        lab.ns["C"],
        [sys.executable, "-c", CONN_CLIENT, lab.ip["S"], str(seconds), str(limit)],
        "the connection client in C",
        timeout=seconds + 30,
    )
    r = json.loads(p.stdout)
    if r["failed"]:
        raise RuntimeError(f"{r['failed']} connections failed: the benchmark traffic must not be denied")
    return r["done"] / r["seconds"]


def packet_cost(lab, args, sizes):
    configs = Configs(lab, sizes)
    results = {name: {"gbps": [], "cps": []} for name in configs.names}
    order = configs.names
    for r in range(args.rounds):
        rotated = order[r % len(order) :] + order[: r % len(order)]
        for name in rotated:
            configs.switch(name)
            results[name]["gbps"].append(iperf(lab, args.iperf_seconds))
            results[name]["cps"].append(conn_rate(lab, args.conn_seconds))
            print(
                f"  round {r + 1} {name:13s} {results[name]['gbps'][-1]:6.2f} Gbit/s"
                f" {results[name]['cps'][-1]:7.0f} conn/s",
                file=sys.stderr,
                flush=True,
            )
    configs.switch("none")
    return results, configs.apply_times


def full_resync(lab, n):
    """Restart host2's agent with a 1 s resync and time its full syncs with ``n`` rules in the kernel."""
    lab.netctl("policy", "apply", "-f", policy_file(lab, n))
    lab.wait_sync(2, lab.changes.last_relevant())
    lab.restart_agent(2, resync=1.0)
    _, startup_ms, _ = lab.wait_sync(2, lab.changes.last_relevant())
    steady = [ms for ms, _ in lab.wait_full_syncs(2, 4, timeout=30)]
    # Repair: right after a full sync, flush our policy chain and empty our big set by hand.
    lab.wait_full_syncs(2, 1, timeout=10)
    chain = policy_chain("bench-deny", "Ingress")
    big = [name for name in lab.sh(2, ["ipset", "list", "-n"]).stdout.split() if name.startswith("np-cidr-")]
    lab.sh(2, ["iptables", "-F", chain])
    for name in big:
        lab.sh(2, ["ipset", "flush", name])
    [(repair_ms, lines)] = lab.wait_full_syncs(2, 1, timeout=10)
    applied = [line for line in lines if "event=policy.applied" in line]
    if not applied:
        raise RuntimeError("the full resync after flushing did not repair anything")
    if f"Number of entries: {n}\n" not in lab.sh(2, ["ipset", "list", "-t"]).stdout:
        raise RuntimeError("the full resync did not refill the flushed set")
    lab.netctl("policy", "delete", "bench-deny")
    lab.wait_sync(2, lab.changes.last_relevant())
    return {"startup": startup_ms, "steady": steady, "repair": repair_ms, "repair_log": applied[0]}


def propagation(lab, applies):
    targets = [f"T{i}" for i in range(1, lab.hosts + 1)]
    prober = lab.daemon("P", [sys.executable, "-c", PROBER, ",".join(lab.ip[t] for t in targets)])
    try:
        from_commit, from_cli = [], []
        for i in range(applies + 1):  # the first one warms caches and is not counted
            port = PROBE_PORT + i
            text = (
                "apiVersion: netplugin/v1\nkind: Policy\nmetadata: {name: prop}\nspec:\n"
                "  selector: {matchLabels: {role: target}}\n"
                f"  ingress: [{{action: allow, protocol: udp, ports: [{port}],"
                " from: [{selector: {matchLabels: {role: prober}}}]}]\n"
            )
            prober.stdin.write(f"{port} 10\n")
            prober.stdin.flush()
            if prober.stdout.readline().strip() != "sending":
                raise RuntimeError("prober stopped")
            time.sleep(0.05)  # probes are flowing (and being dropped) before the change
            t0 = time.monotonic()
            lab.netctl("policy", "apply", "-f", "-", stdin=text)
            first = json.loads(prober.stdout.readline())
            if len(first) != len(targets):
                raise RuntimeError(f"apply {i}: only {sorted(first)} of {len(targets)} hosts enforced in 10 s")
            commit = lab.changes.commit_after(t0)
            last = max(first.values())
            if min(first.values()) < t0:
                raise RuntimeError(f"apply {i}: a target answered before the change was applied")
            if i:
                from_commit.append(last - commit)
                from_cli.append(last - t0)
            time.sleep(0.1)
        return from_commit, from_cli
    finally:
        stop_process(prober, signal.SIGKILL)


def report_packets(results, apply_times, rounds, aims):
    base = results["none"]
    rows = []
    for name, r in results.items():
        g, c = median(r["gbps"]), median(r["cps"])
        paired_g = median([x / b for x, b in zip(r["gbps"], base["gbps"])])
        paired_c = median([x / b for x, b in zip(r["cps"], base["cps"])])
        rows.append(
            [
                name,
                f"{g:.2f}",
                f"{g / median(base['gbps']):.2f}",
                f"{paired_g:.2f}",
                f"{c:.0f}",
                f"{c / median(base['cps']):.2f}",
                f"{paired_c:.2f}",
            ]
        )
    most = max(apply_times)
    ratio = median(results[f"policy-{most}"]["gbps"]) / median(base["gbps"])
    aims.append((f"TCP throughput with {most} rules >= 0.95 of no policy", f"{ratio:.2f}", ratio >= 0.95))
    out = [
        f"### Packet cost (host1 -> host2, medians of {rounds} interleaved rounds)\n\n"
        "ratio: median / median of no policy; paired: median over rounds of the run / the same round's no-policy"
        " run.\n\n" + table(rows, ["configuration", "TCP Gbit/s", "ratio", "paired", "new conn/s", "ratio", "paired"])
    ]
    rows = []
    for n, v in sorted(apply_times.items()):
        phases = {k: median([p.get(k, 0.0) for _, _, p in v]) for k in ("compile", "ipset", "IPv4")}
        rows.append(
            [
                n,
                len(v),
                f"{median([a for a, _, _ in v]) * 1000:.0f}",
                f"{median([b for _, b, _ in v]):.0f}",
                " / ".join(f"{phases[k]:.0f}" for k in ("compile", "ipset", "IPv4")),
            ]
        )
    out.append(
        "### Apply (netctl start -> host2 enforced; medians)\n\n"
        + table(rows, ["CIDRs", "applies", "ms", "agent sync ms", "of which parse+compile / ipset / iptables ms"])
    )
    return out


def report_resync(rs, n, aims):
    worst = max(median(rs["steady"]), rs["repair"])
    aims.append((f"full resync of {n} rules < 2 s", f"{worst:.0f} ms (slower of steady, repair)", worst < 2000))
    return [
        f"### Full resync with {n} rules in the kernel (host2's agent, whole sync pass)\n\n"
        + table(
            [
                ["agent start-up (full)", f"{rs['startup']:.0f}"],
                ["periodic, nothing to repair (median of 4)", f"{median(rs['steady']):.0f}"],
                ["periodic, after chain + set flushed by hand", f"{rs['repair']:.0f}"],
            ],
            ["sync", "ms"],
        )
        + f"\n\nrepair: `{rs['repair_log'].split(' logger=')[1]}`"
    ]


def report_propagation(from_commit, from_cli, hosts, aims):
    p99 = percentile(from_commit, 99) * 1000
    aims.append((f"propagation p99 <= 200 ms ({hosts} hosts, from the etcd commit)", f"{p99:.0f} ms", p99 <= 200))
    rows = [
        [
            "etcd commit -> last host enforcing",
            f"{percentile(from_commit, 50) * 1000:.0f}",
            f"{p99:.0f}",
            f"{max(from_commit) * 1000:.0f}",
        ],
        [
            "`netctl policy apply` start -> last host",
            f"{percentile(from_cli, 50) * 1000:.0f}",
            f"{percentile(from_cli, 99) * 1000:.0f}",
            f"{max(from_cli) * 1000:.0f}",
        ],
    ]
    return [
        f"### Propagation to {hosts} hosts ({len(from_commit)} applies)\n\n"
        + table(rows, ["measured from", "p50 ms", "p99 ms", "max ms"])
    ]


def table(rows, header):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def build_lab(stack, args, workdir):
    """``args.hosts`` hosts in one lab (netplugin/lab, ``--routing direct``); client C (host1) and server S (host2)
    on one network; prober P (host1) and a target Ti on every host, on two other networks; servers in S and the
    targets."""
    spec = LabSpec(name=f"bpol{os.getpid() % 100000}", hosts=args.hosts, routing="direct", pool=POOL)
    stack.callback(Lab.destroy, spec.name, progress)  # up removes a half-built lab itself; this covers the rest
    lab = PolicyBench(stack, Lab.up(spec, out=progress), workdir)
    lab.container("C", 1, "bench", {"role": "client"})
    lab.container("S", 2, "bench", {"role": "server"})
    lab.container("P", 1, "probe", {"role": "prober"})
    for i in range(1, args.hosts + 1):
        lab.container(f"T{i}", i, "tgt", {"role": "target"})
        lab.daemon(f"T{i}", [sys.executable, "-c", ECHO, str(PROBE_PORT), str(PROBE_PORT + args.applies + 1)])
    lab.daemon("S", [sys.executable, "-c", CONN_SERVER])
    iperf_server = subprocess.Popen(
        system.in_ns(lab.ns["S"], ["iperf3", "-s", "-p", str(IPERF_PORT)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(stop_process, iperf_server, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while f":{IPERF_PORT} " not in system.ns_run(lab.ns["S"], ["ss", "-ltnH"], "listing sockets in S").stdout:
        if time.monotonic() > deadline or iperf_server.poll() is not None:
            raise RuntimeError("iperf3 -s did not start")
        time.sleep(0.05)
    lab.wait_sync(2, lab.changes.last_relevant())
    return lab


def progress(line):
    print(line, file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rules", default="1000,10000", help="comma-separated rule counts")
    parser.add_argument("--iperf-seconds", type=int, default=2)
    parser.add_argument("--conn-seconds", type=float, default=1.5)
    parser.add_argument("--applies", type=int, default=20)
    parser.add_argument("--hosts", type=int, default=5)
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: packets,resync,propagation")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_policy: needs root (it makes network namespaces)")
    sizes = [int(n) for n in args.rules.split(",") if n]
    skip = set(args.skip.split(","))
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)  # also when started in the background with SIGINT ignored
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="npt-bench-policy-")
    report, aims = [], []
    with contextlib.ExitStack() as stack:
        stack.callback(subprocess.run, ["rm", "-rf", workdir])
        try:
            print(f"setting up {args.hosts} hosts ...", file=sys.stderr, flush=True)
            lab = build_lab(stack, args, workdir)
            if "packets" not in skip:
                print("packet cost ...", file=sys.stderr, flush=True)
                report += report_packets(*packet_cost(lab, args, sizes), args.rounds, aims)
            if "resync" not in skip:
                print(f"full resync of {max(sizes)} rules ...", file=sys.stderr, flush=True)
                report += report_resync(full_resync(lab, max(sizes)), max(sizes), aims)
            if "propagation" not in skip:
                print(f"propagation to {args.hosts} hosts x {args.applies} ...", file=sys.stderr, flush=True)
                report += report_propagation(*propagation(lab, args.applies), args.hosts, aims)
        except KeyboardInterrupt:
            print("interrupted: cleaning up", file=sys.stderr)
            raise SystemExit(130) from None
        except (RuntimeError, NetpluginError) as e:
            print(f"bench_policy: {e}; cleaning up", file=sys.stderr)
            raise SystemExit(1) from None
    if aims:
        report.append(
            "### Aims\n\n"
            + table([[a, m, "met" if ok else "**missed**"] for a, m, ok in aims], ["aim", "measured", ""])
        )
    print("\n\n".join(report))
    print(f"\n(total {time.monotonic() - started:.0f} s; load average {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
    main()
