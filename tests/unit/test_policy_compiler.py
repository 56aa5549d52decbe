"""The compiler: chain structure, rule order, sets, determinism and scale."""

import dataclasses
import ipaddress
import json
import random

import pytest

from netplugin.errors import InvalidInput
from policy.compiler import FROM_DISPATCH, TO_DISPATCH, compile_ruleset, policy_chain, set_name
from policy.loader import load_text
from policy.model import Endpoint
from policy.selector import Selector

A = Endpoint("ep-a", "np0000000000a", ["10.65.0.1", "fd00::1"], "blue", {"app": "web"})
B = Endpoint("ep-b", "np0000000000b", ["10.65.0.2/32"], "blue", {"app": "client"})
C = Endpoint("ep-c", "", ["10.65.1.3"], "red", {"role": "client"})  # remote: no veth here


def policies(*bodies):
    docs = [
        f"apiVersion: netplugin/v1\nkind: Policy\nmetadata: {{name: {name}}}\nspec:\n{body}\n" for name, body in bodies
    ]
    return load_text("---\n".join(docs))


def dump(rs):
    return json.dumps(
        {"sets": [dataclasses.asdict(s) for s in rs.ipsets], "chains": rs.chains, "hooks": rs.hooks}, sort_keys=True
    )


def sets_of(rs, kind, family=4):
    return {s.name: s.members for s in rs.ipsets if s.name.startswith(f"np-{kind}-") and s.family == family}


def test_default_ruleset_structure():
    rs = compile_ruleset([A, B], [C], [])
    to_a, from_a = rs.endpoint_chains("ep-a")
    # A and B have one shape (same network, no policy): they share their chains and one dispatch set.
    assert rs.endpoint_chains("ep-b") == (to_a, from_a)
    for family in (4, 6):
        chains = rs.chains[family]
        assert rs.hooks[family] == {"FORWARD": "np-FORWARD", "INPUT": "np-INPUT"}
        assert set(chains) == {
            "np-FORWARD",
            "np-INPUT",
            "np-fw-ep",
            "np-in-ep",
            FROM_DISPATCH,
            TO_DISPATCH,
            to_a,
            from_a,
        }
        assert all(name.startswith("np-") and len(name) <= 28 for name in chains)
        # Connections our chains accepted skip them from their second packet on (the connmark bit).
        assert chains["np-FORWARD"] == (
            "-m connmark --mark 0x40000/0x40000 -j ACCEPT",
            "-i np+ -g np-fw-ep",
            "-o np+ -g np-fw-ep",
        )
        assert chains["np-fw-ep"][0] == "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        assert chains["np-fw-ep"][-2:] == ("-j CONNMARK --set-xmark 0x40000/0x40000", "-j ACCEPT")
        [veths] = [s for s in rs.ipsets if s.name.startswith("np-ep-") and s.family == family]
        assert veths.set_type == "hash:net,iface"
        assert chains[FROM_DISPATCH] == (f"-m set --match-set {veths.name} src,src -g {from_a}", "-j DROP")
        assert chains[TO_DISPATCH] == (f"-m set --match-set {veths.name} dst,dst -g {to_a}", "-j DROP")
        # Default egress: everything; default ingress: own network yes, other endpoints no, the rest yes.
        assert chains[from_a] == ()
        net = set_name("net", family, "blue")
        everyone = set_name("all", family, "")
        assert chains[to_a] == (f"-m set --match-set {net} src -j RETURN", f"-m set --match-set {everyone} src -j DROP")
    assert rs.chains[6]["np-in-ep"][1].startswith("-p ipv6-icmp -m icmp6 --icmpv6-type 133")
    assert not any("icmp6" in r for r in rs.chains[4]["np-in-ep"])
    assert rs.ipset_map()[set_name("all", 4, "")].members == ("10.65.0.1/32", "10.65.0.2/32", "10.65.1.3/32")
    assert rs.ipset_map()[set_name("net", 4, "blue")].members == ("10.65.0.1/32", "10.65.0.2/32")
    assert rs.ipset_map()[set_name("net", 6, "blue")].members == ("fd00::1/128",)
    assert {s.family: s.members for s in rs.ipsets if s.name.startswith("np-ep-")} == {
        4: ("10.65.0.1/32,np0000000000a", "10.65.0.2/32,np0000000000b"),
        6: ("fd00::1/128,np0000000000a",),
    }
    assert all(len(s.name) <= 31 for s in rs.ipsets)


def test_endpoints_of_one_shape_share_chains_so_another_changes_only_set_members():
    ps = policies(("web", "  selector: {matchLabels: {app: web}}\n  ingress: [{action: allow}]"))
    before = compile_ruleset([A, B], [C], ps)
    d = Endpoint("ep-d", "np0000000000d", ["10.65.0.4"], "blue", {"app": "web"})
    after = compile_ruleset([A, B, d], [C], ps)
    assert after.chains == before.chains
    assert after.endpoint_chains("ep-d") == after.endpoint_chains("ep-a") != after.endpoint_chains("ep-b")
    grown = {s.name for s in after.ipsets} - {s.name for s in before.ipsets}
    assert not grown and len(after.ipsets) == len(before.ipsets)
    [web] = [s for s in after.ipsets if s.family == 4 and "10.65.0.1/32,np0000000000a" in s.members]
    assert web.members == ("10.65.0.1/32,np0000000000a", "10.65.0.4/32,np0000000000d")
    # Another network is another default ingress: a new shape, with its own chain and dispatch rule.
    e = Endpoint("ep-e", "np0000000000e", ["10.65.1.5"], "red", {})
    third = compile_ruleset([A, B, e], [C], ps)
    to_e, from_e = third.endpoint_chains("ep-e")
    assert from_e == third.endpoint_chains("ep-b")[1] and to_e not in before.chains[4]
    assert len(third.chains[4][FROM_DISPATCH]) == len(before.chains[4][FROM_DISPATCH]) + 1


def test_policy_rules_order_marks_and_matches():
    ps = policies(
        (
            "web",
            """
  order: 100
  selector: {matchLabels: {app: web}}
  ingress:
    - {action: allow, protocol: tcp, ports: [80, "8000:8080"], from: [{selector: {matchLabels: {role: client}}}]}
    - {action: deny, protocol: udp, from: [{network: red}, {cidr: 192.0.2.0/24}, {cidr: 198.51.100.0/24}]}
    - {action: log}
    - {action: allow, protocol: icmp}""",
        )
    )
    rs = compile_ruleset([A, B], [C], ps)
    to_a, _ = rs.endpoint_chains("ep-a")
    pi = policy_chain("web", "Ingress")
    assert rs.chains[4][to_a] == (
        "-j MARK --set-xmark 0x0/0x30000",
        f"-j {pi}",
        "-m mark --mark 0x20000/0x20000 -j DROP",
        "-m mark --mark 0x10000/0x10000 -j RETURN",
        "-j DROP",
    )
    sel = set_name("sel", 4, Selector.of({"role": "client"}).key())
    red = set_name("net", 4, "red")
    [cidr] = sets_of(rs, "cidr")
    assert rs.chains[4][pi] == (
        '-j LOG --log-prefix "np-log web "',
        f"-p udp -m set --match-set {red} src -j MARK --set-xmark 0x20000/0x20000",
        f"-p udp -m set --match-set {cidr} src -j MARK --set-xmark 0x20000/0x20000",
        "-m mark --mark 0x20000/0x20000 -j RETURN",
        f"-p tcp -m multiport --dports 80,8000:8080 -m set --match-set {sel} src -j MARK --set-xmark 0x10000/0x10000",
        "-p icmp -j MARK --set-xmark 0x10000/0x10000",
    )
    assert sets_of(rs, "cidr")[cidr] == ("192.0.2.0/24", "198.51.100.0/24")
    assert rs.ipset_map()[sel].members == ("10.65.1.3/32",)
    # IPv6: no IPv4 CIDRs, no icmp; the selector and network sets exist (empty) in IPv6 too.
    v6 = rs.chains[6][pi]
    assert len(v6) == 4 and not any("icmp" in r for r in v6)
    assert rs.ipset_map()[set_name("sel", 6, Selector.of({"role": "client"}).key())].members == ()
    # B is not selected: default ingress.
    to_b, _ = rs.endpoint_chains("ep-b")
    assert rs.chains[4][to_b][0].endswith("src -j RETURN")


def test_groups_by_order_and_egress_uses_dst():
    ps = policies(
        ("p1", "  order: 10\n  selector: {}\n  types: [Egress]\n  egress: [{action: allow, to: [{cidr: 10.0.0.0/8}]}]"),
        ("p2", "  order: 10\n  selector: {matchLabels: {app: web}}\n  types: [Egress]\n  egress: [{action: deny}]"),
        ("p0", "  order: 20\n  selector: {}\n  types: [Egress]\n  egress: [{action: allow}]"),
    )
    rs = compile_ruleset([A, B], [], ps)
    _, from_a = rs.endpoint_chains("ep-a")
    _, from_b = rs.endpoint_chains("ep-b")
    po = {n: policy_chain(n, "Egress") for n in ("p0", "p1", "p2")}
    assert rs.chains[4][from_a] == (
        "-j MARK --set-xmark 0x0/0x30000",
        f"-j {po['p1']}",
        f"-j {po['p2']}",
        "-m mark --mark 0x20000/0x20000 -j DROP",
        "-m mark --mark 0x10000/0x10000 -j RETURN",
        f"-j {po['p0']}",
        "-m mark --mark 0x20000/0x20000 -j DROP",
        "-m mark --mark 0x10000/0x10000 -j RETURN",
        "-j DROP",
    )
    assert rs.chains[4][from_b].count(f"-j {po['p2']}") == 0
    [cidr] = sets_of(rs, "cidr")
    assert rs.chains[4][po["p1"]] == (f"-m set --match-set {cidr} dst -j MARK --set-xmark 0x10000/0x10000",)
    assert rs.chains[6][po["p1"]] == ()  # an IPv4-only rule must not become "any" in IPv6
    # Ingress keeps its default for both (types: Egress only).
    to_a, _ = rs.endpoint_chains("ep-a")
    assert rs.chains[4][to_a][0].endswith("src -j RETURN")


def test_not_cidr_is_exact_and_whole_space_needs_no_set():
    ps = policies(
        (
            "x",
            """
  selector: {}
  ingress:
    - {action: allow, from: [{cidr: 10.0.0.0/8, notCIDR: [10.1.0.0/16, 10.1.2.0/24]}, {cidr: 10.1.2.0/25}]}
    - {action: deny, from: [{cidr: 0.0.0.0/0}, {cidr: "::/0"}]}""",
        )
    )
    rs = compile_ruleset([A], [], ps)
    [(name, members)] = sets_of(rs, "cidr").items()
    covered = {ipaddress.ip_network(m) for m in members}

    def inside(ip):
        return any(ipaddress.ip_address(ip) in n for n in covered)

    assert inside("10.0.0.1") and inside("10.255.0.1") and inside("10.1.2.5")
    assert not inside("10.1.0.1") and not inside("10.1.2.200") and not inside("11.0.0.1")
    pi = policy_chain("x", "Ingress")
    assert rs.chains[4][pi][0] == "-j MARK --set-xmark 0x20000/0x20000"
    assert rs.chains[6][pi][0] == "-j MARK --set-xmark 0x20000/0x20000"


def test_many_ports_are_chunked_for_multiport():
    ports = ", ".join(str(p) for p in range(1000, 1020))  # 20 single ports: 15 + 5
    ps = policies(("ports", f"  selector: {{}}\n  ingress: [{{action: allow, protocol: udp, ports: [{ports}]}}]"))
    rules = compile_ruleset([A], [], ps).chains[4][policy_chain("ports", "Ingress")]
    assert [r.split("--dports ")[1].split()[0].count(",") + 1 for r in rules] == [15, 5]


def test_ten_thousand_cidrs_compile_to_one_set_and_one_rule():
    rng = random.Random(7)
    nets = sorted(
        {
            f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}/32"
            for _ in range(10500)
        }
    )[:10000]
    peers = ", ".join(f"{{cidr: {n}}}" for n in nets)
    ps = policies(("big", f"  selector: {{}}\n  ingress: [{{action: deny, from: [{peers}]}}, {{action: allow}}]"))
    rs = compile_ruleset([A, B], [], ps)
    cidr_sets = sets_of(rs, "cidr")
    assert len(cidr_sets) == 1 and len(next(iter(cidr_sets.values()))) == 10000
    chain = rs.chains[4][policy_chain("big", "Ingress")]
    assert len(chain) == 3  # deny via one set lookup, return-if-denied, allow
    assert sum("--match-set" in r for r in chain) == 1


def test_deterministic_whatever_the_input_order():
    ps = policies(
        (
            "a",
            "  order: 5\n  selector: {matchLabels: {app: web}}\n  ingress: [{action: allow, from: [{network: red}]}]",
        ),
        (
            "b",
            "  order: 5\n  selector: {}\n  egress: [{action: deny, to: [{cidr: 192.0.2.0/24}, {cidr: 2001:db8::/32}]}]",
        ),
        ("c", "  selector: {matchExpressions: [{key: app, operator: Exists}]}\n  ingress: [{action: log}]"),
    )
    d = Endpoint("ep-d", "np0000000000d", ["10.65.0.4", "fd00::4"], "red", {"app": "db"})
    first = compile_ruleset([A, B, d], [C], ps)
    for seed in range(5):
        rng = random.Random(seed)
        local, everyone, pols = [A, B, d], [C, A, d, B], list(ps)
        rng.shuffle(local), rng.shuffle(everyone), rng.shuffle(pols)
        again = compile_ruleset(local, everyone, pols)
        assert again == first and dump(again) == dump(first)
    assert list(first.chains[4]) == sorted(first.chains[4])
    assert [s.name for s in first.ipsets] == sorted(s.name for s in first.ipsets)


def test_equal_selectors_share_one_set():
    ps = policies(
        ("one", "  selector: {}\n  ingress: [{action: allow, from: [{selector: {matchLabels: {role: client}}}]}]"),
        (
            "two",
            "  selector: {}\n  ingress: [{action: allow, from: [{selector: {matchExpressions: "
            "[{key: role, operator: In, values: [client]}]}}]}]",
        ),
    )
    rs = compile_ruleset([A], [C], ps)
    assert len(sets_of(rs, "sel")) == 1


def test_log_prefix_fits_the_kernel_limit():
    name = "a-very-long-policy-name-that-goes-on"
    ps = policies((name, "  selector: {}\n  ingress: [{action: log}]"))
    [rule] = compile_ruleset([A], [], ps).chains[4][policy_chain(name, "Ingress")]
    prefix = rule.split('"')[1]
    assert len(prefix) <= 29 and prefix.startswith("np-log a-very-long") and prefix.endswith(" ")


@pytest.mark.parametrize(
    "local,everyone,message",
    [
        ([dataclasses.replace(A, host_ifname="eth0")], [], "has host interface 'eth0', expected 'np' and 11 hex"),
        ([A, dataclasses.replace(B, host_ifname=A.host_ifname)], [], "share host interface"),
        ([A], [dataclasses.replace(A, network="red")], "ep-a is given twice with different contents"),
        ([dataclasses.replace(A, addresses=["10.0.0.300"])], [], "endpoint ep-a has a bad address '10.0.0.300'"),
    ],
)
def test_bad_endpoints(local, everyone, message):
    with pytest.raises(InvalidInput, match=message):
        compile_ruleset(local, everyone, [])


def test_duplicate_policy_names():
    [p] = policies(("x", "  selector: {}"))
    with pytest.raises(InvalidInput, match="two policies are named x"):
        compile_ruleset([A], [], [p, p])


def test_marks_are_configurable_and_checked():
    from policy.compiler import CompileOptions

    ps = policies(("x", "  selector: {}\n  ingress: [{action: deny}]"))
    rs = compile_ruleset([A], [], ps, CompileOptions(allow_mark=0x100, deny_mark=0x200))
    assert rs.chains[4][policy_chain("x", "Ingress")] == ("-j MARK --set-xmark 0x200/0x200",)
    assert rs.chains[4]["np-fw-ep"][4] == "-j MARK --set-xmark 0x0/0x300"
    for bad in (
        {"allow_mark": 0x3},
        {"deny_mark": 0},
        {"allow_mark": 0x200, "deny_mark": 0x200},
        {"accepted_mark": 0x6},
    ):
        with pytest.raises(InvalidInput, match="mark"):
            CompileOptions(**bad)
