"""A reachability prober run inside one host namespace (stdlib only; started once, fed over stdin).

Each input line is ``ADDRESS TIMEOUT``; the prober sends an ICMP echo every 20 ms (send errors such as "network
unreachable" before the route arrives are ignored) until the first matching reply, then writes
``ok ADDRESS T`` with T the reply's arrival on CLOCK_MONOTONIC (the same clock in every process, so the caller
can subtract its own start time), or ``timeout ADDRESS``. One long-lived process per host keeps the benchmark's
own process start-up costs out of the figures it measures.
"""

import os
import select
import socket
import struct
import sys
import time

INTERVAL = 0.02
ECHO_REQUEST, ECHO_REPLY = 8, 0


def _checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _echo(ident, seq):
    payload = b"netplugin-lab-probe"
    header = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ECHO_REQUEST, 0, _checksum(header + payload), ident, seq) + payload


def probe(sock, ident, address, timeout):
    """Monotonic time of the first echo reply from ``address``, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    seq, next_send = 0, 0.0
    while True:
        now = time.monotonic()
        if now >= deadline:
            return None
        if now >= next_send:
            seq = (seq + 1) & 0xFFFF
            try:
                sock.sendto(_echo(ident, seq), (address, 0))
            except OSError:
                pass  # no route yet, or ARP failed: try again at the next tick
            next_send = now + INTERVAL
        ready, _, _ = select.select([sock], [], [], max(0.0, min(next_send, deadline) - now))
        if not ready:
            continue
        data, (src, _) = sock.recvfrom(2048)
        arrived = time.monotonic()
        ihl = (data[0] & 0x0F) * 4
        if src == address and len(data) >= ihl + 8:
            kind, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if kind == ECHO_REPLY and rid == ident:
                return arrived


def main():
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    print("ready", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if len(parts) != 2:
            print(f"error bad request {line.strip()!r}", flush=True)
            continue
        address, timeout = parts[0], float(parts[1])
        t = probe(sock, ident, address, min(timeout, 120.0))
        print(f"ok {address} {t:.6f}" if t is not None else f"timeout {address}", flush=True)


if __name__ == "__main__":
    main()
