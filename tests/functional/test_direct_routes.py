"""Direct mode: other hosts' blocks as proto-81 kernel routes, reconciled in a test namespace."""

import ipaddress
import json
import os
import sys

import pytest

from netplugin.errors import DataplaneError, InvalidInput
from netplugin.lab.netns import nsexec
from netplugin.routing.constants import DIRECT_PROTO
from netplugin.routing.direct import DirectRoutes, desired_routes

PROBE = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.settimeout(2)
try:
    s.connect((sys.argv[1], 9))
except ConnectionRefusedError:
    sys.exit(0)  # answered with a reset: routed there and back
except OSError:
    sys.exit(1)
"""


def reaches(ns, addr):
    return nsexec(ns, [sys.executable, "-c", PROBE, addr], check=False).returncode == 0


def kernel_routes(ns, v6=False):
    """{dst: (gateway, protocol)} of the namespace's main table, prefixes normalised."""
    out = nsexec(ns, ["ip", "-N", "-j"] + (["-6"] if v6 else []) + ["route", "show"]).stdout
    return {
        str(ipaddress.ip_network(r["dst"])): (r.get("gateway"), int(r["protocol"]))
        for r in json.loads(out or "[]")
        if r.get("protocol", "").isdigit() and r["dst"] != "default"
    }


@pytest.fixture
def pair(namespaces):
    """Host A and host B on one veth; B owns 10.1.2.0/26 (its first address on lo) and fd10:2::/122."""
    a, b = namespaces.add(), namespaces.add()
    namespaces.link(a, b, "10.98.0.1/24", "10.98.0.2/24")
    nsexec(a, "ip -6 addr add fd98::1/64 dev eth0 nodad")
    nsexec(b, "ip -6 addr add fd98::2/64 dev eth0 nodad")
    nsexec(b, "ip addr add 10.1.2.1/32 dev lo")
    nsexec(b, "ip -6 addr add fd10:2::1/128 dev lo")
    return a, b


@pytest.mark.functional
def test_reconcile_adds_removes_and_is_idempotent(pair):
    a, b = pair
    direct = DirectRoutes(f"/run/netns/{a}")
    # Someone else's routes in the same table: never touched.
    nsexec(a, "ip route add 10.50.0.0/24 via 10.98.0.2 proto static")
    nsexec(a, "ip route add blackhole 10.1.1.0/26 proto 80")
    # A stale route of ours, e.g. from a node that has since gone.
    nsexec(a, f"ip route add 10.1.7.0/26 via 10.98.0.2 proto {DIRECT_PROTO}")
    assert not reaches(a, "10.1.2.1")

    want = {"10.98.0.2": ["10.1.2.0/26", "10.1.3.0/26"], "fd98::2": ["fd10:2::/122"]}
    changes = direct.reconcile(want)
    assert changes.added == ["10.1.2.0/26 via 10.98.0.2", "10.1.3.0/26 via 10.98.0.2", "fd10:2::/122 via fd98::2"]
    assert changes.removed == ["10.1.7.0/26 via 10.98.0.2"] and changes.replaced == []
    v4 = kernel_routes(a)
    assert v4["10.1.2.0/26"] == ("10.98.0.2", DIRECT_PROTO) and v4["10.1.3.0/26"] == ("10.98.0.2", DIRECT_PROTO)
    assert "10.1.7.0/26" not in v4
    assert v4["10.50.0.0/24"][1] != DIRECT_PROTO and v4["10.1.1.0/26"][1] == 80
    assert kernel_routes(a, v6=True)["fd10:2::/122"] == ("fd98::2", DIRECT_PROTO)
    assert reaches(a, "10.1.2.1") and reaches(a, "fd10:2::1")

    # Converged: the second pass changes nothing.
    assert not direct.reconcile(want)
    assert direct.current() == {
        ipaddress.ip_network(n): ipaddress.ip_address(g)
        for n, g in (("10.1.2.0/26", "10.98.0.2"), ("10.1.3.0/26", "10.98.0.2"), ("fd10:2::/122", "fd98::2"))
    }

    # A block moves to another node, one is released, IPv6 goes away.
    nsexec(a, "ip addr add 10.98.0.3/24 dev eth0")  # stands in for a third host's address on the segment
    changes = direct.reconcile({"10.98.0.3": ["10.1.2.0/26"]})
    assert changes.replaced == ["10.1.2.0/26 via 10.98.0.3"]
    assert changes.removed == ["10.1.3.0/26 via 10.98.0.2", "fd10:2::/122 via fd98::2"]
    assert not direct.reconcile({"10.98.0.3": ["10.1.2.0/26"]})

    assert direct.reconcile({}).removed == ["10.1.2.0/26 via 10.98.0.3"]
    v4 = kernel_routes(a)
    assert not any(proto == DIRECT_PROTO for _, proto in v4.values())
    assert "10.50.0.0/24" in v4 and "10.1.1.0/26" in v4


@pytest.mark.functional
def test_failures_are_reported_after_the_rest_is_applied(pair):
    a, _ = pair
    nsexec(a, "ip route add 10.1.4.0/26 via 10.98.0.2 proto static")  # someone else's route, same prefix
    direct = DirectRoutes(a)  # a name under /run/netns works too
    with pytest.raises(DataplaneError) as err:
        direct.reconcile({"10.98.0.2": ["10.1.2.0/26", "10.1.4.0/26"], "10.77.0.1": ["10.1.5.0/26"]})
    assert "10.1.4.0/26 via 10.98.0.2: a route for this prefix exists already (not ours)" in str(err.value)
    assert "10.1.5.0/26 via 10.77.0.1" in str(err.value)  # gateway not on any connected network
    v4 = kernel_routes(a)
    assert v4["10.1.2.0/26"] == ("10.98.0.2", DIRECT_PROTO)  # the good one is in
    assert v4["10.1.4.0/26"][1] != DIRECT_PROTO  # the foreign one is untouched


@pytest.mark.functional
def test_missing_namespace_is_an_error_and_not_created(tmp_path):
    path = f"/run/netns/npt-missing-{tmp_path.name[-8:]}"
    with pytest.raises(DataplaneError, match="does not exist"):
        DirectRoutes(path).reconcile({"10.98.0.2": ["10.1.2.0/26"]})
    assert not os.path.exists(path)


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"10.98.0.2": ["10.1.2.1/26"]}, "host bits"),
        ({"not-an-ip": ["10.1.2.0/26"]}, "invalid node address"),
        ({"10.98.0.2": ["fd10::/122"]}, "other address family"),
        ({"10.98.0.2": ["10.1.2.0/26"], "10.98.0.3": ["10.1.2.0/26"]}, "claimed by both"),
    ],
)
def test_bad_input_is_rejected_before_touching_the_kernel(bad, words):
    with pytest.raises(InvalidInput, match=words):
        desired_routes(bad)
    # DirectRoutes validates first too: a namespace that does not exist is never even opened.
    with pytest.raises(InvalidInput, match=words):
        DirectRoutes("/run/netns/npt-never-opened").reconcile(bad)
