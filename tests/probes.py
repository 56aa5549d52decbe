"""Connectivity probes run inside a namespace: ``python -c PROBE JSON TIMEOUT`` with JSON a list of
[kind, dst, port] (kind tcp, udp or icmp; IPv4 or IPv6); prints a JSON list of booleans. All probes run at once,
each bounded by TIMEOUT seconds."""

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
