"""The data path report: Markdown tables, aims verdicts and a PNG chart from one results document.

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
from dataclasses import dataclass

from netplugin.benchlib.machine import describe
from netplugin.benchlib.markdown import fmt_num, fmt_range, table
from netplugin.benchlib.stats import ratio_summary, summarize

TCP_SIZES = (1024, 2048, 4096, 131072)
UDP_SIZES = (1024, 4096)
CROSS_HOST = "netplugin-2h"
LEVEL = 0.05  # ratios to host this close count as level (the noise of a median of a few rounds on a shared box)


@dataclass(frozen=True)
class Metric:
    id: str
    label: str
    unit: str
    better: str  # "higher" or "lower"


METRICS = (
    [Metric(f"tcp_{n}", f"TCP {n} B writes", "Gbit/s", "higher") for n in TCP_SIZES]
    + [m for n in UDP_SIZES for m in (Metric(f"udp_{n}_rate", f"UDP {n} B received", "Gbit/s", "higher"),
                                      Metric(f"udp_{n}_loss", f"UDP {n} B loss", "%", "lower"))]
    + [Metric("lat_avg", "TCP ping-pong avg", "µs", "lower"),
       Metric("lat_p50", "TCP ping-pong p50", "µs", "lower"),
       Metric("lat_p99", "TCP ping-pong p99", "µs", "lower"),
       Metric("cpu_tcp_131072", "CPU, all cores, TCP 131072 B", "s/GB", "lower"),
       Metric("cpu_iperf_tcp_131072", "CPU, iperf3 processes, TCP 131072 B", "s/GB", "lower"),
       Metric("retrans_tcp_131072", "TCP 131072 B retransmits", "segments", "lower")]
    + [Metric(f"cpu_tcp_{n}", f"CPU, all cores, TCP {n} B", "s/GB", "lower") for n in TCP_SIZES if n != 131072]
)
METRIC_BY_ID = {m.id: m for m in METRICS}

GROUPS = (
    ("TCP throughput", "Gbit/s as the receiver counted it; `iperf3 -l` write size per column. Writes of 1–4 KiB "
     "are bound by system calls and by how TCP coalesces them, which varies with scheduling; the 131072 B column "
     "is the data path's.",
     [f"tcp_{n}" for n in TCP_SIZES]),
    ("UDP", "received rate (offered rate minus losses) and loss.",
     [m for n in UDP_SIZES for m in (f"udp_{n}_rate", f"udp_{n}_loss")]),
    ("Latency and CPU cost", "sockperf TCP ping-pong (half round trip, as sockperf reports it); CPU seconds per "
     "GB moved during TCP tests.",
     ["lat_avg", "lat_p50", "lat_p99", "cpu_tcp_131072", "cpu_iperf_tcp_131072", "cpu_tcp_1024"]),
)

# (path, metric, comparison, bound, what it means)
AIMS = (
    (CROSS_HOST, "tcp_131072", ">=", 0.97, "cross-host TCP throughput (131072 B writes) at least 0.97 of host"),
    (CROSS_HOST, "lat_avg", "<=", 1.10, "cross-host TCP ping-pong latency (average) at most 1.10 of host"),
    (CROSS_HOST, "lat_p50", "<=", 1.10, "(also read) cross-host TCP ping-pong latency (p50) at most 1.10 of host"),
    (CROSS_HOST, "lat_p99", "<=", 1.10, "(also read) cross-host TCP ping-pong latency (p99) at most 1.10 of host"),
)


def _samples(doc, path_id, metric_id):
    return doc["samples"].get(path_id, {}).get(metric_id, [])


def metric_summary(doc, path_id, metric_id):
    return summarize(_samples(doc, path_id, metric_id))


def metric_ratio(doc, path_id, metric_id):
    base = _samples(doc, doc["baseline"], metric_id)
    vals = _samples(doc, path_id, metric_id)
    if not base or len(base) != len(vals):
        return None
    return ratio_summary(vals, base)


def aims(doc):
    """One verdict per aim: dict(text, ratio Summary or None, met True/False/None)."""
    out = []
    for path_id, metric_id, op, bound, text in AIMS:
        r = metric_ratio(doc, path_id, metric_id)
        met = None if r is None else (r.median >= bound if op == ">=" else r.median <= bound)
        out.append({"text": text, "path": path_id, "metric": metric_id, "bound": bound, "op": op,
                    "ratio": r, "met": met})
    return out


def _verdict_line(v):
    if v["ratio"] is None:
        return f"- **not measured**: {v['text']}."
    r = v["ratio"]
    word = "met" if v["met"] else "NOT met"
    return (f"- **{word}**: {v['text']}: median ratio {fmt_num(r.median)} "
            f"(rounds {fmt_num(r.lo)}–{fmt_num(r.hi)}, n={r.n}).")


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


def _ratio_median(doc, path_id, metric_id):
    r = metric_ratio(doc, path_id, metric_id)
    return None if r is None else r.median


def _ptp_shortfall(doc):
    t, lat = _ratio_median(doc, "ptp", "tcp_131072"), _ratio_median(doc, "ptp", "lat_avg")
    if t is None or lat is None or (_meets(t, "tcp_131072") and _meets(lat, "lat_avg")):
        return ""
    return (f" ptp, with the same shape and no rules, misses the aims too in this run ({fmt_num(t)} and "
            f"{fmt_num(lat)}).")


def _closing_line(doc, diagnosis):
    """What would close the gap: measured options when a diagnosis is at hand, else the candidates."""
    if not diagnosis or "ct-first" not in diagnosis.get("samples", {}):
        if shortfall_line(doc) is None:
            return None
        return ("- What could close the gap (candidates, not measured here): for policy, keep traffic that no policy "
                "restricts out of conntrack, or accept established flows through an nftables flowtable so they skip "
                "the forward hooks; for the shape, a container device without the veth's per-packet backlog "
                "hand-off (netkit, Linux 6.7+, or ipvlan in L3 mode)." + _ptp_shortfall(doc))

    def diag(state, path="netplugin-2h", metric="lat_p50"):
        return _ratio_median(_diag_view(diagnosis, state), path, metric) if state in diagnosis["samples"] else None
    ft = diagnosis.get("flowtable") or {}
    if ft.get("supported") and diag("flowtable") is not None:
        fast = (f"With a flowtable (established, policy-accepted flows skip routing, the forward hooks and "
                f"conntrack's per-packet work) the diagnosis measured {fmt_num(diag('flowtable'))}× host latency "
                f"(p50) and {fmt_num(diag('flowtable', metric='tcp_131072'))}× host throughput.")
    else:
        fast = ("The fast path that would take established, policy-accepted flows off that path, an nftables "
                "flowtable, cannot be built here" + (f" ({ft['reason']})" if ft.get("reason") else "") + ".")
    floor, bare, ptp = diag("ct-first"), diag(diagnosis["states"][-1]["id"]), diag(
        diagnosis["states"][-1]["id"], path="ptp")
    parts = [f"- What remains is netfilter's per-packet work on both hosts (breakdown below). {fast}"]
    if floor is not None:
        parts.append(f"Without it, the least a conntrack-based policy costs on this machine is {fmt_num(floor)}× "
                     f"host latency (p50; conntrack plus one established-accept rule at the top of FORWARD).")
        mark = diag("ct-mark")
        if mark is not None:
            parts.append(f"netplugin's policy already accepts the packets of connections it accepted before at the "
                         f"first rule of its own chain (a conntrack mark set when it accepts a new flow); the same "
                         f"rule at the top of FORWARD itself, one jump earlier, measured {fmt_num(mark)}×.")
        notrack, built = diag("notrack"), diag(diagnosis["states"][0]["id"])
        if notrack is not None and built is not None and notrack >= built - 0.01:
            parts.append(f"Keeping flows out of conntrack does not help while every packet then walks the policy "
                         f"chains ({fmt_num(notrack)}× against {fmt_num(built)}× as built).")
    if bare is not None and ptp is not None:
        _, bound = _bound("lat_avg")
        side = (f"above the {fmt_num(bound)} aim by {(bare - bound) / bound * 100:.0f}%" if bare > bound
                else f"within the {fmt_num(bound)} aim")
        shape = (": with the rules gone netplugin is level with ptp, so that part is the routed-veth shape both share"
                 if abs(bare - ptp) <= LEVEL else "")
        parts.append(f"Even with no netfilter at all netplugin stays at {fmt_num(bare)}× (ptp {fmt_num(ptp)}×), "
                     f"{side}{shape}.")
    return " ".join(parts)


def missed_by(v):
    """How far a verdict's median ratio is on the wrong side of its bound, in percent of the bound."""
    return abs(v["ratio"].median - v["bound"]) / v["bound"] * 100


def shortfall_line(doc):
    """By how much the two main aims are missed (the primary throughput and average-latency aims), or None."""
    missed = []
    for v in aims(doc):
        if v["met"] is not False or v["text"].startswith("(also"):
            continue
        what = "throughput" if v["metric"].startswith("tcp") else "latency"
        missed.append(f"{what} {fmt_num(v['ratio'].median)}× host, the aim {'≥' if v['op'] == '>=' else '≤'} "
                      f"{fmt_num(v['bound'])}× is missed by {missed_by(v):.0f}%")
    if not missed:
        return None
    return f"- Reached across hosts: {'; '.join(missed)}."


def _bound(metric_id):
    """The bound of the primary aim on ``metric_id`` (AIMS), with its comparison."""
    for _path, metric, op, bound, text in AIMS:
        if metric == metric_id and not text.startswith("(also"):
            return op, bound
    raise KeyError(metric_id)


def _meets(ratio, metric_id):
    op, bound = _bound(metric_id)
    return ratio >= bound if op == ">=" else ratio <= bound


def analysis_lines(doc, diagnosis=None):
    """Plain statements read off the data: where the cross-host path stands and what explains the gap."""
    lines = []
    shortfall = shortfall_line(doc)
    if shortfall:
        lines.append(shortfall)
    ids = {p["id"] for p in doc["paths"]}
    t_np, l_np = _ratio_median(doc, CROSS_HOST, "tcp_131072"), _ratio_median(doc, CROSS_HOST, "lat_avg")
    if "ptp" in ids and t_np is not None and l_np is not None:
        t_ptp, l_ptp = _ratio_median(doc, "ptp", "tcp_131072"), _ratio_median(doc, "ptp", "lat_avg")
        if t_ptp is not None and l_ptp is not None:
            same = (f"The reference `ptp` plugin has the same shape as netplugin across hosts (a veth per container, "
                    f"a /32 route, plain routing between hosts) but no iptables rules at all: it reaches "
                    f"{fmt_num(t_ptp)} of host throughput and {fmt_num(l_ptp)} of host latency; netplugin "
                    f"{fmt_num(t_np)} and {fmt_num(l_np)}.")
            if t_np >= t_ptp - 0.03 and l_np <= l_ptp + 0.05:
                lines.append(f"- {same} netplugin is level with ptp, so its own per-packet work (conntrack and the "
                             f"first rules of its policy chains on each host, reverse-path filtering on the host "
                             f"veths) costs little; what remains to host networking is the shape both share.")
            else:
                lines.append(f"- {same} The difference between the two is netplugin's own per-packet work on each "
                             f"host: conntrack, the first rules of its policy chains (where established flows are "
                             f"accepted) and strict rp_filter on the host veths; the diagnosis switches them off "
                             f"one by one.")
    if "netplugin-1h" in ids:
        t1, l1 = _ratio_median(doc, "netplugin-1h", "tcp_131072"), _ratio_median(doc, "netplugin-1h", "lat_avg")
        if t1 is not None and l1 is not None:
            lines.append(f"- On one host (two veths and one routing decision, no fabric), netplugin moves "
                         f"{fmt_num(t1)} of the host↔host rate at {fmt_num(l1)} of its latency.")
    for pid, what in (("vxlan", "the VXLAN overlay (encapsulation, 1450-byte MTU)"),
                      ("docker-nat", "Docker-style bridge + NAT (conntrack, DNAT and MASQUERADE)")):
        t, lat = _ratio_median(doc, pid, "tcp_131072"), _ratio_median(doc, pid, "lat_avg")
        if pid in ids and t is not None and lat is not None:
            lines.append(f"- {what[0].upper() + what[1:]}: {fmt_num(t)} of host throughput, {fmt_num(lat)} of "
                         f"host latency.")
    for v in aims(doc):
        r = v["ratio"]
        if r is not None and r.lo <= v["bound"] <= r.hi and not v["text"].startswith("(also"):
            lines.append(f"- The rounds straddle the bound for {v['text'].split(' at ')[0]} "
                         f"({fmt_num(r.lo)}–{fmt_num(r.hi)}): that verdict rests on the median of noisy samples.")
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
        + ", so the ratios measure those per-packet costs in CPU time.")
    return lines


def _pinning_note(settings):
    if settings.get("latency_pinned"):
        return ("Throughput tests are not pinned. Both ends of a latency test are pinned to the same CPU (CPU = "
                "round number modulo the CPU count, the same for every path in a round): unpinned, a ping-pong "
                "between two processes is bimodal (both ends on one CPU, or an inter-processor interrupt per "
                "wake-up), and which mode a sample landed in would swamp the difference between paths.")
    return "Nothing is pinned to a CPU."


def _udp_offer_note(doc):
    """Whether the offered UDP rate overloaded the baseline, read off its loss (which decides what the received
    rate shows)."""
    losses = [s.median for s in (metric_summary(doc, doc["baseline"], f"udp_{n}_loss") for n in UDP_SIZES) if s]
    if not losses:
        return ""
    worst = max(losses)
    if worst > 0:
        return (f"; the baseline itself lost up to {fmt_num(worst)}% at that rate, so the received rate shows each "
                f"path's capacity and the loss how it copes with overload")
    return ("; the baseline lost nothing at that rate, so the received rate is capped by the offered rate and "
            "shows where a path falls short of it, not its capacity")


def _spread(summary):
    """Round-to-round spread of a summary as max / min, or None."""
    if summary is None or summary.n < 2 or summary.lo <= 0:
        return None
    return summary.hi / summary.lo


def _spread_note(doc, metric_ids):
    """The baseline's round-to-round spread per column: how far apart rounds are before any path is compared."""
    parts = []
    for m in metric_ids:
        sp = _spread(metric_summary(doc, doc["baseline"], m))
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
        f"each round every test runs once on every path, the path order rotated from round to round and test to "
        f"test. Each test lasts {s.get('duration_s')} s. UDP tests offer {s.get('udp_bandwidth')}bit/s "
        f"(`iperf3 -b {s.get('udp_bandwidth')}`){_udp_offer_note(doc)}. Latency is "
        f"`sockperf ping-pong --tcp` with its default 14-byte messages. "
        f"Figures are medians over rounds with (min–max); ratios are medians of per-round ratios to "
        f"`{doc['baseline']}` measured in the same round, so drift from other load mostly cancels. "
        f"{_pinning_note(s)} All hosts and containers are network namespaces on one fabric bridge. "
        f"The machine is shared: other engineers' tests may load the same cores during a run (see the load "
        f"averages above), so absolute figures wander more than ratios do.",
    ]
    if not doc.get("complete", True):
        out += ["", f"**Incomplete run:** {doc.get('note', 'stopped early')}."]
    out += ["", "## Aims", ""] + [_verdict_line(v) for v in aims(doc)]
    out += ["", "## Why", ""] + analysis_lines(doc, diagnosis)
    if diagnosis:
        out += ["", f"Measured breakdown ([datapath-diagnosis.md](datapath-diagnosis.md), "
                    f"`--diagnose`, {diagnosis.get('date', '?')}): netplugin's hosts with and without its rules:", ""]
        out += diagnosis_lines(diagnosis)
    out += ["", "## Paths", "",
            table(["path", "what it is"], [[p["label"], p["description"]] for p in doc["paths"]], align=["l", "l"])]
    if chart_file:
        out += ["", f"![data path chart]({chart_file})"]
    for title, note, metric_ids in GROUPS:
        absolute, ratios = _group_tables(doc, metric_ids)
        out += ["", f"## {title}", "", note + _spread_note(doc, metric_ids), "", absolute, "",
                f"Ratio to `{doc['baseline']}`:", "", ratios]
    extra = metric_summary
    rows = [[p["label"], fmt_range(extra(doc, p["id"], "retrans_tcp_131072"))] for p in doc["paths"]]
    out += ["", "TCP retransmits per 131072 B test (sender side):", "", table(["path", "retransmits"], rows)]
    out += ["", "## How CPU cost is read", "",
            "*All cores*: busy time (user, nice, system, irq, softirq) of every CPU from `/proc/stat` between the "
            "start and end of the iperf3 client, per 10^9 bytes received. It includes the kernel's softirq work for "
            "the veths and the fabric, but also whatever else ran on the machine at that moment. *iperf3 "
            "processes*: iperf3's own `cpu_utilization_percent` of sender and receiver (their user+system time), "
            "which excludes other load but also most softirq work. When both cores are saturated, CPU per GB "
            "mirrors throughput."]
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
        lines.append(f"{p['label']:<38} TCP 128K {fmt_num(t and t.median):>6} Gbit/s "
                     f"(x{fmt_num(rt and rt.median)})  latency {fmt_num(lat and lat.median):>6} us "
                     f"(x{fmt_num(rl and rl.median)})")
    for v in aims(doc):
        lines.append(_verdict_line(v)[2:])
    return lines


def render_chart(doc, png_path):
    """Write the PNG chart; returns None on success or a one-line reason (e.g. matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (PyPI package 'matplotlib'); the Markdown report was still written"
    paths = doc["paths"]
    colors = ["#4d4d4d", "#1f77b4", "#6baed6", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.4), gridspec_kw={"width_ratios": [1.1, 0.9, 1.3]})

    def bars(ax, metric_ids, labels, scale=1.0):
        width = 0.8 / max(1, len(paths))
        for i, p in enumerate(paths):
            meds, los, his = [], [], []
            for mid in metric_ids:
                sm = metric_summary(doc, p["id"], mid)
                med = sm.median * scale if sm else 0.0
                meds.append(med)
                los.append(med - sm.lo * scale if sm else 0.0)
                his.append(sm.hi * scale - med if sm else 0.0)
            xs = [j + (i - (len(paths) - 1) / 2) * width for j in range(len(metric_ids))]
            ax.bar(xs, meds, width, yerr=[los, his], capsize=2, label=p["label"], color=colors[i % len(colors)])
        ax.set_xticks(range(len(metric_ids)))
        ax.set_xticklabels(labels)
        ax.grid(axis="y", alpha=0.3)

    bars(axes[0], [f"tcp_{n}" for n in TCP_SIZES], [f"{n} B" for n in TCP_SIZES])
    axes[0].set_title("TCP throughput by write size (median, min–max; log)")
    axes[0].set_ylabel("Gbit/s")
    axes[0].set_yscale("log")
    bars(axes[1], ["lat_avg", "lat_p50", "lat_p99"], ["average", "p50", "p99"])
    axes[1].set_title("TCP ping-pong latency (sockperf, half RTT)")
    axes[1].set_ylabel("µs")

    ratio_metrics = ["tcp_131072", "tcp_4096", "tcp_1024", "udp_1024_rate", "lat_avg", "lat_p50", "lat_p99"]
    ratio_labels = ["TCP 128K", "TCP 4K", "TCP 1K", "UDP 1K rx", "lat avg", "lat p50", "lat p99"]
    others = [p for p in paths if p["id"] != doc["baseline"]]
    width = 0.8 / max(1, len(others))
    for i, p in enumerate(others):
        vals = []
        for mid in ratio_metrics:
            r = metric_ratio(doc, p["id"], mid)
            vals.append(r.median if r else 0.0)
        xs = [j + (i - (len(others) - 1) / 2) * width for j in range(len(ratio_metrics))]
        axes[2].bar(xs, vals, width, label=p["label"], color=colors[(paths.index(p)) % len(colors)])
    axes[2].axhline(1.0, color="black", linewidth=1)
    axes[2].axhline(0.97, color="green", linewidth=0.8, linestyle="--")
    axes[2].axhline(1.10, color="red", linewidth=0.8, linestyle="--")
    axes[2].set_xticks(range(len(ratio_metrics)))
    axes[2].set_xticklabels(ratio_labels)
    axes[2].set_title("Ratio to host (median of per-round ratios)")
    axes[2].grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(paths), 6), frameon=False)
    fig.suptitle(f"netplugin data path, {describe(doc.get('machine', {})).split(';')[0]}, {doc.get('date', '')}")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return None


# --- diagnosis: what netplugin's own per-packet work costs -------------------------------------------------------

DIAG_METRICS = ("tcp_131072", "lat_p50", "lat_avg")


def _diag_view(doc, state):
    """A results document restricted to one host state, so the ordinary summaries and ratios apply."""
    return {"baseline": doc["baseline"], "paths": doc["paths"], "samples": doc["samples"][state]}


def render_diagnosis(doc):
    """``datapath-diagnosis.md``: the same cross-host paths with netplugin's hosts in different states."""
    s = doc.get("settings", {})
    out = [
        "# Data path diagnosis: where netplugin's cross-host cost goes",
        "",
        f"Generated by `scripts/bench_datapath.py --diagnose` on {doc.get('date', '?')}. Machine: "
        f"{describe(doc.get('machine', {}))}.",
        "",
        f"Host networking, netplugin across two hosts and the reference `ptp` plugin (same shape, no iptables) "
        f"are measured while netplugin's two hosts are switched between the states below, {s.get('rounds')} "
        f"interleaved rounds, {s.get('duration_s')} s per test, state and path order rotated per round. Both "
        f"agents are paused (SIGSTOP) for the whole run so they do not repair what is removed; BIRD keeps "
        f"the routes. Ratios are medians of per-round ratios to host networking measured in the same state and "
        f"round.{_steadiest_note(doc)} {_pinning_note(s)}",
        "",
        table(["state of netplugin's hosts", "what it is"], [[st["label"], st["description"]] for st in doc["states"]],
              align=["l", "l"]),
    ]
    header = ["state", "path"] + [f"{METRIC_BY_ID[m].label} ({METRIC_BY_ID[m].unit})" for m in DIAG_METRICS] \
        + [f"ratio {METRIC_BY_ID[m].label}" for m in DIAG_METRICS]
    rows = []
    for st in doc["states"]:
        view = _diag_view(doc, st["id"])
        for p in doc["paths"]:
            cells = [fmt_range(metric_summary(view, p["id"], m)) for m in DIAG_METRICS]
            ratios = ["1" if p["id"] == doc["baseline"] else fmt_range(metric_ratio(view, p["id"], m))
                      for m in DIAG_METRICS]
            rows.append([st["label"], p["label"]] + cells + ratios)
    out += ["", table(header, rows, align=["l", "l"] + ["r"] * (len(header) - 2)), "", "## Reading", ""]
    out += diagnosis_lines(doc)
    return "\n".join(out) + "\n"


def _steadiest_note(doc):
    """Which of the diagnosis's figures varied least across rounds on the cross-host path, as built."""
    if not doc.get("states"):
        return ""
    view = _diag_view(doc, doc["states"][0]["id"])
    spreads = [(sp, m) for m in DIAG_METRICS if (sp := _spread(metric_summary(view, CROSS_HOST, m))) is not None]
    if not spreads:
        return ""
    sp, m = min(spreads)
    return (f" Of the figures below, {METRIC_BY_ID[m].label} varied least across rounds here (netplugin as built, "
            f"max / min {fmt_num(sp)}×).")


def _diag_p50_us(doc, state):
    s = metric_summary(_diag_view(doc, state), CROSS_HOST, "lat_p50")
    return None if s is None else s.median


def flowtable_line(doc):
    """What became of the flowtable fast path in a diagnosis document, or None if it was not tried."""
    ft = doc.get("flowtable")
    if not ft:
        return None
    if not ft.get("supported"):
        return (f"- The flowtable fast path (established, policy-accepted flows skipping routing, the forward hooks "
                f"and conntrack's per-packet work on both hosts) could not be measured: {ft.get('reason')}.")
    lat = _ratio_median(_diag_view(doc, "flowtable"), CROSS_HOST, "lat_p50") if "flowtable" in doc["samples"] else None
    tput = _ratio_median(_diag_view(doc, "flowtable"), CROSS_HOST, "tcp_131072") if lat is not None else None
    if lat is None or tput is None:
        return "- The kernel accepts flowtables, but the flowtable state has no complete samples."
    return (f"- With a flowtable for established, policy-accepted flows: netplugin {fmt_num(lat)}× host latency "
            f"(p50), {fmt_num(tput)}× host throughput.")


def fast_accept_line(doc):
    """The fast-accept rule moved to the top of FORWARD (state ``ct-mark``) against as built, or None."""
    if "ct-mark" not in doc["samples"] or "as-built" not in doc["samples"]:
        return None
    view, built = _diag_view(doc, "ct-mark"), _diag_view(doc, "as-built")
    lat, lat0 = _ratio_median(view, CROSS_HOST, "lat_p50"), _ratio_median(built, CROSS_HOST, "lat_p50")
    us, us0 = _diag_p50_us(doc, "ct-mark"), _diag_p50_us(doc, "as-built")
    tput, tput0 = _ratio_median(view, CROSS_HOST, "tcp_131072"), _ratio_median(built, CROSS_HOST, "tcp_131072")
    if None in (lat, lat0, us, us0, tput, tput0):
        return None
    hits = doc.get("ct_mark_hits") or {}
    counted = [h for h in hits.values() if h is not None]
    proof = (f"; the fast-accept rule took {', '.join(str(h) for h in counted)} packets on the two hosts in the "
             f"last round") if counted else ""
    return (f"- The policy's fast-accept rule (packets of connections it accepted, by conntrack mark) moved from "
            f"np-FORWARD to the top of FORWARD: netplugin {fmt_num(lat)}× host "
            f"latency (p50) against {fmt_num(lat0)}× as built ({fmt_num(us0 - us)} µs less per one-way trip), "
            f"{fmt_num(tput)}× host throughput against {fmt_num(tput0)}×{proof}.")


# (state id, what it adds over the previous step) from no netfilter at all up to as built.
_STEPS = (("no-rules", None), ("empty-chain", "one empty forward chain"),
          ("ct-only", "conntrack with no filter chain"), ("ct-first", "conntrack and one established-accept rule"),
          ("as-built", "as built (FORWARD → np-FORWARD, whose first rule accepts connections the policy accepted "
                       "before)"))


def decomposition_lines(doc):
    """Step by step from no netfilter to as built, in p50 µs of the cross-host path; [] if a step is missing."""
    values = [(what, _diag_p50_us(doc, sid), _ratio_median(_diag_view(doc, sid), CROSS_HOST, "lat_p50"))
              for sid, what in _STEPS if sid in doc["samples"]]
    if len(values) != len(_STEPS) or any(v is None or r is None for _, v, r in values):
        return []
    base_us, base_r = values[0][1], values[0][2]
    steps = "; ".join(f"{what}: {fmt_num(us)} µs ({fmt_num(r)}×, +{fmt_num(max(us - base_us, 0.0))} µs)"
                      for what, us, r in values[1:])
    deltas = [(values[i][0], values[i][1] - values[i - 1][1]) for i in range(1, len(values))]
    biggest, cost = max(deltas, key=lambda d: d[1])
    lines = [f"- Where the as-built latency goes (p50 of the cross-host path, each state against no netfilter at "
             f"all, {fmt_num(base_us)} µs, {fmt_num(base_r)}× host): {steps}. A one-way trip crosses the netfilter "
             f"of both hosts, so each figure is two hosts' worth. The largest single step is to {biggest} "
             f"(+{fmt_num(cost)} µs over the state before it)."]
    if "notrack" in doc["samples"]:
        nt = _ratio_median(_diag_view(doc, "notrack"), CROSS_HOST, "lat_p50")
        full = values[-1][2]
        if nt is not None:
            verdict = "slower" if nt > full + 0.01 else "no faster" if nt > full - 0.01 else "faster"
            why = (", because every packet then walks the whole policy (the dispatch chains and the ipset match) "
                   "instead of stopping at the established rule") if verdict != "faster" else ""
            lines.append(f"- Keeping traffic out of conntrack with today's chains is {verdict}: {fmt_num(nt)}× host "
                         f"with NOTRACK against {fmt_num(full)}× as built{why}.")
    return lines


def diagnosis_lines(doc):
    """Plain statements: how much of netplugin's gap its netfilter work explains, and what the shape costs."""
    def med(state, path, metric):
        return _ratio_median(_diag_view(doc, state), path, metric)

    ids = [st["id"] for st in doc["states"]]
    first, last = ids[0], ids[-1]
    lines = []
    for metric, what in (("lat_p50", "Latency (p50)"), ("tcp_131072", "Throughput (TCP, 131072 B writes)")):
        full, bare = med(first, CROSS_HOST, metric), med(last, CROSS_HOST, metric)
        ptp_bare = med(last, "ptp", metric)
        if None in (full, bare, ptp_bare):
            continue
        lines.append(f"- {what}: netplugin {fmt_num(full)}× host as built, {fmt_num(bare)}× "
                     f"with its iptables rules and rp_filter removed; ptp {fmt_num(ptp_bare)}× meanwhile.")
    for line in (flowtable_line(doc), fast_accept_line(doc)):
        if line:
            lines.append(line)
    lines += decomposition_lines(doc)
    rpf = rp_filter_line(doc)
    if rpf:
        lines.append(rpf)
    bare, ptp_bare = med(last, CROSS_HOST, "lat_p50"), med(last, "ptp", "lat_p50")
    if bare is not None and ptp_bare is not None:
        if abs(bare - ptp_bare) <= LEVEL:
            lines.append(f"- With no netfilter at all netplugin ({fmt_num(bare)}× host latency, p50) is level with "
                         f"ptp ({fmt_num(ptp_bare)}×): what remains is the routed-veth shape they share, two more "
                         f"veth crossings and two forwarding passes per packet than host networking.")
        else:
            lines.append(f"- With no netfilter at all netplugin ({fmt_num(bare)}× host latency, p50) is still "
                         f"{fmt_num(abs(bare - ptp_bare))} {'above' if bare > ptp_bare else 'below'} ptp "
                         f"({fmt_num(ptp_bare)}×), which has the same routed-veth shape: more than the shape "
                         f"explains.")
    return lines


def rp_filter_line(doc):
    """What strict rp_filter on the host veths costs: no rules against no rules and no rp_filter, or None."""
    if "no-rules" not in doc["samples"] or "bare" not in doc["samples"]:
        return None
    strict, loose = _diag_p50_us(doc, "no-rules"), _diag_p50_us(doc, "bare")
    if strict is None or loose is None:
        return None
    return (f"- Strict rp_filter on the host veths: {fmt_num(strict)} µs p50 with it, {fmt_num(loose)} µs without "
            f"({fmt_num(strict - loose)} µs per one-way trip).")
