"""NAT-outgoing: containers of a pool marked ``nat_outgoing`` reach destinations outside every pool from their
host's address (Calico's ``natOutgoing``), for pools the rest of the network does not route.

One chain of ours in the ``nat`` table per family, hooked from POSTROUTING: traffic to any pool is left alone
(container to container stays routed, with its real source), then traffic from a NAT pool is masqueraded.
Pools are few, so a short chain needs no ipset. Only ``NatOutgoing`` (the iptables backend's nat writer) writes
the chain; the policy applier owns the ``filter`` table and never reads ``nat``. The reconciler only decides
when to ask the dataplane backend (``set_nat_outgoing``): the rules are the iptables backend's business.
"""

import ipaddress
import logging

from netplugin.agent.view import EVERYTHING
from netplugin.datastore import keys
from netplugin.kernel.netfilter import NetfilterTable
from netplugin.kernel.netns import NamespaceCommand, own_netns

LOG = logging.getLogger(__name__)
CHAIN = "np-nat-outgoing"
HOOK = "POSTROUTING"
FAMILIES = (4, 6)


def nat_rules(pools):
    """{family: [rule specs]} of our POSTROUTING chain for these pools; empty when no pool asks for NAT (pure)."""
    out = {}
    for family in FAMILIES:
        mine = sorted((p for p in pools if ipaddress.ip_network(p.cidr).version == family), key=lambda p: p.cidr)
        masq = [p.cidr for p in mine if p.nat_outgoing]
        out[family] = (
            [f"-d {p.cidr} -j RETURN" for p in mine] + [f"-s {cidr} -j MASQUERADE" for cidr in masq] if masq else []
        )
    return out


class NatOutgoing:
    """The nat table holding ``nat_rules(pools)`` in one namespace (a name or a path; the agent's own). Pools
    change rarely, so an incremental call only writes when the wanted rules changed; a full one reads the
    kernel back and repairs drift."""

    def __init__(self, netns=None):
        # The agent programs the namespace it runs in: the host's (a test host namespace in the tests).
        ns = NamespaceCommand(netns or own_netns(), allow_host_namespace=True)
        self.tables = {family: NetfilterTable(ns, family, table="nat") for family in FAMILIES}
        self._written = None  # the rules of our last successful write

    def apply(self, pools, full=False) -> list:
        want = nat_rules(pools)
        if not full and want == self._written:
            return []
        notes = []
        for family, table in self.tables.items():
            if not want[family] and not full and not (self._written or {}).get(family):
                continue  # nothing wanted, nothing written: don't even load the family's nat table
            chains = {CHAIN: want[family]} if want[family] else {}
            hooks = {HOOK: CHAIN} if want[family] else {}
            plan = table.converge(chains, hooks)
            if not plan.empty():
                LOG.info(
                    "event=nat_outgoing.applied family=%d rules=%d changes=%s",
                    family,
                    len(want[family]),
                    "; ".join(plan.notes),
                )
                notes += plan.notes
        self._written = want
        return notes


class NatReconciler:
    """Asks the dataplane for NAT-outgoing of the view's pools when the pools changed, and on every full resync."""

    def __init__(self, dataplane):
        self.dataplane = dataplane

    def sync(self, view, full=False, changes=EVERYTHING):
        if full or changes.touches(keys.POOLS):
            self.dataplane.set_nat_outgoing(view.pools, full=full)
