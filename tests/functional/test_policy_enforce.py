"""Policy enforced by the real kernel: a "host" namespace routing for three "container" namespaces and one
"outside" namespace, compiled rulesets applied with PolicyDataplane, real TCP/UDP/ICMP packets.

Topology (all inside throwaway namespaces)::

    A 10.65.0.1 blue {app: web}      --veth np..a--+
    B 10.65.0.2 blue {app: client}   --veth np..b--+-- host (forwarding, proxy ARP, /32 routes) --ext0-- O 10.66.0.2
    C 10.65.0.3 red  {role: client}  --veth np..c--+                                              (not an endpoint)

The veth/route/proxy-ARP helper here is deliberately small: it stands in for the dataplane module.
"""

import dataclasses
import logging
import re

import pytest

from netplugin.errors import DataplaneError
from netplugin.lab.netns import NamespaceSet, nsexec
from policy.applier import PolicyDataplane
from policy.compiler import compile_ruleset, policy_chain
from policy.loader import load_text
from policy.model import Endpoint, Peer, Policy, Rule
from policy.selector import Selector
from tests.probes import assert_reachability, start_echo_server

pytestmark = [pytest.mark.functional, pytest.mark.timeout(120)]

TCP_PORTS = (80, 8080)
UDP_PORT = 53


class Lab:
    """Host + containers + outside; ``expect`` runs probes from one namespace and checks each verdict."""

    def __init__(self, nss):
        self.nss = nss
        self.servers = []
        self.host = nss.add()
        for key in (
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.default.accept_dad=0",
        ):
            nsexec(self.host, ["sysctl", "-qw", key])
        self.outside = nss.add()
        nss.link(self.host, self.outside, "10.66.0.1/24", "10.66.0.2/24", name_a="ext0", name_b="eth0")
        nsexec(self.outside, "ip route add default via 10.66.0.1")
        # Proxy ARP answers for 169.254.1.1 only if the host has a route to it through another interface.
        nsexec(self.host, "ip route add default via 10.66.0.2 dev ext0")
        self.ns = {"O": self.outside}
        self.ip = {"O": "10.66.0.2"}
        self.endpoints = {}

    def add_container(self, key, ip, ip6, ifname, network, labels):
        ns = self.nss.add()
        nsexec(ns, "sysctl -qw net.ipv6.conf.default.accept_dad=0")
        self.nss.link(self.host, ns, None, f"{ip}/32", name_a=ifname, name_b="eth0")
        nsexec(
            self.host,
            [
                "sysctl",
                "-qw",
                f"net.ipv4.conf.{ifname}.proxy_arp=1",
                f"net.ipv4.neigh.{ifname}.proxy_delay=0",
                f"net.ipv4.conf.{ifname}.rp_filter=0",
            ],
        )
        nsexec(self.host, f"ip route add {ip}/32 dev {ifname}")
        nsexec(ns, "ip route add 169.254.1.1 dev eth0 scope link")
        nsexec(ns, "ip route add default via 169.254.1.1 dev eth0")
        # IPv6: the host side answers neighbour discovery for fe80::1 itself (through our INPUT hook).
        nsexec(self.host, f"ip -6 addr add fe80::1/64 dev {ifname} nodad")
        nsexec(self.host, f"ip -6 route add {ip6}/128 dev {ifname}")
        nsexec(ns, f"ip -6 addr add {ip6}/128 dev eth0 nodad")
        nsexec(ns, "ip -6 route add default via fe80::1 dev eth0")
        self.ns[key], self.ip[key], self.ip[key + "6"] = ns, ip, ip6
        self.endpoints[key] = Endpoint(
            id=f"ep-{key}", host_ifname=ifname, addresses=[ip, ip6], network=network, labels=labels
        )

    def start_servers(self):
        for key, ns in sorted(self.ns.items()):
            self.servers.append(start_echo_server(ns, TCP_PORTS, UDP_PORT, key))

    def close(self):
        for proc in self.servers:
            proc.kill()
            proc.wait(timeout=5)

    def expect(self, src, *checks, timeout=0.5):
        """checks: (kind, dst key, port, expected bool); all probes run at once from ``src``."""
        assert_reachability(self.ns[src], src, checks, self.ip, timeout)

    def ruleset(self, policies_yaml="", remote=()):
        policies = load_text(policies_yaml, "test.yaml") if policies_yaml else []
        local = sorted(self.endpoints.values(), key=lambda e: e.id)
        return compile_ruleset(local, list(local) + list(remote), policies)


@pytest.fixture(scope="module")
def lab():
    nss = NamespaceSet()
    lab = None
    try:
        lab = Lab(nss)
        lab.add_container("A", "10.65.0.1", "fd00:65::1", "np00000000a01", "blue", {"app": "web"})
        lab.add_container("B", "10.65.0.2", "fd00:65::2", "np00000000b02", "blue", {"app": "client"})
        lab.add_container("C", "10.65.0.3", "fd00:65::3", "np00000000c03", "red", {"role": "client"})
        lab.start_servers()
        lab.dp = PolicyDataplane(lab.host)
        yield lab
    finally:
        if lab is not None:
            lab.close()
        nss.close()


REMOTE = [Endpoint("ep-remote", "", ["10.65.9.9"], "red", {"role": "client"})]


def policy(name, body):
    return f"apiVersion: netplugin/v1\nkind: Policy\nmetadata: {{name: {name}}}\nspec:\n{body}\n---\n"


def iptables_rules(lab, family=4):
    """Our chains and hooks as iptables-save prints them, without counters."""
    save = "iptables-save" if family == 4 else "ip6tables-save"
    lines = nsexec(lab.host, [save, "-t", "filter"]).stdout.splitlines()
    return [line for line in lines if re.match(r"^(:np-|-A np-|-A (INPUT|FORWARD|OUTPUT) .*np-)", line)]


def test_default_same_network_talks_other_networks_do_not(lab):
    rs = lab.ruleset(remote=REMOTE)
    lab.dp.apply(rs)
    assert lab.dp.apply(rs) == [], "a second apply of the same ruleset must find nothing to do"
    assert lab.dp.diff(rs) == []
    assert lab.dp.backend() in ("nf_tables", "legacy")
    lab.expect(
        "A",
        ("tcp", "B", 80, True),
        ("udp", "B", 53, True),
        ("icmp", "B", 0, True),
        ("tcp", "C", 80, False),
        ("icmp", "C", 0, False),
        ("tcp", "O", 80, True),
    )
    lab.expect("C", ("tcp", "A", 80, False), ("udp", "A", 53, False), ("icmp", "A", 0, False), ("tcp", "O", 80, True))
    lab.expect("O", ("tcp", "A", 80, True), ("udp", "B", 53, True), ("icmp", "C", 0, True))


def test_label_selector_opens_cross_network_and_replaces_default(lab):
    rs = lab.ruleset(
        policy(
            "web-from-clients",
            """
  selector: {matchLabels: {app: web}}
  ingress:
    - action: allow
      protocol: tcp
      ports: [80]
      from: [{selector: {matchLabels: {role: client}}}]""",
        ),
        remote=REMOTE,
    )
    lab.dp.apply(rs)
    assert lab.dp.diff(rs) == []
    # C (red) reaches A:80 by label; A:8080 is not allowed; B (same network, no role) lost the default.
    lab.expect("C", ("tcp", "A", 80, True), ("tcp", "A", 8080, False), ("icmp", "A", 0, False))
    lab.expect("B", ("tcp", "A", 80, False), ("udp", "A", 53, False))
    # A's egress is untouched; B's ingress keeps the default.
    lab.expect("A", ("tcp", "B", 80, True), ("tcp", "O", 80, True))
    sel_sets = [s for s in rs.ipsets if s.name.startswith("np-sel-")]
    assert [s.members for s in sel_sets if s.family == 4] == [("10.65.0.3/32", "10.65.9.9/32")]

    # Removing the policy removes its chain and sets from the kernel and restores the default.
    default = lab.ruleset(remote=REMOTE)
    changes = lab.dp.apply(default)
    assert any("stale" in c for c in changes)
    saved = "\n".join(iptables_rules(lab))
    assert policy_chain("web-from-clients", "Ingress") not in saved
    sets = nsexec(lab.host, "ipset list -n").stdout.split()
    assert not any(s.startswith("np-sel-") for s in sets)
    lab.expect("B", ("tcp", "A", 80, True))


def test_deny_by_port_and_deny_wins_at_equal_order(lab):
    body_deny = """
  order: 100
  selector: {matchLabels: {app: web}}
  ingress: [{action: deny, protocol: tcp, ports: [8080]}]"""
    body_allow = """
  order: {order}
  selector: {{matchLabels: {{app: web}}}}
  ingress: [{{action: allow}}]"""
    lab.dp.apply(lab.ruleset(policy("no-8080", body_deny) + policy("allow-all", body_allow.format(order=200))))
    lab.expect("B", ("tcp", "A", 80, True), ("tcp", "A", 8080, False), ("udp", "A", 53, True))
    lab.expect("C", ("tcp", "A", 80, True), ("tcp", "A", 8080, False))
    # Same order: the deny still wins even though "allow-all" sorts first by name.
    lab.dp.apply(lab.ruleset(policy("no-8080", body_deny) + policy("allow-all", body_allow.format(order=100))))
    lab.expect("B", ("tcp", "A", 80, True), ("tcp", "A", 8080, False))
    # Allow first by order: it wins.
    lab.dp.apply(lab.ruleset(policy("no-8080", body_deny) + policy("allow-all", body_allow.format(order=50))))
    lab.expect("B", ("tcp", "A", 8080, True))


def test_order_precedence(lab):
    allow_c = """
  order: {order}
  selector: {{matchLabels: {{app: web}}}}
  ingress: [{{action: allow, from: [{{selector: {{matchLabels: {{role: client}}}}}}]}}]"""
    deny_all = """
  order: 20
  selector: {matchLabels: {app: web}}
  ingress: [{action: deny}]"""
    lab.dp.apply(lab.ruleset(policy("allow-c", allow_c.format(order=10)) + policy("deny-all", deny_all)))
    lab.expect("C", ("tcp", "A", 80, True), ("icmp", "A", 0, True))
    lab.expect("B", ("tcp", "A", 80, False))
    lab.dp.apply(lab.ruleset(policy("allow-c", allow_c.format(order=30)) + policy("deny-all", deny_all)))
    lab.expect("C", ("tcp", "A", 80, False), ("icmp", "A", 0, False))


def test_cidr_rules_with_exceptions(lab):
    rs = lab.ruleset(
        policy(
            "client-cidrs",
            """
  selector: {matchLabels: {app: client}}
  ingress:
    - action: deny
      from: [{cidr: 10.64.0.0/10, notCIDR: [10.66.0.0/24]}]
    - action: allow""",
        )
        + policy(
            "web-no-outside",
            """
  selector: {matchLabels: {app: web}}
  types: [Egress]
  egress:
    - {action: deny, to: [{cidr: 10.66.0.0/24}]}
    - {action: allow}""",
        )
    )
    lab.dp.apply(rs)
    lab.expect("O", ("tcp", "B", 80, True), ("icmp", "B", 0, True))  # in notCIDR
    lab.expect("C", ("tcp", "B", 80, False))  # in the /10
    lab.expect("A", ("tcp", "O", 80, False), ("udp", "O", 53, False), ("tcp", "C", 80, False))
    lab.expect("B", ("tcp", "O", 80, True))


def test_ten_thousand_denied_sources_in_one_set(lab):
    nets = [f"172.{16 + i // 2048}.{i // 8 % 256}.{i % 8 * 32}/28" for i in range(9999)] + ["10.66.0.2/32"]
    big = Policy(
        name="deny-many",
        selector=Selector.of({"app": "web"}),
        order=10,
        ingress=(Rule("deny", peers=tuple(Peer(cidr=n) for n in nets)), Rule("allow")),
    )
    local = sorted(lab.endpoints.values(), key=lambda e: e.id)
    rs = compile_ruleset(local, local, [big])
    [cidr_set] = [s for s in rs.ipsets if s.name.startswith("np-cidr-")]
    assert len(cidr_set.members) == 10000
    lab.dp.apply(rs)
    assert lab.dp.diff(rs) == []
    count = nsexec(lab.host, ["ipset", "list", "-t", cidr_set.name]).stdout
    assert "Number of entries: 10000" in count
    lab.expect("O", ("tcp", "A", 80, False), ("tcp", "B", 80, True))
    lab.expect("B", ("tcp", "A", 80, True))


def test_egress_deny(lab):
    rs = lab.ruleset(
        policy(
            "web-egress",
            """
  selector: {matchLabels: {app: web}}
  egress:
    - {action: deny, protocol: tcp, ports: [8080], to: [{selector: {matchLabels: {app: client}}}]}
    - {action: deny, protocol: udp, to: [{network: blue}]}
    - {action: allow}""",
        )
        + policy(
            "client-egress",
            """
  selector: {matchLabels: {role: client}}
  types: [Egress]
  egress: [{action: allow, protocol: tcp, ports: ["1:1024"], to: [{cidr: 10.66.0.0/24}]}]""",
        )
    )
    lab.dp.apply(rs)
    lab.expect("A", ("tcp", "B", 80, True), ("tcp", "B", 8080, False), ("udp", "B", 53, False), ("udp", "O", 53, True))
    lab.expect("C", ("tcp", "O", 80, True), ("tcp", "O", 8080, False), ("udp", "O", 53, False))
    # A's ingress is untouched by an egress-only policy... but "web-egress" also declares Ingress by default,
    # with no ingress rules: A is closed for new inbound connections.
    lab.expect("B", ("tcp", "A", 80, False))


def test_ipv6_isolation_and_egress_policy(lab):
    lab.dp.apply(lab.ruleset(remote=REMOTE))
    lab.expect(
        "A",
        ("tcp", "B6", 80, True),
        ("udp", "B6", 53, True),
        ("icmp", "B6", 0, True),
        ("tcp", "C6", 80, False),
        ("icmp", "C6", 0, False),
    )
    lab.expect("C", ("tcp", "A6", 80, False), ("tcp", "A", 80, False))
    # An egress policy on A: only TCP may leave. Neighbour discovery with the host must keep working.
    rs = lab.ruleset(
        policy(
            "web-tcp-only",
            """
  selector: {matchLabels: {app: web}}
  types: [Egress]
  egress: [{action: allow, protocol: tcp}]""",
        ),
        remote=REMOTE,
    )
    lab.dp.apply(rs)
    assert lab.dp.diff(rs) == []
    nsexec(lab.ns["A"], "ip -6 neigh flush dev eth0")
    nsexec(lab.host, "ip -6 neigh flush all")
    lab.expect(
        "A",
        ("tcp", "B6", 80, True),
        ("udp", "B6", 53, False),
        ("icmp", "B6", 0, False),
        ("tcp", "B", 80, True),
        ("udp", "B", 53, False),
    )
    lab.expect("B", ("tcp", "A6", 80, True), ("icmp", "A6", 0, True))


def _log_counters(lab, prefix):
    out = nsexec(lab.host, ["iptables-save", "-c", "-t", "filter"]).stdout
    return [
        int(m.group(1))
        for m in re.finditer(r"^\[(\d+):\d+\] -A np-pi-\S+ .*-j LOG --log-prefix \"" + re.escape(prefix), out, re.M)
    ]


def test_log_rule_counts_packets_and_continues(lab):
    rs = lab.ruleset(
        policy(
            "web-log",
            """
  order: 10
  selector: {matchLabels: {app: web}}
  ingress:
    - {action: log, protocol: tcp, ports: [80]}
    - {action: allow}""",
        )
    )
    lab.dp.apply(rs)
    before = _log_counters(lab, "np-log web-log ")
    assert before == [0]
    lab.expect("B", ("tcp", "A", 80, True), ("tcp", "A", 8080, True))
    lab.expect("C", ("tcp", "A", 80, True))
    after = _log_counters(lab, "np-log web-log ")
    assert after[0] >= 2, after  # one new connection from B and one from C to port 80
    assert lab.dp.apply(rs) == [] and _log_counters(lab, "np-log web-log ") == after, (
        "re-applying an unchanged ruleset must not rewrite (and reset) the chain"
    )


def test_drift_is_detected_and_repaired(lab):
    rs = lab.ruleset(remote=REMOTE)
    lab.dp.apply(rs)
    to_a, _ = rs.endpoint_chains("ep-A")
    lab.expect("C", ("tcp", "A", 80, False))
    # Someone flushes our chain: isolation silently breaks.
    nsexec(lab.host, ["iptables", "-F", to_a])
    lab.expect("C", ("tcp", "A", 80, True))
    drift = lab.dp.diff(rs)
    assert drift == [f"IPv4 chain {to_a}: differs (0 rules in the kernel, 2 wanted)"]
    # ... and removes the hook, adds a rule of their own to our chain, and empties a set.
    nsexec(lab.host, "iptables -D FORWARD 1")
    nsexec(lab.host, ["iptables", "-A", "np-to-disp", "-j", "ACCEPT"])
    net_set = next(
        s.name for s in rs.ipsets if s.name.startswith("np-net-") and s.family == 4 and "10.65.0.1/32" in s.members
    )
    nsexec(lab.host, ["ipset", "flush", net_set])
    drift = lab.dp.diff(rs)
    assert "IPv4 FORWARD: jump to np-FORWARD missing" in drift
    wanted = len(rs.chains[4]["np-to-disp"])  # one rule per endpoint shape, then the DROP
    assert f"IPv4 chain np-to-disp: differs ({wanted + 1} rules in the kernel, {wanted} wanted)" in drift
    assert f"ipset {net_set}: 2 member(s) missing, 0 extra" in drift
    assert sorted(lab.dp.apply(rs)) == sorted(drift)
    assert lab.dp.diff(rs) == []
    lab.expect("C", ("tcp", "A", 80, False))
    lab.expect("B", ("tcp", "A", 80, True))
    # A duplicated hook is drift too, and gets removed.
    nsexec(lab.host, "iptables -A FORWARD -j np-FORWARD")
    assert lab.dp.diff(rs) == ["IPv4 FORWARD: unwanted rule to our chain: -j np-FORWARD"]
    lab.dp.apply(rs)
    assert lab.dp.diff(rs) == []


def test_failed_batch_leaves_previous_rules(lab, caplog):
    good = lab.ruleset(remote=REMOTE)
    lab.dp.apply(good)
    before = {f: iptables_rules(lab, f) for f in (4, 6)}
    # A ruleset that would open A to C, with one rule the kernel rejects near the end of the batch.
    opening = lab.ruleset(
        policy(
            "open-a",
            """
  selector: {matchLabels: {app: web}}
  ingress: [{action: allow}]""",
        ),
        remote=REMOTE,
    )
    chains = {f: dict(c) for f, c in opening.chains.items()}
    chains[4]["np-to-disp"] = chains[4]["np-to-disp"][:-1] + ("-p tcp --dport 99999 -j DROP", "-j DROP")
    bad = type(opening)(ipsets=opening.ipsets, chains=chains, hooks=opening.hooks)
    with caplog.at_level(logging.ERROR, logger="policy"), pytest.raises(DataplaneError) as err:
        lab.dp.apply(bad)
    assert "line" in str(err.value) and "--dport 99999" in str(err.value)
    assert "the previous rules stay in force" in str(err.value)
    failing = [line for line in err.value.details.splitlines() if line.startswith(">")]
    assert len(failing) == 1 and "99999" in failing[0]  # numbered context, failing line marked
    assert failing[0] in caplog.text
    assert iptables_rules(lab, 4) == before[4]
    lab.expect("C", ("tcp", "A", 80, False))
    # A bad ipset member stops before iptables is touched.
    bad_set = dataclasses.replace(opening.ipsets[0], members=opening.ipsets[0].members + ("10.0.0.0/33",))
    with pytest.raises(DataplaneError, match=r"ipset restore \(update\) in netns \S+ failed: .*line"):
        lab.dp.apply(dataclasses.replace(opening, ipsets=(bad_set,) + opening.ipsets[1:]))
    assert iptables_rules(lab, 4) == before[4]
    # The good version of the same change goes through; then back to the default.
    lab.dp.apply(opening)
    lab.expect("C", ("tcp", "A", 80, True))
    lab.dp.apply(good)
    assert {f: iptables_rules(lab, f) for f in (4, 6)} == before
    assert lab.dp.diff(good) == []


def test_legacy_backend_is_written_with_legacy_tools():
    """The same ruleset through iptables-legacy, in a namespace of its own: converges, and nft sees none of it."""
    nss = NamespaceSet()
    try:
        ns = nss.add()
        a = Endpoint("ep-a", "np00000000a01", ["10.65.0.1"], "blue", {"app": "web"})
        rs = compile_ruleset([a], [a], load_text(policy("p", "  selector: {}\n  ingress: [{action: log}]")))
        dp = PolicyDataplane(ns, backend="legacy")
        assert dp.backend() == "legacy" and dp.tables[4].binaries()[2].endswith("restore")
        assert dp.apply(rs) and dp.apply(rs) == [] and dp.diff(rs) == []
        legacy = nsexec(ns, "iptables-legacy-save -t filter").stdout
        assert "-A FORWARD -m comment" in legacy and policy_chain("p", "Ingress") in legacy
        assert "np-" not in nsexec(ns, "iptables-nft-save -t filter").stdout
    finally:
        nss.close()
