"""Workloads: seeded arrival processes, trace replay and the request mix."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from runtime.workload import (
    ClosedLoop,
    GammaArrivals,
    PoissonArrivals,
    TraceReplay,
    WorkloadSpec,
    arrival_offsets,
    read_trace,
    sample_requests,
)


def _spec(arrivals: dict[str, object], n: int = 100, seed: int = 0) -> WorkloadSpec:
    return WorkloadSpec.model_validate({"arrivals": arrivals, "num_requests": n, "seed": seed})


def test_arrivals_are_chosen_by_kind() -> None:
    assert isinstance(_spec({"kind": "poisson", "rate_rps": 2}).arrivals, PoissonArrivals)
    assert isinstance(_spec({"kind": "gamma", "rate_rps": 2, "cv": 3}).arrivals, GammaArrivals)
    closed = _spec({"kind": "closed", "users": 4}).arrivals
    assert isinstance(closed, ClosedLoop) and closed.think_time_s == 0.0
    trace = _spec({"kind": "trace", "path": "t.csv"}).arrivals
    assert isinstance(trace, TraceReplay) and trace.speedup == 1.0


@pytest.mark.parametrize(
    ("arrivals", "field", "value"),
    [
        ({"kind": "poisson", "rate_rps": -1}, "rate_rps", "-1"),
        ({"kind": "gamma", "rate_rps": 1, "cv": 0}, "cv", "0"),
        ({"kind": "closed", "users": 0}, "users", "0"),
        ({"kind": "trace", "path": "t.csv", "speedup": 0}, "speedup", "0"),
    ],
)
def test_invalid_arrivals_name_field_and_value(
    arrivals: dict[str, object], field: str, value: str
) -> None:
    with pytest.raises(ValidationError) as info:
        _spec(arrivals)
    message = str(info.value)
    assert field in message and f"input_value={value}" in message


def test_unknown_kind_and_bad_count_are_rejected() -> None:
    with pytest.raises(ValidationError, match="uniform"):
        _spec({"kind": "uniform", "rate_rps": 1})
    with pytest.raises(ValidationError, match="num_requests"):
        _spec({"kind": "poisson", "rate_rps": 1}, n=0)


def test_poisson_is_reproducible_by_seed() -> None:
    spec = _spec({"kind": "poisson", "rate_rps": 5}, n=200, seed=7)
    first = arrival_offsets(spec)
    assert first == arrival_offsets(spec)
    assert first != arrival_offsets(spec.model_copy(update={"seed": 8}))
    assert first is not None and first[0] == 0.0 and len(first) == 200
    assert all(b >= a for a, b in itertools.pairwise(first))


@pytest.mark.parametrize(
    "arrivals",
    [
        {"kind": "poisson", "rate_rps": 8.0},
        {"kind": "gamma", "rate_rps": 8.0, "cv": 3.0},
        {"kind": "gamma", "rate_rps": 8.0, "cv": 0.5},
    ],
)
def test_mean_rate_matches(arrivals: dict[str, object]) -> None:
    offsets = arrival_offsets(_spec(arrivals, n=50_000, seed=1))
    assert offsets is not None
    rate = (len(offsets) - 1) / offsets[-1]
    assert rate == pytest.approx(8.0, rel=0.05)


@pytest.mark.parametrize(
    ("arrivals", "cv"),
    [
        ({"kind": "poisson", "rate_rps": 2.0}, 1.0),
        ({"kind": "gamma", "rate_rps": 2.0, "cv": 3.0}, 3.0),
        ({"kind": "gamma", "rate_rps": 2.0, "cv": 0.5}, 0.5),
    ],
)
def test_gap_coefficient_of_variation(arrivals: dict[str, object], cv: float) -> None:
    offsets = arrival_offsets(_spec(arrivals, n=50_000, seed=2))
    gaps = np.diff(np.asarray(offsets))
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_closed_loop_has_no_schedule() -> None:
    assert arrival_offsets(_spec({"kind": "closed", "users": 3, "think_time_s": 0.5})) is None


def test_trace_csv_replay_with_speedup(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("timestamp,prompt\n1700000010.0,a\n1700000012.5,b\n1700000011,c\n")
    offsets = arrival_offsets(_spec({"kind": "trace", "path": str(path), "speedup": 2.0}, n=3))
    assert offsets == [0.0, 0.5, 1.25]


def test_trace_jsonl_replay_relative_and_iso_times(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    lines = [{"t": 3.0}, {"t": "4.5"}, {}, {"t": 9}]
    path.write_text("\n".join(json.dumps(x) for x in lines if x) + "\n\n")
    spec = _spec({"kind": "trace", "path": str(path), "time_column": "t"}, n=2)
    assert arrival_offsets(spec) == [0.0, 1.5]
    iso = tmp_path / "iso.jsonl"
    iso.write_text(
        '{"timestamp": "2024-05-01T10:00:00+00:00"}\n{"timestamp": "2024-05-01T10:00:04+00:00"}\n'
    )
    assert arrival_offsets(_spec({"kind": "trace", "path": str(iso)}, n=2)) == [0.0, 4.0]


def test_bad_csv_row_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("timestamp\n1.0\n2.0\nsoon\n")
    with pytest.raises(ValueError, match=r"bad\.csv line 4, column 'timestamp'.*'soon'"):
        read_trace(path)


def test_bad_jsonl_rows_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 1}\n{"timestamp": 2\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: not valid JSON"):
        read_trace(path)
    path.write_text('{"timestamp": 1}\n{"ts": 2}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: no key 'timestamp'"):
        read_trace(path)


def test_trace_file_problems(tmp_path: Path) -> None:
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("time\n1\n")
    with pytest.raises(ValueError, match="no column 'timestamp'"):
        read_trace(csv_path)
    with pytest.raises(ValueError, match=r"must end in \.csv.*t\.parquet"):
        read_trace(tmp_path / "t.parquet")
    short = tmp_path / "short.csv"
    short.write_text("timestamp\n1\n2\n")
    with pytest.raises(ValueError, match="num_requests must be <= the 2 arrivals"):
        arrival_offsets(_spec({"kind": "trace", "path": str(short)}, n=3))


def test_requests_use_every_example_before_repeating() -> None:
    spec = _spec({"kind": "poisson", "rate_rps": 1}, n=25, seed=5)
    indices = sample_requests(spec, dataset_size=10)
    assert len(indices) == 25
    assert sorted(indices[:10]) == list(range(10))
    assert sorted(indices[10:20]) == list(range(10))
    assert len(set(indices[20:])) == 5
    assert indices == sample_requests(spec, dataset_size=10)
    assert indices != sample_requests(spec.model_copy(update={"seed": 6}), dataset_size=10)


def test_requests_reject_empty_dataset() -> None:
    with pytest.raises(ValueError, match="dataset_size must be >= 1, got 0"):
        sample_requests(_spec({"kind": "closed", "users": 1}), dataset_size=0)
