"""App folders on the real engine: an `fmtune init` folder and the arithmetic app's expression
variant, run on the session's hot replica of the bundled model."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from runtime.engine.pool import ReplicaPool
from runtime.engine.replica import Replica
from runtime.run import execute_run, load_run_spec
from tuner.cli import app as fmtune_cli

pytestmark = pytest.mark.engine
REPO = Path(__file__).resolve().parents[2]
# no warm-ups: the replica is hot and the test checks the apps' answers, not the latency
SMALL = {"workload.num_requests": 4, "workload.arrivals.users": 2, "workload.warmup_requests": 0}


def test_an_init_folder_and_the_arithmetic_app_run_on_the_hot_replica(
    engine_pool: ReplicaPool, hot_replica: Replica, tmp_path: Path
) -> None:
    assert CliRunner().invoke(fmtune_cli, ["init", str(tmp_path / "mine")]).exit_code == 0
    experiment = tmp_path / "mine" / "experiment.yaml"
    runs = {
        "direct": load_run_spec(experiment, SMALL),
        "recall_then_answer": load_run_spec(
            experiment, {**SMALL, "app.architecture": "recall_then_answer"}
        ),
        "expression": load_run_spec(
            REPO / "experiments" / "arithmetic-cpu.yaml",
            # with worked examples the bundled model writes an expression the code node parses
            {**SMALL, "app.architecture": "expression", "app.few_shot": True},
        ),
    }
    calls = {"direct": 1.0, "recall_then_answer": 2.0, "expression": 1.0}
    traces = {}
    for name, spec in runs.items():
        assert spec.deployment.models["llm"].engine == hot_replica.config  # reuses the hot one
        result = execute_run(spec, engine_pool)
        metrics, traces[name] = result.metrics, result.trace
        assert metrics.num_requests == 4 and metrics.error_rate == 0.0, name
        assert metrics.llm_calls_per_request == calls[name]
        assert metrics.quality is not None and 0.0 <= metrics.quality <= 1.0
        assert metrics.quality_ci95 is not None and metrics.score_errors == 0
    assert engine_pool.replicas() == [hot_replica]
    assert set(traces["expression"]["node_id"]) == {"write", "compute"}  # the code node ran
