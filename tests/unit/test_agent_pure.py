"""Pure parts of the agent: routing input from a ClusterView, CNI request parsing and result shape, RW lock."""

import threading
import time

import pytest

from netplugin.agent.cni_api import _workload, result_of
from netplugin.agent.routing import direct_routes, routing_input
from netplugin.agent.rwlock import RWLock
from netplugin.agent.view import ClusterView, relevant
from netplugin.datastore import keys
from netplugin.datastore.models import BgpPeer, ClusterConfig, Endpoint, Node
from netplugin.errors import InvalidInput


def _view():
    v = ClusterView(config=ClusterConfig(as_number=64600, mesh=False))
    v.nodes = {
        "h1": Node("h1", "192.168.1.1", route_reflector=True),
        "h2": Node("h2", "192.168.1.2"),
        "h3": Node("h3", None),
    }
    v.alive = {"h1", "h2"}
    v.blocks = {"h1": ["10.0.0.64/26", "10.0.0.0/26"], "h2": ["10.0.1.0/26"], "gone": ["10.0.2.0/26"]}
    v.peers = [BgpPeer("tor", "192.168.1.254", 65001), BgpPeer("other", "192.168.9.9", 65002, node="h2")]
    return v


def test_routing_input_takes_cluster_settings_and_own_blocks_only():
    inp = routing_input(_view(), "h1")
    assert inp.node.name == "h1" and inp.node.route_reflector
    assert [n.name for n in inp.nodes] == ["h1", "h2"]  # h3 has no address
    assert inp.blocks == ("10.0.0.0/26", "10.0.0.64/26")
    assert [p.name for p in inp.peers] == ["tor"]  # the other peer belongs to h2
    assert inp.settings.mesh is False and inp.settings.default_as == 64600


def test_routing_input_without_address_is_a_clear_error():
    with pytest.raises(InvalidInput, match="--node-address"):
        routing_input(_view(), "h3")


def test_direct_routes_are_other_hosts_blocks_by_address():
    assert direct_routes(_view(), "h1") == {"192.168.1.2": ["10.0.1.0/26"]}
    assert direct_routes(_view(), "h2") == {"192.168.1.1": ["10.0.0.0/26", "10.0.0.64/26"]}


def test_direct_routes_send_each_family_via_the_node_address_of_that_family():
    v = _view()
    v.blocks["h2"] = ["10.0.1.0/26", "fd00::/122"]
    assert direct_routes(v, "h1") == {"192.168.1.2": ["10.0.1.0/26"]}  # no address6: the IPv6 block is left out
    v.nodes["h2"] = Node("h2", "192.168.1.2", address6="fd99::2")
    assert direct_routes(v, "h1") == {"192.168.1.2": ["10.0.1.0/26"], "fd99::2": ["fd00::/122"]}


def test_relevant_keys_exclude_churning_ipam_records():
    assert relevant(keys.policy("p"))
    assert relevant(keys.affinity("h1", "10.0.0.0/26"))
    assert not relevant(keys.handle("x"))
    assert not relevant(keys.block("10.0.0.0/26"))


def test_workload_parsing():
    req = _workload(
        {
            "container_id": "c1",
            "netns": "/run/netns/x",
            "ifname": "eth1",
            "ips": ["10.0.0.5/24"],
            "labels": {"a": "1"},
            "config": {"name": "net1", "mtu": 1400, "ipam": {"pools": ["10.0.0.0/16", "fd00::/64"]}},
        }
    )
    assert (req.network, req.container_id, req.ifname, req.mtu) == ("net1", "c1", "eth1", 1400)
    assert req.addresses == ["10.0.0.5"] and req.labels == {"a": "1"}
    assert req.ipv6 is True  # an IPv6 pool in the network config turns on dual stack
    for bad, msg in (
        ({"config": {}}, "no name"),
        ({"config": {"name": "n", "mtu": 10}}, "mtu"),
        ({"config": {"name": "n"}, "ips": ["bogus"]}, "not an IP"),
        ({"config": {"name": "n", "ipam": {"pools": "10.0.0.0/8"}}}, "list of CIDRs"),
        ({"config": {"name": "n"}, "labels": {"a": 1}}, "invalid endpoint label"),
    ):
        with pytest.raises(InvalidInput, match=msg):
            _workload({"container_id": "c1", **bad})


def test_result_shape_dual_stack():
    ep = Endpoint(
        id="e",
        host="h",
        network="n",
        container_id="c",
        netns="/run/netns/c",
        ifname="eth0",
        host_ifname="np0",
        addresses=["10.0.0.5/32", "fd00::5/128"],
        mac="aa:bb:cc:dd:ee:ff",
    )
    r = result_of(ep)
    assert r["interfaces"] == [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/run/netns/c"}]
    assert r["ips"] == [
        {"address": "10.0.0.5/32", "gateway": "169.254.1.1", "interface": 0},
        {"address": "fd00::5/128", "gateway": "fe80::ecee:eeff:feee:eeee", "interface": 0},
    ]
    assert [x["dst"] for x in r["routes"]] == ["0.0.0.0/0", "::/0"]


def test_rwlock_writer_waits_for_readers_and_excludes_them():
    lock = RWLock()
    events = []
    lock.acquire_read()

    def writer():
        with lock.exclusive():
            events.append("write")

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.05)
    assert events == []  # a reader holds it
    lock.release_read()
    t.join(2)
    assert events == ["write"]
    with lock.shared():
        with lock.shared():  # readers share
            pass
