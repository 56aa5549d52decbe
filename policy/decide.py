"""The reference evaluator of our policy semantics: does one flow pass, decided from the model, not from rules.

``policy.compiler`` turns endpoints and policies into ipsets and chains; this module answers the same question
for one flow (source, destination, protocol, destination port) directly, with the semantics of the compiler's
docstring: the same-network default on ingress, an open default egress, policies by (order, name), deny before
allow within an order (log rules decide nothing), selectors, networks, CIDR/notCIDR, protocols per family and
port ranges. Kubernetes NetworkPolicy arrives already translated (``policy.k8s``), endpoint labels through
``policy_labels``, exactly as the compiler gets them.

Two users: the unit tests, which prove that the compiled rules mean this (an interpreter of the ruleset against
``decide``), and the revocation of established flows after a policy change (``policy.revoke``), which must judge
a connection the way the new rules would judge its first packet.

A verdict is per side: the sender's egress and the receiver's ingress, each None when that address is not an
endpoint (nothing of ours polices it). Which sides a host enforces (its local endpoints) is the caller's business.
"""

import bisect
import functools
import ipaddress
import itertools
from dataclasses import dataclass

from policy.compiler import _check_policies, _merge_endpoints, cidr_union
from policy.model import PROTOCOLS

ALLOW, DENY = "allow", "deny"


@dataclass(frozen=True)
class Flow:
    """A flow in its originating direction; ``protocol`` a name of ``PROTOCOLS`` or a number."""

    src: str
    dst: str
    protocol: object
    dst_port: int = None

    @property
    def number(self):
        return PROTOCOLS.get(self.protocol, self.protocol)


@dataclass(frozen=True)
class Decision:
    sender: str = None  # the endpoint id at the source address, or None
    receiver: str = None
    egress: str = None  # ALLOW, DENY, or None when the sender is not an endpoint
    ingress: str = None

    @property
    def allowed(self):
        return DENY not in (self.egress, self.ingress)


class Evaluator:
    """Endpoints and policies indexed once, so judging many flows (a conntrack table) stays cheap."""

    def __init__(self, endpoints, policies):
        self.endpoints = _merge_endpoints(endpoints, [])
        self.policies = _check_policies(policies)
        self.at = {}  # ip_address -> endpoints holding it, by id
        for ep in self.endpoints.values():
            for addr in ep.addresses:
                self.at.setdefault(ipaddress.ip_interface(addr).ip, []).append(ep)
        self._declared = {}  # (endpoint id, direction) -> the selecting policies declaring it, in order
        self._rule_peers = {}  # id(rule) -> what its peers match (_peers)
        self._decided = {}  # Flow -> Decision: a conntrack table holds many connections of one flow

    def endpoint_at(self, address):
        """The endpoint holding ``address`` (the lowest id if a stale record shares it), or None."""
        eps = self.at.get(_address(address))
        return eps[0] if eps else None

    def decide(self, flow):
        known = self._decided.get(flow)
        if known is None:
            src, dst = self.endpoint_at(flow.src), self.endpoint_at(flow.dst)
            known = self._decided[flow] = Decision(
                sender=src and src.id,
                receiver=dst and dst.id,
                egress=src and self.verdict(src, "Egress", flow),
                ingress=dst and self.verdict(dst, "Ingress", flow),
            )
        return known

    def verdict(self, ep, direction, flow):
        """ALLOW or DENY of ``ep``'s ``direction`` for ``flow``."""
        peer = _address(flow.src if direction == "Ingress" else flow.dst)
        declared = self._selecting(ep, direction)
        if not declared:
            if direction == "Egress":
                return ALLOW
            peers = self.at.get(peer, ())
            if not peers or any(p.network == ep.network for p in peers):
                return ALLOW  # its own network, or not an endpoint (the host, the outside)
            return DENY
        for _, group in itertools.groupby(declared, key=lambda p: p.order):
            actions = {r.action for p in group for r in p.rules(direction) if self._matches(r, peer, flow)}
            if DENY in actions:
                return DENY
            if ALLOW in actions:
                return ALLOW
        return DENY

    def _selecting(self, ep, direction):
        key = (ep.id, direction)
        if key not in self._declared:
            self._declared[key] = [p for p in self.policies if direction in p.types and p.selector.matches(ep.labels)]
        return self._declared[key]

    def _matches(self, rule, peer, flow):
        if rule.action not in (ALLOW, DENY):
            return False  # log rules log and go on
        if not _protocol_matches(rule.protocol, flow.number, peer.version):
            return False
        if rule.ports and not (flow.dst_port is not None and any(lo <= flow.dst_port <= hi for lo, hi in rule.ports)):
            return False
        if rule.peers is None:
            return True
        selectors, networks, ranges = self._peers(rule)
        eps = self.at.get(peer, ())
        if any(s.matches(e.labels) for s in selectors for e in eps) or any(e.network in networks for e in eps):
            return True
        starts, ends = ranges.get(peer.version, ((), ()))
        i = bisect.bisect_right(starts, int(peer)) - 1
        return i >= 0 and int(peer) <= ends[i]

    def _peers(self, rule):
        """(selectors, networks, {family: (starts, ends)} of the CIDR peers' address ranges) of a rule, once: a
        10,000-CIDR rule costs a flow one binary search."""
        key = id(rule)  # rules live as long as the policies this evaluator holds
        if key not in self._rule_peers:
            ranges = {}
            for r in cidr_union([p for p in rule.peers if p.cidr is not None]).iter_ipranges():
                starts, ends = ranges.setdefault(r.version, ([], []))
                starts.append(r.first)
                ends.append(r.last)
            self._rule_peers[key] = (
                tuple({p.selector for p in rule.peers if p.selector is not None}),
                frozenset(p.network for p in rule.peers if p.network is not None),
                ranges,
            )
        return self._rule_peers[key]


def decide(endpoints, policies, flow):
    """-> Decision for one flow (see the module docstring); ``Evaluator`` for many."""
    return Evaluator(endpoints, policies).decide(flow)


# A conntrack table names the same few addresses over and over; parsing them was most of judging it.
_address = functools.lru_cache(maxsize=1 << 16)(ipaddress.ip_address)


def _protocol_matches(protocol, number, family):
    if protocol is None:
        return True
    if protocol == "icmp" and family != 4 or protocol == "icmpv6" and family != 6:
        return False  # the compiler leaves such a rule out of the other family's chains
    return PROTOCOLS.get(protocol, protocol) == number
