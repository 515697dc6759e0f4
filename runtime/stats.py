"""Summary statistics shared by every layer: percentiles, bootstrap intervals and ratios.

Pure functions of numbers, with no knowledge of runs, engines or apps, so the engine layer's
probe and the run metrics compute their percentiles the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_PERCENTILES: tuple[float, ...] = (50, 90, 95, 99)
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000


def percentiles(
    values: Sequence[float], qs: Sequence[float] = DEFAULT_PERCENTILES
) -> dict[str, float | None]:
    """Percentiles keyed "p50", "p99", "p99.9" (linear interpolation, numpy's default).

    Empty input gives None for every key rather than NaN; NaN input is an error.
    """
    keys = [f"p{q:g}" for q in qs]
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return dict.fromkeys(keys)
    if np.isnan(array).any():
        raise ValueError("values must not contain NaN")
    for q in qs:
        if not 0 <= q <= 100:
            raise ValueError(f"percentiles must be in [0, 100], got {q}")
    results = np.percentile(array, list(qs))
    return {key: float(value) for key, value in zip(keys, results, strict=True)}


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean (seeded, so reproducible)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError("values must not be empty")
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // array.size)
    means = np.concatenate(
        [
            array[
                rng.integers(0, array.size, size=(min(chunk, n_resamples - done), array.size))
            ].mean(axis=1)
            for done in range(0, n_resamples, chunk)
        ]
    )
    alpha = (1 - confidence) / 2
    low, high = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator with 0/0 = 1 (nothing changed) and x/0 = inf."""
    out = np.ones_like(numerator, dtype=float)
    zero = denominator == 0
    np.divide(numerator, denominator, out=out, where=~zero)
    out[zero & (numerator != 0)] = np.inf
    return out


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of bootstrap samples, rounded outwards to observed samples (numpy's
    'lower' and 'higher' methods): never narrower than the linear one, and defined when some
    samples are infinite."""
    alpha = (1 - confidence) / 2
    low = np.percentile(samples, 100 * alpha, method="lower")
    high = np.percentile(samples, 100 * (1 - alpha), method="higher")
    return float(low), float(high)


def _check_bootstrap(confidence: float, n_resamples: int, **groups: Sequence[float]) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    for name, values in groups.items():
        if len(values) == 0:
            raise ValueError(f"{name} must not be empty")
        if np.isnan(np.asarray(values, dtype=float)).any():
            raise ValueError(f"{name} must not contain NaN")


def _resampled_medians(array: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Medians of n_resamples resamples (with replacement) of array."""
    return np.median(array[rng.integers(0, array.size, size=(n_resamples, array.size))], axis=1)


def bootstrap_median_ci(
    values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median (seeded, so reproducible).

    With few values (the repeats of a run) the interval is the range of medians that
    resampling can produce, e.g. with 3 values it spans from the smallest to the largest.
    """
    _check_bootstrap(confidence, n_resamples, values=values)
    array = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    return _interval(_resampled_medians(array, n_resamples, rng), confidence)


def ratio_of_medians(
    baseline: Sequence[float],
    current: Sequence[float],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """median(current) / median(baseline) and its percentile-bootstrap interval: (ratio, low,
    high). The two groups are independent measurements, so each is resampled on its own.

    A zero baseline median gives inf (1 when the current median is 0 too).
    With 3 values in each group, the interval runs from min(current)/max(baseline) to
    max(current)/min(baseline): it excludes 1 only when every current value lies beyond
    every baseline value, which unchanged (exchangeable) measurements do with probability
    1/20 per side.
    """
    _check_bootstrap(confidence, n_resamples, baseline=baseline, current=current)
    base = np.asarray(baseline, dtype=float)
    cur = np.asarray(current, dtype=float)
    rng = np.random.default_rng(seed)
    ratios = _ratio(
        _resampled_medians(cur, n_resamples, rng), _resampled_medians(base, n_resamples, rng)
    )
    point = _ratio(np.array([np.median(cur)]), np.array([np.median(base)]))[0]
    return float(point), *_interval(ratios, confidence)


def paired_ratio_of_means(
    baseline: Sequence[float],
    current: Sequence[float],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """mean(current) / mean(baseline) over the same items, and its paired-bootstrap interval:
    (ratio, low, high). Item i of both lists is the same item (the same dataset example), so
    items are resampled together: what the two have in common (hard items, easy items)
    cancels, and only their differences widen the interval.

    A zero baseline mean gives inf (1 when the current mean is 0 too).
    """
    _check_bootstrap(confidence, n_resamples, baseline=baseline, current=current)
    if len(baseline) != len(current):
        raise ValueError(
            f"current must pair with baseline item by item ({len(baseline)} items), "
            f"got {len(current)}"
        )
    base = np.asarray(baseline, dtype=float)
    cur = np.asarray(current, dtype=float)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // base.size)
    ratios = []
    for done in range(0, n_resamples, chunk):
        index = rng.integers(0, base.size, size=(min(chunk, n_resamples - done), base.size))
        ratios.append(_ratio(cur[index].mean(axis=1), base[index].mean(axis=1)))
    point = _ratio(np.array([cur.mean()]), np.array([base.mean()]))[0]
    return float(point), *_interval(np.concatenate(ratios), confidence)
