"""Real studies through the CLI on the shared hot replica (cluster 'endpoints'): tracking,
Pareto outputs, export, and SIGKILL + --resume with no trial lost or duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from runtime.deployment import load_deployment
from runtime.engine.replica import Replica
from tests.tuner.study_peek import peek_study
from tuner.study import ATTR_FAILURE, ATTR_NOT_COUNTED

pytestmark = pytest.mark.engine
REPO = Path(__file__).resolve().parents[2]
FMTUNE = [sys.executable, "-m", "tuner.cli"]


def write_experiment(tmp_path: Path, url: str, trials: int, requests: int) -> Path:
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump({"app": {"architecture": ["single", "parallel"], "format": ["json", "tag"]}})
    )
    data: dict[str, Any] = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())
    data["name"] = "endpoint-study"
    data["workload"] = {"arrivals": {"kind": "closed", "users": 2}, "num_requests": requests}
    data["deployment"]["cluster"] = "endpoints"
    data["deployment"]["models"]["llm"]["endpoints"] = [url]
    data["tune"].update(search_space=str(space), trials=trials, sampler="random", population_size=2)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tune(experiment: Path, out: Path, *extra: str, timeout: float = 600) -> None:
    done = subprocess.run(
        [*FMTUNE, "tune", str(experiment), "--out", str(out), *extra],
        capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="endpoint-study", storage=f"sqlite:///{out}/study.db")


def test_study_tracks_reports_and_exports(hot_replica: Replica, tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path, hot_replica.base_url, trials=3, requests=2)
    out = tmp_path / "out"
    tune(experiment, out)
    study = load(out)
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 3
    for name in ("pareto.csv", "pareto.png", "report.html"):
        assert (out / name).stat().st_size > 0
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (experiment_row,) = client.search_experiments(filter_string="name = 'fmtune-endpoint-study'")
    runs = client.search_runs([experiment_row.experiment_id])
    parents = [r for r in runs if r.data.tags.get("fmtune.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("fmtune.kind") == "trial"]
    assert len(parents) == 1 and len(trials) == 3
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
    assert all("app.architecture" in r.data.params for r in trials)
    assert all("e2e_p95_s" in r.data.metrics for r in trials)

    bundles = tmp_path / "bundles"
    done = subprocess.run(
        [*FMTUNE, "export", "--study", "endpoint-study", "--storage",
         f"sqlite:///{out}/study.db", "--out", str(bundles)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    exported = sorted(bundles.glob("trial-*/DEPLOY.yaml"))
    assert exported
    deployment = load_deployment(exported[0])
    assert deployment.models["llm"].endpoints == (hot_replica.base_url,)


def test_sigkill_then_resume_loses_and_duplicates_nothing(
    hot_replica: Replica, tmp_path: Path
) -> None:
    experiment = write_experiment(tmp_path, hot_replica.base_url, trials=4, requests=4)
    out = tmp_path / "out"
    out.mkdir()
    tuner = subprocess.Popen(
        [*FMTUNE, "tune", str(experiment), "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    killed_number = None
    try:
        deadline = time.monotonic() + 300
        while killed_number is None and time.monotonic() < deadline:
            time.sleep(0.3)
            study = peek_study("endpoint-study", f"sqlite:///{out}/study.db")
            if study is None:
                continue
            try:
                running = study.get_trials(states=(TrialState.RUNNING,))
            except (SQLAlchemyError, optuna.exceptions.StorageInternalError):  # busy
                continue
            if running and running[0].number >= 1 and running[0].params:
                killed_number = running[0].number
        assert killed_number is not None, "the study never reached its second trial"
        time.sleep(1.0)  # mid-trial: requests in flight
        os.kill(tuner.pid, signal.SIGKILL)
        tuner.wait(timeout=30)
    finally:
        if tuner.poll() is None:
            tuner.kill()

    tune(experiment, out, "--resume")
    study = load(out)
    killed = study.trials[killed_number]
    assert killed.state == TrialState.FAIL
    assert killed.user_attrs[ATTR_FAILURE] == "interrupted"
    assert killed.user_attrs[ATTR_NOT_COUNTED] is True
    counted = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(counted) == 4, [(t.number, t.state.name) for t in study.trials]
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in study.trials)
    # the interrupted knobs were measured again, as a later trial
    assert any(t.params == killed.params and t.number > killed_number for t in counted)
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs(
        [client.get_experiment_by_name("fmtune-endpoint-study").experiment_id],
        filter_string=f"tags.`fmtune.trial` = '{killed_number}'",
    )
    assert [r.info.status for r in runs] == ["KILLED"]
