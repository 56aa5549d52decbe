"""Apply a compiled Ruleset to one network namespace and keep it there.

One ``PolicyDataplane`` is the only writer of our chains and sets in its namespace. ``apply`` reads the kernel
back, then writes only what differs: ipsets first (so rules never name a missing set), then one atomic
``iptables-restore`` batch per family, then destroys sets no rule references any more. Calling it again with the
same Ruleset finds nothing to do, so a periodic resync is just ``apply`` (``diff`` alone reports drift without
repairing it). Counters of unchanged chains survive, since those chains are not rewritten.
"""
import logging
import time
from dataclasses import dataclass, field

from policy.compiler import FAMILIES
from policy.ipsets import Ipsets
from policy.iptables import IptablesTable
from policy.nsexec import NamespaceCommand

LOG = logging.getLogger(__name__)


@dataclass
class KernelState:
    ipsets: dict = field(default_factory=dict)   # name -> KernelSet
    tables: dict = field(default_factory=dict)   # family -> TableState


class PolicyDataplane:
    def __init__(self, netns, *, allow_host_namespace=False, wait=5, backend=None):
        """``netns``: a name under /run/netns or a namespace path (required; see policy.nsexec).
        ``backend``: None detects nf_tables or legacy from ``iptables -V``; a value forces it."""
        self.ns = NamespaceCommand(netns, allow_host_namespace=allow_host_namespace)
        self.ipsets = Ipsets(self.ns)
        self.tables = {family: IptablesTable(self.ns, family, wait=wait, backend=backend) for family in FAMILIES}
        self.last_timings = {}  # seconds per phase of the last apply (read, ipset, IPv4, IPv6, ipset-destroy)

    def backend(self):
        return self.tables[4].backend()

    def read_back(self):
        return KernelState(ipsets=self.ipsets.read(), tables={f: t.read() for f, t in self.tables.items()})

    def diff(self, ruleset, state=None):
        """Human-readable differences between the kernel and ``ruleset``; empty when in sync."""
        state = state or self.read_back()
        notes = list(self.ipsets.plan(ruleset.ipset_map(), state.ipsets).notes)
        for family, table in self.tables.items():
            notes += table.plan(ruleset.chains[family], ruleset.hooks[family], state.tables[family]).notes
        return notes

    def apply(self, ruleset, force=False):
        """Make the kernel hold ``ruleset``; returns the differences found (empty: it already did).

        ``force`` rewrites every chain of ours even when it looks right. Raises DataplaneError if a batch
        fails; an iptables failure leaves that family's previous rules in force.
        """
        started = time.monotonic()
        state = self.read_back()
        set_plan = self.ipsets.plan(ruleset.ipset_map(), state.ipsets)
        plans = {f: t.plan(ruleset.chains[f], ruleset.hooks[f], state.tables[f], force=force)
                 for f, t in self.tables.items()}
        timings = {"read": time.monotonic() - started}
        t0 = time.monotonic()
        self.ipsets.restore(self.ipsets.update_lines(set_plan, state.ipsets), "ipset restore (update)")
        timings["ipset"] = time.monotonic() - t0
        for family, table in self.tables.items():
            t0 = time.monotonic()
            table.restore(table.render(plans[family], ruleset.chains[family]))
            timings[table.label] = time.monotonic() - t0
        t0 = time.monotonic()
        self.ipsets.restore(self.ipsets.destroy_lines(set_plan), "ipset restore (destroy stale)")
        timings["ipset-destroy"] = time.monotonic() - t0
        self.last_timings = timings
        notes = set_plan.notes + [n for f in FAMILIES for n in plans[f].notes]
        LOG.info("policy sync netns=%s: %d difference(s); sets +%d ~%d -%d; chains v4 %d/%d v6 %d/%d rewritten;"
                 " %.3f s (%s)", self.ns.netns, len(notes), len(set_plan.create), len(set_plan.refill),
                 len(set_plan.stale), len(plans[4].rewrite), len(ruleset.chains[4]), len(plans[6].rewrite),
                 len(ruleset.chains[6]), time.monotonic() - started,
                 ", ".join(f"{k} {v:.3f}" for k, v in timings.items()))
        for note in notes:
            LOG.debug("policy sync netns=%s: %s", self.ns.netns, note)
        return notes
