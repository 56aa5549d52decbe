#!/usr/bin/env python3
"""Time from ``docker run`` to a working network: netplugin against Docker's own bridge driver, same dockerd.

One throwaway host namespace (with an uplink namespace as its default route) runs a real etcd bridge, a
netplugin agent serving the Docker plugin, and a dockerd with three networks: a netplugin network, a
user-defined bridge network, and Docker's default bridge (docker0). Each sample is ``docker run --rm`` of a
busybox container that pings the host until the first reply and then prints "ok": the time is from starting
``docker run`` to reading that line. Runs rotate between the networks (so drift and noise hit all alike); the
report gives medians and spreads per network.

The fair comparison is with the user-defined bridge network: like every netplugin network it is a
user-defined network, for which Docker also starts its embedded DNS server inside each container (a few tens
of milliseconds of Docker's own work that the default bridge network skips). The default bridge is reported
for reference.

Bounded: N samples per driver (default 10), each with a timeout, and a total time limit. Everything is torn
down on exit, on error and on Ctrl-C (containers, dockerd, agent, etcd, namespaces). Needs root.

    sudo .venv/bin/python scripts/bench_docker.py [-n 10] [--json]
"""

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from netplugin.benchlib import stats
from netplugin.lab.dockerd import DOCKER, IMAGE, DockerHost
from netplugin.lab.etcd import EtcdServer
from netplugin.lab.netns import NamespaceSet, nsexec

HOST_ADDRESS = "10.99.0.1"
DEFAULT_GATEWAY = "172.17.0.1"  # docker0: the host as default-bridge containers see it
BRIDGE_GATEWAY = "172.30.0.1"  # the user-defined bridge network's gateway
NETWORKS = ("netplugin", "bridge", "default-bridge")
PROBE = "i=0; until ping -c1 -W1 {target} >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 300 ] && exit 1; done; echo ok $i"


def sample(host, network, target, timeout):
    """Seconds from starting ``docker run`` until the container has pinged ``target``."""
    cmd = [
        DOCKER,
        "-H",
        f"unix://{host.dockerd.socket}",
        "run",
        "--rm",
        "--net",
        network,
        IMAGE,
        "sh",
        "-c",
        PROBE.format(target=target),
    ]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = b""
        while not line.endswith(b"\n"):
            left = started + timeout - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                raise RuntimeError(f"no working network on {network} within {timeout}s")
            chunk = os.read(proc.stdout.fileno(), 64)
            if not chunk:
                raise RuntimeError(f"docker run on {network} failed: {proc.stderr.read().decode().strip()}")
            line += chunk
        elapsed = time.monotonic() - started
        if not line.startswith(b"ok"):
            raise RuntimeError(f"unexpected output on {network}: {line!r}")
        return elapsed
    finally:
        try:
            proc.wait(timeout=30)  # --rm: removal happens outside the measured time
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summarize(values):
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "median_ms": round(stats.median(ms), 1),
        "min_ms": round(min(ms), 1),
        "p90_ms": round(stats.percentile(ms, 90), 1),
        "max_ms": round(max(ms), 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--samples", type=int, default=10, help="samples per driver (1-200)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds allowed per sample")
    ap.add_argument("--time-limit", type=float, default=300.0, help="stop sampling after this many seconds")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_docker: needs root (network namespaces, dockerd)")
    if not 1 <= args.samples <= 200:
        sys.exit("bench_docker: --samples must be from 1 to 200")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    nss, etcd, host = NamespaceSet(), EtcdServer(), None
    results = {name: [] for name in NETWORKS}
    try:
        etcd.start()
        ns, uplink = nss.add(), nss.add()
        nss.link(ns, uplink, f"{HOST_ADDRESS}/24", "10.99.0.254/24")
        nsexec(ns, "ip route add default via 10.99.0.254")
        etcd.bridge_into(ns)
        host = DockerHost(ns, etcd.endpoint, bridge=True)
        host.start()
        host.docker(
            "network", "create", "-d", "netplugin", "--ipam-driver", "netplugin", "--subnet", "10.1.0.0/16", "np"
        )
        host.docker("network", "create", "-d", "bridge", "--subnet", "172.30.0.0/24", "br")
        targets = {
            "netplugin": ("np", HOST_ADDRESS),
            "bridge": ("br", BRIDGE_GATEWAY),
            "default-bridge": ("bridge", DEFAULT_GATEWAY),
        }
        for name, (network, target) in targets.items():  # warm-up: plugin activation, image layers, caches
            sample(host, network, target, args.timeout)
        deadline = time.monotonic() + args.time_limit
        for i in range(args.samples):
            for name in NETWORKS[i % 3 :] + NETWORKS[: i % 3]:
                results[name].append(sample(host, *targets[name], args.timeout))
            if time.monotonic() > deadline:
                print(f"bench_docker: time limit reached after {i + 1} rounds", file=sys.stderr)
                break
    except KeyboardInterrupt:
        print("bench_docker: interrupted, cleaning up", file=sys.stderr)
    finally:
        if host is not None:
            host.close()
        nss.close()
        etcd.close()

    if not all(results.values()):
        sys.exit("bench_docker: no complete round")
    report = {name: summarize(values) for name, values in results.items()}
    for other in ("bridge", "default-bridge"):
        report[f"netplugin_minus_{other.replace('-', '_')}_median_ms"] = round(
            report["netplugin"]["median_ms"] - report[other]["median_ms"], 1
        )
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("docker run -> first ping of the host answered (ms); networks interleaved on one dockerd")
    print(f"{'network':<15} {'n':>3} {'median':>8} {'min':>8} {'p90':>8} {'max':>8}")
    for name in NETWORKS:
        r = report[name]
        print(f"{name:<15} {r['n']:>3} {r['median_ms']:>8} {r['min_ms']:>8} {r['p90_ms']:>8} {r['max_ms']:>8}")
    print(f"netplugin - bridge (user-defined), medians: {report['netplugin_minus_bridge_median_ms']} ms")
    print(f"netplugin - default bridge, medians: {report['netplugin_minus_default_bridge_median_ms']} ms")


if __name__ == "__main__":
    main()
