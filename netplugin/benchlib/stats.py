"""Medians, ranges and ratios of per-round samples.

Samples are lists indexed by round (``None`` where a measurement failed), so a path's value in round *r* can be
paired with the baseline's value in the same round: interleaved rounds make such paired ratios robust to the
drift that other load on a shared machine causes.
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
