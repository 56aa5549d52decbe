"""Host dataplane against the real kernel: a throwaway "host" namespace and container namespaces.

Every Dataplane here is given ``host_netns`` (or runs in a child process inside the test host namespace), so
nothing touches the root namespace; the ``lab`` fixture also checks afterwards that no veth of ours appeared
there. Traffic goes only between the test's own namespaces.
"""

import dataclasses
import json
import os
import sys
import threading
import uuid

import pytest

from netplugin.dataplane import ROUTE_PROTO, Dataplane, EndpointSpec, changed, host_ifname
from netplugin.dataplane import container as container_side
from netplugin.dataplane.model import is_host_ifname
from netplugin.errors import AlreadyExists, InvalidInput, NotFound
from netplugin.lab.netns import nsexec, run
from tests.hostview import host_veths

pytestmark = pytest.mark.functional

HOST_V4, HOST_V6 = "10.99.0.1", "fd99::1"

# ICMP echo from an optional source address (like ping -I), with a raw socket: the probe needs no ping binary.
PROBE = r"""
import os, select, socket, struct, sys, time
dst, src = sys.argv[1], sys.argv[2] or None
v6 = ":" in dst
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                  socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
if src:
    s.bind((src, 0))
req, rep = (128, 129) if v6 else (8, 0)
ident, payload = os.getpid() & 0xFFFF, b"netplugin"
def csum(b):
    b += b"\0" * (len(b) % 2)
    t = sum(struct.unpack(f"!{len(b) // 2}H", b)); t = (t >> 16) + (t & 0xFFFF); t += t >> 16
    return ~t & 0xFFFF
for seq in (1, 2):
    head = struct.pack("!BBHHH", req, 0, 0, ident, seq)
    if not v6:  # the kernel fills in the ICMPv6 checksum itself
        head = struct.pack("!BBHHH", req, 0, csum(head + payload), ident, seq)
    s.sendto(head + payload, (dst, 0))
    deadline = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < deadline:
        if not select.select([s], [], [], max(0, deadline - time.monotonic()))[0]:
            break
        data = s.recv(2048)
        data = data if v6 else data[(data[0] & 0x0F) * 4:]
        if len(data) >= 8:
            kind, _, _, got_ident, got_seq = struct.unpack("!BBHHH", data[:8])
            if (kind, got_ident, got_seq) == (rep, ident, seq):
                sys.exit(0)
sys.exit(1)
"""


def reaches(ns, dst, src=None, timeout=1.0):
    """True when an ICMP echo from ``ns`` (optionally from ``src``) to ``dst`` is answered."""
    p = nsexec(ns, [sys.executable, "-c", PROBE, dst, src or "", str(timeout)], check=False)
    return p.returncode == 0


def counter(ns, name):
    """An SNMP counter of a namespace, e.g. Icmp InEchos or Icmp6InEchos."""
    if name.startswith("Icmp6"):
        for line in nsexec(ns, "cat /proc/net/snmp6").stdout.splitlines():
            key, value = line.split()
            if key == name:
                return int(value)
        raise KeyError(name)
    proto, field = name.split(".")
    lines = [
        line.split() for line in nsexec(ns, "cat /proc/net/snmp").stdout.splitlines() if line.startswith(proto + ":")
    ]
    return int(lines[1][lines[0].index(field)])


def links(ns):
    return set(nsexec(ns, "ls /sys/class/net").stdout.split())


def routes(ns, v6=False):
    return nsexec(ns, ["ip"] + (["-6"] if v6 else []) + ["route", "show"]).stdout


class Lab:
    """A host namespace with a Dataplane driving it, and container namespaces on demand."""

    def __init__(self, namespaces):
        self.nss = namespaces
        self.host = namespaces.add()
        self.host_path = f"/run/netns/{self.host}"
        nsexec(self.host, f"ip addr add {HOST_V4}/32 dev lo")
        nsexec(self.host, f"ip -6 addr add {HOST_V6}/128 dev lo")
        self.dp = Dataplane(host_netns=self.host_path)
        self.dp.setup_host()
        self.ids = []

    def spec(self, *addresses, ns=None, **kw):
        ns = ns or self.nss.add()
        endpoint_id = f"test-{uuid.uuid4().hex[:12]}.eth0"
        self.ids.append(endpoint_id)
        return EndpointSpec(endpoint_id, f"/run/netns/{ns}", addresses=addresses, **kw), ns

    def add(self, *addresses, **kw):
        spec, ns = self.spec(*addresses, **kw)
        return spec, ns, self.dp.add_endpoint(spec)


@pytest.fixture
def lab(namespaces):
    lab = Lab(namespaces)
    yield lab
    # Safety net: nothing of ours may ever appear in the namespace the tests run in.
    mine = {line.split(":")[1].strip().split("@")[0] for line in run("ip -o link show").stdout.splitlines()}
    ours = {host_ifname(i) for i in lab.ids} & mine
    assert not ours, f"veths leaked into the test process's namespace: {ours}"


def test_two_containers_reach_each_other_and_the_host_dual_stack(lab):
    a_spec, a, a_state = lab.add("10.0.0.5/32", "fd00::5/128")
    b_spec, b, b_state = lab.add("10.0.0.6", "fd00::6")  # bare addresses are host routes too
    assert a_state.host_ifname == host_ifname(a_spec.endpoint_id) and len(a_state.host_ifname) == 13
    assert a_state.ifindex_in_container > 0 and a_state.mac
    for src, dst in (
        (a, "10.0.0.6"),
        (a, "fd00::6"),
        (b, "10.0.0.5"),
        (b, "fd00::5"),
        (a, HOST_V4),
        (a, HOST_V6),
        (b, HOST_V4),
        (b, HOST_V6),
    ):
        assert reaches(src, dst), f"{src} cannot reach {dst}"
    host_routes = routes(lab.host)
    assert f"10.0.0.5 dev {a_state.host_ifname} proto {ROUTE_PROTO} scope link" in host_routes
    assert f"fd00::6 dev {b_state.host_ifname} proto {ROUTE_PROTO}" in routes(lab.host, v6=True)
    # Container side as specified: host addresses only, gateway routes, the interface named eth0.
    assert "inet 10.0.0.5/32" in nsexec(a, "ip addr show dev eth0").stdout
    assert "default via 169.254.1.1 dev eth0" in routes(a)
    assert "169.254.1.1 dev eth0" in routes(a)
    assert "default via fe80::ecee:eeff:feee:eeee dev eth0" in routes(a, v6=True)
    listed = host_veths(lab.dp.host_netns)
    entry = listed[a_state.host_ifname]
    assert entry["routes"] == ["10.0.0.5/32", "fd00::5/128"] and entry["mac"] == "ee:ee:ee:ee:ee:ee"
    assert entry["up"] and entry["sysctls"][f"net.ipv4.conf.{a_state.host_ifname}.rp_filter"] == 1
    assert entry["sysctls"][f"net.ipv4.conf.{a_state.host_ifname}.proxy_arp"] == 1
    assert entry["sysctls"][f"net.ipv4.neigh.{a_state.host_ifname}.proxy_delay"] == 0
    assert entry["sysctls"][f"net.ipv6.conf.{a_state.host_ifname}.proxy_ndp"] == 1


def test_add_is_idempotent_and_keeps_the_running_pair(lab):
    spec, ns, first = lab.add("10.0.1.5", mtu=1400, mac="02:00:00:00:01:05")
    assert first.mac == "02:00:00:00:01:05"
    host_index = host_veths(lab.dp.host_netns)[first.host_ifname]["ifindex"]
    again = lab.dp.add_endpoint(spec)
    assert again == first
    assert host_veths(lab.dp.host_netns)[first.host_ifname]["ifindex"] == host_index  # not recreated
    assert "mtu 1400" in nsexec(ns, "ip link show dev eth0").stdout
    assert lab.dp.check_endpoint(spec) == []
    assert reaches(ns, HOST_V4)


def test_check_endpoint_reports_a_host_veth_deleted_by_hand(lab):
    spec, ns, state = lab.add("10.0.2.5", "fd00::2:5")
    assert lab.dp.check_endpoint(spec) == []
    nsexec(lab.host, f"ip link del {state.host_ifname}")
    problems = lab.dp.check_endpoint(spec)
    assert any("missing" in p and state.host_ifname in p for p in problems), problems
    assert any("eth0 is missing" in p for p in problems), problems


def test_check_endpoint_reports_drift(lab):
    spec, ns, state = lab.add("10.0.2.6")
    nsexec(lab.host, f"sysctl -qw net.ipv4.conf.{state.host_ifname}.proxy_arp=0")
    nsexec(lab.host, f"ip route del 10.0.2.6/32 dev {state.host_ifname}")
    nsexec(ns, "ip route del default")
    problems = lab.dp.check_endpoint(spec)
    assert any("proxy_arp is 0" in p for p in problems), problems
    assert any("host route 10.0.2.6/32" in p for p in problems), problems
    assert any("default route via 169.254.1.1" in p for p in problems), problems
    lab.dp.add_endpoint(spec)  # a repeated ADD converges it again
    assert lab.dp.check_endpoint(spec) == []


def test_remove_endpoint_is_idempotent(lab):
    spec, ns, state = lab.add("10.0.3.5", "fd00::3:5")
    lab.dp.remove_endpoint(spec.endpoint_id, spec.netns)
    assert state.host_ifname not in links(lab.host)
    assert "eth0" not in links(ns)
    assert "10.0.3.5" not in routes(lab.host) and "fd00::3:5" not in routes(lab.host, v6=True)
    lab.dp.remove_endpoint(spec.endpoint_id, spec.netns)  # twice
    lab.dp.remove_endpoint("never-added.eth0")  # unknown id
    lab.dp.remove_endpoint("never-added.eth0", "/run/netns/npt-does-not-exist")


def test_background_remove_detaches_first_and_an_add_of_the_same_endpoint_waits_for_the_deletion(lab):
    """DEL's fast path: remove_endpoint(background=True) returns once no route leads into the old veth and the
    container holds none of its addresses; the veth pair is deleted by the worker after. The worker is held
    busy here (a job queued before it), so the state between is observed, not raced."""
    spec, ns, state = lab.add("10.0.3.7", "fd00::3:7")
    peer_spec, peer, _ = lab.add("10.0.3.8")
    busy, go = threading.Event(), threading.Event()
    lab.dp._reaper.submit("npt-blocker", lambda: (busy.set(), go.wait(10)))
    try:
        assert busy.wait(5)
        lab.dp.remove_endpoint(spec.endpoint_id, spec.netns, background=True)
        assert state.host_ifname in links(lab.host), "the veth deletion was not left to the worker"
        assert "10.0.3.7" not in routes(lab.host) and "fd00::3:7" not in routes(lab.host, v6=True)
        assert "inet" not in nsexec(ns, "ip -4 addr show dev eth0").stdout
        assert "fd00::3:7" not in nsexec(ns, "ip -6 addr show dev eth0").stdout
        # The released address, handed at once to a new container, is routed to the new veth and reachable.
        again_spec, again, again_state = lab.add("10.0.3.7")
        assert f"10.0.3.7 dev {again_state.host_ifname} " in routes(lab.host)
        assert reaches(peer, "10.0.3.7") and reaches(again, "10.0.3.8")
        # An ADD of the endpoint being deleted (a runtime retrying) waits for the deletion, then makes a new pair.
        readded, respec = [], dataclasses.replace(spec, addresses=("10.0.3.9",))
        worker = threading.Thread(target=lambda: readded.append(lab.dp.add_endpoint(respec)))
        worker.start()
        worker.join(0.3)
        assert worker.is_alive() and not readded, "an ADD went ahead while its veth was being deleted"
    finally:
        go.set()
    worker.join(10)
    assert readded and readded[0].created, "the re-ADD must build a fresh pair, not converge the dying one"
    assert lab.dp._reaper.pending() == []
    assert reaches(ns, "10.0.3.8")
    lab.dp.remove_endpoint(peer_spec.endpoint_id, peer_spec.netns, background=True)
    lab.dp.close()  # waits for the worker
    assert host_ifname(peer_spec.endpoint_id) not in links(lab.host)


def test_remove_endpoint_when_the_container_netns_is_already_gone(lab):
    spec, ns, state = lab.add("10.0.3.6")
    run(["ip", "netns", "del", ns])
    lab.dp.remove_endpoint(spec.endpoint_id, spec.netns)
    assert state.host_ifname not in links(lab.host)
    assert "10.0.3.6" not in routes(lab.host)


def test_reconcile_converges_and_a_second_run_changes_nothing(lab):
    a_spec, a, a_state = lab.add("10.1.0.5", "fd10::5")
    b_spec, b, b_state = lab.add("10.1.0.6")
    gone_spec, gone_ns, gone_state = lab.add("10.1.0.7")  # no longer desired
    stray = "np" + "f" * 11  # a name only host_ifname could produce, made by hand
    nsexec(lab.host, f"ip link add {stray} type veth peer name stray-peer")
    nsexec(lab.host, "ip link add np-other type veth peer name np-other-p")  # not our name pattern
    nsexec(lab.host, f"ip route add blackhole 10.77.0.0/26 proto {ROUTE_PROTO}")  # stale block of ours
    nsexec(lab.host, "ip route add blackhole 10.78.0.0/26 proto static")  # someone else's
    # Drift on healthy endpoints: a route and a sysctl gone.
    nsexec(lab.host, f"ip route del 10.1.0.6/32 dev {b_state.host_ifname}")
    nsexec(lab.host, f"sysctl -qw net.ipv4.conf.{a_state.host_ifname}.rp_filter=0")

    first = lab.dp.reconcile([a_spec, b_spec], ["10.1.0.0/26", "fd10::/122"], deletable={gone_state.host_ifname})
    assert first["errors"] == []
    assert first["removed"] == [gone_state.host_ifname]
    assert first["unaccounted"] == [stray]  # nobody said its endpoint was deleted: kept
    assert first["routes_added"] == [f"10.1.0.6/32 dev {b_state.host_ifname}"]
    assert any("rp_filter=1" in r for r in first["repaired"]), first
    assert first["blackholes_added"] == ["10.1.0.0/26", "fd10::/122"]
    assert first["blackholes_removed"] == ["10.77.0.0/26"]

    second = lab.dp.reconcile([a_spec, b_spec], ["10.1.0.0/26", "fd10::/122"])
    assert not changed(second) and second["errors"] == [], second
    assert second["unaccounted"] == [stray] and stray in links(lab.host)
    assert {"np-other", "np-other-p"} <= links(lab.host)
    assert "blackhole 10.78.0.0/26" in routes(lab.host)
    assert "blackhole 10.77.0.0/26" not in routes(lab.host)
    assert lab.dp.check_endpoint(a_spec) == [] and lab.dp.check_endpoint(b_spec) == []
    assert reaches(a, "10.1.0.6") and reaches(b, "10.1.0.5")


def test_converge_blocks_changes_only_our_blackholes(lab):
    a_spec, a, a_state = lab.add("10.1.0.5")
    b_spec, b, b_state = lab.add("10.1.0.6")
    nsexec(lab.host, f"ip route del 10.1.0.6/32 dev {b_state.host_ifname}")  # drift: left to the whole pass
    nsexec(lab.host, f"ip route add blackhole 10.77.0.0/26 proto {ROUTE_PROTO}")  # a block no longer ours
    nsexec(lab.host, "ip route add blackhole 10.78.0.0/26 proto static")  # someone else's
    done = lab.dp.converge_blocks(["10.1.0.0/26", "fd10::/122"])
    assert done["errors"] == [] and done["blackholes_added"] == ["10.1.0.0/26", "fd10::/122"]
    assert done["blackholes_removed"] == ["10.77.0.0/26"] and not done["routes_added"] and not done["removed"]
    assert "blackhole 10.78.0.0/26" in routes(lab.host) and "blackhole 10.1.0.0/26" in routes(lab.host)
    assert "blackhole fd10::/122" in routes(lab.host, v6=True)
    assert f"10.1.0.6 dev {b_state.host_ifname}" not in routes(lab.host)  # endpoints are not its job
    assert lab.dp.check_endpoint(a_spec) == []  # the other endpoint untouched
    assert not changed(lab.dp.converge_blocks(["10.1.0.0/26", "fd10::/122"]))


def test_reconcile_keeps_every_veth_it_cannot_account_for(lab):
    """No desired endpoint at all (etcd holds no record for this host): nothing is deleted, all is reported."""
    a_spec, a, a_state = lab.add("10.1.3.5", "fd10:3::5")
    b_spec, b, b_state = lab.add("10.1.3.6")
    summary = lab.dp.reconcile([], [])
    assert summary["removed"] == [] and not changed(summary), summary
    assert summary["unaccounted"] == sorted([a_state.host_ifname, b_state.host_ifname])
    assert lab.dp.check_endpoint(a_spec) == [] and lab.dp.check_endpoint(b_spec) == []
    assert reaches(a, "10.1.3.6") and reaches(b, "10.1.3.5")


def test_reconcile_recreates_a_missing_endpoint(lab):
    spec, ns, state = lab.add("10.1.1.5", "fd10:1::5")
    nsexec(lab.host, f"ip link del {state.host_ifname}")  # takes the container's eth0 with it
    summary = lab.dp.reconcile([spec], [])
    assert summary["created"] == [spec.endpoint_id] and summary["errors"] == []
    assert not changed(lab.dp.reconcile([spec], []))
    assert reaches(ns, HOST_V4) and reaches(ns, HOST_V6)


def test_reconcile_reports_an_endpoint_it_cannot_recreate_and_carries_on(lab):
    spec, ns, state = lab.add("10.1.2.5")
    lost, _ = lab.spec("10.1.2.6", ns="npt-missing-" + uuid.uuid4().hex[:6])
    summary = lab.dp.reconcile([spec, lost], ["10.1.2.0/26"])
    assert len(summary["errors"]) == 1 and lost.endpoint_id in summary["errors"][0]
    assert summary["blackholes_added"] == ["10.1.2.0/26"]
    assert lab.dp.check_endpoint(spec) == []


def test_spoofed_ipv4_source_is_dropped_by_rp_filter(lab):
    a_spec, a, a_state = lab.add("10.2.0.5")
    b_spec, b, _ = lab.add("10.2.0.6")
    nsexec(a, "ip addr add 10.2.0.6/32 dev eth0")  # A claims B's address
    before = counter(lab.host, "Icmp.InEchos")
    assert not reaches(a, HOST_V4, src="10.2.0.6", timeout=0.5)
    assert counter(lab.host, "Icmp.InEchos") == before, "the host accepted a spoofed packet"
    assert reaches(a, HOST_V4, src="10.2.0.5")  # the real address still works
    # Control: without strict rp_filter the same packet does reach the host, so the check above means something.
    nsexec(lab.host, f"sysctl -qw net.ipv4.conf.{a_state.host_ifname}.rp_filter=0")
    before = counter(lab.host, "Icmp.InEchos")
    reaches(a, HOST_V4, src="10.2.0.6", timeout=0.5)
    assert counter(lab.host, "Icmp.InEchos") > before
    repaired = lab.dp.reconcile([a_spec, b_spec], [])["repaired"]
    assert repaired == [f"{a_state.host_ifname}: net.ipv4.conf.{a_state.host_ifname}.rp_filter=1"]
    before = counter(lab.host, "Icmp.InEchos")
    assert not reaches(a, HOST_V4, src="10.2.0.6", timeout=0.5)
    assert counter(lab.host, "Icmp.InEchos") == before


def test_spoofed_ipv6_source_is_dropped_by_the_antispoof_chain(lab):
    a_spec, a, _ = lab.add("10.2.1.5", "fd02::5")
    lab.add("10.2.1.6", "fd02::6")
    nsexec(a, "ip -6 addr add fd02::6/128 dev eth0 nodad")
    before = counter(lab.host, "Icmp6InEchos")
    assert not reaches(a, HOST_V6, src="fd02::6", timeout=0.5)
    assert counter(lab.host, "Icmp6InEchos") == before, "the host accepted a spoofed packet"
    assert reaches(a, HOST_V6, src="fd02::5")
    # Control: without the hook the spoofed packet arrives; check_endpoint notices; enable_ipv6 puts it back.
    assert "-j np-antispoof" in nsexec(lab.host, "ip6tables -w -t raw -S PREROUTING 1").stdout
    nsexec(lab.host, "ip6tables -w -t raw -D PREROUTING 1")  # our hook (it carries our ownership comment)
    assert any("np-antispoof" in p for p in lab.dp.check_endpoint(a_spec))
    before = counter(lab.host, "Icmp6InEchos")
    reaches(a, HOST_V6, src="fd02::6", timeout=0.5)
    assert counter(lab.host, "Icmp6InEchos") > before
    assert lab.dp.enable_ipv6(recheck=True)["antispoof_written"] == [6]
    assert lab.dp.enable_ipv6(recheck=True)["antispoof_written"] == []  # idempotent
    assert lab.dp.check_endpoint(a_spec) == [f"eth0 in netns '{a_spec.netns}' has unexpected address fd02::6/128"]
    before = counter(lab.host, "Icmp6InEchos")
    assert not reaches(a, HOST_V6, src="fd02::6", timeout=0.5)
    assert counter(lab.host, "Icmp6InEchos") == before


def test_loose_host_wide_rp_filter_gets_the_ipv4_rule_too(lab):
    nsexec(lab.host, "sysctl -qw net.ipv4.conf.all.rp_filter=2")  # max(all, veth) would be loose
    assert lab.dp.setup_host()["antispoof_families"] == [4]
    _, a, _ = lab.add("10.2.2.5")
    lab.add("10.2.2.6")
    nsexec(a, "ip addr add 10.2.2.6/32 dev eth0")
    before = counter(lab.host, "Icmp.InEchos")
    assert not reaches(a, HOST_V4, src="10.2.2.6", timeout=0.5)
    assert counter(lab.host, "Icmp.InEchos") == before
    assert reaches(a, HOST_V4)


def test_add_rolls_back_when_a_host_route_conflicts(lab):
    nsexec(lab.host, "ip route add 10.3.0.7/32 dev lo")  # the address is already routed elsewhere
    spec, ns = lab.spec("10.3.0.7", "fd03::7")
    before_host = (links(lab.host), routes(lab.host), routes(lab.host, v6=True))
    with pytest.raises(AlreadyExists) as err:
        lab.dp.add_endpoint(spec)
    assert "10.3.0.7/32" in str(err.value) and "already routed via dev lo" in str(err.value)
    assert (links(lab.host), routes(lab.host), routes(lab.host, v6=True)) == before_host
    assert links(ns) == {"lo"}


def test_add_rolls_back_when_the_container_step_fails(lab, monkeypatch):
    real_plan = container_side.plan

    def plan_then_fail(batch, idx, *args, **kwargs):
        added = real_plan(batch, idx, *args, **kwargs)
        # A request the kernel refuses (no such device), after everything else: the last step fails.
        batch.route("replace", "10.250.0.0/24", "add an impossible route", oif=0x7FFFFFF0)
        return added

    monkeypatch.setattr(container_side, "plan", plan_then_fail)
    spec, ns = lab.spec("10.3.1.5", "fd03::1:5")
    before_host = (links(lab.host), routes(lab.host), routes(lab.host, v6=True))
    with pytest.raises(NotFound, match="add an impossible route"):
        lab.dp.add_endpoint(spec)
    assert (links(lab.host), routes(lab.host), routes(lab.host, v6=True)) == before_host
    assert links(ns) == {"lo"}


def test_add_fails_cleanly_for_a_missing_netns(lab):
    spec, _ = lab.spec("10.3.2.5", ns="npt-gone-" + uuid.uuid4().hex[:6])
    before = links(lab.host)
    with pytest.raises(NotFound, match="failed to open netns"):
        lab.dp.add_endpoint(spec)
    assert links(lab.host) == before
    assert not os.path.exists(spec.netns)  # never created as a side effect


def test_add_refuses_an_interface_it_did_not_create(lab):
    spec, ns = lab.spec("10.3.3.5")
    nsexec(ns, "ip link add eth0 type veth peer name other0")
    with pytest.raises(AlreadyExists, match="eth0 already exists"):
        lab.dp.add_endpoint(spec)
    assert host_ifname(spec.endpoint_id) not in links(lab.host)
    assert {"eth0", "other0"} <= links(ns)


def test_bad_input_is_refused_before_touching_the_kernel(lab):
    spec, ns = lab.spec("10.3.4.0/24")
    with pytest.raises(InvalidInput, match="host address"):
        lab.dp.add_endpoint(spec)
    with pytest.raises(InvalidInput, match="address block"):
        lab.dp.reconcile([], ["10.3.4.1/24"])
    assert host_ifname(spec.endpoint_id) not in links(lab.host)


def test_ipv6_forwarding_only_with_ipv6_and_ra_interfaces_keep_accepting_ras(lab):
    """setup_host leaves IPv6 alone; the first IPv6 endpoint turns forwarding on, after moving interfaces that
    accept RAs to accept_ra=2 (others, and our veths, untouched)."""

    def sysctl(key):
        return nsexec(lab.host, f"sysctl -n {key}").stdout.strip()

    nsexec(lab.host, "ip link add npt-ra type veth peer name npt-ra-p")  # accept_ra 1 by default: RA-configured
    nsexec(lab.host, "ip link add npt-static type veth peer name npt-static-p")
    nsexec(lab.host, "sysctl -qw net.ipv6.conf.npt-static.accept_ra=0")
    lab.add("10.2.3.5")  # IPv4 only
    assert sysctl("net.ipv6.conf.all.forwarding") == "0"
    assert sysctl("net.ipv6.conf.npt-ra.accept_ra") == "1"
    _, ns, state = lab.add("10.2.3.6", "fd02:3::6")
    assert sysctl("net.ipv6.conf.all.forwarding") == "1"
    assert sysctl("net.ipv6.conf.npt-ra.accept_ra") == "2"
    assert sysctl("net.ipv6.conf.npt-static.accept_ra") == "0"
    assert sysctl(f"net.ipv6.conf.{state.host_ifname}.accept_ra") != "2"  # a container never configures the host
    assert reaches(ns, HOST_V6)


def test_ipv6_only_endpoint(lab):
    spec, ns, _ = lab.add("fd04::5")
    assert reaches(ns, HOST_V6)
    assert "default" not in routes(ns)
    assert lab.dp.check_endpoint(spec) == []


AGENT = """
import json, sys
from netplugin.dataplane import Dataplane, EndpointSpec
dp = Dataplane()  # the namespace this process runs in is the host's
dp.setup_host()
spec = EndpointSpec(sys.argv[1], sys.argv[2], addresses=("10.4.0.5", "fd04:1::5"))
state = dp.add_endpoint(spec)
print(json.dumps({"state": state.host_ifname, "problems": dp.check_endpoint(spec),
                  "again": dp.reconcile([spec], ["10.4.0.0/26"])}))
"""


def test_dataplane_running_inside_the_host_namespace(lab):
    """The production path: no host_netns, sysctls written in-process, all inside the test host namespace."""
    spec, ns = lab.spec()
    proc = nsexec(
        lab.host,
        [sys.executable, "-c", AGENT, spec.endpoint_id, spec.netns],
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["problems"] == []
    assert out["again"]["blackholes_added"] == ["10.4.0.0/26"] and not out["again"]["removed"]
    assert out["state"] in links(lab.host)
    assert reaches(ns, HOST_V4) and reaches(ns, HOST_V6)
    assert f"10.4.0.5 dev {out['state']} proto {ROUTE_PROTO}" in routes(lab.host)


def test_reconcile_reports_an_address_routed_elsewhere_without_stealing_it(lab):
    spec, ns, state = lab.add("10.5.0.5")
    nsexec(lab.host, f"ip route del 10.5.0.5/32 dev {state.host_ifname}")
    nsexec(lab.host, "ip route add 10.5.0.5/32 dev lo")  # someone else's route now holds the address
    first = lab.dp.reconcile([spec], [])
    assert len(first["errors"]) == 1 and "already routed via dev lo" in first["errors"][0], first
    assert not changed(first)
    assert "10.5.0.5 dev lo" in routes(lab.host)
    assert lab.dp.reconcile([spec], [])["errors"] == first["errors"]


def test_add_replaces_a_stale_pair_left_by_an_earlier_incarnation(lab):
    spec, old_ns, state = lab.add("10.5.1.5")
    new_ns = lab.nss.add()
    moved = EndpointSpec(spec.endpoint_id, f"/run/netns/{new_ns}", addresses=spec.addresses)
    again = lab.dp.add_endpoint(moved)
    assert again.host_ifname == state.host_ifname
    assert "eth0" not in links(old_ns) and "eth0" in links(new_ns)
    assert lab.dp.check_endpoint(moved) == []
    assert reaches(new_ns, HOST_V4)


def only_lo_and_our_veths(ns):
    """The host shape of a data-centre host with specific routes only: no other link, no default route."""
    names = links(ns) - {"lo"}
    assert names and all(is_host_ifname(n) for n in names), names
    assert not [r for r in (routes(ns) + routes(ns, v6=True)).splitlines() if r.startswith("default")]


def test_containers_resolve_their_gateways_with_no_route_on_the_host(lab):
    """A container that must ARP for 169.254.1.1 (as a Docker one does: nothing writes its neighbour table)
    and solicit fe80::ecee:eeff:feee:eeee gets an answer from a host with nothing but lo and its veths.
    New links inherit conf/default's arp_ignore, which would silence the gateway address: ours set 0."""
    nsexec(lab.host, "sysctl -qw net.ipv4.conf.default.arp_ignore=2")
    specs = [lab.add(f"10.9.0.{i}", f"fd09::{i}") for i in (5, 6)]
    only_lo_and_our_veths(lab.host)
    for _, ns, _ in specs:
        nsexec(ns, f"ip neigh del {container_side.GATEWAYS[4]} dev eth0")
        nsexec(ns, f"ip -6 neigh del {container_side.GATEWAYS[6]} dev eth0")
    (_, a, a_state), (_, b, _) = specs
    for src, dst in (
        (a, "10.9.0.6"),
        (a, "fd09::6"),
        (b, "10.9.0.5"),
        (b, "fd09::5"),
        (a, HOST_V4),
        (a, HOST_V6),
        (lab.host, "10.9.0.5"),
        (lab.host, "fd09::6"),
    ):
        assert reaches(src, dst, timeout=2.0), f"{src} cannot reach {dst}"
    for family, gateway in container_side.GATEWAYS.items():
        neigh = nsexec(a, f"ip -{family} neigh show {gateway} dev eth0").stdout
        assert "lladdr ee:ee:ee:ee:ee:ee" in neigh and "PERMANENT" not in neigh, neigh  # learned, not written
    # Scope host: the host keeps its own address as the source towards its containers.
    assert f"src {HOST_V4}" in nsexec(lab.host, "ip route get 10.9.0.5").stdout
    assert "inet 169.254.1.1/32 scope host" in nsexec(lab.host, f"ip addr show dev {a_state.host_ifname}").stdout


def test_reconcile_and_check_restore_a_lost_gateway_address(lab):
    """A veth without its gateway address (made by an older agent, or deleted by hand) is found and fixed.
    Deleting a link's last IPv4 address makes the kernel drop the IPv4 routes through it too."""
    a_spec, a, a_state = lab.add("10.9.1.5", "fd09:1::5")
    name = a_state.host_ifname
    nsexec(lab.host, f"ip addr del 169.254.1.1/32 dev {name}")
    assert lab.dp.check_endpoint(a_spec) == [
        f"host veth {name} lacks the IPv4 gateway address 169.254.1.1/32",
        f"host route 10.9.1.5/32 dev {name} is missing",
    ]
    first = lab.dp.reconcile([a_spec], [])
    assert f"{name}: address 169.254.1.1" in first["repaired"] and first["errors"] == [], first
    assert first["routes_added"] == [f"10.9.1.5/32 dev {name}"]
    assert not changed(lab.dp.reconcile([a_spec], [])) and lab.dp.check_endpoint(a_spec) == []
    nsexec(a, "ip neigh del 169.254.1.1 dev eth0")
    assert reaches(a, HOST_V4)


def test_setup_host_warns_when_arp_ignore_silences_the_gateway(lab):
    assert lab.dp.setup_host()["warnings"] == []
    nsexec(lab.host, "sysctl -qw net.ipv4.conf.all.arp_ignore=2")
    assert lab.dp.setup_host()["warnings"] == [
        "net.ipv4.conf.all.arp_ignore is 2: the host will not answer containers' ARP for their gateway "
        "169.254.1.1; set it to 0 or 1"
    ]
