"""The data path report's PNG chart (matplotlib, optional: without it the Markdown report is still written)."""

from netplugin.benchlib.datapath_metrics import TCP_SIZES, metric_ratio, metric_summary
from netplugin.benchlib.machine import describe


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
    colors += ["#e377c2", "#17becf", "#bcbd22", "#98df8a"]  # one colour per path up to twelve

    def measured(pairs):
        """The (metric, label) pairs some path has samples of (a run restricted with --tests has fewer)."""
        kept = [(m, lb) for m, lb in pairs if any(metric_summary(doc, p["id"], m) for p in paths)]
        return [m for m, _ in kept], [lb for _, lb in kept]

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

    bars(axes[0], *measured([(f"tcp_{n}", f"{n} B") for n in TCP_SIZES]))
    axes[0].set_title("TCP throughput by write size (median, min–max; log)")
    axes[0].set_ylabel("Gbit/s")
    axes[0].set_yscale("log")
    bars(axes[1], *measured([("lat_avg", "average"), ("lat_p50", "p50"), ("lat_p99", "p99")]))
    axes[1].set_title("TCP ping-pong latency (sockperf, half RTT)")
    axes[1].set_ylabel("µs")

    ratio_metrics, ratio_labels = measured(
        zip(
            ["tcp_131072", "tcp_4096", "tcp_1024", "udp_1024_rate", "lat_avg", "lat_p50", "lat_p99"],
            ["TCP 128K", "TCP 4K", "TCP 1K", "UDP 1K rx", "lat avg", "lat p50", "lat p99"],
        )
    )
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
