#!/usr/bin/env python3
"""Container churn: M containers on N hosts started through the installed CNI binary, several ADDs in flight per
host (as a kubelet starts pods), timed until every container answers a ping from a container on another host;
then all deleted, and nothing may be left behind.

A lab (netplugin/lab: BGP full mesh, one etcd) is built first, its fabric's ARP entries pinned (see
netplugin/benchlib/neighbours.py: all hosts share one kernel's neighbour table; the hosts' entries for their
containers stay dynamic, as on real hosts, about one per container, under the table's 1,024). Each host gets
one probe container running a many-target prober (netplugin/benchlib/reach.py); container i on host k is pinged
from the probe container of host k+1, starting as soon as its ADD returns. Its time to reachable runs from the start of its ADD (namespace
creation included) to the first echo reply. The run's total is from the first ADD to the last reply.

Reported: total, ADD p50/p99/max under load, time to reachable p50/p99, the DEL phase, agent CPU seconds (the
churn only, the agent's children included) and peak memory per host from /proc, etcd's DB size; and after the
DELs ``netctl ipam check``, the hosts' veths, container routes and ipset members, asserted empty.

    sudo .venv/bin/python scripts/bench_churn.py                          # 10 hosts, 1,000 containers
    sudo .venv/bin/python scripts/bench_churn.py --hosts 3 --containers 60

Bounded by --timeout for the whole run (the lab's build included); on any exit, Ctrl-C or SIGTERM the lab is
removed. Exit status 0 when every container was reachable and nothing leaked, 1 otherwise.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from netplugin.benchlib.churn import ChurnResult, check_limits, clean, proc_usage, render
from netplugin.benchlib.cleanup import CleanupStack, Interrupted
from netplugin.benchlib.neighbours import pin_neighbours
from netplugin.benchlib.reach import stop
from netplugin.dataplane.model import is_host_ifname
from netplugin.errors import NetpluginError
from netplugin.lab import Lab, LabSpec
from netplugin.lab import system

LAB_NAME = "churn"
PROBE_RUNNER = (
    f"import sys; sys.path.insert(0, {ROOT!r}); from netplugin.benchlib.reach import serve; "
    "serve(sys.stdin, sys.stdout)"
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--containers", type=int, default=1000)
    ap.add_argument("--per-host-concurrency", type=int, default=4, help="ADDs (and DELs) in flight per host")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for the whole run, lab build included")
    ap.add_argument(
        "--probe-timeout", type=float, default=60, help="seconds a container may take to answer after its ADD returned"
    )
    args = ap.parse_args(argv)
    try:
        check_limits(args.hosts, args.containers, args.per_host_concurrency, args.timeout)
    except NetpluginError as e:
        ap.error(e.msg)
    return args


class Probers:
    """One many-target prober per host, in that host's probe container; arrivals collected by reader threads."""

    def __init__(self, lab, probe_containers):
        self.procs, self.arrived, self.lost = {}, {}, set()
        self.cond = threading.Condition()
        for host, rec in probe_containers.items():
            p = subprocess.Popen(
                system.in_ns(rec["netns"], [sys.executable, "-I", "-c", PROBE_RUNNER]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
            self.procs[host] = p
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"prober on {host} did not start")
            threading.Thread(target=self._read, args=(p,), daemon=True).start()

    def _read(self, p):
        for line in p.stdout:
            parts = line.split()
            with self.cond:
                if parts[:1] == ["ok"]:
                    self.arrived[parts[1]] = float(parts[2])
                elif parts[:1] == ["timeout"]:
                    self.lost.add(parts[1])
                self.cond.notify_all()

    def ask(self, host, address, timeout):
        with self.cond:
            self.procs[host].stdin.write(f"{address} {timeout}\n")
            self.procs[host].stdin.flush()

    def wait(self, addresses, deadline):
        """Block until every address answered or timed out, or ``deadline``."""
        with self.cond:
            while not all(a in self.arrived or a in self.lost for a in addresses):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(min(left, 1.0))

    def close(self):
        stop(self.procs.values())


def agent_pids(lab):
    procs = {p["role"]: p["pid"] for p in lab.state.data["processes"]}
    return {h.name: procs.get(f"agent {h.name}") for h in lab.live_hosts()}


def etcd_db_bytes(lab):
    try:
        with urllib.request.urlopen(lab.endpoints[0] + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("etcd_mvcc_db_total_size_in_bytes "):
                    return int(float(line.split()[1]))
    except OSError:
        pass
    return None


def run_parallel(lab, jobs, per_host, fn):
    """``fn(job)`` for every (host, ...) job, ``per_host`` in flight on each host at once."""
    pools = {h.name: ThreadPoolExecutor(max_workers=per_host) for h in lab.live_hosts()}
    try:
        futures = [pools[job[0].name].submit(fn, job) for job in jobs]
        return [f.result() for f in futures]
    finally:
        for pool in pools.values():
            pool.shutdown(wait=True, cancel_futures=True)


def churn(lab, args, deadline, log):
    hosts = lab.live_hosts()
    r = ChurnResult(hosts=len(hosts), containers=args.containers, per_host=args.per_host_concurrency)
    probes = {h.name: lab.run_container(h.name, f"probe-{h.name}") for h in hosts}
    probers = Probers(lab, probes)
    try:
        pids = agent_pids(lab)
        cpu0 = {h: (proc_usage(pid) or (0, 0))[0] for h, pid in pids.items()}
        r.etcd_db_bytes["before"] = etcd_db_bytes(lab)
        jobs = [(hosts[i % len(hosts)], f"c{i}", hosts[(i + 1) % len(hosts)].name) for i in range(args.containers)]
        recs, started = {}, {}

        def add(job):
            h, name, prober_host = job
            if time.monotonic() > deadline:
                r.failed.append((name, "run timeout"))
                return
            rec = {
                "name": name,
                "host": h.name,
                "netns": lab.plan.container_namespace(name),
                "container_id": f"{LAB_NAME}-{name}",
                "labels": {},
            }
            t0 = time.monotonic()
            try:
                system.add_netns(rec["netns"])
                recs[name] = rec
                t1 = time.monotonic()
                out = lab._cni(h, "ADD", rec)
                r.add_s.append(time.monotonic() - t1)
                rec["ip"] = out["ips"][0]["address"].split("/")[0]
            except (NetpluginError, KeyError, IndexError) as e:
                r.failed.append((name, str(e)))
                return
            started[rec["ip"]] = t0
            probers.ask(prober_host, rec["ip"], args.probe_timeout)

        log(
            f"starting {args.containers} containers on {len(hosts)} hosts, "
            f"{args.per_host_concurrency} ADDs in flight per host"
        )
        t_start = time.monotonic()
        run_parallel(lab, jobs, args.per_host_concurrency, add)
        log(f"  ADDs done in {time.monotonic() - t_start:.1f}s ({len(r.failed)} failed); waiting for pings")
        probers.wait(list(started), min(deadline, time.monotonic() + args.probe_timeout + 5))
        with probers.cond:
            arrived = dict(probers.arrived)
        r.reach_s = [arrived[ip] - t0 for ip, t0 in started.items() if ip in arrived]
        r.unreachable = sorted(ip for ip in started if ip not in arrived)
        r.total_s = max(arrived.values(), default=t_start) - t_start
        r.etcd_db_bytes["full"] = etcd_db_bytes(lab)

        def delete(job):
            h, name, _ = job
            rec = recs.get(name)
            if rec is None:
                return
            t1 = time.monotonic()
            try:
                lab._cni(h, "DEL", rec)
                r.del_s.append(time.monotonic() - t1)
            except NetpluginError as e:
                r.failed.append((name, f"DEL: {e}"))
            system.delete_netns(rec["netns"])

        log("deleting them")
        t_del = time.monotonic()
        run_parallel(lab, jobs, args.per_host_concurrency, delete)
        r.delete_s = time.monotonic() - t_del
        for h, pid in pids.items():
            usage = proc_usage(pid) if pid else None
            if usage:
                r.agent_cpu_s[h] = usage[0] - cpu0[h]
                r.agent_peak_kib[h] = usage[1]
    finally:
        probers.close()
    for h in hosts:
        lab.remove_container(f"probe-{h.name}")
    ips = {rec["ip"] for rec in recs.values() if rec.get("ip")} | {p["ip"] for p in probes.values()}
    settle = time.monotonic() + 10  # agents delete veths and set members right after DEL answers: let them
    r.leaks = leftovers(lab, ips)
    while any(r.leaks.values()) and time.monotonic() < settle:
        time.sleep(0.2)
        r.leaks = leftovers(lab, ips)
    r.etcd_db_bytes["after"] = etcd_db_bytes(lab)
    p = lab.netctl("ipam", "check", check=False, echo=False)
    r.ipam_check = (p.stdout.strip() or p.stderr.strip()).replace("\n", "; ")
    return r


def leftovers(lab, ips):
    """The hosts' veths of ours, routes to any container's address and ipset members that are container
    addresses, after every container was deleted."""
    leaks = {"veths": [], "routes": [], "ipset members": []}
    for h in lab.live_hosts():
        links = json.loads(system.ns_run(h.namespace, ["ip", "-j", "link", "show"], "listing links").stdout or "[]")
        leaks["veths"] += [f"{h.name}:{link['ifname']}" for link in links if is_host_ifname(link.get("ifname"))]
        routes = json.loads(
            system.ns_run(h.namespace, ["ip", "-j", "route", "show", "table", "all"], "listing routes").stdout or "[]"
        )
        # A container's route is a host route (``ip -j`` prints its dst without a prefix length); a block's
        # route may start at an address a container had.
        leaks["routes"] += [f"{h.name}:{rt['dst']}" for rt in routes if rt.get("dst", "").removesuffix("/32") in ips]
        sets = system.ns_run(h.namespace, ["ipset", "list"], "listing ipsets", check=False).stdout
        leaks["ipset members"] += [
            f"{h.name}:{w}"
            for line in sets.splitlines()
            for w in line.split()[:1]
            if w.split(",")[0].split("/")[0] in ips  # "10.0.0.5", "10.0.0.5/32" or "10.0.0.5,np0123456789a"
        ]
    return leaks


def main(argv=None):
    args = parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    began = time.monotonic()
    deadline = began + args.timeout
    # One bound on the whole run: SIGTERM to ourselves, which the cleanup stack turns into a clean exit.
    timed_out = threading.Event()

    def time_up():
        timed_out.set()
        os.kill(os.getpid(), signal.SIGTERM)

    watchdog = threading.Timer(args.timeout, time_up)
    watchdog.daemon = True
    try:
        with CleanupStack(log) as cleanup:
            watchdog.start()
            if Lab.exists(LAB_NAME):
                Lab.destroy(LAB_NAME)
            cleanup.push(f"removing lab {LAB_NAME}", Lab.destroy, LAB_NAME)
            log(f"building a {args.hosts}-host lab (BGP mesh, one etcd)")
            lab = Lab.up(
                LabSpec(name=LAB_NAME, hosts=args.hosts, routing="bgp"),
                out=log,
                converge_timeout=max(60, 3 * args.hosts),
            )
            pin_neighbours(lab)
            log(f"  up in {time.monotonic() - began:.1f}s")
            result = churn(lab, args, deadline, log)
    except Interrupted as e:
        why = f"--timeout of {args.timeout:g} s used up" if timed_out.is_set() else str(e)
        log(f"bench_churn: {why}; the lab was removed")
        return 2
    except NetpluginError as e:
        log(f"bench_churn: {e.msg}")
        return 2
    finally:
        watchdog.cancel()
    print("\n".join(render(result)))
    return 0 if clean(result) else 1


if __name__ == "__main__":
    sys.exit(main())
