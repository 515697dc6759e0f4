"""Experiment files and `fmtune run`: loading, overrides, errors (no engine needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import ConfigError
from runtime.run import RunSpec, apply_overrides, load_run_spec

REPO = Path(__file__).resolve().parents[2]
EXTRACT = REPO / "experiments" / "extract-cpu.yaml"


def test_shipped_experiment_loads_with_its_engine() -> None:
    spec = load_run_spec(EXTRACT)
    assert isinstance(spec, RunSpec)
    engine = spec.deployment.models["llm"].engine
    assert engine.model == "smollm2-135m" and engine.dtype == "float32"
    assert spec.sla.e2e_s > 0 and spec.workload.num_requests >= 1


def test_overrides_reach_nested_fields() -> None:
    spec = load_run_spec(
        EXTRACT,
        {
            "app.architecture": "judge",
            "app.format": "tag",
            "deployment.models.llm.engine.max_num_seqs": 4,
            "workload.num_requests": 3,
        },
    )
    assert (spec.app.architecture, spec.app.format.value) == ("judge", "tag")
    assert spec.deployment.models["llm"].engine.max_num_seqs == 4
    assert spec.workload.num_requests == 3


def test_override_through_a_scalar_is_named() -> None:
    with pytest.raises(ConfigError, match=r"--set sla\.e2e_s\.x: 'sla\.e2e_s' is not a mapping"):
        apply_overrides({"sla": {"e2e_s": 3}}, {"sla.e2e_s.x": 1})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("app.architecure=single", "unknown field 'app.architecure'"),
        ("app.format=csv", "app.format: Input should be 'json', 'yaml', 'xml', 'text' or 'tag'"),
        (
            "deployment.models.llm.engine.block_size=48",
            "block_size must be a multiple of 32 on cpu, got 48",
        ),
        ("sla.e2e_s=-1", "sla.e2e_s: Input should be greater than 0, got -1"),
        (
            "app.structured_output=true",
            "structured_output needs format 'json', got format 'tag'",
        ),
    ],
)
def test_bad_set_exits_2_naming_the_field(override: str, expected: str) -> None:
    extra = ["--set", "app.format=tag"] if "structured" in override else []
    done = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "run", str(EXTRACT), *extra, "--set", override],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert expected in lines[0]


def test_misspelled_key_in_the_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXTRACT.read_text().replace("workload:", "workloud:"))
    done = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "run", str(bad)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "unknown field 'workloud'" in done.stderr and "workload: Field required" in done.stderr


def test_the_trace_keeps_failure_kinds_as_plain_strings(tmp_path: Path) -> None:
    import pandas as pd

    from runtime.app.executor import RequestResult, Span
    from runtime.engine.client import CallFailure
    from runtime.run import _trace_frame

    failed = Span(
        request_id=0, node_id="a", kind="llm", round=0, start_s=10.0, end_s=11.0, queued_s=0.0,
        error="shed: deadline passed while queued", failure=CallFailure.SHED,
    )  # fmt: skip
    done = Span(request_id=1, node_id="a", kind="llm", round=0, start_s=10.0, end_s=12.0,
                queued_s=0.0)  # fmt: skip
    results = [
        RequestResult(0, {}, (failed,), 10.0, 11.0, ok=False, error="node 'a': shed: deadline "
                      "passed while queued", failure=CallFailure.SHED),
        RequestResult(1, {"x": 1}, (done,), 10.0, 12.0, ok=True),
    ]  # fmt: skip
    trace = _trace_frame(results, 10.0, [None, 1.0])
    trace.to_parquet(tmp_path / "trace.parquet", index=False)
    loaded = pd.read_parquet(tmp_path / "trace.parquet")
    for column in ("failure", "request_failure"):
        assert loaded[column][0] == "shed" and pd.isna(loaded[column][1])
    assert type(trace["failure"][0]) is str
