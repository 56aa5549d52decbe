"""iperf3 and sockperf run inside lab namespaces the benchmark made (netplugin/lab/system.py ``in_ns``, which
refuses any other namespace, the root namespace included).

Servers are long-lived ``Popen`` objects the caller registers for cleanup; clients are one bounded
``subprocess.run`` each (timeout = test length + slack), so a hung peer costs one sample, never the run.
Every client call also reads /proc/stat before and after, giving the CPU time all cores spent while it ran.
"""

import subprocess
import time

from netplugin.benchlib import parse
from netplugin.benchlib.machine import cpu_busy_seconds
from netplugin.lab.system import in_ns

IPERF3_PORT = 5201
SOCKPERF_PORT = 11111
CLIENT_SLACK_S = 15.0


def start_iperf3_server(ns, bind, port=IPERF3_PORT):
    return subprocess.Popen(
        in_ns(ns, ["iperf3", "-s", "-B", bind, "-p", str(port)]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def start_sockperf_server(ns, bind, port=SOCKPERF_PORT):
    return subprocess.Popen(
        in_ns(ns, ["sockperf", "server", "--tcp", "-i", bind, "-p", str(port)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _run_client(ns, argv, duration):
    before = cpu_busy_seconds()
    p = subprocess.run(in_ns(ns, argv), capture_output=True, text=True, timeout=duration + CLIENT_SLACK_S)
    busy = cpu_busy_seconds() - before
    return p, busy


def iperf3_tcp(ns, target, length, duration, port=IPERF3_PORT):
    """One TCP test with ``-l length`` writes; adds ``cpu_busy_s`` (all CPUs) to the parsed result."""
    return _iperf3(ns, target, port, duration, length, [], parse.parse_iperf3_tcp)


def iperf3_udp(ns, target, length, duration, bandwidth, port=IPERF3_PORT):
    """One UDP test offering ``bandwidth`` (iperf3 syntax, e.g. '1G') in ``length``-byte datagrams."""
    return _iperf3(ns, target, port, duration, length, ["-u", "-b", str(bandwidth)], parse.parse_iperf3_udp)


def _iperf3(ns, target, port, duration, length, extra, parser):
    """One iperf3 client run, parsed, with the client's CPU time as ``cpu_busy_s``."""
    argv = ["iperf3", "-c", target, "-p", str(port), *extra, "-t", str(duration), "-l", str(length), "--json"]
    p, busy = _run_client(ns, argv + ["--connect-timeout", "3000"], duration)
    result = parser(p.stdout)
    result["cpu_busy_s"] = busy
    return result


def sockperf_tcp_pingpong(ns, target, duration, port=SOCKPERF_PORT, cpu=None):
    """TCP ping-pong latency (sockperf's default message size, half round trip as sockperf reports it); with
    ``cpu``, the client runs pinned to that CPU (see ``pin``)."""
    argv = ["sockperf", "ping-pong", "--tcp", "-i", target, "-p", str(port), "-t", str(duration)]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu)] + argv
    p, _ = _run_client(ns, argv, duration)
    return parse.parse_sockperf(p.stdout + p.stderr)


def pin(pid, cpu):
    """Move every thread of a running process (a server) onto one CPU.

    Ping-pong latency between two processes is bimodal on a VM: on one CPU the wake-up is direct, across CPUs it
    costs an inter-processor interrupt (tens of µs here), which would swamp the data path's own cost. Pinning
    both ends of a latency test to the same CPU measures the path; the benchmark rotates the CPU per round.
    """
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True, capture_output=True, timeout=10)


def wait_listening(ns, port, timeout=5.0):
    """True once something in ``ns`` listens on TCP ``port`` (polled with ``ss``; bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = subprocess.run(
            in_ns(ns, ["ss", "-Hltn", f"sport = :{port}"]), capture_output=True, text=True, timeout=5
        )
        if probe.returncode == 0 and probe.stdout.strip():
            return True
        time.sleep(0.05)
    return False
