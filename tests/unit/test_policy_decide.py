"""The reference evaluator (policy.decide): hand-written cases of the semantics, and agreement with what the
compiled iptables rules do to a flow's first packet (a small interpreter of the Ruleset, fed by hypothesis)."""

import ipaddress
import shlex

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.compiler import FORWARD_CHAIN, INPUT_CHAIN, compile_ruleset
from policy.decide import ALLOW, DENY, Evaluator, Flow, decide
from policy.k8s import policy_labels
from policy.loader import load_text
from policy.model import PROTOCOLS, Endpoint, Peer, Policy, Rule
from policy.selector import Requirement, Selector

W = Endpoint("ep-w", "np0000000000a", ["10.65.0.1", "fd00::1"], "blue", {"app": "web"})
D = Endpoint("ep-d", "", ["10.65.0.2/32"], "blue", {"app": "db"})
C = Endpoint("ep-c", "np0000000000c", ["10.65.1.3"], "red", {"role": "client", "zone": "b"})
OUTSIDE = "192.0.2.7"


def policies(*bodies):
    docs = [
        f"apiVersion: netplugin/v1\nkind: Policy\nmetadata: {{name: {name}}}\nspec:\n{body}\n" for name, body in bodies
    ]
    return load_text("---\n".join(docs))


def verdicts(pols, *flows, eps=(W, D, C)):
    ev = Evaluator(eps, pols)
    return [ev.decide(Flow(*f)).allowed for f in flows]


def test_default_same_network_and_non_endpoints():
    got = decide([W, D, C], [], Flow("10.65.0.2", "10.65.0.1", "tcp", 80))
    assert (got.sender, got.receiver, got.egress, got.ingress, got.allowed) == ("ep-d", "ep-w", ALLOW, ALLOW, True)
    got = decide([W, D, C], [], Flow("10.65.1.3", "10.65.0.1", "udp", 53))
    assert (got.egress, got.ingress, got.allowed) == (ALLOW, DENY, False)  # other network: the receiver refuses
    got = decide([W, D, C], [], Flow(OUTSIDE, "10.65.1.3", "icmp"))
    assert (got.sender, got.egress, got.ingress) == (None, None, ALLOW)  # not an endpoint: the default admits it
    assert decide([W, D, C], [], Flow("10.65.0.1", OUTSIDE, "tcp", 443)).allowed


def test_order_then_deny_before_allow_then_default_drop():
    deny_b = "  order: {}\n  selector: {{matchLabels: {{app: web}}}}\n  ingress: [{{action: deny, from: [{{selector: {{matchLabels: {{zone: b}}}}}}]}}]"
    allow = "  order: 20\n  selector: {matchLabels: {app: web}}\n  ingress: [{action: log}, {action: allow}]"
    c_to_w, d_to_w = ("10.65.1.3", "10.65.0.1", "tcp", 80), ("10.65.0.2", "10.65.0.1", "tcp", 80)
    assert verdicts(policies(("a", deny_b.format(10)), ("b", allow)), c_to_w, d_to_w) == [False, True]
    assert verdicts(policies(("a", deny_b.format(30)), ("b", allow)), c_to_w, d_to_w) == [True, True]
    # At one order the deny wins whichever policy holds it; log rules decide nothing; unmatched means drop.
    assert verdicts(policies(("a", deny_b.format(20)), ("b", allow)), c_to_w) == [False]
    only_log = "  selector: {matchLabels: {app: web}}\n  ingress: [{action: log}]"
    assert verdicts(policies(("l", only_log)), d_to_w, (OUTSIDE, "10.65.0.1", "icmp")) == [False, False]


def test_protocols_ports_cidr_notcidr_and_networks():
    body = """  selector: {matchLabels: {app: web}}
  types: [Ingress, Egress]
  ingress:
    - {action: allow, protocol: tcp, ports: [80, "8000:8080"], from: [{network: red}]}
    - {action: allow, protocol: udp, from: [{cidr: 10.65.0.0/16, notCIDR: [10.65.1.0/24]}]}
    - {action: allow, protocol: icmpv6}
  egress:
    - {action: allow, protocol: 47, to: [{cidr: 192.0.2.0/24}]}"""
    pols = policies(("p", body))
    assert verdicts(
        pols,
        ("10.65.1.3", "10.65.0.1", "tcp", 80),
        ("10.65.1.3", "10.65.0.1", "tcp", 8080),
        ("10.65.1.3", "10.65.0.1", "tcp", 8081),
        ("10.65.1.3", "10.65.0.1", "udp", 53),  # udp: red is in the notCIDR
        ("10.65.0.2", "10.65.0.1", "udp", 53),
        ("10.65.0.2", "10.65.0.1", "icmp"),  # icmpv6 does not exist in IPv4
        ("fd00::9", "fd00::1", "icmpv6"),
        ("10.65.0.1", OUTSIDE, 47),
        ("10.65.0.1", OUTSIDE, "tcp", 80),
    ) == [True, True, False, False, True, False, True, True, False]


def test_cidr_edges_single_addresses_and_the_ends_of_ranges():
    # 10.65.0.0/30 minus 10.65.0.1/32 leaves .0 and .2-.3: D (.2) is a range's first address, .3 its last.
    body = """  selector: {matchLabels: {app: web}}
  ingress: [{action: allow, from: [{cidr: 10.65.0.0/30, notCIDR: [10.65.0.1/32]}, {cidr: 10.65.1.3/32}]}]"""
    pols = policies(("p", body))
    assert verdicts(
        pols,
        ("10.65.0.2", "10.65.0.1", "tcp", 80),
        ("10.65.0.3", "10.65.0.1", "tcp", 80),
        ("10.65.0.4", "10.65.0.1", "tcp", 80),
        ("10.65.1.3", "10.65.0.1", "tcp", 80),
        ("10.65.1.4", "10.65.0.1", "tcp", 80),
        ("10.65.1.2", "10.65.0.1", "tcp", 80),
    ) == [True, True, False, True, False, False]


def test_kubernetes_network_policy_through_the_translation():
    pols = load_text("""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-frontend, namespace: prod}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: frontend}}}]
      ports: [{protocol: TCP, port: 80}]
""")
    ns = "netplugin.io/namespace"
    api = Endpoint("k1", "np00000000001", ["10.65.2.1"], "blue", policy_labels({"app": "api", ns: "prod"}))
    front = Endpoint("k2", "", ["10.65.2.2"], "blue", policy_labels({"role": "frontend", ns: "prod"}))
    dev = Endpoint("k3", "", ["10.65.2.3"], "blue", policy_labels({"role": "frontend", ns: "dev"}))
    eps = (api, front, dev)
    assert verdicts(
        pols,
        ("10.65.2.2", "10.65.2.1", "tcp", 80),
        ("10.65.2.2", "10.65.2.1", "tcp", 8080),
        ("10.65.2.3", "10.65.2.1", "tcp", 80),
        ("10.65.2.1", "10.65.2.3", "tcp", 80),  # egress of the api pod is not declared
        eps=eps,
    ) == [True, False, False, True]


def test_ten_thousand_cidrs_cost_one_lookup_per_flow():
    cidrs = ", ".join(f"{{cidr: 172.{i // 256}.{i % 256}.0/24}}" for i in range(10000))
    pols = policies(
        ("big", f"  selector: {{matchLabels: {{app: web}}}}\n  ingress: [{{action: allow, from: [{cidrs}]}}]")
    )
    ev = Evaluator([W, D, C], pols)
    assert ev.decide(Flow("172.39.15.9", "10.65.0.1", "tcp", 80)).allowed
    assert not ev.decide(Flow("172.40.15.9", "10.65.0.1", "tcp", 80)).allowed


# --- agreement with the compiled rules ----------------------------------------------------------------------


class Packet:
    """A flow's first packet as netfilter sees it on this host: interfaces, addresses, protocol, port."""

    def __init__(self, flow, in_if, out_if):
        self.flow, self.in_if, self.out_if = flow, in_if, out_if
        self.src, self.dst = ipaddress.ip_address(flow.src), ipaddress.ip_address(flow.dst)
        self.mark = 0


def run_chain(ruleset, family, name, pkt, sets):
    """The verdict of chain ``name``: "ACCEPT", "DROP", or None (it returned). -g and -j as iptables does them."""
    for spec in ruleset.chains[family][name]:
        args = shlex.split(spec)
        target, goto = _target(args)
        if not _rule_matches(args, pkt, sets):
            continue
        if target in ("ACCEPT", "DROP"):
            return target
        if target == "RETURN":
            return None
        if target == "MARK":
            value, mask = (int(x, 16) for x in args[args.index("--set-xmark") + 1].split("/"))
            pkt.mark = (pkt.mark & ~mask) ^ value
            continue
        if target in ("LOG", "CONNMARK"):
            continue
        verdict = run_chain(ruleset, family, target, pkt, sets)
        if goto or verdict is not None:
            return verdict
    return None


def _target(args):
    for flag in ("-j", "-g"):
        if flag in args:
            return args[args.index(flag) + 1], flag == "-g"
    raise AssertionError(f"no target in {args}")


def _rule_matches(args, pkt, sets):
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-j", "-g"):
            return True
        if a in ("-i", "-o"):
            name = pkt.in_if if a == "-i" else pkt.out_if
            want = args[i + 1]
            if not (name.startswith(want[:-1]) if want.endswith("+") else name == want):
                return False
            i += 2
        elif a == "-p":
            if PROTOCOLS.get(args[i + 1].replace("ipv6-icmp", "icmpv6"), None) != pkt.flow.number:
                if not (args[i + 1].isdigit() and int(args[i + 1]) == pkt.flow.number):
                    return False
            i += 2
        elif a == "-m":
            i += 2
        elif a == "--ctstate":  # a first packet is NEW
            return False
        elif a == "--mark" and args[i - 1] == "connmark":
            return False  # a new connection carries no mark
        elif a == "--mark":
            value, mask = (int(x, 16) for x in args[i + 1].split("/"))
            if pkt.mark & mask != value:
                return False
            i += 2
        elif a == "--match-set":
            if not _in_set(sets[args[i + 1]].members, args[i + 2], pkt):
                return False
            i += 3
        elif a == "--dports":
            port = pkt.flow.dst_port
            ranges = [tuple(map(int, (p + ":" + p).split(":")[:2])) for p in args[i + 1].split(",")]
            if port is None or not any(lo <= port <= hi for lo, hi in ranges):
                return False
            i += 2
        elif a == "--icmpv6-type":
            return False  # our flows are never neighbour discovery
        else:
            raise AssertionError(f"the interpreter does not know {a} in {args}")
    raise AssertionError(f"no target in {args}")


def _in_set(members, flags, pkt):
    """hash:net ("src"/"dst": the address) or hash:net,iface ("src,src": source and in-interface, "dst,dst":
    destination and out-interface) membership."""
    addr = pkt.src if flags.startswith("src") else pkt.dst
    if "," not in flags:
        return any(addr in ipaddress.ip_network(m) for m in members)
    iface = pkt.in_if if flags.startswith("src") else pkt.out_if
    return any(addr in ipaddress.ip_network(net) and iface == name for net, name in (m.split(",", 1) for m in members))


def compiled_verdict(ruleset, pkt):
    family = pkt.src.version
    hook = FORWARD_CHAIN if pkt.out_if != "host" else INPUT_CHAIN
    verdict = run_chain(ruleset, family, hook, pkt, ruleset.ipset_map())
    return verdict != "DROP"  # a return falls to the built-in chain's ACCEPT policy


NETS = ("blue", "red")
V4 = [f"10.1.0.{i}" for i in range(1, 7)]
V6 = [f"fd00::{i}" for i in range(1, 7)]
OTHERS = ["10.1.0.99", "192.0.2.7", "2001:db8::7"]
PORTS = (3, 7, 8, 30)
CIDRS = {
    "10.1.0.0/24": ["10.1.0.0/30", "10.1.0.4/31", "10.1.0.2/32"],
    "10.1.0.0/29": ["10.1.0.4/30"],
    "10.0.0.0/8": ["10.1.0.0/24"],
    "0.0.0.0/0": ["10.0.0.0/8"],
    "192.0.2.0/24": [],
    "10.1.0.3/32": [],
    "10.1.0.1/32": [],
    "10.1.0.2/31": ["10.1.0.3/32"],
    "10.1.0.4/30": ["10.1.0.5/32"],
    "fd00::2/127": [],
    "fd00::/64": ["fd00::/126"],
    "::/0": [],
}
labels_st = st.dictionaries(st.sampled_from(["app", "zone"]), st.sampled_from(["a", "b"]), max_size=2)
selector_st = st.builds(
    lambda labels, expr: Selector.of(labels, expr),
    st.dictionaries(st.sampled_from(["app", "zone"]), st.sampled_from(["a", "b"]), max_size=1),
    st.lists(
        st.one_of(
            st.builds(Requirement, st.sampled_from(["app", "zone"]), st.just("NotIn"), st.just(("a",))),
            st.builds(Requirement, st.sampled_from(["app", "zone"]), st.sampled_from(["Exists", "DoesNotExist"])),
        ),
        max_size=1,
    ),
)
peer_st = st.one_of(
    st.builds(Peer, selector=selector_st),
    st.builds(Peer, network=st.sampled_from(NETS)),
    st.sampled_from([(c, ()) for c in CIDRS] + [(c, (e,)) for c, excepts in CIDRS.items() for e in excepts]).map(
        lambda c: Peer(cidr=c[0], not_cidr=c[1])
    ),
)


@st.composite
def rule_st(draw):
    protocol = draw(st.sampled_from([None, "tcp", "udp", "icmp", "icmpv6", "sctp", 47]))
    ports = ()
    if protocol in ("tcp", "udp", "sctp") and draw(st.booleans()):
        ranges = draw(st.lists(st.tuples(st.sampled_from(PORTS), st.sampled_from(PORTS)), min_size=1, max_size=4))
        ports = tuple(sorted({(min(r), max(r)) for r in ranges}))
    peers = draw(st.none() | st.lists(peer_st, min_size=1, max_size=3).map(tuple))
    return Rule(action=draw(st.sampled_from(["allow", "deny", "log"])), protocol=protocol, ports=ports, peers=peers)


@st.composite
def world_st(draw):
    n = draw(st.integers(2, 5))
    eps = []
    for i in range(n):
        addrs = [V4[i]] + ([V6[i]] if draw(st.booleans()) else [])
        local = i < 3
        eps.append(
            Endpoint(f"ep-{i}", f"np{i:011x}" if local else "", addrs, draw(st.sampled_from(NETS)), draw(labels_st))
        )
    pols = []
    for k in range(draw(st.integers(1, 3))):
        types = draw(st.sampled_from([("Ingress",), ("Egress",), ("Ingress", "Egress")]))
        pols.append(
            Policy(
                name=f"p{k}",
                selector=draw(selector_st),
                order=draw(st.sampled_from([10, 20])),
                types=types,
                ingress=tuple(draw(st.lists(rule_st(), max_size=3))) if "Ingress" in types else (),
                egress=tuple(draw(st.lists(rule_st(), max_size=3))) if "Egress" in types else (),
            )
        )
    return eps, pols


def flows_of(eps, family):
    """Every flow between the addresses of a family (endpoints and not), in a few protocols and ports."""
    addrs = [a.split("/")[0] for ep in eps for a in ep.addresses if ipaddress.ip_interface(a).version == family]
    addrs += [a for a in OTHERS if ipaddress.ip_address(a).version == family]
    for src in addrs:
        for dst in addrs:
            for protocol in ("tcp", "udp", "sctp", "icmp" if family == 4 else "icmpv6", 47):
                for port in PORTS if protocol in ("tcp", "udp", "sctp") else (None,):
                    yield Flow(src, dst, protocol, port)


def _local_at(eps, addr):
    return next((e for e in eps if e.host_ifname and addr in [a.split("/")[0] for a in e.addresses]), None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world_st(), st.sampled_from([4, 6]))
def test_the_evaluator_agrees_with_the_compiled_rules(world, family):
    eps, pols = world
    local = [e for e in eps if e.host_ifname]
    ruleset = compile_ruleset(local, eps, pols)
    ev = Evaluator(eps, pols)
    for flow in flows_of(eps, family):
        sender, receiver = _local_at(eps, flow.src), _local_at(eps, flow.dst)
        if sender is None and receiver is None:
            continue  # nothing of this host's polices it
        decision = ev.decide(flow)
        want = (sender is None or decision.egress == ALLOW) and (receiver is None or decision.ingress == ALLOW)
        pkt = Packet(flow, sender.host_ifname if sender else "eth0", receiver.host_ifname if receiver else "eth1")
        assert compiled_verdict(ruleset, pkt) == want, (flow, decision, ruleset.chains[family])
        if sender is not None and receiver is None:  # the same flow to the host itself: egress only (INPUT)
            pkt = Packet(flow, sender.host_ifname, "host")
            assert compiled_verdict(ruleset, pkt) == (decision.egress == ALLOW), (flow, decision)


def test_the_interpreter_can_tell_allow_from_deny():
    """The agreement test proves nothing if the interpreter passes everything: it drops what the rules drop."""
    pols = policies(("p", "  selector: {matchLabels: {app: web}}\n  ingress: [{action: allow, protocol: udp}]"))
    rs = compile_ruleset([W, C], [W, D, C], pols)
    assert not compiled_verdict(rs, Packet(Flow("10.65.0.2", "10.65.0.1", "tcp", 80), "eth0", W.host_ifname))
    assert compiled_verdict(rs, Packet(Flow("10.65.0.2", "10.65.0.1", "udp", 80), "eth0", W.host_ifname))
    assert not compiled_verdict(rs, Packet(Flow("10.65.0.1", "10.65.1.3", "udp", 80), W.host_ifname, C.host_ifname))
