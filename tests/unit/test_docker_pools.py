"""Docker pools mapped onto netplugin pools, and Join's routes: pure logic, no etcd, no kernel."""

import pytest

from netplugin.docker.driver import free_subnets, static_routes
from netplugin.docker.pools import PoolRef, host_prefix_of, place_subnet, pool_ref, usable_subnet
from netplugin.errors import InvalidInput


def test_pool_id_round_trip_and_within():
    ref = pool_ref("10.1.2.0/24", "10.1.0.0/16", "10.1.2.128/25")
    assert PoolRef.decode(ref.encode()) == ref
    assert ref.within == "10.1.2.128/25" and ref.version == 4
    assert pool_ref("10.1.2.0/24", "10.1.0.0/16").within == "10.1.2.0/24"  # a subnet narrower than its pool
    assert pool_ref("10.1.0.0/16", "10.1.0.0/16").within is None
    v6 = pool_ref("fd00:0:0:1::/64", "fd00::/48")
    assert PoolRef.decode(v6.encode()) == v6 and v6.version == 6


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "garbage",
        "10.0.0.0/8|10.0.0.0/8",
        "10.0.0.0/8|11.0.0.0/24|",
        "10.0.0.0/8|10.1.0.0/16|10.2.0.0/24",
        "10.0.0.0/8|10.0.0.1/16|",
    ],
)
def test_pool_id_rejects_what_we_never_issued(bad):
    with pytest.raises(InvalidInput):
        PoolRef.decode(bad)


@pytest.mark.parametrize(
    "bad",
    [
        "169.254.0.0/16",
        "169.254.1.0/24",
        "0.0.0.0/0",
        "127.0.0.0/8",
        "224.0.0.0/24",
        "240.0.0.0/4",
        "128.0.0.0/1",
        "fe80::/64",
        "::/0",
        "ff02::/16",
        "::ffff:0:0/96",
    ],
)
def test_reserved_space_is_no_docker_subnet(bad):
    with pytest.raises(InvalidInput, match="containers cannot have those addresses"):
        usable_subnet(bad, "subnet")


def test_usable_subnets():
    for good in ("10.0.0.0/8", "100.64.0.0/10", "192.168.0.0/16", "fd00::/8", "2001:db8::/32", "169.255.0.0/16"):
        assert str(usable_subnet(good, "subnet")) == good


def test_place_subnet():
    pools = ["10.1.0.0/16", "fd00::/48"]
    assert place_subnet("10.1.0.0/16", pools) == ("10.1.0.0/16", False)
    assert place_subnet("10.1.7.0/24", pools) == ("10.1.0.0/16", False)
    assert place_subnet("fd00:0:0:1::/64", pools) == ("fd00::/48", False)
    assert place_subnet("10.2.0.0/16", pools) == ("10.2.0.0/16", True)
    with pytest.raises(InvalidInput, match="overlaps netplugin pool"):
        place_subnet("10.0.0.0/8", pools)
    with pytest.raises(InvalidInput, match="host bits"):
        place_subnet("10.1.0.1/16", pools)
    with pytest.raises(InvalidInput, match="no prefix length"):
        place_subnet("10.1.0.0", pools)
    with pytest.raises(InvalidInput, match="not inside subnet"):
        pool_ref("10.1.0.0/24", "10.1.0.0/16", "10.1.1.0/25")
    with pytest.raises(InvalidInput, match="not inside netplugin pool"):
        pool_ref("10.2.0.0/24", "10.1.0.0/16")


def test_host_prefix_of():
    assert host_prefix_of("10.1.0.5/16") == "10.1.0.5/32"
    assert host_prefix_of("fd00::5/64") == "fd00::5/128"
    with pytest.raises(InvalidInput):
        host_prefix_of("nope")


def test_static_routes_primary_and_secondary():
    assert static_routes(["10.1.0.5/32"]) == [
        {"Destination": "169.254.1.1/32", "RouteType": 1},
        {"Destination": "0.0.0.0/0", "RouteType": 0, "NextHop": "169.254.1.1"},
    ]
    assert [r["Destination"] for r in static_routes(["fd00::5/128", "10.1.0.5/32"])] == [
        "169.254.1.1/32",
        "0.0.0.0/0",
        "fe80::ecee:eeff:feee:eeee/128",
        "::/0",
    ]
    assert static_routes(["10.2.0.5/32"], primary=False, subnets=["10.2.0.0/24", "fd02::/64"]) == [
        {"Destination": "10.2.0.0/24", "RouteType": 1}
    ]
    assert free_subnets(["10.2.0.0/24", "10.3.0.0/24"], ["10.2.0.0/16"]) == ["10.3.0.0/24"]
    assert free_subnets(["10.2.0.0/24"], ["fd00::/8"]) == ["10.2.0.0/24"]
