"""The agent's dataplane reconciler with real etcd, a real EndpointService and a Dataplane driving a throwaway
host namespace: it deletes a veth only when it saw the endpoint's record go, keeps and reports the others."""

import logging
from types import SimpleNamespace

import pytest

from netplugin.agent.reconcilers import DataplaneReconciler
from netplugin.agent.rwlock import RWLock
from netplugin.agent.view import ViewChanges, read_view
from netplugin.datastore import keys
from netplugin.dataplane import Dataplane, host_ifname
from netplugin.ipam.allocator import IPAM
from netplugin.service.endpoints import EndpointService, WorkloadRequest
from tests.functional.test_dataplane import links

pytestmark = pytest.mark.functional

HOST = "h-reconciler"


@pytest.fixture
def agent(etcd, namespaces):
    ipam = IPAM(etcd)
    ipam.add_pool("10.76.0.0/24")
    host_ns = namespaces.add()
    dp = Dataplane(host_netns=f"/run/netns/{host_ns}")
    service = EndpointService(etcd, ipam, dp, HOST)
    a = SimpleNamespace(
        host=HOST, host_lock=RWLock(), service=service, dataplane=dp, ds=etcd, ns=host_ns, nss=namespaces
    )
    yield a
    for ep in service.list(HOST):
        service.delete(ep.id)


def add(agent):
    ns = agent.nss.add()
    return agent.service.add(WorkloadRequest(network="n", container_id=ns, netns=f"/run/netns/{ns}"))


def test_deletes_only_what_it_saw_go_and_reports_the_rest_once(agent, caplog):
    a, b, c = add(agent), add(agent), add(agent)
    first = DataplaneReconciler(HOST, agent.dataplane, agent.service, agent.host_lock)
    first.sync(read_view(agent.ds), full=True)
    assert first.report() == {"unaccounted_interfaces": []}

    # A watch event deletes a's record (etcdctl del while the agent runs): the next full pass removes its veth.
    agent.ds.delete(keys.endpoint(HOST, a.id))
    first.sync(read_view(agent.ds), changes=ViewChanges(everything=False, keys=frozenset({keys.endpoint(HOST, a.id)})))
    first.sync(read_view(agent.ds), full=True)
    assert host_ifname(a.id) not in links(agent.ns) and host_ifname(b.id) in links(agent.ns)
    assert first.report() == {"unaccounted_interfaces": []}

    # b's record missing from a full read only (etcd restored from an older snapshot): kept, reported.
    agent.ds.delete(keys.endpoint(HOST, b.id))
    first.sync(read_view(agent.ds), full=True)
    assert host_ifname(b.id) in links(agent.ns)
    assert first.report() == {"unaccounted_interfaces": [host_ifname(b.id)]}

    # c's record deleted while the agent was down: a new reconciler never saw it go.
    agent.ds.delete(keys.endpoint(HOST, c.id))
    restarted = DataplaneReconciler(HOST, agent.dataplane, agent.service, agent.host_lock)
    with caplog.at_level(logging.WARNING, logger="netplugin.agent.reconcilers"):
        for _ in range(3):
            restarted.sync(read_view(agent.ds), full=True)
    assert {host_ifname(b.id), host_ifname(c.id)} <= links(agent.ns)
    assert restarted.report() == {"unaccounted_interfaces": sorted([host_ifname(b.id), host_ifname(c.id)])}
    assert sum(f"host_if={host_ifname(c.id)}" in r.getMessage() for r in caplog.records) == 1
    agent.service.delete(b.id, b.netns)  # a DEL accounts for them
    agent.service.delete(c.id, c.netns)
    restarted.sync(read_view(agent.ds), full=True)
    assert restarted.report() == {"unaccounted_interfaces": []}
