"""Percentiles and bootstrap intervals on hand-computed inputs."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.stats import bootstrap_ci, percentiles


def test_percentiles_hand_computed() -> None:
    # numpy 'linear': position q/100 * (n - 1) into the sorted values.
    result = percentiles([4.0, 1.0, 3.0, 2.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert result == pytest.approx({"p50": 5.5, "p90": 9.1, "p95": 9.55, "p99": 9.91})
    assert percentiles([2.0], qs=(50, 99.9)) == {"p50": 2.0, "p99.9": 2.0}


def test_percentiles_empty_and_nan() -> None:
    assert percentiles([]) == {"p50": None, "p90": None, "p95": None, "p99": None}
    with pytest.raises(ValueError, match="NaN"):
        percentiles([1.0, float("nan")])
    with pytest.raises(ValueError, match="got 101"):
        percentiles([1.0], qs=(101,))


def test_bootstrap_ci_contains_mean_and_narrows_with_data() -> None:
    rng = np.random.default_rng(0)
    small = rng.uniform(0, 1, 30).tolist()
    large = rng.uniform(0, 1, 3000).tolist()
    low_s, high_s = bootstrap_ci(small)
    low_l, high_l = bootstrap_ci(large)
    assert low_s < float(np.mean(small)) < high_s
    assert low_l < float(np.mean(large)) < high_l
    assert (high_l - low_l) < (high_s - low_s) / 5
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)


def test_bootstrap_ci_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 1\.5"):
        bootstrap_ci([1.0], confidence=1.5)


def test_median_interval_of_three_repeats_spans_them() -> None:
    from runtime.stats import bootstrap_median_ci

    assert bootstrap_median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert bootstrap_median_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    low, high = bootstrap_median_ci(np.random.default_rng(1).normal(10, 1, 200).tolist())
    assert 9.5 < low < 10 < high < 10.5


def test_ratio_of_medians_with_three_each_is_the_extreme_ratios() -> None:
    from runtime.stats import ratio_of_medians

    ratio, low, high = ratio_of_medians([1.0, 1.1, 0.9], [1.2, 1.3, 1.25])
    assert ratio == pytest.approx(1.25)
    assert low == pytest.approx(1.2 / 1.1) and high == pytest.approx(1.3 / 0.9)
    assert ratio_of_medians([0.0, 0.0], [0.0, 0.0]) == (1.0, 1.0, 1.0)
    assert ratio_of_medians([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])[0] == float("inf")
    with pytest.raises(ValueError, match="baseline must not be empty"):
        ratio_of_medians([], [1.0])


def test_paired_ratio_cancels_what_items_share() -> None:
    """Hard and easy items vary a lot, but the same items scored the same give [1, 1]; an
    unpaired view of the same numbers would be wide."""
    from runtime.stats import paired_ratio_of_means

    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 40)
    assert paired_ratio_of_means(base.tolist(), base.tolist()) == (1.0, 1.0, 1.0)
    better = np.clip(base + 0.1, 0, 1)
    ratio, low, high = paired_ratio_of_means(base.tolist(), better.tolist())
    assert 1 < low < ratio < high
    with pytest.raises(ValueError, match="pair with baseline item by item"):
        paired_ratio_of_means([1.0, 2.0], [1.0])
