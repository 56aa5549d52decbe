"""Connectivity probes run inside a namespace: ``python -c PROBE JSON TIMEOUT`` with JSON a list of
[kind, dst, port] (kind tcp, udp or icmp; IPv4 or IPv6); prints a JSON list of booleans. All probes run at once,
each bounded by TIMEOUT seconds. ``python -c SERVER TCP_PORTS UDP_PORT [LIFETIME]`` echoes on those ports
(IPv4 and IPv6) and prints "ready". ``Conversation`` keeps one connection (or UDP flow) open across changes."""

import json
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

from netplugin.lab.netns import nsexec
from netplugin.lab.system import ns_argv

SERVER = r"""
import socket, sys, threading
def echo(c):  # until the peer closes: a probe's one exchange, or a Conversation's many
    c.settimeout(120)
    try:
        while data := c.recv(64):
            c.sendall(data)
    except OSError:
        pass
    c.close()
def tcp(port):
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(("::", port)); s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
def udp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(("::", port))
    while True:
        data, peer = s.recvfrom(64); s.sendto(data, peer)
for p in sys.argv[1].split(","):
    threading.Thread(target=tcp, args=(int(p),), daemon=True).start()
threading.Thread(target=udp, args=(int(sys.argv[2]),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait(float(sys.argv[3]) if len(sys.argv) > 3 else 300)  # bounded; tests kill it sooner
"""

PROBE = r"""
import json, os, socket, struct, sys, time
from concurrent.futures import ThreadPoolExecutor
TIMEOUT = float(sys.argv[2])
def checksum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
def probe(p):
    kind, dst, port = p
    try:
        if kind == "tcp":
            with socket.create_connection((dst, port), timeout=TIMEOUT) as s:
                s.sendall(b"ping"); return s.recv(4) == b"ping"
        if kind == "udp":
            with socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(TIMEOUT); s.sendto(b"ping", (dst, port)); return s.recvfrom(64)[0] == b"ping"
        v6 = ":" in dst
        ident = (os.getpid() + port * 7919 + sum(map(ord, dst))) & 0xffff
        hdr = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, 1) + b"np-probe"
        pkt = hdr if v6 else hdr[:2] + struct.pack("!H", checksum(hdr)) + hdr[4:]  # the kernel sums ICMPv6
        family, proto, reply = ((socket.AF_INET6, socket.IPPROTO_ICMPV6, 129) if v6
                                else (socket.AF_INET, socket.IPPROTO_ICMP, 0))
        with socket.socket(family, socket.SOCK_RAW, proto) as s:
            s.sendto(pkt, (dst, 0)); deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                data, addr = s.recvfrom(256)
                icmp = data if v6 else data[(data[0] & 0x0f) * 4:]
                if addr[0] == dst and icmp[0] == reply and struct.unpack("!H", icmp[4:6])[0] == ident:
                    return True
    except OSError:
        return False
    return False
probes = [tuple(p) for p in json.loads(sys.argv[1])]
with ThreadPoolExecutor(len(probes)) as pool:
    print(json.dumps(list(pool.map(probe, probes))))
"""


def assert_reachability(netns, src, checks, ip_of, timeout):
    """checks: (kind, dst key, port, passes?); all probes run at once from ``netns``; every mismatch is listed."""
    probes = [(kind, ip_of[dst], port) for kind, dst, port, _ in checks]
    out = nsexec(netns, [sys.executable, "-c", PROBE, json.dumps(probes), str(timeout)], timeout=30)
    got = json.loads(out.stdout)
    wrong = [
        f"{src}->{dst} {kind}/{port}: want {'pass' if want else 'blocked'}, got {'pass' if ok else 'blocked'}"
        for (kind, dst, port, want), ok in zip(checks, got)
        if ok != want
    ]
    assert not wrong, "\n".join(wrong)


def start_echo_server(netns, tcp_ports, udp_port, what):
    """The SERVER script in ``netns``, echoing on ``tcp_ports`` and ``udp_port``; returns once it is ready.
    The caller kills the process (it is not bounded in time)."""
    proc = subprocess.Popen(
        ns_argv(netns, [sys.executable, "-c", SERVER, ",".join(map(str, tcp_ports)), str(udp_port)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready", f"server in {what} did not start"
    return proc


class Pinger:
    """``ping`` from ``netns`` every ``interval`` s: ``count`` echoes, or (None) until ``result()``, which is
    (transmitted, received); ``output`` keeps ping's summary. The one ping-during-a-fault helper of the suites."""

    def __init__(self, netns, address, interval=0.01, count=None):
        self.interval, self.count, self.output = interval, count, ""
        self.proc = subprocess.Popen(
            ns_argv(
                netns,
                ["ping", "-q", "-n", "-i", str(interval), "-W", "1", *(["-c", str(count)] if count else []), address],
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def running(self):
        return self.proc.poll() is None

    def result(self, timeout=None):
        if self.count is None:
            assert self.running(), "ping ended early: the test proved nothing"
            self.proc.send_signal(signal.SIGINT)  # ping prints its summary
        self.output = self.proc.communicate(timeout=timeout or (self.count or 0) * self.interval + 30)[0]
        m = re.search(r"(\d+) packets transmitted, (\d+) received", self.output)
        assert m, self.output
        return int(m.group(1)), int(m.group(2))

    def stop(self):
        if self.running():
            self.proc.kill()
            self.proc.wait()


@contextmanager
def steady_ping(netns, address, count, interval=0.01):
    """``count`` pings ``interval`` s apart from ``netns`` while the block runs (a fault happens inside it); on exit
    the yielded dict holds ``transmitted``, ``received`` and ``output``. The block must end before the ping does,
    or the measurement would not span the fault: that is asserted."""
    pinger = Pinger(netns, address, interval, count)
    result = {}
    try:
        yield result
        assert pinger.running(), "the ping ended before the fault did: the measurement proved nothing"
        sent, received = pinger.result()
        result.update(transmitted=sent, received=received, output=pinger.output)
    finally:
        pinger.stop()


def pings_during(netns, dst, action, count=400, interval=0.01, lead=0.5):
    """(transmitted, received, ping's output) of ``count`` echoes ``interval`` apart from ``netns`` to ``dst``,
    with ``action()`` run ``lead`` seconds after the first (``steady_ping`` around it)."""
    with steady_ping(netns, dst, count, interval) as result:
        time.sleep(lead)
        action()
    return result["transmitted"], result["received"], result["output"]


CONVERSATION = r"""
import signal, socket, sys
kind, dst, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
signal.alarm(300)  # bounded: the test closes it sooner
family = socket.AF_INET6 if ":" in dst else socket.AF_INET
try:
    if kind == "tcp":
        s = socket.create_connection((dst, port), timeout=timeout)
    else:
        s = socket.socket(family, socket.SOCK_DGRAM); s.settimeout(timeout); s.connect((dst, port))
except OSError as e:
    print("failed", e, flush=True); sys.exit()
print("open", s.getsockname()[1], flush=True)
for n, _ in enumerate(sys.stdin):
    token, got = b"%08d" % n, b""
    try:
        s.send(token)
        while not got.endswith(token):  # echoes of exchanges that timed out may come first
            got += s.recv(64)
        print(1, flush=True)
    except OSError:
        print(0, flush=True)
"""


class Conversation:
    """One TCP connection, or one UDP flow (a fixed source port), from ``netns`` to an echo server, kept open
    while the test changes things; ``exchange()`` sends a token and says whether its echo came back within
    ``timeout`` seconds. ``port`` is the client's source port (to find its conntrack entry)."""

    def __init__(self, netns, kind, dst, port, timeout=1.0):
        self.what = f"{kind} {dst}:{port}"
        self.proc = subprocess.Popen(
            ns_argv(netns, [sys.executable, "-c", CONVERSATION, kind, dst, str(port), str(timeout)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        first = self.proc.stdout.readline().split()
        if first[:1] != ["open"]:
            self.close()
            raise AssertionError(f"{self.what} did not open: {' '.join(first) or 'no answer'}")
        self.port = int(first[1])

    def exchange(self):
        self.proc.stdin.write("x\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip() == "1"

    def close(self):
        self.proc.kill()
        self.proc.wait()
