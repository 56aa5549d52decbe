"""A many-target reachability prober, run inside one namespace (stdlib and netplugin.lab.prober only).

Each input line is ``ADDRESS TIMEOUT``: the address joins the pending set, and every pending address gets an ICMP
echo every 50 ms until its first reply (``ok ADDRESS T``, T on CLOCK_MONOTONIC, the clock of every process) or
until its timeout (``timeout ADDRESS``). One process serves any number of targets at once, so a churn of a
thousand containers costs a handful of probers, not a thousand ``ping`` processes. End of input stops it.
"""

import os
import select
import socket
import struct
import subprocess
import sys
import time

from netplugin.lab.prober import ECHO_REPLY, _echo

INTERVAL = 0.05


def _replies(sock, ident, pending, out):
    """Read every queued reply; report and drop the pending targets that answered."""
    while True:
        try:
            data, (src, _) = sock.recvfrom(2048)
        except BlockingIOError:
            return
        arrived = time.monotonic()
        ihl = (data[0] & 0x0F) * 4
        if src in pending and len(data) >= ihl + 8:
            kind, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if kind == ECHO_REPLY and rid == ident:
                del pending[src]
                out.write(f"ok {src} {arrived:.6f}\n")


def serve(inp, out):
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setblocking(False)
    ident = os.getpid() & 0xFFFF
    pending, buf, seq, next_send, eof = {}, b"", 0, 0.0, False
    out.write("ready\n")
    out.flush()
    fd = inp.fileno()
    while not eof or pending:
        now = time.monotonic()
        if now >= next_send:
            seq = (seq + 1) & 0xFFFF
            for address, deadline in list(pending.items()):
                if now >= deadline:
                    del pending[address]
                    out.write(f"timeout {address}\n")
                    continue
                try:
                    sock.sendto(_echo(ident, seq), (address, 0))
                except OSError:
                    pass  # no route yet: the next round tries again
            next_send = now + INTERVAL
        out.flush()
        ready, _, _ = select.select([sock] + ([] if eof else [fd]), [], [], max(0.0, next_send - now))
        if sock in ready:
            _replies(sock, ident, pending, out)
        if fd in ready:
            data = os.read(fd, 65536)
            eof = not data
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                parts = line.decode().split()
                if len(parts) == 2:
                    pending[parts[0]] = time.monotonic() + min(float(parts[1]), 600.0)
    out.flush()


def stop(procs):
    """End prober processes (this one or netplugin/lab/prober.py) as they expect, by closing their input;
    one that has not exited 5 s later is killed."""
    for p in procs:
        try:
            p.stdin.close()
        except OSError:
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
