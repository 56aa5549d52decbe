#!/usr/bin/env python3
"""Route convergence: time from a CNI ADD on one host until the new container answers pings from every other host.

For each scenario a lab is built (netplugin/lab), then containers are started one after another, round-robin over
the hosts, through the real CNI binary. Right before each ADD the clock starts; right after it, every other host's
prober (one long-lived process per host namespace, netplugin/lab/prober.py) starts pinging the new address every
20 ms and reports when the first reply arrived. A container's convergence time is the latest of those arrivals.

Only the first container on a host claims a new address block, so only those ADDs wait for BGP (or direct
routes) to carry a new route; later containers fall inside a block every host already routes. The table reports
both kinds separately, and how much of the time passed after the ADD had returned (the rest is the ADD itself).
It also gives the resident memory of the agent and of BIRD per host.

    sudo .venv/bin/python scripts/bench_convergence.py                       # mesh:5, mesh:20, rr:50:2
    sudo .venv/bin/python scripts/bench_convergence.py --scenario mesh:5 --containers 50

Bounded: every probe gives up after --probe-timeout, each scenario after --scenario-timeout, and Ctrl-C or SIGTERM
removes the lab being measured.
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netplugin.errors import NetpluginError  # noqa: E402
from netplugin.lab import Lab, LabSpec  # noqa: E402
from netplugin.lab import system  # noqa: E402

PROBER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "netplugin", "lab", "prober.py")
BLOCK_PREFIX = 26  # the pool's default block size


class ScenarioTimeout(Exception):
    pass


def parse_scenario(text):
    """'mesh:N' or 'rr:N:K' (K route reflectors) or 'direct:N'."""
    parts = text.split(":")
    try:
        if parts[0] == "mesh" and len(parts) == 2:
            return {"label": f"mesh, {parts[1]} hosts", "hosts": int(parts[1]), "route_reflectors": 0,
                    "routing": "bgp"}
        if parts[0] == "rr" and len(parts) == 3:
            return {"label": f"{parts[2]} RRs, {parts[1]} hosts", "hosts": int(parts[1]),
                    "route_reflectors": int(parts[2]), "routing": "bgp"}
        if parts[0] == "direct" and len(parts) == 2:
            return {"label": f"direct, {parts[1]} hosts", "hosts": int(parts[1]), "route_reflectors": 0,
                    "routing": "direct"}
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"scenario {text!r}: use mesh:N, rr:N:K or direct:N")


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Probers:
    """One prober per host namespace; ``reach(address, hosts)`` asks all of them at once."""

    def __init__(self, lab):
        self.procs = {}
        for h in lab.live_hosts():
            self.procs[h.name] = subprocess.Popen(
                system.in_ns(h.namespace, [sys.executable, "-I", PROBER]), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True, bufsize=1)
        for name, p in self.procs.items():
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"prober on {name} did not start")

    def reach(self, address, hosts, timeout):
        """{host: arrival time (monotonic) or None}."""
        for h in hosts:
            self.procs[h].stdin.write(f"{address} {timeout}\n")
        out = {}
        for h in hosts:
            parts = self.procs[h].stdout.readline().split()
            out[h] = float(parts[2]) if parts and parts[0] == "ok" else None
        return out

    def close(self):
        for p in self.procs.values():
            try:
                p.stdin.close()
            except OSError:
                pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def memory(lab):
    """(agent RSS KiB list, BIRD RSS KiB list) over live hosts."""
    agents, birds = [], []
    procs = {p["role"]: p for p in lab.state.data["processes"]}
    for h in lab.live_hosts():
        agent = procs.get(f"agent {h.name}")
        if agent and system.alive(agent["pid"], agent["start"]):
            agents.append(system.rss_kib(agent["pid"]))
        try:
            with open(os.path.join(h.run_dir, "bird", "bird.pid")) as f:
                birds.append(system.rss_kib(int(f.read().strip())))
        except (OSError, ValueError):
            pass
    return [a for a in agents if a], [b for b in birds if b]


def run_scenario(sc, containers, probe_timeout, budget, log):
    name = f"bench{sc['hosts']}"
    if Lab.exists(name):
        Lab.destroy(name)
    started = time.monotonic()
    deadline = started + budget
    lab = Lab.up(LabSpec(name=name, hosts=sc["hosts"], route_reflectors=sc["route_reflectors"],
                         routing=sc["routing"]), converge_timeout=max(60, 3 * sc["hosts"]))
    probers = None
    try:
        up_s = time.monotonic() - started
        log(f"  lab up in {up_s:.1f}s; starting {containers} containers")
        probers = Probers(lab)
        hosts = [h.name for h in lab.live_hosts()]
        adds, conv, after_add, conv_new, conv_old, failures = [], [], [], [], [], 0
        blocks = set()
        for i in range(containers):
            if time.monotonic() > deadline:
                raise ScenarioTimeout(f"scenario budget of {budget:.0f}s used up after {i} containers")
            host = hosts[i % len(hosts)]
            t0 = time.monotonic()
            rec = lab.run_container(host, f"b{i}")
            t_add = time.monotonic() - t0
            others = [h for h in hosts if h != host]
            arrivals = probers.reach(rec["ip"], others, probe_timeout)
            block = _block(rec["ip"])
            new_block = block not in blocks
            blocks.add(block)
            adds.append(t_add)
            if any(t is None for t in arrivals.values()):
                failures += 1
                log(f"  {rec['name']} ({rec['ip']} on {host}): not reachable from "
                    f"{sorted(h for h, t in arrivals.items() if t is None)} within {probe_timeout}s")
                continue
            c = max(arrivals.values()) - t0 if arrivals else t_add
            conv.append(c)
            after_add.append(c - t_add)
            (conv_new if new_block else conv_old).append(c)
        agent_kib, bird_kib = memory(lab)
        return {"label": sc["label"], "hosts": sc["hosts"], "containers": containers, "up_s": up_s,
                "add": adds, "conv": conv, "after_add": after_add, "conv_new": conv_new, "conv_old": conv_old,
                "failures": failures,
                "agent_kib": agent_kib, "bird_kib": bird_kib, "sessions": _sessions(lab)}
    finally:
        if probers:
            probers.close()
        lab.down()


def _block(ip):
    import ipaddress
    return str(ipaddress.ip_network(f"{ip}/{BLOCK_PREFIX}", strict=False))


def _sessions(lab):
    if lab.plan.spec.routing != "bgp":
        return 0
    return sum(lab.expected_sessions(h) for h in lab.live_hosts()) // 2


def ms(v):
    return "-" if v is None else f"{v * 1000:.0f}"


def mib(values, fn):
    return "-" if not values else f"{fn(values) / 1024:.0f}"


def table(results):
    head = ["scenario", "BGP sessions", "lab up (s)", "ADD p50/p99 (ms)", "pingable p50/p99 (ms)",
            "after ADD returned p50/p99 (ms)",
            "new block p50/max (ms) [n]", "in block p50/p99 (ms) [n]", "unreached",
            "agent RSS mean/max (MiB)", "BIRD RSS mean/max (MiB)"]
    rows = []
    for r in results:
        rows.append([
            r["label"], str(r["sessions"]), f"{r['up_s']:.1f}",
            f"{ms(percentile(r['add'], 50))} / {ms(percentile(r['add'], 99))}",
            f"{ms(percentile(r['conv'], 50))} / {ms(percentile(r['conv'], 99))}",
            f"{ms(percentile(r['after_add'], 50))} / {ms(percentile(r['after_add'], 99))}",
            f"{ms(percentile(r['conv_new'], 50))} / {ms(max(r['conv_new'], default=None))} [{len(r['conv_new'])}]",
            f"{ms(percentile(r['conv_old'], 50))} / {ms(percentile(r['conv_old'], 99))} [{len(r['conv_old'])}]",
            f"{r['failures']}/{r['containers']}",
            f"{mib(r['agent_kib'], statistics.mean)} / {mib(r['agent_kib'], max)}",
            f"{mib(r['bird_kib'], statistics.mean)} / {mib(r['bird_kib'], max)}",
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", action="append", type=parse_scenario,
                   help="mesh:N, rr:N:K or direct:N (repeatable; default mesh:5, mesh:20, rr:50:2)")
    p.add_argument("--containers", type=int, default=50)
    p.add_argument("--probe-timeout", type=float, default=30.0, help="Seconds one reachability probe may take.")
    p.add_argument("--scenario-timeout", type=float, default=600.0, help="Seconds one scenario may take.")
    args = p.parse_args(argv)
    scenarios = args.scenario or [parse_scenario(s) for s in ("mesh:5", "mesh:20", "rr:50:2")]
    if os.geteuid() != 0:
        print("bench_convergence: needs root (network namespaces)", file=sys.stderr)
        return 1

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    def log(line):
        print(line, file=sys.stderr, flush=True)

    results = []
    try:
        for sc in scenarios:
            log(f"{sc['label']}:")
            try:
                results.append(run_scenario(sc, args.containers, args.probe_timeout, args.scenario_timeout, log))
            except (NetpluginError, ScenarioTimeout, RuntimeError) as e:
                log(f"  failed: {getattr(e, 'msg', e)}")
    except KeyboardInterrupt:
        log("interrupted; the lab was removed")
    if results:
        print(table(results))
    return 0 if results and len(results) == len(scenarios) else 1


if __name__ == "__main__":
    sys.exit(main())
