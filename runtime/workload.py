"""Workloads: when requests arrive and which dataset example each one carries.

Open-loop arrivals (Poisson, bursty gamma, a replayed trace) fix the send times in advance,
so a slow deployment builds a queue just as it would in production; a closed loop instead
has a fixed number of users who each send the next request after the previous one finishes
(plus think time), so it is paced by completions and has no precomputed schedule.
Everything random is drawn from numpy Generators seeded from the spec: the same spec gives
the same schedule and the same request mix on every run, which makes trials comparable.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

_ARRIVAL_STREAM = 0
_REQUEST_STREAM = 1


class PoissonArrivals(BaseModel):
    """Memoryless arrivals: exponential gaps with mean 1/rate_rps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["poisson"] = Field("poisson", description="Discriminator.")
    rate_rps: float = Field(gt=0, description="Mean arrival rate, requests per second.")


class GammaArrivals(BaseModel):
    """Bursty (cv > 1) or regular (cv < 1) arrivals: gamma gaps with mean 1/rate_rps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["gamma"] = Field("gamma", description="Discriminator.")
    rate_rps: float = Field(gt=0, description="Mean arrival rate, requests per second.")
    cv: float = Field(
        gt=0, description="Coefficient of variation of the gaps; 1 is Poisson, >1 is bursty."
    )


class ClosedLoop(BaseModel):
    """A fixed population of users, each waiting for its answer before asking again."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["closed"] = Field("closed", description="Discriminator.")
    users: int = Field(ge=1, description="Concurrent users, each with one request in flight.")
    think_time_s: float = Field(
        0.0, ge=0, description="Seconds a user waits after an answer before the next request."
    )


class TraceReplay(BaseModel):
    """Arrival times read from a CSV or JSONL file, shifted to start at 0 and sped up."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["trace"] = Field("trace", description="Discriminator.")
    path: Path = Field(description="A .csv (with header) or .jsonl/.ndjson file of arrivals.")
    time_column: str = Field(
        "timestamp",
        min_length=1,
        description="Column (CSV) or key (JSONL) with the arrival time in seconds, absolute "
        "(epoch) or relative, or an ISO-8601 date-time.",
    )
    speedup: float = Field(
        1.0, gt=0, description="Replay this many times faster than recorded (2 halves gaps)."
    )


Arrivals = Annotated[
    PoissonArrivals | GammaArrivals | ClosedLoop | TraceReplay, Field(discriminator="kind")
]


class WorkloadSpec(BaseModel):
    """A complete, reproducible workload: arrival process, request count, seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arrivals: Arrivals = Field(description="How requests arrive; chosen by its 'kind'.")
    num_requests: int = Field(ge=1, description="Requests sent in one run (one repeat).")
    seed: int = Field(0, ge=0, description="Seed of every random draw in the workload.")
    warmup_requests: int = Field(
        3,
        ge=0,
        le=1000,
        description="Requests sent all at once before the measured ones (before each repeat, "
        "right after the replicas' prefix caches are emptied) and left out of every metric, "
        "the trace and the cost: they pay for what a cold engine does once (first batches, "
        "allocator growth, the prompt content every request shares) so it does not land on "
        "the first measured requests. They carry the dataset examples the measured requests "
        "do not (the next ones of the seeded order), while there are such examples; the "
        "simulator starts from the same state.",
    )
    repeats: int = Field(
        1,
        ge=1,
        le=100,
        description="Times the measured workload is sent, one after the other on the same "
        "replicas, with the same examples in the same order and the same schedule. Each "
        "metric is then the median over repeats with a 95% bootstrap interval "
        "(`<metric>_ci95`); 1 for screening, 3 or more to confirm a result or compare it "
        "with another measurement.",
    )


# --------------------------------------------------------------------------------------------
# Pure schedule functions
# --------------------------------------------------------------------------------------------


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent generators for arrivals and request choice from one seed."""
    return np.random.default_rng([seed, stream])


def _offsets_from_gaps(gaps: np.ndarray) -> list[float]:
    """The first request goes at 0; each later one a gap after the previous."""
    offsets = np.concatenate(([0.0], np.cumsum(gaps[:-1])))
    return offsets.tolist()


def poisson_offsets(rate_rps: float, n: int, rng: np.random.Generator) -> list[float]:
    """n send times (seconds from start) of a Poisson process of the given rate."""
    return _offsets_from_gaps(rng.exponential(1.0 / rate_rps, size=n))


def gamma_offsets(rate_rps: float, cv: float, n: int, rng: np.random.Generator) -> list[float]:
    """n send times with gamma gaps: mean 1/rate_rps, coefficient of variation cv.

    A gamma with shape k has CV 1/sqrt(k), so k = 1/cv^2 and scale = 1/(rate * k).
    """
    shape = 1.0 / cv**2
    return _offsets_from_gaps(rng.gamma(shape, 1.0 / (rate_rps * shape), size=n))


def trace_offsets(timestamps: Sequence[float], speedup: float) -> list[float]:
    """Recorded times as offsets from the earliest, sorted, divided by speedup."""
    if not timestamps:
        raise ValueError("timestamps must not be empty, got []")
    if speedup <= 0:
        raise ValueError(f"speedup must be > 0, got {speedup}")
    times = np.sort(np.asarray(timestamps, dtype=float))
    return ((times - times[0]) / speedup).tolist()


# --------------------------------------------------------------------------------------------
# Trace files
# --------------------------------------------------------------------------------------------


def _seconds(value: Any, where: str) -> float:
    """A timestamp as seconds: a number, a numeric string or an ISO-8601 date-time."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a time in seconds, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = datetime.fromisoformat(value.strip()).timestamp()
            except ValueError:
                raise ValueError(
                    f"{where}: expected a time in seconds or an ISO-8601 date-time, got {value!r}"
                ) from None
    else:
        raise ValueError(f"{where}: expected a time in seconds, got {value!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"{where}: time must be finite, got {value!r}")
    return seconds


def _read_csv(path: Path, column: str) -> list[float]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise ValueError(
                f"{path}: no column {column!r} in the header (columns: {reader.fieldnames})"
            )
        times = []
        for row in reader:
            where = f"{path} line {reader.line_num}, column {column!r}"
            value = row.get(column)
            if value is None or not value.strip():
                raise ValueError(f"{where}: missing value")
            times.append(_seconds(value, where))
    return times


def _read_jsonl(path: Path, column: str) -> list[float]:
    times = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from None
            if not isinstance(record, dict) or column not in record:
                raise ValueError(f"{where}: no key {column!r} in {line.strip()[:80]!r}")
            times.append(_seconds(record[column], f"{where}, key {column!r}"))
    return times


def read_trace(path: Path, time_column: str = "timestamp") -> list[float]:
    """Arrival times (seconds) from a .csv or .jsonl/.ndjson file, in file order."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        times = _read_csv(path, time_column)
    elif suffix in (".jsonl", ".ndjson"):
        times = _read_jsonl(path, time_column)
    else:
        raise ValueError(f"trace path must end in .csv, .jsonl or .ndjson, got {str(path)!r}")
    if not times:
        raise ValueError(f"{path}: the trace has no arrivals")
    logger.debug("read %d arrivals from %s", len(times), path)
    return times


# --------------------------------------------------------------------------------------------
# The spec's schedule and request mix
# --------------------------------------------------------------------------------------------


def arrival_offsets(spec: WorkloadSpec) -> list[float] | None:
    """Send times, in seconds from the start, of spec.num_requests requests.

    None for a closed loop, whose requests are sent as earlier ones complete. A trace must
    hold at least num_requests arrivals; the earliest num_requests are replayed.
    """
    arrivals = spec.arrivals
    n = spec.num_requests
    if isinstance(arrivals, ClosedLoop):
        return None
    if isinstance(arrivals, PoissonArrivals):
        return poisson_offsets(arrivals.rate_rps, n, _rng(spec.seed, _ARRIVAL_STREAM))
    if isinstance(arrivals, GammaArrivals):
        return gamma_offsets(arrivals.rate_rps, arrivals.cv, n, _rng(spec.seed, _ARRIVAL_STREAM))
    offsets = trace_offsets(read_trace(arrivals.path, arrivals.time_column), arrivals.speedup)
    if len(offsets) < n:
        raise ValueError(
            f"num_requests must be <= the {len(offsets)} arrivals in {arrivals.path}, got {n}"
        )
    return offsets[:n]


def _example_order(spec: WorkloadSpec, dataset_size: int, count: int) -> list[int]:
    """The first `count` dataset indices of the spec's seeded order: a seeded permutation
    of the dataset, a fresh one each time it is used up. The order depends only on the
    workload's seed and the dataset's size, never on the deployment or the app's knobs, so
    every trial of an experiment sends the same examples in the same order."""
    if dataset_size < 1:
        raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
    rng = _rng(spec.seed, _REQUEST_STREAM)
    cycles = -(-count // dataset_size)
    order = np.concatenate([rng.permutation(dataset_size) for _ in range(max(cycles, 1))])
    return order[:count].tolist()


def sample_requests(spec: WorkloadSpec, dataset_size: int) -> list[int]:
    """Which dataset example each of the spec's measured requests carries (indices, seeded).

    Walks a seeded permutation of the dataset, drawing a fresh one each time it is used
    up, so every example is sent once before any is sent twice. Every repeat of a run, and
    every run of the same workload and dataset, sends this list in this order (paired
    comparisons of quality rest on it).
    """
    return _example_order(spec, dataset_size, spec.num_requests)


def warmup_examples(spec: WorkloadSpec, dataset_size: int) -> list[int]:
    """Which dataset example each warm-up request carries: the spec.warmup_requests examples
    that follow the measured ones in the seeded order, so a warm-up does not pre-fill the
    engine's prefix cache with a measured example unless the dataset has no other."""
    count = spec.num_requests + spec.warmup_requests
    return _example_order(spec, dataset_size, count)[spec.num_requests :]
