#!/usr/bin/env python3
"""Data path benchmark: netplugin's routed containers against host networking and what a user would pick instead.

Builds a pair of host namespaces per technology (netplugin/benchlib/datapath_paths.py: netplugin's are a real lab,
the others sit on a fabric bridge beside it; no technology's rules tax another's traffic) and measures, in
interleaved rounds:

  host          iperf3/sockperf between two host namespaces' fabric addresses (the baseline)
  netplugin     a two-host lab with real agents (--routing bgp, BIRD, --dataplane iptables), CNI ADD via the
                plugin binary, and a container pair per case: netplugin-iptables (a policy selecting both ends
                allows their traffic), netplugin-2h (no policy), netplugin-iptables-10k (the receiver's allow
                rule lists 10,000 CIDRs); plus netplugin-1h (two containers on one host)
  netplugin-bpf the same on a second lab whose agents run --dataplane bpf (pins on the lab's own bpffs):
                netplugin-bpf, netplugin-bpf-nopolicy, netplugin-bpf-10k; np_counters of each pair's ends
                are read before and after the rounds (allowed = carried by the programs, to_stack = handed
                to the kernel's stack)
  docker-nat    Docker's bridge + published port, emulated: docker0 bridge, veths and Docker's own iptables rules
  vxlan         kernel VXLAN overlay: containers on a bridge with a vxlan device on each host, MTU 1450
  ptp           the reference CNI ptp plugin + host-local IPAM (/usr/lib/cni), routes between hosts set by hand

Run as root with the project's virtualenv: ``.venv/bin/python scripts/bench_datapath.py`` (``--quick`` for a
short smoke run, ``--rounds 1 --duration 1 --tests tcp_131072,lat`` for a shorter one, ``--render
docs/benchmarks/datapath.json`` to redraw the report from saved results). Every
namespace, process and file it makes is removed at the end, also on Ctrl-C or SIGTERM.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from netplugin.benchlib import datapath_metrics, datapath_report, machine, stats, tools
from netplugin.benchlib.cleanup import CleanupStack, Interrupted
from netplugin.benchlib.datapath_paths import BUILDERS, Testbed, build_host, build_netplugin, build_ptp, log
from netplugin.benchlib.datapath_states import DIAG_STATE_IDS, DIAG_STATES, ct_mark_hits, flowtable_support
from netplugin.benchlib.markdown import fmt_num
from netplugin.errors import NetpluginError

MAX_CONSECUTIVE_FAILURES = 4
NCPU = len(os.sched_getaffinity(0))


# --- measurement -------------------------------------------------------------------------------------------------

TESTS = (
    [("tcp", n) for n in datapath_metrics.TCP_SIZES]
    + [("udp", n) for n in datapath_metrics.UDP_SIZES]
    + [("lat", None)]
)
TEST_IDS = {(f"{kind}_{size}" if size else kind): (kind, size) for kind, size in TESTS}


class Servers:
    """iperf3 and sockperf servers per path; an iperf3 server is restarted after a failed test."""

    def __init__(self, lab):
        self.lab = lab
        self.iperf = {}
        self.sockperf = {}

    def start(self, path):
        self.start_iperf(path)
        self.sockperf[path.id] = self.lab.spawn(
            f"sockperf server for {path.id}", lambda: tools.start_sockperf_server(path.server_ns, path.bind)
        )
        for port in (tools.IPERF3_PORT, tools.SOCKPERF_PORT):
            if not tools.wait_listening(path.server_ns, port):
                raise RuntimeError(f"server on port {port} for path {path.id} did not start")

    def start_iperf(self, path):
        self.iperf[path.id] = self.lab.spawn(
            f"iperf3 server for {path.id}", lambda: tools.start_iperf3_server(path.server_ns, path.bind)
        )

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
        out = {f"tcp_{size}": r["bps"] / 1e9, f"cpu_tcp_{size}": stats.seconds_per_gb(r["cpu_busy_s"], r["bytes"])}
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
        for ti, (kind, size) in enumerate(args.tests):
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
                log(
                    f"[{fmt_elapsed(time.monotonic() - started)}] round {r + 1}/{rounds} {name:<9} "
                    f"{path.id:<13} {short(values)}"
                )
    return rounds


def read_counters(paths):
    """{path: {end: {counter: value}}} of every path that has counters of its own (the bpf paths)."""
    return {p.id: p.counters() for p in paths if p.counters}


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


def diagnose(args):
    """Host, netplugin across hosts and ptp, with netplugin's hosts switched between DIAG_STATES each round."""
    import signal

    started = time.monotonic()
    doc = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine.machine_info(tools=("iperf3", "sockperf")),
        "settings": {"rounds": args.rounds, "duration_s": args.duration, "latency_pinned": True},
        "baseline": "host",
    }
    with CleanupStack() as cleanup:
        lab = Testbed(cleanup)
        paths = build_host(lab) + build_netplugin(lab, cleanup, cases=("nopolicy",), one_host=False) + build_ptp(lab)
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
        saved = {
            ns: (lab.sh(ns, "iptables-save").stdout, lab.sh(ns, "ip6tables-save").stdout)
            for ns in lab.netplugin["hosts"]
        }
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
                        log(
                            f"[{fmt_elapsed(time.monotonic() - started)}] round {r + 1}/{args.rounds} {st.id:<11} "
                            f"{path.id:<13} {short({k: v for k, v in values.items() if k in metrics})}"
                        )
                if st.id == "ct-mark":  # read before the next state resets the counters
                    doc["ct_mark_hits"] = ct_mark_hits(lab)
        if "flowtable" in samples:
            doc["flowtable"]["offloaded"] = {
                ns: lab.sh(ns, "nft list flowtable inet npdiag ft", check=False).stdout for ns in lab.netplugin["hosts"]
            }
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
    ap.add_argument(
        "--paths",
        default=",".join(BUILDERS),
        help=f"comma-separated subset of {','.join(BUILDERS)} (host is always included)",
    )
    ap.add_argument(
        "--tests",
        default=",".join(TEST_IDS),
        help=f"comma-separated subset of {','.join(TEST_IDS)} (default all; the aims read tcp_131072 and lat)",
    )
    ap.add_argument("--max-minutes", type=float, default=20.0, help="stop measuring after this long (default 20)")
    ap.add_argument("--output-dir", default=os.path.join(REPO, "docs", "benchmarks"))
    ap.add_argument("--quick", action="store_true", help="2 rounds of 1 s tests: a smoke run")
    ap.add_argument("--render", metavar="JSON", help="only redraw datapath.md/.png from saved results")
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="instead: host, netplugin (2 hosts) and ptp with netplugin's hosts switched between states "
        "from as built to no netfilter at all (see --states; writes datapath-diagnosis.md; default "
        "6 rounds)",
    )
    ap.add_argument(
        "--states",
        default=",".join(DIAG_STATE_IDS),
        help=f"with --diagnose: comma-separated subset of {','.join(DIAG_STATE_IDS)} (in that order; "
        f"flowtable is skipped when the kernel lacks flowtables)",
    )
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
    tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    bad = [t for t in tests if t not in TEST_IDS]
    if bad or not tests:
        ap.error(f"unknown test(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(TEST_IDS)}")
    args.tests = [TEST_IDS[t] for t in TEST_IDS if t in tests]
    return args


def preflight(paths):
    if os.geteuid() != 0:
        sys.exit("bench_datapath: must run as root (it creates network namespaces)")
    needed = ("iperf3", "sockperf", "socat", "bird", "iptables-restore", "nft") + (
        ("bpftool",) if "netplugin-bpf" in paths else ()
    )
    missing = [t for t in needed if not shutil.which(t)]
    if missing:
        sys.exit(f"bench_datapath: missing tools: {', '.join(missing)} (see scripts/setup.sh)")
    if "netplugin-bpf" in paths:
        stale = stale_bpf_object()
        if stale:
            sys.exit(f"bench_datapath: {stale}")
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "netplugin")):
        sys.exit("bench_datapath: run with the project's virtualenv: .venv/bin/python scripts/bench_datapath.py")


def stale_bpf_object():
    """Why the agents' BPF object would not be the programs in this tree (missing or older than a source), or
    None: a benchmark of yesterday's object would measure the wrong programs."""
    from netplugin.agent.bpf_backend import OBJECT, default_object_dir
    from netplugin.kernel.bpf import build

    obj = os.path.join(default_object_dir(), OBJECT)
    rebuild = f"python -m netplugin.kernel.bpf.build {default_object_dir()}"
    if not os.path.exists(obj):
        return f"no BPF object {obj}: build it with {rebuild}"
    newer = [src.name for src in build.PROGS.glob("*.[ch]") if src.stat().st_mtime > os.path.getmtime(obj)]
    if newer:
        return f"{obj} is older than {', '.join(sorted(newer))}: rebuild it with {rebuild}"
    return None


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            doc = json.load(f)
        problem = write_report(doc, args.output_dir)
        log(f"rendered {args.output_dir}/datapath.md" + (f" ({problem})" if problem else " and datapath.png"))
        return 0
    preflight(args.paths)
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
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "udp_bandwidth": args.udp_bandwidth,
            "quick": args.quick,
            "tests": [f"{kind}_{size}" if size else kind for kind, size in args.tests],
            "latency_pinned": True,
        },
        "baseline": "host",
        "complete": True,
        "errors": [],
        "paths": [],
        "samples": {},
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
            before, forwarded = read_counters(paths), lab.forwarded()
            rounds_done = measure(paths, servers, args, doc, started)
            doc["settings"]["rounds_done"] = rounds_done
            doc["counters"] = stats.counter_deltas(before, read_counters(paths))
            doc["forwarded"] = {
                dp: {ns: n - forwarded[dp][ns] for ns, n in now.items()} for dp, now in lab.forwarded().items()
            }
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
