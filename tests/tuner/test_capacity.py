"""Capacity as objectives (tuner.capacity): the metrics an experiment may optimize, a real
study that searches each trial's capacity in the simulator and confirms it with the study's
evaluation, and the exported bundle's README that states it.

The real evaluation is the test double of tests/tuner/test_fidelity.py (a trace of fixed
token counts), with an SLA attainment chosen per arrival rate; the profile is stored in an
empty fmtune home, so nothing starts an engine or reads a tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from optuna.trial import TrialState

from runtime.capacity import CAPACITY_METRICS
from runtime.errors import ConfigError
from runtime.run import RunResult, RunSpec
from runtime.workload import PoissonArrivals
from tests.tuner.test_fidelity import RealRuns, stored_profile  # noqa: F401 (a fixture)
from tests.tuner.test_study import runner, write_experiment
from tuner.experiment import Experiment, load_experiment, metric_names
from tuner.export import export_front
from tuner.study import ATTR_METRICS

pytestmark = [
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
]

OBJECTIVES = [
    {"metric": "max_goodput_rps", "direction": "maximize"},
    {"metric": "cost_per_1k_at_capacity_usd", "direction": "minimize"},
]


def capacity_experiment(tmp_path: Path, capacity: dict[str, Any] | None, **tune: Any) -> Path:
    """The study tests' experiment with the capacity objectives (and setting, when given),
    under a 3 s SLA that the test profile's replica misses past a few requests per second."""
    path = write_experiment(tmp_path, objectives=OBJECTIVES, **tune)
    data = yaml.safe_load(path.read_text())
    data["sla"] = {"e2e_s": 3.0}
    if capacity is not None:
        data["capacity"] = capacity
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_capacity_metrics_are_objectives_with_their_directions(tmp_path: Path) -> None:
    assert CAPACITY_METRICS == {
        "max_goodput_rps": "maximize",
        "cost_per_1k_at_capacity_usd": "minimize",
    }
    assert set(CAPACITY_METRICS) <= metric_names()
    path = capacity_experiment(tmp_path, {"target": 0.9}, constraints=["max_goodput_rps >= 1"])
    exp = load_experiment(path, need_tune=True)
    assert exp.tune is not None
    assert [o.metric for o in exp.tune.objectives] == list(CAPACITY_METRICS)
    assert [b.metric for b in exp.tune.bounds()] == ["max_goodput_rps"]
    assert exp.capacity is not None and exp.capacity.target == 0.9


def test_a_capacity_objective_without_the_setting_is_one_line(tmp_path: Path) -> None:
    path = capacity_experiment(tmp_path, None)
    with pytest.raises(ConfigError) as raised:
        load_experiment(path, need_tune=True)
    message = str(raised.value)
    assert "\n" not in message and str(path) in message
    assert "metric 'max_goodput_rps' is measured only with the capacity setting" in message


class RatedRuns(RealRuns):
    """RealRuns whose SLA attainment at an open-loop rate is 0.97 up to `capacity_rps` and
    0.5 past it (1.0 for the experiment's own closed-loop run)."""

    def __init__(self, capacity_rps: float) -> None:
        super().__init__()
        self.capacity_rps = capacity_rps

    def __call__(self, spec: RunSpec) -> RunResult:
        result = super().__call__(spec)
        arrivals = spec.workload.arrivals
        attainment = 1.0
        if isinstance(arrivals, PoissonArrivals):
            attainment = 0.97 if arrivals.rate_rps <= self.capacity_rps else 0.5
        update = {"sla_attainment": attainment, "requests_per_s": 1.5}
        result.metrics = result.metrics.model_copy(update=update)
        return result


@pytest.mark.usefixtures("stored_profile")
def test_a_real_study_measures_each_trials_capacity_and_the_readme_states_it(
    tmp_path: Path,
) -> None:
    capacity = {"target": 0.95, "tolerance": 0.1, "num_requests": 24}
    exp: Experiment = load_experiment(
        capacity_experiment(tmp_path, capacity, trials=2), need_tune=True
    )
    real = RatedRuns(capacity_rps=1e9)  # the real engine confirms whatever the simulator finds
    study = runner(tmp_path, exp, real)
    reports = study.run()
    assert [r.state for r in reports] == ["COMPLETE", "COMPLETE"]
    confirmations = [s for s in real.specs if isinstance(s.workload.arrivals, PoissonArrivals)]
    assert len(confirmations) == 2  # one per trial, at the rate the simulator found
    assert all(s.workload.num_requests == 24 and s.capacity is None for s in confirmations)
    for trial, confirmed in zip(
        study.study.get_trials(states=(TrialState.COMPLETE,)), confirmations, strict=True
    ):
        metrics = trial.user_attrs[ATTR_METRICS]
        detail = metrics["capacity"]
        assert metrics["max_goodput_rps"] == detail["simulated_rps"] > 0
        assert confirmed.workload.arrivals.rate_rps == detail["simulated_rps"]  # type: ignore[union-attr]
        assert detail["confirmed_probes"] == [[detail["simulated_rps"], 0.97]]
        assert detail["simulated_attainment"] >= 0.95 and detail["status"] == "found"
        assert trial.values == [metrics["max_goodput_rps"], metrics["cost_per_1k_at_capacity_usd"]]
    bundles = export_front(study.study, tmp_path / "export")
    readme = (bundles[0].folder / "README.md").read_text()
    rate = bundles[0].metrics["max_goodput_rps"]
    assert f"Capacity: {rate:.3g} req/s with at least 95% of requests answered within 3 s" in (
        readme
    )
    assert f"| max_goodput_rps | {rate:.4g} |" in readme
    assert "| capacity |" not in readme  # the detail makes the sentence, not a table row


@pytest.mark.usefixtures("stored_profile")
def test_a_rate_the_real_engine_misses_is_stepped_down_once(tmp_path: Path) -> None:
    capacity = {"target": 0.95, "tolerance": 0.1, "num_requests": 24, "step_down": 0.5}
    exp = load_experiment(capacity_experiment(tmp_path, capacity, trials=1), need_tune=True)
    real = RatedRuns(capacity_rps=0.0)  # misses at every rate: no capacity is confirmed
    reports = runner(tmp_path, exp, real).run()
    assert reports[0].state == "FAIL"  # the objective is undefined, and the trial says why
    assert "max_goodput_rps" in str(reports[0].failure)
    rates = [s.workload.arrivals.rate_rps for s in real.specs if s.capacity is None and
             isinstance(s.workload.arrivals, PoissonArrivals)]  # fmt: skip
    assert len(rates) == 2 and rates[1] == pytest.approx(rates[0] * 0.5)


@pytest.mark.usefixtures("stored_profile")
def test_a_simulated_study_searches_capacity_without_confirming_it(tmp_path: Path) -> None:
    capacity = {"target": 0.95, "tolerance": 0.1, "num_requests": 24}
    path = capacity_experiment(tmp_path, capacity, trials=2, fidelity="sim")
    real = RatedRuns(capacity_rps=1e9)
    study = runner(tmp_path, load_experiment(path, need_tune=True), real)
    assert [r.state for r in study.run()] == ["COMPLETE", "COMPLETE"]
    assert not [s for s in real.specs if isinstance(s.workload.arrivals, PoissonArrivals)]
    for trial in study.study.get_trials(states=(TrialState.COMPLETE,)):
        detail = trial.user_attrs[ATTR_METRICS]["capacity"]
        assert detail["confirmed"] is False and detail["confirmed_probes"] == []
        assert trial.user_attrs[ATTR_METRICS]["max_goodput_rps"] == detail["simulated_rps"] > 0


@pytest.mark.usefixtures("stored_profile")
def test_fmtune_run_with_capacity_shows_and_writes_both_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fmtune run` with `capacity` set: the run, the simulated search, one confirmation on
    the run's pool (execute_run is the test double here: no replica starts)."""
    from typer.testing import CliRunner

    from tuner.cli import app

    real = RatedRuns(capacity_rps=1e9)
    monkeypatch.setattr("runtime.run.execute_run", lambda spec, _pool, **_kw: real(spec))
    path = capacity_experiment(tmp_path, {"target": 0.95, "num_requests": 24})
    out = tmp_path / "run"
    done = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert done.exit_code == 0, done.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["max_goodput_rps"] == metrics["capacity"]["simulated_rps"] > 0
    assert metrics["cost_per_1k_at_capacity_usd"] > 0
    assert "max_goodput_rps" in done.stdout and "Capacity: " in done.stdout
    kinds = [s.workload.arrivals.kind for s in real.specs]
    assert kinds == ["closed", "poisson"]  # the run, then its confirmation
    bad = CliRunner().invoke(app, ["run", str(path), "--set", "capacity.target=2"])
    assert bad.exit_code == 2
    (line,) = bad.stderr.strip().splitlines()
    assert "capacity.target: Input should be less than or equal to 1" in line
