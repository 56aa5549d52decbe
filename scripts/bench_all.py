#!/usr/bin/env python3
"""Run every benchmark of the project, one after another, and collect them into docs/benchmarks/README.md.

Runs each ``scripts/bench_<name>.py`` that exists (ipam, cni, docker, policy, convergence, datapath, then any
others) with the project's virtualenv, passing ``--quick`` through to those that accept it. Shows which step runs
and for how long; each benchmark's stdout (or its own ``docs/benchmarks/<name>.md``, if it wrote one during the
run) becomes a section of the index, with the date and the machine. Each step is bounded by
``--timeout-minutes``; Ctrl-C or SIGTERM stops the running benchmark with SIGTERM (so it cleans up after itself),
writes the index of what finished, and exits.

    sudo .venv/bin/python scripts/bench_all.py [--quick] [--only datapath,cni] [--timeout-minutes 30]
"""

import argparse
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from netplugin.benchlib import machine, suite
from netplugin.benchlib.cleanup import CleanupStack, Interrupted

OUT_DIR = os.path.join(REPO, "docs", "benchmarks")
STOP_GRACE_S = 60.0


def last_line(path):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


class Progress:
    """One status line: redrawn in place on a terminal, printed every ``every`` seconds otherwise."""

    def __init__(self, every=15.0):
        self.tty = sys.stderr.isatty()
        self.every = every
        self.last = 0.0

    def show(self, text, force=False):
        now = time.monotonic()
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            sys.stderr.write("\r\x1b[K" + text[:width])
            sys.stderr.flush()
        elif force or now - self.last >= self.every:
            print(text, file=sys.stderr, flush=True)
            self.last = now

    def done(self, text):
        if self.tty:
            sys.stderr.write("\r\x1b[K")
        print(text, file=sys.stderr, flush=True)


def stop_group(proc):
    """SIGTERM the benchmark's process group (it cleans up), SIGKILL after STOP_GRACE_S."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def run_one(name, path, args, cleanup, logdir, progress, step, total, started_all):
    with open(path) as f:
        quick = args.quick and suite.accepts_quick(f.read())
    argv = [sys.executable, path] + (["--quick"] if quick else [])
    out_path, err_path = os.path.join(logdir, f"{name}.out"), os.path.join(logdir, f"{name}.err")
    own_report = os.path.join(OUT_DIR, f"{name}.md")
    started_wall = time.time()
    t0 = time.monotonic()
    holder = []
    cleanup.push(f"stop bench_{name}", lambda: [stop_group(p) for p in holder])
    with open(out_path, "w") as out, open(err_path, "w") as err:
        # A session of its own: our SIGTERM reaches every process it started, and a terminal's Ctrl-C reaches only
        # us, so the benchmark is stopped once, in order.
        holder.append(
            subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        )
    proc = holder[0]
    deadline = t0 + args.timeout_minutes * 60
    status = None
    while status is None:
        try:
            rc = proc.wait(1.0)
            status = "ok" if rc == 0 else f"failed (rc={rc})"
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                stop_group(proc)
                status = f"timed out after {args.timeout_minutes:g} min"
                break
            now = time.monotonic()
            tail = last_line(err_path) or last_line(out_path)
            progress.show(
                f"[{step}/{total}] bench_{name}{' --quick' if quick else ''}  "
                f"{suite.fmt_duration(now - t0)} (total {suite.fmt_duration(now - started_all)})  {tail}"
            )
    seconds = time.monotonic() - t0
    progress.done(f"[{step}/{total}] bench_{name}: {status} in {suite.fmt_duration(seconds)}")
    report_md, report_name = None, None
    if os.path.exists(own_report) and os.path.getmtime(own_report) >= started_wall:
        with open(own_report) as f:
            report_md = f.read()
        report_name = f"{name}.md"
    with open(out_path) as f:
        stdout = f.read()
    if status != "ok" and report_md is None:
        stdout += "\n--- stderr (last lines) ---\n" + "\n".join(open(err_path).read().splitlines()[-30:])
    return {
        "name": name,
        "status": status,
        "seconds": seconds,
        "quick": quick,
        "report": report_name,
        "body": suite.section_body(report_md, stdout),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that accept it")
    ap.add_argument("--only", default="", help="comma-separated names (e.g. datapath,cni); default: all")
    ap.add_argument("--timeout-minutes", type=float, default=30.0, help="per benchmark (default 30)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args(argv)
    benches = suite.discover(os.path.join(REPO, "scripts"))
    if args.list:
        for name, path in benches:
            with open(path) as f:
                print(f"{name:<14} {'--quick' if suite.accepts_quick(f.read()) else ''}")
        return 0
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {n for n, _ in benches})
        if unknown:
            ap.error(f"no such benchmark(s): {', '.join(unknown)}")
        benches = [(n, p) for n, p in benches if n in wanted]
    if not 0 < args.timeout_minutes <= 240:
        ap.error("--timeout-minutes must be in (0, 240]")
    info = machine.machine_info()
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    runs, notes = [], []
    started_all = time.monotonic()
    progress = Progress()
    rc = 0
    try:
        with CleanupStack() as cleanup:
            logdir = tempfile.mkdtemp(prefix="npt-bench-all-")
            cleanup.push(f"remove {logdir}", shutil.rmtree, logdir, ignore_errors=True)
            for step, (name, path) in enumerate(benches, start=1):
                runs.append(run_one(name, path, args, cleanup, logdir, progress, step, len(benches), started_all))
                if runs[-1]["status"] != "ok":
                    rc = 1
    except Interrupted as e:
        progress.done(f"bench_all: {e}; the running benchmark was stopped and has cleaned up")
        notes.append(f"**Interrupted** ({e}) after {len(runs)} of {len(benches)} benchmarks.")
        rc = 130
    info["loadavg_end"] = machine.load_average()
    notes.append(
        "Other engineers' tests may share the 2 cores while these run; absolute figures wander, ratios "
        f"within one benchmark hold better. Load average at the end: "
        f"{' '.join(str(x) for x in info['loadavg_end'] or ())}."
    )
    os.makedirs(OUT_DIR, exist_ok=True)
    index = suite.render_index(runs, date, machine.describe(info), args.quick, notes)
    with open(os.path.join(OUT_DIR, "README.md"), "w") as f:
        f.write(index)
    print(
        f"bench_all: {sum(r['status'] == 'ok' for r in runs)}/{len(benches)} ok in "
        f"{suite.fmt_duration(time.monotonic() - started_all)}; index: {os.path.relpath(OUT_DIR, REPO)}/README.md"
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
