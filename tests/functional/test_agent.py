"""The agent's life cycle with containers running: restarts never disturb them, start-up and the periodic resync
repair drift, and while it is down the CNI binary says "try again later" at once.

A real agent in a throwaway host namespace (``host_factory``), the installed CNI binary, network namespaces as
containers; traffic only between them.
"""

import os
import signal
import time

import pytest

from netplugin.dataplane import host_ifname
from netplugin.ipam.allocator import IPAM
from netplugin.lab.agents import CniBinary
from netplugin.lab.netns import nsexec
from netplugin.service.endpoints import endpoint_id
from tests.probes import pings_during
from tests.waiting import poll

pytestmark = pytest.mark.functional

POOL = "10.73.0.0/24"
NETWORK = "agentnet"
RESYNC = 1.0  # seconds between full resyncs of the test agents


class Setup:
    """One host running an agent, the plugin installed for it, and containers ADDed through the plugin."""

    def __init__(self, etcd, host_factory, namespaces, tmp_path):
        IPAM(etcd).add_pool(POOL)
        self.ds = etcd
        self.nss = namespaces
        self.agent = host_factory(extra_args=["--resync-interval", str(RESYNC)])
        self.ns = self.agent.netns
        self.cni = CniBinary(str(tmp_path / "cni"), self.agent.socket, network=NETWORK, pools=[POOL])
        self.containers = []

    def add(self):
        ns = self.nss.add()
        rc, out, err = self.cni.call("ADD", ns, f"/run/netns/{ns}")
        assert rc == 0, (out, err, self.agent.log())
        self.containers.append(ns)
        return ns, out["ips"][0]["address"].split("/")[0]

    def veth(self, ns):
        return host_ifname(endpoint_id(NETWORK, ns, "eth0"))

    def ifindexes(self):
        """(host veth ifindex, container eth0 ifindex) of every container: changes only if a veth is recreated."""
        out = {}
        for ns in self.containers:
            host_side = nsexec(self.ns, f"cat /sys/class/net/{self.veth(ns)}/ifindex", check=False).stdout.strip()
            cont_side = nsexec(ns, "cat /sys/class/net/eth0/ifindex", check=False).stdout.strip()
            out[ns] = (host_side, cont_side)
        return out

    def host_routes(self):
        return nsexec(self.ns, "ip -4 route show proto 80").stdout

    def close(self):
        for ns in self.containers:
            self.cni.call("DEL", ns, f"/run/netns/{ns}")


@pytest.fixture
def setup(etcd, host_factory, namespaces, tmp_path):
    s = Setup(etcd, host_factory, namespaces, tmp_path)
    try:
        yield s
    finally:
        if s.agent.proc is not None:  # a test may leave it stopped
            s.close()


def test_restart_loses_no_packet_and_start_up_repairs_only_what_is_broken(setup):
    a, ip_a = setup.add()
    b, ip_b = setup.add()
    c, ip_c = setup.add()
    # Let the policy sync admit the new veths before measuring (it lags an ADD by milliseconds).
    assert poll(lambda: nsexec(a, f"ping -c1 -W0.2 {ip_b}", check=False).returncode == 0, 5)
    assert poll(lambda: nsexec(a, f"ping -c1 -W0.2 {ip_c}", check=False).returncode == 0, 5)
    before = setup.ifindexes()

    # 400 echoes 10 ms apart (4-7 s: ping's timer runs late under load) between a and b across a SIGTERM and a
    # restart of the agent, which together take about 1-2 s.
    count = 400

    def restart():
        setup.agent.stop(signal.SIGTERM)

        # While it is down: the binary answers "try again later" at once and nothing changes.
        ns = setup.nss.add()
        started = time.monotonic()
        rc, out, _ = setup.cni.call("ADD", ns, f"/run/netns/{ns}", timeout=10)
        assert time.monotonic() - started < 2.0
        assert rc == 1 and out["code"] == 11 and "not reachable" in out["msg"], out
        rc, out, _ = setup.cni.call("STATUS", config=dict(setup.cni.config, cniVersion="1.1.0"), timeout=10)
        assert rc == 1 and out["code"] == 50, out

        # Drift made while it is down: c's host veth deleted by hand, and a stray veth of our naming that no
        # endpoint record explains (kept and reported).
        nsexec(setup.ns, f"ip link del {setup.veth(c)}")
        nsexec(setup.ns, "ip link add np0123456789a type veth peer name straypeer")
        setup.agent.start()
        assert poll(lambda: "event=agent.started" in setup.agent.log().split("event=agent.stopped")[-1], 10)

    transmitted, received, out = pings_during(a, ip_b, restart, count=count)
    assert (transmitted, received) == (count, count), out

    after = setup.ifindexes()
    assert after[a] == before[a] and after[b] == before[b], "a healthy container's veth was recreated"
    # c was rebuilt from its etcd record: a new pair with the same address, reachable again.
    assert after[c][0] and after[c] != before[c]
    assert f"{ip_c} dev {setup.veth(c)}" in setup.host_routes()
    assert nsexec(a, f"ping -c2 -i0.2 -W1 {ip_c}", check=False).returncode == 0
    # The stray has no record and this agent never saw one: it cannot tell it from a live container's, so it is
    # kept and reported, not deleted (tests/faults/test_dataplane_faults.py has the renamed-host case).
    assert "np0123456789a" in nsexec(setup.ns, "ip -o link show").stdout
    with open(setup.agent.log_path) as f:
        assert "event=dataplane.unaccounted host_if=np0123456789a" in f.read()
    nsexec(setup.ns, "ip link del np0123456789a")


def test_resync_repairs_a_container_route_deleted_by_hand(setup):
    a, ip_a = setup.add()
    b, ip_b = setup.add()
    assert poll(lambda: nsexec(a, f"ping -c1 -W0.2 {ip_b}", check=False).returncode == 0, 5)
    index_before = setup.ifindexes()
    route = f"{ip_b} dev {setup.veth(b)}"
    assert route in setup.host_routes()

    nsexec(setup.ns, f"ip route del {ip_b}/32 dev {setup.veth(b)}")
    deleted_at = time.monotonic()
    assert nsexec(a, f"ping -c1 -W0.2 {ip_b}", check=False).returncode != 0, "the route was not needed?"
    # One full resync comes within RESYNC seconds (jittered 0.8-1.0 of it); allow that plus its own run time.
    assert poll(lambda: route in setup.host_routes(), RESYNC + 1.0), setup.agent.log()[-2000:]
    repaired_in = time.monotonic() - deleted_at
    assert nsexec(a, f"ping -c2 -i0.2 -W1 {ip_b}", check=False).returncode == 0
    assert setup.ifindexes() == index_before, "repairing a route recreated a veth"
    assert "routes_added" in setup.agent.log()
    print(f"\nroute repaired {repaired_in:.2f} s after deletion (resync interval {RESYNC} s)")


def test_agent_restart_keeps_endpoint_records_and_allocations(setup, etcd):
    """A restart is not a DEL: the records and addresses of running containers stay exactly as they were."""
    a, ip_a = setup.add()
    state = {kv.key: kv.value for kv in etcd.list("/netplugin/v1/") if "/endpoints/" in kv.key or "/ipam/" in kv.key}
    setup.agent.stop(signal.SIGTERM)
    setup.agent.start()
    assert poll(lambda: "event=agent.started" in setup.agent.log().split("event=agent.stopped")[-1], 10)
    again = {kv.key: kv.value for kv in etcd.list("/netplugin/v1/") if "/endpoints/" in kv.key or "/ipam/" in kv.key}
    assert again == state
    rc, out, err = setup.cni.call(
        "CHECK",
        a,
        f"/run/netns/{a}",
        config=dict(
            setup.cni.config,
            prevResult={
                "cniVersion": "1.1.0",
                "interfaces": [{"name": "eth0"}],
                "ips": [{"address": f"{ip_a}/32", "interface": 0}],
            },
        ),
    )
    assert (rc, out) == (0, {}), (out, err)
    assert os.path.exists(setup.agent.socket)
