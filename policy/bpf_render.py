"""Render the compiler's dataplane-neutral plan into the eBPF dataplane's policy maps: a pure function.

The compiler (policy/compiler.py) decides the semantics once: per local endpoint and direction either the
selecting policies by order group or the same-network default, each policy's rules in evaluation order (log,
deny, allow) with their peers resolved to the address sets it also gives iptables. This module flattens that
into what ``progs/netplugin.c`` walks (see docs/bpf-design.md, "Policy semantics in these maps"):

* one ordered list per endpoint and direction, first ALLOW or DENY that matches decides, LOG counts and goes
  on, ``default`` when nothing decides. An order group becomes its logs, then its denies, then its allows
  (deny beats allow at equal order, every matching log of the group counts), exactly as the chains act;
* a rule with more than ``MAX_PORT_RANGES`` port ranges becomes several rules with the same peers;
* peers: every prefix of every rule becomes one LPM entry whose value is the bitset of the rules whose peer set
  holds it, with the bits of covering prefixes folded in, so the longest match answers "which rules' peers hold
  this address" in one lookup. notCIDR needs nothing more: the compiler's CIDR sets are already the exact
  union minus the exceptions. IPv4 lives IPv4-mapped in the same trie, so an IPv6 "any" is ``::/0`` without
  ``::ffff:0:0/96``, and IPv6 peers inside that range cannot be told from IPv4 ones and are left out.

A list the program cannot hold (more than ``MAX_RULES`` rules, SCTP ports, which the program does not parse)
is not truncated: the endpoint gets a ``problem`` and no lists, so its packets go to the stack where the
iptables chains enforce its policy.
"""

import functools
import ipaddress
from dataclasses import dataclass

from netplugin.kernel.bpf import records
from policy.model import PROTOCOLS

MAPPED = ipaddress.ip_network("::ffff:0:0/96")
ACTIONS = {"allow": records.ACT_ALLOW, "deny": records.ACT_DENY, "log": records.ACT_LOG}
DIRECTIONS = (("Ingress", records.DIR_INGRESS), ("Egress", records.DIR_EGRESS))
_RANK = {"log": 0, "deny": 1, "allow": 2}


@dataclass(frozen=True)
class BpfList:
    """One endpoint's list for one direction: ``rules`` (records.rule bytes, in order), ``default``
    (records.ACT_*), ``peers`` ((start, prefix length) of a network in the 128-bit mapped space, as integers
    -> bitset of rules)."""

    rules: tuple
    default: int
    peers: dict

    def value(self):
        return records.rules(list(self.rules), self.default)


@dataclass(frozen=True)
class EndpointLists:
    """What the maps hold for one local endpoint: ``lists`` by records.DIR_*, or ``problem`` (then none)."""

    id: str
    host_ifname: str
    lists: dict
    problem: str = None

    def entries(self, ep_id, slot):
        """({np_pol_rules key: value}, {np_pol_peers key: value}) of these lists for map id ``ep_id``."""
        rules, peers = {}, {}
        pack = records.POL_KEY.pack
        for direction, lst in sorted(self.lists.items()):
            rules[records.rules_key(ep_id, direction, slot)] = lst.value()
            word = records.ep_dir(ep_id, direction, slot).to_bytes(4, "big")
            for (start, plen), bits in lst.peers.items():
                peers[pack(32 + plen, word, start.to_bytes(16, "big"))] = bits.to_bytes(8, "little")
        return rules, peers


def render(ruleset, cache=None) -> tuple:
    """-> EndpointLists for every local endpoint of a compiled Ruleset, in the plan's order. ``cache`` (a dict
    the caller keeps between calls, or None) holds lists already rendered, keyed by everything they depend on:
    endpoints selected by the same policies share one list, and an ADD re-renders only what changed."""
    sets = {s.name: s for s in ruleset.ipsets}
    known = {} if cache is None else dict(cache)
    used = {}
    out = tuple(_endpoint(ep, ruleset.policy_rules, sets, known, used) for ep in ruleset.plan)
    if cache is not None:  # keep what this ruleset uses, nothing older
        cache.clear()
        cache.update(used)
    return out


def _endpoint(ep, policy_rules, sets, cache, used):
    lists = {}
    for name, direction in DIRECTIONS:
        dplan = ep.direction(name)
        if dplan.groups:
            flat = []
            for group in dplan.groups:
                rules = [r for p in group for r in policy_rules[p, name]]
                flat += sorted(rules, key=lambda r: _RANK[r.action])  # stable: policy order, then file order
        else:
            flat = list(dplan.rules)
        names = sorted({n for r in flat for v in r.peers.values() if v for n in v})
        key = (repr(flat), dplan.default, tuple(sets[n] for n in names))
        if key not in cache:
            try:
                cache[key] = _list(flat, dplan.default, sets)
            except _Unrepresentable as e:
                cache[key] = str(e)
        used[key] = cache[key]
        if isinstance(cache[key], str):
            return EndpointLists(ep.id, ep.host_ifname, {}, f"{name.lower()}: {cache[key]}")
        lists[direction] = cache[key]
    return EndpointLists(ep.id, ep.host_ifname, lists)


class _Unrepresentable(Exception):
    pass


def _list(plan_rules, default, sets):
    rules, owned = [], {}  # owned: network -> bits of the rules whose peers hold it
    for rule in plan_rules:
        if rule.ports and rule.protocol == "sctp":
            raise _Unrepresentable("an sctp rule with ports (the program reads only tcp and udp ports)")
        proto = 0 if rule.protocol is None else PROTOCOLS.get(rule.protocol, rule.protocol)
        any_peer = set(rule.peers) == {4, 6} and all(v is None for v in rule.peers.values())
        nets = () if any_peer else _peer_networks(rule.peers, sets)
        chunks = [
            rule.ports[i : i + records.MAX_PORT_RANGES] for i in range(0, len(rule.ports), records.MAX_PORT_RANGES)
        ]
        for ports in chunks or [()]:
            bit = 1 << len(rules)
            rules.append(records.rule(ACTIONS[rule.action], proto, ports, any_peer=any_peer))
            for net in nets:
                owned[net] = owned.get(net, 0) | bit
        if len(rules) > records.MAX_RULES:
            raise _Unrepresentable(f"more than {records.MAX_RULES} rules after splitting port lists")
    return BpfList(tuple(rules), ACTIONS[default], fold(owned))


def _peer_networks(peers, sets):
    """Every network ((start, length) in the mapped space) of a rule's peers, both families."""
    out = set()
    for family, names in peers.items():
        if names is None:
            out.update(_mapped("0.0.0.0/0" if family == 4 else "::/0"))
            continue
        for name in names:
            for text in sets[name].members:
                out.update(_mapped(text))
    return out


_V4_MAPPED = 0xFFFF << 32


@functools.lru_cache(maxsize=65536)
def _mapped(text):
    """A network text -> its networks in the trie's space (IPv4 mapped; IPv6 without the mapped range)."""
    net = ipaddress.ip_network(text)
    if net.version == 4:
        return ((_V4_MAPPED | int(net.network_address), 96 + net.prefixlen),)
    if net.subnet_of(MAPPED):
        return ()
    if MAPPED.subnet_of(net):
        return tuple((int(n.network_address), n.prefixlen) for n in net.address_exclude(MAPPED))
    return ((int(net.network_address), net.prefixlen),)


def fold(owned):
    """{(start, length): bits} -> the same networks, each with the bits of every network covering it ORed in:
    the value a longest-prefix match must return. One pass over the networks sorted by start then length (a
    covering network sorts before what it covers), with a stack of the networks enclosing the current one."""
    out, stack = {}, []  # stack: (start, length, folded bits)
    for start, plen in sorted(owned):
        while stack and not (
            plen >= stack[-1][1] and start >> (128 - stack[-1][1]) == stack[-1][0] >> (128 - stack[-1][1])
        ):
            stack.pop()
        bits = owned[start, plen] | (stack[-1][2] if stack else 0)
        out[start, plen] = bits
        stack.append((start, plen, bits))
    return out
