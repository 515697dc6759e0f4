"""Summary statistics shared by every layer: percentiles and bootstrap intervals.

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
