"""Apply a compiled Ruleset to one network namespace and keep it there.

One ``PolicyDataplane`` is the only writer of our chains and sets in its namespace. ``apply`` reads the kernel
back, then writes only what differs: ipsets first (so rules never name a missing set), then one atomic
``iptables-restore`` batch per family, then destroys sets no rule references any more. Calling it again with the
same Ruleset finds nothing to do, so a periodic resync is just ``apply`` (``diff`` alone reports drift without
repairing it). Counters of unchanged chains survive, since those chains are not rewritten.

An apply runs a process only for a kernel object that needs changing. Members joining or leaving a set that
exists go by netlink from this process (netplugin.kernel.ipset_members): a container starting here with a
policy shape that exists, or a remote endpoint joining the cluster, costs a few netlink messages and no process
at all (``last_processes`` stays empty). Only creating, rebuilding and destroying sets runs ``ipset restore``.

Reading back costs three process spawns (``ipset save``, ``iptables-save``, ``ip6tables-save``), most of a small
change's time. So the applier remembers what its last successful apply left in the kernel, and
``apply(..., trust_cache=True)`` plans against that instead (Felix's incremental updates): the agent does this on
event-driven syncs, which must be fast, and reads back on its periodic full resync, which repairs drift. If an
incremental batch fails (the kernel was changed behind our back), the applier reads back and tries once more.
"""

import logging
from concurrent.futures import ThreadPoolExecutor
import time
from dataclasses import dataclass, field

from netplugin.errors import DataplaneError
from policy.compiler import FAMILIES
from netplugin.kernel.ipset import IpsetPlan, Ipsets, KernelSet
from netplugin.kernel.ipset_members import IpsetMembers
from netplugin.kernel.netfilter import NetfilterTable, TableState, hook_spec, hook_target, rule_hash, tagged
from netplugin.kernel.netns import NamespaceCommand

LOG = logging.getLogger(__name__)


@dataclass
class KernelState:
    ipsets: dict = field(default_factory=dict)  # name -> KernelSet
    tables: dict = field(default_factory=dict)  # family -> TableState


class PolicyDataplane:
    def __init__(self, netns, *, allow_host_namespace=False, wait=5, backend=None):
        """``netns``: a name under /run/netns or a namespace path (required; see netplugin.kernel.netns).
        ``backend``: None detects nf_tables or legacy from ``iptables -V``; a value forces it."""
        self.ns = NamespaceCommand(netns, allow_host_namespace=allow_host_namespace)
        self.ipsets = Ipsets(self.ns)
        self.members = IpsetMembers(self.ns.path)
        self.tables = {family: NetfilterTable(self.ns, family, wait=wait, backend=backend) for family in FAMILIES}
        self.last_timings = {}
        self.last_processes = []  # the processes the last apply ran ("ipset", "IPv4 restore", ...)
        self._pool = ThreadPoolExecutor(max_workers=len(FAMILIES), thread_name_prefix="iptables-restore")
        self._written = None  # KernelState our last successful apply left (None: unknown, read back)

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

    def apply(self, ruleset, force=False, trust_cache=False):
        """Make the kernel hold ``ruleset``; returns the differences found (empty: it already did).

        ``force`` rewrites every chain of ours even when it looks right. ``trust_cache`` plans against what the
        last successful apply wrote instead of reading the kernel back (see the module docstring). Raises
        DataplaneError if a batch fails; an iptables failure leaves that family's previous rules in force.
        """
        if trust_cache and self._written is not None:
            try:
                return self._apply(ruleset, self._written, force)
            except DataplaneError as err:
                LOG.warning(
                    "policy sync netns=%s: incremental batch failed (%s); reading the kernel back",
                    self.ns.netns,
                    err.msg,
                )
        return self._apply(ruleset, None, force)

    def _apply(self, ruleset, state, force):
        started = time.monotonic()
        self._written = None  # until this apply has gone through completely
        source = "cache" if state is not None else "kernel"
        state = state or self.read_back()
        set_plan = self.ipsets.plan(ruleset.ipset_map(), state.ipsets)
        plans = {
            f: t.plan(ruleset.chains[f], ruleset.hooks[f], state.tables[f], force=force) for f, t in self.tables.items()
        }
        timings = {"read": time.monotonic() - started}
        processes = []
        lines, changes = self._set_changes(set_plan, state, delta=source == "cache")
        if lines:
            t0 = time.monotonic()
            self.ipsets.restore(lines, "ipset restore (update)")
            timings["ipset"] = time.monotonic() - t0
            processes.append("ipset")
        if changes:
            t0 = time.monotonic()
            self.members.write(changes)
            timings["ipset-members"] = time.monotonic() - t0
        self._restore_tables(plans, ruleset, timings, processes)
        lines = self.ipsets.destroy_lines(set_plan)
        if lines:
            t0 = time.monotonic()
            self.ipsets.restore(lines, "ipset restore (destroy stale)")
            timings["ipset-destroy"] = time.monotonic() - t0
            processes.append("ipset")
        self.last_timings = timings
        self.last_processes = processes
        self._written = written_state(ruleset)
        notes = set_plan.notes + [n for f in FAMILIES for n in plans[f].notes]
        LOG.info(
            "policy sync netns=%s: %d difference(s) from the %s; sets +%d ~%d -%d; chains v4 %d/%d v6 %d/%d"
            " rewritten; %d process(es); %.3f s (%s)",
            self.ns.netns,
            len(notes),
            source,
            len(set_plan.create),
            len(set_plan.refill),
            len(set_plan.stale),
            len(plans[4].rewrite),
            len(ruleset.chains[4]),
            len(plans[6].rewrite),
            len(ruleset.chains[6]),
            len(processes),
            time.monotonic() - started,
            ", ".join(f"{k} {v:.3f}" for k, v in timings.items()),
        )
        for note in notes:
            LOG.debug("policy sync netns=%s: %s", self.ns.netns, note)
        return notes

    def _set_changes(self, plan, state, delta):
        """(the ``ipset restore`` batch, the member changes for netlink) making every desired set right.
        Planned against the cache (``delta``), a set whose members changed gets only the deletes and adds of the
        difference, not a rebuilt copy swapped in: an endpoint joining a 1,000-member set costs one message.
        Each is atomic on its own, and members are independent, so no packet sees a state that is wrong for it.
        If the kernel does not hold what the cache says, one fails and ``apply`` reads back and rebuilds."""
        if not delta or not plan.refill:
            return self.ipsets.update_lines(plan, state.ipsets), []
        lines = self.ipsets.update_lines(
            IpsetPlan(create=plan.create, replace=plan.replace, stale=plan.stale), state.ipsets
        )
        changes = []
        for want in plan.refill:
            have = set(state.ipsets[want.name].members)
            wanted = set(want.members)
            changes += [("del", want.name, want.family, m) for m in state.ipsets[want.name].members if m not in wanted]
            changes += [("add", want.name, want.family, m) for m in want.members if m not in have]
        return lines, changes

    def _restore_tables(self, plans, ruleset, timings, processes):
        """IPv4 and IPv6 batches run side by side (each atomic on its own, as before): an ADD waits for the
        slower of the two instead of both. A family with nothing to change runs no process at all. Every failure
        is raised after both have finished."""
        batches = {f: t.render(plans[f], ruleset.chains[f]) for f, t in self.tables.items()}
        batches = {f: lines for f, lines in batches.items() if lines}

        def run(family):
            table = self.tables[family]
            t0 = time.monotonic()
            try:
                table.restore(batches[family])
            finally:
                timings[table.label] = time.monotonic() - t0

        processes.extend(f"{self.tables[f].label} restore" for f in batches)
        if len(batches) == 1:
            run(next(iter(batches)))
            return
        futures = [self._pool.submit(run, family) for family in batches]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]


def written_state(ruleset):
    """The KernelState a successful apply of ``ruleset`` leaves: what ``read_back`` would then return."""
    ipsets = {s.name: KernelSet(s.name, s.set_type, s.family, s.members) for s in ruleset.ipsets}
    tables = {}
    for family in FAMILIES:
        chains = {name: tuple(rule_hash(spec) for spec in specs) for name, specs in ruleset.chains[family].items()}
        hooks = {
            builtin: [(tagged(hook_spec(hook)), hook_target(hook), rule_hash(hook_spec(hook)))]
            for builtin, hook in ruleset.hooks[family].items()
        }
        tables[family] = TableState(chains=chains, hooks=hooks)
    return KernelState(ipsets=ipsets, tables=tables)
