"""Revoke the established connections a new policy denies, on the iptables dataplane.

Our chains judge a connection's first packet; after that conntrack (ESTABLISHED) and the connmark "accepted"
bit let every packet of it through, so on their own a policy change would only ever affect new connections.
The semantics are "established flows keep flowing after a policy change unless it revokes them" (the BPF
dataplane does this with its policy generation). So after an apply that changed policies or an existing
endpoint (``needed``), and on every full resync (level-triggered: an earlier revocation that failed is retried,
and an endpoint's address reused meanwhile is judged), ``FlowRevoker.sweep`` lists the host's
conntrack entries, judges each that involves a local endpoint in its *original* direction with ``policy.decide``
(so replies of an allowed connection never count against it), and deletes the ones the rules now deny. The
connection's next packet is new to conntrack, carries no accepted mark, and meets the new rules: dropped.

A host judges only what its own chains police: the egress of a local sender, the ingress of a local receiver.
Left alone: entries with NAT (their original tuple does not say what our rules saw), connections the host
itself opened to its endpoints (OUTPUT is not policed), entries involving no local endpoint, and a deny the
rules cannot see yet. TCP's loose pickup means a revoked connection whose *other* end sends next is judged as a
connection opened by that end: revocation cuts what the new policy denies in the original direction, it does
not pin the direction.

Cost (this machine, shared): a sweep of a 20,000-entry table takes about 0.6 s, most of it the dump; judging
costs about 10 us a connection with a 10,000-CIDR policy; deleting 20,000 entries about 0.1 s.
"""

import ipaddress
import logging
import time

from netplugin.kernel.conntrack import Conntrack
from netplugin.kernel.netlink import netlink
from policy.decide import DENY, Evaluator, Flow

LOG = logging.getLogger(__name__)
DETAIL_LINES = 20  # per sweep; the count says the rest


class FlowRevoker:
    def __init__(self, netns):
        """``netns``: the host namespace whose conntrack table our chains' verdicts live in (a path)."""
        self.conntrack = Conntrack(netns)
        self.netns = netns
        self.revoked = 0  # connections deleted, ever (netplugin_flows_revoked_total)
        self.last = {}  # the last sweep's counts
        self._judged = None  # (policies, {endpoint id: what policy sees of it}) the last call was given

    def needed(self, local, everyone, policies):
        """Whether a change since the last call can deny an established connection: policies, or what the rules
        see of an endpoint that was there before. An endpoint only added or removed cannot (its address carried
        no connection of ours), and an ADD must not wait for a conntrack dump; a full resync sweeps anyway."""
        seen = {e.id: (tuple(sorted(e.addresses)), e.network, tuple(sorted(e.labels.items()))) for e in everyone}
        last, self._judged = self._judged, (tuple(policies), seen)
        if last is None or last[0] != self._judged[0]:
            return True
        return any(last[1][i] != v for i, v in seen.items() if i in last[1])

    def sweep(self, local, everyone, policies):
        """Delete the conntrack entries of connections the policy (``policy.compiler``'s inputs) now denies;
        returns the counts. Raises DataplaneError when the table cannot be read."""
        started = time.monotonic()
        evaluator = Evaluator(everyone, policies)
        local_ids = {ep.id for ep in local}
        ours = {str(ipaddress.ip_interface(a).ip) for ep in local for a in ep.addresses}
        host = _host_addresses(self.netns)
        counts = {"entries": 0, "ours": 0, "nat": 0, "revoked": 0, "failed": 0}
        doomed = []
        for entry in self.conntrack.entries():
            counts["entries"] += 1
            if entry.src not in ours and entry.dst not in ours:
                continue  # (the dump's addresses are canonical, like these)
            if entry.nat:
                counts["nat"] += 1
                continue
            if entry.src in host:
                continue  # the host's own connection to an endpoint: OUTPUT is not policed
            counts["ours"] += 1
            why = _denied_by(evaluator.decide(Flow(entry.src, entry.dst, entry.protocol, entry.dst_port)), local_ids)
            if why:
                doomed.append((entry, why))
        deleted, failures = self.conntrack.delete(e for e, _ in doomed)
        counts["revoked"], counts["failed"] = deleted, len(failures)
        self.revoked += deleted
        for entry, why in doomed[:DETAIL_LINES]:
            LOG.info(
                "event=policy.flow_revoked proto=%s src=%s dst=%s dport=%s by=%s",
                entry.protocol,
                entry.src,
                entry.dst,
                entry.dst_port,
                why,
            )
        for failure in failures[:DETAIL_LINES]:
            LOG.warning("event=policy.revoke_failed error=%s", failure)
        if doomed or failures:
            LOG.info(
                "event=policy.revoked netns=%s revoked=%d failed=%d of=%d entries=%d took_ms=%.1f",
                self.netns,
                deleted,
                len(failures),
                counts["ours"],
                counts["entries"],
                (time.monotonic() - started) * 1000,
            )
        self.last = counts
        return counts


def _denied_by(decision, local_ids):
    """Which local side denies the connection ("egress of ep-1"), or "" when it may go on."""
    if decision.sender in local_ids and decision.egress == DENY:
        return f"egress of {decision.sender}"
    if decision.receiver in local_ids and decision.ingress == DENY:
        return f"ingress of {decision.receiver}"
    return ""


def _host_addresses(netns):
    with netlink(netns) as nl:
        msgs = nl.addresses()
    out = set()
    for msg in msgs:
        addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if addr:
            out.add(str(ipaddress.ip_address(addr.split("%")[0])))
    return out
