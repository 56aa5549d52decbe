"""Real BIRD in three host namespaces on one L2 segment (a bridge in a "fabric" namespace).

Each host owns a block, blackholed by "the dataplane" with proto 80 exactly as the real dataplane does; host 1
also has a container route borrowed from host 2's block and one inside its own block. BIRD learns these, the
rendered configs decide what is advertised, and we check the kernel tables BIRD writes.
"""

import ipaddress
import json
import os
import sys

import pytest

from netplugin.errors import InvalidInput
from netplugin.lab.netns import nsexec
from netplugin.routing.bird import BirdConfigWriter, BirdError, BirdProcess, bgp_status
from netplugin.routing.bird_config import render_bird_config
from netplugin.routing.constants import BIRD_PROTO, ROUTE_PROTO
from netplugin.routing.model import BgpNode, BgpSettings, RoutingInput
from tests.waiting import wait_until

pytestmark = pytest.mark.functional

HOSTS = (1, 2, 3)
SETTINGS = dict(hold_time=6, keepalive=2)
WAIT = 30  # BIRD waits 5 s ("connect delay") before its first connect; sessions are up well within this


def routes(ns, v6=False):
    """{dst: (gateway or type, protocol number)} of the namespace's main table."""
    out = nsexec(ns, ["ip", "-N", "-j"] + (["-6"] if v6 else []) + ["route", "show"]).stdout
    return {
        str(ipaddress.ip_network(r["dst"])): (r.get("gateway", r.get("type")), int(r["protocol"]))
        for r in json.loads(out or "[]")
        if r.get("protocol", "").isdigit() and r["dst"] != "default"
    }


PROBE = """
import socket, sys
s = socket.socket()
s.settimeout(2)
try:
    s.connect((sys.argv[1], 9))
except ConnectionRefusedError:
    sys.exit(0)  # the host answered with a reset: routed there and back
except OSError:
    sys.exit(1)
"""


def reaches(ns, addr):
    """True if a TCP SYN to ``addr`` gets an answer (a reset will do) from inside ``ns``."""
    return nsexec(ns, [sys.executable, "-c", PROBE, addr], check=False).returncode == 0


class Lab:
    def __init__(self, namespaces, run_dir):
        self.fabric = namespaces.add()
        nsexec(self.fabric, "ip link add br0 type bridge")
        nsexec(self.fabric, "ip link set br0 up")
        self.ns, self.birds, self.writers, self.nodes = {}, {}, {}, {}
        for i in HOSTS:
            ns = self.ns[i] = namespaces.add()
            namespaces.link(ns, self.fabric, name_b=f"p{i}")
            nsexec(self.fabric, f"ip link set p{i} master br0")
            nsexec(ns, f"ip addr add 10.99.0.{i}/24 dev eth0")
            nsexec(ns, f"ip -6 addr add fd99::{i}/64 dev eth0 nodad")
            # What the dataplane does for an owned block: a blackhole with proto 80.
            nsexec(ns, f"ip route add blackhole 10.1.{i}.0/26 proto {ROUTE_PROTO}")
            nsexec(ns, f"ip -6 route add blackhole fd10:{i}::/122 proto {ROUTE_PROTO}")
            nsexec(ns, f"ip addr add 10.1.{i}.1/32 dev lo")  # something to ping inside the block
            self.nodes[i] = BgpNode(f"host-{i}", f"10.99.0.{i}", f"fd99::{i}")
            self.birds[i] = BirdProcess(os.path.join(run_dir, f"h{i}"), netns=ns)
            self.writers[i] = BirdConfigWriter(self.birds[i])
        # Host 1's container routes: one borrowed from host 2's block, one inside its own block.
        nsexec(self.ns[1], "ip link add cali1 type veth peer name cali1p")
        nsexec(self.ns[1], "ip link set cali1 up")
        nsexec(self.ns[1], "ip link set cali1p up")
        nsexec(self.ns[1], f"ip route add 10.1.2.5/32 dev cali1 proto {ROUTE_PROTO} scope link")
        nsexec(self.ns[1], f"ip route add 10.1.1.5/32 dev cali1 proto {ROUTE_PROTO} scope link")

    def config(self, i, **settings):
        return render_bird_config(
            RoutingInput(
                node=self.nodes[i],
                nodes=tuple(self.nodes.values()),
                settings=BgpSettings(**{**SETTINGS, **settings}),
                blocks=(f"10.1.{i}.0/26", f"fd10:{i}::/122"),
            )
        )

    def established(self, i):
        return sorted(
            (r.peer_address, r.peer_type) for r in bgp_status(self.birds[i].sock_path) if r.state == "Established"
        )

    def stop(self):
        for bird in self.birds.values():
            bird.stop()


@pytest.fixture
def lab(namespaces, tmp_path):
    lab = None
    try:
        lab = Lab(namespaces, str(tmp_path))
        yield lab
    finally:
        if lab is not None:
            lab.stop()
            assert all(b.pid() is None for b in lab.birds.values())


def test_mesh_then_route_reflectors(lab):
    for i in HOSTS:
        assert lab.writers[i].apply(lab.config(i)) is True
        lab.birds[i].start()

    # Full mesh: every host reaches every other host's blocks via that host, installed as proto bird.
    def mesh_routes_ok():
        for i in HOSTS:
            v4, v6 = routes(lab.ns[i]), routes(lab.ns[i], v6=True)
            for j in HOSTS:
                if j != i and (
                    v4.get(f"10.1.{j}.0/26") != (f"10.99.0.{j}", BIRD_PROTO)
                    or v6.get(f"fd10:{j}::/122") != (f"fd99::{j}", BIRD_PROTO)
                ):
                    return False
        return True

    wait_until("mesh routes", mesh_routes_ok, WAIT)
    # The borrowed /32 is advertised (more specific than host 2's own blackhole); the one inside host 1's
    # block is not; host 1's own routes stay the dataplane's, never duplicated by BIRD.
    wait_until(
        "borrowed /32",
        lambda: all(routes(lab.ns[j]).get("10.1.2.5/32") == ("10.99.0.1", BIRD_PROTO) for j in (2, 3)),
        WAIT,
    )
    assert "10.1.1.5/32" not in routes(lab.ns[2]) and "10.1.1.5/32" not in routes(lab.ns[3])
    own = routes(lab.ns[1])
    assert own["10.1.1.0/26"] == ("6", ROUTE_PROTO) and own["10.1.2.5/32"][1] == ROUTE_PROTO
    assert not any(proto == BIRD_PROTO and dst.startswith("10.1.1.") for dst, (_, proto) in own.items())
    assert reaches(lab.ns[2], "10.1.1.1")  # traffic follows the learned route, and back
    assert not reaches(lab.ns[2], "10.1.9.1")  # no block there: no route, no answer

    mesh = "node-to-node mesh"
    want = {
        i: sorted([(f"10.99.0.{j}", mesh) for j in HOSTS if j != i] + [(f"fd99::{j}", mesh) for j in HOSTS if j != i])
        for i in HOSTS
    }
    wait_until("4 established sessions per host", lambda: all(lab.established(i) == want[i] for i in HOSTS), WAIT)
    status = {r.peer_address: r.state for r in bgp_status(lab.birds[1].sock_path)}
    assert status["10.99.0.2"] == status["fd99::2"] == "Established"

    # Re-applying equal input changes nothing.
    assert lab.writers[1].apply(lab.config(1)) is False

    # A config BIRD rejects: error with BIRD's message, live file and running BIRD untouched.
    conf = lab.birds[1].conf_path
    before = open(conf).read()
    with pytest.raises(InvalidInput, match=r"BIRD rejected config .*:\d+:\d+"):
        lab.writers[1].apply(before.replace("direct;", "direkt;", 1))
    assert open(conf).read() == before
    assert sorted(os.listdir(lab.birds[1].run_dir)) == ["bird.conf", "bird.ctl", "bird.log", "bird.pid"]
    assert lab.birds[1].running() and lab.established(1) == want[1]

    # Mesh off, host 1 reflects: hosts 2 and 3 peer only with it and still learn each other's blocks, with
    # the originating host as next hop (the reflector does not put itself in the path).
    for i in HOSTS:
        lab.nodes[i] = BgpNode(f"host-{i}", f"10.99.0.{i}", f"fd99::{i}", route_reflector=(i == 1))
    for i in HOSTS:
        assert lab.writers[i].apply(lab.config(i, mesh=False)) is True
    rr, client = "route reflector", "route reflector client"
    want_rr = {
        1: sorted([("10.99.0.2", client), ("10.99.0.3", client), ("fd99::2", client), ("fd99::3", client)]),
        2: [("10.99.0.1", rr), ("fd99::1", rr)],
        3: [("10.99.0.1", rr), ("fd99::1", rr)],
    }
    wait_until("route reflector sessions", lambda: all(lab.established(i) == want_rr[i] for i in HOSTS), WAIT)
    assert all(len(bgp_status(lab.birds[i].sock_path)) == len(want_rr[i]) for i in HOSTS)  # mesh sessions gone
    wait_until(
        "reflected routes",
        lambda: (
            routes(lab.ns[3]).get("10.1.2.0/26") == ("10.99.0.2", BIRD_PROTO)
            and routes(lab.ns[2]).get("10.1.3.0/26") == ("10.99.0.3", BIRD_PROTO)
            and routes(lab.ns[3], v6=True).get("fd10:2::/122") == ("fd99::2", BIRD_PROTO)
            and routes(lab.ns[3]).get("10.1.2.5/32") == ("10.99.0.1", BIRD_PROTO)
            and mesh_routes_ok()
        ),
        WAIT,
    )


def test_start_in_missing_namespace_fails_cleanly(tmp_path):
    bird = BirdProcess(str(tmp_path), netns="npt-doesnotexist")
    writer = BirdConfigWriter(bird)
    node = BgpNode("host-1", "10.99.0.1")
    assert writer.apply(render_bird_config(RoutingInput(node=node, nodes=(node,)))) is True  # not running yet
    with pytest.raises(BirdError, match="does not exist"):
        bird.start()
    assert bird.pid() is None and not bird.running()


def test_start_stop_is_idempotent(namespaces, tmp_path):
    ns = namespaces.add()
    nsexec(ns, "ip link add eth0 type veth peer name eth1")
    nsexec(ns, "ip addr add 10.99.0.1/24 dev eth0")
    bird = BirdProcess(str(tmp_path), netns=ns)
    try:
        node = BgpNode("host-1", "10.99.0.1")
        BirdConfigWriter(bird).apply(render_bird_config(RoutingInput(node=node, nodes=(node,))))
        bird.start()
        pid = bird.pid()
        assert pid and bird.running()
        bird.start()  # already running: kept
        assert bird.pid() == pid
        # A second handle (an agent restart) finds the same BIRD through the pid file and can stop it.
        again = BirdProcess(str(tmp_path), netns=ns)
        assert again.running() and again.pid() == pid
        again.stop()
        assert not again.running() and again.pid() is None and not bird.running()
        bird.stop()  # nothing left to stop
    finally:
        bird.stop()
