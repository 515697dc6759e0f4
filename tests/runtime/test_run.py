"""Experiment files and `fmtune run`: loading, overrides, errors (no engine needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.deployment import Deployment, ModelDeployment
from runtime.engine.config import EngineConfig
from runtime.engine.sizing import GIB
from runtime.errors import ConfigError
from runtime.run import Pricing, RunSpec, apply_overrides, load_run_spec
from tests.runtime.conftest import MakeModelFolder

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


def test_replica_prices_follow_the_machine_each_model_key_needs(
    make_model_folder: MakeModelFolder,
) -> None:
    """1 GiB of weights + 1 GiB KV cache + runtime fits the 8 GiB machine; 12 GiB of float32
    weights need the 32 GiB one; a key's own price wins over its machine's."""
    small = EngineConfig(model=str(make_model_folder("small", GIB, "float32")), dtype="float32")
    large = small.with_knobs(model=str(make_model_folder("large", 12 * GIB, "float32")))
    deployment = Deployment(
        models={"small": ModelDeployment(engine=small), "large": ModelDeployment(engine=large)}
    )
    machines = [
        {"name": "s", "vcpus": 2, "memory_gib": 8, "usd_per_hour": 0.08},
        {"name": "m", "vcpus": 2, "memory_gib": 16, "usd_per_hour": 0.13},
        {"name": "l", "vcpus": 4, "memory_gib": 32, "usd_per_hour": 0.25},
    ]
    pricing = Pricing.model_validate({"machines": machines})
    assert pricing.cost_model(deployment).price_per_replica_hour_usd == {
        "small": 0.08,
        "large": 0.25,
    }
    assert pricing.machine_for("large", deployment).name == "l"
    priced = Pricing.model_validate({"machines": machines, "per_model_key": {"large": 0.1}})
    assert priced.cost_model(deployment).price_per_replica_hour_usd["large"] == 0.1


def test_a_model_key_without_a_machine_is_refused_when_the_experiment_loads() -> None:
    tiny = [{"name": "tiny", "vcpus": 2, "memory_gib": 2, "usd_per_hour": 0.01}]
    with pytest.raises(ConfigError) as caught:
        load_run_spec(EXTRACT, {"pricing.machines": tiny})
    message = str(caught.value)
    assert str(EXTRACT) in message
    assert "pricing.machines has no machine for model key 'llm'" in message
    assert "tiny (2 vCPU, 2 GiB, 0 GPU)" in message


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
    lines = done.stderr.strip().splitlines()
    assert lines == [f"error: {bad}: unknown field 'workloud' (did you mean 'workload'?)"]


def test_a_misspelled_required_field_is_one_short_message(tmp_path: Path) -> None:
    """The misspelling alone, with its closest name; no dump of the file, no 'Field required'
    for the real field it stands for."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXTRACT.read_text().replace("workload:", "worklaod:"))
    with pytest.raises(ConfigError) as caught:
        load_run_spec(bad)
    assert str(caught.value) == f"{bad}: unknown field 'worklaod' (did you mean 'workload'?)"


def test_a_misspelled_nested_field_names_its_closest_valid_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXTRACT.read_text().replace("block_size:", "blok_size:"))
    with pytest.raises(ConfigError) as caught:
        load_run_spec(bad)
    assert str(caught.value) == (
        f"{bad}: unknown field 'deployment.models.llm.engine.blok_size' "
        "(did you mean 'block_size'?)"
    )


def test_a_missing_field_without_a_misspelling_is_still_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = EXTRACT.read_text()
    bad.write_text(text.replace("sla:\n  e2e_s: 30\n", "color: blue\n"))
    with pytest.raises(ConfigError) as caught:
        load_run_spec(bad)
    message = str(caught.value)
    assert "sla: Field required" in message and "got" not in message
    assert "unknown field 'color'; valid: app, capacity, dataset, deployment" in message
    assert len(message) < 300


def test_a_misspelled_deploy_field_names_its_closest_valid_name(tmp_path: Path) -> None:
    from runtime.deployment import load_deployment

    deploy = tmp_path / "DEPLOY.yaml"
    deploy.write_text(
        "modles:\n  llm:\n    engine: {model: smollm2-135m}\nroutr: {policy: sla_aware}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_deployment(deploy)
    assert str(caught.value) == (
        f"{deploy}: unknown field 'modles' (did you mean 'models'?); "
        "unknown field 'routr' (did you mean 'router'?)"
    )
    deploy.write_text("models:\n  llm:\n    engine: {model: smollm2-135m, blok_size: 64}\n")
    with pytest.raises(ConfigError, match=r"'models\.llm\.engine\.blok_size' \(did you mean "
                       r"'block_size'\?\)$"):  # fmt: skip
        load_deployment(deploy)


def test_a_long_rejected_value_is_cut_short() -> None:
    from pydantic import ValidationError

    from runtime.errors import describe_validation_error

    with pytest.raises(ValidationError) as caught:
        RunSpec.model_validate({"name": "x" * 1000, "app": "y" * 1000})
    message = describe_validation_error(caught.value, model=RunSpec)
    assert len(message) < 400 and "..." in message


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
