"""Real studies through the CLI on the shared hot replica (cluster 'endpoints'): tracking,
Pareto outputs, export, SIGKILL + --resume with no trial lost or duplicated, and a user's own
app folder (tests/data/sentiment) through `fmtune run` and `fmtune tune`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import optuna
import pandas as pd
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from mlflow import MlflowClient
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError
from typer.testing import CliRunner

from runtime.deployment import load_deployment
from runtime.engine.replica import Replica
from runtime.run import load_run_spec
from tests.runtime.fake_openai import LoopbackServer
from tests.tuner.study_peek import peek_study
from tuner.cli import app as fmtune_cli
from tuner.pareto import duplicate_of
from tuner.study import ATTR_FAILURE, ATTR_NOT_COUNTED

pytestmark = pytest.mark.engine
REPO = Path(__file__).resolve().parents[2]
FMTUNE = [sys.executable, "-m", "tuner.cli"]
SENTIMENT = REPO / "tests" / "data" / "sentiment"


def write_experiment(tmp_path: Path, url: str, trials: int, requests: int) -> Path:
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump({"app": {"architecture": ["single", "parallel"], "format": ["json", "tag"]}})
    )
    data: dict[str, Any] = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())
    data["name"] = "endpoint-study"
    # no warm-ups: the replica is hot and these tests check the study, not the measurement
    data["workload"] = {
        "arrivals": {"kind": "closed", "users": 2},
        "num_requests": requests,
        "warmup_requests": 0,
    }
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
    # one run per measured trial (a trial with the knobs of an earlier one reuses its result)
    measured = [t for t in study.trials if duplicate_of(t) is None]
    assert len(parents) == 1 and len(trials) == len(measured)
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


class TrialGate:
    """A pass-through proxy in front of the hot replica that holds every engine call made while
    a trial numbered `hold_from` or later is running, so the test decides when a trial is in
    flight instead of racing it with polls.

    A call reaches the gate only after the tuner has asked optuna for its trial, so the
    storage already shows that trial RUNNING when the gate looks: trial 0's calls pass, the
    first call of trial 1 is held (and `held` is set) until `open()`. GETs (/metrics, health)
    always pass.
    """

    def __init__(self, upstream: str, storage_url: str, hold_from: int) -> None:
        self.upstream = upstream
        self.storage_url = storage_url
        self.hold_from = hold_from
        self.held = threading.Event()
        self.opened = threading.Event()
        self.app = FastAPI()
        self.app.add_api_route("/{path:path}", self._forward, methods=["GET", "POST"])

    def open(self) -> None:
        """Let every held and later call through."""
        self.opened.set()

    def _must_hold(self) -> bool:
        while not self.opened.is_set():
            study = peek_study("endpoint-study", self.storage_url)
            try:
                running = [] if study is None else study.get_trials(states=(TrialState.RUNNING,))
            except (SQLAlchemyError, optuna.exceptions.StorageInternalError):  # busy: look again
                time.sleep(0.05)
                continue
            if study is not None:
                return any(trial.number >= self.hold_from for trial in running)
            time.sleep(0.05)
        return False

    async def _forward(self, path: str, request: Request) -> Response:
        if request.method == "POST" and await asyncio.to_thread(self._must_hold):
            self.held.set()
            await asyncio.to_thread(self.opened.wait)
        client = httpx.AsyncClient(base_url=self.upstream, timeout=120)
        upstream = await client.send(
            client.build_request(
                request.method, f"/{path}", content=await request.body(),
                headers={"content-type": request.headers.get("content-type", "")},
            ),
            stream=True,
        )  # fmt: skip

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()
                await client.aclose()

        media = upstream.headers.get("content-type")
        return StreamingResponse(relay(), status_code=upstream.status_code, media_type=media)


def test_sigkill_then_resume_loses_and_duplicates_nothing(
    hot_replica: Replica, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    gate = TrialGate(hot_replica.base_url, f"sqlite:///{out}/study.db", hold_from=1)
    with LoopbackServer(gate.app) as proxy:
        experiment = write_experiment(tmp_path, proxy.url, trials=4, requests=4)
        tuner = subprocess.Popen(
            [*FMTUNE, "tune", str(experiment), "--out", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
        )  # fmt: skip
        try:
            assert gate.held.wait(timeout=300), "no call of trial 1 reached the replica"
            study = peek_study("endpoint-study", f"sqlite:///{out}/study.db")
            assert study is not None
            (running,) = study.get_trials(states=(TrialState.RUNNING,))
            killed_number = running.number  # held mid-trial: its first call is in flight
            assert killed_number == 1 and running.params
            os.kill(tuner.pid, signal.SIGKILL)
            tuner.wait(timeout=30)
        finally:
            gate.open()
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


def test_an_app_in_the_public_format_runs_and_tunes_through_the_cli(
    hot_replica: Replica, tmp_path: Path
) -> None:
    """tests/data/sentiment is written only in the public app format (app.yaml, a CSV dataset,
    a code node's file, a built-in scorer) and shipped nowhere: `fmtune run` measures its
    code-node variant and a 2-trial `fmtune tune` searches its variants and prompt knob, both on
    the hot replica (its experiment declares the hot replica's engine)."""
    experiment = SENTIMENT / "experiment.yaml"
    assert load_run_spec(experiment).deployment.models["llm"].engine == hot_replica.config
    on_hot = ["--set", "deployment.cluster=endpoints",
              "--set", f"deployment.models.llm.endpoints=[{hot_replica.base_url}]"]  # fmt: skip
    cli = CliRunner()
    ran = cli.invoke(
        fmtune_cli,
        ["run", str(experiment), *on_hot, "--set", "app.architecture=free_text",
         "--out", str(tmp_path / "run")],
    )  # fmt: skip
    assert ran.exit_code == 0, ran.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_requests"] == 4 and metrics["error_rate"] == 0.0
    assert metrics["llm_calls_per_request"] == 1.0 and metrics["score_errors"] == 0
    assert 0.0 <= metrics["quality"] <= 1.0 and metrics["quality_ci95"] is not None
    trace = pd.read_parquet(tmp_path / "run" / "trace.parquet")
    assert set(trace["node_id"]) == {"opinion", "read"}  # the app's own code node ran

    tuned = cli.invoke(
        fmtune_cli,
        ["tune", str(experiment), *on_hot, "--trials", "2", "--out", str(tmp_path / "tune")],
    )
    assert tuned.exit_code == 0, tuned.output
    study = optuna.load_study(study_name="sentiment", storage=f"sqlite:///{tmp_path}/tune/study.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert all(set(t.params) == {"app.architecture", "app.prompt"} for t in study.trials)
    assert (tmp_path / "tune" / "pareto.csv").stat().st_size > 0
