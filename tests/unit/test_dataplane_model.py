"""Endpoint specs, names and settings: pure logic, no kernel."""

import ipaddress
import re

import pytest

from netplugin.dataplane import EndpointSpec, host_ifname, is_host_ifname, random_mac
from netplugin.dataplane import antispoof, sysctl
from netplugin.kernel import netfilter
from netplugin.dataplane.model import parse_blocks, validate_spec
from netplugin.dataplane.reconcile import changed, desired_by_name, empty_summary
from netplugin.errors import InvalidInput


def spec(**kw):
    base = dict(endpoint_id="c1.eth0", netns="/run/netns/c1", addresses=("10.0.0.5/32",))
    base.update(kw)
    return EndpointSpec(**base)


def test_host_ifname_is_stable_short_and_recognisable():
    name = host_ifname("abc.eth0")
    assert name == host_ifname("abc.eth0") and name != host_ifname("abc.eth1")
    assert len(name) == 13 and name.startswith("np") and is_host_ifname(name)
    assert name == "np" + __import__("hashlib").sha1(b"abc.eth0").hexdigest()[:11]
    for other in ("np-other", "npABCDEF12345", "np0123456789ab", "eth0", "", None):
        assert not is_host_ifname(other)


def test_addresses_become_host_routes():
    assert validate_spec(spec(addresses=["10.0.0.5", "fd00::5/128"])) == [
        ipaddress.ip_interface("10.0.0.5/32"),
        ipaddress.ip_interface("fd00::5/128"),
    ]
    assert spec(addresses=["10.0.0.5"]).addresses == ("10.0.0.5",)  # lists are frozen into tuples


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(addresses=("10.0.0.0/24",)), "must be a host address"),
        (dict(addresses=("10.0.0.5", "10.0.0.5/32")), "listed twice"),
        (dict(addresses=("not-an-ip",)), "invalid address"),
        (dict(addresses=("224.0.0.5",)), "not a usable unicast"),
        (dict(addresses=("fe80::1",)), "not a usable unicast"),
        (dict(netns="relative/path"), "absolute path"),
        (dict(ifname="a-very-long-interface"), "invalid interface name"),
        (dict(ifname="eth/0"), "invalid interface name"),
        (dict(mtu=50), "invalid MTU"),
        (dict(mtu=1200, addresses=("fd00::5",)), "below IPv6's minimum"),
        (dict(mac="01:00:00:00:00:01"), "must be unicast"),
        (dict(mac="ee:ee:ee:ee:ee:ee"), "reserved for the host side"),
        (dict(mac="zz:00:00:00:00:01"), "invalid MAC"),
        (dict(endpoint_id=""), "non-empty"),
    ],
)
def test_bad_specs_are_refused(kw, message):
    with pytest.raises(InvalidInput, match=message):
        validate_spec(spec(**kw))


def test_blocks_keep_host_bits_an_error():
    assert parse_blocks(["10.1.0.0/26", "10.1.0.0/26", "fd10::/122"]) == [
        ipaddress.ip_network("10.1.0.0/26"),
        ipaddress.ip_network("fd10::/122"),
    ]
    with pytest.raises(InvalidInput, match="10.1.0.1/26"):
        parse_blocks(["10.1.0.1/26"])


def test_desired_endpoints_must_be_unique():
    with pytest.raises(InvalidInput, match="listed twice"):
        desired_by_name([spec(), spec()])


def test_summary_changes_ignore_errors():
    summary = empty_summary()
    assert not changed(summary)
    summary["errors"].append("x")
    assert not changed(summary)
    summary["blackholes_added"].append("10.0.0.0/26")
    assert changed(summary)


def test_sysctl_desired_and_drift():
    want = sysctl.desired_host_sysctls("np0", ipv6=False)
    assert want == {
        "net/ipv4/conf/np0/forwarding": 1,
        "net/ipv4/conf/np0/proxy_arp": 1,
        "net/ipv4/conf/np0/rp_filter": 1,
        "net/ipv4/conf/np0/arp_ignore": 0,
        "net/ipv4/neigh/np0/proxy_delay": 0,
    }
    assert "net/ipv6/conf/np0/proxy_ndp" in sysctl.desired_host_sysctls("np0", ipv6=True)
    have = dict(want, **{"net/ipv4/conf/np0/rp_filter": 2})
    del have["net/ipv4/neigh/np0/proxy_delay"]
    assert sysctl.drift(want, have, skip_unknown=["net/ipv4/neigh/np0/proxy_delay"]) == {
        "net/ipv4/conf/np0/rp_filter": 1
    }
    assert sysctl.drift(want, have) == {"net/ipv4/conf/np0/rp_filter": 1, "net/ipv4/neigh/np0/proxy_delay": 0}


def test_antispoof_batch_converges_and_is_empty_when_right():
    table = netfilter.NetfilterTable(ns=None, family=6, table="raw")

    def batch(save):
        return table.render(
            table.plan(antispoof.CHAINS, antispoof.HOOKS, netfilter.parse_save(save, "raw")), antispoof.CHAINS
        )

    rule, hook = antispoof.CHAINS[antispoof.CHAIN][0], antispoof.HOOKS["PREROUTING"]
    assert batch("*raw\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") == [
        "*raw",
        ":np-antispoof - [0:0]",
        f"-A np-antispoof {netfilter.tagged(rule)}",
        f"-I PREROUTING 1 {netfilter.tagged(hook)}",
        "COMMIT",
    ]
    right = (
        f"*raw\n:PREROUTING ACCEPT [0:0]\n:np-antispoof - [0:0]\n-A PREROUTING {netfilter.tagged(hook)}\n"
        f"-A np-antispoof {netfilter.tagged(rule)}\nCOMMIT\n"
    )
    assert batch(right) == []
    doubled = right.replace("-A PREROUTING", f"-A PREROUTING {netfilter.tagged(hook)}\n-A PREROUTING", 1)
    assert [line for line in batch(doubled) if "PREROUTING" in line] == [f"-D PREROUTING {netfilter.tagged(hook)}"]
    untagged = right.replace(f"-A PREROUTING {netfilter.tagged(hook)}", f"-A PREROUTING {hook}")  # an older agent's
    assert [line for line in batch(untagged) if "PREROUTING" in line] == [
        f"-D PREROUTING {hook}",
        f"-I PREROUTING 1 {netfilter.tagged(hook)}",
    ]


def test_random_mac_is_unicast_locally_administered_and_varies():
    macs = {random_mac() for _ in range(200)}
    assert len(macs) == 200
    for mac in macs:
        first = int(mac[:2], 16)
        assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac) and first & 0x01 == 0 and first & 0x02
