"""StudyRunner's ask/tell loop and the Pareto-front export, with a deterministic evaluation.

The evaluation is a test double of `runtime.run.execute_run`: it turns a trial's RunSpec into
RunMetrics by fixed rules (cost falls with max_num_seqs, quality depends on the architecture
and format), so every bookkeeping rule of the study can be checked in seconds: the budget,
every sampler, engine failures and skipped configs, SLA constraints, resume after a crash,
racing workers, undefined objectives, objective mismatches and the MLflow runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from runtime.deployment import load_deployment
from runtime.engine.pool import PoolCapacityError
from runtime.engine.replica import ReplicaStartError
from runtime.errors import ConfigError, EngineFailure
from runtime.metrics import RunMetrics
from runtime.routing.router import RouterStats
from runtime.run import RunResult, RunSpec
from tuner.experiment import Experiment, load_experiment
from tuner.export import export_front, load_study, study_experiment
from tuner.pareto import ATTR_DUPLICATE_OF, pareto_front, trial_constraints
from tuner.samplers import SAMPLERS
from tuner.study import (
    ATTR_CONFIG_HASH,
    ATTR_FAILURE,
    ATTR_FEASIBLE,
    ATTR_KIND,
    ATTR_METRICS,
    ATTR_NOT_COUNTED,
    ATTR_RUN_ID,
    ATTR_VIOLATIONS,
    ATTR_WORKER,
    FailureKind,
    StudyRunner,
    budget_used,
    counted,
    knob_identity,
    make_storage,
    summarize_study,
    worker_id,
)

ROOT = Path(__file__).resolve().parents[2]
STUDY = "study-under-test"

# MLflow's own SQLAlchemy store uses a loader strategy SQLAlchemy deprecates; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
]

SPACE = """
description: tiny space for the study tests
app:
  architecture: [single, parallel]
  format: [json, tag]
engine:
  max_num_seqs: {type: int, low: 4, high: 16, step: 4}
"""

QUALITY = {"single": 0.3, "parallel": 0.7, "sequential": 0.5, "judge": 0.6}


# --- the test double of execute_run -----------------------------------------------------


def fake_metrics(spec: RunSpec, **changes: Any) -> RunMetrics:
    """Metrics from the knobs alone: more sequences per batch is cheaper; parallel is better
    but dearer than single, and the tag format a little better but dearer than json."""
    seqs = spec.deployment.models["llm"].engine.max_num_seqs or 1
    parallel = spec.app.architecture == "parallel"
    tag = spec.app.format.value == "tag"
    quality = QUALITY[spec.app.architecture] + (0.05 if tag else 0.0)
    data: dict[str, Any] = {
        "num_requests": 4,
        "num_failed": 0,
        "wall_s": 2.0,
        "sla_e2e_s": spec.sla.e2e_s,
        "e2e_p95_s": 1.0 + seqs / 16,
        "cost_per_1k_usd": 1.0 / seqs + (0.5 if parallel else 0.0) + (0.1 if tag else 0.0),
        "quality": quality,
        "quality_ci95": [quality - 0.1, quality + 0.1],
        "error_rate": 0.0,
    }
    return RunMetrics(**(data | changes))


def fake_result(metrics: RunMetrics) -> RunResult:
    return RunResult(
        metrics=metrics,
        trace=pd.DataFrame(),
        results=[],
        router_stats=RouterStats(),
        replica_start_s={},
    )


class Evaluation:
    """Records every RunSpec it is handed; `fail` decides per spec whether it raises."""

    def __init__(
        self,
        fail: Callable[[RunSpec], BaseException | None] | None = None,
        **metric_changes: Any,
    ) -> None:
        self.specs: list[RunSpec] = []
        self.fail = fail
        self.metric_changes = metric_changes

    def __call__(self, spec: RunSpec) -> RunResult:
        self.specs.append(spec)
        error = self.fail(spec) if self.fail is not None else None
        if error is not None:
            raise error
        return fake_result(fake_metrics(spec, **self.metric_changes))

    def knobs(self) -> list[tuple[str, str, int | None]]:
        return [
            (s.app.architecture, s.app.format.value, s.deployment.models["llm"].engine.max_num_seqs)
            for s in self.specs
        ]


# --- helpers ----------------------------------------------------------------------------


def write_experiment(tmp_path: Path, **tune: Any) -> Path:
    """experiments/extract-cpu.yaml plus a tune section over the tiny space."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    data = yaml.safe_load((ROOT / "experiments" / "extract-cpu.yaml").read_text())
    data["tune"] = {
        "search_space": space.name,
        "objectives": [
            {"metric": "cost_per_1k_usd", "direction": "minimize"},
            {"metric": "quality", "direction": "maximize"},
        ],
        "trials": 4,
        "sampler": "random",
        "population_size": 2,
    } | tune
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def experiment(tmp_path: Path, **tune: Any) -> Experiment:
    return load_experiment(write_experiment(tmp_path, **tune), need_tune=True)


def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def runner(
    tmp_path: Path, exp: Experiment, evaluate: Callable[[RunSpec], RunResult], **kwargs: Any
) -> StudyRunner:
    return StudyRunner(
        exp,
        storage_url=storage_url(tmp_path),
        study_name=STUDY,
        out_dir=tmp_path / "out",
        evaluate=evaluate,
        **kwargs,
    )


def enqueue(study: optuna.Study, architecture: str, fmt: str, seqs: int) -> None:
    study.enqueue_trial(
        {"app.architecture": architecture, "app.format": fmt, "engine.max_num_seqs": seqs},
        skip_if_exists=False,
    )


def knobs_of(params: dict[str, Any]) -> tuple[str, str, int]:
    return params["app.architecture"], params["app.format"], params["engine.max_num_seqs"]


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if counted(t)]


# --- budget and samplers ----------------------------------------------------------------


def test_budget_is_exactly_the_number_of_counted_trials(tmp_path: Path) -> None:
    evaluate = Evaluation()
    study_runner = runner(tmp_path, experiment(tmp_path, trials=5), evaluate)

    reports = study_runner.run()

    assert len(reports) == 5
    assert budget_used(study_runner.study) == (5, 0)
    trials = study_runner.study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    # The random sampler may propose a knob set twice: only distinct ones are measured.
    measured = [t for t in trials if ATTR_DUPLICATE_OF not in t.user_attrs]
    assert len(evaluate.specs) == len(measured) == len({knobs_of(t.params) for t in trials})
    for trial in measured:
        assert trial.user_attrs[ATTR_WORKER] == worker_id()
        assert trial.user_attrs[ATTR_METRICS]["quality"] == pytest.approx(trial.values[1])
        folder = tmp_path / "out" / "trials" / f"{trial.number:04d}"
        assert (folder / "metrics.json").is_file()
        assert (folder / "trace.parquet").is_file()
        deployed = load_deployment(folder / "DEPLOY.yaml")
        assert deployed.apps["extraction"].architecture == trial.params["app.architecture"]
        engine = deployed.models["llm"].engine
        assert engine.max_num_seqs == trial.params["engine.max_num_seqs"]
        assert trial.user_attrs[ATTR_CONFIG_HASH] == engine.config_hash()

    # The budget is used up: running again evaluates nothing.
    assert runner(tmp_path, experiment(tmp_path, trials=5), evaluate).run() == []
    assert len(evaluate.specs) == len(measured)
    # A larger budget continues the same study up to the new total.
    assert len(study_runner.run(trials=7)) == 2
    assert budget_used(study_runner.study) == (7, 0)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_completes_a_short_study(tmp_path: Path, sampler: str) -> None:
    evaluate = Evaluation()
    study_runner = runner(tmp_path, experiment(tmp_path, trials=6, sampler=sampler), evaluate)

    reports = study_runner.run()

    assert [r.state for r in reports] == ["COMPLETE"] * 6
    trials = study_runner.study.get_trials()
    assert len(trials) == 6
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # Every measured trial evaluated the knobs it recorded; a repeated knob set was not
    # measured again.
    measured = [t for t in trials if ATTR_DUPLICATE_OF not in t.user_attrs]
    assert evaluate.knobs() == [knobs_of(t.params) for t in measured]
    assert len(measured) == len({knobs_of(t.params) for t in trials})
    assert pareto_front(study_runner.study)
    if sampler == "grid":  # the grid sampler never repeats a point of the grid
        assert len(measured) == 6


def test_sampler_override_is_used_and_stored(tmp_path: Path) -> None:
    study_runner = runner(
        tmp_path, experiment(tmp_path, sampler="random"), Evaluation(), sampler_name="grid"
    )
    assert isinstance(study_runner.study.sampler, optuna.samplers.GridSampler)
    stored = study_experiment(study_runner.study)
    assert stored.tune is not None
    assert stored.tune.sampler == "grid"


# --- failures ---------------------------------------------------------------------------


def test_engine_failure_is_counted_and_its_config_skipped_afterwards(tmp_path: Path) -> None:
    def fail(spec: RunSpec) -> BaseException | None:
        if spec.deployment.models["llm"].engine.max_num_seqs == 8:
            return ReplicaStartError("replica llm/0 exited with code 1\n...log tail: OOM...")
        return None

    evaluate = Evaluation(fail)
    study_runner = runner(tmp_path, experiment(tmp_path, trials=3), evaluate)
    enqueue(study_runner.study, "single", "json", 8)  # fails to start
    enqueue(study_runner.study, "parallel", "tag", 8)  # same engine config: skipped
    enqueue(study_runner.study, "single", "json", 4)  # another engine: runs

    reports = study_runner.run()

    assert [r.state for r in reports] == ["FAIL", "FAIL", "COMPLETE"]
    assert evaluate.knobs() == [("single", "json", 8), ("single", "json", 4)]
    first, second, third = study_runner.study.get_trials()
    assert first.state == TrialState.FAIL
    assert first.user_attrs[ATTR_KIND] == "engine"
    assert first.user_attrs[ATTR_FAILURE] == "replica llm/0 exited with code 1"
    assert reports[0].failure == "engine: replica llm/0 exited with code 1"
    assert second.state == TrialState.FAIL
    assert second.user_attrs[ATTR_KIND] == "skipped"
    assert first.user_attrs[ATTR_CONFIG_HASH] in second.user_attrs[ATTR_FAILURE]
    assert "replica llm/0 exited with code 1" in second.user_attrs[ATTR_FAILURE]
    assert second.user_attrs[ATTR_CONFIG_HASH] == first.user_attrs[ATTR_CONFIG_HASH]
    assert third.state == TrialState.COMPLETE
    # Failed and skipped trials use up budget.
    assert budget_used(study_runner.study) == (3, 0)
    summary = summarize_study(study_runner.study)
    assert (summary.complete, summary.failed, summary.not_counted) == (1, 2, 0)
    assert summary.by_failure_kind == {"engine": 1, "skipped": 1}


def test_engine_config_is_retried_until_max_failures_per_config(tmp_path: Path) -> None:
    evaluate = Evaluation(lambda spec: ReplicaStartError("did not become ready"))
    study_runner = runner(
        tmp_path, experiment(tmp_path, trials=3, max_failures_per_config=2), evaluate
    )
    for fmt in ("json", "tag", "json"):
        enqueue(study_runner.study, "single", fmt, 12)

    study_runner.run()

    kinds = [t.user_attrs[ATTR_KIND] for t in study_runner.study.get_trials()]
    assert kinds == ["engine", "engine", "skipped"]
    assert len(evaluate.specs) == 2


@pytest.mark.parametrize(
    "error",
    [
        PoolCapacityError("a replica needs about 9.0 GiB, more than max_memory_gib=8"),
        EngineFailure("replica llm/0 died\nlog tail"),
    ],
    ids=["pool capacity", "any engine failure"],
)
def test_every_engine_failure_is_recorded_as_engine(tmp_path: Path, error: Exception) -> None:
    study_runner = runner(tmp_path, experiment(tmp_path, trials=1), Evaluation(lambda _: error))

    (report,) = study_runner.run()

    (trial,) = study_runner.study.get_trials()
    kind = trial.user_attrs[ATTR_KIND]
    assert kind == FailureKind.ENGINE and type(kind) is str  # stored by value
    assert trial.user_attrs[ATTR_FAILURE] == str(error).splitlines()[0]
    assert report.failure == f"engine: {str(error).splitlines()[0]}"


def test_evaluation_error_fails_the_trial_with_its_reason(tmp_path: Path) -> None:
    evaluate = Evaluation(lambda spec: TimeoutError("node llm timed out after 300 s"))
    study_runner = runner(tmp_path, experiment(tmp_path, trials=2), evaluate)

    reports = study_runner.run()

    assert [r.state for r in reports] == ["FAIL", "FAIL"]
    for trial in study_runner.study.get_trials():
        assert trial.user_attrs[ATTR_KIND] == "evaluation"
        assert trial.user_attrs[ATTR_FAILURE] == "TimeoutError: node llm timed out after 300 s"
    # Not an engine failure: the config is not skipped.
    assert len(evaluate.specs) == 2


def test_undefined_objective_fails_the_trial(tmp_path: Path) -> None:
    evaluate = Evaluation(quality=None, quality_ci95=None, num_failed=4, error_rate=1.0)
    study_runner = runner(tmp_path, experiment(tmp_path, trials=2), evaluate)

    reports = study_runner.run()

    assert [r.state for r in reports] == ["FAIL", "FAIL"]
    for trial in study_runner.study.get_trials():
        assert trial.state == TrialState.FAIL
        assert trial.user_attrs[ATTR_KIND] == "evaluation"
        reason = trial.user_attrs[ATTR_FAILURE]
        assert "objective 'quality' is undefined" in reason
        assert "error rate 1.0" in reason
    assert budget_used(study_runner.study) == (2, 0)
    assert pareto_front(study_runner.study) == []


def test_invalid_knob_combination_fails_without_evaluating(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    exp = experiment(tmp_path, trials=1)
    space.write_text(SPACE + "constraints: ['engine.max_num_seqs <= 8']\n")
    evaluate = Evaluation()
    study_runner = runner(tmp_path, exp, evaluate)
    enqueue(study_runner.study, "single", "json", 16)

    study_runner.run()

    (trial,) = study_runner.study.get_trials()
    assert trial.user_attrs[ATTR_KIND] == "invalid"
    assert "engine.max_num_seqs <= 8" in trial.user_attrs[ATTR_FAILURE]
    assert evaluate.specs == []


# --- SLA constraints --------------------------------------------------------------------


def test_sla_bounds_keep_infeasible_trials_off_the_front(tmp_path: Path) -> None:
    evaluate = Evaluation()
    exp = experiment(tmp_path, trials=4, constraints=["quality >= 0.5"])
    study_runner = runner(tmp_path, exp, evaluate)
    # single is cheap and bad (infeasible), parallel dear and good (feasible)
    enqueue(study_runner.study, "single", "json", 16)
    enqueue(study_runner.study, "single", "tag", 4)
    enqueue(study_runner.study, "parallel", "json", 16)
    enqueue(study_runner.study, "parallel", "tag", 4)

    reports = study_runner.run()

    assert [r.feasible for r in reports] == [False, False, True, True]
    trials = study_runner.study.get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials)
    for trial in trials:
        (violation,) = trial_constraints(trial)
        assert violation == pytest.approx(0.5 - trial.values[1])
        assert (violation > 0) == (trial.params["app.architecture"] == "single")
        # readable where optuna's named constraints are not shown (optuna-dashboard)
        assert trial.user_attrs[ATTR_FEASIBLE] == (violation <= 0)
        expected = {"quality >= 0.5": pytest.approx(violation)} if violation > 0 else {}
        assert trial.user_attrs[ATTR_VIOLATIONS] == expected
    front = pareto_front(study_runner.study)
    assert front
    assert all(t.params["app.architecture"] == "parallel" for t in front)
    # The cheapest trial overall is infeasible: it would be on an unconstrained front.
    cheapest = min(trials, key=lambda t: t.values[0])
    assert cheapest.params["app.architecture"] == "single"
    assert cheapest.number not in {t.number for t in front}


def test_unmeasured_bounded_metric_counts_as_violated(tmp_path: Path) -> None:
    evaluate = Evaluation(e2e_p95_s=None)
    exp = experiment(tmp_path, trials=1, constraints=["e2e_p95_s <= 20"])
    study_runner = runner(tmp_path, exp, evaluate)

    (report,) = study_runner.run()

    assert report.state == "COMPLETE"
    assert report.feasible is False
    assert trial_constraints(study_runner.study.get_trials()[0]) == [1e9]


# --- resume and racing workers ----------------------------------------------------------


def test_resume_requeues_an_interrupted_trial_without_counting_it(tmp_path: Path) -> None:
    exp = experiment(tmp_path, trials=3)
    crashed = runner(tmp_path, exp, Evaluation())
    left = crashed.study.ask()  # a worker asked, sampled knobs, then died
    params = crashed.space.suggest(left)
    assert budget_used(crashed.study) == (0, 1)

    evaluate = Evaluation()
    resumed = runner(tmp_path, exp, evaluate)
    assert resumed.recover_interrupted() == [left.number]

    interrupted = resumed.study.get_trials()[left.number]
    assert interrupted.state == TrialState.FAIL
    assert interrupted.user_attrs[ATTR_KIND] == "interrupted"
    assert interrupted.user_attrs[ATTR_NOT_COUNTED] is True
    assert not counted(interrupted)
    assert budget_used(resumed.study) == (0, 0)

    resumed.run()

    assert evaluate.knobs()[0] == knobs_of(params)
    assert budget_used(resumed.study) == (3, 0)
    trials = resumed.study.get_trials()
    assert len(trials) == 4
    assert trials[1].params == params
    # The sampler, seeded as the crashed worker's, may propose the same knobs again: each
    # knob set is measured once.
    assert len(evaluate.specs) == len({knobs_of(t.params) for t in trials[1:]})
    summary = summarize_study(resumed.study)
    assert (summary.complete, summary.failed, summary.not_counted) == (3, 0, 1)
    # Nothing left to recover.
    assert resumed.recover_interrupted() == []


def test_the_timeout_stops_new_trials_and_lets_the_running_one_finish(tmp_path: Path) -> None:
    class SlowEvaluation(Evaluation):
        def __call__(self, spec: RunSpec) -> RunResult:
            time.sleep(0.25)
            return super().__call__(spec)

    evaluate = SlowEvaluation()
    # 0.005 min = 0.3 s: the first trial ends past it at about 0.25-0.3 s or the second does.
    study_runner = runner(tmp_path, experiment(tmp_path, trials=20, timeout_min=0.005), evaluate)

    reports = study_runner.run()

    # A knob set proposed twice is answered from the first without evaluating (no sleep).
    assert 1 <= len(evaluate.specs) <= 2 and len(reports) < 20
    assert budget_used(study_runner.study) == (len(reports), 0)
    assert all(t.state == TrialState.COMPLETE for t in study_runner.study.get_trials())
    # Each run gets its own clock: running again measures more, within the trial budget.
    more = runner(tmp_path, experiment(tmp_path, trials=20, timeout_min=0.005), evaluate).run()
    assert 2 <= len(evaluate.specs) <= 4 and more


def test_a_trial_asked_beyond_the_budget_by_a_racing_worker_is_closed(tmp_path: Path) -> None:
    exp = experiment(tmp_path, trials=3)
    evaluate = Evaluation()
    study_runner = runner(tmp_path, exp, evaluate)
    study_runner.run(trials=2)
    other = optuna.load_study(study_name=STUDY, storage=storage_url(tmp_path))
    raced: list[optuna.trial.Trial] = []
    ask = study_runner._ask

    def racing_ask() -> Any:
        # Another worker asks for the last trial of the budget between this worker's budget
        # check and its own ask.
        if not raced:
            raced.append(other.ask())
            study_runner.space.suggest(raced[0])
        return ask()

    study_runner._ask = racing_ask  # type: ignore[method-assign]

    reports = study_runner.run()

    assert reports == []  # this worker's trial was closed, nothing evaluated
    assert len(evaluate.specs) == 2
    closed = study_runner.study.get_trials()[-1]
    assert closed.number > raced[0].number
    assert closed.state == TrialState.FAIL
    assert closed.user_attrs[ATTR_KIND] == "over_budget"
    assert not counted(closed)
    assert budget_used(study_runner.study) == (2, 1)
    other.tell(raced[0], [1.0, 0.5])  # the other worker finishes its trial
    assert budget_used(study_runner.study) == (3, 0)
    assert study_runner.run() == []


def test_only_trials_beyond_the_budget_are_closed_when_many_race(tmp_path: Path) -> None:
    exp = experiment(tmp_path, trials=3)
    evaluate = Evaluation()
    study_runner = runner(tmp_path, exp, evaluate)
    study_runner.run(trials=1)
    other = optuna.load_study(study_name=STUDY, storage=storage_url(tmp_path))
    ask = study_runner._ask
    raced: list[optuna.trial.Trial] = []

    def racing_ask() -> Any:
        # Two other workers ask just before this one and a third just after: the two older
        # trials fill the budget, so this worker's trial is beyond it although not the newest.
        if raced:
            return ask()
        raced.extend(other.ask() for _ in range(2))
        mine = ask()
        raced.append(other.ask())
        return mine

    study_runner._ask = racing_ask  # type: ignore[method-assign]

    assert study_runner.run() == []
    assert len(evaluate.specs) == 1
    mine = study_runner.study.get_trials()[3]
    assert mine.state == TrialState.FAIL
    assert mine.user_attrs[ATTR_KIND] == "over_budget"
    assert [t.number for t in raced] == [1, 2, 4]


# --- objectives -------------------------------------------------------------------------


def test_a_study_with_other_objectives_refuses_to_load(tmp_path: Path) -> None:
    runner(tmp_path, experiment(tmp_path), Evaluation()).run(trials=1)
    other = experiment(
        tmp_path,
        objectives=[
            {"metric": "e2e_p95_s", "direction": "minimize"},
            {"metric": "quality", "direction": "maximize"},
        ],
    )
    with pytest.raises(ConfigError, match=f"study '{STUDY}' was created with objectives"):
        runner(tmp_path, other, Evaluation())
    fewer = experiment(tmp_path, objectives=[{"metric": "quality", "direction": "maximize"}])
    with pytest.raises(ConfigError, match=f"study '{STUDY}' was created with objectives"):
        runner(tmp_path, fewer, Evaluation())
    # The stored objectives were not overwritten by the refused runners.
    study = load_study(STUDY, storage_url(tmp_path))
    assert [o["metric"] for o in study.user_attrs["fmtune.objectives"]] == [
        "cost_per_1k_usd",
        "quality",
    ]


def test_experiment_without_tune_section_is_refused(tmp_path: Path) -> None:
    exp = experiment(tmp_path).model_copy(update={"tune": None})
    with pytest.raises(ConfigError, match="no tune section"):
        runner(tmp_path, exp, Evaluation())


# --- MLflow -----------------------------------------------------------------------------


def test_mlflow_runs_per_trial_failed_and_killed(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tuner.tracking import PARENT_RUN_ID_TAG, TAG_FAILURE_REASON, StudyTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def tracker() -> StudyTracker:
        return StudyTracker(uri, experiment_name="fmtune-test", study_name=STUDY)

    def fail(spec: RunSpec) -> BaseException | None:
        seqs = spec.deployment.models["llm"].engine.max_num_seqs
        if seqs == 8:
            return ReplicaStartError("replica llm/0 exited with code 1")
        if seqs == 12:
            return KeyboardInterrupt()  # Ctrl-C in the middle of a trial
        return None

    exp = experiment(tmp_path, trials=4)
    first = runner(tmp_path, exp, Evaluation(fail), tracker=tracker())
    enqueue(first.study, "single", "json", 4)
    enqueue(first.study, "parallel", "json", 8)
    enqueue(first.study, "single", "tag", 12)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert budget_used(first.study) == (2, 1)

    resumed = runner(tmp_path, exp, Evaluation(), tracker=tracker())
    assert resumed.recover_interrupted() == [2]
    enqueue(resumed.study, "parallel", "tag", 16)  # after the re-queued knobs
    resumed.run()

    trials = resumed.study.get_trials()
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert trials[3].params == trials[2].params  # the interrupted knobs, run again
    runs = {row["trial"]: row for row in tracker().trial_runs()}
    assert {n: r["status"] for n, r in runs.items()} == {
        0: "FINISHED",
        1: "FAILED",
        2: "KILLED",
        3: "FINISHED",
        4: "FINISHED",
    }
    client = MlflowClient(tracking_uri=uri)
    parent = tracker().parent_run_id()
    for trial in trials:
        run = client.get_run(trial.user_attrs[ATTR_RUN_ID])
        assert run.info.run_id == runs[trial.number]["run_id"]
        assert run.data.tags[PARENT_RUN_ID_TAG] == parent
        assert run.data.params["app.architecture"] == trial.params["app.architecture"]
    completed = client.get_run(trials[0].user_attrs[ATTR_RUN_ID])
    assert completed.data.metrics["quality"] == pytest.approx(trials[0].values[1])
    artifacts = {a.path for a in client.list_artifacts(completed.info.run_id)}
    assert {"metrics.json", "trace.parquet", "DEPLOY.yaml"} <= artifacts
    failed = client.get_run(trials[1].user_attrs[ATTR_RUN_ID])
    assert "replica llm/0 exited with code 1" in failed.data.tags[TAG_FAILURE_REASON]


# --- the study's MLflow runs through `fmtune tune`'s loop --------------------------------


def cli_study(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    evaluate: Callable[[RunSpec], RunResult],
    *,
    trials: int,
    resume: bool = False,
) -> None:
    """`fmtune tune`'s loop (`_run_study`: tracker, pool, report) on the fake evaluation."""
    from tuner.cli.tuning_commands import _run_study

    def execute_run(spec: RunSpec, pool: Any, on_phase: Any = None) -> RunResult:
        return evaluate(spec)

    monkeypatch.setattr("runtime.run.execute_run", execute_run)
    _run_study(
        experiment(tmp_path, trials=trials), storage=storage_url(tmp_path), study_name=STUDY,
        out=tmp_path / "out", trials=trials, sampler=None, resume=resume, worker=False,
        tracking_uri=None, again=["fmtune", "tune", "experiment.yaml", "--resume"],
    )  # fmt: skip


def mlflow_runs(tmp_path: Path) -> tuple[Any, Any, dict[int, Any]]:
    """(client, the study's parent run, its trial runs by number) of `cli_study`'s store."""
    from mlflow import MlflowClient

    from tuner.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(tmp_path / "out"))
    experiment_id = client.get_experiment_by_name(f"fmtune-{STUDY}").experiment_id
    runs = client.search_runs([experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("fmtune.kind") == "study"]
    trials = {
        int(r.data.tags["fmtune.trial"]): r for r in runs if r.data.tags["fmtune.kind"] == "trial"
    }
    return client, parent, trials


def test_a_study_ends_its_mlflow_run_finished_with_its_report_and_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the budget: the parent run FINISHED with report.html, pareto.csv and pareto.png;
    the front's trial runs tagged; every trial run holds the whole config (block_size, which
    the space does not search). --resume reopens the same parent, finishes it again and moves
    the front tag to the trials now on the front."""
    from tuner.tracking import (
        EXPERIMENT_KIND_ML,
        EXPERIMENT_KIND_TAG,
        TAG_END_REASON,
        TAG_PARETO_FRONT,
        TAG_SEARCHED,
    )

    setup = runner(tmp_path, experiment(tmp_path, trials=2), Evaluation())
    enqueue(setup.study, "single", "json", 4)  # cost 0.25, quality 0.3
    enqueue(setup.study, "parallel", "tag", 16)  # cost 0.66, quality 0.75
    evaluate = Evaluation()
    cli_study(tmp_path, monkeypatch, evaluate, trials=2)

    client, parent, trials = mlflow_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[TAG_END_REASON] == "completed"
    experiment_id = parent.info.experiment_id
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND_ML
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.html", "pareto.csv", "pareto.png"} <= artifacts
    assert {n: r.info.status for n, r in trials.items()} == {0: "FINISHED", 1: "FINISHED"}
    block_size = evaluate.specs[0].deployment.models["llm"].engine.block_size
    for run in trials.values():
        params = run.data.params
        assert params["config.deployment.models.llm.engine.block_size"] == str(block_size)
        assert "config.deployment.models.llm.engine.dtype" in params
        assert "config.deployment.router.policy" in params
        assert "config.deployment.models.llm.replicas" in params
        assert params["config.app.architecture"] == params["app.architecture"]
        assert run.data.tags[TAG_SEARCHED] == "app.architecture,app.format,engine.max_num_seqs"
    assert {n for n, r in trials.items() if TAG_PARETO_FRONT in r.data.tags} == {0, 1}

    enqueue(load_study(STUDY, storage_url(tmp_path)), "single", "tag", 8)  # beats trial 0
    cli_study(tmp_path, monkeypatch, Evaluation(), trials=3, resume=True)

    _, resumed, trials = mlflow_runs(tmp_path)
    assert resumed.info.run_id == parent.info.run_id
    assert resumed.info.status == "FINISHED"
    assert {n for n, r in trials.items() if TAG_PARETO_FRONT in r.data.tags} == {1, 2}


def test_an_interrupted_study_ends_its_mlflow_run_killed_and_resume_finishes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (SystemExit 143 from the CLI's handler) mid-trial: the parent run and the
    trial's run end KILLED; --resume reopens the parent and ends it FINISHED."""
    from tuner.tracking import TAG_END_REASON, TAG_INTERRUPTED

    def sigterm(spec: RunSpec) -> BaseException | None:
        return SystemExit(143)

    with pytest.raises(SystemExit) as stopped:
        cli_study(tmp_path, monkeypatch, Evaluation(sigterm), trials=2)
    assert stopped.value.code == 143
    _, parent, trials = mlflow_runs(tmp_path)
    assert parent.info.status == "KILLED"
    assert parent.data.tags[TAG_END_REASON] == "interrupted (SIGTERM)"
    assert trials[0].info.status == "KILLED"
    assert trials[0].data.tags[TAG_INTERRUPTED] == "true"

    # Other knobs than the interrupted trial's (which --resume queues again), so that both
    # trials of the resumed study are measured and have a run.
    study = load_study(STUDY, storage_url(tmp_path))
    interrupted = knobs_of(study.get_trials()[0].params)
    other = "single" if interrupted[0] == "parallel" else "parallel"
    enqueue(study, other, interrupted[1], interrupted[2])
    cli_study(tmp_path, monkeypatch, Evaluation(), trials=2, resume=True)
    _, resumed, trials = mlflow_runs(tmp_path)
    assert resumed.info.run_id == parent.info.run_id
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags[TAG_END_REASON] == "completed"
    assert {n: r.info.status for n, r in trials.items()} == {
        0: "KILLED",
        1: "FINISHED",
        2: "FINISHED",
    }


def test_a_study_that_ends_on_an_error_ends_its_mlflow_run_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error the study does not turn into a failed trial stops it: the parent run and the
    trial's run end FAILED, and the error reaches the caller unchanged."""
    from tuner.tracking import TAG_END_REASON

    def bug(spec: RunSpec) -> BaseException | None:
        return KeyError("no model key 'judge'")

    with pytest.raises(KeyError, match="judge"):
        cli_study(tmp_path, monkeypatch, Evaluation(bug), trials=2)
    _, parent, trials = mlflow_runs(tmp_path)
    assert parent.info.status == "FAILED"
    assert parent.data.tags[TAG_END_REASON] == "KeyError: \"no model key 'judge'\""
    assert [r.info.status for r in trials.values()] == ["FAILED"]


# --- export -----------------------------------------------------------------------------


def test_export_front_writes_one_bundle_per_front_trial(tmp_path: Path) -> None:
    exp = experiment(tmp_path, trials=6, constraints=["quality >= 0.5"])
    study_runner = runner(tmp_path, exp, Evaluation())
    for architecture, fmt, seqs in [
        ("single", "json", 16),
        ("parallel", "json", 16),
        ("parallel", "tag", 4),
        ("parallel", "tag", 16),
        ("parallel", "json", 4),
        ("single", "tag", 8),
    ]:
        enqueue(study_runner.study, architecture, fmt, seqs)
    study_runner.run()
    study = load_study(STUDY, storage_url(tmp_path))
    front = pareto_front(study)
    assert len(front) >= 2

    bundles = export_front(study, tmp_path / "bundles")

    assert sorted(b.trial for b in bundles) == sorted(t.number for t in front)
    folders = sorted(p.name for p in (tmp_path / "bundles").iterdir())
    assert folders == sorted(f"trial-{t.number:04d}" for t in front)
    by_number = {t.number: t for t in front}
    for bundle in bundles:
        trial = by_number[bundle.trial]
        assert {f.name for f in bundle.files} >= {"DEPLOY.yaml", "README.md"}
        deployment = load_deployment(bundle.folder / "DEPLOY.yaml")
        app = deployment.apps["extraction"]
        assert app.architecture == trial.params["app.architecture"]
        assert app.format.value == trial.params["app.format"]
        engine = deployment.models["llm"].engine
        assert engine.max_num_seqs == trial.params["engine.max_num_seqs"]
        assert engine.block_size == 128  # the experiment's own knobs are kept
        assert bundle.metrics["quality"] == pytest.approx(trial.values[1])
        # The bundle is the trial's own DEPLOY.yaml.
        written = tmp_path / "out" / "trials" / f"{trial.number:04d}" / "DEPLOY.yaml"
        assert load_deployment(written) == deployment


def test_export_refuses_a_study_without_a_feasible_trial(tmp_path: Path) -> None:
    exp = experiment(tmp_path, trials=1, constraints=["quality >= 0.9"])
    runner(tmp_path, exp, Evaluation()).run()
    with pytest.raises(ConfigError, match="no feasible complete trial"):
        export_front(load_study(STUDY, storage_url(tmp_path)), tmp_path / "bundles")


def test_load_study_names_the_studies_there(tmp_path: Path) -> None:
    runner(tmp_path, experiment(tmp_path), Evaluation())
    with pytest.raises(ConfigError, match=f"study must be one of \\['{STUDY}'\\].*got 'nope'"):
        load_study("nope", storage_url(tmp_path))


def test_a_sqlite_study_commits_through_a_write_ahead_log(tmp_path: Path) -> None:
    """optuna commits dozens of times per trial; without WAL each commit syncs the file."""
    storage = make_storage(storage_url(tmp_path))
    assert isinstance(storage, optuna.storages.RDBStorage)
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    optuna.create_study(study_name=STUDY, storage=storage).optimize(lambda t: 1.0, n_trials=2)
    assert len(optuna.load_study(study_name=STUDY, storage=storage_url(tmp_path)).trials) == 2


def test_a_dead_workers_trial_is_failed_requeued_and_not_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tuner.study

    monkeypatch.setattr(tuner.study, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(tuner.study, "HEARTBEAT_GRACE_S", 1)
    exp = experiment(tmp_path, trials=2)
    dead = runner(tmp_path, exp, Evaluation())
    left = dead.study.ask()  # a worker asked, started measuring, then was killed
    params = dead.space.suggest(left)
    dead.storage.record_heartbeat(dead.trial_storage_id(left.number))
    time.sleep(2.5)

    evaluate = Evaluation()
    alive = runner(tmp_path, exp, evaluate)
    alive.run()

    trials = alive.study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert not counted(trials[0])
    assert evaluate.knobs()[0] == knobs_of(params)  # the dead worker's knobs, run again
    # each knob set measured once (the sampler may propose the dead worker's knobs again)
    assert len(evaluate.specs) == len({knobs_of(t.params) for t in trials[1:]})
    assert budget_used(alive.study) == (2, 0)
    summary = summarize_study(alive.study)
    assert (summary.complete, summary.failed, summary.not_counted) == (2, 0, 1)


# --- a knob set is measured once --------------------------------------------------------


class RepeatingSampler(optuna.samplers.BaseSampler):
    """A sampler that proposes the same knob set every time (each knob's first choice or
    lowest value): what TPE or NSGA-II do now and then on a small space, every time."""

    def infer_relative_search_space(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial
    ) -> dict[str, Any]:
        return {}

    def sample_relative(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        return {}

    def sample_independent(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, name: str, distribution: Any
    ) -> Any:
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            return distribution.choices[0]
        return distribution.low


def test_a_knob_set_the_sampler_repeats_is_measured_once_and_on_the_front_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuner.report import trials_table, write_study_report

    monkeypatch.setattr("tuner.study.make_sampler", lambda tune, space: RepeatingSampler())
    evaluate = Evaluation()
    study_runner = runner(tmp_path, experiment(tmp_path, trials=3), evaluate)

    reports = study_runner.run()

    assert evaluate.knobs() == [("single", "json", 4)]  # measured once
    assert [r.state for r in reports] == ["COMPLETE"] * 3
    assert [r.duplicate_of for r in reports] == [None, 0, 0]
    first, *twins = study_runner.study.get_trials()
    assert ATTR_DUPLICATE_OF not in first.user_attrs
    for twin in twins:  # both trials exist, told the first one's result
        assert twin.state == TrialState.COMPLETE
        assert twin.params == first.params
        assert twin.values == first.values
        assert twin.user_attrs[ATTR_DUPLICATE_OF] == 0
        assert twin.user_attrs[ATTR_METRICS] == first.user_attrs[ATTR_METRICS]
        assert twin.user_attrs[ATTR_CONFIG_HASH] == first.user_attrs[ATTR_CONFIG_HASH]
        assert ATTR_RUN_ID not in twin.user_attrs  # no run of its own: nothing ran
        assert not (tmp_path / "out" / "trials" / f"{twin.number:04d}").exists()
    assert budget_used(study_runner.study) == (3, 0)  # duplicates use up budget
    study = load_study(STUDY, storage_url(tmp_path))
    assert [t.number for t in pareto_front(study)] == [0]
    assert [b.trial for b in export_front(study, tmp_path / "bundles")] == [0]
    assert sorted(p.name for p in (tmp_path / "bundles").iterdir()) == ["trial-0000"]
    objectives = [o for o in study_runner.tune.objectives]
    report = write_study_report(study, objectives, tmp_path / "report", summary={})
    assert pd.read_csv(report.csv)["trial"].tolist() == [0]
    listed = trials_table(study, objectives)
    assert listed["duplicate_of"].tolist()[1:] == [0, 0]
    assert listed["on_front"].tolist() == [True, False, False]


def test_a_duplicate_keeps_the_feasibility_of_the_trial_it_repeats(tmp_path: Path) -> None:
    evaluate = Evaluation()
    exp = experiment(tmp_path, trials=4, constraints=["quality >= 0.5"])
    study_runner = runner(tmp_path, exp, evaluate)
    enqueue(study_runner.study, "single", "json", 4)  # infeasible: quality 0.3
    enqueue(study_runner.study, "parallel", "json", 8)  # feasible
    enqueue(study_runner.study, "single", "json", 4)  # the first one's knobs
    enqueue(study_runner.study, "parallel", "json", 8)  # the second one's knobs

    reports = study_runner.run()

    assert evaluate.knobs() == [("single", "json", 4), ("parallel", "json", 8)]
    assert [r.duplicate_of for r in reports] == [None, None, 0, 1]
    assert [r.feasible for r in reports] == [False, True, False, True]
    trials = study_runner.study.get_trials()
    for twin, original in ((trials[2], trials[0]), (trials[3], trials[1])):
        assert trial_constraints(twin) == trial_constraints(original)
        assert twin.user_attrs[ATTR_FEASIBLE] == original.user_attrs[ATTR_FEASIBLE]
        assert twin.user_attrs[ATTR_VIOLATIONS] == original.user_attrs[ATTR_VIOLATIONS]
    assert [t.number for t in pareto_front(study_runner.study)] == [1]


def test_a_failed_knob_set_is_not_reused_as_a_result(tmp_path: Path) -> None:
    """Only complete trials are reused: knobs whose measurement failed (here for a reason
    that is not the engine's) are measured again when proposed again."""
    outcomes = iter([TimeoutError("node llm timed out after 300 s"), None])
    evaluate = Evaluation(lambda spec: next(outcomes))
    study_runner = runner(tmp_path, experiment(tmp_path, trials=2), evaluate)
    enqueue(study_runner.study, "parallel", "tag", 8)
    enqueue(study_runner.study, "parallel", "tag", 8)

    reports = study_runner.run()

    assert [r.state for r in reports] == ["FAIL", "COMPLETE"]
    assert [r.duplicate_of for r in reports] == [None, None]
    assert len(evaluate.specs) == 2


def test_knob_identity_is_the_same_for_knob_sets_that_deploy_the_same_thing() -> None:
    keys = ["llm"]
    base = {
        "app.architecture": "single",
        "engine.max_num_seqs": 16,
        "engine.speculative_method": "none",
    }
    same = [
        dict(reversed(list(base.items()))),  # another order
        base | {"engine.max_num_seqs": 16.0},  # a float the config turns into 16
        base | {"engine.speculative_method": None},  # "none" is how a space writes None
        {k: v for k, v in base.items() if k != "engine.max_num_seqs"}
        | {"models.llm.engine.max_num_seqs": 16},  # the model-key form of the same field
    ]
    for params in same:
        assert knob_identity(params, keys) == knob_identity(base, keys), params
    for params in (base | {"engine.max_num_seqs": 8}, base | {"app.architecture": "parallel"}):
        assert knob_identity(params, keys) != knob_identity(base, keys)
    # with two model keys, engine.X sets both: not the same as setting one of them
    two = ["judge", "llm"]
    one_key = {"app.architecture": "single", "models.llm.engine.max_num_seqs": 16}
    both = {"app.architecture": "single", "engine.max_num_seqs": 16}
    assert knob_identity(one_key, two) != knob_identity(both, two)
