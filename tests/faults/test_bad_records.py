"""Fault: bad records under every prefix the agent reads (a stray ``etcdctl put``, a truncated write, another
version's record). The agent must skip them, list them (health answer, ``netctl check``) and keep converging:
containers added afterwards reach each other, also across an agent restart with the bad records in place.

A real agent in a throwaway host namespace, the installed CNI binary, network namespaces as containers, real
packets between them.
"""

import json
import os
import subprocess
import time

import pytest

from netplugin.datastore import keys
from netplugin.ipam.allocator import IPAM
from netplugin.lab.agents import CniBinary
from tests.badrecords import bad_records, put_raw
from netplugin.lab.console import console_script
from netplugin.lab.netns import nsexec
from tests.waiting import poll

pytestmark = pytest.mark.functional

POOL = "10.74.0.0/24"
NETWORK = "badnet"
# Valid for the view (a JSON object named like its key) but not a policy: the policy reconciler skips it.
INVALID_POLICY = {
    "apiVersion": "netplugin/v1",
    "kind": "Policy",
    "metadata": {"name": "w"},
    "spec": {"selector": {}, "ingress": "nonsense"},
}


def netctl(endpoint, *args):
    env = dict(os.environ, NETPLUGIN_ETCD_ENDPOINTS=endpoint)
    return subprocess.run([console_script("netctl"), *args], env=env, capture_output=True, text=True, timeout=30)


class Host:
    def __init__(self, etcd, agent, namespaces, tmp_path):
        self.ds, self.agent, self.nss = etcd, agent, namespaces
        self.cni = CniBinary(str(tmp_path / "cni"), agent.socket, network=NETWORK, pools=[POOL])
        self.added = []

    def add(self):
        ns = self.nss.add()
        self.added.append(ns)
        rc, out, err = self.cni.call("ADD", ns, f"/run/netns/{ns}")
        assert rc == 0, (out, err, self.agent.log())
        return ns, out["ips"][0]["address"].split("/")[0]

    def close(self):
        for ns in self.added:
            self.cni.call("DEL", ns, f"/run/netns/{ns}")


@pytest.fixture
def host(etcd, host_factory, namespaces, tmp_path):
    IPAM(etcd).add_pool(POOL)
    h = Host(etcd, host_factory(extra_args=["--resync-interval", "2"]), namespaces, tmp_path)
    try:
        yield h
    finally:
        h.close()


def first_ping_answered(src, dst):
    """One echo, answered within a second: ADD waits for policy, so the very first packet must pass."""
    return nsexec(src, f"ping -c1 -W1 {dst}", check=False).returncode == 0


def test_bad_records_under_every_prefix_are_skipped_listed_and_nothing_else_stops(host, etcd_server):
    a, ip_a = host.add()
    records = bad_records(host.agent.hostname)
    for key, text in records:
        put_raw(host.ds, key, text)
    host.ds.put(keys.policy("w"), INVALID_POLICY)
    written = time.monotonic()

    # Containers added afterwards reach each other and the one from before, from their first packet.
    b, ip_b = host.add()
    c, ip_c = host.add()
    assert first_ping_answered(b, ip_c) and first_ping_answered(c, ip_a) and first_ping_answered(a, ip_b), (
        host.agent.log()[-4000:]
    )

    # The agent lists every bad record (once each, with why) and the invalid policy, and stays healthy.
    res = netctl(etcd_server.endpoint, "node", "health", "--run-dir", host.agent.run_dir, "-o", "json")
    health = json.loads(res.stdout)
    assert res.returncode == 0 and health["ok"], health
    assert {r["key"] for r in health["skipped_records"]} == {k for k, _ in records}, health["skipped_records"]
    assert health["reports"]["PolicyReconciler"]["invalid_policies"].keys() == {"w"}, health["reports"]
    with open(host.agent.log_path) as f:
        log = f.read()
    for key, _ in records:
        assert log.count(f"event=record.skipped key={key} ") == 1, key
    # netctl reads etcd itself and finds the same records (the invalid policy is valid JSON of the right shape:
    # only an agent that compiles it can tell).
    res = netctl(etcd_server.endpoint, "check")
    assert res.returncode == 1 and all(k in res.stdout for k, _ in records), res.stdout
    print(
        f"\nbad records: {len(records)} skipped; containers added after them reached each other "
        f"{time.monotonic() - written:.1f}s after the writes"
    )

    # A restart with the bad records in place: the agent starts, skips them again, and serves.
    host.agent.stop()
    host.agent.start()
    assert poll(lambda: "event=agent.started" in host.agent.log().split("event=agent.stopped")[-1], 20)
    d, ip_d = host.add()
    assert first_ping_answered(d, ip_a) and first_ping_answered(b, ip_d), host.agent.log()[-4000:]

    # Repaired records leave the list.
    for key, _ in records:
        host.ds.delete(key)
    assert poll(
        lambda: (
            json.loads(
                netctl(etcd_server.endpoint, "node", "health", "--run-dir", host.agent.run_dir, "-o", "json").stdout
            )["skipped_records"]
            == []
        ),
        10,
    )
    assert netctl(etcd_server.endpoint, "check").returncode == 0
