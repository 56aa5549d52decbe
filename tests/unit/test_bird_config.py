"""BIRD config rendering: topology per mode, naming, determinism, and `bird -p` accepting every variant."""

import random
import re
import shutil

import pytest

from netplugin.errors import InvalidInput
from netplugin.routing.bird import check_config
from netplugin.routing.bird_config import plan_sessions, protocol_name, render_bird_config
from netplugin.routing.constants import ROUTE_PROTO
from netplugin.routing.model import BgpNode, BgpPeer, BgpSettings, RoutingInput

A = BgpNode("node-a", "10.0.0.1", "fd00::1")
B = BgpNode("node-b", "10.0.0.2", "fd00::2")
C = BgpNode("node-c", "10.0.0.3")
RR1 = BgpNode("rr-1", "10.0.0.11", route_reflector=True, cluster_id="1.1.1.1")
RR2 = BgpNode("rr-2", "10.0.0.12", route_reflector=True, cluster_id="1.1.1.1")
TOR = BgpPeer("tor1", "10.0.0.254", 65000, password="s3cret")
NODES = (A, B, C)


def inp(node, nodes=NODES, peers=(), settings=None, blocks=("10.1.0.0/26",)):
    return RoutingInput(node=node, nodes=nodes, peers=peers, settings=settings or BgpSettings(), blocks=blocks)


def sessions_by_peer(i):
    return {(s.peer_name, s.version): s for s in plan_sessions(i)}


def protocol_block(text, name):
    m = re.search(rf"^protocol bgp {name}\n\{{\n(.*?)^\}}", text, re.S | re.M)
    assert m, f"no protocol {name} in:\n{text}"
    return m.group(1)


# --- topology ---------------------------------------------------------------------------------------------


def test_mesh_peers_with_every_other_node_ibgp():
    s = sessions_by_peer(inp(A))
    assert set(s) == {("node-b", 4), ("node-c", 4), ("node-b", 6)}  # node-c has no IPv6 address
    b4 = s[("node-b", 4)]
    assert (b4.local_address, b4.peer_address, b4.local_as, b4.peer_as) == ("10.0.0.1", "10.0.0.2", 64512, 64512)
    assert b4.peer_type == "node-to-node mesh" and not b4.rr_client and not b4.reflect
    text = render_bird_config(inp(A))
    body = protocol_block(text, b4.name)
    for line in (
        "local 10.0.0.1 as 64512;",
        "neighbor 10.0.0.2 as 64512;",
        "direct;",
        "hold time 9;",
        "keepalive time 3;",
        "graceful restart on;",
        "export filter np_bgp_export4;",
        "next hop self;",
    ):
        assert line in body
    assert "rr client" not in text


def test_mesh_ignores_route_reflector_flags():
    s = sessions_by_peer(inp(RR1, nodes=(A, B, RR1, RR2)))
    assert {t.peer_type for t in s.values()} == {"node-to-node mesh"}
    assert {p for p, _ in s} == {"node-a", "node-b", "rr-2"}


def test_route_reflectors_with_mesh_off():
    nodes = (A, B, C, RR1, RR2)
    off = BgpSettings(mesh=False)
    rr = sessions_by_peer(inp(RR1, nodes=nodes, settings=off))
    assert {p for p, v in rr if v == 4} == {"node-a", "node-b", "node-c", "rr-2"}
    client = rr[("node-a", 4)]
    assert client.peer_type == "route reflector client" and client.rr_client and client.reflect
    assert client.cluster_id == "1.1.1.1"
    other_rr = rr[("rr-2", 4)]
    assert other_rr.peer_type == "route reflector" and not other_rr.rr_client and other_rr.reflect

    text = render_bird_config(inp(RR1, nodes=nodes, settings=off))
    body = protocol_block(text, client.name)
    assert "rr client;" in body and "rr cluster id 1.1.1.1;" in body
    # Keep the origin's next hop; the export function is told the peer's address (see the test below).
    assert "export where np_bgp_reflect4(10.0.0.1);" in body and "next hop self" not in body
    assert "export where np_bgp_reflect4(10.0.0.12);" in protocol_block(text, other_rr.name)

    plain = sessions_by_peer(inp(A, nodes=nodes, settings=off))
    assert {p for p, _ in plain} == {"rr-1", "rr-2"}  # only the reflectors, not node-b / node-c
    assert all(s.peer_type == "route reflector" and not s.reflect for s in plain.values())


def test_reflector_never_offers_a_route_back_to_its_next_hop():
    """Two reflectors in different clusters learn each client's routes from each other too. While that copy is a
    reflector's best path it must not go back to the client it points at: BIRD would refuse it at export and log
    "Invalid NEXT_HOP attribute - neighbor address" (seen in the two-reflector lab)."""
    rr1 = BgpNode("rr-1", "10.0.0.11", "fd00::11", route_reflector=True)
    rr2 = BgpNode("rr-2", "10.0.0.12", "fd00::12", route_reflector=True)
    i = inp(rr1, nodes=(A, C, rr1, rr2), settings=BgpSettings(mesh=False), blocks=("10.1.0.0/26", "fd10::/122"))
    text = render_bird_config(i)
    reflected = [s for s in plan_sessions(i) if s.reflect]
    assert {(s.peer_name, s.version) for s in reflected} == {
        ("node-a", 4),
        ("node-a", 6),
        ("node-c", 4),
        ("rr-2", 4),
        ("rr-2", 6),
    }
    for s in reflected:
        body = protocol_block(text, s.name)
        assert f"export where np_bgp_reflect{s.version}({s.peer_address});" in body, body
        assert "export filter" not in body and "next hop self" not in body
    for version in (4, 6):
        m = re.search(rf"^function np_bgp_reflect{version}\(ip peer\)\n\{{\n(.*?)^\}}", text, re.S | re.M)
        assert m, text
        checks = m.group(1).splitlines()
        # The next hop test comes first: no later `return true` can let such a route through.
        assert checks[0].strip() == "if source = RTS_BGP && bgp_next_hop = peer then return false;"
        assert checks[-1].strip() == "return false;"
    # Non-reflecting sessions export only our own routes with ourselves as next hop: nothing to check there.
    client = render_bird_config(inp(A, nodes=(A, C, rr1, rr2), settings=BgpSettings(mesh=False)))
    assert "export where" not in client and client.count("export filter np_bgp_export4;") == 2


def test_mesh_off_without_reflectors_has_no_node_sessions():
    assert plan_sessions(inp(A, settings=BgpSettings(mesh=False))) == []


def test_cluster_id_defaults_to_router_id():
    rr = BgpNode("rr-x", "10.0.0.20", route_reflector=True)
    s = sessions_by_peer(inp(rr, nodes=(rr, C), settings=BgpSettings(mesh=False)))
    assert s[("node-c", 4)].cluster_id == "10.0.0.20"


def test_explicit_ebgp_peers_global_and_node_specific():
    local = BgpPeer("tor-a", "10.0.0.253", 65001, node="node-a")
    peers = (TOR, local)
    on_a = sessions_by_peer(inp(A, peers=peers))
    on_b = sessions_by_peer(inp(B, peers=peers))
    assert on_a[("tor1", 4)].peer_type == "global" and ("tor1", 4) in on_b
    assert on_a[("tor-a", 4)].peer_type == "node-specific" and ("tor-a", 4) not in on_b
    tor = on_a[("tor1", 4)]
    assert (tor.local_as, tor.peer_as) == (64512, 65000)
    body = protocol_block(render_bird_config(inp(A, peers=peers)), tor.name)
    assert 'password "s3cret";' in body and "direct;" in body and "neighbor 10.0.0.254 as 65000;" in body
    assert "export filter np_bgp_export4;" in body


def test_explicit_peer_that_is_a_node_or_ourselves_is_not_duplicated():
    peers = (BgpPeer("dup-b", B.address, 64512), BgpPeer("me", A.address, 64512))
    s = sessions_by_peer(inp(A, peers=peers))
    assert ("dup-b", 4) not in s and ("me", 4) not in s
    assert [t.peer_address for t in s.values()].count(B.address) == 1


def test_per_node_as_makes_ebgp_between_nodes():
    a = BgpNode("node-a", "10.0.0.1", as_number=65001)
    b = BgpNode("node-b", "10.0.0.2", as_number=65002)
    c = BgpNode("node-c", "10.0.0.3")  # default AS from settings
    settings = BgpSettings(default_as=64600)
    s = sessions_by_peer(inp(a, nodes=(a, b, c), settings=settings))
    assert (s[("node-b", 4)].local_as, s[("node-b", 4)].peer_as) == (65001, 65002)
    assert s[("node-c", 4)].peer_as == 64600
    body = protocol_block(render_bird_config(inp(a, nodes=(a, b, c), settings=settings)), s[("node-b", 4)].name)
    assert "local 10.0.0.1 as 65001;" in body and "neighbor 10.0.0.2 as 65002;" in body


def test_route_reflector_client_in_other_as_is_plain_ebgp():
    client = BgpNode("node-x", "10.0.0.30", as_number=65099)
    s = sessions_by_peer(inp(RR1, nodes=(RR1, client), settings=BgpSettings(mesh=False)))
    assert not s[("node-x", 4)].rr_client


def test_ipv6_sessions_and_protocols():
    text = render_bird_config(inp(A, blocks=("10.1.0.0/26", "fd10::/122")))
    s = sessions_by_peer(inp(A))
    v6 = s[("node-b", 6)]
    assert v6.name.startswith("mesh6_") and (v6.local_address, v6.peer_address) == ("fd00::1", "fd00::2")
    body = protocol_block(text, v6.name)
    assert "ipv6 {" in body and "ipv4" not in body and "export filter np_bgp_export6;" in body
    assert "protocol kernel kernel6" in text and "route fd10::/122 blackhole;" in text
    assert "if net.len != 128 then return false;" in text and "fd10::/122+" in text
    # A node without IPv6 renders no IPv6 protocols and skips IPv6 peers.
    no6 = render_bird_config(inp(C, peers=(BgpPeer("tor6", "fd00::fe", 65000),)))
    assert "ipv6" not in no6 and "tor6" not in no6


def test_blocks_and_borrowed_filter():
    text = render_bird_config(inp(A, blocks=("10.1.0.64/26", "10.1.0.0/26")))
    assert "route 10.1.0.0/26 blackhole;\n  route 10.1.0.64/26 blackhole;" in text
    assert "if net ~ [ 10.1.0.0/26+, 10.1.0.64/26+ ] then return false;" in text
    assert f"if krt_source = {ROUTE_PROTO} then accept;" in text
    # No blocks yet: no empty prefix set (BIRD rejects one), every dataplane host route counts as borrowed.
    assert "net ~ [" not in render_bird_config(inp(A, blocks=()))


def test_listen_port_applies_to_node_sessions_only():
    text = render_bird_config(inp(A, peers=(TOR,), settings=BgpSettings(listen_port=1179)))
    body = protocol_block(text, sessions_by_peer(inp(A))[("node-b", 4)].name)
    assert "local 10.0.0.1 port 1179 as 64512;" in body and "neighbor 10.0.0.2 port 1179 as 64512;" in body
    assert "neighbor 10.0.0.254 as 65000;" in protocol_block(text, "peer_tor1")


def test_settings_reach_every_session():
    settings = BgpSettings(hold_time=30, keepalive=10, graceful_restart=False)
    text = render_bird_config(inp(A, peers=(TOR,), settings=settings))
    n = len(plan_sessions(inp(A, peers=(TOR,))))
    assert text.count("hold time 30;") == n and text.count("keepalive time 10;") == n
    assert text.count("graceful restart off;") == n
    assert "graceful restart time" not in text  # nothing to advertise with graceful restart off


def test_graceful_restart_times_are_rendered():
    text = render_bird_config(inp(A, peers=(TOR,), settings=BgpSettings(restart_time=45, restart_wait=12)))
    n = len(plan_sessions(inp(A, peers=(TOR,))))
    assert text.count("graceful restart time 45;") == n
    assert text.count("graceful restart on;") == n + 2  # and both kernel protocols
    assert re.search(r"^graceful restart wait 12;$", text, re.M)  # global: the restarting BIRD's bound
    defaults = render_bird_config(inp(A))
    assert "graceful restart time 30;" in defaults and "graceful restart wait 20;" in defaults
    # The kernel protocol takes part in recovery, so a BIRD started with -R keeps the kernel routes it finds.
    assert re.search(r"protocol kernel kernel4\n\{[^}]*\};[^}]*graceful restart on;", defaults)
    assert "persist" not in defaults


# --- naming and determinism --------------------------------------------------------------------------------


def test_protocol_names_are_valid_distinct_and_stable():
    names = ["node-a", "node.a", "node_a", "Node_A", "a" * 200, "a" * 199 + "b", "1node"]
    rendered = [protocol_name("mesh", n) for n in names]
    assert len(set(rendered)) == len(rendered)
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", r) for r in rendered), rendered
    assert protocol_name("mesh", "node_a") == "mesh_node_a"  # already valid: kept as is
    assert protocol_name("mesh", "node-a") == protocol_name("mesh", "node-a")
    assert protocol_name("mesh", "node-a").startswith("mesh_node_a_")


def test_rendering_is_deterministic():
    nodes = [A, B, C, RR1, RR2]
    peers = [TOR, BgpPeer("tor-b", "10.0.0.250", 65002, node="node-a"), BgpPeer("x6", "fd00::99", 65003)]
    blocks = ["10.1.0.64/26", "fd10::/122", "10.1.0.0/26"]
    first = render_bird_config(inp(A, nodes=nodes, peers=peers, blocks=blocks))
    rnd = random.Random(7)
    for _ in range(5):
        for lst in (nodes, peers, blocks):
            rnd.shuffle(lst)
        assert render_bird_config(inp(A, nodes=list(nodes), peers=list(peers), blocks=list(blocks))) == first


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: BgpNode("node-a", "10.0.0.300"), "not an IP address"),
        (lambda: BgpNode("node-a", "fd00::1"), "expected an IPv4"),
        (lambda: BgpNode("node-a", "10.0.0.1", address6="10.0.0.2"), "expected an IPv6"),
        (lambda: BgpNode('bad"name', "10.0.0.1"), "invalid node name"),
        (lambda: BgpNode("node-a", "10.0.0.1", as_number=0), "AS number"),
        (lambda: BgpNode("node-a", "10.0.0.1", cluster_id="x"), "cluster id"),
        (lambda: BgpPeer("p", "10.0.0.9", 2**32), "AS number"),
        (lambda: BgpPeer("p", "10.0.0.9", 65000, password='a"b'), "password"),
        (lambda: BgpSettings(hold_time=2), "hold time"),
        (lambda: BgpSettings(keepalive=9), "keepalive"),
        (lambda: BgpSettings(listen_port=70000), "listen port"),
        (lambda: BgpSettings(restart_time=0), "graceful restart time"),
        (lambda: BgpSettings(restart_time=4096), "graceful restart time"),
        (lambda: BgpSettings(restart_time=True), "graceful restart time"),
        (lambda: BgpSettings(restart_wait=0), "graceful restart wait"),
        (lambda: BgpSettings(restart_wait="20"), "graceful restart wait"),
        (lambda: inp(A, blocks=("10.1.0.1/26",)), "host bits"),
        (lambda: inp(A, nodes=(A, B, BgpNode("node-b", "10.0.0.9"))), "duplicate node name"),
        (lambda: inp(A, nodes=(A, BgpNode("node-z", "10.0.0.2"), B)), "both use address"),
        (lambda: inp(A, peers=(TOR, TOR)), "duplicate BGP peer name"),
        (lambda: inp(A, nodes=(BgpNode("node-a", "10.0.0.99"), B)), "different settings"),
    ],
)
def test_bad_input_is_a_clear_error(make, words):
    with pytest.raises(InvalidInput, match=words):
        make()


# --- BIRD itself accepts what we render ----------------------------------------------------------------------

VARIANTS = {
    "mesh": lambda: inp(A),
    "mesh-no-blocks": lambda: inp(A, blocks=()),
    "single-node": lambda: inp(C, nodes=(C,)),
    "rr-reflector": lambda: inp(RR1, nodes=(A, B, C, RR1, RR2), settings=BgpSettings(mesh=False)),
    "rr-client": lambda: inp(A, nodes=(A, B, C, RR1, RR2), settings=BgpSettings(mesh=False)),
    "rr-reflector-ipv6": lambda: inp(
        BgpNode("rr-6", "10.0.0.13", "fd00::13", route_reflector=True),
        nodes=(A, B, BgpNode("rr-7", "10.0.0.14", "fd00::14", route_reflector=True)),
        settings=BgpSettings(mesh=False),
        blocks=("10.1.0.0/26", "fd10::/122"),
    ),
    "ebgp-peers": lambda: inp(A, peers=(TOR, BgpPeer("tor6", "fd00::fe", 65000, node="node-a"))),
    "per-node-as": lambda: inp(
        BgpNode("node-a", "10.0.0.1", as_number=65001), nodes=(BgpNode("node-b", "10.0.0.2", as_number=65002), C)
    ),
    "ipv6": lambda: inp(A, blocks=("10.1.0.0/26", "fd10::/122", "fd10::40/122")),
    "ipv6-blocks-only": lambda: inp(C, blocks=("fd10::/122",)),
    "odd-names": lambda: inp(
        BgpNode("x" * 120, "10.0.0.1"),
        nodes=(BgpNode("node.with.dots", "10.0.0.2"), BgpNode("9-starts-with-digit", "10.0.0.3")),
    ),
    "settings": lambda: inp(
        A,
        settings=BgpSettings(hold_time=3, keepalive=1, graceful_restart=False, listen_port=1179, default_as=4200000000),
    ),
    "graceful-restart-bounds": lambda: inp(A, settings=BgpSettings(restart_time=4095, restart_wait=3600)),
}


@pytest.mark.skipif(shutil.which("bird") is None, reason="bird not installed")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bird_accepts_rendered_config(variant, tmp_path):
    path = tmp_path / "bird.conf"
    path.write_text(render_bird_config(VARIANTS[variant]()))
    check_config(str(path))


@pytest.mark.skipif(shutil.which("bird") is None, reason="bird not installed")
def test_bird_rejection_is_reported_with_context(tmp_path):
    path = tmp_path / "bird.conf"
    path.write_text(render_bird_config(inp(A)).replace("direct;", "direkt;", 1))
    with pytest.raises(InvalidInput, match=r"BIRD rejected config .*bird.conf:\d+:\d+") as err:
        check_config(str(path))
    assert "direkt;" in err.value.details and ">" in err.value.details
