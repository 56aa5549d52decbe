"""Our ipsets (named ``np-*``, of type hash:net or hash:net,iface) in one namespace: read them back, plan the change,
build them with ``ipset restore``.

A set whose members changed is rebuilt in a temporary set and swapped in (``swap`` is atomic per set, so a
packet never sees a half-filled set); a new set is created filled; a set nobody references any more is destroyed
only after iptables stopped using it (the caller orders that). Sets are ours when their names start ``np-``.
``ipset restore`` stops at the first bad line but keeps what came before: it is not a transaction, so every
batch is written to be correct when replayed after a partial run (the next sync finishes the job). Members added
to or deleted from a set that exists go by netlink instead (netplugin.kernel.ipset_members).
"""

import ipaddress
import logging
import re
import socket
from dataclasses import dataclass, field

from netplugin.errors import DataplaneError
from netplugin.kernel.netfilter import PREFIX, numbered_context
from netplugin.kernel.netns import first_line

LOG = logging.getLogger(__name__)
SET_FAMILY = {4: "inet", 6: "inet6"}
SET_TYPE = "hash:net"
IFACE_SET = "hash:net,iface"  # members "10.0.0.5/32,np0123456789a"
TEMP_SETS = {4: "np-tmp-4", 6: "np-tmp-6"}
_FAMILY_OF = {v: k for k, v in SET_FAMILY.items()}
_V4_NET = re.compile(r"^(25[0-5]|2[0-4]\d|1?\d?\d)(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3}(/(3[0-2]|[12]?\d))?$")


@dataclass(frozen=True)
class KernelSet:
    name: str
    set_type: str
    family: int  # 4, 6, or 0 when the kernel says something we do not use
    members: tuple


@dataclass
class IpsetPlan:
    create: list = field(default_factory=list)  # desired IpSets missing from the kernel
    refill: list = field(default_factory=list)  # desired IpSets whose members differ
    replace: list = field(default_factory=list)  # desired IpSets whose type/family differ: destroy, create
    stale: list = field(default_factory=list)  # names of our sets nobody wants
    notes: list = field(default_factory=list)  # human-readable differences

    def empty(self):
        return not (self.create or self.refill or self.replace or self.stale)


class Ipsets:
    def __init__(self, ns):
        self.ns = ns

    def read(self):
        """{name: KernelSet} for our sets in the namespace."""
        out = self.ns.run(["ipset", "save"], what="read the ipsets").stdout
        return parse_save(out)

    def plan(self, desired, current):
        """Compare desired {name: IpSet} with current {name: KernelSet}."""
        plan = IpsetPlan()
        for name in sorted(desired):
            want = desired[name]
            have = current.get(name)
            if have is None:
                plan.create.append(want)
                plan.notes.append(f"ipset {name}: missing")
            elif (have.set_type, have.family) != (want.set_type, want.family):
                plan.replace.append(want)
                plan.notes.append(
                    f"ipset {name}: is {have.set_type} family {have.family}, want {want.set_type} {want.set_family}"
                )
            elif have.members != want.members:
                plan.refill.append(want)
                extra = len(set(have.members) - set(want.members))
                lacking = len(set(want.members) - set(have.members))
                plan.notes.append(f"ipset {name}: {lacking} member(s) missing, {extra} extra")
        for name in sorted(current):
            if name not in desired:
                plan.stale.append(name)
                plan.notes.append(f"ipset {name}: stale")
        return plan

    def update_lines(self, plan, current):
        """The restore batch that makes every desired set right (stale ones are left for ``destroy_lines``)."""
        lines = []
        for family, temp in sorted(TEMP_SETS.items()):
            if temp in current:
                lines.append(f"destroy {temp}")  # left by an interrupted run
        for s in plan.replace:
            lines.append(f"destroy {s.name}")
        for s in plan.create + plan.replace:
            lines.append(_create(s.name, s))
            lines.extend(f"add {s.name} {m}" for m in s.members)
        for s in plan.refill:
            temp = TEMP_SETS[s.family]
            lines.append(_create(temp, s))
            lines.extend(f"add {temp} {m}" for m in s.members)
            lines.append(f"swap {temp} {s.name}")
            lines.append(f"destroy {temp}")
        return lines

    def destroy_lines(self, plan):
        return [f"destroy {name}" for name in plan.stale if name not in TEMP_SETS.values()]

    def restore(self, lines, what):
        if not lines:
            return
        proc = self.ns.run(["ipset", "restore"], input_text="\n".join(lines) + "\n", check=False, what=what)
        if proc.returncode != 0:
            msg = first_line(proc.stderr)
            context = numbered_context(lines, _failed_line(proc.stderr))
            LOG.error("%s in netns %s failed: %s\n%s", what, self.ns.netns, msg, context)
            raise DataplaneError(f"{what} in netns {self.ns.netns} failed: {msg}", details=context)


def _create(name, s):
    maxelem = 65536
    while maxelem < 2 * len(s.members):
        maxelem *= 2
    return f"create {name} {s.set_type} family {s.set_family} maxelem {maxelem}"


def parse_save(text):
    """``ipset save`` output -> {name: KernelSet} for sets named np-*; members canonical and sorted."""
    meta, members = {}, {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[1].startswith(PREFIX):
            continue
        if parts[0] == "create":
            family = 0
            if "family" in parts:
                family = _FAMILY_OF.get(parts[parts.index("family") + 1], 0)
            meta[parts[1]] = (parts[2], family)
            members.setdefault(parts[1], [])
        elif parts[0] == "add":
            members.setdefault(parts[1], []).append(_canonical(parts[2:]))
    out = {}
    for name, (set_type, family) in meta.items():
        out[name] = KernelSet(name, set_type, family, tuple(_sort(members.get(name, []))))
    return out


def _canonical(tokens):
    """'10.0.0.1' -> '10.0.0.1/32', '10.0.0.1,np0123456789a' -> '10.0.0.1/32,np0123456789a'; anything with
    options (nomatch, timeouts) stays visibly different."""
    if len(tokens) == 1 and _V4_NET.match(tokens[0]):
        # ipset prints IPv4 networks canonically already; this path keeps reading 10,000 members cheap.
        return tokens[0] if "/" in tokens[0] else tokens[0] + "/32"
    net, comma, iface = tokens[0].partition(",")
    try:
        text = str(ipaddress.ip_network(net, strict=False)) + comma + iface
    except ValueError:
        text = tokens[0]
    return " ".join([text] + tokens[1:])


def _sort(members):
    """The compiler's order (by family, address, prefix length); anything unparsable last, by text."""

    def key(m):
        if _V4_NET.match(m):
            addr, _, length = m.partition("/")
            return (0, 4, int.from_bytes(socket.inet_aton(addr), "big"), int(length or 32), "")
        try:
            net = ipaddress.ip_network(m)
            return (0, net.version, int(net.network_address), net.prefixlen, "")
        except ValueError:
            return (1, 0, 0, 0, m)

    return sorted(members, key=key)


def _failed_line(stderr):
    m = re.search(r"[Ee]rror in line (\d+)", stderr or "")
    return int(m.group(1)) if m else 0
