"""The host states of ``bench_datapath.py --diagnose``: netplugin's two hosts switched from as built to no
netfilter at all, one step at a time, so the report can say what each step costs (datapath_diagnosis.py).
Each state's ``apply(lab, saved)`` starts from the rules saved as built; the agents are paused meanwhile.
"""

from dataclasses import dataclass

from policy.compiler import CompileOptions


# nft texts for the states below (nft 1.0.6 wants ';' after a one-line chain's closing brace).
CT_ONLY_NFT = "table ip npdiag { chain out { type filter hook output priority 0; ct state established accept; }; }\n"
EMPTY_CHAIN_NFT = "table ip npdiag { chain forward { type filter hook forward priority 0; }; }\n"
FLOWTABLE_PROBE_DEV = "npdiagprobe0"


def flowtable_nft(devices):
    """The candidate fast path: a flowtable on the host's veths and uplink, fed by a forward chain that runs after
    iptables' filter chain, so only flows the policy accepted (and conntrack saw established) are offloaded."""
    devs = ", ".join(f'"{d}"' for d in sorted(devices))
    return (
        f"table inet npdiag {{\n  flowtable ft {{ hook ingress priority 0; devices = {{ {devs} }}; }}\n"
        f"  chain forward {{ type filter hook forward priority filter + 10; policy accept;\n"
        f"    ct state established flow add @ft\n  }}\n}}\n"
    )


def flowtable_support(lab, ns):
    """(supported, reason): ask the kernel with ``nft -c`` (check only, nothing is committed) in ``ns``."""
    dev = FLOWTABLE_PROBE_DEV
    lab.sh(ns, f"ip link add {dev} type veth peer name {dev}p")
    try:
        p = lab.sh(ns, "nft -c -f -", input=flowtable_nft([dev]), check=False)
    finally:
        lab.sh(ns, f"ip link del {dev}", check=False)
    if p.returncode == 0:
        return True, "the kernel accepts flowtables"
    err = (p.stderr or p.stdout).strip().splitlines()
    first = err[0].split("Error: ", 1)[-1] if err else f"exit status {p.returncode}"
    return False, f"`nft` answers '{first}' to a flowtable{kernel_config_note('CONFIG_NF_FLOW_TABLE')}"


def kernel_config_note(option):
    """', and the kernel is built without OPTION' when /proc/config.gz says so; else ''."""
    import gzip

    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            unset = f"# {option} is not set" in f.read()
    except OSError:
        return ""
    return f": the kernel is built without {option}" if unset else ""


def host_devices(lab, ns):
    """Every device of a netplugin host but lo: its container veths (np*) and its uplink (eth0)."""
    out = []
    for line in lab.sh(ns, "ip -o link show").stdout.splitlines():
        dev = line.split(":")[1].strip().split("@")[0]
        if dev != "lo":
            out.append(dev)
    return out


def _reset(lab, saved, strict_rpf=True):
    """Every netfilter table of the host emptied, then the agent's rules as saved put back."""
    for ns in lab.netplugin["hosts"]:
        lab.sh(ns, "nft flush ruleset")
        lab.sh(ns, "iptables-restore -w 5", input=saved[ns][0])
        lab.sh(ns, "ip6tables-restore -w 5", input=saved[ns][1])
        _rp_filter(lab, ns, strict_rpf)


def _flush(lab, strict_rpf=True, nft=None):
    for ns in lab.netplugin["hosts"]:
        lab.sh(ns, "nft flush ruleset")
        if nft:
            lab.sh(ns, "nft -f -", input=nft)
        _rp_filter(lab, ns, strict_rpf)


def _rp_filter(lab, ns, strict):
    for dev in host_devices(lab, ns):
        if dev.startswith("np"):
            lab.sh(ns, f"sysctl -qw net.ipv4.conf.{dev}.rp_filter={1 if strict else 0}")


def _ct_first(lab, saved):
    _reset(lab, saved)
    for ns in lab.netplugin["hosts"]:
        lab.sh(ns, "iptables -w 5 -I FORWARD 1 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")


# The conntrack mark bit netplugin's policy sets on connections it accepted (policy/compiler.py).
FAST_CTMARK = f"{CompileOptions().accepted_mark:#x}"
FAST_ACCEPT = f"-m connmark --mark {FAST_CTMARK}/{FAST_CTMARK} -j ACCEPT"


def _ct_mark(lab, saved):
    """As built, with the policy's fast-accept rule (the first of np-FORWARD: packets of connections it accepted
    before) also at the very top of FORWARD, one jump earlier. Other writers' traffic is untouched."""
    _reset(lab, saved)
    for ns in lab.netplugin["hosts"]:
        lab.sh(ns, f"iptables -w 5 -I FORWARD 1 {FAST_ACCEPT}")


def ct_mark_hits(lab):
    """Packets the fast-accept rule took on each host (proof that established flows stopped there)."""
    out = {}
    for ns in lab.netplugin["hosts"]:
        first = lab.sh(ns, "iptables -w 5 -L FORWARD 1 -v -x -n").stdout.split()
        out[ns] = int(first[0]) if first and first[0].isdigit() else None
    return out


def _notrack(lab, saved):
    _reset(lab, saved)
    for ns in lab.netplugin["hosts"]:
        for chain in ("PREROUTING", "OUTPUT"):
            lab.sh(ns, f"iptables -w 5 -t raw -I {chain} 1 -j NOTRACK")


def _flowtable(lab, saved):
    _reset(lab, saved)
    for ns in lab.netplugin["hosts"]:
        lab.sh(ns, "nft -f -", input=flowtable_nft(host_devices(lab, ns)))


@dataclass(frozen=True)
class DiagState:
    id: str
    label: str
    description: str
    apply: object  # (lab, saved) -> None


# Ordered from the full cost to none: the first is as built, the last has nothing of netplugin's per-packet work.
DIAG_STATES = (
    DiagState(
        "as-built",
        "as built",
        "netplugin's iptables rules (policy chains, the conntrack they use) and strict "
        "rp_filter on the host veths, as the agent made them",
        _reset,
    ),
    DiagState(
        "flowtable",
        "as built + flowtable",
        "as built, plus an nftables flowtable on the host's veths and "
        "uplink, fed by a forward chain after iptables' filter chain (`ct state established flow add`): the "
        "software fast path for established, policy-accepted flows",
        _flowtable,
    ),
    DiagState(
        "ct-mark",
        "fast accept in FORWARD",
        "as built, with the policy's fast-accept rule (packets of "
        "connections its chains accepted before, by their conntrack mark; today the first rule of np-FORWARD) "
        "also at the top of FORWARD itself, one jump earlier (others' traffic untouched)",
        _ct_mark,
    ),
    DiagState(
        "ct-first",
        "conntrack + one rule",
        "as built, plus one rule at the top of FORWARD accepting "
        "established flows: the least per-packet work a conntrack-based policy can do (a layout for "
        "comparison, not what the policy writes)",
        _ct_first,
    ),
    DiagState(
        "notrack",
        "as built, untracked",
        "as built, plus NOTRACK for every IPv4 packet in the raw table: "
        "the policy chains run in full for every packet (no established shortcut) and conntrack does nothing "
        "(what keeping traffic out of conntrack costs with today's chains)",
        _notrack,
    ),
    DiagState(
        "ct-only",
        "conntrack, no filter chain",
        "every rule removed, conntrack kept on (its hooks held by "
        "one rule on the output hook, which forwarded packets never reach)",
        lambda lab, saved: _flush(lab, nft=CT_ONLY_NFT),
    ),
    DiagState(
        "empty-chain",
        "one empty forward chain",
        "every rule removed and no conntrack, but one empty filter "
        "chain on the forward hook: what one netfilter hook costs by itself",
        lambda lab, saved: _flush(lab, nft=EMPTY_CHAIN_NFT),
    ),
    DiagState(
        "no-rules",
        "no netfilter rules",
        "every netfilter table flushed on both hosts (no conntrack, no hooks); rp_filter still strict",
        lambda lab, saved: _flush(lab),
    ),
    DiagState(
        "bare",
        "no rules, no rp_filter",
        "as above, and rp_filter off on the host veths",
        lambda lab, saved: _flush(lab, strict_rpf=False),
    ),
)
DIAG_STATE_IDS = tuple(st.id for st in DIAG_STATES)
