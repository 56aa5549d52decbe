"""Event-driven syncs are proportional to what changed: another host's endpoint appearing or leaving costs this
host's agent one ``ipset restore`` of the changed members (no etcd re-read, no ``iptables-restore``), and the
periodic full resync still repairs a set changed behind the agent's back.

A real agent in a throwaway host namespace, a local container ADDed through the CNI binary, and the remote
endpoints written to etcd as another host's agent would write them.
"""

import re

import pytest

from netplugin.datastore import keys
from netplugin.datastore.models import Endpoint
from netplugin.ipam.allocator import IPAM
from netplugin.lab.agents import CniBinary
from netplugin.lab.netns import nsexec
from policy.compiler import set_name
from tests.waiting import poll

pytestmark = pytest.mark.functional

POOL = "10.74.0.0/24"
NETWORK = "incnet"
RESYNC = 3.0


def _remote(n):
    return Endpoint(
        id=f"far{n}",
        host="far-host",
        network=NETWORK,
        container_id=f"c{n}",
        netns=f"/run/netns/c{n}",
        ifname="eth0",
        host_ifname=f"np00000000f{n:02x}",
        addresses=[f"10.74.1.{n}/32"],
        labels={"netplugin.io/network": NETWORK},
    )


def _members(ns, name):
    out = nsexec(ns, f"ipset list {name}", check=False).stdout
    return set(re.findall(r"^(\d+\.\d+\.\d+\.\d+(?:/\d+)?)\s*$", out.split("Members:")[-1], re.M))


def _log_since(agent, offset):
    with open(agent.log_path) as f:
        f.seek(offset)
        return f.read()


def _log_size(agent):
    with open(agent.log_path) as f:
        return len(f.read())


@pytest.fixture
def host(etcd, host_factory, namespaces, tmp_path):
    IPAM(etcd).add_pool(POOL)
    agent = host_factory(extra_args=["--resync-interval", str(RESYNC)])
    cni = CniBinary(str(tmp_path / "cni"), agent.socket, network=NETWORK, pools=[POOL])
    added = []

    def add():
        container = namespaces.add()
        added.append(container)
        rc, out, err = cni.call("ADD", container, f"/run/netns/{container}")
        assert rc == 0, (out, err, agent.log())
        return out["ips"][0]["address"].split("/")[0]

    try:
        agent.add = add
        yield agent, add()
    finally:
        for container in added:
            cni.call("DEL", container, f"/run/netns/{container}")


def test_remote_endpoint_changes_update_ipsets_without_any_process(etcd, host):
    agent, local_ip = host
    net_set, all_set = set_name("net", 4, NETWORK), set_name("all", 4, "")
    assert poll(
        lambda: f"{local_ip}/32" in _members(agent.netns, net_set) or local_ip in _members(agent.netns, net_set)
    ), agent.log()
    rules_before = nsexec(agent.netns, "iptables-save -t filter").stdout
    offset = _log_size(agent)

    etcd.put(keys.endpoint("far-host", "far1"), _remote(1).to_dict())
    assert poll(lambda: {"10.74.1.1"} <= _members(agent.netns, net_set) & _members(agent.netns, all_set)), agent.log()
    etcd.delete(keys.endpoint("far-host", "far1"))
    assert poll(lambda: "10.74.1.1" not in _members(agent.netns, net_set) | _members(agent.netns, all_set)), agent.log()

    log = _log_since(agent, offset)
    applies = re.findall(r"policy sync netns=\S+: .*", log)
    incremental = [line for line in applies if "from the cache" in line]
    assert len(incremental) >= 2, log
    for line in incremental:
        # Members by netlink from the agent's own process (netplugin/kernel/ipset_members.py): no ipset restore.
        assert "chains v4 0/" in line and " v6 0/" in line and "; 0 process(es);" in line, line
    syncs = re.findall(r"event=sync revision=\d+ full=False took_ms=\S+ reload=(\w+)", log)
    assert syncs and all(r == "False" for r in syncs), log  # the watch fed the model: no etcd re-read
    # Nothing in our chains was rewritten (a rewrite would also have changed the rules' order or content).
    assert nsexec(agent.netns, "iptables-save -t filter").stdout.count("np:") == rules_before.count("np:")


def test_full_resync_repairs_a_member_removed_behind_the_agents_back(etcd, host):
    agent, local_ip = host
    all_set = set_name("all", 4, "")
    etcd.put(keys.endpoint("far-host", "far2"), _remote(2).to_dict())
    assert poll(lambda: "10.74.1.2" in _members(agent.netns, all_set)), agent.log()
    nsexec(agent.netns, f"ipset del {all_set} 10.74.1.2")
    # An event-driven sync trusts its memory of the kernel; the periodic resync reads back and repairs.
    assert poll(lambda: "10.74.1.2" in _members(agent.netns, all_set), timeout=3 * RESYNC), agent.log()
    # And the next remote change after the repair is incremental again.
    etcd.put(keys.endpoint("far-host", "far3"), _remote(3).to_dict())
    assert poll(lambda: "10.74.1.3" in _members(agent.netns, all_set)), agent.log()


def test_add_waits_for_a_pass_the_watch_fed_and_returns_covered_by_policy(etcd, host):
    agent, _ = host
    offset = _log_size(agent)
    ip = agent.add()
    # Right when ADD returns, the new address is in this host's sets and its veth in our dispatch set.
    assert ip in _members(agent.netns, set_name("all", 4, "")), agent.log()
    [ep] = [kv.value for kv in etcd.list(keys.endpoint_prefix(agent.hostname)) if kv.value["addresses"] == [f"{ip}/32"]]
    assert f"{ip},{ep['host_ifname']}" in nsexec(agent.netns, "ipset save").stdout
    log = _log_since(agent, offset)
    passes = re.findall(r"event=sync revision=\d+ full=False took_ms=\S+ reload=(\w+)", log)
    assert passes and all(r == "False" for r in passes), log  # no fallback to reading etcd
    assert "policy.wait_timeout" not in log
