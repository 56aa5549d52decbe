"""The lab's plan is pure: every bad request fails here, before a namespace exists."""

import ipaddress

import pytest

from netplugin.errors import InvalidInput
from netplugin.lab.plan import LabSpec, check_container_name, make_plan, ns_prefix


def plan(**kw):
    return make_plan(LabSpec(**kw), state_root="/tmp/labs", shm_root="/tmp/shm")


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"name": "Demo"}, "invalid lab name"),
        ({"name": "a" * 13}, "invalid lab name"),
        ({"hosts": 0}, "number of hosts"),
        ({"hosts": True}, "number of hosts"),
        ({"hosts": 2, "racks": 3}, "3 racks need at least as many hosts"),
        ({"hosts": 241}, "at most 240 hosts fit in one rack"),
        ({"etcd_members": 2}, "1 or 3"),
        ({"routing": "ospf"}, "invalid routing mode"),
        ({"hosts": 3, "route_reflectors": 4}, "route reflectors"),
        ({"routing": "direct", "racks": 2}, "one L2 segment"),
        ({"routing": "direct", "route_reflectors": 1}, "need --routing bgp"),
        ({"racks": 2, "hosts": 4, "route_reflectors": 1}, "not supported"),
        ({"pool": "10.244.0.1/16"}, "invalid pool"),
        ({"pool": "192.168.100.0/24"}, "outside the lab fabric"),
        ({"pool": "fd00::/64"}, "must be IPv4"),
        ({"dataplane": "ebpf"}, "invalid dataplane 'ebpf': iptables or bpf"),
    ],
)
def test_bad_spec_is_refused_with_the_reason(kw, message):
    with pytest.raises(InvalidInput, match=message):
        LabSpec(**kw)


def test_one_rack_mesh_plan():
    p = plan(name="t1", hosts=3)
    assert p.spec.mesh and p.spec.bgp_mode == "node-to-node mesh"
    assert p.router is None
    assert [r.namespace for r in p.racks] == ["lab-t1-rack1"]
    assert [(h.name, h.namespace, h.address, h.gateway, h.as_number) for h in p.hosts] == [
        ("h1", "lab-t1-h1", "192.168.1.11", None, None),
        ("h2", "lab-t1-h2", "192.168.1.12", None, None),
        ("h3", "lab-t1-h3", "192.168.1.13", None, None),
    ]
    assert p.hosts[0].agent_socket == "/tmp/labs/t1/hosts/h1/agent.sock"
    assert p.etcd_dir == "/tmp/shm/netplugin-lab-t1"
    assert all(h.namespace.startswith(ns_prefix("t1")) for h in p.hosts)


def test_route_reflectors_are_the_first_hosts_and_turn_the_mesh_off():
    p = plan(name="rr", hosts=5, route_reflectors=2)
    assert [h.route_reflector for h in p.hosts] == [True, True, False, False, False]
    assert not p.spec.mesh and "2 route reflector" in p.spec.bgp_mode


def test_racks_share_hosts_evenly_behind_a_router_with_one_as_per_host():
    p = plan(name="r", hosts=5, racks=2)
    assert [h.rack for h in p.hosts] == [1, 1, 1, 2, 2]
    assert [h.as_number for h in p.hosts] == [65101, 65102, 65103, 65201, 65202]
    assert [h.gateway for h in p.hosts] == ["192.168.1.1"] * 3 + ["192.168.2.1"] * 2
    assert p.router.as_number == 65000 and p.router.namespace == "lab-r-spine"
    assert p.router.interfaces == ((1, "rack1", "192.168.1.1/24"), (2, "rack2", "192.168.2.1/24"))
    assert not p.spec.mesh
    for h in p.hosts:  # every host sits in its rack's subnet
        assert ipaddress.ip_address(h.address) in ipaddress.ip_network(p.racks[h.rack - 1].subnet)


def test_addresses_and_names_are_unique_at_the_largest_size():
    p = plan(name="big", hosts=250, racks=2)
    assert len({h.address for h in p.hosts}) == len({h.namespace for h in p.hosts}) == 250


def test_as_numbers_past_the_private_range_are_refused():
    # 65000 + 100 * rack + index: rack 5's first host is 65501, rack 6's is 65601 (beyond 65534).
    assert plan(name="asn", hosts=5, racks=5).hosts[-1].as_number == 65501
    with pytest.raises(InvalidInput, match="above the private 16-bit range"):
        plan(name="asn", hosts=6, racks=6)


def test_hosts_and_containers_are_looked_up_by_name():
    p = plan(name="t2", hosts=2)
    assert p.host("h2").address == "192.168.1.12"
    with pytest.raises(InvalidInput, match="has no host 'h9'"):
        p.host("h9")
    assert p.container_namespace("web-1") == "lab-t2-c-web-1"
    for bad in ("", "-x", "A", "x" * 33, "a/b"):
        with pytest.raises(InvalidInput, match="invalid container name"):
            check_container_name(bad)


def test_a_bpf_lab_pins_under_its_own_state_directory():
    p = plan(name="bp", hosts=2, dataplane="bpf")
    assert p.spec.to_dict()["dataplane"] == "bpf"
    assert [p.host_bpffs(h) for h in p.hosts] == ["/tmp/labs/bp/bpffs/h1", "/tmp/labs/bp/bpffs/h2"]
    assert LabSpec().dataplane == "iptables"
