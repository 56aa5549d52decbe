"""The one writer of every netfilter table we own (filter, nat, raw; IPv4 and IPv6) in one namespace: read
back, plan, one atomic ``iptables-restore --noflush --wait`` batch per table and family.

Ownership is by name: chains starting ``np-`` are ours, and in a built-in chain we own only rules that jump or
go to one of ours (the "hooks", one per built-in we use). Each rule we write carries ``-m comment --comment
"np:<hash of its spec>"``, so reading back compares hashes, immune to how iptables-save re-spells a rule; a
rule without our comment in our chain (or a missing one) is drift. A hook is ``-j CHAIN`` unless the caller
gives the whole jump spec (``-i np+ -j np-antispoof``).

A batch declares every chain it rewrites (``:np-x - [0:0]``, which with ``--noflush`` empties it), writes its
rules, removes hooks that should not be there, inserts missing hooks at the top, and deletes stale chains. It
touches nothing else. ``iptables-restore`` applies a table atomically: a failing batch leaves the rules that
were in force; the error log shows the numbered batch lines around the failing one. IPv4 and IPv6 are separate
batches (each atomic, not both together). The binaries match the backend the host's ``iptables`` uses
(nf_tables or legacy), so our rules land in the same tables as everyone else's.
"""

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, field

from netplugin.errors import DataplaneError, InvalidInput
from netplugin.kernel.netns import first_line

LOG = logging.getLogger(__name__)
PREFIX = "np-"  # every chain and ipset whose name starts with this is ours
BUILTINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}
FAMILY_NAME = {4: "IPv4", 6: "IPv6"}
_BASE = {4: "iptables", 6: "ip6tables"}
_COMMENT = re.compile(r'--comment\s+"?np:([0-9a-f]{16})"?')
_TARGET = re.compile(r"(?:^|\s)-[jg]\s+(\S+)")
_FAILED_LINE = re.compile(r"(?:Error occurred at line: |line )(\d+)")


def rule_hash(spec):
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def hook_spec(hook):
    """The rule a hook is: ``-j CHAIN`` for a bare chain name, else the jump spec as given."""
    return hook if " " in hook else f"-j {hook}"


def hook_target(hook):
    m = _TARGET.search(hook_spec(hook))
    return m.group(1) if m else None


def tagged(spec):
    """The rule as written: our ownership comment first, then the spec."""
    return f'-m comment --comment "np:{rule_hash(spec)}" {spec}'


@dataclass
class TableState:
    chains: dict = field(default_factory=dict)  # our chain -> tuple of rule hashes (None: not written by us)
    hooks: dict = field(default_factory=dict)  # built-in -> [(saved spec, target, hash or None)]


@dataclass
class TablePlan:
    family: int
    rewrite: list = field(default_factory=list)
    stale: list = field(default_factory=list)
    hook_add: list = field(default_factory=list)  # (built-in, hook: our chain or jump spec)
    hook_del: list = field(default_factory=list)  # (built-in, saved spec)
    notes: list = field(default_factory=list)

    def empty(self):
        return not (self.rewrite or self.stale or self.hook_add or self.hook_del)


class NetfilterTable:
    """One table (``filter`` unless told) of one family in one namespace (a ``NamespaceCommand``)."""

    def __init__(self, ns, family, wait=5, backend=None, table="filter"):
        """``backend`` 'nf_tables' or 'legacy' overrides detection (tests; hosts known to differ)."""
        if backend not in (None, "nf_tables", "legacy"):
            raise InvalidInput(f"iptables backend {backend!r} is not nf_tables or legacy")
        if table not in BUILTINS:
            raise InvalidInput(f"iptables table {table!r} is not one of {', '.join(BUILTINS)}")
        if family not in _BASE:
            raise InvalidInput(f"address family {family!r} is not 4 or 6")
        self.ns = ns
        self.family = family
        self.table = table
        self.wait = wait
        self._backend = backend
        self._binaries = None

    @property
    def label(self):
        return FAMILY_NAME[self.family] if self.table == "filter" else f"{FAMILY_NAME[self.family]} {self.table}"

    def backend(self):
        """'nf_tables' or 'legacy', as ``iptables -V`` reports it."""
        return self.binaries()[0]

    def binaries(self):
        """(backend, save binary, restore binary) matching the backend the host's iptables uses."""
        if self._binaries is None:
            base = _BASE[self.family]
            backend = self._backend
            if backend is None:
                version = self.ns.run([base, "-V"], what=f"detect the iptables backend ({base} -V)").stdout
                backend = "nf_tables" if "nf_tables" in version else "legacy"
            variant = "nft" if backend == "nf_tables" else "legacy"
            save, restore = f"{base}-{variant}-save", f"{base}-{variant}-restore"
            if not (shutil.which(save) and shutil.which(restore)):
                save, restore = f"{base}-save", f"{base}-restore"
            self._binaries = (backend, save, restore)
        return self._binaries

    def read(self):
        _, save, _ = self.binaries()
        out = self.ns.run([save, "-t", self.table], what=f"read the {self.label} table ({save})").stdout
        return parse_save(out, self.table)

    def converge(self, chains, hooks, force=False):
        """Read back, then write what differs; returns the plan (``plan.notes`` say what was wrong)."""
        plan = self.plan(chains, hooks, self.read(), force=force)
        self.restore(self.render(plan, chains))
        return plan

    def plan(self, chains, hooks, current, force=False):
        """What to change so the table holds ``chains`` ({name: specs}) and ``hooks`` ({built-in: chain or jump
        spec}); every chain named must start with PREFIX, every hook jump to one of them."""
        for name in chains:
            if not name.startswith(PREFIX):
                raise InvalidInput(f"chain {name!r} is not ours: our chains start with {PREFIX!r}")
        for builtin, hook in hooks.items():
            if builtin not in BUILTINS[self.table] or hook_target(hook) not in chains:
                raise InvalidInput(
                    f"hook {builtin} -> {hook!r} must leave a built-in chain of the {self.table}"
                    " table for one of the chains written with it"
                )
        plan = TablePlan(self.family)
        for name in sorted(chains):
            want = tuple(rule_hash(s) for s in chains[name])
            have = current.chains.get(name)
            if have is None:
                plan.notes.append(f"{self.label} chain {name}: missing")
            elif have != want:
                plan.notes.append(
                    f"{self.label} chain {name}: differs ({len(have)} rules in the kernel, {len(want)} wanted)"
                )
            if force or have != want:
                plan.rewrite.append(name)
        for name in sorted(current.chains):
            if name not in chains:
                plan.stale.append(name)
                plan.notes.append(f"{self.label} chain {name}: stale")
        for builtin in sorted(set(current.hooks) | set(hooks)):
            want = hooks.get(builtin)
            want_hash = rule_hash(hook_spec(want)) if want else None
            kept = False
            for spec, target, h in current.hooks.get(builtin, []):
                if want and target == hook_target(want) and h == want_hash and not kept:
                    kept = True
                    continue
                plan.hook_del.append((builtin, spec))
                plan.notes.append(f"{self.label} {builtin}: unwanted rule to our chain: {spec}")
            if want and not kept:
                plan.hook_add.append((builtin, want))
                plan.notes.append(f"{self.label} {builtin}: jump to {hook_target(want)} missing")
        return plan

    def render(self, plan, chains):
        """The iptables-restore batch for ``plan`` (empty list: nothing to do)."""
        if plan.empty():
            return []
        lines = [f"*{self.table}"]
        lines += [f":{name} - [0:0]" for name in plan.rewrite + plan.stale]
        lines += [f"-D {builtin} {spec}" for builtin, spec in plan.hook_del]
        for name in plan.rewrite:
            lines += [f"-A {name} {tagged(spec)}" for spec in chains[name]]
        lines += [f"-I {builtin} 1 {tagged(hook_spec(hook))}" for builtin, hook in plan.hook_add]
        lines += [f"-X {name}" for name in plan.stale]
        lines.append("COMMIT")
        return lines

    def remove_ours(self):
        """Every chain and hook of ours removed (uninstall); returns the plan. On nf_tables the table itself goes
        too when nothing at all is left in it (only base chains, no rule, every policy accept): iptables-nft
        created it for our first write, and an empty table filters nothing."""
        plan = self.converge({}, {})
        if self.backend() != "nf_tables" or not shutil.which("nft"):
            return plan
        family = {4: "ip", 6: "ip6"}[self.family]
        proc = self.ns.run(
            ["nft", "-j", "list", "table", family, self.table],
            check=False,
            what=f"read the nf_tables table {family} {self.table}",
        )
        if proc.returncode == 0 and nft_table_is_empty(proc.stdout):
            self.ns.run(
                ["nft", "delete", "table", family, self.table],
                what=f"delete the empty nf_tables table {family} {self.table}",
            )
            plan.notes.append(f"{self.label}: deleted the empty table")
        return plan

    def restore(self, lines):
        if not lines:
            return
        _, _, restore = self.binaries()
        what = f"{restore} ({self.label})"
        proc = self.ns.run(
            [restore, "--noflush", "-w", str(self.wait)],
            input_text="\n".join(lines) + "\n",
            check=False,
            what=f"write the {self.label} table ({restore})",
        )
        if proc.returncode == 0:
            return
        err = restore_error(f"{what} in netns {self.ns.netns}", lines, proc.stderr)
        LOG.error("%s\n%s", err.msg, err.details)
        raise err


def restore_error(what, lines, stderr):
    """The DataplaneError for a failed restore of ``lines``: the failing line in the message, the numbered
    lines around it (Neutron-style) and iptables' whole complaint in ``details``."""
    m = _FAILED_LINE.search(stderr or "")
    failed = int(m.group(1)) if m else 0
    context = numbered_context(lines, failed)
    reason = " ".join(
        line.strip() for line in (stderr or "").splitlines() if line.strip() and not line.startswith("Try `")
    )
    at = f" at line {failed}: {lines[failed - 1]}" if 0 < failed <= len(lines) else ""
    return DataplaneError(
        f"{what} failed{at} ({first_line(stderr)}); the previous rules stay in force", details=f"{reason}\n{context}"
    )


def nft_table_is_empty(listing):
    """True when ``nft -j list table`` shows only base chains with policy accept and not one rule or set."""
    try:
        items = json.loads(listing).get("nftables", [])
    except ValueError:
        return False
    for item in items:
        if "metainfo" in item or "table" in item:
            continue
        chain = item.get("chain")
        if chain is None or "hook" not in chain or chain.get("policy", "accept") != "accept":
            return False
    return True


def parse_save(text, table="filter"):
    """``iptables-save -t TABLE`` output -> TableState (our chains and the hooks into them)."""
    state = TableState()
    in_table = False
    for line in text.splitlines():
        if line.startswith("*"):
            in_table = line.strip() == f"*{table}"
            continue
        if not in_table:
            continue
        if line.startswith(":"):
            name = line[1:].split()[0]
            if name.startswith(PREFIX):
                state.chains.setdefault(name, ())
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            spec = rest[0] if rest else ""
            m = _COMMENT.search(spec)
            h = m.group(1) if m else None
            if chain.startswith(PREFIX):
                state.chains[chain] = state.chains.get(chain, ()) + (h,)
            elif chain in BUILTINS[table]:
                t = _TARGET.search(spec)
                if t and t.group(1).startswith(PREFIX):
                    state.hooks.setdefault(chain, []).append((spec, t.group(1), h))
    return state


def numbered_context(lines, failed, radius=5):
    """Neutron-style: the numbered batch lines around the one that failed, that one marked with '>'."""
    if not failed:
        lo, hi = 1, min(len(lines), 2 * radius + 1)
    else:
        lo, hi = max(1, failed - radius), min(len(lines), failed + radius)
    return "\n".join(f"{'>' if n == failed else ' '}{n:6d}: {lines[n - 1]}" for n in range(lo, hi + 1))
