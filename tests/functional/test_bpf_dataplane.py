"""Two hosts, a container on each, the tc programs on the host veths and the fabric: real ping and TCP over
the BPF redirects, ingress policy and anti-spoofing enforced in BPF, pins and filters outliving the loader."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from netplugin.kernel.bpf import loader, records
from tests.bpflab import CONTAINER, TwoHostLab, bpf_objects, bpffs, link_info  # noqa: F401  (fixtures)
from tests.netns import kill_pids, nsexec
from tests.probes import assert_reachability, start_echo_server

pytestmark = pytest.mark.functional

REPO = Path(__file__).resolve().parents[2]
PEERS = ["10.252.0.0/16", "fd00:252::/32"]

# Run in a child that exits before the test looks: load, attach, fill the maps.
LOADER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from netplugin.kernel.bpf import records
    from tests.bpflab import TwoHostLab
    a = json.loads(sys.argv[1])
    lab = TwoHostLab(hosts=a["hosts"], containers=a["containers"])
    pins = lab.load(a["obj"], Path(a["pins"]))
    lab.program_endpoints(pins)
    # rule 0: deny TCP 7002 from the peers; rule 1: allow anything from the peers; otherwise deny
    lab.program_policy(pins, [records.rule(records.ACT_DENY, proto=6, ports=[(7002, 7002)]),
                              records.rule(records.ACT_ALLOW)], {0: a["peers"], 1: a["peers"]})
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


@pytest.fixture
def lab(namespaces):
    return TwoHostLab(namespaces).build()


def load_in_child(lab, obj, pins):
    args = json.dumps({"hosts": lab.hosts, "containers": lab.containers, "obj": str(obj), "pins": str(pins),
                       "peers": PEERS})
    p = subprocess.run([sys.executable, "-c", LOADER, args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return {side: loader.Pins(pins / side) for side in "ab"}


def received_from(lab, senders):
    """Sources cB's UDP 9999 saw while scapy in cA sent one forged-or-not datagram per ``senders`` address."""
    recv = subprocess.Popen(["ip", "netns", "exec", lab.containers["b"], sys.executable, "-c", RECEIVER, "3"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout.readline().strip() == "ready"
        gw_mac = link_info(lab.hosts["a"], "cveth")[1]
        nsexec(lab.containers["a"], [sys.executable, "-c", SENDER, gw_mac, CONTAINER["a"][0], CONTAINER["b"][0],
                                     CONTAINER["a"][1], CONTAINER["b"][1], *senders], timeout=60)
        out, _ = recv.communicate(timeout=10)
    finally:
        recv.kill()
        recv.wait()
    return set(json.loads(out.strip().splitlines()[-1]))


def test_bpf_forwarding_policy_spoofing_and_pins(lab, bpf_objects, bpffs):  # noqa: F811
    pins = load_in_child(lab, bpf_objects[""], bpffs)

    # the loader has exited: the programs are still attached and the maps still pinned and filled
    for side in "ab":
        assert loader.attached("cveth", netns=lab.hosts[side]) == ["from_container"]
        assert loader.attached("fab0", netns=lab.hosts[side]) == ["to_container"]
        with pins[side].map("np_locals") as m:
            assert sorted(m.keys()) == sorted(records.addr16(a) for a in CONTAINER[side])

    server = start_echo_server(lab.containers["b"], [7001, 7002], 7003, "container b")
    try:
        ip_of = {"b4": CONTAINER["b"][0], "b6": CONTAINER["b"][1]}
        checks = [(kind, dst, port, want) for dst in ("b4", "b6")
                  for kind, port, want in (("icmp", 0, True), ("tcp", 7001, True), ("udp", 7003, True),
                                           ("tcp", 7002, False))]
        assert_reachability(lab.containers["a"], "a", checks, ip_of, timeout=3)
    finally:
        kill_pids([server.pid])
        server.wait()
    a, b = lab.counters(pins, "a"), lab.counters(pins, "b")
    assert a["allowed"] > 0 and b["allowed"] > 0, (a, b)  # the redirects carried it, not the stack
    assert b["denied"] > 0, b  # TCP 7002, in BPF: this lab has no iptables rules at all

    spoofed_before = a["spoofed"]
    seen = received_from(lab, [CONTAINER["a"][0], "10.252.1.99", CONTAINER["a"][1], "fd00:252:1::99"])
    assert seen == {CONTAINER["a"][0], CONTAINER["a"][1]}, seen  # the genuine ones arrive, the forged do not
    assert lab.counters(pins, "a")["spoofed"] >= spoofed_before + 6


def test_without_programs_the_forged_source_gets_through(lab):
    """The lab itself does not filter: the spoofing test above would fail without the BPF program."""
    seen = received_from(lab, [CONTAINER["a"][0], "10.252.1.99"])
    assert seen == {CONTAINER["a"][0], "10.252.1.99"}, seen
