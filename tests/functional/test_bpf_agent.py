"""The agent with ``--dataplane bpf``: a real agent in a test host namespace, its programs pinned on a bpffs
the test mounts, CNI containers wired by it. Traffic goes only between namespaces made here."""

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netplugin.datastore import keys
from netplugin.dataplane import host_ifname
from netplugin.kernel.bpf import build, loader, maps, records
from netplugin.service.endpoints import endpoint_id
from netplugin.lab.agents import AgentProcess, rmtree, tempdir
from netplugin.lab.console import console_script
from netplugin.lab.netns import NamespaceSet, nsexec
from netplugin.lab.bpflab import mounted_bpffs
from policy.model import Policy
from policy.store import apply_policies
from tests.functional.test_cni_e2e import NETWORK, POOL, Containers, Host, address, agent_host, pings_within
from tests.functional.test_bpf_build import BROKEN
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
    assert "clsact and cls_bpf" in bpf_host.agent.log_text()
    assert not [n for n in bpf_host.links() if n.startswith("bpfprobe")]  # the probe's veth is gone
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


def _live_lists(host, ifindex):
    """(ingress, egress) rule counts of the live lists of the endpoint behind ``ifindex``; None: no list."""
    with host.pins.map("np_endpoints") as eps, host.pins.map("np_pol_rules") as rules:
        value = eps.lookup(records.ifindex_key(ifindex))
        ep_id, slot = records.ENDPOINT.unpack(value)[0], records.endpoint_slot(value)
        got = [rules.lookup(records.rules_key(ep_id, d, slot)) for d in (records.DIR_INGRESS, records.DIR_EGRESS)]
    return tuple(records.rules_count(v) if v else None for v in got)


def test_add_returns_with_the_endpoints_policy_lists_in_the_maps(bpf_host, containers):
    """First-packet guarantee: when ADD returns, the new endpoint's lists are live, so its first packet meets
    BPF policy (and is redirected), not an empty list."""
    a, ra = containers.add()
    assert _live_lists(bpf_host, bpf_host.ifindex(veth_of(a))) == (2, 0)
    b, rb = containers.add()
    idx = bpf_host.ifindex(veth_of(b))
    assert _live_lists(bpf_host, idx) == (2, 0)
    before = counter(bpf_host, idx, "allowed")
    assert pings_within(b, address(ra), 5)
    assert counter(bpf_host, idx, "allowed") > before and counter(bpf_host, idx, "to_stack") == 0


def _slot_and_gen(host, ifindex):
    with host.pins.map("np_endpoints") as eps, host.pins.map("np_config") as cfg:
        slot = records.endpoint_slot(eps.lookup(records.ifindex_key(ifindex)))
        return slot, records.config_gen(cfg.lookup(records.IFINDEX.pack(0)))


def _lists_of(host, map_id):
    """The (slot, direction) of every np_pol_rules entry of one map id."""
    with host.pins.map("np_pol_rules") as m:
        owners = [records.split_ep_dir(records.IFINDEX.unpack(k)[0]) for k in m.keys()]
    return sorted((slot, d) for ep_id, slot, d in owners if ep_id == map_id)


def test_a_policy_change_switches_slots_and_a_list_too_long_stays_with_iptables(bpf_host, containers):
    a, ra = containers.add(config=dict(bpf_host.cni.config, args={"labels": {"app": "srv"}}))
    b, rb = containers.add()
    ia, ib = bpf_host.ifindex(veth_of(a)), bpf_host.ifindex(veth_of(b))
    slot, gen = _slot_and_gen(bpf_host, ia)

    def put(rules):
        doc = {
            "apiVersion": "netplugin/v1",
            "kind": "Policy",
            "metadata": {"name": "srv-in"},
            "spec": {"selector": {"matchLabels": {"app": "srv"}}, "ingress": rules},
        }
        apply_policies(bpf_host.ds, [Policy.from_dict(doc)])

    try:
        put([{"action": "allow", "protocol": "tcp", "ports": [80]}])
        wait_until("the new list live", lambda: _live_lists(bpf_host, ia) == (1, 0), timeout=10)
        new_slot, new_gen = _slot_and_gen(bpf_host, ia)
        assert new_slot == 1 - slot and new_gen > gen  # written beside the old list, switched, flows re-checked
        assert _lists_of(bpf_host, ia) == [(new_slot, 0), (new_slot, 1)]  # the old slot's list is gone
        denied = counter(bpf_host, ib, "denied")
        assert not pings_within(b, address(ra), 1)
        assert counter(bpf_host, ib, "denied") > denied  # the program refused it, not iptables

        # 65 rules do not fit the program's list: the endpoint's policy stays with iptables, said in one line
        put([{"action": "allow", "protocol": "tcp", "ports": [p]} for p in range(1, 65)] + [{"action": "allow"}])
        wait_until("the list left to iptables", lambda: _live_lists(bpf_host, ia) == (None, None), timeout=10)
        lines = [x for x in bpf_host.agent.log_text().splitlines() if "event=bpf.policy_on_iptables" in x]
        assert len(lines) == 1 and "more than 64 rules" in lines[0], lines
        to_stack = counter(bpf_host, ib, "to_stack")
        assert pings_within(b, address(ra), 5)  # the 65th rule, in the iptables chain
        assert counter(bpf_host, ib, "to_stack") > to_stack
    finally:
        bpf_host.ds.delete(keys.policy("srv-in"))
    wait_until("the default back in BPF", lambda: _live_lists(bpf_host, ia) == (2, 0), timeout=10)


def test_fast_dsts_hold_the_pools_and_send_this_hosts_blocks_to_the_stack(bpf_host, containers):
    a, ra = containers.add()
    with bpf_host.pins.map("np_fast_dsts") as m:
        held = {k: v for k, v in m.items()}
    assert held[records.net_key(POOL)] == b"\x01", held
    local = [k for k, v in held.items() if v == b"\x00"]
    assert local, held  # the block the container's address came from
    assert any(ipaddress.ip_address(address(ra)) in _net_of(k) for k in local), held


def _net_of(key):
    plen, addr = records.NET_KEY.unpack(key)
    a = ipaddress.IPv6Address(addr)
    return (
        ipaddress.ip_network(f"{a.ipv4_mapped}/{plen - 96}") if a.ipv4_mapped else ipaddress.ip_network(f"{a}/{plen}")
    )


def test_a_detached_program_is_reattached_by_the_next_resync(bpf_host, containers):
    a, _ = containers.add()
    where = f"/run/netns/{bpf_host.ns}"
    with open(bpf_host.agent.log_path) as f:
        mark = len(f.read())
    loader.detach(veth_of(a), netns=where)
    # Resyncs run every second here, so one may put it back before we look: the agent's log says it did.
    wait_until(
        "the resync re-attaching from_container",
        lambda: (
            loader.attached(veth_of(a), netns=where) == ["from_container"]
            and f"event=bpf.reattached host_ifs={veth_of(a)}" in open(bpf_host.agent.log_path).read()[mark:]
        ),
        timeout=10,
    )


def test_an_agent_restart_loses_no_ping(bpf_host, containers):
    a, _ = containers.add()
    b, rb = containers.add()
    assert pings_within(a, address(rb), 5)
    idx = bpf_host.ifindex(veth_of(a))
    seen = counter(bpf_host, idx, "allowed")

    with steady_ping(a, address(rb), 500) as result:
        time.sleep(0.3)
        bpf_host.agent.stop()
        bpf_host.agent.start()
        time.sleep(0.3)
    assert result["received"] == result["transmitted"], result["output"]
    # the pinned program allowed and redirected every echo while the agent was away and back (its policy lists
    # outlived the agent, and the restarted one found them right: nothing rewritten), counters not reset
    assert counter(bpf_host, idx, "allowed") - seen >= result["transmitted"]
    assert loader.attached(veth_of(a), netns=f"/run/netns/{bpf_host.ns}") == ["from_container"]


@contextlib.contextmanager
def running_agent(etcd_server, ns, name, workdir, extra_args):
    """An agent (``extra_args`` on its command line) in namespace ``ns``, reaching etcd; stopped on exit."""
    etcd_server.bridge_into(ns)
    agent = AgentProcess(ns, name, etcd_server.endpoint, os.path.join(workdir, "run"), extra_args=extra_args)
    try:
        agent.start()
        yield agent
    finally:
        agent.stop()


@pytest.mark.parametrize("kind", ["no object", "not bpffs", "verifier refuses"])
def test_bpf_falls_back_in_one_line_saying_why(etcd_server, bpf_objects, kind):
    nss = NamespaceSet()
    workdir = Path(tempdir())
    try:
        with contextlib.ExitStack() as stack:
            objects, pins = workdir / "objects", workdir / "pins"
            objects.mkdir()
            if kind == "not bpffs":
                shutil.copy(bpf_objects[""], objects / "netplugin.o")
                says = f"{pins} is not on a bpf filesystem"
            else:
                pins = stack.enter_context(mounted_bpffs(workdir / "bpffs")) / "pins"
                says = "no BPF object"
            if kind == "verifier refuses":
                (workdir / "broken.c").write_text(BROKEN)
                shutil.copy(build.compile_one(workdir / "broken.c", workdir / "build"), objects / "netplugin.o")
                says = "LoadError: loading"
            args = ["--dataplane", "bpf", "--bpffs", str(pins), "--bpf-objects", str(objects)]
            agent = stack.enter_context(running_agent(etcd_server, nss.add(), "bpf-fallback", workdir, args))
            lines = [line for line in agent.log_text().splitlines() if "event=dataplane.selected" in line]
            assert len(lines) == 1, lines
            assert "WARNING" in lines[0] and "dataplane=iptables" in lines[0], lines[0]
            assert f"bpf requested but {says}" in lines[0] and "falling back" in lines[0], lines[0]
            if kind == "verifier refuses":  # the verifier's verdict is in the line, and nothing stays pinned
                assert "the verifier refused it: R1 offset is outside of the packet" in lines[0], lines[0]
                assert not [p for p in pins.iterdir() if p.name.startswith(loader.GEN_PREFIX)]
            out = subprocess.run(
                [console_script("netctl"), "node", "health", "--run-dir", str(workdir / "run")],
                capture_output=True,
                text=True,
            )
            assert f"dataplane: iptables (bpf requested but {says}" in out.stdout, out.stdout + out.stderr
    finally:
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
    # the same-network default in BPF: allow its network, deny other endpoints (ingress); egress allows all
    assert (rows[veth_of(a)]["ingress_rules"], rows[veth_of(a)]["egress_rules"]) == (2, 0), rows[veth_of(a)]
    assert rows[veth_of(a)]["slot"] in (0, 1) and rows[veth_of(a)]["policy_gen"] >= 1
    assert veth_of(b) in rows
    counters = {r["interface"]: r for r in netctl_bpf(bpf_host, "counters")}
    assert counters[veth_of(a)]["spoofed"] >= 5


# --- upgrades: a second host, a fabric between the two, pings across it ------------------------------------------

FABRIC_A, FABRIC_B = "10.254.73.1", "10.254.73.2"


@pytest.fixture
def second_host(bpf_host, etcd_server):
    """Host B beside the module's bpf_host (A): its own agent with --dataplane bpf and bpffs, a veth ``fab0``
    between the two, and each routing the pool via the other (its own blocks are more specific)."""
    nss = NamespaceSet()
    workdir = tempdir()
    try:
        ns = nss.add()
        nss.link(bpf_host.ns, ns, f"{FABRIC_A}/24", f"{FABRIC_B}/24", name_a="fab0", name_b="fab0")
        nsexec(bpf_host.ns, f"ip route add {POOL} via {FABRIC_B}")
        nsexec(ns, f"ip route add {POOL} via {FABRIC_A}")
        with mounted_bpffs(Path(workdir) / "bpffs") as fs:
            args = ["--dataplane", "bpf", "--bpffs", str(fs / "np"), "--resync-interval", "1"]
            with running_agent(etcd_server, ns, "bpf-host-b", workdir, args) as agent:
                host = Host(ns, agent, bpf_host.ds, workdir)
                host.pins = loader.Pins(fs / "np")
                yield host
    finally:
        nsexec(bpf_host.ns, f"ip route del {POOL} via {FABRIC_B}", check=False)
        nss.close()  # takes fab0 on A along with B's end
        rmtree(workdir)


def ours_everywhere(host):
    """(the generations under the host's bpffs, ifindex -> {program: id} of the filters, the pinned ids)."""
    root = host.pins.root
    gens = sorted(p.name for p in root.iterdir() if p.name.startswith(loader.GEN_PREFIX))
    return gens, loader.programs(f"/run/netns/{host.ns}"), host.pins.prog_ids()


def assert_runs_only(host, generation, veths):
    gens, running, ids = ours_everywhere(host)
    assert gens == [generation] and loader.current(host.pins.root) == generation
    fabric = host.ifindex("fab0")
    assert running[fabric] == {"to_container": ids["to_container"]}, running
    for veth in veths:
        assert running[host.ifindex(veth)] == {"from_container": ids["from_container"]}, (veth, running)


def restart(host, args):
    host.agent.stop()
    host.agent.extra_args = args
    host.agent.start()


def test_restart_and_upgrade_lose_no_ping_across_two_hosts(bpf_host, second_host, bpf_objects, tmp_path):
    cont_a, cont_b = Containers(bpf_host), Containers(second_host)
    try:
        a, ra = cont_a.add()
        b, rb = cont_b.add()
        assert pings_within(a, address(rb), 10) and pings_within(b, address(ra), 10)
        wait_until(
            "to_container on both fabric ends",
            lambda: all(h.ifindex("fab0") in loader.programs(f"/run/netns/{h.ns}") for h in (bpf_host, second_host)),
            timeout=10,
        )
        hosts = ((bpf_host, veth_of(a)), (second_host, veth_of(b)))
        before = {h.ns: ours_everywhere(h) for h, _ in hosts}
        old_gen = loader.current(bpf_host.pins.root)
        with bpf_host.pins.map("np_endpoints") as m:
            endpoints_map = m.id

        # 1. a restart with the same object changes nothing in the kernel
        with steady_ping(a, address(rb), 2000) as result:
            for h, _ in hosts:
                restart(h, h.agent.extra_args)
            time.sleep(0.3)
        assert result["received"] == result["transmitted"], result["output"]
        assert {h.ns: ours_everywhere(h) for h, _ in hosts} == before

        # 2. an upgrade to a rebuilt object, host after host, under the same pings
        new_dir = tmp_path / "new-objects"
        new_dir.mkdir()
        shutil.copy(bpf_objects["noFlows"], new_dir / "netplugin.o")
        new_gen = loader.GEN_PREFIX + loader.digest(new_dir / "netplugin.o")
        assert new_gen != old_gen
        plain = {h.ns: list(h.agent.extra_args) for h, _ in hosts}
        with steady_ping(a, address(rb), 2000) as result:
            for h, _ in hosts:
                restart(h, plain[h.ns] + ["--bpf-objects", str(new_dir)])
                wait_until("the upgrade committed", lambda h=h: loader.current(h.pins.root) == new_gen, timeout=10)
            time.sleep(0.3)
        assert result["received"] == result["transmitted"], result["output"]
        for h, veth in hosts:
            assert_runs_only(h, new_gen, [veth])
            assert "event=bpf.upgraded generation=" + new_gen in h.agent.log_text()
            assert before[h.ns][2] != h.pins.prog_ids()
        with bpf_host.pins.map("np_endpoints") as m:
            assert m.id == endpoints_map  # the map itself was kept, entries and all
        assert pings_within(a, address(rb), 5)

        # 3. and back to the set-up's object (a downgrade is an upgrade too)
        with steady_ping(a, address(rb), 2000) as result:
            for h, _ in hosts:
                restart(h, plain[h.ns])
                wait_until("the downgrade committed", lambda h=h: loader.current(h.pins.root) == old_gen, timeout=10)
            time.sleep(0.3)
        assert result["received"] == result["transmitted"], result["output"]
        for h, veth in hosts:
            assert_runs_only(h, old_gen, [veth])
    finally:
        cont_b.close()
        cont_a.close()


def test_an_upgrade_refills_maps_whose_layout_changed_before_it_swaps(bpf_host, containers, bpf_objects, tmp_path):
    """np_endpoints and np_locals pinned with another layout (as a build that changed them would leave them):
    the upgrade gives the new programs fresh maps, the first reconcile fills them, then the filters swap."""
    a, _ = containers.add()
    b, rb = containers.add()
    assert pings_within(a, address(rb), 5)
    old_gen = loader.current(bpf_host.pins.root)
    old = loader.Pins(bpf_host.pins.root, old_gen)
    plain = list(bpf_host.agent.extra_args)
    new_dir = tmp_path / "new-objects"
    new_dir.mkdir()
    shutil.copy(bpf_objects["noFlows"], new_dir / "netplugin.o")
    with steady_ping(a, address(rb), 1500) as result:
        bpf_host.agent.stop()
        for name in ("np_endpoints", "np_locals"):  # the programs keep the real maps; only the pins change
            (old.maps / name).unlink()
            with maps.Map.create(maps.MAP_HASH, 4, 8, 16, name=name) as m:
                m.pin(old.maps / name)
        bpf_host.agent.extra_args = plain + ["--bpf-objects", str(new_dir)]
        bpf_host.agent.start()
        wait_until("the upgrade committed", lambda: loader.current(bpf_host.pins.root) != old_gen, timeout=10)
        time.sleep(0.3)
    try:
        assert result["received"] == result["transmitted"], result["output"]
        line = [x for x in bpf_host.agent.log_text().splitlines() if "event=bpf.upgraded" in x][-1]  # this one
        assert "maps_refilled=np_endpoints,np_locals" in line, line
        idx = bpf_host.ifindex(veth_of(a))
        with bpf_host.pins.map("np_endpoints") as m:
            assert m.value_size == records.ENDPOINT.size and m.lookup(records.ifindex_key(idx)) is not None
        gw_mac = nsexec(bpf_host.ns, f"cat /sys/class/net/{veth_of(a)}/address").stdout.strip()
        before = counter(bpf_host, idx)
        nsexec(a, [sys.executable, "-c", SPOOF, gw_mac, "10.70.0.252", address(rb)], timeout=60)
        assert counter(bpf_host, idx) - before == 5  # the new program drops it, with the refilled entry
    finally:
        restart(bpf_host, plain)  # back to the set-up's object for the module's other tests
        wait_until("back on the set-up's object", lambda: loader.current(bpf_host.pins.root) == old_gen, timeout=10)
