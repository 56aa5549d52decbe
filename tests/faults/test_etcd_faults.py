"""etcd faults with containers running: etcd killed and restarted, a 3-member etcd losing one member and then its
quorum, a half-open watch connection, and etcd restored from an older snapshot.

Each test has its own etcd (it is the thing that fails), one host namespace running a real agent that reaches
etcd through socat bridges (tests/etcd.py), and containers ADDed by the installed CNI binary. What each test
proves, it proves with packets (continuous pings, a denied TCP port), CNI answers and the agent's log; the
figures it measured are printed (``-s``) for the README's "faults survived" table.
"""

import os
import re
import subprocess
import time

import pytest

from netplugin.config import EtcdConfig
from netplugin.datastore import keys
from netplugin.datastore.client import Datastore
from netplugin.datastore.watch import IDLE_TIMEOUT
from netplugin.ipam.allocator import IPAM
from netplugin.lab.agents import AgentProcess, CniBinary
from netplugin.lab.console import console_script
from netplugin.lab.etcd import EtcdCluster, EtcdServer
from netplugin.lab.netns import NamespaceSet, nsexec
from tests.probes import Pinger, assert_reachability, start_echo_server
from tests.waiting import wait_until

pytestmark = pytest.mark.functional

POOL = "10.74.0.0/24"
NETWORK = "faultnet"
PING_INTERVAL = 0.05
ADD_FAIL_FAST = 8.0  # an ADD with etcd gone must say "try again" within this (the binary itself waits 120 s)
NETCTL = console_script("netctl")
WEB_ICMP_ONLY = """apiVersion: netplugin/v1
kind: Policy
metadata: {name: web-icmp-only}
spec:
  selector: {matchLabels: {app: web}}
  ingress: [{action: allow, protocol: icmp}]
"""


class Rig:
    """One host namespace with an agent on ``etcd`` (an EtcdServer or EtcdCluster), the CNI binary, containers."""

    def __init__(self, etcd, endpoints, workdir):
        self.etcd = etcd
        self.endpoints = endpoints
        self.workdir = workdir
        self.nss = NamespaceSet()
        self.containers = []  # (namespace, address)
        self.pingers = []
        self.procs = []
        self.agent = None
        self.ds = Datastore(EtcdConfig(endpoints=endpoints, timeout=2))

    def start(self):
        IPAM(self.ds).add_pool(POOL)
        self.ns = self.nss.add()
        self.etcd.bridge_into(self.ns)
        # The periodic full resync is pushed far away: whatever reaches the agent within a test came by the watch.
        self.agent = AgentProcess(
            self.ns,
            "fault-host",
            ",".join(self.endpoints),
            os.path.join(self.workdir, "run"),
            extra_args=["--resync-interval", "600"],
        )
        self.agent.start()
        self.cni = CniBinary(os.path.join(self.workdir, "cni"), self.agent.socket, network=NETWORK, pools=[POOL])
        return self

    def add(self, labels=None):
        """ADD a new container; returns (namespace, rc, output, seconds)."""
        ns = self.nss.add()
        config = dict(self.cni.config, args={"labels": labels}) if labels else None
        started = time.monotonic()
        rc, out, _ = self.cni.call("ADD", ns, f"/run/netns/{ns}", config=config, timeout=180)
        took = time.monotonic() - started
        if rc == 0:
            self.containers.append((ns, out["ips"][0]["address"].split("/")[0]))
        return ns, rc, out, took

    def container(self, labels=None):
        ns, rc, out, _ = self.add(labels)
        assert rc == 0, (out, self.agent.log())
        return ns, self.containers[-1][1]

    def ping(self, ns, address):
        wait_until(
            f"{ns} to reach {address}", lambda: nsexec(ns, f"ping -c1 -W0.3 {address}", check=False).returncode == 0, 10
        )
        p = Pinger(ns, address, PING_INTERVAL)
        self.pingers.append(p)
        return p

    def veths(self):
        out = nsexec(self.ns, "ip -o link show").stdout
        return sorted(m.group(1) for m in re.finditer(r"^\d+: (np[0-9a-f]+)@", out, re.M))

    def apply(self, text):
        path = os.path.join(self.workdir, "policy.yaml")
        with open(path, "w") as f:
            f.write(text)
        p = subprocess.run(
            [NETCTL, "--etcd-endpoints", ",".join(self.endpoints), "policy", "apply", "-f", path],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert p.returncode == 0, p.stderr
        # The policy's own revision: the store's may be ahead with writes the agent has no reason to sync for.
        name = re.search(r"metadata: \{name: ([\w-]+)\}", text).group(1)
        return self.ds.get(keys.policy(name)).mod_revision

    def synced(self, revision, after=None):
        """Has the agent run a sync whose view holds ``revision`` (only counting those logged after the last
        line containing ``after``)?"""
        text = self.log().rsplit(after, 1)[-1] if after else self.log()
        return any(int(r) >= revision for r in re.findall(r"event=sync revision=(\d+)", text))

    def log(self):
        with open(self.agent.log_path) as f:
            return f.read()

    def echo_server(self, ns, port):
        self.procs.append(start_echo_server(ns, [port], port, ns))

    def close(self):
        for p in self.pingers:
            p.stop()
        for p in self.procs:
            p.kill()
            p.wait()
        if self.agent:
            self.agent.stop()
        self.nss.close()
        self.etcd.close()


def expect_adds_fail_fast(rig, what):
    """An ADD while etcd cannot answer: CNI code 11 ("try again later") within ADD_FAIL_FAST seconds, and the
    container left as it was. Returns the seconds it took."""
    ns, rc, out, took = rig.add()
    assert rc == 1 and out.get("code") == 11, (what, out)
    assert took < ADD_FAIL_FAST, f"{what}: ADD answered after {took:.1f} s"
    assert nsexec(ns, "ip -o link show").stdout.count("\n") == 1, "a failed ADD left an interface behind"
    return took


def seconds_until_add_works(rig, timeout=60):
    """ADD again and again until one succeeds; the seconds that took."""
    started = time.monotonic()
    while True:
        _, rc, out, _ = rig.add()
        if rc == 0:
            return time.monotonic() - started
        assert out.get("code") == 11, out
        assert time.monotonic() - started < timeout, f"ADD still failing after {timeout} s: {out}"
        time.sleep(0.2)


def seconds_until_synced(rig, revision, timeout):
    started = time.monotonic()
    wait_until(f"the agent to sync revision {revision}", lambda: rig.synced(revision), timeout, step=0.1)
    return time.monotonic() - started


def report(fault, **figures):
    print(
        f"\nFAULT {fault}: "
        + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    )


@pytest.fixture
def make_rig(tmp_path):
    rigs = []

    def make(etcd, endpoints):
        rig = Rig(etcd, endpoints, str(tmp_path / f"rig{len(rigs)}"))
        rigs.append(rig)
        return rig.start()

    try:
        yield make
    finally:
        for rig in rigs:
            rig.close()


def single_etcd():
    return EtcdServer().start()


# --- etcd killed and restarted ------------------------------------------------------------------------------------


def test_etcd_killed_and_restarted(make_rig):
    etcd = single_etcd()
    rig = make_rig(etcd, [etcd.endpoint])
    a, _ = rig.container()
    _, ip_b = rig.container()
    pinger = rig.ping(a, ip_b)

    etcd.kill()
    time.sleep(1)
    add_s = expect_adds_fail_fast(rig, "etcd killed")
    time.sleep(2)  # the agent's loops keep failing for a while; nothing may be torn down meanwhile
    restarted = time.monotonic()
    etcd.start()
    recover_s = seconds_until_add_works(rig)
    # The watch resumed: a change made after the restart reaches the agent (its full resync is 10 min away).
    revision = rig.apply(WEB_ICMP_ONLY)
    watch_s = seconds_until_synced(rig, revision, IDLE_TIMEOUT + 10)
    sent, received = pinger.result()
    report(
        "etcd killed and restarted",
        pings_sent=sent,
        pings_lost=sent - received,
        add_failed_in_s=add_s,
        add_works_after_restart_s=recover_s,
        change_reached_agent_s=watch_s,
        total_recovery_s=time.monotonic() - restarted,
    )
    assert sent > 50 and received == sent


# --- a 3-member etcd losing one member, then its quorum -----------------------------------------------------------


def test_three_member_etcd_losing_one_member_then_quorum(make_rig):
    cluster = EtcdCluster(3).start()
    rig = make_rig(cluster, cluster.endpoints)
    web, ip_web = rig.container({"app": "web"})
    client, _ = rig.container({"role": "client"})
    rig.echo_server(web, 80)
    revision = rig.apply(WEB_ICMP_ONLY)
    wait_until("the policy to reach the agent", lambda: rig.synced(revision), 10)
    enforced = [("icmp", "web", 0, True), ("tcp", "web", 80, False)]
    assert_reachability(client, "client", enforced, {"web": ip_web}, 1.0)
    pinger = rig.ping(client, ip_web)
    # One member lost, the leader (the worst case: the others elect a new one first): invisible.
    first = cluster.leader()
    second = next(m for m in cluster.members if m is not first)
    first.kill()
    _, rc, out, one_down_add_s = rig.add()
    assert rc == 0, (out, rig.agent.log())
    # A request in flight while the others elect a new leader hangs on its member until the client's etcd
    # timeout (5 s), then goes to the next member: the one ADD that meets it is slower, none fails.
    assert one_down_add_s < 5.0 + 2, rig.agent.log()
    revision = rig.apply(WEB_ICMP_ONLY.replace("web-icmp-only", "second-policy"))
    wait_until("a change to reach the agent with a member down", lambda: rig.synced(revision), IDLE_TIMEOUT + 5)
    sent, received = pinger.result()
    report("3-member etcd, one member lost", pings_sent=sent, pings_lost=sent - received, add_s=one_down_add_s)
    assert received == sent

    # Quorum lost: everything running stays connected and enforced; new ADDs are told to try again, fast.
    pinger = rig.ping(client, ip_web)
    veths = rig.veths()
    second.kill()
    time.sleep(1)
    add_s = expect_adds_fail_fast(rig, "quorum lost")
    time.sleep(IDLE_TIMEOUT)  # the agent's watch, sync and heartbeat fail over and over meanwhile
    assert_reachability(client, "client", enforced, {"web": ip_web}, 1.0)
    assert rig.veths() == veths
    assert "no leader" in rig.log(), "the watch did not notice its member lost the quorum"
    add2_s = expect_adds_fail_fast(rig, "quorum lost for a while")

    # Quorum back: everything recovers by itself.
    returned = time.monotonic()
    second.start()
    recover_s = seconds_until_add_works(rig)
    revision = rig.apply(WEB_ICMP_ONLY.replace("web-icmp-only", "third-policy"))
    watch_s = seconds_until_synced(rig, revision, IDLE_TIMEOUT + 10)
    sent, received = pinger.result()
    report(
        "3-member etcd, quorum lost then back",
        pings_sent=sent,
        pings_lost=sent - received,
        add_failed_in_s=max(add_s, add2_s),
        add_works_after_quorum_s=recover_s,
        change_reached_agent_s=watch_s,
        total_recovery_s=time.monotonic() - returned,
    )
    assert sent > 100 and received == sent
    assert_reachability(client, "client", enforced, {"web": ip_web}, 1.0)
    first.start()


# --- a half-open watch connection ---------------------------------------------------------------------------------


def established_ports(ns, port):
    """Local ports of the host's established TCP connections to ``port`` (the agent's, to its etcd bridge)."""
    out = nsexec(ns, ["ss", "-Htn", "state", "established", f"( dport = :{port} )"]).stdout
    return sorted({int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()})


def test_half_open_watch_connection_is_replaced_within_the_idle_timeout(make_rig):
    """Every connection the agent holds to etcd stops passing packets, as when a NAT or firewall in between
    forgets them: no FIN, no RST, the agent's reads just wait. New connections work. A change made in etcd must
    reach the agent within the watch's idle timeout (its full resync is 10 min away)."""
    etcd = single_etcd()
    rig = make_rig(etcd, [etcd.endpoint])
    revision = rig.apply(WEB_ICMP_ONLY)  # fresh data on the stream: the worst case, a whole idle timeout to wait
    wait_until("the first change to reach the agent", lambda: rig.synced(revision), 10)
    ports = established_ports(rig.ns, etcd.port)
    assert ports, "the agent holds no connection to etcd"
    for p in ports:  # both directions, inside the host namespace only
        nsexec(rig.ns, f"iptables -I INPUT -p tcp --sport {p} -j DROP")
        nsexec(rig.ns, f"iptables -I INPUT -p tcp --dport {p} -j DROP")
    revision = rig.apply(WEB_ICMP_ONLY.replace("web-icmp-only", "after-the-drop"))
    detect_s = seconds_until_synced(rig, revision, IDLE_TIMEOUT + 15)
    report("half-open watch connection", connections_dropped=len(ports), change_reached_agent_s=detect_s)
    assert detect_s < IDLE_TIMEOUT + 5
    assert "no data for" in rig.log()


# --- etcd restored from an older snapshot -------------------------------------------------------------------------


def test_etcd_restored_from_an_older_snapshot(make_rig, tmp_path):
    """etcdctl snapshot save, more writes (a container, a policy), etcd stopped and restored from the snapshot:
    its revision is now below the one the agent's watch resumes from. The agent notices, resyncs everything, and
    neither crashes nor tears the running containers down."""
    etcd = single_etcd()
    rig = make_rig(etcd, [etcd.endpoint])
    a, _ = rig.container()
    b, ip_b = rig.container()
    pinger = rig.ping(a, ip_b)
    snapshot = str(tmp_path / "snapshot.db")
    etcd.snapshot(snapshot)
    c, _ = rig.container()  # exists only in the history the restore throws away
    last = rig.apply(WEB_ICMP_ONLY)
    wait_until("the last write to reach the agent", lambda: rig.synced(last), 10)
    veths = rig.veths()
    assert len(veths) == 3

    etcd.restore(snapshot)
    restored = time.monotonic()
    assert rig.ds.revision() < last
    wait_until(
        "the agent to notice the revision going backwards",
        lambda: "event=watch.revision_backwards" in rig.log(),
        IDLE_TIMEOUT + 10,
    )
    # The resync read the restored state: a write after the restore reaches the agent, though its revision
    # number was already used by the lost history.
    revision = rig.ds.put(
        keys.policy("after-restore"),
        {"metadata": {"name": "after-restore"}, "spec": {"selector": {"matchLabels": {"app": "none"}}}},
    )
    assert revision <= last
    wait_until(
        "a write after the restore to reach the agent",
        lambda: rig.synced(revision, after="event=watch.revision_backwards"),
        10,
    )
    assert rig.agent.proc.poll() is None, rig.agent.log()
    resync_s = time.monotonic() - restored
    sent, received = pinger.result()
    assert received == sent
    assert set(veths) <= set(rig.veths()), "the resync after the restore deleted a veth"
    assert nsexec(c, "ip -o -4 addr show dev eth0").stdout.strip(), "container c lost its address"

    # What the restore leaves for others to repair is collected, so every check above still runs and the test
    # turns into a pass by itself once they are repaired.
    gaps = []
    # The restore forgot c's address: IPAM hands it out again, and the dataplane refuses to route it to a second
    # container while c holds it (no duplicate address on the wire), so ADDs keep failing until c is deleted.
    _, rc, out, _ = rig.add()
    if rc != 0:
        assert "already routed" in out.get("msg", ""), out
        gaps.append(
            f"ADD after the restore refused: IPAM hands out again the address of container {c}, which "
            f"etcd no longer records ({out['msg']})"
        )
    # A full sync (the agent's start-up; the periodic one is 10 min away here) must not delete c's veth either:
    # c's endpoint record is gone with the lost history, and keeping its veth is the dataplane's "never delete
    # what you cannot account for" (issue 16, item 4).
    rig.agent.stop()
    rig.agent.start()
    wait_until("a full sync", lambda: "full=True" in rig.log().split("event=agent.stopped")[-1], 10)
    lost = sorted(set(veths) - set(rig.veths()))
    assert nsexec(a, f"ping -c1 -W1 {ip_b}", check=False).returncode == 0, "a and b are in the snapshot"
    assert not lost, (
        f"the full sync after the restore deleted {lost}, the veth of container {c} added after "
        "the snapshot: interfaces etcd does not record must be kept"
    )
    report(
        "etcd restored from an older snapshot",
        pings_sent=sent,
        pings_lost=sent - received,
        resynced_s=resync_s,
        gaps=len(gaps),
    )
    if gaps:
        pytest.xfail("; ".join(gaps))
