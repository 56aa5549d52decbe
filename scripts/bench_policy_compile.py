#!/usr/bin/env python3
"""What one endpoint event costs the agent's policy compile (netplugin.agent.policy.PolicyReconciler), no kernel.

A cluster of ``--endpoints`` endpoint records over ``--hosts`` hosts (this agent is host h1) on two networks,
with a few policies (selector peers, a network peer, 100 CIDRs, an egress policy, one selecting everything on
one network). The reconciler syncs views built like the agent's view cache builds them (the same record objects
until their key changes), with a dataplane that only counts what it is asked to apply. Timed: the reconciler's
``sync`` for a remote endpoint's ADD and DEL and a local endpoint's ADD and DEL (each a view with one record
more or less), ``--events`` of each, medians in ms.

``--compare TREE`` (a checkout of an older revision, e.g. made with ``git worktree add``) runs this script in a
fresh process for TREE and for this checkout in turn, ``--rounds`` times (round r starts with the other one
each time), and prints both medians and new/old ratios: the same workload on the older code.

    flock /tmp/netplugin-bench.lock .venv/bin/python scripts/bench_policy_compile.py --endpoints 1000,10000 \
        [--compare ../base] [--rounds 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("remote_add", "remote_del", "local_add", "local_del")
APPS = ("web", "db", "api", "cache", "batch")


def policies():
    def doc(name, spec):
        return {"apiVersion": "netplugin/v1", "kind": "Policy", "metadata": {"name": name}, "spec": spec}

    cidrs = [{"cidr": f"172.16.{i}.0/24"} for i in range(0, 200, 2)]
    return [
        doc("web", {"selector": {"matchLabels": {"app": "web"}}, "ingress": [{"action": "allow", "from": [
            {"selector": {"matchLabels": {"app": "api"}}}, {"network": "red"}]}]}),
        doc("db", {"order": 10, "selector": {"matchLabels": {"app": "db"}}, "ingress": [
            {"action": "allow", "protocol": "tcp", "ports": [5432], "from": [{"selector": {"matchLabels": {"app": "web"}}}]},
            {"action": "deny", "from": cidrs}]}),
        doc("api-out", {"selector": {"matchLabels": {"app": "api"}}, "types": ["Egress"], "egress": [
            {"action": "allow", "to": [{"selector": {"matchExpressions": [
                {"key": "app", "operator": "In", "values": ["web", "db"]}]}}]}]}),
        doc("batch", {"selector": {"matchLabels": {"app": "batch"}}, "ingress": [{"action": "log"}]}),
    ]  # fmt: skip


class Counting:
    """Stands in for the dataplane backend: counts the rulesets it is asked to apply."""

    def __init__(self):
        self.applies = 0

    def apply_policy(self, ruleset, full=False):
        self.applies += 1
        return [], {}


def run(n, hosts, events):
    from netplugin.agent.policy import PolicyReconciler
    from netplugin.agent.view import ClusterView, ViewChanges
    from netplugin.datastore import keys
    from netplugin.datastore.models import Endpoint

    def record(i, host):
        return Endpoint(
            id=f"ep{i}",
            host=host,
            network="blue" if i // hosts % 3 else "red",
            container_id=f"c{i}",
            netns=f"/run/netns/c{i}",
            ifname="eth0",
            host_ifname=f"np{i:011x}",
            addresses=[f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32", f"fd00::{i:x}/128"],
            labels={"app": APPS[i // hosts % len(APPS)], "shard": str(i % 7)},
        )

    records = {}
    for i in range(n):
        r = record(i, f"h{i % hosts + 1}")
        records[keys.endpoint(r.host, r.id)] = r
    docs = policies()
    revision = [1]

    def view():
        revision[0] += 1
        return ClusterView(revision=revision[0], endpoints=[records[k] for k in sorted(records)], policies=docs)

    rec = PolicyReconciler("h1", Counting())
    rec.sync(view())
    out = {k: [] for k in KINDS}
    next_id = n
    for _ in range(events):
        for kind in KINDS:
            host = "h1" if kind.startswith("local") else "h2"
            if kind.endswith("add"):
                r = record(next_id, host)
                next_id += 1
                key = keys.endpoint(host, r.id)
                records[key] = r
            else:
                key = next(k for k in records if k.startswith(keys.endpoint_prefix(host)))
                del records[key]
            v = view()
            started = time.perf_counter()
            rec.sync(v, changes=ViewChanges(everything=False, keys=frozenset([key])))
            out[kind].append((time.perf_counter() - started) * 1000)
    return {k: statistics.median(v) for k, v in out.items()}


def child(tree, n, hosts, events):
    argv = [sys.executable, os.path.abspath(__file__), "--child", "--endpoints", str(n), "--hosts", str(hosts)]
    argv += ["--events", str(events)]
    env = dict(os.environ, PYTHONPATH=tree)
    done = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoints", default="1000,10000", help="comma-separated cluster sizes")
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--events", type=int, default=20, help="events of each kind per run")
    ap.add_argument("--compare", metavar="TREE", help="a checkout of the code to compare with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.endpoints.split(",")]
    if args.child:
        print(json.dumps(run(sizes[0], args.hosts, args.events)))
        return
    trees = {"new": HERE} if not args.compare else {"old": os.path.abspath(args.compare), "new": HERE}
    print(f"{args.hosts} hosts, {args.events} events of each kind per run, {args.rounds} round(s); medians in ms")
    for n in sizes:
        got = {name: [] for name in trees}
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                got[name].append(child(trees[name], n, args.hosts, args.events))
        for kind in KINDS:
            med = {name: statistics.median(run[kind] for run in got[name]) for name in trees}
            line = "  ".join(f"{name} {med[name]:8.2f}" for name in trees)
            ratio = f"  new/old {med['new'] / med['old']:.3f}" if "old" in med else ""
            print(f"{n:6d} endpoints {kind:10s} {line}{ratio}", flush=True)


if __name__ == "__main__":
    main()
