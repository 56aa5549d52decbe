"""Typed records: JSON round trips, tolerance of unknown fields, pool validation; the key schema; EtcdConfig."""

import json

import pytest

from netplugin.config import EtcdConfig
from netplugin.datastore import keys
from netplugin.datastore.models import Allocation, BgpPeer, Block, ClusterConfig, Endpoint, Handle, Network, Node, Pool
from netplugin.errors import InvalidInput

SAMPLES = [
    ClusterConfig(as_number=65001, mesh=False, reclaim_grace=30.0),
    Node(
        name="h1",
        address="10.0.0.1",
        address6="fd00::1",
        as_number=65002,
        labels={"rack": "a"},
        route_reflector=True,
        address_autodetected=True,
    ),
    BgpPeer(name="tor", address="10.0.0.254", as_number=65000, node="h1", password="s3cret"),
    Pool(cidr="10.1.0.0/16", block_size=26, nat_outgoing=True, disabled=True),
    Handle(
        handle="c1.eth0",
        host="h1",
        addresses={"10.1.0.1": {"block": "10.1.0.0/26", "seq": 3}},
        attrs={"container": "c1"},
    ),
    Network(
        name="net1",
        pools=["10.1.0.0/16"],
        ip_range="10.1.5.0/24",
        labels={"a": "b"},
        options={"mtu": "1400"},
        docker_id="abc",
    ),
    Endpoint(
        id="e1",
        host="h1",
        network="net1",
        container_id="c1",
        netns="/run/netns/x",
        ifname="eth0",
        host_ifname="np1234",
        addresses=["10.1.0.1/32", "fd00::1/128"],
        mac="ee:ee:ee:ee:ee:ee",
        labels={"app": "web"},
        handle="c1.eth0",
        orchestrator="docker",
    ),
    Block(
        cidr="10.1.0.0/26",
        pool="10.1.0.0/16",
        affinity="h1",
        allocations={"0": Allocation("c1.eth0", "h1", 1), "10": Allocation("c2.eth0", "h2", 2)},
        next_seq=3,
    ),
]


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_round_trip_through_json(record):
    stored = json.loads(json.dumps(record.to_dict()))
    back = type(record).from_dict(stored)
    assert back == record
    assert back.to_dict() == record.to_dict()


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_unknown_fields_are_ignored(record):
    stored = {**record.to_dict(), "added_in_a_later_version": {"x": 1}}
    assert type(record).from_dict(stored) == record


def test_defaults_fill_missing_fields():
    assert ClusterConfig.from_dict(None) == ClusterConfig()
    assert Node.from_dict({"name": "h"}) == Node(name="h")
    assert Block.from_dict({"cidr": "10.0.0.0/26", "pool": "10.0.0.0/24"}).next_seq == 1


def test_block_allocations_become_typed_and_serialise_in_address_order():
    b = Block.from_dict(
        {
            "cidr": "10.0.0.0/26",
            "pool": "10.0.0.0/24",
            "allocations": {"10": {"handle": "b", "host": "h", "seq": 2}, "9": {"handle": "a", "host": "h", "seq": 1}},
        }
    )
    assert b.allocations["9"] == Allocation("a", "h", 1)
    assert list(b.to_dict()["allocations"]) == ["9", "10"]  # numeric, not string order
    assert json.dumps(b.to_dict(), sort_keys=True) == json.dumps(Block.from_dict(b.to_dict()).to_dict(), sort_keys=True)


def test_block_copy_is_independent():
    b = Block(cidr="10.0.0.0/26", pool="10.0.0.0/24", affinity="h", allocations={"1": Allocation("a", "h", 1)})
    c = b.copy()
    c.allocations["2"] = Allocation("b", "h", 2)
    c.next_seq = 9
    c.affinity = None
    assert list(b.allocations) == ["1"] and b.next_seq == 1 and b.affinity == "h"


def test_block_address_arithmetic_v4_and_v6():
    b4 = Block(cidr="10.0.0.64/26", pool="10.0.0.0/24", allocations={"0": Allocation("a", "h", 1)})
    assert b4.size == 64 and b4.free_count() == 63
    assert b4.address(0) == "10.0.0.64" and b4.address(63) == "10.0.0.127"
    assert b4.ordinal("10.0.0.100") == 36
    b6 = Block(cidr="fd00::40/122", pool="fd00::/112")
    assert b6.size == 64
    assert b6.address(1) == "fd00::41" and b6.ordinal("fd00::7f") == 63
    assert b6.address(b6.ordinal("fd00::55")) == "fd00::55"


def test_allocation_is_immutable():
    a = Allocation("a", "h", 1)
    with pytest.raises(Exception):
        a.seq = 2


def test_pool_properties():
    assert Pool("10.0.0.0/16", 26).version == 4
    assert Pool("fd00::/112", 122).version == 6
    assert Pool("fd00::/112", 122).validate().network.size == 65536


@pytest.mark.parametrize(
    "cidr,size,message",
    [
        ("not-a-cidr", 26, "is not a CIDR"),
        ("10.0.0.0/33", 26, "is not a CIDR"),
        ("10.0.0.1/24", 26, "host bits set"),
        ("10.0.0.0/24", 20, "does not fit"),
        ("10.0.0.0/24", 33, "does not fit"),
        ("fd00::/112", 129, "does not fit"),
        ("10.0.0.0/8", 19, "too large"),
        ("fd00::/64", 112, "too large"),
    ],
)
def test_pool_validation(cidr, size, message):
    with pytest.raises(InvalidInput, match=message):
        Pool(cidr, size).validate()


def test_pool_validation_accepts_edges():
    Pool("10.0.0.0/24", 24).validate()
    Pool("10.0.0.0/24", 32).validate()
    Pool("10.0.0.0/8", 20).validate()
    Pool("fd00::/64", 116).validate()


# --- key schema ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cidr,segment",
    [
        ("10.1.0.0/26", "10.1.0.0-26"),
        ("fd00::/122", "fd00::-122"),
        ("fd00::40/122", "fd00::40-122"),
    ],
)
def test_cidr_segments_round_trip(cidr, segment):
    assert keys.cidr_segment(cidr) == segment
    assert keys.segment_cidr(segment) == cidr
    assert keys.last_segment(keys.block(cidr)) == segment


def test_keys_live_under_the_versioned_root():
    assert keys.block("10.1.0.0/26") == "/netplugin/v1/ipam/blocks/10.1.0.0-26"
    assert keys.affinity("h1", "10.1.0.0/26") == "/netplugin/v1/ipam/affinity/h1/10.1.0.0-26"
    assert keys.affinity("h1", "10.1.0.0/26").startswith(keys.affinity_prefix("h1"))
    assert keys.pool("10.1.0.0/16") == "/netplugin/v1/ipam/pools/10.1.0.0-16"
    assert keys.handle("c1.eth0") == "/netplugin/v1/ipam/handles/c1.eth0"
    assert not keys.liveness("h1").startswith(keys.NODES)  # listing nodes never returns liveness
    assert keys.endpoint("h1", "e1").startswith(keys.endpoint_prefix("h1"))


def test_host_bits_normalised_in_keys():
    assert keys.pool("10.1.2.3/16") == keys.pool("10.1.0.0/16")


@pytest.mark.parametrize("bad", ["", "a/b", None])
def test_names_that_would_break_the_layout_are_refused(bad):
    for make in (keys.node, keys.handle, keys.liveness, keys.affinity_prefix):
        with pytest.raises(InvalidInput):
            make(bad)


# --- EtcdConfig ------------------------------------------------------------------------------------------------


def test_etcd_config_parses_comma_separated_endpoints():
    cfg = EtcdConfig(endpoints="http://a:2379, https://b:2379,")
    assert cfg.endpoints == ("http://a:2379", "https://b:2379")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"endpoints": ""}, "no etcd endpoint"),
        ({"endpoints": "a:2379"}, "must start with http"),
        ({"cert": "/c.pem"}, "together"),
        ({"key": "/k.pem"}, "together"),
    ],
)
def test_etcd_config_errors(kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        EtcdConfig(**kwargs)
