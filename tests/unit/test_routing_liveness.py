"""Which peer nodes the BGP config keeps: a node without a liveness lease stays only while a session with it is
Established (agent/routing.py). Graceful restart is on with the model's restart times."""

from netplugin.agent.routing import established_nodes, lease_less_nodes, routing_input
from netplugin.agent.view import ClusterView
from netplugin.datastore.models import ClusterConfig, Node
from netplugin.routing.bird import BgpStatusRow
from netplugin.routing.bird_config import plan_sessions, render_bird_config
from netplugin.routing.model import BgpSettings


def _view(alive=("h1", "h2", "h3", "rr")):
    v = ClusterView(config=ClusterConfig())
    v.nodes = {
        "h1": Node("h1", "192.168.1.1"),
        "h2": Node("h2", "192.168.1.2", address6="fd00:0::2"),
        "h3": Node("h3", "192.168.1.3"),
        "rr": Node("rr", "192.168.1.9", route_reflector=True),
        "nowhere": Node("nowhere", None),
    }
    v.alive = set(alive)
    v.blocks = {"h1": ["10.0.0.0/26"]}
    return v


def _row(address, state):
    return BgpStatusRow(name="x", peer_address=address, peer_type="node-to-node mesh", state=state, since="", info="")


def test_graceful_restart_is_on_with_the_default_times():
    inp = routing_input(_view(), "h1")
    assert inp.settings.graceful_restart and inp.settings == BgpSettings()
    text = render_bird_config(inp)
    assert "graceful restart off" not in text
    assert text.count(f"graceful restart time {BgpSettings().restart_time};") == len(plan_sessions(inp))


def test_nodes_without_a_lease_are_left_out_unless_established():
    view = _view(alive=("h1", "h3"))
    assert lease_less_nodes(view, "h1") == {"h2", "rr"}  # never ourselves, never an address-less node
    assert [n.name for n in routing_input(view, "h1").nodes] == ["h1", "h3"]
    kept = routing_input(view, "h1", established=frozenset({"h2"}))
    assert [n.name for n in kept.nodes] == ["h1", "h2", "h3"]
    assert {s.peer_name for s in plan_sessions(kept)} == {"h2", "h3"}


def test_our_own_lease_does_not_matter():
    assert [n.name for n in routing_input(_view(alive=()), "h1").nodes] == ["h1"]


def test_established_means_any_session_of_the_node_is_established():
    view = _view()
    rows = [
        _row("192.168.1.2", "Active"),
        _row("fd00::2", "Established"),
        _row("192.168.1.3", "Connect"),
        _row("192.168.1.9", "Established"),
    ]
    assert established_nodes(view, {"h2", "h3"}, rows) == {"h2"}  # IPv6 compared in canonical form
    assert established_nodes(view, {"h2", "h3", "rr"}, []) == frozenset()
    assert established_nodes(view, {"rr"}, rows) == {"rr"}


def test_route_reflector_drops_a_dead_client_and_a_client_drops_a_dead_reflector():
    view = _view(alive=("rr", "h2"))
    view.config = ClusterConfig(mesh=False)
    view.blocks = {"rr": [], "h2": []}
    assert {s.peer_name for s in plan_sessions(routing_input(view, "rr"))} == {"h2"}  # h1, h3 dead
    view.alive = {"h2"}
    assert plan_sessions(routing_input(view, "h2")) == []
    assert {s.peer_name for s in plan_sessions(routing_input(view, "h2", frozenset({"rr"})))} == {"rr"}
