"""What the agent changes in its host namespace: IPv6 forwarding only once an IPv6 pool exists, and interfaces
that take their configuration from router advertisements keep accepting them (accept_ra=2).

A real agent in a throwaway host namespace; never the root namespace.
"""

import pytest

from netplugin.ipam.allocator import IPAM
from netplugin.lab.netns import nsexec
from tests.waiting import poll, wait_until

pytestmark = pytest.mark.functional


def sysctl(ns, key):
    return nsexec(ns, f"sysctl -n {key}").stdout.strip()


def test_ipv6_forwarding_waits_for_an_ipv6_pool_and_keeps_ra_interfaces_accepting(etcd, host_factory):
    ipam = IPAM(etcd)
    ipam.add_pool("10.74.0.0/24")
    agent = host_factory(extra_args=["--resync-interval", "1"])
    ns = agent.netns
    nsexec(ns, "ip link add npt-uplink type veth peer name npt-uplink-p")  # accept_ra=1: configured by RAs
    nsexec(ns, "sysctl -qw net.ipv6.conf.npt-uplink-p.accept_ra=0")  # a statically configured one
    assert sysctl(ns, "net.ipv4.ip_forward") == "1"  # what the agent always sets
    # Full resyncs every second: give it two of them with only an IPv4 pool.
    assert not poll(lambda: sysctl(ns, "net.ipv6.conf.all.forwarding") == "1", 2.5)
    assert sysctl(ns, "net.ipv6.conf.npt-uplink.accept_ra") == "1"

    ipam.add_pool("fd74::/64")
    wait_until("IPv6 forwarding on", lambda: sysctl(ns, "net.ipv6.conf.all.forwarding") == "1", 10)
    assert sysctl(ns, "net.ipv6.conf.npt-uplink.accept_ra") == "2"
    assert sysctl(ns, "net.ipv6.conf.npt-uplink-p.accept_ra") == "0"
    assert "np-antispoof" in nsexec(ns, "ip6tables-save -t raw").stdout
