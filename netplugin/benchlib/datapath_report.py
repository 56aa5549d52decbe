"""The data path report: Markdown tables, aims verdicts and the analysis from one results document.

The results document (written as ``datapath.json`` beside the report) holds per-round samples::

    {"date": ..., "machine": {...}, "settings": {...}, "baseline": "host", "complete": true,
     "paths": [{"id": "host", "label": ..., "description": ...}, ...],
     "samples": {"host": {"tcp_131072": [r0, r1, ...], ...}, ...}, "errors": [...]}

Every figure is a median over rounds with min–max, and every ratio is the median of per-round ratios to the
baseline measured in the same round (interleaving makes those pairs close in time, so they tolerate drift).

Every sentence that states a result is built from the numbers of the document it renders (a ratio, a spread, by
how much an aim is missed) and is left out when they are missing; fixed text only describes the method and the
shape of the paths, which do not change from run to run.
"""

from netplugin.benchlib.datapath_chart import render_chart
from netplugin.benchlib.datapath_dataplanes import counters_table, dataplane_lines
from netplugin.benchlib.datapath_diagnosis import diagnosis_lines, render_diagnosis
from netplugin.benchlib.datapath_metrics import (
    AIMS,
    CROSS_HOST,
    LEVEL,
    METRIC_BY_ID,
    TCP_SIZES,
    UDP_SIZES,
    aim_bound,
    aims,
    diag_view,
    meets_aim,
    met_or_missed,
    metric_ratio,
    metric_summary,
    pinning_note,
    ratio_median,
    spread,
)
from netplugin.benchlib.machine import describe
from netplugin.benchlib.markdown import fmt_num, fmt_range, table

__all__ = [
    "AIMS",
    "TCP_SIZES",
    "UDP_SIZES",
    "aims",
    "analysis_lines",
    "diagnosis_lines",
    "render_chart",
    "render_diagnosis",
    "render_markdown",
    "shortfall_line",
    "summary_lines",
]


GROUPS = (
    (
        "TCP throughput",
        "Gbit/s as the receiver counted it; `iperf3 -l` write size per column. Writes of 1–4 KiB "
        "are bound by system calls and by how TCP coalesces them, which varies with scheduling; the 131072 B column "
        "is the data path's.",
        [f"tcp_{n}" for n in TCP_SIZES],
    ),
    (
        "UDP",
        "received rate (offered rate minus losses) and loss.",
        [m for n in UDP_SIZES for m in (f"udp_{n}_rate", f"udp_{n}_loss")],
    ),
    (
        "Latency and CPU cost",
        "sockperf TCP ping-pong (half round trip, as sockperf reports it); CPU seconds per GB moved during TCP tests.",
        ["lat_avg", "lat_p50", "lat_p99", "cpu_tcp_131072", "cpu_iperf_tcp_131072", "cpu_tcp_1024"],
    ),
)

# (path, metric, comparison, bound, what it means)


def _verdict_line(v):
    if v["ratio"] is None:
        return f"- **not measured**: {v['text']}."
    r = v["ratio"]
    word = "met" if v["met"] else "NOT met"
    return (
        f"- **{word}**: {v['text']}: median ratio {fmt_num(r.median)} "
        f"(rounds {fmt_num(r.lo)}–{fmt_num(r.hi)}, n={r.n}), {met_or_missed(v)}."
    )


def _group_tables(doc, metric_ids):
    paths = doc["paths"]
    header = ["path"] + [f"{METRIC_BY_ID[m].label} ({METRIC_BY_ID[m].unit})" for m in metric_ids]
    ratio_header = ["path"] + [METRIC_BY_ID[m].label for m in metric_ids]
    absolute, ratios = [], []
    for p in paths:
        absolute.append([p["label"]] + [fmt_range(metric_summary(doc, p["id"], m)) for m in metric_ids])
        if p["id"] == doc["baseline"]:
            ratios.append([p["label"]] + ["1 (baseline)"] * len(metric_ids))
        else:
            ratios.append([p["label"]] + [fmt_range(metric_ratio(doc, p["id"], m)) for m in metric_ids])
    return table(header, absolute), table(ratio_header, ratios)


def _ptp_shortfall(doc):
    t, lat = ratio_median(doc, "ptp", "tcp_131072"), ratio_median(doc, "ptp", "lat_avg")
    if t is None or lat is None or (meets_aim(t, "tcp_131072") and meets_aim(lat, "lat_avg")):
        return ""
    return f" ptp, with the same shape and no rules, misses the aims too in this run ({fmt_num(t)} and {fmt_num(lat)})."


def _closing_line(doc, diagnosis):
    """What would close the gap: measured options when a diagnosis is at hand, else the candidates."""
    if not diagnosis or "ct-first" not in diagnosis.get("samples", {}):
        if shortfall_line(doc) is None:
            return None
        return (
            "- What could close the iptables dataplane's gap (candidates, not measured here): for policy, keep traffic that no policy "
            "restricts out of conntrack, or accept established flows through an nftables flowtable so they skip "
            "the forward hooks; for the shape, a container device without the veth's per-packet backlog "
            "hand-off (netkit, Linux 6.7+, or ipvlan in L3 mode)." + _ptp_shortfall(doc)
        )

    def diag(state, path="netplugin-2h", metric="lat_p50"):
        return ratio_median(diag_view(diagnosis, state), path, metric) if state in diagnosis["samples"] else None

    ft = diagnosis.get("flowtable") or {}
    if ft.get("supported") and diag("flowtable") is not None:
        fast = (
            f"With a flowtable (established, policy-accepted flows skip routing, the forward hooks and "
            f"conntrack's per-packet work) the diagnosis measured {fmt_num(diag('flowtable'))}× host latency "
            f"(p50) and {fmt_num(diag('flowtable', metric='tcp_131072'))}× host throughput."
        )
    else:
        fast = (
            "The fast path that would take established, policy-accepted flows off that path, an nftables "
            "flowtable, cannot be built here" + (f" ({ft['reason']})" if ft.get("reason") else "") + "."
        )
    floor, bare, ptp = (
        diag("ct-first"),
        diag(diagnosis["states"][-1]["id"]),
        diag(diagnosis["states"][-1]["id"], path="ptp"),
    )
    parts = [
        f"- On the iptables dataplane (`{CROSS_HOST}`), what remains is netfilter's per-packet work on both hosts "
        f"(breakdown below). {fast}"
    ]
    if floor is not None:
        parts.append(
            f"Without it, the least a conntrack-based policy costs on this machine is {fmt_num(floor)}× "
            f"host latency (p50; conntrack plus one established-accept rule at the top of FORWARD)."
        )
        mark = diag("ct-mark")
        if mark is not None:
            parts.append(
                f"netplugin's policy already accepts the packets of connections it accepted before at the "
                f"first rule of its own chain (a conntrack mark set when it accepts a new flow); the same "
                f"rule at the top of FORWARD itself, one jump earlier, measured {fmt_num(mark)}×."
            )
        notrack, built = diag("notrack"), diag(diagnosis["states"][0]["id"])
        if notrack is not None and built is not None and notrack >= built - 0.01:
            parts.append(
                f"Keeping flows out of conntrack does not help while every packet then walks the policy "
                f"chains ({fmt_num(notrack)}× against {fmt_num(built)}× as built)."
            )
    if bare is not None and ptp is not None:
        _, bound = aim_bound("lat_avg")
        side = (
            f"above the {fmt_num(bound)} aim by {(bare - bound) / bound * 100:.0f}%"
            if bare > bound
            else f"within the {fmt_num(bound)} aim"
        )
        shape = (
            ": with the rules gone netplugin is level with ptp, so that part is the routed-veth shape both share"
            if abs(bare - ptp) <= LEVEL
            else ""
        )
        parts.append(
            f"Even with no netfilter at all netplugin stays at {fmt_num(bare)}× (ptp {fmt_num(ptp)}×), {side}{shape}."
        )
    return " ".join(parts)


def shortfall_line(doc):
    """By how much each path's primary aims against host are met or missed, when any is missed; else None."""
    by_path, missed = {}, False
    for v in aims(doc):
        if v["met"] is None or v["text"].startswith("(also") or v["base"] != doc["baseline"]:
            continue
        missed |= v["met"] is False
        what = "throughput" if v["metric"].startswith("tcp") else "latency"
        by_path.setdefault(v["path"], []).append(
            f"{what} {fmt_num(v['ratio'].median)}× host, the aim {'≥' if v['op'] == '>=' else '≤'} "
            f"{fmt_num(v['bound'])}× is {met_or_missed(v)}"
        )
    if not missed:
        return None
    return "- Reached across hosts: " + "; ".join(f"`{p}` {', '.join(parts)}" for p, parts in by_path.items()) + "."


def analysis_lines(doc, diagnosis=None):
    """Plain statements read off the data: where the cross-host path stands and what explains the gap."""
    lines = []
    shortfall = shortfall_line(doc)
    if shortfall:
        lines.append(shortfall)
    lines += dataplane_lines(doc)
    ids = {p["id"] for p in doc["paths"]}
    t_np, l_np = ratio_median(doc, CROSS_HOST, "tcp_131072"), ratio_median(doc, CROSS_HOST, "lat_avg")
    if "ptp" in ids and t_np is not None and l_np is not None:
        t_ptp, l_ptp = ratio_median(doc, "ptp", "tcp_131072"), ratio_median(doc, "ptp", "lat_avg")
        if t_ptp is not None and l_ptp is not None:
            same = (
                f"The reference `ptp` plugin has the same shape as netplugin across hosts (a veth per container, "
                f"a /32 route, plain routing between hosts) but no iptables rules at all: it reaches "
                f"{fmt_num(t_ptp)} of host throughput and {fmt_num(l_ptp)} of host latency; netplugin "
                f"(`{CROSS_HOST}`: iptables, no policy) {fmt_num(t_np)} and {fmt_num(l_np)}."
            )
            if t_np >= t_ptp - 0.03 and l_np <= l_ptp + 0.05:
                lines.append(
                    f"- {same} netplugin is level with ptp, so its own per-packet work (conntrack and the "
                    f"first rules of its policy chains on each host, reverse-path filtering on the host "
                    f"veths) costs little; what remains to host networking is the shape both share."
                )
            else:
                lines.append(
                    f"- {same} The difference between the two is netplugin's own per-packet work on each "
                    f"host: conntrack, the first rules of its policy chains (where established flows are "
                    f"accepted) and strict rp_filter on the host veths; the diagnosis switches them off "
                    f"one by one."
                )
    if "netplugin-1h" in ids:
        t1, l1 = ratio_median(doc, "netplugin-1h", "tcp_131072"), ratio_median(doc, "netplugin-1h", "lat_avg")
        if t1 is not None and l1 is not None:
            lines.append(
                f"- On one host (two veths and one routing decision, no fabric), netplugin moves "
                f"{fmt_num(t1)} of the host↔host rate at {fmt_num(l1)} of its latency."
            )
    for pid, what in (
        ("vxlan", "the VXLAN overlay (encapsulation, 1450-byte MTU)"),
        ("docker-nat", "Docker-style bridge + NAT (conntrack, DNAT and MASQUERADE)"),
    ):
        t, lat = ratio_median(doc, pid, "tcp_131072"), ratio_median(doc, pid, "lat_avg")
        if pid in ids and t is not None and lat is not None:
            lines.append(
                f"- {what[0].upper() + what[1:]}: {fmt_num(t)} of host throughput, {fmt_num(lat)} of host latency."
            )
    for v in aims(doc):
        r = v["ratio"]
        if r is not None and r.lo <= v["bound"] <= r.hi and not v["text"].startswith("(also"):
            lines.append(
                f"- The rounds straddle the bound for {v['text'].split(' at ')[0]} "
                f"({fmt_num(r.lo)}–{fmt_num(r.hi)}): that verdict rests on the median of noisy samples."
            )
    closing = _closing_line(doc, diagnosis)
    if closing:
        lines.append(closing)
    nproc = doc.get("machine", {}).get("nproc")
    lines.append(
        "- Structurally, every packet between two netplugin containers on different hosts crosses two more veth "
        "pairs than host networking does (container→host on the sender, host→container on the receiver), each "
        "a network-namespace change and a softirq hand-off, plus one more route lookup and the forward path's "
        "netfilter hooks on each host. No NIC limits the rate here: sender, receiver and their softirq work share "
        + (f"this machine's {nproc} CPU{'s' if nproc != 1 else ''}" if nproc else "the machine's CPUs")
        + ", so the ratios measure those per-packet costs in CPU time."
    )
    return lines


def _tests_note(settings):
    tests = settings.get("tests")
    return f" ({', '.join(tests)})" if tests else ""


def _udp_offer_note(doc):
    """Whether the offered UDP rate overloaded the baseline, read off its loss (which decides what the received
    rate shows)."""
    losses = [s.median for s in (metric_summary(doc, doc["baseline"], f"udp_{n}_loss") for n in UDP_SIZES) if s]
    if not losses:
        return ""
    worst = max(losses)
    if worst > 0:
        return (
            f"; the baseline itself lost up to {fmt_num(worst)}% at that rate, so the received rate shows each "
            f"path's capacity and the loss how it copes with overload"
        )
    return (
        "; the baseline lost nothing at that rate, so the received rate is capped by the offered rate and "
        "shows where a path falls short of it, not its capacity"
    )


def _spread_note(doc, metric_ids):
    """The baseline's round-to-round spread per column: how far apart rounds are before any path is compared."""
    parts = []
    for m in metric_ids:
        sp = spread(metric_summary(doc, doc["baseline"], m))
        if sp is not None:
            parts.append(f"{METRIC_BY_ID[m].label} {fmt_num(sp)}×")
    if not parts:
        return ""
    return f" Spread of `{doc['baseline']}` across rounds (max / min): {', '.join(parts)}."


def render_markdown(doc, chart_file=None, diagnosis=None):
    """The whole report as Markdown text; ``diagnosis`` is a saved ``--diagnose`` document to quote and link."""
    m = doc.get("machine", {})
    s = doc.get("settings", {})
    tools = m.get("tools", {})
    out = [
        "# Data path: netplugin against host networking and the alternatives",
        "",
        f"Generated by `scripts/bench_datapath.py` on {doc.get('date', '?')} in {fmt_num(doc.get('elapsed_s'))} s. "
        f"Machine: {describe(m)}.",
    ]
    if tools:
        out.append("Tools: " + "; ".join(f"{v}" for v in tools.values() if v) + ".")
    if m.get("loadavg_end"):
        out.append(f"Load average at the end: {' '.join(str(x) for x in m['loadavg_end'])}.")
    out += [
        "",
        f"Method: {s.get('rounds_done', s.get('rounds'))} interleaved rounds (of {s.get('rounds')} planned); in "
        f"each round every test{_tests_note(s)} runs once on every path, the path order rotated from round to round and test to "
        f"test. Each test lasts {s.get('duration_s')} s. UDP tests offer {s.get('udp_bandwidth')}bit/s "
        f"(`iperf3 -b {s.get('udp_bandwidth')}`){_udp_offer_note(doc)}. Latency is "
        f"`sockperf ping-pong --tcp` with its default 14-byte messages. "
        f"Figures are medians over rounds with (min–max); ratios are medians of per-round ratios to "
        f"`{doc['baseline']}` measured in the same round, so drift from other load mostly cancels. "
        f"{pinning_note(s)} All hosts and containers are network namespaces on one fabric bridge. "
        f"The machine is shared: other engineers' tests may load the same cores during a run (see the load "
        f"averages above), so absolute figures wander more than ratios do.",
    ]
    if not doc.get("complete", True):
        out += ["", f"**Incomplete run:** {doc.get('note', 'stopped early')}."]
    out += ["", "## Aims", ""] + [_verdict_line(v) for v in aims(doc)]
    out += ["", "## Why", ""] + analysis_lines(doc, diagnosis)
    if diagnosis:
        out += [
            "",
            f"Measured breakdown ([datapath-diagnosis.md](datapath-diagnosis.md), "
            f"`--diagnose`, {diagnosis.get('date', '?')}): netplugin's hosts with and without its rules:",
            "",
        ]
        out += diagnosis_lines(diagnosis)
    counted = counters_table(doc)
    if counted:
        out += [
            "",
            "## BPF program counters",
            "",
            "What the rounds added to `np_counters` of each bpf path's two endpoints (read from the pinned maps "
            "before and after): `allowed` packets the programs passed and redirected themselves, `to_stack` "
            "packets they handed to the kernel's stack (iptables and routing), `denied` and `spoofed` dropped. "
            "Each endpoint counts what it sends and what it receives.",
            "",
            counted,
        ]
    out += [
        "",
        "## Paths",
        "",
        table(["path", "what it is"], [[p["label"], p["description"]] for p in doc["paths"]], align=["l", "l"]),
    ]
    if chart_file:
        out += ["", f"![data path chart]({chart_file})"]
    for title, note, metric_ids in GROUPS:
        if not any(metric_summary(doc, p["id"], m) for p in doc["paths"] for m in metric_ids):
            continue  # a run restricted with --tests: no empty tables
        absolute, ratios = _group_tables(doc, metric_ids)
        out += [
            "",
            f"## {title}",
            "",
            note + _spread_note(doc, metric_ids),
            "",
            absolute,
            "",
            f"Ratio to `{doc['baseline']}`:",
            "",
            ratios,
        ]
    extra = metric_summary
    rows = [[p["label"], fmt_range(extra(doc, p["id"], "retrans_tcp_131072"))] for p in doc["paths"]]
    out += ["", "TCP retransmits per 131072 B test (sender side):", "", table(["path", "retransmits"], rows)]
    out += [
        "",
        "## How CPU cost is read",
        "",
        "*All cores*: busy time (user, nice, system, irq, softirq) of every CPU from `/proc/stat` between the "
        "start and end of the iperf3 client, per 10^9 bytes received. It includes the kernel's softirq work for "
        "the veths and the fabric, but also whatever else ran on the machine at that moment. *iperf3 "
        "processes*: iperf3's own `cpu_utilization_percent` of sender and receiver (their user+system time), "
        "which excludes other load but also most softirq work. When both cores are saturated, CPU per GB "
        "mirrors throughput.",
    ]
    errors = doc.get("errors") or []
    if errors:
        out += ["", f"## Failed samples ({len(errors)})", "", "Recorded as missing, not as zero:", ""]
        out += [f"- {e}" for e in errors[:20]]
        if len(errors) > 20:
            out.append(f"- … and {len(errors) - 20} more (see datapath.json)")
    return "\n".join(out) + "\n"


def summary_lines(doc):
    """A few lines for the terminal: per path, 131072 B TCP and average latency with their ratios."""
    lines = []
    for p in doc["paths"]:
        t = metric_summary(doc, p["id"], "tcp_131072")
        lat = metric_summary(doc, p["id"], "lat_avg")
        rt, rl = metric_ratio(doc, p["id"], "tcp_131072"), metric_ratio(doc, p["id"], "lat_avg")
        lines.append(
            f"{p['label']:<38} TCP 128K {fmt_num(t and t.median):>6} Gbit/s "
            f"(x{fmt_num(rt and rt.median)})  latency {fmt_num(lat and lat.median):>6} us "
            f"(x{fmt_num(rl and rl.median)})"
        )
    for v in aims(doc):
        lines.append(_verdict_line(v)[2:])
    return lines


# (state id, what it adds over the previous step) from no netfilter at all up to as built.
