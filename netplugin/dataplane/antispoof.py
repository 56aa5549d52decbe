"""IPv6 anti-spoofing: a container may only send from addresses routed back to its own veth.

IPv4 uses the kernel's strict reverse-path filter (rp_filter=1 on each host veth). IPv6 has no rp_filter, so
one raw-table rule does the same job: ``-m rpfilter --invert -j DROP`` in our chain ``np-antispoof``, reached
from raw PREROUTING by one jump for ``-i np+``. The chain is declared in the restore batch, which empties it,
so applying twice never duplicates the rule; the jump is added only when missing. Built-in chains are touched
with that one jump and nothing else.

If the host runs IPv4 rp_filter loose host-wide (``net.ipv4.conf.all.rp_filter=2``), the kernel uses the
maximum of "all" and the interface value, so our strict per-veth setting would be weakened; then the same
chain is installed for IPv4 too (see ``Dataplane.setup_host``).
"""
from netplugin.dataplane.nsexec import run_in_netns

CHAIN = "np-antispoof"
HOOK = f"-A PREROUTING -i np+ -j {CHAIN}"
RULE = f"-A {CHAIN} -m rpfilter --invert -j DROP"
_TOOLS = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}


def _state(save_output: str):
    """(number of hooks, rules in our chain, chain declared) from ``*-save -t raw`` output."""
    lines = [line.strip() for line in save_output.splitlines()]
    hooks = sum(1 for line in lines if line == HOOK)
    rules = [line for line in lines if line.startswith(f"-A {CHAIN} ")]
    declared = any(line.startswith(f":{CHAIN} ") for line in lines)
    return hooks, rules, declared


def render(hooks: int, rules: list, declared: bool) -> str | None:
    """The restore batch that converges the raw table, or None when it already matches."""
    if declared and rules == [RULE] and hooks == 1:
        return None
    batch = ["*raw", f":{CHAIN} - [0:0]", RULE]
    if hooks == 0:
        batch.append(f"-I PREROUTING 1 -i np+ -j {CHAIN}")
    # A hook present more than once would be someone else's bug; leave exactly one.
    batch.extend(f"-D PREROUTING -i np+ -j {CHAIN}" for _ in range(max(0, hooks - 1)))
    batch.append("COMMIT")
    return "\n".join(batch) + "\n"


def _save(netns, family):
    return run_in_netns(netns, [_TOOLS[family][0], "-t", "raw"], f"read the IPv{family} raw table")


def ensure(netns: str | None, family: int = 6) -> bool:
    """Install chain and hook in ``netns``; returns True when something was written."""
    batch = render(*_state(_save(netns, family)))
    if batch is None:
        return False
    run_in_netns(
        netns,
        [_TOOLS[family][1], "--noflush", "-w", "5"],
        f"install the IPv{family} anti-spoofing chain {CHAIN}",
        input=batch,
    )
    return True


def problems(netns: str | None, family: int = 6) -> list:
    hooks, rules, declared = _state(_save(netns, family))
    out = []
    if not declared or rules != [RULE]:
        out.append(f"IPv{family} anti-spoofing chain {CHAIN} is missing or altered in the raw table")
    if hooks != 1:
        out.append(f"IPv{family} raw PREROUTING has {hooks} jumps to {CHAIN}, expected 1")
    return out
