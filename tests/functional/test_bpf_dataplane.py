"""Two hosts, a container on each, the tc programs on the host veths and the fabric: real ping and TCP over
the BPF redirects, policy and anti-spoofing enforced in BPF (this lab has no iptables rules at all), flows
keeping their verdict, pins and filters outliving the loader."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from netplugin.kernel.bpf import loader, records
from netplugin.lab.bpflab import CONTAINER, FABRIC, TwoHostLab, link_info
from netplugin.lab.netns import kill_pids, nsexec
from tests.probes import assert_reachability, start_echo_server
from tests.waiting import wait_until

pytestmark = pytest.mark.functional

REPO = Path(__file__).resolve().parents[2]
PEERS = ["10.252.0.0/16", "fd00:252::/32"]
DENY_7002 = [records.rule(records.ACT_DENY, proto=6, ports=[(7002, 7002)]), records.rule(records.ACT_ALLOW)]

# Run in a child that exits before the test looks: load, attach, fill the endpoint maps.
LOADER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from netplugin.lab.bpflab import TwoHostLab
    a = json.loads(sys.argv[1])
    lab = TwoHostLab(hosts=a["hosts"], containers=a["containers"])
    lab.program_endpoints(lab.load(a["obj"], Path(a["pins"])))
""")

RECEIVER = r"""
import socket, sys, json, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(("::", 9999)); s.settimeout(0.2)
print("ready", flush=True); seen = set(); end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        seen.add(s.recvfrom(64)[1][0].replace("::ffff:", ""))
    except OSError:
        pass
print(json.dumps(sorted(seen)))
"""

SENDER = r"""
import sys
from scapy.all import IP, IPv6, UDP, Ether, sendp, conf
conf.verb = 0
gw_mac, src4, dst4, src6, dst6 = sys.argv[1:6]
for src in sys.argv[6:]:
    v6 = ":" in src
    pkt = (IPv6(src=src, dst=dst6) if v6 else IP(src=src, dst=dst4)) / UDP(sport=4242, dport=9999) / b"spoof?"
    sendp(Ether(dst=gw_mac) / pkt, iface="eth0", count=3)
"""

# One long-lived TCP connection: every line on stdin sends a byte; "ok" or "lost" comes back.
SESSION = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); s.settimeout(1)
print("connected", flush=True)
for line in sys.stdin:
    try:
        s.sendall(b"x"); print("ok" if s.recv(1) == b"x" else "lost", flush=True)
    except OSError:
        print("lost", flush=True)
"""
STREAM_ECHO = r"""
import socket, sys, threading
def serve(c):
    while True:
        d = c.recv(64)
        if not d:
            return
        c.sendall(d)
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(("::", int(sys.argv[1]))); s.listen(8)
print("ready", flush=True)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""


@pytest.fixture
def lab(namespaces):
    return TwoHostLab(namespaces).build()


def load_in_child(lab, obj, pins):
    args = json.dumps({"hosts": lab.hosts, "containers": lab.containers, "obj": str(obj), "pins": str(pins)})
    p = subprocess.run([sys.executable, "-c", LOADER, args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return {side: loader.Pins(pins / side) for side in "ab"}


def received_from(lab, senders):
    """Sources cB's UDP 9999 saw while scapy in cA sent three datagrams from each of ``senders``."""
    recv = subprocess.Popen(
        ["ip", "netns", "exec", lab.containers["b"], sys.executable, "-c", RECEIVER, "3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert recv.stdout.readline().strip() == "ready"
        gw_mac = link_info(lab.hosts["a"], "cveth")[1]
        nsexec(
            lab.containers["a"],
            [
                sys.executable,
                "-c",
                SENDER,
                gw_mac,
                CONTAINER["a"][0],
                CONTAINER["b"][0],
                CONTAINER["a"][1],
                CONTAINER["b"][1],
                *senders,
            ],
            timeout=60,
        )
        out, _ = recv.communicate(timeout=10)
    finally:
        recv.kill()
        recv.wait()
    return set(json.loads(out.strip().splitlines()[-1]))


def reach(lab, src, dst, checks):
    """checks: (kind, port, passes?) toward both of ``dst``'s addresses, with an echo server there."""
    ip_of = {"4": CONTAINER[dst][0], "6": CONTAINER[dst][1]}
    server = start_echo_server(lab.containers[dst], [7001, 7002], 7003, f"container {dst}")
    try:
        assert_reachability(
            lab.containers[src],
            src,
            [(kind, fam, port, want) for fam in ("4", "6") for kind, port, want in checks],
            ip_of,
            timeout=3,
        )
    finally:
        kill_pids([server.pid])
        server.wait()


def test_bpf_forwarding_policy_spoofing_and_pins(lab, bpf_objects, bpffs):
    pins = load_in_child(lab, bpf_objects[""], bpffs)

    # the loader has exited: the programs are still attached and the maps still pinned and filled
    for side in "ab":
        assert loader.attached("cveth", netns=lab.hosts[side]) == ["from_container"]
        assert loader.attached("fab0", netns=lab.hosts[side]) == ["to_container"]
        with pins[side].map("np_locals") as m:
            assert sorted(m.keys()) == sorted(records.addr16(a) for a in CONTAINER[side])
        lab.program_policy(pins, side, DENY_7002, {0: PEERS, 1: PEERS})

    reach(lab, "a", "b", [("icmp", 0, True), ("tcp", 7001, True), ("udp", 7003, True), ("tcp", 7002, False)])
    a, b = lab.counters(pins, "a"), lab.counters(pins, "b")
    assert a["allowed"] > 0 and b["allowed"] > 0, (a, b)  # the redirects carried it, not the stack
    assert b["denied"] > 0, b  # TCP 7002, denied in BPF

    # outside the cluster's pools (the other host's fabric address): policy in BPF, then the stack (NAT lives there)
    nsexec(lab.containers["a"], ["ping", "-c", "2", "-W", "2", "-i", "0.2", FABRIC["b"][0]])
    assert lab.counters(pins, "a")["to_stack"] >= a["to_stack"] + 2

    spoofed_before = a["spoofed"]
    seen = received_from(lab, [CONTAINER["a"][0], "10.252.1.99", CONTAINER["a"][1], "fd00:252:1::99"])
    assert seen == {CONTAINER["a"][0], CONTAINER["a"][1]}, seen  # the genuine ones arrive, the forged do not
    assert lab.counters(pins, "a")["spoofed"] >= spoofed_before + 6


def test_without_programs_the_forged_source_gets_through(lab):
    """The lab itself does not filter: the spoofing test above would fail without the BPF program."""
    seen = received_from(lab, [CONTAINER["a"][0], "10.252.1.99"])
    assert seen == {CONTAINER["a"][0], "10.252.1.99"}, seen


def test_replies_ride_the_flow_and_new_flows_do_not(lab, bpf_objects, bpffs):
    """a denies all ingress, b allows a: a opens flows to b (the replies are the flow's), b cannot open one to a."""
    pins = lab.load(bpf_objects[""], bpffs)
    lab.program_endpoints(pins)
    lab.program_policy(pins, "a", [], {})
    lab.program_policy(pins, "b", DENY_7002, {0: PEERS, 1: PEERS})
    reach(lab, "a", "b", [("tcp", 7001, True), ("udp", 7003, True), ("icmp", 0, True)])
    reach(lab, "b", "a", [("tcp", 7001, False), ("udp", 7003, False)])
    with pins["a"].map("np_flows") as m:
        flows = [records.flow(k, v) for k, v in m.items()]
    assert any(
        f["dst"] == CONTAINER["b"][0] and f["dport"] == 7001 and f["orig"] and f["verdict"] == "allow" for f in flows
    ), flows


def test_established_flow_survives_a_policy_change_until_revoked(lab, bpf_objects, bpffs):
    pins = lab.load(bpf_objects[""], bpffs)
    lab.program_endpoints(pins)
    for side in "ab":
        lab.program_policy(pins, side, DENY_7002, {0: PEERS, 1: PEERS})
    server = subprocess.Popen(
        ["ip", "netns", "exec", lab.containers["b"], sys.executable, "-c", STREAM_ECHO, "7001"],
        stdout=subprocess.PIPE,
        text=True,
    )
    session = None
    try:
        assert server.stdout.readline().strip() == "ready"
        session = subprocess.Popen(
            ["ip", "netns", "exec", lab.containers["a"], sys.executable, "-c", SESSION, CONTAINER["b"][0], "7001"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert session.stdout.readline().strip() == "connected"

        def exchange():
            session.stdin.write("\n")
            session.stdin.flush()
            return session.stdout.readline().strip()

        assert exchange() == "ok"
        # a new policy that still allows the flow (now also denying UDP), then the re-check: it keeps flowing
        lab.program_policy(
            pins,
            "b",
            DENY_7002[:1] + [records.rule(records.ACT_DENY, proto=17)] + DENY_7002[1:],
            {0: PEERS, 1: PEERS, 2: PEERS},
        )
        lab.bump_generation(pins, "b")
        assert exchange() == "ok"
        # revoke: b's ingress denies a; the established connection stops at its next packet
        lab.program_policy(pins, "b", [records.rule(records.ACT_DENY)], {0: PEERS})
        lab.bump_generation(pins, "b")
        assert exchange() == "lost"
    finally:
        for p in (session, server):
            if p is not None:
                p.kill()
                p.wait()


def test_a_tcp_senders_gso_segments_are_redirected_not_handed_to_the_stack(lab, bpf_objects, bpffs):
    """A bulk TCP sender hands its veth 64 KB GSO super-packets; the FIB lookup must judge them by the segments
    they become (tot_len 0), or every one is FRAG_NEEDED and goes to the stack."""
    pins = lab.load(bpf_objects[""], bpffs)
    lab.program_endpoints(pins)
    for side in "ab":
        lab.program_policy(pins, side, [records.rule(records.ACT_ALLOW)], {0: PEERS})
    server = subprocess.Popen(["ip", "netns", "exec", lab.containers["b"], "iperf3", "-s", "-1"])
    try:
        wait_until(
            "iperf3 listening in container b",
            lambda: nsexec(lab.containers["b"], "ss -Hltn sport = :5201").stdout.strip(),
            timeout=5,
        )
        before = lab.counters(pins, "a")
        nsexec(lab.containers["a"], ["iperf3", "-c", CONTAINER["b"][0], "-t", "1", "-4"], timeout=30)
        after = lab.counters(pins, "a")
    finally:
        server.kill()
        server.wait()
    assert after["allowed"] - before["allowed"] > 1000, (before, after)
    assert after["to_stack"] - before["to_stack"] <= 5, (before, after)  # GSO packets were all redirected
