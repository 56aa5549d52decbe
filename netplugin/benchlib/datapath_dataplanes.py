"""The data path report's reading of the two dataplanes (iptables and bpf): whether the bpf programs carried the
traffic, what a 10,000-CIDR policy costs on each, and so why each dataplane's aims are met or missed.

The evidence is the run's own: ``doc["counters"]`` holds, per bpf path, what the rounds added to ``np_counters``
of the endpoints at its two ends (``allowed``: packets the programs passed and redirected themselves;
``to_stack``: packets they handed to the kernel's stack, where iptables and routing decide). Every sentence is
built from the document's numbers and left out when they are missing.
"""

from netplugin.benchlib.datapath_metrics import (
    BPF,
    CROSS_HOST,
    IPTABLES,
    LEVEL,
    NO_POLICY,
    aims,
    met_or_missed,
    metric_ratio,
)
from netplugin.benchlib.markdown import fmt_num, table

CARRIED = 0.99  # at least this share of allowed packets: the programs carried the traffic
HANDED_BACK = 0.01  # at most this share: every packet went to the stack
BPF_NO_POLICY = NO_POLICY["netplugin-bpf-10k"]


def counter_totals(doc, path_id):
    """A path's counters summed over its ends ({counter: packets}), or None when the run holds none for it."""
    ends = (doc.get("counters") or {}).get(path_id)
    if not ends or any(c is None for c in ends.values()):
        return None
    out = {}
    for c in ends.values():
        for name, n in c.items():
            out[name] = out.get(name, 0) + n
    return out


def carried_share(totals):
    """The share of the packets the programs saw that they passed and redirected themselves, or None."""
    if not totals:
        return None
    seen = totals.get("allowed", 0) + totals.get("to_stack", 0)
    return totals.get("allowed", 0) / seen if seen else None


def _pct(share):
    return f"{share * 100:.1f}%" if 0 < share < 0.999 else f"{share * 100:.0f}%"


def counters_line(doc, path_id):
    """What the programs did with ``path_id``'s packets, from its np_counters, or None without counters."""
    t = counter_totals(doc, path_id)
    if t is None:
        return None
    figures = f"np_counters of its two endpoints: allowed {t['allowed']:,}, to_stack {t['to_stack']:,}"
    if t.get("denied"):
        figures += f", denied {t['denied']:,}"
    share = carried_share(t)
    if share is None:
        return f"- `{path_id}`: the programs saw none of its packets during the rounds ({figures})."
    if share >= CARRIED:
        return (
            f"- `{path_id}`: the programs carried {_pct(share)} of its packets ({figures}): policy was decided in "
            f"BPF and the packets were redirected past the hosts' netfilter and routing, on both hosts."
        )
    if share <= HANDED_BACK:
        return (
            f"- `{path_id}`: the programs handed {_pct(1 - share)} of its packets to the kernel's stack ({figures}): "
            f"iptables enforced the policy and the kernel routed, as on the iptables dataplane, with the "
            f"programs' own per-packet cost on top."
        )
    return (
        f"- `{path_id}`: the programs carried {_pct(share)} of its packets and handed the rest to the stack "
        f"({figures})."
    )


def _pair(doc, path_id, base_id=None):
    """(throughput ratio, latency ratio) of ``path_id`` to host, or to ``base_id``, or None when unmeasured."""
    t, lat = (metric_ratio(doc, path_id, m, base_id) for m in ("tcp_131072", "lat_avg"))
    return None if t is None or lat is None else (t.median, lat.median)


def _verdicts(doc, path_id):
    """'met by 2%' / 'missed by 45%' for the path's primary throughput and latency aims, in that order."""
    out = []
    for v in aims(doc):
        if v["path"] == path_id and v["ratio"] is not None and not v["text"].startswith("(also"):
            out.append(met_or_missed(v))
    return out


def dataplane_lines(doc):
    """Why the two dataplanes land where they do, from the ratios and the bpf counters."""
    lines = []
    bpf, ipt, ptp = _pair(doc, BPF), _pair(doc, IPTABLES), _pair(doc, "ptp")
    if bpf:
        parts = [f"- `{BPF}` reaches {fmt_num(bpf[0])}× host throughput and {fmt_num(bpf[1])}× host latency"]
        if ipt:
            parts.append(f"; `{IPTABLES}`, the same policy in iptables, {fmt_num(ipt[0])}× and {fmt_num(ipt[1])}×")
        if ptp:
            parts.append(
                f"; `ptp`, the same veth shape with no rules at all, {fmt_num(ptp[0])}× and {fmt_num(ptp[1])}×"
            )
        if ptp and abs(bpf[1] - ptp[1]) <= LEVEL:
            parts.append(": level with ptp in latency, so policy in BPF costs no more than having no rules at all")
        lines.append("".join(parts) + ".")
    counted = counters_line(doc, BPF)
    if counted:
        lines.append(counted)
    share = carried_share(counter_totals(doc, BPF))
    if bpf and ipt and share is not None and share <= HANDED_BACK:
        lines.append(
            f"- So this run measured the bpf dataplane with its redirects not carrying the traffic: its ratios "
            f"are the iptables path's ({fmt_num(abs(bpf[1] - ipt[1]))} apart in latency), and say nothing "
            f"yet about redirects."
        )
    elif bpf and share is not None and share >= CARRIED and bpf[1] > 1.10:
        lines.append(
            f"- With the redirects carrying the traffic, what remains to host latency ({fmt_num(bpf[1])}×) is "
            f"the two veth crossings per packet that a redirect keeps (a namespace change and a wake-up on "
            f"the other side each); a container device without them (netkit) is not in this kernel."
        )
    fwd = forwarded_line(doc)
    if fwd:
        lines.append(fwd)
    lines += cidr_lines(doc)
    return lines


def forwarded_line(doc):
    """The kernel's own IP forwarding count on each lab's hosts during the rounds: a redirect never reaches it."""
    fwd = doc.get("forwarded") or {}
    if "bpf" not in fwd or "iptables" not in fwd:
        return None
    n_bpf, n_ipt = sum(fwd["bpf"].values()), sum(fwd["iptables"].values())
    line = (
        f"- The kernel's IP forwarding (`ForwDatagrams` in /proc/net/snmp) passed on {n_bpf:,} packets on the bpf "
        f"lab's two hosts during the rounds, {n_ipt:,} on the iptables lab's (all of each lab's paths)"
    )
    if n_ipt and n_bpf <= 0.05 * n_ipt:
        return line + ": on the bpf lab the redirects bypassed the kernel's forwarding, and so netfilter's FORWARD."
    if n_ipt and n_bpf >= 0.5 * n_ipt:
        return line + ": the bpf lab's traffic took the kernel's forwarding path (and netfilter) as the iptables lab's."
    return line + "."


def cidr_lines(doc):
    """What 10,000 CIDRs in the receiver's allow rule cost on each dataplane, against no policy."""
    lines = []
    for path_id, base_id in NO_POLICY.items():
        pair = _pair(doc, path_id, base_id)
        if not pair:
            continue
        verdicts = _verdicts(doc, path_id)
        said = f" (aims: throughput {verdicts[0]}, latency {verdicts[1]})" if len(verdicts) == 2 else ""
        line = (
            f"- `{path_id}`: with 10,000 CIDRs in the receiver's allow rule, {fmt_num(pair[0])}× the throughput "
            f"and {fmt_num(pair[1])}× the latency of `{base_id}`{said}."
        )
        if base_id == CROSS_HOST:
            line += (
                " The CIDRs are one hash:net ipset behind one rule, matched for a connection's first packet; the "
                "packets after it are accepted by the connection-mark rule at the top of the endpoint's chain, "
                "so past a connection's first packet the list's length adds nothing per packet."
            )
        else:
            share = carried_share(counter_totals(doc, path_id))
            if share is not None and share <= HANDED_BACK:
                line += " Its programs handed every packet to the stack, so the ipset enforced the CIDRs, as above."
            elif share is not None and share >= CARRIED:
                line += (
                    " The CIDRs are LPM entries in np_pol_peers, one lookup for a flow's first packet; its verdict "
                    "then sits in the flow table."
                )
        lines.append(line)
    return lines


def counters_table(doc):
    """Markdown table of every bpf path's np_counters per end, or None when the run holds none."""
    rows = []
    for p in doc.get("paths", []):
        for end, c in ((doc.get("counters") or {}).get(p["id"]) or {}).items():
            if c is None:
                rows.append([p["label"], end, "—", "—", "—", "—", "—"])
                continue
            share = carried_share(c)
            rows.append(
                [
                    p["label"],
                    end,
                    f"{c['allowed']:,}",
                    f"{c['to_stack']:,}",
                    f"{c['denied']:,}",
                    f"{c['spoofed']:,}",
                    "—" if share is None else _pct(share),
                ]
            )
    if not rows:
        return None
    return table(["path", "endpoint", "allowed", "to_stack", "denied", "spoofed", "carried by the programs"], rows)
