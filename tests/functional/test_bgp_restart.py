"""BGP graceful restart in a lab cluster (netplugin/lab): a BIRD or agent restart withdraws nothing, while a dead
host's routes still leave the others quickly.

A restart is watched the way an operator would: ``ip monitor route`` in the peers' (and the restarting host's)
namespaces records every route deleted, and a container pings one behind the restarting host every 20 ms.
"""

import os
import signal
import subprocess
import time
import uuid

import pytest

from netplugin.agent.routing import RECHECK_INTERVAL
from netplugin.lab import Lab, LabSpec, system
from netplugin.lab.netns import nsexec
from netplugin.routing.bird import BirdError, BirdProcess, birdc
from tests.probes import Pinger
from tests.waiting import wait_until

pytestmark = pytest.mark.functional

LEASE_TTL = 8  # the lab's agents run with --liveness-ttl 8
PING_INTERVAL = 0.02
REESTABLISH_TIMEOUT = 20  # BIRD waits up to 5 s (connect delay) before reconnecting


def _lab(**spec):
    lab = Lab.up(LabSpec(name=f"gr{uuid.uuid4().hex[:6]}", **spec))
    try:
        for h in lab.plan.hosts:
            lab.run_container(h.name, f"{h.name}c0")
        matrix = lab.wait_reachable(timeout=30)
        assert all(matrix.values()), matrix
    except BaseException:
        lab.down()
        raise
    return lab


@pytest.fixture(scope="module")
def mesh():
    lab = _lab(hosts=3)
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def reflected():
    lab = _lab(hosts=3, route_reflectors=1)
    try:
        yield lab
    finally:
        lab.down()


class RouteMonitor:
    """``ip monitor route`` in some hosts' namespaces while the block runs; ``deleted(host)`` lists the routes
    removed from that host's table."""

    def __init__(self, lab, hosts, directory):
        self.lab, self.hosts, self.dir = lab, hosts, directory
        self.procs = {}

    def __enter__(self):
        for h in self.hosts:
            out = open(os.path.join(self.dir, f"monitor-{h}.txt"), "w")
            try:
                self.procs[h] = subprocess.Popen(
                    ["ip", "-n", system.check_ns(self.lab.plan.host(h).namespace), "monitor", "route"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            finally:
                out.close()
        time.sleep(0.2)  # subscribed before anything happens
        return self

    def __exit__(self, *exc):
        for p in self.procs.values():
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def deleted(self, host):
        with open(os.path.join(self.dir, f"monitor-{host}.txt")) as f:
            return [line.strip() for line in f if line.startswith("Deleted")]


def bird_pid(lab, host):
    try:
        with open(os.path.join(lab.plan.host(host).run_dir, "bird", "bird.pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if os.path.exists(f"/proc/{pid}") else None


def session_state(lab, host, peer):
    return {r.peer_address: r.state for r in lab.bgp_sessions(host)}.get(lab.plan.host(peer).address)


def routes_via(lab, host, via):
    return sorted(r["dst"] for r in lab.routes(host) if r.get("gateway") == lab.plan.host(via).address)


def assert_restart_withdraws_nothing(lab, tmp_path, restart, seconds=6):
    """Run ``restart()`` on h3 while h1c0 pings h3c0; no route may leave h1, h2 or h3, hardly a ping may be lost,
    and h3's sessions must come back."""
    with RouteMonitor(lab, ("h1", "h2", "h3"), str(tmp_path)) as mon:
        pinger = Pinger(
            system.check_ns(lab.container("h1c0")["netns"]),
            lab.container("h3c0")["ip"],
            PING_INTERVAL,
            int(seconds / PING_INTERVAL),
        )
        try:
            time.sleep(0.5)
            restart()
            for peer in ("h1", "h2"):
                wait_until(
                    f"{peer}'s session with h3 Established again",
                    lambda: session_state(lab, peer, "h3") == "Established",
                    REESTABLISH_TIMEOUT,
                )
            sent, received = pinger.result()
        finally:
            pinger.stop()
        time.sleep(0.5)  # let the peers flush anything stale after h3's End-of-RIB
    for h in ("h1", "h2", "h3"):
        assert mon.deleted(h) == [], f"{h} lost routes during the restart"
    assert sent - received <= max(2, sent // 100), f"{sent - received} of {sent} pings lost"
    assert routes_via(lab, "h1", "h3") and routes_via(lab, "h3", "h1")


# --- what decides graceful restart recovery -------------------------------------------------------------------------


def test_recovery_only_when_the_kernel_holds_routes_bird_wrote(namespaces, tmp_path):
    ns = namespaces.add()
    bird = BirdProcess(str(tmp_path), netns=ns)
    assert bird.left_routes() is False
    nsexec(ns, "ip link add d0 type veth peer name d1")
    nsexec(ns, "ip link set d0 up")
    nsexec(ns, "ip route add 10.9.0.0/24 dev d0 proto 80")  # the dataplane's: not BIRD's
    assert bird.left_routes() is False
    nsexec(ns, "ip -6 route add fd09::/64 dev d0 proto bird")
    assert bird.left_routes() is True
    with pytest.raises(BirdError, match="npt-doesnotexist does not exist"):
        BirdProcess(str(tmp_path), netns="npt-doesnotexist").left_routes()


# --- restarts withdraw nothing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sigkill", "birdc-graceful-restart"])
def test_bird_restart_withdraws_no_route(mesh, tmp_path, how):
    before = bird_pid(mesh, "h3")
    assert before
    log_before = agent_log(mesh, "h3")
    if how == "sigkill":  # the first restart: so far only the agent's first start of a fresh BIRD
        assert "BIRD started" in log_before and "graceful restart recovery" not in log_before

    def restart():
        if how == "sigkill":
            os.kill(before, signal.SIGKILL)
        else:
            assert "Graceful restart requested" in birdc(mesh.plan.host("h3").bird_socket, "graceful", "restart")
        started = time.monotonic()
        after = wait_until(
            "BIRD on h3 restarted by its agent", lambda: bird_pid(mesh, "h3") not in (None, before), timeout=5
        )
        # The agent's watcher looks every 0.5 s; starting BIRD takes a few ms.
        assert time.monotonic() - started < 2.0
        assert after != before

    assert_restart_withdraws_nothing(mesh, tmp_path, restart)
    # bird -R: it kept the kernel routes it found until its sessions were back.
    assert "in graceful restart recovery" in agent_log(mesh, "h3")[len(log_before) :]


def test_agent_restart_withdraws_no_route(mesh, tmp_path):
    h = mesh.plan.host("h3")
    bird = bird_pid(mesh, "h3")
    (agent,) = [p for p in mesh.state.processes("agent h3") if system.alive(p["pid"], p["start"])]
    log = os.path.join(h.run_dir, "agent.log")

    def restart():
        with open(log) as f:
            starts = f.read().count("event=agent.started")
        system.stop_processes([(agent["pid"], agent["start"])])  # SIGTERM: a clean stop leaves BIRD running
        proc = system.spawn(mesh.agent_command(h), log)
        mesh.state.add_process("agent h3", proc.pid, system.start_time(proc.pid))
        wait_until(
            "the new agent started",
            lambda: open(log).read().count("event=agent.started") > starts,
            timeout=30,
            step=0.1,
        )

    assert_restart_withdraws_nothing(mesh, tmp_path, restart, seconds=5)
    assert bird_pid(mesh, "h3") == bird


# --- a dead host's routes still leave ---------------------------------------------------------------------------------


def assert_dead_host_routes_leave(lab, dead, watchers):
    """Kill ``dead`` with its links up (its peers see the TCP sessions close, which graceful restart would
    otherwise bridge for the whole restart time): its block must leave ``watchers`` once its lease expires."""

    def routes_to_dead():
        return {h: routes_via(lab, h, dead) for h in watchers}

    before = routes_to_dead()
    assert all(before.values()), before
    started = time.monotonic()
    lab.kill_host(dead, silent=False)
    time.sleep(1.0)
    assert routes_to_dead() == before, "routes left at once: graceful restart is not on"
    wait_until(
        f"{dead}'s routes gone from {watchers}",
        lambda: not any(routes_to_dead().values()),
        timeout=LEASE_TTL + 3,
        step=0.2,
    )
    took = time.monotonic() - started
    survivors = [n for n, c in lab.containers().items() if c["host"] != dead]
    assert all(lab.ping_matrix(survivors).values())
    return took


def test_dead_host_with_closed_sessions_leaves_the_mesh_when_its_lease_expires(mesh):
    assert_dead_host_routes_leave(mesh, "h3", ["h1", "h2"])
    for h in ("h1", "h2"):
        # Left out of the config: no session left to try, the other one untouched.
        rows = {r.peer_address: r.state for r in mesh.bgp_sessions(h)}
        assert rows == {mesh.plan.host("h2" if h == "h1" else "h1").address: "Established"}


def cut_off_etcd(lab, host):
    """Kill the host's etcd bridges (socat listeners and their forked children): the agent keeps running, its
    BGP sessions stay up, and its liveness lease expires."""
    ns = lab.plan.host(host).namespace
    pids = []
    for pid in system.netns_pids(ns):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if os.path.basename(f.read().split(b"\0")[0]) == b"socat":
                    pids.append(pid)
        except OSError:
            pass
    assert pids, f"no etcd bridge in {ns}"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)


def agent_log(lab, host):
    with open(os.path.join(lab.plan.host(host).run_dir, "agent.log")) as f:
        return f.read()


def test_route_reflector_drops_dead_clients_but_keeps_one_cut_off_from_etcd(reflected):
    """h1 reflects; h2 loses etcd but keeps BGP (kept, re-checked); h3 dies with its links up (dropped when its
    lease expires). Then h2 dies too: the reflector's re-check drops it long before the restart time."""
    lab = reflected
    assert lab.plan.host("h1").route_reflector
    cut_off_etcd(lab, "h2")
    # h2 learns h3's block only through the reflector: it leaves h2 when the reflector drops h3.
    assert_dead_host_routes_leave(lab, "h3", ["h1", "h2"])
    wait_until(
        "the reflector keeping lease-less h2 for its Established session",
        lambda: "event=bgp.lease_less kept=h2 dropped=h3" in agent_log(lab, "h1"),
        timeout=LEASE_TTL + 3,
        step=0.2,
    )
    time.sleep(RECHECK_INTERVAL + 0.5)  # re-checked at least once since, and still kept
    assert [(r.peer_address, r.state) for r in lab.bgp_sessions("h1")] == [(lab.plan.host("h2").address, "Established")]
    assert routes_via(lab, "h1", "h2") and routes_via(lab, "h2", "h1")
    assert lab.ping_matrix(["h1c0", "h2c0"]) == {("h1c0", "h2c0"): True, ("h2c0", "h1c0"): True}

    # Now h2's agent and BIRD die, the namespace stays: its session closes, graceful restart would keep its routes
    # for restart_time (30 s), but it has no lease, so the reflector's next re-check (every 2 s) drops it.
    (agent,) = [p for p in lab.state.processes("agent h2") if system.alive(p["pid"], p["start"])]
    bird = bird_pid(lab, "h2")
    started = time.monotonic()
    os.kill(agent["pid"], signal.SIGKILL)
    os.kill(bird, signal.SIGKILL)
    wait_until("h2's routes gone from the reflector", lambda: not routes_via(lab, "h1", "h2"), timeout=5, step=0.1)
    assert time.monotonic() - started < 5
    assert lab.bgp_sessions("h1") == []
