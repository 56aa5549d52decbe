"""Faults around liveness: leadership held steadily, liveness never waiting behind reclamation, a reclaim pass
bounded in time, and an agent started before etcd.

Real agents in throwaway host namespaces and a real etcd. The one in-process test (liveness against a slow
reclaim) builds a real Agent on the real etcd and swaps in a slow reclaimer: it tests the thread structure.
"""

import os
import threading
import time

import pytest

from netplugin.agent.daemon import Agent
from netplugin.config import AgentConfig, EtcdConfig
from netplugin.datastore import keys
from netplugin.ipam.allocator import IPAM
from netplugin.ipam.reclaim import Reclaimer, check
from netplugin.lab.etcd import requests_served
from netplugin.nodes import Liveness
from netplugin.lab.agents import AgentProcess, CniBinary
from netplugin.lab.etcd import EtcdServer
from netplugin.lab.netns import nsexec
from tests.waiting import poll, wait_until

pytestmark = pytest.mark.functional

TTL = 3  # seconds: the agents' liveness (and election) lease in these tests


def watch_key(ds, key, seconds, step=0.1):
    """Samples of (holder, create revision) of ``key`` every ``step`` for ``seconds``; None when absent."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        kv = ds.get(key)
        seen.append(None if kv is None else (kv.value.get("holder"), kv.create_revision))
        time.sleep(step)
    return seen


def changes(samples):
    return sum(1 for a, b in zip(samples, samples[1:]) if a != b)


def test_leadership_stays_with_one_agent_over_many_lease_ttls(etcd, host_factory):
    args = ["--liveness-ttl", str(TTL), "--reclaim-interval", "30"]
    a, b = host_factory(extra_args=args), host_factory(extra_args=args)
    key = keys.leader("reclaimer")
    wait_until("a reclaimer leader", lambda: etcd.get(key), timeout=10)
    samples = watch_key(etcd, key, 4 * TTL)
    lapses = samples.count(None)
    print(
        f"\nleader changes over {4 * TTL}s ({4} lease TTLs): {changes(samples)}, samples without a leader: "
        f"{lapses} of {len(samples)}"
    )
    assert lapses == 0 and changes(samples) == 0, samples
    assert samples[0][0] in (a.hostname, b.hostname)


class SlowReclaimer:
    """A reclaimer whose pass takes far longer than the liveness lease (an etcd with 100,000 handles)."""

    def __init__(self, seconds, stop):
        self.seconds, self.stop, self.passes = seconds, stop, 0

    def run_once(self, budget=None, still_leader=None):
        self.passes += 1
        self.stop.wait(self.seconds)
        return {"waiting": {}, "reclaimed": {}, "revived": []}


def test_liveness_keeps_beating_while_a_reclaim_pass_is_slow(etcd, etcd_server, tmp_path):
    cfg = AgentConfig(
        hostname="slow-reclaim",
        etcd=EtcdConfig(endpoints=[etcd_server.endpoint]),
        run_dir=str(tmp_path / "run"),
        liveness_ttl=TTL,
        reclaim_interval=0.1,
    )
    agent = Agent(cfg)
    agent.reclaimer = SlowReclaimer(5 * TTL, agent._stop)
    try:
        agent.liveness.renew()
        agent._start_loops()
        wait_until("a reclaim pass under way", lambda: agent.reclaimer.passes, timeout=2 * TTL)
        samples = watch_key(etcd, keys.liveness(cfg.hostname), 3 * TTL, step=0.2)
        age = agent.progress.age("liveness")
    finally:
        agent._stop.set()
        for t in agent._threads:
            t.join(timeout=5)
        if agent.liveness.lease:
            etcd.revoke_lease(agent.liveness.lease)
    missing = samples.count(None)
    print(
        f"\nliveness samples missing during a {5 * TTL}s reclaim pass: {missing} of {len(samples)}; "
        f"last beat {age:.1f}s ago"
    )
    assert missing == 0 and age < TTL, samples


def test_a_reclaim_pass_is_bounded_in_time_and_the_next_one_goes_on(etcd):
    ipam = IPAM(etcd)
    ipam.add_pool("10.75.0.0/22")
    life = Liveness(etcd, "dead-host", ttl=TTL)
    assert life.beat()
    for i in range(300):
        ipam.auto_assign(f"h{i}", "dead-host")
    etcd.revoke_lease(life.lease)  # the host dies
    reclaimer = Reclaimer(etcd, ipam, grace=0.0)
    reclaimer.run_once()  # starts the grace clock
    passes, took = [], []
    while not passes or passes[-1].get("truncated"):
        started = time.monotonic()
        passes.append(reclaimer.run_once(budget=0.2))
        took.append(time.monotonic() - started)
        assert len(passes) < 100
    print(f"\n300 handles reclaimed in {len(passes)} passes of at most {max(took):.2f}s (budget 0.2s)")
    assert len(passes) > 1 and all(p.get("truncated") for p in passes[:-1])
    assert max(took) < 0.2 + 1.0  # the budget plus one release and the listing
    assert not etcd.list(keys.HANDLES) and check(etcd) == []


def test_an_agent_started_before_etcd_waits_then_serves(namespaces, tmp_path):
    server = EtcdServer()
    agent = None
    try:
        server.start()
        ns = namespaces.add()
        server.bridge_into(ns)
        nsexec(ns, "ip addr add 10.254.76.1/32 dev lo")
        server.stop()  # etcd gone before the agent starts
        agent = AgentProcess(ns, "early", server.endpoint, str(tmp_path / "run"))
        starting = threading.Thread(target=agent.start, kwargs={"timeout": 60}, daemon=True)
        starting.start()
        wait_until("two attempts logged", lambda: agent.log().count("event=agent.waiting_for_etcd") >= 2, 15)
        assert agent.proc.poll() is None, agent.log()
        down_at = time.monotonic()
        server.start()
        starting.join(timeout=60)
        assert os.path.exists(agent.socket), agent.log()
        ready_in = time.monotonic() - down_at
        from netplugin.datastore.client import Datastore

        ds = Datastore(EtcdConfig(endpoints=[server.endpoint]))
        IPAM(ds).add_pool("10.76.0.0/24")
        cni = CniBinary(str(tmp_path / "cni"), agent.socket, network="earlynet", pools=["10.76.0.0/24"])
        a, b = namespaces.add(), namespaces.add()
        rc, out_a, err = cni.call("ADD", a, f"/run/netns/{a}")
        assert rc == 0, (out_a, err, agent.log())
        rc, out_b, err = cni.call("ADD", b, f"/run/netns/{b}")
        assert rc == 0, (out_b, err, agent.log())
        ip_b = out_b["ips"][0]["address"].split("/")[0]
        assert poll(lambda: nsexec(a, f"ping -c1 -W1 {ip_b}", check=False).returncode == 0, 5)
        attempts = agent.log().count("event=agent.waiting_for_etcd")
        print(f"\nagent started before etcd: {attempts} attempts logged; serving {ready_in:.1f}s after etcd came up")
        for ns_ in (a, b):
            cni.call("DEL", ns_, f"/run/netns/{ns_}")
    finally:
        if agent:
            agent.stop()
        server.close()


def test_an_idle_agent_costs_etcd_little_more_than_its_liveness_beat(etcd, etcd_server, host_factory):
    args = ["--liveness-ttl", str(TTL), "--reclaim-interval", "30"]
    a, b = host_factory(extra_args=args), host_factory(extra_args=args)
    key = keys.leader("reclaimer")
    wait_until("a reclaimer leader", lambda: etcd.get(key), timeout=10)
    time.sleep(TTL)  # past the start-up requests
    seconds = 6 * TTL
    by_before = requests_served(etcd_server.endpoint)
    time.sleep(seconds)
    by_after = requests_served(etcd_server.endpoint)
    rate = (sum(by_after.values()) - sum(by_before.values())) / seconds / 2
    by = {
        m: round((by_after[m] - by_before.get(m, 0)) / seconds / 2, 3)
        for m in by_after
        if by_after[m] != by_before.get(m, 0)
    }
    beat = 1 / (TTL / 3.0)  # one lease keep-alive per beat is the floor: liveness must be refreshed
    print(f"\nidle etcd requests per agent: {rate:.2f}/s (one keep-alive per beat: {beat:.2f}/s) {by}")
    assert etcd.get(key).value["holder"] in (a.hostname, b.hostname)
    # Two keep-alives and a campaign per beat (the old loops) are three requests a beat per agent.
    assert rate < 1.35 * beat, by


def test_a_killed_leaders_successor_takes_over_within_the_lease_ttl(etcd, host_factory):
    args = ["--liveness-ttl", str(TTL), "--reclaim-interval", "30"]
    agents = {x.hostname: x for x in (host_factory(extra_args=args), host_factory(extra_args=args))}
    key = keys.leader("reclaimer")
    wait_until("a reclaimer leader", lambda: etcd.get(key), timeout=10)
    leader = etcd.get(key).value["holder"]
    killed_at = time.monotonic()
    agents[leader].proc.kill()  # -9: no lease revoked, no goodbye
    agents[leader].proc.wait()
    gone = taken = None
    while time.monotonic() < killed_at + 3 * TTL and taken is None:
        kv = etcd.get(key)
        if kv is None and gone is None:
            gone = time.monotonic()
        if kv is not None and kv.value["holder"] != leader:
            taken = time.monotonic()
        time.sleep(0.05)
    assert taken is not None, agents[leader].log()
    print(
        f"\nleader killed; its key lapsed after {(gone or taken) - killed_at:.2f}s, successor leading after "
        f"{taken - killed_at:.2f}s (TTL {TTL}s)"
    )
    # The lease runs its course (at most TTL after the last beat), then the watch's delete event wakes the other.
    assert taken - killed_at < TTL + 1.0
    assert taken - (gone or taken) < 0.35  # the old loops waited for their next beat (up to TTL/3)
