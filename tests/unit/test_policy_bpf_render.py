"""The BPF policy maps rendered from the compiler's plan give the policy model's verdict.

Each case: generated endpoints, policies and packets; the maps as ``policy.bpf_render`` writes them (bytes, the
backend's keys) are evaluated by the Python mirror of the program's lookup (``records.lpm_bits`` +
``records.walk_rules``), and compared with an oracle written from the semantics in policy/compiler.py's
docstring, straight from the model (not from the compiler's sets or chains).
"""

import ipaddress
import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netplugin.kernel.bpf import records
from policy.bpf_render import fold, render
from policy.compiler import compile_ruleset
from policy.model import PROTOCOLS, Endpoint, Policy

V4 = [f"10.0.0.{i}" for i in range(1, 9)]
V6 = [f"fd00::{i}" for i in range(1, 9)]
PEERS = V4 + V6 + ["10.0.0.9", "10.0.0.13", "192.0.2.1", "fd00::9", "2001:db8::1"]
CIDRS = [
    ("10.0.0.0/29", ()),
    ("10.0.0.8/29", ("10.0.0.12/30",)),
    ("10.0.0.0/24", ("10.0.0.4/30", "10.0.0.8/31")),
    ("0.0.0.0/0", ()),
    ("fd00::/125", ()),
    ("fd00::/64", ("fd00::/126",)),
    ("::/0", ()),
]
APPS = ["web", "db", "x"]
NETWORKS = ["blue", "red"]


@st.composite
def endpoints(draw):
    n = draw(st.integers(1, 6))
    out = []
    for i in range(n):
        addrs = [V4[i]] + ([V6[i]] if draw(st.booleans()) else [])
        labels = {"app": draw(st.sampled_from(APPS))}
        out.append(Endpoint(f"ep-{i}", f"np{i:011x}", addrs, draw(st.sampled_from(NETWORKS)), labels))
    return out


def _peer(draw):
    kind = draw(st.sampled_from(["selector", "network", "cidr"]))
    if kind == "selector":
        return {"selector": {"matchLabels": {"app": draw(st.sampled_from(APPS))}}}
    if kind == "network":
        return {"network": draw(st.sampled_from(NETWORKS))}
    cidr, excepts = draw(st.sampled_from(CIDRS))
    return {"cidr": cidr, "notCIDR": list(excepts)} if excepts else {"cidr": cidr}


@st.composite
def rules(draw, direction):
    out = {"action": draw(st.sampled_from(["allow", "deny", "log"]))}
    proto = draw(st.sampled_from([None, "tcp", "udp", "icmp", "icmpv6"]))
    if proto:
        out["protocol"] = proto
    if proto in ("tcp", "udp") and draw(st.booleans()):
        ports = draw(st.lists(st.sampled_from([80, 81, "80:90", "8000:8010", 9000, 22]), min_size=1, max_size=10))
        out["ports"] = ports
    if draw(st.booleans()):
        out["from" if direction == "Ingress" else "to"] = [_peer(draw) for _ in range(draw(st.integers(1, 3)))]
    return out


@st.composite
def policies(draw):
    out = []
    for i in range(draw(st.integers(0, 4))):
        types = draw(st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
        selector = draw(st.sampled_from([{}, {"matchLabels": {"app": "web"}}, {"matchLabels": {"app": "db"}}]))
        spec = {"order": draw(st.sampled_from([1, 2, 1000])), "selector": selector, "types": types}
        for direction in types:
            spec[direction.lower()] = [draw(rules(direction)) for _ in range(draw(st.integers(0, 4)))]
        doc = {"apiVersion": "netplugin/v1", "kind": "Policy", "metadata": {"name": f"p{i}"}, "spec": spec}
        out.append(Policy.from_dict(doc))
    return out


@st.composite
def packets(draw):
    peer = draw(st.sampled_from(PEERS))
    version = ipaddress.ip_address(peer).version
    proto = draw(st.sampled_from(["tcp", "udp", "icmp"]))
    if proto == "icmp":
        return peer, 1 if version == 4 else 58, 0, False
    return peer, PROTOCOLS[proto], draw(st.sampled_from([22, 80, 85, 8005, 9000, 443])), True


# --- the oracle: the model's semantics ------------------------------------------------------------------------


def _peer_holds(peer, ip, everyone):
    if peer.selector is not None:
        return any(ip in _addrs(e) for e in everyone if peer.selector.matches(e.labels))
    if peer.network is not None:
        return any(ip in _addrs(e) for e in everyone if e.network == peer.network)
    a = ipaddress.ip_address(ip)
    net = ipaddress.ip_network(peer.cidr)
    return a.version == net.version and a in net and not any(a in ipaddress.ip_network(x) for x in peer.not_cidr)


def _addrs(ep):
    return {a.split("/")[0] for a in ep.addresses}


def _matches(rule, ip, proto, dport, everyone):
    if rule.protocol is not None and PROTOCOLS.get(rule.protocol, rule.protocol) != proto:
        return False
    if rule.ports and not any(lo <= dport <= hi for lo, hi in rule.ports):
        return False
    return rule.peers is None or any(_peer_holds(p, ip, everyone) for p in rule.peers)


def oracle(ep, direction, ip, proto, dport, everyone, pols):
    """(verdict, logs) for traffic of ``ep`` in ``direction`` with peer ``ip``."""
    selecting = [p for p in sorted(pols, key=lambda p: (p.order, p.name)) if p.selector.matches(ep.labels)]
    declared = [p for p in selecting if direction in p.types]
    if not declared:
        if direction == "Egress" or any(ip in _addrs(e) for e in everyone if e.network == ep.network):
            return "allow", 0
        return ("deny" if any(ip in _addrs(e) for e in everyone) else "allow"), 0
    logs = 0
    for _, group in itertools.groupby(declared, key=lambda p: p.order):
        hits = [r.action for p in group for r in p.rules(direction) if _matches(r, ip, proto, dport, everyone)]
        logs += hits.count("log")
        if "deny" in hits:
            return "deny", logs
        if "allow" in hits:
            return "allow", logs
    return "deny", logs


VERDICT = {records.ACT_ALLOW: "allow", records.ACT_DENY: "deny"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(endpoints(), policies(), st.lists(packets(), min_size=1, max_size=12), st.integers(0, 1))
def test_rendered_maps_give_the_models_verdict(eps, pols, pkts, slot):
    local = eps[: max(1, len(eps) // 2)]
    rendered = {lists.id: lists for lists in render(compile_ruleset(local, eps, pols))}
    assert set(rendered) == {e.id for e in local}
    for n, ep in enumerate(local):
        lists = rendered[ep.id]
        assert lists.problem is None
        map_id = 100 + n
        rules_map, peers_map = lists.entries(map_id, slot)
        for direction, d in (("Ingress", records.DIR_INGRESS), ("Egress", records.DIR_EGRESS)):
            value = rules_map[records.rules_key(map_id, d, slot)]
            for ip, proto, dport, ports_ok in pkts:
                bits = records.lpm_bits(peers_map, map_id, d, slot, ip)
                action, logs = records.walk_rules(value, bits, proto, dport, ports_ok)
                want = oracle(ep, direction, ip, proto, dport, eps, pols)
                assert (VERDICT[action], logs) == want, (ep, direction, ip, proto, dport)


def _policy(body, name="p"):
    return Policy.from_dict({"apiVersion": "netplugin/v1", "kind": "Policy", "metadata": {"name": name}, "spec": body})


A = Endpoint("ep-a", "np0000000000a", ["10.0.0.1", "fd00::1"], "blue", {"app": "web"})


def test_more_than_64_rules_is_a_problem_not_a_truncated_list():
    many = [{"action": "allow", "protocol": "tcp", "ports": [p]} for p in range(1, 66)]
    lists = render(compile_ruleset([A], [A], [_policy({"selector": {}, "ingress": many})]))
    assert lists[0].problem and "64" in lists[0].problem and lists[0].lists == {}
    fits = render(compile_ruleset([A], [A], [_policy({"selector": {}, "ingress": many[:64]})]))
    assert fits[0].problem is None and len(fits[0].lists[records.DIR_INGRESS].rules) == 64


def test_port_lists_split_into_rules_of_eight_ranges():
    ports = list(range(1000, 1020))
    lists = render(
        compile_ruleset(
            [A], [A], [_policy({"selector": {}, "ingress": [{"action": "allow", "protocol": "tcp", "ports": ports}]})]
        )
    )
    assert len(lists[0].lists[records.DIR_INGRESS].rules) == 3


def test_sctp_ports_stay_with_iptables():
    rule = {"action": "allow", "protocol": "sctp", "ports": [80]}
    lists = render(compile_ruleset([A], [A], [_policy({"selector": {}, "ingress": [rule]})]))
    assert "sctp" in lists[0].problem


def test_ten_thousand_cidrs_are_one_entry_each():
    cidrs = [{"cidr": f"10.{i // 256}.{i % 256}.0/24"} for i in range(10000)]
    pol = _policy({"selector": {}, "ingress": [{"action": "allow", "from": cidrs}]})
    lst = render(compile_ruleset([A], [A], [pol]))[0].lists[records.DIR_INGRESS]
    # the compiler merges adjacent /24s into larger CIDRs; every one is a single trie entry with bit 0
    assert 0 < len(lst.peers) <= 10000 and set(lst.peers.values()) == {1}


def test_fold_ors_covering_prefixes_into_each_entry():
    def n(text):
        net = ipaddress.ip_network(text)
        return int(net.network_address), net.prefixlen

    owned = {n("::ffff:10.0.0.0/104"): 1, n("::ffff:10.1.0.0/112"): 2, n("::ffff:10.1.2.0/120"): 4}
    owned.update({n("::ffff:11.0.0.0/104"): 8, n("::/0"): 16, n("::ffff:10.2.0.0/112"): 32})
    assert fold(owned) == {
        n("::/0"): 16,
        n("::ffff:10.0.0.0/104"): 17,
        n("::ffff:10.1.0.0/112"): 19,
        n("::ffff:10.1.2.0/120"): 23,
        n("::ffff:10.2.0.0/112"): 49,
        n("::ffff:11.0.0.0/104"): 24,
    }


def test_a_cache_shares_lists_and_keeps_only_what_the_last_ruleset_used():
    b = Endpoint("ep-b", "np0000000000b", ["10.0.0.2"], "blue", {"app": "web"})
    pol = _policy({"selector": {}, "ingress": [{"action": "allow", "from": [{"cidr": "192.0.2.0/24"}]}]})
    cache = {}
    first = render(compile_ruleset([A, b], [A, b], [pol]), cache)
    assert first[0].lists[records.DIR_INGRESS] is first[1].lists[records.DIR_INGRESS]
    assert len(cache) == 2  # one ingress list, one egress list
    again = render(compile_ruleset([A, b], [A, b], [pol]), cache)
    assert again[0].lists == first[0].lists and len(cache) == 2
    render(compile_ruleset([A, b], [A, b], []), cache)
    # blue's same-network default and the egress default; the policy's list is gone
    assert len(cache) == 2 and all(v is not first[0].lists[records.DIR_INGRESS] for v in cache.values())


def test_an_ipv6_any_does_not_cover_ipv4_peers():
    """::/0 holds the IPv4-mapped range the trie keeps IPv4 in: an IPv6-only "any" must leave it out."""
    pol = _policy({"selector": {}, "ingress": [{"action": "deny", "from": [{"cidr": "::/0"}]}, {"action": "allow"}]})
    lst = render(compile_ruleset([A], [A], [pol]))[0]
    rules_map, peers_map = lst.entries(7, 0)
    value = rules_map[records.rules_key(7, records.DIR_INGRESS)]
    for ip, want in (("192.0.2.1", records.ACT_ALLOW), ("2001:db8::1", records.ACT_DENY)):
        bits = records.lpm_bits(peers_map, 7, records.DIR_INGRESS, 0, ip)
        assert records.walk_rules(value, bits, 6, 80, True)[0] == want, ip
