"""NAT-outgoing per pool, with real packets: a container of a NAT pool reaches an outside address that has no
route back to the pool; traffic to another pool keeps its real source; turning NAT off, or flushing our chain,
is followed by the reconciler."""

import pytest

from netplugin.agent.backend import iptables_backend
from netplugin.agent.nat import CHAIN, NatReconciler
from netplugin.agent.view import ClusterView
from netplugin.datastore.models import Pool
from netplugin.ipam.allocator import IPAM
from netplugin.lab.netns import NamespaceSet, nsexec
from tests.waiting import poll

pytestmark = pytest.mark.functional

NAT_POOL, OTHER_POOL = "10.99.0.0/24", "10.98.0.0/24"
CONTAINER_IP, OUTSIDE_IP, OTHER_POOL_IP = "10.99.0.5", "203.0.113.1", "10.98.0.1"


@pytest.fixture
def lab():
    """outside (203.0.113.1 and 10.98.0.1, no route to 10.99.0.0/24) -- host (forwarding) -- container."""
    nss = NamespaceSet()
    try:
        host, container, outside = nss.add(), nss.add(), nss.add()
        nss.link(host, outside, "203.0.113.2/24", "203.0.113.1/24", name_a="uplink", name_b="eth0")
        nsexec(outside, f"ip addr add {OTHER_POOL_IP}/24 dev lo")
        nss.link(host, container, None, f"{CONTAINER_IP}/32", name_a="np-test", name_b="eth0")
        nsexec(host, f"ip route add {CONTAINER_IP}/32 dev np-test")
        nsexec(host, f"ip route add default via {OUTSIDE_IP}")  # also what proxy-ARP for 169.254.1.1 needs
        nsexec(host, "sysctl -qw net.ipv4.ip_forward=1")
        nsexec(host, "sysctl -qw net.ipv4.conf.np-test.proxy_arp=1")
        nsexec(container, "ip route add 169.254.1.1 dev eth0")
        nsexec(container, "ip route add default via 169.254.1.1")
        yield host, container
    finally:
        nss.close()


def pings(ns, dst):
    return nsexec(ns, ["ping", "-c", "1", "-W", "1", dst], check=False).returncode == 0


def view(nat):
    return ClusterView(
        pools=[Pool(cidr=NAT_POOL, block_size=26, nat_outgoing=nat), Pool(cidr=OTHER_POOL, block_size=26)]
    )


def test_nat_pool_reaches_outside_and_other_pools_keep_the_real_source(lab):
    host, container = lab
    assert not pings(container, OUTSIDE_IP)  # no route back to the pool: only NAT makes this work
    nat = NatReconciler(iptables_backend(netns=f"/run/netns/{host}"))
    nat.sync(view(nat=True), full=True)
    assert pings(container, OUTSIDE_IP)
    assert not pings(container, OTHER_POOL_IP)  # another pool: routed with its real source, so no answer here
    saved = nsexec(host, "iptables-save -t nat").stdout
    assert "-A POSTROUTING -m comment" in saved and f"-j {CHAIN}" in saved and "MASQUERADE" in saved

    nsexec(host, f"iptables -t nat -F {CHAIN}")  # drift: the next full resync repairs it
    nat.sync(view(nat=True))
    assert not pings(container, OUTSIDE_IP)  # event-driven syncs trust what was written
    nat.sync(view(nat=True), full=True)
    assert pings(container, OUTSIDE_IP)

    nat.sync(view(nat=False))  # the pool's NAT turned off: the chain and its hook go
    assert not pings(container, OUTSIDE_IP)
    assert CHAIN not in nsexec(host, "iptables-save -t nat").stdout


def test_the_agent_follows_the_pools_nat_flag(etcd, host_factory):
    """netctl pool set --nat-outgoing / --no-nat-outgoing reach the agent through its watch."""
    ipam = IPAM(etcd)
    ipam.add_pool("10.97.0.0/24")
    agent = host_factory()

    def nat_chain():
        return f"-A {CHAIN} " in nsexec(agent.netns, "iptables-save -t nat").stdout

    assert not nat_chain()
    ipam.update_pool("10.97.0.0/24", nat_outgoing=True)
    assert poll(nat_chain), agent.log()[-2000:]
    assert "-s 10.97.0.0/24 -m comment" in nsexec(agent.netns, "iptables-save -t nat").stdout
    ipam.update_pool("10.97.0.0/24", nat_outgoing=False)
    assert poll(lambda: not nat_chain()), agent.log()[-2000:]
