#!/usr/bin/env python3
"""Route convergence: time from a CNI ADD on one host until the new container answers pings from every other host.

For each scenario a lab is built (netplugin/lab), then containers are started one after another, round-robin over
the hosts, through the real CNI binary. Right before each ADD the clock starts; right after it, every other host's
prober (one long-lived process per host namespace, netplugin/lab/prober.py) starts pinging the new address every
20 ms and reports when the first reply arrived. A container's convergence time is the latest of those arrivals.

Only the first container on a host claims a new address block, so only those ADDs wait for BGP (or direct
routes) to carry a new route; later containers fall inside a block every host already routes. The table reports
both kinds separately, and how much of the time passed after the ADD had returned (the rest is the ADD itself).
It also gives the resident memory of the agent and of BIRD per host, and, once the containers are up, the etcd
requests per second per agent while nothing happens (--idle seconds; the liveness beat and the election). A
second table gives what one host costs: its agent's start-up (seconds from spawn to API socket, CPU seconds
until the lab was up, etcd requests), agent and BIRD CPU at idle, the machine's memory per host (MemAvailable
before the lab minus after the containers) and etcd's database size. The lab starts a few agents at a time
(netplugin/lab/topology.py), at a pace the machine and etcd sustain.

The hosts' neighbours on the fabric are pinned as permanent ARP entries before any agent starts
(``pin_neighbours``: the lab's hosts share one kernel's ARP table, which overflows at 50 hosts with containers,
and at 200 hosts with route reflectors from the BGP sessions alone); ``--dynamic-neighbours`` measures without
that.

    sudo .venv/bin/python scripts/bench_convergence.py                       # mesh:5, mesh:20, rr:50:2
    sudo .venv/bin/python scripts/bench_convergence.py --scenario mesh:5 --containers 50
    sudo .venv/bin/python scripts/bench_convergence.py --scenario rr:50:2 --containers 20 --profile /tmp/prof

``--profile DIR`` also writes, per scenario, where CPU went while the containers were started (agents with their
child processes, BIRD, etcd, socat bridges) and what the agents' logs say they did (sync passes and their
duration, policy applies, BIRD reconfigurations), plus the agents' logs of that phase.

Bounded: every probe gives up after --probe-timeout, each scenario after --scenario-timeout, and Ctrl-C or SIGTERM
removes the lab being measured.

Why one script of about 460 lines: the scenarios, the clock around each ADD and the report belong together; the
prober, neighbour pinning and statistics live in netplugin/lab and netplugin/benchlib.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netplugin.benchlib.neighbours import pin_neighbours
from netplugin.benchlib.reach import stop
from netplugin.benchlib.stats import percentile
from netplugin.errors import NetpluginError
from netplugin.lab import Lab, LabSpec
from netplugin.lab.etcd import db_size as etcd_db_size
from netplugin.lab.etcd import requests_served
from netplugin.lab import system

PROBER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "netplugin", "lab", "prober.py")
BLOCK_PREFIX = 26  # the pool's default block size


class ScenarioTimeout(Exception):
    pass


def parse_scenario(text):
    """'mesh:N' or 'rr:N:K' (K route reflectors) or 'direct:N'."""
    parts = text.split(":")
    try:
        if parts[0] == "mesh" and len(parts) == 2:
            return {"label": f"mesh, {parts[1]} hosts", "hosts": int(parts[1]), "route_reflectors": 0, "routing": "bgp"}
        if parts[0] == "rr" and len(parts) == 3:
            return {
                "label": f"{parts[2]} RRs, {parts[1]} hosts",
                "hosts": int(parts[1]),
                "route_reflectors": int(parts[2]),
                "routing": "bgp",
            }
        if parts[0] == "direct" and len(parts) == 2:
            return {
                "label": f"direct, {parts[1]} hosts",
                "hosts": int(parts[1]),
                "route_reflectors": 0,
                "routing": "direct",
            }
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"scenario {text!r}: use mesh:N, rr:N:K or direct:N")


class Probers:
    """One prober per host namespace; ``reach(address, hosts)`` asks all of them at once."""

    def __init__(self, lab):
        self.procs = {}
        for h in lab.live_hosts():
            self.procs[h.name] = subprocess.Popen(
                system.in_ns(h.namespace, [sys.executable, "-I", PROBER]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
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
        stop(self.procs.values())


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


class Profile:
    """CPU ticks of the lab's processes and the agents' log offsets at the start of the container phase."""

    LOG_EVENTS = {
        "sync": "event=sync ",
        "policy_applied": "event=policy.applied",
        "bird_reconfigured": "BIRD reconfigured",
        "bird_check": "event=bird.reconfigured",
        "dataplane": "event=dataplane.",
        "sync_failed": "event=sync.failed",
    }

    def __init__(self, lab, extra=None):
        self.lab = lab
        self.extra = extra or {}  # {role: pid} of the benchmark's own processes (the probers)
        self.started = time.monotonic()
        self.cpu = cpu_ticks(lab, self.extra)
        self.total = self._machine()
        self.offsets = {h.name: _size(_agent_log(h)) for h in lab.live_hosts()}
        self.bird_offsets = {h.name: _size(_bird_log(h)) for h in lab.live_hosts()}

    @staticmethod
    def _machine():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)  # busy, all

    def report(self, out_dir, label):
        wall = time.monotonic() - self.started
        hz = os.sysconf("SC_CLK_TCK")
        now, busy = cpu_ticks(self.lab, self.extra), self._machine()
        kinds = {}
        for role, (own, children) in now.items():
            own0, children0 = self.cpu.get(role, (0, 0))
            kind = role.split()[0]
            k = kinds.setdefault(kind, [0, 0, 0])
            k[0] += (own - own0) / hz
            k[1] += (children - children0) / hz
            k[2] += 1
        machine_busy = (busy[0] - self.total[0]) / hz
        lines = [f"{label}: container phase {wall:.1f} s wall, machine busy {machine_busy:.1f} CPU-s"]
        for kind, (own, children, n) in sorted(kinds.items()):
            lines.append(f"  {kind:6} x{n:<3} own {own:7.1f} CPU-s  children {children:7.1f} CPU-s")
        counts = {k: 0 for k in self.LOG_EVENTS}
        took = []
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{_slug(label)}-agents.log"), "w") as dump:
            for h in self.lab.live_hosts():
                try:
                    with open(_agent_log(h), errors="replace") as f:
                        f.seek(self.offsets.get(h.name, 0))
                        text = f.read()
                except OSError:
                    continue
                for line in text.splitlines():
                    dump.write(f"{h.name} {line}\n")
                    for k, needle in self.LOG_EVENTS.items():
                        if needle in line:
                            counts[k] += 1
                    if "event=sync " in line and "took_ms=" in line:
                        took.append(float(line.split("took_ms=")[1].split()[0]))
        with open(os.path.join(out_dir, f"{_slug(label)}-bird.log"), "w") as dump:
            for h in self.lab.live_hosts():
                try:
                    with open(_bird_log(h), errors="replace") as f:
                        f.seek(self.bird_offsets.get(h.name, 0))
                        dump.writelines(f"{h.name} {line}" for line in f)
                except OSError:
                    continue
        lines.append("  agent log events: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if took:
            lines.append(
                f"  sync took_ms p50 {percentile(took, 50):.1f} p99 {percentile(took, 99):.1f} "
                f"max {max(took):.1f}; total {sum(took) / 1000:.1f} s over {len(took)} passes"
            )
        text = "\n".join(lines)
        with open(os.path.join(out_dir, f"{_slug(label)}-cpu.txt"), "w") as f:
            f.write(text + "\n")
        return text


def _pids(lab):
    """{role: pid} of agents, BIRDs, etcd members and socat bridges (grouped by kind later)."""
    out = {}
    for p in lab.state.data["processes"]:
        if system.alive(p["pid"], p["start"]):
            out[p["role"]] = p["pid"]
    for h in lab.live_hosts():
        try:
            with open(os.path.join(h.run_dir, "bird", "bird.pid")) as f:
                out[f"bird {h.name}"] = int(f.read().strip())
        except (OSError, ValueError):
            pass
    return out


def cpu_ticks(lab, extra=None):
    """{role: (own ticks, reaped children's ticks)} of the lab's processes (``_pids``) and ``extra`` {role: pid}."""
    out = {}
    for role, pid in {**_pids(lab), **(extra or {})}.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[role] = (int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
        except (OSError, IndexError, ValueError):
            pass
    return out


def cpu_seconds(ticks, kind, since=None):
    """CPU seconds (own + children) per process of ``kind`` ("agent", "bird") in ``ticks``, minus ``since``."""
    hz = os.sysconf("SC_CLK_TCK")
    since = since or {}
    out = []
    for role, (own, children) in ticks.items():
        if role.split()[0] == kind:
            own0, children0 = since.get(role, (0, 0))
            out.append((own - own0 + children - children0) / hz)
    return out


def mem_available_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def requests_total(lab):
    return sum(sum(requests_served(ep).values()) for ep in lab.endpoints)


def startup_costs(lab):
    """What the agents cost to come up, read right after the lab is up: each agent's CPU seconds so far (its
    imports, first sync, BIRD configs while the lab converged), the seconds from its spawn to its API socket
    (the lab records them), and etcd requests per agent so far (the lab's few netctl calls included)."""
    hosts = len(lab.live_hosts())
    return {
        "cpu_s": cpu_seconds(cpu_ticks(lab), "agent"),
        "wall_s": list(lab.state.data.get("agent_start_s", {}).values()),
        "etcd_requests": requests_total(lab) / hosts,
    }


def _agent_log(h):
    return os.path.join(h.run_dir, "agent.log")


def _bird_log(h):
    return os.path.join(h.run_dir, "bird", "bird.log")


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _slug(label):
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")


def idle_costs(lab, seconds):
    """Over ``seconds`` in which nobody starts anything: etcd requests per second per agent (all members), and
    CPU milliseconds per minute of each agent and each BIRD."""
    before, ticks, t0 = requests_total(lab), cpu_ticks(lab), time.monotonic()
    time.sleep(seconds)
    rps = (requests_total(lab) - before) / (time.monotonic() - t0) / len(lab.live_hosts())
    per_min = 60000.0 / (time.monotonic() - t0)
    after = cpu_ticks(lab)
    return {
        "rps": rps,
        "agent_cpu_ms_min": [c * per_min for c in cpu_seconds(after, "agent", ticks)],
        "bird_cpu_ms_min": [c * per_min for c in cpu_seconds(after, "bird", ticks)],
    }


def run_scenario(sc, containers, probe_timeout, budget, log, profile_dir=None, pin=True, idle_s=0.0, pause=0.0):
    name = f"bench{sc['hosts']}"
    if Lab.exists(name):
        Lab.destroy(name)
    free_before = mem_available_kib()
    started = time.monotonic()
    deadline = started + budget
    lab = Lab.up(
        LabSpec(name=name, hosts=sc["hosts"], route_reflectors=sc["route_reflectors"], routing=sc["routing"]),
        converge_timeout=max(60, 3 * sc["hosts"]),
        after_fabric=pin_neighbours if pin else None,
    )
    probers = None
    try:
        up_s = time.monotonic() - started
        start = startup_costs(lab)
        log(
            f"  lab up in {up_s:.1f}s; per agent: start-up {percentile(start['wall_s'], 50):.1f} s wall (p50), "
            f"{percentile(start['cpu_s'], 50):.2f} CPU-s (p50) until the lab was up, "
            f"{start['etcd_requests']:.0f} etcd requests; starting {containers} containers"
            f"{'' if pin else ' (neighbour entries dynamic)'}"
        )
        probers = Probers(lab)
        hosts = [h.name for h in lab.live_hosts()]
        adds, conv, after_add, conv_new, conv_old, failures = [], [], [], [], [], 0
        blocks = set()
        profile = Profile(lab, {f"prober {h}": p.pid for h, p in probers.procs.items()}) if profile_dir else None
        for i in range(containers):
            if time.monotonic() > deadline:
                raise ScenarioTimeout(f"scenario budget of {budget:.0f}s used up after {i} containers")
            host = hosts[i % len(hosts)]
            if i and pause:
                time.sleep(pause)
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
                log(
                    f"  {rec['name']} ({rec['ip']} on {host}): not reachable from "
                    f"{sorted(h for h, t in arrivals.items() if t is None)} within {probe_timeout}s"
                )
                continue
            c = max(arrivals.values()) - t0 if arrivals else t_add
            if profile:
                slowest = sorted(arrivals, key=arrivals.get, reverse=True)[:3]
                log(
                    f"  {rec['name']} on {host} ({rec['ip']}, {'new' if new_block else 'old'} block): ADD "
                    f"{t_add * 1000:.0f} ms, pingable from all {c * 1000:.0f} ms; slowest "
                    + ", ".join(f"{h} {(arrivals[h] - t0) * 1000:.0f}" for h in slowest)
                )
            conv.append(c)
            after_add.append(c - t_add)
            (conv_new if new_block else conv_old).append(c)
        if profile:
            log(profile.report(profile_dir, sc["label"]))
        idle = idle_costs(lab, idle_s) if idle_s > 0 else None
        agent_kib, bird_kib = memory(lab)
        used_kib = free_before - mem_available_kib()
        db_bytes = [etcd_db_size(ep)[0] for ep in lab.endpoints]
        return {
            "label": sc["label"] + (f", ADDs {pause:g} s apart" if pause else ""),
            "hosts": sc["hosts"],
            "containers": containers,
            "up_s": up_s,
            "add": adds,
            "conv": conv,
            "after_add": after_add,
            "conv_new": conv_new,
            "conv_old": conv_old,
            "failures": failures,
            "agent_kib": agent_kib,
            "bird_kib": bird_kib,
            "sessions": _sessions(lab),
            "idle_rps": idle and idle["rps"],
            "idle": idle,
            "start": start,
            "machine_kib_per_host": used_kib / sc["hosts"],
            "etcd_db_bytes": max((b for b in db_bytes if b), default=None),
        }
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
    head = [
        "scenario",
        "BGP sessions",
        "lab up (s)",
        "ADD p50/p99 (ms)",
        "pingable p50/p99 (ms)",
        "after ADD returned p50/p99 (ms)",
        "new block p50/max (ms) [n]",
        "in block p50/p99 (ms) [n]",
        "unreached",
        "agent RSS mean/max (MiB)",
        "BIRD RSS mean/max (MiB)",
        "etcd req/s per agent, idle",
    ]
    rows = []
    for r in results:
        rows.append(
            [
                r["label"],
                str(r["sessions"]),
                f"{r['up_s']:.1f}",
                f"{ms(percentile(r['add'], 50))} / {ms(percentile(r['add'], 99))}",
                f"{ms(percentile(r['conv'], 50))} / {ms(percentile(r['conv'], 99))}",
                f"{ms(percentile(r['after_add'], 50))} / {ms(percentile(r['after_add'], 99))}",
                f"{ms(percentile(r['conv_new'], 50))} / {ms(max(r['conv_new'], default=None))} [{len(r['conv_new'])}]",
                f"{ms(percentile(r['conv_old'], 50))} / {ms(percentile(r['conv_old'], 99))} [{len(r['conv_old'])}]",
                f"{r['failures']}/{r['containers']}",
                f"{mib(r['agent_kib'], statistics.mean)} / {mib(r['agent_kib'], max)}",
                f"{mib(r['bird_kib'], statistics.mean)} / {mib(r['bird_kib'], max)}",
                "-" if r["idle_rps"] is None else f"{r['idle_rps']:.2f}",
            ]
        )
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cost_table(results):
    """Per host: what an agent costs to start and at idle, and what the whole host takes of the machine."""
    head = [
        "scenario",
        "agent start p50/max (s)",
        "agent start CPU p50/max (CPU-s)",
        "etcd requests per agent to start",
        "agent idle CPU p50/max (ms/min)",
        "BIRD idle CPU p50/max (ms/min)",
        "machine memory per host (MiB)",
        "etcd DB (MiB)",
    ]
    rows = []
    for r in results:
        st, idle = r["start"], r["idle"] or {}

        def p50max(values, fmt):
            return "-" if not values else f"{fmt.format(percentile(values, 50))} / {fmt.format(max(values))}"

        rows.append(
            [
                r["label"],
                p50max(st["wall_s"], "{:.1f}"),
                p50max(st["cpu_s"], "{:.2f}"),
                f"{st['etcd_requests']:.0f}",
                p50max(idle.get("agent_cpu_ms_min"), "{:.0f}"),
                p50max(idle.get("bird_cpu_ms_min"), "{:.0f}"),
                f"{r['machine_kib_per_host'] / 1024:.0f}",
                "-" if r["etcd_db_bytes"] is None else f"{r['etcd_db_bytes'] / 2**20:.1f}",
            ]
        )
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scenario",
        action="append",
        type=parse_scenario,
        help="mesh:N, rr:N:K or direct:N (repeatable; default mesh:5, mesh:20, rr:50:2)",
    )
    p.add_argument("--containers", type=int, default=50)
    p.add_argument("--probe-timeout", type=float, default=30.0, help="Seconds one reachability probe may take.")
    p.add_argument("--scenario-timeout", type=float, default=600.0, help="Seconds one scenario may take.")
    p.add_argument(
        "--dynamic-neighbours",
        action="store_true",
        help="Do not pin the fabric's ARP entries (see pin_neighbours: past ~10 hosts with containers the "
        "shared kernel's ARP table overflows and convergence measures ARP retries).",
    )
    p.add_argument(
        "--idle",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="After the containers, count etcd's requests this long with nothing happening (0: skip).",
    )
    p.add_argument(
        "--pause",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="Wait this long between one container answering everywhere and the next ADD, so the last one's work "
        "on every other host (its record reaching each agent and BIRD) is over: on real hosts that work runs on "
        "each host's own CPU, here all of it on this machine's.",
    )
    p.add_argument("--profile", metavar="DIR", help="Write where CPU went during the container phase to DIR.")
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
                results.append(
                    run_scenario(
                        sc,
                        args.containers,
                        args.probe_timeout,
                        args.scenario_timeout,
                        log,
                        args.profile,
                        pin=not args.dynamic_neighbours,
                        idle_s=args.idle,
                        pause=args.pause,
                    )
                )
            except (NetpluginError, ScenarioTimeout, RuntimeError) as e:
                log(f"  failed: {getattr(e, 'msg', e)}")
    except KeyboardInterrupt:
        log("interrupted; the lab was removed")
    if results:
        print(table(results))
        print()
        print(cost_table(results))
    return 0 if results and len(results) == len(scenarios) else 1


if __name__ == "__main__":
    sys.exit(main())
