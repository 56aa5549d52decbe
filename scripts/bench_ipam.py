#!/usr/bin/env python3
"""IPAM throughput against a real etcd: allocations/s and releases/s for one host and for several hosts at once.

Starts its own etcd (tests/etcd.py: free loopback port, data on tmpfs) and always stops it, also on Ctrl-C or
SIGTERM. Each scenario runs ``--rounds`` times on an empty pool; the table shows medians. Every process has its own
Datastore and IPAM, as separate agents would, and all processes of a phase start together at a barrier.

    .venv/bin/python scripts/bench_ipam.py [--ops 1000] [--hosts 4] [--rounds 3]
"""

import argparse
import multiprocessing
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from netplugin.benchlib.stats import median, percentile
from netplugin.config import EtcdConfig
from netplugin.datastore.client import Datastore
from netplugin.ipam.allocator import IPAM
from netplugin.lab.etcd import EtcdServer

POOL = "10.128.0.0/16"
PHASE_TIMEOUT = 120.0


def _worker(endpoint, host, count, barrier, out):
    """Allocate ``count`` addresses for ``host``, then release them; report phase start/end times and latencies."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C: die quietly, the parent cleans up
    try:
        ipam = IPAM(Datastore(EtcdConfig(endpoints=[endpoint])))
        ipam.list_pools()  # warm-up: pool list cached, connection open
        handles = [f"{host}.bench.{i}" for i in range(count)]
        barrier.wait(PHASE_TIMEOUT)
        t0, lat = time.monotonic(), []
        for h in handles:
            s = time.monotonic()
            ipam.auto_assign(h, host)
            lat.append(time.monotonic() - s)
        t1 = time.monotonic()
        barrier.wait(PHASE_TIMEOUT)
        t2 = time.monotonic()
        for h in handles:
            ipam.release_handle(h)
        t3 = time.monotonic()
        out.put({"host": host, "alloc": (t0, t1), "release": (t2, t3), "lat": lat, "stats": ipam.stats})
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which fails the round
        out.put({"host": host, "error": f"{type(e).__name__}: {e}"})


def run_round(endpoint, hosts, ops):
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(hosts), ctx.Queue()
    per_host = ops // hosts
    procs = [
        ctx.Process(target=_worker, args=(endpoint, f"bench{i}", per_host, barrier, out), daemon=True)
        for i in range(hosts)
    ]
    try:
        for p in procs:
            p.start()
        results = [out.get(timeout=2 * PHASE_TIMEOUT + 30) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError("; ".join(errors))
    total = per_host * hosts

    def rate(phase):
        start = min(r[phase][0] for r in results)
        end = max(r[phase][1] for r in results)
        return total / (end - start)

    lat = [x for r in results for x in r["lat"]]
    return {
        "alloc": rate("alloc"),
        "release": rate("release"),
        "p50": percentile(lat, 50) * 1000,
        "p99": percentile(lat, 99) * 1000,
        "conflicts": sum(r["stats"]["cas_conflicts"] for r in results),
        "ops": total,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=1000, help="allocations per scenario and round (200..2000)")
    ap.add_argument("--hosts", type=int, default=4, help="hosts (processes) of the concurrent scenario")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ops = max(200, min(args.ops, 2000))

    # Ctrl-C raises KeyboardInterrupt even when started with SIGINT ignored (a background job), and SIGTERM is
    # handled the same way, so the etcd server below is stopped either way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    server = EtcdServer()
    try:
        server.start()
        ds = Datastore(EtcdConfig(endpoints=[server.endpoint]))
        rows = []
        for hosts in (1, args.hosts):
            rounds = []
            for _ in range(args.rounds):
                ds.delete_prefix("/netplugin/")
                IPAM(ds).add_pool(POOL)
                rounds.append(run_round(server.endpoint, hosts, ops))
                print(
                    f"  {hosts} host(s): {rounds[-1]['alloc']:.0f} alloc/s, {rounds[-1]['release']:.0f} release/s",
                    file=sys.stderr,
                )
            med = {k: median(r[k] for r in rounds) for k in rounds[0]}
            rows.append((hosts, med, rounds))
        print(
            f"\nIPAM on etcd {server.endpoint} (one etcd on tmpfs, {os.cpu_count()} CPUs), pool {POOL}, "
            f"medians of {args.rounds} rounds\n"
        )
        print("| hosts (processes) | allocations | alloc/s | release/s | alloc p50 ms | alloc p99 ms | CAS conflicts |")
        print("|---|---|---|---|---|---|---|")
        for hosts, med, rounds in rows:
            print(
                f"| {hosts} | {int(med['ops'])} | {med['alloc']:.0f} | {med['release']:.0f} | {med['p50']:.2f} | "
                f"{med['p99']:.2f} | {med['conflicts']:.0f} |"
            )
        return 0
    except KeyboardInterrupt:
        print("interrupted; stopping etcd", file=sys.stderr)
        return 130
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
