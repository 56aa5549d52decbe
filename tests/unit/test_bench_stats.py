"""The one percentile definition every benchmark reports with (netplugin/benchlib/stats.py)."""

import statistics

import pytest

from netplugin.benchlib import stats


def test_percentile_is_linear_interpolation_between_closest_ranks():
    samples = [7.0, 1.0, 3.0, 12.0, 5.0, 2.0, 9.0]
    cuts = statistics.quantiles(samples, n=100, method="inclusive")  # the same definition, from the stdlib
    for q in range(1, 100):
        assert stats.percentile(samples, q) == pytest.approx(cuts[q - 1])


def test_p99_of_twenty_samples_lies_between_the_two_largest():
    samples = [float(v) for v in range(1, 21)]
    assert stats.percentile(samples, 99) == pytest.approx(19.81)
    assert stats.percentile(samples, 100) == 20.0
    assert stats.percentile(samples, 0) == 1.0


@pytest.mark.parametrize("samples", [[4.0, 1.0, 3.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0]])
def test_p50_is_the_median_for_even_and_odd_counts(samples):
    assert stats.percentile(samples, 50) == statistics.median(samples) == stats.median(samples)


def test_percentile_skips_missing_samples_and_has_none_for_no_samples():
    assert stats.percentile([None, 2.0, float("nan"), 4.0], 50) == 3.0
    assert stats.percentile([5.0], 99) == 5.0
    assert stats.percentile([], 50) is None
    assert stats.median([None]) is None


@pytest.mark.parametrize("q", [-1, 101])
def test_percentile_outside_0_to_100_is_an_error(q):
    with pytest.raises(ValueError, match="between 0 and 100"):
        stats.percentile([1.0], q)
