"""Compile endpoints and policies into ipsets and iptables filter chains: a pure, deterministic function.

Semantics
---------
* No policy: endpoints on one network talk freely; different networks cannot. Isolation is enforced on the
  receiving side: an endpoint's default *ingress* accepts sources in its own network and any non-endpoint address
  (the host, the outside) and drops other endpoints; its default *egress* accepts everything. So one ingress
  policy on the receiver is enough to open a cross-network flow.
* A policy that selects an endpoint replaces that default for each direction in its ``types``: there, traffic
  matched by no rule of any selecting policy is dropped.
* Policies run in ``order`` (lower first, then by name). Within one order, ``log`` rules of all its policies come
  first (they log and go on), then ``deny`` (deny wins at equal order), then ``allow``.
* Established flows keep flowing after a policy change unless it revokes them. The chains judge a connection's
  first packet; conntrack (ESTABLISHED, RELATED) lets the rest through, replies included, whatever the reverse
  direction's policy says. A connection our chains accepted carries a conntrack mark bit (``accepted_mark``),
  and the first rule of np-FORWARD accepts its later packets at once: on a forwarded packet's path that rule is
  most of what policy costs (see docs/benchmarks/datapath-diagnosis.md). Only connections our policy let through
  are marked, so other writers' traffic keeps meeting their own rules. After an apply that changed something
  (and on every full resync) the iptables backend deletes the conntrack entries of connections the new policy
  denies, judged in their original direction by ``policy.decide`` (``policy.revoke``; entries with NAT are left
  alone), so their next packet meets the new rules and is dropped. ``policy.decide`` is these semantics in
  Python; a unit test proves these chains mean the same.
* Covered traffic: forwarded traffic to or from a local endpoint (FORWARD) and an endpoint's traffic to the host
  itself (INPUT, egress policy only; IPv6 neighbour discovery always passes). Traffic from the host to its local
  endpoints (OUTPUT) is not policed, so health probes keep working.

Chains (one set per IP family; the iptables ``filter`` table; everything is prefixed ``np-``)::

    FORWARD -> np-FORWARD:   connmark accepted -> ACCEPT; -i np+ / -o np+  -g np-fw-ep
    np-fw-ep:   ESTABLISHED,RELATED accept; INVALID drop; -i np+ -j np-from-disp; -o np+ -j np-to-disp;
                clear our mark bits; set the connmark accepted bit; ACCEPT
    INPUT -> np-INPUT:       -i np+ -g np-in-ep
    np-in-ep:   ESTABLISHED,RELATED return; (v6: ND return); -j np-from-disp; clear mark bits; (return)
    np-from-disp / np-to-disp:  per endpoint shape, its set of veths -> -g np-from-<h> / np-to-<h>; then DROP
                                (an np* interface we do not know is not let through)
    np-to-<h>   (ingress of one shape) / np-from-<h> (its egress): either the default, or
                clear mark; per order group: -j np-pi-<p>... ; deny-mark -> DROP; allow-mark -> RETURN; ...; DROP
    np-pi-<p> / np-po-<p>  (a policy's ingress / egress rules): each rule sets the deny or allow mark bit,
                or LOGs with prefix "np-log <policy> "

The semantics are decided once, in a dataplane-neutral plan (``Ruleset.plan``: per local endpoint and direction
the selecting policies by order group, or the default's rules; ``Ruleset.policy_rules``: each policy's rules in
evaluation order with their peers as sets), and the chains are rendered from it; the eBPF dataplane renders its
maps from the same plan (policy/bpf_render.py).

A verdict crosses chains in two mark bits (``CompileOptions``) rather than by ACCEPT, because a packet between
two local endpoints must pass the sender's egress *and* the receiver's ingress.

Endpoints with the same *shape* share their chains: an endpoint's ingress chain depends only on the policies
selecting it for Ingress (or, with none, on its network), its egress chain only on those selecting it for Egress.
The dispatch chains jump once per shape, through a ``hash:net,iface`` set ``np-ep-<h>`` holding ``<address>,<veth>``
for each address of each local endpoint of that shape, matched ``src,src`` (from that address on that veth) or
``dst,dst`` (to it, out of it). That is ``-i <veth>`` / ``-o <veth>`` for every packet anti-spoofing lets
through from a container, except IPv6 link-local ones to the host beyond neighbour discovery (MLD, a ping to the
gateway's fe80 address): those now meet the final DROP. ``0.0.0.0/0,<veth>`` would keep them, but the kernel
does not hash the interface part of a member, so more than 64 members with one address do not fit. So a container starting
with a shape that exists changes only set members, which the applier writes by netlink from its own process (no
iptables-restore, no ipset process on ADD's path; see policy/applier.py); a new shape adds two chains and two
dispatch rules. Why, measured with scripts/bench_cni.py on this 2-core machine: with a chain per endpoint,
every ADD rewrote both dispatch chains and added two chains (an ``ipset restore`` and one ``iptables-restore``
per family), 33 ms of a 67 ms ADD (median); with shared chains and netlink members the policy step is 0.6 ms.
A long-lived ``iptables-restore --noflush`` fed batches was the other way to avoid a process per ADD: it
acknowledges nothing when it commits (success is silent until the next read-back) and exits at the first bad
line, so each ADD would still need a process to learn that its rules are in.

Address sets are ``hash:net`` per family: ``np-all-<h>`` (every endpoint address), ``np-net-<h>`` (a network's
endpoints), ``np-sel-<h>`` (a selector's endpoints, named from its canonical form, so shared across policies),
``np-cidr-<h>`` (the union of one rule's CIDR peers minus their notCIDRs, computed exactly; named from its
content). A rule costs a packet one set lookup per peer kind however many addresses it covers.
"""

import functools
import hashlib
import ipaddress
import itertools
import re
from dataclasses import dataclass, field

import netaddr

from netplugin.errors import InvalidInput
from netplugin.kernel.ipset import IFACE_SET, SET_FAMILY, SET_TYPE
from netplugin.kernel.netfilter import PREFIX

FAMILIES = (4, 6)
IFACE_WILDCARD = "np+"
MAX_CHAIN_NAME = 28
MAX_SET_NAME = 31
HOST_IFNAME = re.compile(r"^np[0-9a-f]{11}$")

FORWARD_CHAIN = "np-FORWARD"
INPUT_CHAIN = "np-INPUT"
FORWARD_EP_CHAIN = "np-fw-ep"
INPUT_EP_CHAIN = "np-in-ep"
FROM_DISPATCH = "np-from-disp"
TO_DISPATCH = "np-to-disp"
HOOKS = {"FORWARD": FORWARD_CHAIN, "INPUT": INPUT_CHAIN}

_ACTION_RANK = {"log": 0, "deny": 1, "allow": 2}
_MULTIPORT_MAX = 15
_ND_TYPES = (133, 135, 136)  # router solicitation, neighbour solicitation/advertisement


@dataclass(frozen=True)
class CompileOptions:
    """Two fwmark bits carry verdicts between chains, one conntrack mark bit marks connections our policy
    accepted; pick bits nothing else on the host uses."""

    allow_mark: int = 0x10000
    deny_mark: int = 0x20000
    accepted_mark: int = 0x40000  # in the connection's mark (CONNMARK), not the packet's

    def __post_init__(self):
        for mark in (self.allow_mark, self.deny_mark, self.accepted_mark):
            if not isinstance(mark, int) or mark <= 0 or mark > 0xFFFFFFFF or mark & (mark - 1):
                raise InvalidInput(f"policy mark {mark!r} is not a single bit of a 32-bit fwmark")
        if self.allow_mark == self.deny_mark:
            raise InvalidInput("policy allow and deny marks must be different bits")

    @property
    def mask(self):
        return self.allow_mark | self.deny_mark


@dataclass(frozen=True)
class IpSet:
    name: str
    family: int
    members: tuple  # canonical network texts ("10.0.0.5/32"), sorted; "10.0.0.5/32,<veth>" for IFACE_SET
    set_type: str = SET_TYPE

    @property
    def set_family(self):
        return SET_FAMILY[self.family]


@dataclass(frozen=True)
class PlanRule:
    """One rule as every dataplane must apply it, in evaluation order.

    ``peers`` maps each family the rule exists in to None (any peer of that family) or the names of the sets
    (``Ruleset.ipsets``) holding its peers; a family missing from it has nothing this rule names (the rule is
    skipped there). ``protocol`` and ``ports`` are the model's (``policy.model.Rule``)."""

    action: str
    protocol: object
    ports: tuple
    peers: dict
    policy: str


@dataclass(frozen=True)
class DirectionPlan:
    """What one local endpoint's traffic in one direction meets, in order: either ``groups`` (the selecting
    policies by order group: within a group a matching deny beats a matching allow, and every matching log
    logs) or the fixed ``rules`` of the default; ``default`` ("allow" or "deny") when nothing decides."""

    groups: tuple = ()  # tuple of tuples of policy names (keys of Ruleset.policy_rules with the direction)
    rules: tuple = ()  # PlanRules of the default (same-network ingress)
    default: str = "allow"


@dataclass(frozen=True)
class EndpointPlan:
    id: str
    host_ifname: str
    ingress: DirectionPlan
    egress: DirectionPlan

    def direction(self, direction):
        return self.ingress if direction == "Ingress" else self.egress


@dataclass(frozen=True)
class Ruleset:
    """What one host's kernel should hold.

       ``chains[family][name]`` is the tuple of rule specs (iptables-restore syntax after ``-A <chain>``);
       ``hooks[family]`` maps each built-in chain we jump from to our chain; ``ipsets`` is sorted by name.
       ``plan`` (one EndpointPlan per local endpoint, by id) and ``policy_rules`` ((policy, direction) ->
       PlanRules) are the dataplane-neutral plan the chains are rendered from; the eBPF dataplane renders its
       maps from the same plan (policy/bpf_render.py).
       ``inputs`` is what it was compiled from, (local endpoints, all endpoints, policies), for dataplanes that
       judge flows with ``policy.decide`` (revoking established connections); it takes no part in equality.
       ``endpoints`` maps each local endpoint id to its (ingress chain, egress chain): endpoints of one
    shape share them (see _shape).
    """

    ipsets: tuple = ()
    chains: dict = field(default_factory=dict)
    hooks: dict = field(default_factory=dict)
    plan: tuple = ()
    policy_rules: dict = field(default_factory=dict)
    inputs: tuple = field(default=(), compare=False, repr=False)
    endpoints: dict = field(default_factory=dict)

    def ipset_map(self):
        return {s.name: s for s in self.ipsets}

    def endpoint_chains(self, endpoint_id):
        """(ingress chain, egress chain) of a local endpoint: the np-to-<h>, np-from-<h> of its shape."""
        return self.endpoints[endpoint_id]


def digest(*parts):
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()[:16]


def shape_chains(ingress, egress):
    """(ingress chain, egress chain) of an endpoint shape: np-to-<h> from its ingress key, np-from-<h> from its
    egress key (see the module docstring)."""
    return f"np-to-{digest('ingress', ingress)}", f"np-from-{digest('egress', egress)}"


def policy_chain(policy_name, direction):
    return ("np-pi-" if direction == "Ingress" else "np-po-") + digest("policy", policy_name)


def set_name(kind, family, key):
    return f"np-{kind}-{digest(kind, family, key)}"


def compile_ruleset(local_endpoints, all_endpoints, policies, options=None):
    """-> Ruleset for one host. ``local_endpoints`` have a host veth here; ``all_endpoints`` are cluster-wide
    (local ones are added if missing). Same input, same output, byte for byte."""
    return _Compiler(local_endpoints, all_endpoints, policies, options or CompileOptions()).run()


class _Compiler:
    def __init__(self, local_endpoints, all_endpoints, policies, options):
        self.options = options
        self.local = sorted(local_endpoints, key=lambda e: e.id)
        self.endpoints = _merge_endpoints(all_endpoints, self.local)
        self.addresses = {ep.id: _endpoint_networks(ep) for ep in self.endpoints.values()}
        self.policies = _check_policies(policies)
        self.sets = {}  # name -> IpSet
        self.owners = {}  # generated name -> what it stands for, to catch hash collisions
        self.cidr_spaces = {}  # id(rule) -> its CIDR peers merged (the rules live as long as this compiler)
        self.policy_rules = {}  # (policy name, direction) -> PlanRules
        self.shapes = {}  # local endpoint id -> (ingress key, egress key), see _shape

    def run(self):
        _check_local(self.local)
        plan = tuple(self._endpoint_plan(ep) for ep in self.local)
        self.shapes = {ep.id: self._shape(ep) for ep in self.local}
        chains, hooks = {}, {}
        for family in FAMILIES:
            chains[family] = self._family_chains(plan, family)
            hooks[family] = dict(sorted(HOOKS.items()))
        ipsets = tuple(self.sets[name] for name in sorted(self.sets))
        inputs = (tuple(self.local), tuple(self.endpoints.values()), tuple(self.policies))
        return Ruleset(
            ipsets=ipsets,
            chains=chains,
            hooks=hooks,
            plan=plan,
            policy_rules=dict(sorted(self.policy_rules.items())),
            inputs=inputs,
            endpoints={ep.id: shape_chains(*self.shapes[ep.id]) for ep in self.local},
        )

    # -- the plan -----------------------------------------------------------------------------------------

    def _endpoint_plan(self, ep):
        selecting = [p for p in self.policies if p.selector.matches(ep.labels)]
        out = {}
        for direction in ("Ingress", "Egress"):
            declared = [p for p in selecting if direction in p.types]
            if declared:
                for p in declared:
                    if (p.name, direction) not in self.policy_rules:
                        self.policy_rules[p.name, direction] = self._plan_rules(p, direction)
                groups = tuple(
                    tuple(p.name for p in group) for _, group in itertools.groupby(declared, key=lambda p: p.order)
                )
                out[direction] = DirectionPlan(groups=groups, default="deny")
            elif direction == "Ingress":
                out[direction] = DirectionPlan(rules=self._default_ingress_rules(ep), default="allow")
            else:
                out[direction] = DirectionPlan(default="allow")
        return EndpointPlan(ep.id, ep.host_ifname, out["Ingress"], out["Egress"])

    def _default_ingress_rules(self, ep):
        """Its own network's endpoints pass, other endpoints are dropped, everything else passes."""
        same = {f: (self._network_set(ep.network, f),) for f in FAMILIES}
        everyone = {
            f: (self._set("all", f, "", lambda f=f: [n for nets in self.addresses.values() for n in nets[f]]),)
            for f in FAMILIES
        }
        return (PlanRule("allow", None, (), same, ""), PlanRule("deny", None, (), everyone, ""))

    def _plan_rules(self, policy, direction):
        """log rules, then deny rules, then allow rules; file order within each; per family what exists."""
        ordered = sorted(policy.rules(direction), key=lambda r: _ACTION_RANK[r.action])
        out = []
        for rule in ordered:
            peers = {}
            for family in FAMILIES:
                if _protocol_match(rule.protocol, family) is None:
                    continue
                names = self._peer_sets(rule, family)
                if names is not False:
                    peers[family] = names
            if peers:
                out.append(PlanRule(rule.action, rule.protocol, tuple(rule.ports), peers, policy.name))
        return tuple(out)

    def _shape(self, ep):
        """(ingress key, egress key): what an endpoint's two chains are made of. Ingress: the names of the
        policies selecting it for Ingress, or its network (the default); egress: those for Egress, or nothing."""
        selecting = [p for p in self.policies if p.selector.matches(ep.labels)]
        ingress = tuple(p.name for p in selecting if "Ingress" in p.types)
        egress = tuple(p.name for p in selecting if "Egress" in p.types)
        return (("policies", ingress) if ingress else ("default", ep.network)), ("policies", egress)

    # -- chains -------------------------------------------------------------------------------------------

    def _family_chains(self, plan, family):
        o = self.options
        clear = f"-j MARK --set-xmark 0x0/{o.mask:#x}"
        accepted = f"{o.accepted_mark:#x}/{o.accepted_mark:#x}"
        chains = {
            FORWARD_CHAIN: (
                f"-m connmark --mark {accepted} -j ACCEPT",
                f"-i {IFACE_WILDCARD} -g {FORWARD_EP_CHAIN}",
                f"-o {IFACE_WILDCARD} -g {FORWARD_EP_CHAIN}",
            ),
            FORWARD_EP_CHAIN: (
                "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-m conntrack --ctstate INVALID -j DROP",
                f"-i {IFACE_WILDCARD} -j {FROM_DISPATCH}",
                f"-o {IFACE_WILDCARD} -j {TO_DISPATCH}",
                clear,
                f"-j CONNMARK --set-xmark {accepted}",
                "-j ACCEPT",
            ),
            INPUT_CHAIN: (f"-i {IFACE_WILDCARD} -g {INPUT_EP_CHAIN}",),
            INPUT_EP_CHAIN: (
                ("-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",)
                + tuple(f"-p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN" for t in _ND_TYPES if family == 6)
                + (f"-j {FROM_DISPATCH}", clear)
            ),
        }
        plans = {ep.id: ep for ep in plan}
        shapes = {}  # (ingress key, egress key) -> ("address,veth" of each local endpoint of that shape, its plan)
        for ep in self.local:
            members, _ = shapes.setdefault(self.shapes[ep.id], ([], plans[ep.id]))
            members.extend(f"{net},{ep.host_ifname}" for net in self.addresses[ep.id][family])
        dispatch = []
        policy_chains = {}
        for shape, (members, eplan) in shapes.items():
            to_chain, from_chain = shape_chains(*shape)
            self._claim(to_chain, ("ingress",) + shape[0])
            self._claim(from_chain, ("egress",) + shape[1])
            veth_set = self._set("ep", family, repr(shape), lambda members=members: members)
            dispatch.append((veth_set, from_chain, to_chain))
            for direction, chain in (("Ingress", to_chain), ("Egress", from_chain)):
                if chain in chains:
                    continue
                dplan = eplan.direction(direction)  # every endpoint of one shape has the same plan here
                if dplan.groups:
                    chains[chain] = self._policy_dispatch(dplan.groups, direction)
                    for group in dplan.groups:
                        for p in group:
                            name = policy_chain(p, direction)
                            if name not in policy_chains:
                                self._claim(name, ("policy", p, direction))
                                policy_chains[name] = self._policy_rules(p, direction, family)
                else:  # the default: each rule names one set per family
                    target = {"allow": "RETURN", "deny": "DROP"}
                    chains[chain] = tuple(
                        f"-m set --match-set {r.peers[family][0]} src -j {target[r.action]}" for r in dplan.rules
                    )
        dispatch.sort()
        chains[FROM_DISPATCH] = tuple(f"-m set --match-set {s} src,src -g {c}" for s, c, _ in dispatch) + ("-j DROP",)
        chains[TO_DISPATCH] = tuple(f"-m set --match-set {s} dst,dst -g {c}" for s, _, c in dispatch) + ("-j DROP",)
        chains.update(policy_chains)
        for name in chains:
            assert name.startswith(PREFIX) and len(name) <= MAX_CHAIN_NAME, name
        return dict(sorted(chains.items()))

    def _policy_dispatch(self, groups, direction):
        o = self.options
        rules = [f"-j MARK --set-xmark 0x0/{o.mask:#x}"]
        for group in groups:
            rules.extend(f"-j {policy_chain(p, direction)}" for p in group)
            rules.append(f"-m mark --mark {o.deny_mark:#x}/{o.deny_mark:#x} -j DROP")
            rules.append(f"-m mark --mark {o.allow_mark:#x}/{o.allow_mark:#x} -j RETURN")
        rules.append("-j DROP")
        return tuple(rules)

    def _policy_rules(self, policy_name, direction, family):
        """A policy chain rendered from its PlanRules: a deny sets the deny mark, and once some deny has run
        the chain returns before its first allow if the deny mark is set."""
        o = self.options
        side = "src" if direction == "Ingress" else "dst"
        out = []
        denies = allows = 0
        for rule in self.policy_rules[policy_name, direction]:
            if family not in rule.peers:
                continue  # nothing this rule names exists in this family
            proto = _protocol_match(rule.protocol, family)
            names = rule.peers[family]
            peers = [""] if names is None else [f"-m set --match-set {name} {side}" for name in names]
            if rule.action == "log":
                target = f'-j LOG --log-prefix "{log_prefix(policy_name)}"'
            elif rule.action == "deny":
                target = f"-j MARK --set-xmark {o.deny_mark:#x}/{o.deny_mark:#x}"
            else:
                if denies and not allows:
                    out.append(f"-m mark --mark {o.deny_mark:#x}/{o.deny_mark:#x} -j RETURN")
                target = f"-j MARK --set-xmark {o.allow_mark:#x}/{o.allow_mark:#x}"
            for ports in _port_matches(rule.ports):
                for peer in peers:
                    out.append(" ".join(part for part in (proto, ports, peer, target) if part))
            denies += rule.action == "deny"
            allows += rule.action == "allow"
        return tuple(out)

    def _peer_sets(self, rule, family):
        """None for any peer; the names of the sets holding the peers (any one must match); False if no peer
        exists in this family."""
        if rule.peers is None:
            return None
        names = []
        for peer in rule.peers:
            if peer.selector is not None:
                name = self._set(
                    "sel", family, peer.selector.key(), lambda sel=peer.selector: self._selected(sel, family)
                )
            elif peer.network is not None:
                name = self._network_set(peer.network, family)
            else:
                continue
            if name not in names:
                names.append(name)
        cidr_peers = [p for p in rule.peers if p.cidr is not None]
        if cidr_peers:
            nets = [str(c) for c in self._cidr_space(rule, cidr_peers) if c.version == family]
            if nets == ["0.0.0.0/0"] or nets == ["::/0"]:
                return None  # hash:net cannot hold /0, and "everything" needs no lookup
            if nets:
                names.append(self._set("cidr", family, ",".join(nets), lambda: nets))
        return tuple(names) if names else False

    def _cidr_space(self, rule, cidr_peers):
        """The exact union of a rule's CIDR peers as CIDRs, computed once for both families (the merge is most
        of the cost of compiling thousands of CIDRs)."""
        key = id(rule)
        if key not in self.cidr_spaces:
            self.cidr_spaces[key] = list(cidr_union(cidr_peers).iter_cidrs())
        return self.cidr_spaces[key]

    # -- sets -----------------------------------------------------------------------------------------------

    def _selected(self, selector, family):
        return [
            n for ep in self.endpoints.values() if selector.matches(ep.labels) for n in self.addresses[ep.id][family]
        ]

    def _network_set(self, network, family):
        return self._set(
            "net",
            family,
            network,
            lambda: [
                n for ep in self.endpoints.values() if ep.network == network for n in self.addresses[ep.id][family]
            ],
        )

    def _set(self, kind, family, key, members):
        """The set's name; ``members`` (a callable) runs only the first time a set is named. Kind "ep" is a set
        of address,veth pairs (IFACE_SET, members sorted as text), every other kind a set of networks."""
        name = set_name(kind, family, key)
        if name not in self.sets:
            self._claim(name, (kind, family, key))
            if kind == "ep":
                self.sets[name] = IpSet(name, family, tuple(sorted(set(members()))), IFACE_SET)
            else:
                nets = sorted({_network(m) for m in members()})
                self.sets[name] = IpSet(name=name, family=family, members=tuple(str(n) for n in nets))
        return name

    def _claim(self, name, owner):
        if self.owners.setdefault(name, owner) != owner:
            raise InvalidInput(
                f"compiling policy: name {name} stands for both {self.owners[name]} and {owner} (hash collision)"
            )


def cidr_union(cidr_peers):
    """The addresses a rule's CIDR peers cover, minus each peer's notCIDR exceptions, as one netaddr.IPSet: one
    IPSet from the plain CIDRs at once (unions in a loop are quadratic), then the few peers with exceptions."""
    space = netaddr.IPSet([p.cidr for p in cidr_peers if not p.not_cidr])
    for p in cidr_peers:
        if p.not_cidr:
            space |= netaddr.IPSet([p.cidr]) - netaddr.IPSet(p.not_cidr)
    return space


def log_prefix(policy_name):
    """Kernel log prefixes hold 29 characters: 'np-log ' + as much of the name as fits + ' '."""
    return f"np-log {policy_name}"[:28] + " "


def _protocol_match(protocol, family):
    """'' for any protocol, the -p option, or None when the protocol does not exist in this family."""
    if protocol is None:
        return ""
    if protocol == "icmp":
        return "-p icmp" if family == 4 else None
    if protocol == "icmpv6":
        return "-p ipv6-icmp" if family == 6 else None
    return f"-p {protocol}"


def _port_matches(ports):
    """Destination ports in multiport matches of at most 15 slots (a range takes two)."""
    if not ports:
        return [""]
    chunks, current, used = [], [], 0
    for lo, hi in ports:
        cost = 1 if lo == hi else 2
        if used + cost > _MULTIPORT_MAX:
            chunks.append(current)
            current, used = [], 0
        current.append(str(lo) if lo == hi else f"{lo}:{hi}")
        used += cost
    chunks.append(current)
    return [f"-m multiport --dports {','.join(c)}" for c in chunks]


def _endpoint_networks(ep):
    out = {4: [], 6: []}
    for addr in ep.addresses:
        try:
            version, net = _host_network(addr)
        except (ValueError, TypeError):  # TypeError: not a string (unhashable for the cache)
            raise InvalidInput(f"compiling policy: endpoint {ep.id} has a bad address {addr!r}") from None
        out[version].append(net)
    return out


# Every endpoint change recompiles, and parsing the same addresses again was most of a compile; strings are
# immutable, so parse each once (bounded: a 10,000-CIDR policy still fits).
@functools.lru_cache(maxsize=16384)
def _host_network(addr):
    """'10.0.0.5' or '10.0.0.5/24' -> (4, '10.0.0.5/32'). Raises ValueError."""
    ip = ipaddress.ip_interface(addr).ip
    return ip.version, str(ipaddress.ip_network(ip))


@functools.lru_cache(maxsize=16384)
def _network(text):
    return ipaddress.ip_network(text)


def _merge_endpoints(all_endpoints, local):
    merged = {}
    for ep in list(all_endpoints) + list(local):
        known = merged.get(ep.id)
        if known is not None and (known.network, sorted(known.addresses), known.labels) != (
            ep.network,
            sorted(ep.addresses),
            ep.labels,
        ):
            raise InvalidInput(f"compiling policy: endpoint {ep.id} is given twice with different contents")
        merged.setdefault(ep.id, ep)
    return dict(sorted(merged.items()))


def _check_local(local):
    seen = {}
    for ep in local:
        if not isinstance(ep.host_ifname, str) or not HOST_IFNAME.match(ep.host_ifname):
            raise InvalidInput(
                f"compiling policy: local endpoint {ep.id} has host interface {ep.host_ifname!r},"
                " expected 'np' and 11 hex digits"
            )
        if ep.host_ifname in seen:
            raise InvalidInput(
                f"compiling policy: endpoints {seen[ep.host_ifname]} and {ep.id} share host interface {ep.host_ifname}"
            )
        seen[ep.host_ifname] = ep.id


def _check_policies(policies):
    names = set()
    for p in policies:
        if p.name in names:
            raise InvalidInput(f"compiling policy: two policies are named {p.name}")
        names.add(p.name)
    return sorted(policies, key=lambda p: (p.order, p.name))
