"""Faults of the host dataplane, with a real agent in a throwaway host namespace, the installed CNI binary,
namespaces as containers and real packets between them:

- a renamed host (the agent restarted with another ``--hostname``: etcd holds no record for it) keeps every
  container and reports their veths as unaccounted, instead of deleting every ``np*`` veth;
- a repeated ADD that fails leaves the container it re-converged working, with its addresses held;
- a CNI_NETNS that is not a network namespace is refused with code 7 and nothing is created.

Figures (packets lost, ...) are printed for the README's "faults survived" table (run with ``-s``).
"""

import json
import os
import signal
import time

import pytest

from netplugin.dataplane import host_ifname
from netplugin.datastore import keys
from netplugin.ipam.allocator import IPAM
from netplugin.service.endpoints import endpoint_id
from netplugin.lab.agents import CniBinary
from tests.functional.test_agent import NETWORK, POOL, RESYNC, Setup
from tests.functional.test_netctl import netctl
from netplugin.lab.netns import nsexec
from tests.probes import steady_ping
from tests.waiting import poll, wait_until

pytestmark = pytest.mark.functional

POOL6 = "fd73::/64"


class Host(Setup):
    """test_agent's host (an agent, the plugin, containers ADDed through it), optionally dual-stack, with what
    the fault tests look at."""

    def __init__(self, etcd, host_factory, namespaces, tmp_path, ipv6=False):
        super().__init__(etcd, host_factory, namespaces, tmp_path)
        self.ipam = IPAM(etcd)
        if ipv6:
            self.ipam.add_pool(POOL6)
            self.cni = CniBinary(str(tmp_path / "cni6"), self.agent.socket, network=NETWORK, pools=[POOL, POOL6])

    def ep_id(self, ns):
        return endpoint_id(NETWORK, ns, "eth0")

    def links(self):
        return {link["ifname"] for link in json.loads(nsexec(self.ns, "ip -j link show").stdout)}

    def held(self, ns):
        handle, _ = self.ipam.get_handle(self.ep_id(ns))
        return sorted(handle.addresses) if handle else []

    def pings(self, src, address, count=1):
        return nsexec(src, f"ping -c{count} -i0.2 -W1 {address}", check=False).returncode == 0

    def full_log(self):
        """The agent's whole log (``agent.log()`` is its tail)."""
        with open(self.agent.log_path) as f:
            return f.read()

    def restart(self, hostname):
        self.agent.stop(signal.SIGTERM)
        self.agent.hostname = hostname
        self.agent.start()
        wait_until(
            "the agent's first sync",
            lambda: "event=agent.started" in self.agent.log().split("event=agent.stopped")[-1],
            15,
        )


def _host(etcd, host_factory, namespaces, tmp_path, ipv6):
    h = Host(etcd, host_factory, namespaces, tmp_path, ipv6)
    try:
        yield h
    finally:
        if h.agent.proc is not None:
            h.close()


@pytest.fixture
def host(etcd, host_factory, namespaces, tmp_path):
    yield from _host(etcd, host_factory, namespaces, tmp_path, ipv6=False)


@pytest.fixture
def dual_host(etcd, host_factory, namespaces, tmp_path):
    yield from _host(etcd, host_factory, namespaces, tmp_path, ipv6=True)


def test_renamed_host_keeps_every_container_and_reports_their_veths(host):
    a, ip_a = host.add()
    b, ip_b = host.add()
    c, ip_c = host.add()
    original = host.agent.hostname
    assert poll(lambda: host.pings(a, ip_b) and host.pings(a, ip_c), 5)
    veths = sorted(host.veth(ns) for ns in (a, b, c))

    # 10 ms pings across the restart under another name and three full resyncs (RESYNC s apart).
    with steady_ping(a, ip_b, 600) as ping:
        time.sleep(0.5)
        host.restart("renamed-" + original)
        time.sleep(3 * RESYNC + 0.5)
    assert set(veths) <= host.links(), "a veth was deleted"
    log = host.full_log().split("event=agent.stopped")[-1]
    for name in veths:  # logged once each, not once per resync
        assert log.count(f"event=dataplane.unaccounted host_if={name}") == 1, log[-3000:]
    assert host.held(a) and host.held(b) and host.held(c)
    lost = ping["transmitted"] - ping["received"]
    print(
        f"\nrenamed host: {lost} of {ping['transmitted']} pings lost (10 ms apart) across the restart and 3 full "
        f"resyncs; {len(veths)} veths kept, reported as unaccounted"
    )
    assert lost == 0, ping["output"]
    print(
        f"renamed host: a new flow between two kept containers passes: {host.pings(a, ip_c)} (policy drops "
        "traffic of interfaces no record describes)"
    )

    # Back under its own name: the veths are accounted for again and the containers carry on.
    host.restart(original)
    assert host.pings(a, ip_c) and host.pings(c, ip_b)
    assert set(veths) <= host.links()


def test_failing_repeated_add_leaves_the_working_container_alone(dual_host, tmp_path):
    h = dual_host
    a, _ = h.add()
    b, _ = h.add()
    addrs_a = h.held(a)
    assert len(addrs_a) == 2
    assert poll(lambda: h.pings(b, addrs_a[0]) and h.pings(b, addrs_a[1]), 5)
    held = h.held(a)
    records = {kv.key: kv.value for kv in h.ds.list(keys.ENDPOINTS)}

    # A runtime retries ADD for the same container with inputs that fail this time, after IPAM: an MTU the
    # IPv6 address cannot have (the network's config was edited), and a netns path that is no namespace.
    not_a_netns = tmp_path / "not-a-netns"
    not_a_netns.write_text("")
    for what, netns, config in (
        ("IPv6 with MTU 1000", f"/run/netns/{a}", dict(h.cni.config, mtu=1000)),
        ("netns a regular file", str(not_a_netns), None),
    ):
        rc, out, err = h.cni.call("ADD", a, netns, config=config)
        assert rc == 1 and out.get("code") == 7, (what, out, err)
        assert h.held(a) == held, f"{what}: the retry released the working container's addresses"
        assert h.veth(a) in h.links(), f"{what}: the retry removed the working container's veth"
        assert {kv.key: kv.value for kv in h.ds.list(keys.ENDPOINTS)} == records
        assert h.pings(b, addrs_a[0]) and h.pings(b, addrs_a[1]), f"{what}: the working container lost traffic"
    # A retry that needed a new address (IPv6 turned on for the network) and then failed gives back only that.
    v4_only = dict(h.cni.config, ipam=dict(h.cni.config["ipam"], pools=[POOL]))
    d = h.nss.add()
    rc, out, err = h.cni.call("ADD", d, f"/run/netns/{d}", config=v4_only)
    assert rc == 0, (out, err)
    h.containers.append(d)
    held_d = h.held(d)
    assert len(held_d) == 1
    rc, out, err = h.cni.call("ADD", d, f"/run/netns/{d}", config=dict(h.cni.config, mtu=1000))
    assert rc == 1 and out.get("code") == 7 and "1280" in out["msg"], (out, err)
    assert h.held(d) == held_d and h.pings(b, held_d[0])
    # An address freed by mistake would be handed to the next container; it must not be.
    c, _ = h.add()
    assert not set(h.held(c)) & set(addrs_a)
    check = netctl(h.agent.etcd_endpoint, "ipam", "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_fresh_add_failing_after_ipam_takes_its_record_back_with_its_addresses(dual_host):
    """A new endpoint's record is written in the IPAM transaction, before its veth exists
    (EndpointService.add_recorded): an ADD that fails later must delete the record with the addresses."""
    h = dual_host
    d = h.nss.add()
    links = h.links()
    rc, out, err = h.cni.call("ADD", d, f"/run/netns/{d}", config=dict(h.cni.config, mtu=1000))
    assert rc == 1 and out.get("code") == 7 and "1280" in out["msg"], (out, err)
    assert h.ds.get(keys.endpoint(h.agent.hostname, h.ep_id(d))) is None, "the failed ADD left its record"
    assert h.held(d) == []
    wait_until("the failed ADD's veth deleted", lambda: h.links() == links, 5)
    check = netctl(h.agent.etcd_endpoint, "ipam", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    # The same container added properly afterwards gets its record, with the MAC its interface has.
    rc, out, err = h.cni.call("ADD", d, f"/run/netns/{d}")
    assert rc == 0, (out, err)
    h.containers.append(d)
    record = h.ds.get(keys.endpoint(h.agent.hostname, h.ep_id(d))).value
    mac = json.loads(nsexec(d, "ip -j link show eth0").stdout)[0]["address"]
    assert record["mac"] == mac == out["interfaces"][0]["mac"]


def test_cni_netns_that_is_not_a_namespace_is_refused_and_nothing_is_created(host, tmp_path):
    regular = tmp_path / "regular"
    regular.write_text("")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would block: it must never be opened
    before_links = host.links()
    for i, (netns, why) in enumerate(
        (
            (str(regular), "not an nsfs file"),
            (str(fifo), "not an nsfs file"),
            (str(tmp_path), "not an nsfs file"),
            (f"/proc/{os.getpid()}/ns/mnt", "a namespace of another kind"),
        )
    ):
        container = f"notns{i}"
        started = time.monotonic()
        rc, out, err = host.cni.call("ADD", container, netns, timeout=30)
        assert rc == 1 and out.get("code") == 7, (netns, out, err)
        assert "is not a network namespace" in out["msg"] and why in out["msg"], out
        assert time.monotonic() - started < 10
        assert nothing_created(host, container)
    assert host.links() == before_links


def nothing_created(host, container):
    """No handle, no record and no veth for ``container``."""
    ep = endpoint_id(NETWORK, container, "eth0")
    handle, _ = host.ipam.get_handle(ep)
    assert handle is None, handle
    assert host.ds.get(keys.endpoint(host.agent.hostname, ep)) is None
    assert host_ifname(ep) not in host.links()
    return True


def test_a_record_seen_going_removes_its_veth_a_record_gone_while_down_does_not(host):
    """Deleted by hand (etcdctl del) while the agent runs: it held the record and saw it go, so the veth goes at
    the next full resync. Deleted while the agent was down: the new process never saw it, so the veth is kept and
    reported (DEL and Docker's Leave go through the agent, so only such hand edits get here); its established
    flows carry on, new ones are dropped by policy (an interface no record describes) until it is sorted out."""
    a, ip_a = host.add()
    b, ip_b = host.add()
    c, ip_c = host.add()
    me = host.agent.hostname
    assert poll(lambda: host.pings(c, ip_b), 5)
    host.ds.delete(keys.endpoint(me, host.ep_id(a)))
    wait_until("a's veth removed", lambda: host.veth(a) not in host.links(), 4 * RESYNC + 2)

    with steady_ping(c, ip_b, 400) as ping:
        time.sleep(0.3)
        host.agent.stop(signal.SIGTERM)
        host.ds.delete(keys.endpoint(me, host.ep_id(b)))
        host.restart(me)
        time.sleep(2 * RESYNC)
    assert host.veth(b) in host.links()
    assert f"event=dataplane.unaccounted host_if={host.veth(b)}" in host.full_log()
    lost = ping["transmitted"] - ping["received"]
    assert lost == 0, ping["output"]
    print(
        f"\nrecord deleted while the agent was down: veth kept, {lost} of {ping['transmitted']} pings lost; a new "
        f"flow to it passes: {host.pings(c, ip_b)}"
    )
