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

Compiling one change at a time (``RulesetCompiler``; ``compile_ruleset`` is a fresh one given everything): only
the all/net/sel sets depend on other hosts' endpoints, so those are kept per endpoint (policy/endpoint_sets.py)
and the host's part (plan, chains, dispatch sets) is assembled again only when a local endpoint or a policy
changed, from pieces kept per local endpoint and per policy. An agent compiled the whole cluster on every
endpoint event anywhere, which made it CPU-bound: at 10,000 endpoints over 10 hosts an event cost about 2 s,
now 2 ms for a remote endpoint and 4 ms for a local one (scripts/bench_policy_compile.py).
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
from policy.endpoint_sets import EndpointSets, endpoint_networks

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
    _hash: int = field(default=None, init=False, repr=False, compare=False)

    def __hash__(self):
        # Computed once: the BPF renderer keys its cache by the sets each list names, for every local endpoint
        # on every apply, and hashing a 10,000-member tuple each time was most of a render.
        if self._hash is None:
            object.__setattr__(self, "_hash", hash((self.name, self.family, self.members, self.set_type)))
        return self._hash

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
    compiler = RulesetCompiler(options)
    for i, ep in enumerate(all_endpoints):
        compiler.put(("all", i), ep)
    for i, ep in enumerate(local_endpoints):
        compiler.put(("local", i), ep, local=True)
    compiler.set_policies(policies)
    return compiler.ruleset()


@dataclass(frozen=True)
class _Part:
    """What one policy's rules in one direction (or one network's default ingress) compile to, whatever the
    endpoints: its PlanRules, the sets they name (name -> (kind, family, key, IpSet or selector or None)) and,
    for a policy, its chain's rules per family."""

    policy: object
    rules: tuple
    sets: dict
    chains: dict


@dataclass(frozen=True)
class _Local:
    """What one local endpoint contributes: its plan, shape (see _shape), the parts its plan uses (keyed as
    Ruleset.policy_rules, or ("default", network)), its "address,veth" members per family and its chains."""

    endpoint: object
    plan: EndpointPlan
    shape: tuple
    parts: dict
    members: dict
    chains: tuple


@dataclass(frozen=True)
class _HostPart:
    """Everything in a Ruleset but the members of endpoint sets: it depends on the local endpoints and the
    policies only. ``sets`` (sorted by name) holds an IpSet, or the (kind, family, key) of a tracked set."""

    local: tuple
    sets: tuple
    chains: dict
    hooks: dict
    plan: tuple
    policy_rules: dict
    endpoints: dict


class RulesetCompiler:
    """compile_ruleset kept between calls, for an agent whose endpoints change one at a time: ``put`` and
    ``remove`` endpoints (under keys of the caller's), ``set_policies``, then ``ruleset``, which equals
    compile_ruleset over the same endpoints and policies.

    What a change costs: a remote endpoint moves in or out of the address sets it matches
    (policy/endpoint_sets.py) and nothing else is computed again; a local endpoint or a policy makes the host's
    part (plan, chains, dispatch sets: O(local endpoints)) be assembled again, from parts kept per local
    endpoint and per policy. What did not change comes back as the same objects, so comparing the new ruleset
    with the last is mostly identity checks. An error (InvalidInput) is raised by ``ruleset`` for as long as its
    cause is among the inputs; the state stays consistent."""

    def __init__(self, options=None):
        self.options = options or CompileOptions()
        self.members = EndpointSets(self._tracked_ipset)
        self._local = {}  # caller's key -> local Endpoint
        self._given = ()  # the policies as given
        self._policies = ()  # sorted by (order, name)
        self._policy_error = None
        self._host = None  # the _HostPart of the current local endpoints and policies; None: to be assembled
        self._changed = True  # an input changed since the last ruleset
        self._last = None
        self._parts = {}  # (id(policy), direction) or ("default", network) -> _Part
        self._locals = {}  # id(local endpoint) -> _Local, for the current policies
        self._ep_sets = {}  # name -> the last IpSet of an "address,veth" set (kept while its members are equal)

    def put(self, key, ep, local=False):
        """``ep`` (a policy.model.Endpoint) stands at ``key``; ``local``: it has a host veth here."""
        changed = self.members.put(key, ep)
        old = self._local.get(key)
        if local:
            self._local[key] = ep
            changed |= old != ep
        elif old is not None:
            del self._local[key]
            changed = True
        if changed and (local or old is not None):
            self._host = None
        self._changed |= changed

    def remove(self, key):
        self._changed |= self.members.remove(key)
        if self._local.pop(key, None) is not None:
            self._host = None
            self._changed = True

    def set_policies(self, policies):
        policies = tuple(policies)
        if len(policies) == len(self._given) and all(a is b for a, b in zip(policies, self._given)):
            return
        self._given, self._host, self._changed, self._locals = policies, None, True, {}
        try:
            self._policies, self._policy_error = tuple(_check_policies(policies)), None
        except InvalidInput as e:
            self._policies, self._policy_error = (), e
        kept = {id(p) for p in self._policies}
        self._parts = {k: v for k, v in self._parts.items() if k[0] == "default" or k[0] in kept}

    def ruleset(self):
        """-> the Ruleset of the endpoints and policies given; the same object while none changed. Raises
        InvalidInput while an input cannot be compiled."""
        if self._policy_error is not None:
            raise self._policy_error
        errors = self.members.errors()
        if errors:
            raise InvalidInput(errors[0])
        if self._last is not None and not self._changed and not self.members.changed:
            return self._last
        if self._host is None:
            self._host = self._host_part()
        host = self._host
        self._last = Ruleset(
            ipsets=tuple(s if isinstance(s, IpSet) else self.members.ipset(s) for s in host.sets),
            chains=host.chains,
            hooks=host.hooks,
            plan=host.plan,
            policy_rules=host.policy_rules,
            inputs=(host.local, self.members.everyone(), self._policies),
            endpoints=host.endpoints,
        )
        self._changed = self.members.changed = False
        return self._last

    # -- the host's part ------------------------------------------------------------------------------------

    def _host_part(self):
        local = tuple(sorted(self._local.values(), key=lambda e: e.id))
        _check_local(local)
        owners = {}  # generated name -> what it stands for, to catch hash collisions
        entries = [self._local_of(ep) for ep in local]
        self._locals = {id(e.endpoint): e for e in entries}
        parts = {}
        for entry in entries:
            parts.update(entry.parts)
        sets, specs = {}, {}  # name -> (kind, family, key, payload) or IpSet; (kind, family, key) -> selector
        for part in parts.values():
            for name, spec in part.sets.items():
                _claim(owners, name, spec[:3])
                sets[name] = spec
                specs[spec[:3]] = spec[3]
        chains = {family: self._family_chains(entries, parts, family, owners, sets) for family in FAMILIES}
        sets = {name: _resolved(spec) for name, spec in sorted(sets.items())}
        self.members.track({s: specs[s] for s in sets.values() if not isinstance(s, IpSet)})
        self._ep_sets = {name: s for name, s in sets.items() if isinstance(s, IpSet) and s.set_type == IFACE_SET}
        return _HostPart(
            local=local,
            sets=tuple(sets.values()),
            chains=chains,
            hooks={family: dict(sorted(HOOKS.items())) for family in FAMILIES},
            plan=tuple(e.plan for e in entries),
            policy_rules=dict(sorted((k, p.rules) for k, p in parts.items() if k[0] != "default")),
            endpoints={e.endpoint.id: e.chains for e in entries},
        )

    def _local_of(self, ep):
        known = self._locals.get(id(ep))
        if known is not None and known.endpoint is ep:
            return known
        selecting = [p for p in self._policies if p.selector.matches(ep.labels)]
        out, parts = {}, {}
        for direction in ("Ingress", "Egress"):
            declared = [p for p in selecting if direction in p.types]
            if declared:
                for p in declared:
                    parts[p.name, direction] = self._policy_part(p, direction)
                groups = tuple(
                    tuple(p.name for p in group) for _, group in itertools.groupby(declared, key=lambda p: p.order)
                )
                out[direction] = DirectionPlan(groups=groups, default="deny")
            elif direction == "Ingress":
                part = parts["default", ep.network] = self._default_part(ep.network)
                out[direction] = DirectionPlan(rules=part.rules, default="allow")
            else:
                out[direction] = DirectionPlan(default="allow")
        shape = _shape(selecting, ep)
        nets = endpoint_networks(ep)
        return _Local(
            endpoint=ep,
            plan=EndpointPlan(ep.id, ep.host_ifname, out["Ingress"], out["Egress"]),
            shape=shape,
            parts=parts,
            members={f: tuple(f"{net},{ep.host_ifname}" for net in nets[f]) for f in FAMILIES},
            chains=shape_chains(*shape),
        )

    def _policy_part(self, policy, direction):
        key = (id(policy), direction)
        known = self._parts.get(key)
        if known is None or known.policy is not policy:
            sets = {}
            rules = self._plan_rules(policy, direction, sets)
            chains = {f: self._policy_rules(policy.name, direction, f, rules) for f in FAMILIES}
            known = self._parts[key] = _Part(policy, rules, sets, chains)
        return known

    def _default_part(self, network):
        """Its own network's endpoints pass, other endpoints are dropped, everything else passes."""
        key = ("default", network)
        if key not in self._parts:
            sets = {}
            same = {f: (_name(sets, "net", f, network),) for f in FAMILIES}
            everyone = {f: (_name(sets, "all", f, ""),) for f in FAMILIES}
            rules = (PlanRule("allow", None, (), same, ""), PlanRule("deny", None, (), everyone, ""))
            self._parts[key] = _Part(None, rules, sets, {})
        return self._parts[key]

    def _plan_rules(self, policy, direction, sets):
        """log rules, then deny rules, then allow rules; file order within each; per family what exists."""
        ordered = sorted(policy.rules(direction), key=lambda r: _ACTION_RANK[r.action])
        out = []
        for rule in ordered:
            peers = {}
            cidr_space = []  # the rule's CIDR peers merged, once for both families (see _peer_sets)
            for family in FAMILIES:
                if _protocol_match(rule.protocol, family) is None:
                    continue
                names = _peer_sets(rule, family, sets, cidr_space)
                if names is not False:
                    peers[family] = names
            if peers:
                out.append(PlanRule(rule.action, rule.protocol, tuple(rule.ports), peers, policy.name))
        return tuple(out)

    # -- chains -------------------------------------------------------------------------------------------

    def _family_chains(self, entries, parts, family, owners, sets):
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
        shapes = {}  # (ingress key, egress key) -> ("address,veth" of each local endpoint of that shape, its entry)
        for entry in entries:
            members, _ = shapes.setdefault(entry.shape, ([], entry))
            members.extend(entry.members[family])
        dispatch = []
        policy_chains = {}
        for shape, (members, first) in shapes.items():
            to_chain, from_chain = first.chains
            _claim(owners, to_chain, ("ingress",) + shape[0])
            _claim(owners, from_chain, ("egress",) + shape[1])
            veth_set = self._ep_set(family, repr(shape), members, owners, sets)
            dispatch.append((veth_set, from_chain, to_chain))
            for direction, chain in (("Ingress", to_chain), ("Egress", from_chain)):
                if chain in chains:
                    continue
                dplan = first.plan.direction(direction)  # every endpoint of one shape has the same plan here
                if dplan.groups:
                    chains[chain] = self._policy_dispatch(dplan.groups, direction)
                    for group in dplan.groups:
                        for p in group:
                            name = policy_chain(p, direction)
                            if name not in policy_chains:
                                _claim(owners, name, ("policy", p, direction))
                                policy_chains[name] = parts[p, direction].chains[family]
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

    def _ep_set(self, family, key, members, owners, sets):
        """The "address,veth" set of one shape (members sorted as text); the last one if its members are equal."""
        name = set_name("ep", family, key)
        _claim(owners, name, ("ep", family, key))
        ipset = IpSet(name, family, tuple(sorted(set(members))), IFACE_SET)
        known = self._ep_sets.get(name)
        sets[name] = known if known == ipset else ipset
        return name

    def _policy_dispatch(self, groups, direction):
        o = self.options
        rules = [f"-j MARK --set-xmark 0x0/{o.mask:#x}"]
        for group in groups:
            rules.extend(f"-j {policy_chain(p, direction)}" for p in group)
            rules.append(f"-m mark --mark {o.deny_mark:#x}/{o.deny_mark:#x} -j DROP")
            rules.append(f"-m mark --mark {o.allow_mark:#x}/{o.allow_mark:#x} -j RETURN")
        rules.append("-j DROP")
        return tuple(rules)

    def _policy_rules(self, policy_name, direction, family, plan_rules):
        """A policy chain rendered from its PlanRules: a deny sets the deny mark, and once some deny has run
        the chain returns before its first allow if the deny mark is set."""
        o = self.options
        side = "src" if direction == "Ingress" else "dst"
        out = []
        denies = allows = 0
        for rule in plan_rules:
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

    @staticmethod
    def _tracked_ipset(kind, family, key, members):
        return IpSet(name=set_name(kind, family, key), family=family, members=members)


def _shape(selecting, ep):
    """(ingress key, egress key): what an endpoint's two chains are made of. Ingress: the names of the policies
    selecting it for Ingress, or its network (the default); egress: those for Egress, or nothing."""
    ingress = tuple(p.name for p in selecting if "Ingress" in p.types)
    egress = tuple(p.name for p in selecting if "Egress" in p.types)
    return (("policies", ingress) if ingress else ("default", ep.network)), ("policies", egress)


def _peer_sets(rule, family, sets, cidr_space):
    """None for any peer; the names of the sets holding the peers (any one must match); False if no peer exists
    in this family. ``cidr_space``: an empty list, filled with the rule's merged CIDR peers the first time."""
    if rule.peers is None:
        return None
    names = []
    for peer in rule.peers:
        if peer.selector is not None:
            name = _name(sets, "sel", family, peer.selector.key(), peer.selector)
        elif peer.network is not None:
            name = _name(sets, "net", family, peer.network)
        else:
            continue
        if name not in names:
            names.append(name)
    cidr_peers = [p for p in rule.peers if p.cidr is not None]
    if cidr_peers:
        if not cidr_space:
            # The exact union as CIDRs, computed once for both families (the merge is most of the cost of
            # compiling thousands of CIDRs).
            cidr_space.append(list(cidr_union(cidr_peers).iter_cidrs()))
        nets = [str(c) for c in cidr_space[0] if c.version == family]
        if nets == ["0.0.0.0/0"] or nets == ["::/0"]:
            return None  # hash:net cannot hold /0, and "everything" needs no lookup
        if nets:
            key = ",".join(nets)
            members = tuple(str(n) for n in sorted({_network(m) for m in nets}))
            name = _name(
                sets, "cidr", family, key, IpSet(name=set_name("cidr", family, key), family=family, members=members)
            )
            names.append(name)
    return tuple(names) if names else False


def _name(sets, kind, family, key, payload=None):
    """Record in ``sets`` the set of ``kind`` for ``key``; its name. ``payload``: the IpSet of a set whose
    members the compiler knows (cidr), the selector of a selector's set; the others' members are the
    endpoints' (policy/endpoint_sets.py)."""
    name = set_name(kind, family, key)
    sets.setdefault(name, (kind, family, key, payload))
    return name


def _resolved(spec):
    """An IpSet for a set whose members are known here, the (kind, family, key) of one whose members are the
    endpoints' (tracked by policy/endpoint_sets.py)."""
    if isinstance(spec, IpSet):
        return spec
    return spec[3] if isinstance(spec[3], IpSet) else spec[:3]


def _claim(owners, name, owner):
    if owners.setdefault(name, owner) != owner:
        raise InvalidInput(f"compiling policy: name {name} stands for both {owners[name]} and {owner} (hash collision)")


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
