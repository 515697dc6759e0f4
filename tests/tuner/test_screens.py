"""What a person sees of a study, checked in a real browser: the MLflow UI (`fmtune ui`) and
optuna-dashboard (`fmtune dashboard`) rendered by headless Chromium.

A small finished study is built without an engine (StudyRunner with a fake evaluation, an
MLflow tracker on SQLite), both UIs are started on it as `fmtune` subprocesses, and
benchmarks/screens.py renders their pages: the DOM after the pages' scripts ran is what the
assertions read (the screenshots go to the test's temporary folder; benchmarks/screens.py
writes them to reports/screens/). Chromium (Debian's) is installed with apt-get when
missing; a failed install fails the test with apt's reason.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from benchmarks import screens
from runtime.errors import EngineFailure
from runtime.metrics import RunMetrics
from runtime.routing.router import RouterStats
from runtime.run import RunResult, RunSpec
from tests.tuner.test_study import SPACE
from tuner.experiment import load_experiment
from tuner.study import StudyRunner, default_storage_url
from tuner.tracking import StudyTracker, default_tracking_uri

ROOT = Path(__file__).resolve().parents[2]
STUDY = "screens-demo"
OBJECTIVES = ("cost_per_1k_usd", "quality")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
]

# (architecture, format, max_num_seqs) of the four trials, in order: one infeasible (quality
# below the bound), two on the front, one whose replica "fails to start".
KNOBS = [("single", "json", 16), ("parallel", "json", 8), ("parallel", "tag", 16),
         ("single", "tag", 4)]  # fmt: skip
FAILING_SEQS = 4


def _fake_evaluate(spec: RunSpec) -> RunResult:
    """Metrics from the knobs alone (as tests/tuner/test_study.py): more sequences per batch
    is cheaper; parallel and the tag format are better and dearer."""
    seqs = spec.deployment.models["llm"].engine.max_num_seqs or 1
    if seqs == FAILING_SEQS:
        raise EngineFailure("replica llm/0 exited with code 1 (fake)")
    parallel = spec.app.architecture == "parallel"
    tag = spec.app.format.value == "tag"
    quality = (0.7 if parallel else 0.3) + (0.05 if tag else 0.0)
    metrics: dict[str, Any] = {
        "num_requests": 4, "num_failed": 0, "wall_s": 2.0, "sla_e2e_s": spec.sla.e2e_s,
        "e2e_p95_s": 1.0 + seqs / 16,
        "cost_per_1k_usd": 1.0 / seqs + (0.5 if parallel else 0.0) + (0.1 if tag else 0.0),
        "quality": quality, "quality_ci95": [quality - 0.1, quality + 0.1], "error_rate": 0.0,
    }  # fmt: skip
    return RunResult(
        metrics=RunMetrics(**metrics), trace=pd.DataFrame(), results=[],
        router_stats=RouterStats(), replica_start_s={},
    )  # fmt: skip


def build_study(folder: Path) -> None:
    """A finished four-trial study in `folder` as `fmtune tune` leaves one: study.db (optuna,
    with fmtune's attributes and constraints) and mlflow.db (the parent run, a nested run per
    trial, the front's size on the parent)."""
    from tuner.export import front_frame

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "space.yaml").write_text(SPACE)
    data = yaml.safe_load((ROOT / "experiments" / "extract-cpu.yaml").read_text())
    data["tune"] = {
        "search_space": "space.yaml",
        "objectives": [
            {"metric": OBJECTIVES[0], "direction": "minimize"},
            {"metric": OBJECTIVES[1], "direction": "maximize"},
        ],
        "constraints": ["quality >= 0.5"],
        "trials": len(KNOBS),
        "sampler": "random",
    }
    (folder / "experiment.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    experiment = load_experiment(folder / "experiment.yaml", need_tune=True)
    tracker = StudyTracker(
        default_tracking_uri(folder), experiment_name=f"fmtune-{STUDY}", study_name=STUDY
    )
    runner = StudyRunner(
        experiment, storage_url=default_storage_url(folder), study_name=STUDY, out_dir=folder,
        evaluate=_fake_evaluate, tracker=tracker,
    )  # fmt: skip
    for architecture, fmt, seqs in KNOBS:
        runner.study.enqueue_trial(
            {"app.architecture": architecture, "app.format": fmt, "engine.max_num_seqs": seqs}
        )
    tracker.log_study(
        {"sampler": "random", "trials": len(KNOBS)}, {"fmtune.experiment_file": STUDY}
    )
    runner.run()
    table = front_frame(runner.study)
    tracker.log_study_summary({"front_size": int(table["on_front"].sum())}, {})
    tracker.finish_study()


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("screens") / "study"
    build_study(folder)
    return folder


def _text(dom: str) -> str:
    """The visible text of a DOM, tags dropped and whitespace squeezed."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))


def test_the_study_as_people_see_it(study_dir: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    facts, shots = screens.capture(study_dir, tmp_path / "screens")
    pages = {screen.name: screen for screen in shots}
    print(f"rendered {len(pages)} pages in {time.monotonic() - started:.1f} s")
    assert facts.study_name == STUDY
    for screen in shots:
        assert screen.png.stat().st_size > 10_000, f"{screen.name}: a blank screenshot?"

    # MLflow, the experiment's page: the study's parent run, with every run counted.
    landing = _text(pages["mlflow-experiment"].dom)
    # (MLflow 3 opens its GenAI "Overview" unless told the "Model training" view.)
    assert f"Runs - Experiment {facts.mlflow_experiment_id}" in landing, landing[:2000]
    assert re.search(rf"\b{STUDY}\b", landing), f"no parent run {STUDY}: {landing[:2000]}"
    assert f"{len(KNOBS) + 1} matching runs" in landing, landing[:2000]

    # MLflow, the runs sorted by the first objective: every trial run is a row.
    runs = _text(pages["mlflow-trials"].dom)
    for number in range(len(KNOBS)):
        assert f"trial-{number}" in runs, f"MLflow runs table lacks trial-{number}: {runs[:2000]}"
    assert STUDY in runs

    # optuna-dashboard, the study: its name, the objectives by name, the best trials.
    study = _text(pages["optuna-study"].dom)
    assert f"{STUDY} (id={facts.optuna_study_id})" in study, study[:2000]
    for name in OBJECTIVES:
        assert f"Objective X: {name}" in study or f"Objective Y: {name}" in study, (
            f"optuna-dashboard does not name objective {name}: {study[:2000]}"
        )
    assert "fmtune.objectives" in study and "fmtune.constraints" in study
    best = study.split("Best Trials", 1)[-1]
    for number, values in ((1, "[0.625, 0.7]"), (2, "[0.6625, 0.75]")):  # the front
        assert f"Trial {number} Objective Values = {values}" in best, best[:2000]
    # optuna-dashboard 0.21 reads only optuna's old list of constraints, not optuna 5's named
    # ones (trial.set_constraint): trial 0, below the quality bound, is among its best trials.
    # `fmtune dashboard --help` says so; when this fails, the dashboard learned constraints.
    assert "Trial 0 Objective Values = [0.0625, 0.3]" in best, "update dashboard's help"

    # optuna-dashboard, the failed trial among all trials: fmtune's attributes, by name.
    trial = _text(pages["optuna-trial"].dom)
    assert f"{len(KNOBS)} Trials" in trial, trial[:2000]
    assert f"Trial {facts.shown_trial} (trial_id=" in trial, trial[:2000]
    assert "fmtune.failure_reason replica llm/0 exited with code 1 (fake)" in trial, trial[:2000]
    assert "fmtune.failure_kind engine" in trial


def test_dashboard_without_a_study_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        screens.fmtune("dashboard", "--out", str(tmp_path), "--port", str(screens.free_port())),
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no study.db in" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_dashboard_that_dies_is_one_line_its_tail_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "study.db").write_text("not a database")
    done = subprocess.run(
        screens.fmtune("dashboard", "--out", str(tmp_path), "--port", str(screens.free_port())),
        capture_output=True, text=True, cwd=ROOT, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    first, *tail = done.stderr.strip().splitlines()
    assert first.startswith("error: optuna-dashboard on sqlite:///"), first
    assert "exited with code" in first and "before answering" in first
    assert 0 < len(tail) <= 12 and "Error" in tail[-1], tail


def test_dashboard_on_a_taken_port_is_one_line_and_exit_2(study_dir: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            screens.fmtune("dashboard", "--out", str(study_dir), "--port", str(port)),
            capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_dashboard_stops_optuna_dashboard_on_sigterm(study_dir: Path) -> None:
    """SIGTERM to `fmtune dashboard` stops its optuna-dashboard too (it runs in its own
    process group, so only fmtune's finally block can stop it)."""
    port = screens.free_port()
    process = subprocess.Popen(
        screens.fmtune("dashboard", "--out", str(study_dir), "--port", str(port)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/dashboard" in line, line
        assert screens.answers(f"http://127.0.0.1:{port}/api/meta")
        process.terminate()
        assert process.wait(timeout=30) == 128 + 15
        assert not screens.answers(f"http://127.0.0.1:{port}/api/meta")
    finally:
        process.kill()
        process.wait()
