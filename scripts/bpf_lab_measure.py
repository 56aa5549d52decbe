#!/usr/bin/env python3
"""Throwaway measurement behind docs/bpf-design.md: TCP ping-pong latency across two namespace hosts for
the data paths the eBPF design chooses between, in interleaved rounds (bounded in count and time).

Paths: host (hostA -> hostB over the fabric), plain routing, iptables (FORWARD with conntrack, as today's
policy), redirect (BPF redirects only), bpf-flows (redirects + policy in BPF once per flow, a flow table
for the rest: the default build), bpf-policy (redirects + policy on every packet), both over a 10,000-CIDR
LPM trie and, in the -62r cases, matching only at the 64th rule, and ct-gate (redirects only for flows
conntrack marks accepted; iptables sees each flow's first packets).  Run from the repository root as root:  .venv/bin/python scripts/bpf_lab_measure.py
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netplugin.benchlib import stats, tools
from netplugin.kernel.bpf import build, records
from netplugin.lab.bpflab import BLOCK, CONTAINER, FABRIC, TwoHostLab, mounted_bpffs
from netplugin.lab.netns import NamespaceSet, nsexec, stop_process

# BPF paths: (build variant, rules that never match placed before the allowing one)
BPF_PATHS = {
    "redirect": ("noPolicy", 0),
    "bpf-flows": ("", 0),
    "bpf-policy": ("noFlows", 0),
    "bpf-flows-62r": ("", 62),
    "bpf-policy-62r": ("noFlows", 62),
    "ct-gate": ("ctGate", 0),
}
PATHS = ("host", "plain", "iptables", *BPF_PATHS)
NCPU = 2
MARK = "0x1000000"  # NP_CT_ACCEPTED in progs/netplugin.c


def iptables_rules(lab, mode, add):
    """Today's shape (conntrack ESTABLISHED accept, then the peer allowed, else drop) or the ct-gate marker."""
    op = "-A" if add else "-D"
    for side in "ab":
        h, peer = lab.hosts[side], "b" if side == "a" else "a"
        for cmd in ("iptables", "ip6tables"):
            fam = 0 if cmd == "iptables" else 1
            if mode == "iptables":
                rules = [
                    ["FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                    ["FORWARD", "-s", BLOCK[peer][fam], "-d", BLOCK[side][fam], "-j", "ACCEPT"],
                    ["FORWARD", "-s", BLOCK[side][fam], "-j", "ACCEPT"],
                    ["FORWARD", "-j", "DROP"],
                ]
                table = "filter"
            else:
                rules = [["FORWARD", "-j", "CONNMARK", "--set-xmark", f"{MARK}/{MARK}"]]
                table = "mangle"
            for r in rules if add else reversed(rules):
                nsexec(h, [cmd, "-w", "-t", table, op, *r])
        if mode == "ct-gate" and add:
            # the fast path never shows conntrack a fast-pathed segment: loose window tracking or FIN is INVALID
            nsexec(h, ["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_be_liberal=1"])


def policy_10k(lab, pins, filler=0):
    """Rule 0 denies 10,000 /24s (not our peer: only the LPM size matters), then ``filler`` SCTP rules that
    match the peer but never the protocol, then the rule allowing the peer blocks."""
    big = [f"100.{64 + i // 256}.{i % 256}.0/24" for i in range(10000)]
    peers = ["10.252.0.0/16", "fd00:252::/32"]
    rules = (
        [records.rule(records.ACT_DENY)]
        + [records.rule(records.ACT_DENY, proto=132)] * filler
        + [records.rule(records.ACT_ALLOW)]
    )
    for side in "ab":
        lab.program_policy(pins, side, rules, {0: big, **{i: peers for i in range(1, filler + 2)}})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--duration", type=int, default=2, help="seconds per sockperf run")
    ap.add_argument("--budget", type=float, default=1200, help="stop starting rounds after this many seconds")
    ap.add_argument("--out", default="-")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset (host is always measured)")
    args = ap.parse_args()
    paths = ["host"] + [p for p in PATHS if p in args.paths.split(",") and p != "host"]

    nss = NamespaceSet()
    servers = []
    with tempfile.TemporaryDirectory() as tmp, mounted_bpffs(Path(tmp) / "bpffs") as fs:
        try:
            lab = TwoHostLab(nss).build()
            objs = {
                v: build.compile_one(src, Path(tmp) / "out", v)
                for src in build.PROGS.glob("*.c")
                for v in build.VARIANTS
            }
            pins = {}
            for path, (variant, filler) in BPF_PATHS.items():
                if path not in paths:
                    continue
                pins[path] = lab.load(objs[variant], fs / path)
                lab.program_endpoints(pins[path])
                if variant in ("", "noFlows"):
                    policy_10k(lab, pins[path], filler)
            lab.detach()

            target = {"host": (lab.hosts["a"], lab.hosts["b"], FABRIC["b"][0])}
            for p in paths[1:]:
                target[p] = (lab.containers["a"], lab.containers["b"], CONTAINER["b"][0])
            srv = {}
            for ns, bind in ((lab.hosts["b"], FABRIC["b"][0]), (lab.containers["b"], CONTAINER["b"][0])):
                srv[ns] = tools.start_sockperf_server(ns, bind)
                servers.append(srv[ns])
                assert tools.wait_listening(ns, tools.SOCKPERF_PORT), f"sockperf server in {ns} did not start"

            def select(path):
                lab.detach()
                if path in pins:
                    lab.attach(pins[path])
                if path in ("iptables", "ct-gate"):
                    iptables_rules(lab, path, True)

            def unselect(path):
                if path in ("iptables", "ct-gate"):
                    iptables_rules(lab, path, False)

            samples = {p: [None] * args.rounds for p in paths}
            start = time.monotonic()
            done = 0
            for r in range(args.rounds):
                if time.monotonic() - start > args.budget:
                    break
                cpu = r % NCPU
                for path in stats.rotated(paths, r):
                    client, server_ns, dst = target[path]
                    select(path)
                    try:
                        tools.pin(srv[server_ns].pid, cpu)
                        res = tools.sockperf_tcp_pingpong(client, dst, args.duration, cpu=cpu)
                        samples[path][r] = res["p50_us"]
                    except Exception as e:  # one lost sample, not a lost run
                        print(f"round {r} {path}: {e}", file=sys.stderr)
                    finally:
                        unselect(path)
                done = r + 1
                print(f"round {r}: " + " ".join(f"{p}={samples[p][r]}" for p in paths), file=sys.stderr)
            # counters prove the BPF paths carried the traffic (allowed) rather than handing it to the stack
            counters = {p: lab.counters(pins[p], "a") for p in pins}
        finally:
            for s in servers:
                stop_process(s)
            nss.close()

    result = {
        "rounds": done,
        "duration_s": args.duration,
        "p50_us": samples,
        "counters_a": counters,
        "median_p50_us": {p: stats.summarize(samples[p]).median for p in paths if stats.summarize(samples[p])},
        "ratio_to_host": {
            p: vars(stats.ratio_summary(samples[p], samples["host"]))
            for p in paths
            if stats.ratio_summary(samples[p], samples["host"])
        },
    }
    text = json.dumps(result, indent=1)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
    print("| path | median p50 (µs) | ratio to host (median, min–max) |", file=sys.stderr)
    for p in paths:
        rs = result["ratio_to_host"].get(p)
        print(
            f"| {p} | {result['median_p50_us'].get(p, '-'):.2f} | {rs['median']:.2f} ({rs['lo']:.2f}–{rs['hi']:.2f}) |"
            if rs
            else f"| {p} | - | - |",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
