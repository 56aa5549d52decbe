"""The agent with ``--dataplane bpf``: a real agent in a test host namespace, its programs pinned on a bpffs
the test mounts, CNI containers wired by it. Traffic goes only between namespaces made here."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netplugin.dataplane import host_ifname
from netplugin.kernel.bpf import loader, records
from netplugin.service.endpoints import endpoint_id
from netplugin.lab.agents import AgentProcess, rmtree, tempdir
from netplugin.lab.console import console_script
from netplugin.lab.netns import NamespaceSet, nsexec
from netplugin.lab.bpflab import mounted_bpffs
from tests.functional.test_cni_e2e import NETWORK, POOL, Containers, address, agent_host, pings_within
from tests.probes import steady_ping
from tests.waiting import wait_until

pytestmark = pytest.mark.functional

HOST_ADDR = "10.254.71.1"
SPOOF = r"""
import sys
from scapy.all import IP, UDP, Ether, sendp, conf
conf.verb = 0
gw_mac, src, dst = sys.argv[1:4]
sendp(Ether(dst=gw_mac) / IP(src=src, dst=dst) / UDP(sport=4242, dport=9999) / b"spoof?", iface="eth0", count=5)
"""


@pytest.fixture(scope="module")
def bpf_host(etcd_server):
    workdir = tempdir()
    try:
        with (
            mounted_bpffs(Path(workdir) / "bpffs") as fs,
            agent_host(
                etcd_server,
                "bpf-host",
                [POOL],
                HOST_ADDR,
                os.path.join(workdir, "host"),
                ["--dataplane", "bpf", "--bpffs", str(fs / "np"), "--resync-interval", "1"],
            ) as host,
        ):
            host.pins = loader.Pins(fs / "np")
            yield host
    finally:
        rmtree(workdir)


@pytest.fixture
def containers(bpf_host):
    c = Containers(bpf_host)
    try:
        yield c
    finally:
        c.close()


def veth_of(ns):
    return host_ifname(endpoint_id(NETWORK, ns, "eth0"))


def counter(host, ifindex, name="spoofed"):
    with host.pins.map("np_counters") as m:
        raw = m.lookup(records.ifindex_key(ifindex))
    return records.counters(raw)[name] if raw else 0


def test_the_agent_says_it_runs_bpf_and_programs_every_endpoint(bpf_host, containers):
    assert "event=dataplane.selected dataplane=bpf" in bpf_host.agent.log_text()
    a, ra = containers.add()
    b, rb = containers.add()
    assert pings_within(a, address(rb), 5) and pings_within(b, address(ra), 5)
    assert pings_within(a, HOST_ADDR, 5)
    for ns, r in ((a, ra), (b, rb)):
        idx = bpf_host.ifindex(veth_of(ns))
        assert loader.attached(veth_of(ns), netns=f"/run/netns/{bpf_host.ns}") == ["from_container"]
        with bpf_host.pins.map("np_endpoints") as m:
            assert m.lookup(records.ifindex_key(idx)) is not None, ns


def test_a_forged_source_is_dropped_by_the_program(bpf_host, containers):
    a, _ = containers.add()
    b, rb = containers.add()
    idx = bpf_host.ifindex(veth_of(a))
    gw_mac = nsexec(bpf_host.ns, f"cat /sys/class/net/{veth_of(a)}/address").stdout.strip()
    before = counter(bpf_host, idx)
    nsexec(a, [sys.executable, "-c", SPOOF, gw_mac, "10.70.0.250", address(rb)], timeout=60)
    assert counter(bpf_host, idx) - before == 5


def test_a_detached_program_is_reattached_by_the_next_resync(bpf_host, containers):
    a, _ = containers.add()
    where = f"/run/netns/{bpf_host.ns}"
    loader.detach(veth_of(a), netns=where)
    assert loader.attached(veth_of(a), netns=where) == []
    wait_until(
        "the resync re-attaching from_container",
        lambda: loader.attached(veth_of(a), netns=where) == ["from_container"],
        timeout=10,
    )


def test_an_agent_restart_loses_no_ping(bpf_host, containers):
    a, _ = containers.add()
    b, rb = containers.add()
    assert pings_within(a, address(rb), 5)
    idx = bpf_host.ifindex(veth_of(a))
    seen = counter(bpf_host, idx, "to_stack")

    with steady_ping(a, address(rb), 500) as result:
        time.sleep(0.3)
        bpf_host.agent.stop()
        bpf_host.agent.start()
        time.sleep(0.3)
    assert result["received"] == result["transmitted"], result["output"]
    # the pinned program saw every echo while the agent was away and back: its counters were not reset
    assert counter(bpf_host, idx, "to_stack") - seen >= result["transmitted"]
    assert loader.attached(veth_of(a), netns=f"/run/netns/{bpf_host.ns}") == ["from_container"]


def test_bpf_without_objects_falls_back_in_one_line(etcd_server):
    nss = NamespaceSet()
    workdir = tempdir()
    agent = None
    try:
        ns = nss.add()
        etcd_server.bridge_into(ns)
        empty = os.path.join(workdir, "no-objects")
        os.makedirs(empty)
        agent = AgentProcess(
            ns,
            "bpf-fallback",
            etcd_server.endpoint,
            os.path.join(workdir, "run"),
            extra_args=["--dataplane", "bpf", "--bpffs", os.path.join(workdir, "pins"), "--bpf-objects", empty],
        )
        agent.start()
        lines = [line for line in agent.log_text().splitlines() if "event=dataplane.selected" in line]
        assert len(lines) == 1, lines
        assert "dataplane=iptables" in lines[0] and "bpf requested but no BPF object" in lines[0], lines[0]
        assert "falling back" in lines[0]
        out = subprocess.run(
            [console_script("netctl"), "node", "health", "--run-dir", os.path.join(workdir, "run")],
            capture_output=True,
            text=True,
        )
        assert "dataplane: iptables (bpf requested but no BPF object" in out.stdout, out.stdout + out.stderr
    finally:
        if agent:
            agent.stop()
        nss.close()
        rmtree(workdir)


def netctl_bpf(host, what):
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            host.ns,
            console_script("netctl"),
            "bpf",
            what,
            "--bpffs",
            str(host.pins.root),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_netctl_shows_the_endpoints_and_counters_in_the_maps(bpf_host, containers):
    a, ra = containers.add()
    b, rb = containers.add()
    idx = bpf_host.ifindex(veth_of(a))
    gw_mac = nsexec(bpf_host.ns, f"cat /sys/class/net/{veth_of(a)}/address").stdout.strip()
    nsexec(a, [sys.executable, "-c", SPOOF, gw_mac, "10.70.0.251", address(rb)], timeout=60)
    rows = {r["interface"]: r for r in netctl_bpf(bpf_host, "endpoints")}
    assert rows[veth_of(a)]["addresses"] == address(ra) and rows[veth_of(a)]["ifindex"] == idx
    assert rows[veth_of(a)]["ingress_rules"] == "-"  # policy is still the filter table's (see bpf_backend.py)
    assert veth_of(b) in rows
    counters = {r["interface"]: r for r in netctl_bpf(bpf_host, "counters")}
    assert counters[veth_of(a)]["spoofed"] >= 5
