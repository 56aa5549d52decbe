"""What the data path benchmark measures and aims at, and the summaries every part of its report reads.

A results document (``datapath.json``) holds per-round samples per path and metric; a diagnosis document holds
one such set per host state (``diag_view`` turns one state into an ordinary document). Figures are medians over
rounds with min–max; ratios are medians of per-round ratios to the baseline measured in the same round.
"""

from dataclasses import dataclass

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
    + [
        m
        for n in UDP_SIZES
        for m in (
            Metric(f"udp_{n}_rate", f"UDP {n} B received", "Gbit/s", "higher"),
            Metric(f"udp_{n}_loss", f"UDP {n} B loss", "%", "lower"),
        )
    ]
    + [
        Metric("lat_avg", "TCP ping-pong avg", "µs", "lower"),
        Metric("lat_p50", "TCP ping-pong p50", "µs", "lower"),
        Metric("lat_p99", "TCP ping-pong p99", "µs", "lower"),
        Metric("cpu_tcp_131072", "CPU, all cores, TCP 131072 B", "s/GB", "lower"),
        Metric("cpu_iperf_tcp_131072", "CPU, iperf3 processes, TCP 131072 B", "s/GB", "lower"),
        Metric("retrans_tcp_131072", "TCP 131072 B retransmits", "segments", "lower"),
    ]
    + [Metric(f"cpu_tcp_{n}", f"CPU, all cores, TCP {n} B", "s/GB", "lower") for n in TCP_SIZES if n != 131072]
)
METRIC_BY_ID = {m.id: m for m in METRICS}
DIAG_METRICS = ("tcp_131072", "lat_p50", "lat_avg")

BPF, IPTABLES = "netplugin-bpf", "netplugin-iptables"  # the two dataplanes' cross-host paths with a policy
NO_POLICY = {"netplugin-bpf-10k": "netplugin-bpf-nopolicy", "netplugin-iptables-10k": CROSS_HOST}
CIDR_SPEED = 0.95  # 10,000 CIDRs keep at least this much of the same dataplane's no-policy speed

# (path, metric, comparison, bound, base path (None: the baseline, host), what it means). "(also read)" aims are
# shown but not summed up as the headline.
_TCP, _LAT = "cross-host TCP throughput (131072 B writes)", "cross-host TCP ping-pong latency"
AIMS = (
    (BPF, "tcp_131072", ">=", 0.97, None, f"netplugin-bpf: {_TCP} at least 0.97 of host"),
    (BPF, "lat_avg", "<=", 1.10, None, f"netplugin-bpf: {_LAT} (average) at most 1.10 of host"),
    (BPF, "lat_p50", "<=", 1.10, None, f"(also read) netplugin-bpf: {_LAT} (p50) at most 1.10 of host"),
    (IPTABLES, "tcp_131072", ">=", 0.97, None, f"netplugin-iptables: {_TCP} at least 0.97 of host"),
    (IPTABLES, "lat_avg", "<=", 1.10, None, f"netplugin-iptables: {_LAT} (average) at most 1.10 of host"),
    (
        CROSS_HOST,
        "tcp_131072",
        ">=",
        0.97,
        None,
        f"(also read) {CROSS_HOST} (iptables, no policy): {_TCP} at least 0.97 of host",
    ),
    (
        CROSS_HOST,
        "lat_avg",
        "<=",
        1.10,
        None,
        f"(also read) {CROSS_HOST} (iptables, no policy): {_LAT} (average) at most 1.10 of host",
    ),
) + tuple(
    aim
    for path, base in NO_POLICY.items()
    for aim in (
        (
            path,
            "tcp_131072",
            ">=",
            CIDR_SPEED,
            base,
            f"{path}: TCP throughput with 10,000 CIDRs at least {CIDR_SPEED} of {base}",
        ),
        (
            path,
            "lat_avg",
            "<=",
            round(1 / CIDR_SPEED, 3),
            base,
            f"{path}: latency (average) with 10,000 CIDRs at most 1/{CIDR_SPEED} of {base}",
        ),
    )
)


def _samples(doc, path_id, metric_id):
    return doc["samples"].get(path_id, {}).get(metric_id, [])


def metric_summary(doc, path_id, metric_id):
    return summarize(_samples(doc, path_id, metric_id))


def metric_ratio(doc, path_id, metric_id, base_id=None):
    """Per-round ratios of ``path_id`` to ``base_id`` (default: the document's baseline, host), summarized."""
    base = _samples(doc, base_id or doc["baseline"], metric_id)
    vals = _samples(doc, path_id, metric_id)
    if not base or len(base) != len(vals):
        return None
    return ratio_summary(vals, base)


def ratio_median(doc, path_id, metric_id):
    r = metric_ratio(doc, path_id, metric_id)
    return None if r is None else r.median


def aims(doc):
    """One verdict per aim: dict(text, ratio Summary or None, met True/False/None)."""
    out = []
    for path_id, metric_id, op, bound, base_id, text in AIMS:
        r = metric_ratio(doc, path_id, metric_id, base_id)
        met = None if r is None else (r.median >= bound if op == ">=" else r.median <= bound)
        out.append(
            {
                "text": text,
                "path": path_id,
                "metric": metric_id,
                "bound": bound,
                "op": op,
                "base": base_id or doc["baseline"],
                "ratio": r,
                "met": met,
            }
        )
    return out


def missed_by(v):
    """How far a verdict's median ratio is from its bound (on either side), in percent of the bound."""
    return abs(v["ratio"].median - v["bound"]) / v["bound"] * 100


def met_or_missed(v):
    """'met by 4.5%' or 'missed by 32%': how far a measured verdict's median is from its bound, and on which side
    (one decimal below 10%, so a near miss does not read as 0%)."""
    pct = missed_by(v)
    return (
        f"{'met' if v['met'] else 'missed'} by {pct:.1f}%"
        if pct < 10
        else f"{'met' if v['met'] else 'missed'} by {pct:.0f}%"
    )


def aim_bound(metric_id):
    """The bound of the primary aim on ``metric_id`` (AIMS), with its comparison."""
    for _path, metric, op, bound, base, text in AIMS:
        if metric == metric_id and base is None and not text.startswith("(also"):
            return op, bound
    raise KeyError(metric_id)


def meets_aim(ratio, metric_id):
    op, bound = aim_bound(metric_id)
    return ratio >= bound if op == ">=" else ratio <= bound


def spread(summary):
    """Round-to-round spread of a summary as max / min, or None."""
    if summary is None or summary.n < 2 or summary.lo <= 0:
        return None
    return summary.hi / summary.lo


def diag_view(doc, state):
    """A results document restricted to one host state, so the ordinary summaries and ratios apply."""
    return {"baseline": doc["baseline"], "paths": doc["paths"], "samples": doc["samples"][state]}


def pinning_note(settings):
    if settings.get("latency_pinned"):
        return (
            "Throughput tests are not pinned. Both ends of a latency test are pinned to the same CPU (CPU = "
            "round number modulo the CPU count, the same for every path in a round): unpinned, a ping-pong "
            "between two processes is bimodal (both ends on one CPU, or an inter-processor interrupt per "
            "wake-up), and which mode a sample landed in would swamp the difference between paths."
        )
    return "Nothing is pinned to a CPU."
