"""The statistics every benchmark reports: medians, percentiles, ranges and ratios of samples.

Percentiles use one definition everywhere, linear interpolation between the closest ranks (numpy's default,
Hyndman and Fan's type 7, ``statistics.quantiles(method="inclusive")``): the q-th percentile of n sorted samples
sits at position (n - 1) * q / 100, between the two samples around it. Chosen because its p50 is the median
the reports print beside it (nearest-rank's p50 of an even count is the lower middle sample), and it moves
smoothly as samples are added instead of jumping from one sample to the next. With few samples a high
percentile lies between the largest two: p99 of 20 samples is 0.81 of the way from the 19th to the 20th, so a
report that needs the worst case prints the maximum beside it.

Per-round samples are lists indexed by round (``None`` where a measurement failed), so a path's value in round
*r* can be paired with the baseline's value in the same round: interleaved rounds make such paired ratios robust
to the drift that other load on a shared machine causes.
"""

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    median: float
    lo: float
    hi: float
    n: int


def _usable(value):
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def summarize(values):
    """Median, min and max of the usable values, or None when there are none."""
    vals = [float(v) for v in values if _usable(v)]
    if not vals:
        return None
    return Summary(statistics.median(vals), min(vals), max(vals), len(vals))


def median(values):
    """The median of the usable values, or None when there are none."""
    s = summarize(values)
    return s.median if s else None


def percentile(values, q):
    """The ``q``-th percentile (0..100) of the usable values by linear interpolation (see the module docstring),
    or None when there are none."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q!r} is not between 0 and 100")
    vals = sorted(float(v) for v in values if _usable(v))
    if not vals:
        return None
    pos = (len(vals) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def paired_ratios(values, baseline):
    """``values[r] / baseline[r]`` for every round where both exist and the baseline is not zero."""
    if len(values) != len(baseline):
        raise ValueError(f"cannot pair {len(values)} samples with {len(baseline)} baseline samples")
    return [v / b for v, b in zip(values, baseline) if _usable(v) and _usable(b) and b != 0]


def ratio_summary(values, baseline):
    """Summary of the paired per-round ratios (median ratio, min–max), or None when none can be paired."""
    return summarize(paired_ratios(values, baseline))


def seconds_per_gb(cpu_seconds, nbytes):
    """CPU seconds spent per gigabyte (10^9 bytes) moved; None when nothing moved."""
    if cpu_seconds is None or not nbytes:
        return None
    return cpu_seconds / (nbytes / 1e9)


def rotated(items, k):
    """``items`` rotated left by ``k``: round r starts with a different path, so no path always goes first."""
    items = list(items)
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


def counter_deltas(before, after):
    """``after - before`` of nested counter snapshots, ``{path: {end: {counter: value}}}``: what the rounds between
    the two snapshots added. An end missing from either snapshot (or None there) is None: never a made-up zero."""
    out = {}
    for path, ends in after.items():
        out[path] = {}
        for end, now in (ends or {}).items():
            then = (before.get(path) or {}).get(end)
            if now is None or then is None:
                out[path][end] = None
            else:
                out[path][end] = {name: v - then.get(name, 0) for name, v in now.items()}
    return out
