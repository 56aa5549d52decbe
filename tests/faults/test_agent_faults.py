"""Faults of the agent itself: kill -9 in the middle of 20 concurrent ADDs, kill -9 under 10 ms pings, BIRD killed
under a running agent, and a sync loop that fails or stalls (ADD then says "try again later").

Real agents in throwaway host namespaces, the installed CNI binary called as a runtime calls it, real etcd, real
packets between network namespaces. The sync-loop tests build a real Agent on the real etcd and give it one
reconciler that fails or is slow: they test how the agent judges its own sync, not a dataplane.
"""

import concurrent.futures
import os
import signal
import time

import pytest

from netplugin.agent.daemon import SYNC_FAILING_PASSES, Agent
from netplugin.cli.health_cmds import agent_health
from netplugin.config import AgentConfig, EtcdConfig
from netplugin.datastore import keys
from netplugin.errors import NotReady
from netplugin.ipam.allocator import IPAM
from netplugin.ipam.reclaim import check
from netplugin.lab.agents import AgentProcess, CniBinary, rmtree, tempdir
from netplugin.lab.etcd import EtcdServer
from netplugin.lab.netns import nsexec
from tests.nshttp import get as ns_get
from tests.probes import pings_during
from tests.waiting import poll, wait_until

pytestmark = pytest.mark.functional

POOL = "10.77.0.0/24"
NETWORK = "faultnet"


def np_links(ns):
    return {
        line.split(":")[1].strip().split("@")[0]
        for line in nsexec(ns, "ip -o link show").stdout.splitlines()
        if line.split(":")[1].strip().startswith("np")
    }


@pytest.fixture
def cni_host(etcd, host_factory, tmp_path):
    IPAM(etcd).add_pool(POOL)
    agent = host_factory()
    return agent, CniBinary(str(tmp_path / "cni"), agent.socket, network=NETWORK, pools=[POOL])


def test_kill_9_during_20_concurrent_adds_then_the_runtimes_dels_leak_nothing(etcd, cni_host, namespaces):
    agent, cni = cni_host
    nss = [namespaces.add() for _ in range(20)]
    with concurrent.futures.ThreadPoolExecutor(len(nss)) as pool:
        futures = {pool.submit(cni.call, "ADD", ns, f"/run/netns/{ns}", timeout=60): ns for ns in nss}
        wait_until("a first ADD answered", lambda: any(f.done() for f in futures), timeout=30, step=0.005)
        agent.stop(signal.SIGKILL)
        results = {futures[f]: f.result() for f in futures}
    ok = {ns: out for ns, (rc, out, _) in results.items() if rc == 0}
    failed = {ns: out for ns, (rc, out, _) in results.items() if rc != 0}
    assert ok and failed, f"the kill came too late or too early to prove anything: {len(ok)} ADDs succeeded"
    assert all(out.get("code") == 11 for out in failed.values()), failed
    addresses = [out["ips"][0]["address"] for out in ok.values()]
    assert len(addresses) == len(set(addresses)), f"duplicate addresses: {sorted(addresses)}"

    agent.start()
    for ns in nss:  # the runtime DELs every container whose ADD it ran, whatever the ADD answered
        rc, out, err = cni.call("DEL", ns, f"/run/netns/{ns}")
        assert rc == 0, (ns, out, err, agent.log())
    findings = check(etcd)
    leaked = [f["address"] for f in findings if "address" in f]
    handles, endpoints = etcd.list(keys.HANDLES), etcd.list(keys.ENDPOINTS)
    allocated = sum(len(kv.value.get("allocations", {})) for kv in etcd.list(keys.BLOCKS))
    print(
        f"\nkill -9 during 20 ADDs: {len(ok)} succeeded, {len(failed)} answered code 11; after the DELs: "
        f"{len(leaked)} leaked address(es), {allocated} allocated, {len(handles)} handle(s), "
        f"{len(endpoints)} endpoint record(s), {len(np_links(agent.netns))} host veth(s); "
        f"{len(addresses) - len(set(addresses))} duplicate(s)"
    )
    assert findings == [] and allocated == 0 and not handles and not endpoints, findings
    assert np_links(agent.netns) == set()


def test_kill_9_and_restart_under_10ms_pings_loses_nothing(cni_host, namespaces):
    agent, cni = cni_host
    a, b = namespaces.add(), namespaces.add()
    outs = {}
    try:
        for ns in (a, b):
            rc, outs[ns], err = cni.call("ADD", ns, f"/run/netns/{ns}")
            assert rc == 0, (outs[ns], err)
        ip_b = outs[b]["ips"][0]["address"].split("/")[0]
        assert poll(lambda: nsexec(a, f"ping -c1 -W0.2 {ip_b}", check=False).returncode == 0, 5)
        count = 500
        timing = {}

        def kill_and_restart():
            agent.stop(signal.SIGKILL)
            killed = time.monotonic()
            agent.start()
            timing["serving_in"] = time.monotonic() - killed

        transmitted, received, out = pings_during(a, ip_b, kill_and_restart, count=count)
        serving_in = timing["serving_in"]
        print(
            f"\nkill -9 and restart under 10 ms pings: {transmitted - received} of {transmitted} lost; "
            f"agent serving again {serving_in:.1f}s after the kill"
        )
        assert (transmitted, received) == (count, count), out
    finally:
        for ns in (a, b):
            cni.call("DEL", ns, f"/run/netns/{ns}")


def bird_pid(run_dir):
    try:
        with open(os.path.join(run_dir, "bird", "bird.pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if os.path.exists(f"/proc/{pid}") else None


def test_bird_killed_health_goes_false_then_true(etcd_server, etcd, namespaces):
    run_dir = tempdir()  # short: BIRD's control socket path must fit in sun_path
    ns = namespaces.add()
    etcd_server.bridge_into(ns)
    nsexec(ns, "ip addr add 10.254.77.1/32 dev lo")
    agent = AgentProcess(
        ns,
        "birdhost",
        etcd_server.endpoint,
        os.path.join(run_dir, "run"),
        extra_args=["--routing", "bgp", "--node-address", "10.254.77.1", "--metrics-listen", "10.254.77.1:9469"],
    )
    try:
        agent.start()
        wait_until(
            "BIRD running and the agent healthy",
            lambda: bird_pid(agent.run_dir) and agent_health(agent.run_dir)["ok"],
            timeout=20,
        )
        pid = bird_pid(agent.run_dir)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        seen = []

        def sample():
            answer = agent_health(agent.run_dir)
            status, body = ns_get(ns, "10.254.77.1", 9469, "/readyz")
            seen.append((time.monotonic() - killed, answer["ok"], answer["problems"], status, body))
            return seen[-1]

        down = wait_until("health false", lambda: not sample()[1] and sample(), timeout=5, step=0.01)
        assert any("BIRD is not running" in p for p in down[2]), down
        wait_until(
            "/readyz 503 too", lambda: sample()[3] == 503 and "BIRD is not running" in seen[-1][4], timeout=5, step=0.01
        )
        wait_until("health true again", lambda: sample()[1], timeout=10, step=0.02)
        wait_until("/readyz 200 again", lambda: sample()[3] == 200, timeout=5, step=0.02)
        recovered = seen[-1][0]
        wait_until("a new BIRD's pid file", lambda: bird_pid(agent.run_dir) not in (None, pid), timeout=5)
        print(f"\nBIRD kill -9: health false {down[0]:.2f}s after the kill, true again after {recovered:.2f}s")
    finally:
        agent.stop()
        pid = bird_pid(agent.run_dir)
        if pid:
            os.kill(pid, signal.SIGKILL)
        rmtree(run_dir)


# --- the agent's judgement of its own sync -------------------------------------------------------------------------


class Part:
    """A reconciler that the test makes fail, or slow; ADD waits for it like the policy reconciler."""

    covers_new_endpoints = True

    def __init__(self):
        self.fail = False
        self.delay = 0.0
        self.calls = 0

    def sync(self, view, full=False, changes=None):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("a bug in a reconciler")


@pytest.fixture
def agent_with_part(etcd, etcd_server, tmp_path):
    made = []

    def make(**config):
        cfg = AgentConfig(
            hostname=f"judge{len(made)}",
            etcd=EtcdConfig(endpoints=[etcd_server.endpoint]),
            run_dir=str(tmp_path / "run"),
            policy_setup_timeout=0.5,
            resync_interval=60,
            **config,
        )
        agent = Agent(cfg)
        part = Part()
        agent.reconcilers = [part]
        agent._start_loops()
        made.append(agent)
        return agent, part

    yield make
    for agent in made:
        agent._stop.set()
        agent._dirty.set()
        for t in agent._threads:
            t.join(timeout=10)
        if agent.liveness.lease:
            etcd.revoke_lease(agent.liveness.lease)


def test_add_answers_try_again_while_the_sync_fails_and_succeeds_once_it_works(agent_with_part):
    agent, part = agent_with_part()
    part.fail = True
    agent._dirty.set()
    failing_at = time.monotonic()
    wait_until(f"{SYNC_FAILING_PASSES} failed passes", agent.sync_trouble, timeout=20)
    detected = time.monotonic() - failing_at
    with pytest.raises(NotReady, match="sync passes failed") as err:
        agent.service.policy_ready("ep1")
    assert err.value.cni_code == 11
    health = agent.health()
    assert not health["ok"] and any("RuntimeError: a bug in a reconciler" in p for p in health["problems"]), health
    part.fail = False
    wait_until("a good pass", lambda: agent.sync_trouble() is None, timeout=20)
    agent.service.policy_ready("ep1")  # no error
    assert agent.health()["ok"], agent.health()
    print(f"\nfailing sync detected {detected:.1f}s after it began failing (ADD then answers code 11)")


def test_a_slow_sync_keeps_add_succeeding_and_a_stalled_one_does_not(agent_with_part):
    agent, part = agent_with_part(sync_deadline=2.0)
    part.delay = 1.0  # slower than ADD's wait (0.5 s), well under the deadline
    started = time.monotonic()
    agent.service.policy_ready("ep1")  # times out, logs, and succeeds: today's behaviour under load
    assert time.monotonic() - started >= 0.5 and agent.sync_trouble() is None
    part.delay = 4.0  # a pass hangs past the deadline
    agent._dirty.set()
    wait_until("a long pass under way", lambda: agent._pass_began is not None, timeout=10)
    wait_until("the stall detected", agent.sync_trouble, timeout=6)
    with pytest.raises(NotReady, match="running for"):
        agent.service.policy_ready("ep2")
    part.delay = 0.0


def test_etcd_unreachable_past_the_liveness_ttl_makes_health_false_until_it_answers(namespaces, tmp_path):
    server = EtcdServer()
    agent = None
    ttl = 2
    try:
        server.start()
        ns = namespaces.add()
        server.bridge_into(ns)
        nsexec(ns, "ip addr add 10.254.78.1/32 dev lo")
        agent = AgentProcess(
            ns,
            "cutoff",
            server.endpoint,
            str(tmp_path / "run"),
            extra_args=["--liveness-ttl", str(ttl), "--metrics-listen", "10.254.78.1:9469"],
        )
        agent.start()

        def readyz():
            return ns_get(ns, "10.254.78.1", 9469, "/readyz")

        wait_until("healthy", lambda: agent_health(agent.run_dir)["ok"] and readyz()[0] == 200, timeout=10)
        server.stop()
        stopped = time.monotonic()
        down = wait_until(
            "health false",
            lambda: not agent_health(agent.run_dir)["ok"] and agent_health(agent.run_dir),
            timeout=4 * ttl,
            step=0.1,
        )
        false_after = time.monotonic() - stopped
        assert any("etcd unreachable" in p for p in down["problems"]), down
        assert false_after >= ttl * 0.9, f"unhealthy after {false_after:.1f}s: before the threshold"
        status, body = readyz()
        assert status == 503 and "etcd unreachable" in body, (status, body)
        assert ns_get(ns, "10.254.78.1", 9469, "/livez")[0] == 200  # alive, just not ready
        server.start()
        back = time.monotonic()
        wait_until("healthy again", lambda: agent_health(agent.run_dir)["ok"], timeout=15, step=0.1)
        wait_until("/readyz 200 again", lambda: readyz()[0] == 200, timeout=5, step=0.1)
        print(
            f"\netcd stopped: health false {false_after:.1f}s later (threshold {ttl}s); true again "
            f"{time.monotonic() - back:.1f}s after etcd answered"
        )
    finally:
        if agent:
            agent.stop()
        server.close()
