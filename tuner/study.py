"""The tuning loop: ask a sampler for knobs, measure them on real replicas, tell the result.

`tune.fidelity` says how a trial is evaluated: `real` (below), `sim` (the simulator predicts
it from stored step-time profiles and one real calibration run per app/model combination:
tuner.fidelity), or `multi` (rounds of screening in a simulated study of its own, named
`<study>.screen`, and measuring its front's new configurations here for real; each measured
trial keeps the simulated metrics and their errors beside its own, in its user attributes
and MLflow run, and the screening study is told the measured values).

Every trial is a real deployment measured by the runtime's one entry point
(`runtime.run.execute_run`), which keeps engines hot across trials through the replica pool:
trials that share an engine config reuse the running replicas, and trials that change only
app or router knobs never restart one.

Bookkeeping that makes a study trustworthy:
- The budget counts evaluated trials (complete or failed), across every worker on the
  storage. A trial asked for beyond the budget by a racing worker is closed as
  `over_budget` and does not count.
- A trial that crashes (replica fails to start, out of memory, timeouts) is recorded FAIL
  with its reason and counts. Its engine config is remembered: once it failed
  `max_failures_per_config` times, trials sampling it again are skipped without running
  (FAIL, reason `skipped`), so the search stops paying for regions that keep failing.
- `--resume` after a crash or Ctrl-C: trials left RUNNING are closed FAIL `interrupted`
  (not counted), their knobs are queued again, and their MLflow runs are marked KILLED.
  Several workers on one storage record heartbeats, and a worker that died has its trial
  failed and re-queued by optuna's stale-trial handling.
- SLA bounds become optuna constraints (`trial.set_constraint`), so infeasible trials stay
  in the study and never reach the Pareto front.
- A knob set already measured is not measured again (optuna's FAQ pattern for duplicated
  samples: compare the new trial's params with the complete trials' and tell it their
  values). When the sampler proposes the knobs of a complete trial (the same deployment
  after the knob translation: `knob_identity`), the new trial starts no replica: it is told that
  trial's values and constraints and carries `fmtune.duplicate_of` = its number, so the
  sampler learns the point is known and the front lists it once. It counts toward the budget
  like any trial (a sampler that keeps proposing measured points cannot loop forever).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import TrialState

from runtime.deployment import Deployment
from runtime.errors import ConfigError, EngineFailure, FmtuneError
from runtime.run import RunResult, RunSpec, write_run
from runtime.simrun import prediction_errors
from tuner.capacity import capacity_of_run
from tuner.experiment import Experiment, TuneSpec, run_spec_of
from tuner.fidelity import SimEvaluator, SimulatedRun, confirmation_errors
from tuner.knobs import InvalidTrial, check_knob_names, experiment_overrides, trial_spec
from tuner.pareto import ATTR_DUPLICATE_OF, pareto_front
from tuner.samplers import make_driver, make_sampler
from tuner.space import load_space

logger = logging.getLogger(__name__)

# Heartbeats in ask/tell mode are what fmtune wants (workers running trials it evaluates
# itself); optuna flags them as experimental and meant for Study.optimize.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")

#: User attributes fmtune sets on trials.
ATTR_METRICS = "fmtune.metrics"
ATTR_FAILURE = "fmtune.failure_reason"
ATTR_KIND = "fmtune.failure_kind"
ATTR_CONFIG_HASH = "fmtune.config_hash"
ATTR_NOT_COUNTED = "fmtune.not_counted"
ATTR_RUN_ID = "fmtune.mlflow_run_id"
ATTR_WORKER = "fmtune.worker"
ATTR_FEASIBLE = "fmtune.feasible"
"""Whether a complete trial met every SLA bound. Redundant with its optuna constraints, but
readable where those are not shown (optuna-dashboard 0.21 ignores optuna 5's named ones)."""
ATTR_VIOLATIONS = "fmtune.violations"
ATTR_FIDELITY = "fmtune.fidelity"
"""How a trial was evaluated: 'real' (measured) or 'sim' (simulated)."""
ATTR_CONFIRMS = "fmtune.confirms"
"""In a `multi` study, the screening study's simulated trial a real trial confirms."""
ATTR_PREDICTED = "fmtune.predicted"
"""The simulated metrics of a confirmed configuration (beside its measured ATTR_METRICS)."""
ATTR_PREDICTION_ERRORS = "fmtune.prediction_errors"
"""Per fidelity metric, the prediction's absolute error in percent of the measurement."""
"""The SLA bounds a complete trial broke, by text, with how far past each it was."""
# ATTR_DUPLICATE_OF ("fmtune.duplicate_of", declared in tuner.pareto, which reads it): the
# number of the earlier complete trial whose result a trial reuses instead of measuring.


class FailureKind(StrEnum):
    """Why a trial failed, stored by value in its ATTR_KIND user attribute."""

    ENGINE = "engine"
    """A replica failed to start or died, or the machine had no room (EngineFailure)."""
    EVALUATION = "evaluation"
    """The run failed otherwise, or an objective came out undefined."""
    INVALID = "invalid"
    """The knobs break a constraint or the experiment's schema; nothing ran."""
    SKIPPED = "skipped"
    """The engine config failed max_failures_per_config times before; nothing ran."""
    INTERRUPTED = "interrupted"
    """Left RUNNING by a crash or Ctrl-C and closed on --resume (not counted)."""
    OVER_BUDGET = "over_budget"
    """Asked for beyond the budget by a racing worker (not counted)."""


Evaluate = Callable[[RunSpec], RunResult]
HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 60


class TrialFailed(FmtuneError):
    """A trial could not be measured; `kind` says why in a word, the message in a line."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class TrialReport:
    """What one trial ended as (for the progress display and logs)."""

    number: int
    state: str
    values: tuple[float, ...] | None
    failure: str | None
    params: dict[str, Any]
    seconds: float
    feasible: bool | None = None
    duplicate_of: int | None = None
    """The earlier trial whose result this one reuses (its knobs were not measured again)."""


@dataclass
class StudyEvents:
    """Callbacks for a live display; each is optional."""

    on_phase: Callable[[int, str], None] | None = None
    on_trial_done: Callable[[TrialReport], None] | None = None
    on_request_done: Callable[[], None] | None = None


# --- storage ----------------------------------------------------------------------------


def default_storage_url(out_dir: Path) -> str:
    """SQLite in the study's output folder."""
    return f"sqlite:///{(out_dir / 'study.db').resolve()}"


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An optuna storage with heartbeats, so dead workers' trials are failed and re-queued."""
    if url.startswith(("sqlite:", "postgresql:", "postgresql+", "mysql:", "mysql+")):
        storage = optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=HEARTBEAT_GRACE_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=1
            ),
            engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
        )
        if url.startswith("sqlite"):
            _write_ahead_log(storage)
        return storage
    return optuna.storages.get_storage(url)


def _write_ahead_log(storage: optuna.storages.RDBStorage) -> None:
    """SQLite in write-ahead-log mode with NORMAL sync on every connection of the storage.

    optuna commits once per parameter, attribute and tell (dozens per trial); in SQLite's
    default rollback journal each commit syncs the file to disk, which on this machine made a
    simulated study spend more time committing than simulating. A WAL commit does not sync
    (the log is synced at checkpoints): a crashed worker still loses nothing committed (only a
    power cut can lose the last commits), and readers (export, other workers) keep working.
    """
    from sqlalchemy import event

    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened while optuna created its tables


# --- counting ---------------------------------------------------------------------------


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a finished trial uses up budget (interrupted, over-budget and dead workers'
    trials do not)."""
    if trial.state not in (TrialState.COMPLETE, TrialState.FAIL):
        return False
    if trial.state == TrialState.FAIL and ATTR_KIND not in trial.user_attrs:
        return False  # failed by optuna's stale-trial handling: its worker died, knobs re-queued
    return not trial.user_attrs.get(ATTR_NOT_COUNTED, False)


def budget_used(study: optuna.Study) -> tuple[int, int]:
    """(evaluated trials that count, trials running now) across all workers."""
    trials = study.get_trials(deepcopy=False)
    done = sum(1 for trial in trials if counted(trial))
    running = sum(1 for trial in trials if trial.state == TrialState.RUNNING)
    return done, running


# --- the loop ---------------------------------------------------------------------------


def worker_id() -> str:
    """This worker's name in the study: host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class StudyRunner:
    """Runs a study's ask/tell loop on one worker."""

    def __init__(
        self,
        experiment: Experiment,
        *,
        storage_url: str,
        study_name: str,
        out_dir: Path,
        evaluate: Evaluate,
        tracker: Any | None = None,
        events: StudyEvents | None = None,
        sampler_name: str | None = None,
    ) -> None:
        if experiment.tune is None:
            raise ConfigError("experiment has no tune section")
        tune = experiment.tune
        if sampler_name is not None:
            tune = TuneSpec.model_validate({**tune.model_dump(), "sampler": sampler_name})
        # The stored experiment carries the tune section in force (sampler override included),
        # so workers that join the study from storage search the same way.
        self.experiment = experiment.model_copy(update={"tune": tune})
        self.tune = tune
        self.space = load_space(tune.search_space)
        check_knob_names(
            self.space, experiment.deployment.models, tune.search_space, experiment.app
        )
        self.base = run_spec_of(experiment).model_dump(mode="json")
        self.out_dir = out_dir
        self.evaluate = evaluate
        self.tracker = tracker
        self.events = events or StudyEvents()
        self.study_name = study_name
        self.storage_url = storage_url
        # Kept to reach trials by number through the storage's public interface (user attrs
        # of another worker's trial, heartbeats); optuna's Study wraps this same storage.
        self.storage = make_storage(storage_url)
        self.directions = [objective.direction for objective in tune.objectives]
        self.study = optuna.create_study(
            study_name=study_name,
            storage=self.storage,
            directions=self.directions,
            sampler=make_sampler(tune, self.space),
            load_if_exists=True,
        )
        self.study_id = self.storage.get_study_id_from_name(study_name)
        self._check_same_objectives()
        # Named objectives: optuna-dashboard (and optuna's plots) show the metric, not "#0".
        self.study.set_metric_names([objective.metric for objective in tune.objectives])
        self.study.set_user_attr("fmtune.objectives", [o.model_dump() for o in tune.objectives])
        self.study.set_user_attr("fmtune.constraints", list(tune.constraints))
        self.study.set_user_attr("fmtune.experiment", self.experiment.model_dump(mode="json"))
        # An algorithm with its own population (pymoo) proposes each trial's knobs itself.
        self._driver = make_driver(tune, self.space, self.study)
        # fidelity 'sim' simulates every trial; 'multi' screens in a simulated study of its
        # own (`_screening`) and measures here, for real, the screened configurations it
        # confirms, so this study's front, report and export hold measured trials only.
        self.fidelity: Literal["real", "sim"] = "sim" if tune.fidelity == "sim" else "real"
        self.simulator: SimEvaluator | None = None
        self._started = time.monotonic()  # reset by each run(); read by _out_of_time
        if tune.fidelity == "sim":
            self.simulator = SimEvaluator(base=run_spec_of(experiment), evaluate_real=evaluate)

    def _check_same_objectives(self) -> None:
        stored = self.study.user_attrs.get("fmtune.objectives")
        mine = [o.model_dump() for o in self.tune.objectives]
        if stored is not None and stored != mine:
            raise ConfigError(
                f"study '{self.study_name}' was created with objectives {stored}, got {mine}"
            )

    # --- resume ----------------------------------------------------------------------

    def recover_interrupted(self) -> list[int]:
        """Close trials left RUNNING by a crash: FAIL 'interrupted', knobs queued again."""
        numbers = []
        storage = self.storage
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial_id = self.trial_storage_id(trial.number)
            kind = FailureKind.INTERRUPTED
            storage.set_trial_user_attr(trial_id, ATTR_FAILURE, kind.value)
            storage.set_trial_user_attr(trial_id, ATTR_KIND, kind.value)
            storage.set_trial_user_attr(trial_id, ATTR_NOT_COUNTED, True)
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
            if trial.params:
                self.study.enqueue_trial(trial.params, skip_if_exists=False)
            numbers.append(trial.number)
        if self.tracker is not None:
            self.tracker.mark_interrupted()
        if numbers:
            logger.warning("trials %s were interrupted; their knobs are queued again", numbers)
        return numbers

    def trial_storage_id(self, number: int) -> int:
        """The storage's id of this study's trial `number` (what storage methods take)."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    # --- loop ------------------------------------------------------------------------

    def run(self, trials: int | None = None) -> list[TrialReport]:
        """Evaluate trials until the study's budget of counted trials is used up."""
        budget = trials or self.tune.trials
        self._started = time.monotonic()
        if self.tune.fidelity == "multi":
            return self._run_multi(budget)
        reports: list[TrialReport] = []
        while True:
            with contextlib.suppress(Exception):
                optuna.storages.fail_stale_trials(self.study)
            done, running = budget_used(self.study)
            if done + running >= budget or self._out_of_time():
                break
            report = self._one_trial(budget)
            if report is not None:
                reports.append(report)
                if self.events.on_trial_done is not None:
                    self.events.on_trial_done(report)
        return reports

    def _out_of_time(self) -> bool:
        """Whether this run's `timeout_min` has passed (then no further trial starts)."""
        limit = self.tune.timeout_min
        if limit is None or time.monotonic() - self._started < limit * 60:
            return False
        logger.info("the study's timeout of %g min has passed: no further trial starts", limit)
        return True

    def _ask(self) -> tuple[optuna.trial.Trial, dict[str, Any]]:
        if self._driver is not None:
            params = self._driver.next_params()
            self.study.enqueue_trial(params, skip_if_exists=False)
        trial = self.study.ask()
        trial.set_user_attr(ATTR_WORKER, worker_id())
        return trial, self.space.suggest(trial)

    def _one_trial(
        self,
        budget: int,
        asked: tuple[optuna.trial.Trial, dict[str, Any]] | None = None,
        predicted: dict[str, Any] | None = None,
    ) -> TrialReport | None:
        """Ask (or take an already asked trial), measure, tell. ``predicted``: the simulated
        metrics of the configuration a `multi` study confirms here (logged beside the
        measurement, with the error of each prediction)."""
        started = time.monotonic()
        trial, params = asked or self._ask()
        trial.set_user_attr(ATTR_FIDELITY, self.fidelity)
        if self._beyond_budget(trial, budget):
            reason = "asked beyond the budget by a racing worker"
            self._close(trial, FailureKind.OVER_BUDGET, reason)
            return None
        original = self._measured_twin(params)
        if original is not None:
            return self._reuse(trial, params, original, started)
        self._phase(trial.number, "preparing")
        run_id: str | None = None
        try:
            spec = self._spec_for(params)
            engine_hashes = sorted(m.engine.config_hash() for m in spec.deployment.models.values())
            trial.set_user_attr(ATTR_CONFIG_HASH, ",".join(engine_hashes))
            self._skip_known_failures(engine_hashes)
            if self.tracker is not None:
                # The whole resolved config, not only the searched knobs: a run says what ran.
                run_id = self.tracker.start_trial(
                    trial.number, params, {"fmtune.config_hash": ",".join(engine_hashes)},
                    config=spec.model_dump(mode="json", exclude={"name", "description"}),
                )  # fmt: skip
                trial.set_user_attr(ATTR_RUN_ID, run_id)
            self._phase(trial.number, "starting replicas")
            with self._heartbeat(trial):
                result = self._measure(trial.number, spec)
            metrics = result.metrics_dict()
            values = self._objective_values(metrics)
        except TrialFailed as failure:
            self._close(trial, failure.kind, str(failure))
            if self._driver is not None:
                self._driver.fail()
            self._finish_tracking(run_id, "FAIL", {}, failure, trial.number, None)
            return TrialReport(
                trial.number, "FAIL", None, f"{failure.kind}: {failure}", params,
                time.monotonic() - started,
            )  # fmt: skip
        tracked = metrics
        if predicted is not None:
            trial.set_user_attr(ATTR_PREDICTED, _json_safe(predicted))
            errors = prediction_errors(predicted, metrics)
            trial.set_user_attr(ATTR_PREDICTION_ERRORS, _json_safe(errors))
            tracked = {**metrics, **confirmation_errors(predicted, metrics)}
        feasible = self._tell_complete(trial, params, metrics, values)
        self._finish_tracking(run_id, "COMPLETE", tracked, None, trial.number, result)
        return TrialReport(
            trial.number, "COMPLETE", tuple(values), None, params,
            time.monotonic() - started, feasible,
        )  # fmt: skip

    def _tell_complete(
        self,
        trial: optuna.trial.Trial,
        params: dict[str, Any],
        metrics: dict[str, Any],
        values: list[float],
    ) -> bool:
        """Record a complete trial: SLA bounds as constraints, metrics, values told to the
        study (and the driver); whether it met every bound."""
        violations: dict[str, float] = {}
        for bound in self.tune.bounds():
            violation = bound.violation(metrics)
            trial.set_constraint(bound.text, violation)
            if violation > 0:
                violations[bound.text] = violation
        feasible = not violations
        trial.set_user_attr(ATTR_FEASIBLE, feasible)
        trial.set_user_attr(ATTR_VIOLATIONS, violations)
        trial.set_user_attr(ATTR_METRICS, _json_safe(metrics))
        self.study.tell(trial, values)
        if self._driver is not None:
            self._driver.tell(params, values, feasible)
        return feasible

    def _identity(self, params: dict[str, Any]) -> str | None:
        """The knob set's identity (`knob_identity`); None for names of no known form (the
        trial then fails 'invalid' when its spec is built)."""
        try:
            return knob_identity(params, sorted(self.base["deployment"]["models"]))
        except ConfigError:
            return None

    def _measured_twin(self, params: dict[str, Any]) -> optuna.trial.FrozenTrial | None:
        """The earliest complete, measured trial with the same knobs, if any."""
        identity = self._identity(params)
        if identity is None:
            return None
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        for past in sorted(complete, key=lambda t: t.number):
            if ATTR_DUPLICATE_OF in past.user_attrs or past.values is None:
                continue
            if past.user_attrs.get(ATTR_FIDELITY, "real") != self.fidelity:
                continue  # a simulated result does not stand for a measured one
            if self._identity(past.params) == identity:
                return past
        return None

    def _reuse(
        self,
        trial: optuna.trial.Trial,
        params: dict[str, Any],
        original: optuna.trial.FrozenTrial,
        started: float,
    ) -> TrialReport:
        """Complete `trial` with the result of `original` (same knobs) without measuring."""
        assert original.values is not None
        values = list(original.values)
        trial.set_user_attr(ATTR_DUPLICATE_OF, original.number)
        if ATTR_CONFIG_HASH in original.user_attrs:
            trial.set_user_attr(ATTR_CONFIG_HASH, original.user_attrs[ATTR_CONFIG_HASH])
        metrics = dict(original.user_attrs.get(ATTR_METRICS) or {})
        feasible = self._tell_complete(trial, params, metrics, values)
        logger.info(
            "trial %d has the knobs of trial %d: its result is reused, nothing is measured",
            trial.number, original.number,
        )  # fmt: skip
        return TrialReport(
            trial.number, "COMPLETE", tuple(values), None, params,
            time.monotonic() - started, feasible, duplicate_of=original.number,
        )  # fmt: skip

    def _beyond_budget(self, trial: optuna.trial.Trial, budget: int) -> bool:
        """Whether racing workers asked for more trials than the budget has left, and this one
        is among the newest that do not fit (the oldest running trials keep the budget)."""
        done, _ = budget_used(self.study)
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        older = sum(1 for other in running if other.number < trial.number)
        return done + older >= budget

    def _phase(self, number: int, text: str) -> None:
        if self.events.on_phase is not None:
            self.events.on_phase(number, text)

    def _spec_for(self, params: dict[str, Any]) -> RunSpec:
        """The trial's RunSpec; knobs the space or the configs reject fail it 'invalid'."""
        try:
            return trial_spec(self.base, self.space, params)
        except InvalidTrial as error:
            raise TrialFailed(FailureKind.INVALID, str(error)) from None

    def _skip_known_failures(self, engine_hashes: list[str]) -> None:
        failures: dict[str, list[str]] = {}
        for past in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if past.user_attrs.get(ATTR_KIND) != FailureKind.ENGINE:
                continue
            for config_hash in str(past.user_attrs.get(ATTR_CONFIG_HASH, "")).split(","):
                failures.setdefault(config_hash, []).append(past.user_attrs.get(ATTR_FAILURE, ""))
        for config_hash in engine_hashes:
            seen = failures.get(config_hash, [])
            if len(seen) >= self.tune.max_failures_per_config:
                raise TrialFailed(
                    FailureKind.SKIPPED,
                    f"engine config {config_hash} failed {len(seen)} time(s) before: "
                    f"{seen[-1][:200]}",
                )

    def _measure(self, number: int, spec: RunSpec) -> RunResult | SimulatedRun:
        if self.simulator is not None:
            return self._simulate(number, spec)
        try:
            result = self.evaluate(spec)
        except EngineFailure as error:
            raise TrialFailed(FailureKind.ENGINE, str(error).splitlines()[0]) from None
        except (FmtuneError, OSError, RuntimeError, ValueError, TimeoutError) as error:
            raise TrialFailed(FailureKind.EVALUATION, f"{type(error).__name__}: {error}") from None
        if spec.capacity is not None:
            result.extra_metrics.update(self._capacity(number, spec, result))
        trial_dir = self.out_dir / "trials" / f"{number:04d}"
        write_run(result, trial_dir)
        (trial_dir / "DEPLOY.yaml").write_text(deployment_of(spec).to_yaml())
        if result.replica_logs:
            logs = "\n\n".join(f"== {k} ==\n{v}" for k, v in result.replica_logs.items())
            (trial_dir / "replica-logs.txt").write_text(logs + "\n")
        return result

    def _capacity(self, number: int, spec: RunSpec, result: RunResult) -> dict[str, Any]:
        """The capacity metrics of a measured trial (tuner.capacity: simulated search over
        rates, confirmed with the study's evaluation); a failure fails the trial."""
        try:
            found = capacity_of_run(
                spec, result, self.evaluate, on_phase=lambda text: self._phase(number, text)
            )
        except EngineFailure as error:
            raise TrialFailed(FailureKind.ENGINE, str(error).splitlines()[0]) from None
        except (FmtuneError, OSError, RuntimeError, ValueError, TimeoutError) as error:
            raise TrialFailed(
                FailureKind.EVALUATION, f"capacity: {type(error).__name__}: {error}"
            ) from None
        return found.metrics()

    def _simulate(self, number: int, spec: RunSpec) -> SimulatedRun:
        """A trial in the simulator: its metrics.json and DEPLOY.yaml in the trial's folder.
        A calibration run or a profile that cannot be made fails the trial as a real run
        would; so does a spec the simulator refuses."""
        assert self.simulator is not None
        self.simulator.on_phase = lambda text: self._phase(number, text)
        try:
            result = self.simulator(spec)
        except EngineFailure as error:
            raise TrialFailed(FailureKind.ENGINE, str(error).splitlines()[0]) from None
        except (FmtuneError, OSError, RuntimeError, ValueError, TimeoutError) as error:
            raise TrialFailed(FailureKind.EVALUATION, f"{type(error).__name__}: {error}") from None
        trial_dir = self.out_dir / "trials" / f"{number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        metrics = _json_safe(result.metrics_dict())
        (trial_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (trial_dir / "DEPLOY.yaml").write_text(deployment_of(spec).to_yaml())
        return result

    # --- multi-fidelity ----------------------------------------------------------------

    def _screening(self) -> StudyRunner:
        """The simulated study a `multi` study screens in: same storage, its name plus
        '.screen', trials in out/screen, not tracked in MLflow (its confirmed trials are)."""
        assert self.tune is not None
        # The timeout bounds this study's run, which checks it between rounds and confirmations.
        tune = self.tune.model_copy(update={"fidelity": "sim", "timeout_min": None})
        return StudyRunner(
            self.experiment.model_copy(update={"tune": tune}),
            storage_url=self.storage_url,
            study_name=f"{self.study_name}.screen",
            out_dir=self.out_dir / "screen",
            evaluate=self.evaluate,
            events=StudyEvents(on_phase=self.events.on_phase),
        )

    def _run_multi(self, budget: int) -> list[TrialReport]:
        """Rounds of screening and confirming until the budget of real trials is used: each
        round simulates `screen_trials` more trials, then measures for real up to `confirm`
        configurations of the simulated front not measured yet (fewer when the budget ends),
        and tells the screening study each measured result, so its sampler learns from them."""
        screen = self._screening()
        reports: list[TrialReport] = []
        idle_rounds = 0
        while True:
            done, running = budget_used(self.study)
            if done + running >= budget or idle_rounds >= 2 or self._out_of_time():
                break
            screened, _ = budget_used(screen.study)
            screen.run(screened + self.tune.screen_trials)
            measured = {
                self._identity(t.params)
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            }
            candidates = [
                t for t in pareto_front(screen.study)
                if t.user_attrs.get(ATTR_FIDELITY) == "sim"
                and self._identity(t.params) not in measured
            ][: min(self.tune.confirm, budget - done - running)]  # fmt: skip
            idle_rounds = 0 if candidates else idle_rounds + 1
            for candidate in candidates:
                if self._out_of_time():
                    break
                report = self._confirm(candidate, budget, screen)
                if report is not None:
                    reports.append(report)
                    if self.events.on_trial_done is not None:
                        self.events.on_trial_done(report)
        return reports

    def _confirm(
        self, candidate: optuna.trial.FrozenTrial, budget: int, screen: StudyRunner
    ) -> TrialReport | None:
        """Measure one screened configuration for real; feed the result back to the screen."""
        self.study.enqueue_trial(candidate.params, skip_if_exists=False)
        trial = self.study.ask()
        trial.set_user_attr(ATTR_WORKER, worker_id())
        trial.set_user_attr(ATTR_CONFIRMS, candidate.number)
        params = self.space.suggest(trial)
        predicted = dict(candidate.user_attrs.get(ATTR_METRICS) or {})
        report = self._one_trial(budget, asked=(trial, params), predicted=predicted)
        if report is None or report.values is None:
            return report
        metrics = self.study.trials[trial.number].user_attrs.get(ATTR_METRICS) or {}
        screen.study.add_trial(
            optuna.trial.create_trial(
                params=candidate.params,
                distributions=candidate.distributions,
                values=list(report.values),
                user_attrs={ATTR_FIDELITY: "real", ATTR_CONFIRMS: candidate.number,
                            ATTR_METRICS: metrics},
                constraints={b.text: b.violation(metrics) for b in self.tune.bounds()},
            )
        )  # fmt: skip
        return report

    def _objective_values(self, metrics: dict[str, Any]) -> list[float]:
        values = []
        for objective in self.tune.objectives:
            value = metrics.get(objective.metric)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise TrialFailed(
                    FailureKind.EVALUATION,
                    f"objective '{objective.metric}' is undefined for this run "
                    f"(error rate {metrics.get('error_rate')})",
                )
            values.append(float(value))
        return values

    def _close(self, trial: optuna.trial.Trial, kind: FailureKind, reason: str) -> None:
        trial.set_user_attr(ATTR_FAILURE, reason)
        trial.set_user_attr(ATTR_KIND, kind.value)
        if kind == FailureKind.OVER_BUDGET:
            trial.set_user_attr(ATTR_NOT_COUNTED, True)
        logger.warning("trial %d failed (%s): %s", trial.number, kind, reason)
        self.study.tell(trial, state=TrialState.FAIL)

    def _finish_tracking(
        self,
        run_id: str | None,
        state: str,
        metrics: dict[str, Any],
        failure: TrialFailed | None,
        number: int,
        result: RunResult | None,
    ) -> None:
        if self.tracker is None or run_id is None:
            return
        trial_dir = self.out_dir / "trials" / f"{number:04d}"
        artifacts: dict[str, Any] = {}
        for name in ("metrics.json", "trace.parquet", "replica-logs.txt"):
            if (trial_dir / name).exists():
                artifacts[name] = trial_dir / name
        spec_path = trial_dir / "DEPLOY.yaml"
        if result is not None and spec_path.exists():
            artifacts["DEPLOY.yaml"] = spec_path
        tags = {"fmtune.state": state}
        if failure is not None:
            tags["fmtune.failure_reason"] = str(failure)[:500]
            tags["fmtune.failure_kind"] = failure.kind.value
        self.tracker.finish_trial(
            run_id, state=state, metrics=metrics, tags=tags, artifacts=artifacts
        )

    @contextlib.contextmanager
    def _heartbeat(self, trial: optuna.trial.Trial) -> Iterator[None]:
        """Record heartbeats while a trial runs, so other workers can tell it is alive."""
        record = getattr(self.storage, "record_heartbeat", None)  # RDB storages have it
        if record is None:
            yield
            return
        trial_id = self.trial_storage_id(trial.number)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_INTERVAL_S):
                with contextlib.suppress(Exception):
                    record(trial_id)

        with contextlib.suppress(Exception):
            record(trial_id)
        thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)


def _canonical(value: Any) -> Any:
    """A knob value as a validated config holds it: integral floats as ints (pydantic turns
    16.0 into 16 for an int field), so equal deployments compare equal."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def knob_identity(params: dict[str, Any], model_keys: list[str]) -> str:
    """One text per distinct deployment a knob set makes: the experiment overrides the knobs
    set (`tuner.knobs.experiment_overrides`: "none" as None, ``engine.X`` spread over the
    model keys, the per-model form of a field the same as the shared one), sorted by path,
    as JSON. Two trials with the same identity measure the same deployment of the study's
    experiment. A SpaceError (a ConfigError) when a name is of no known form."""
    overrides = experiment_overrides(params, model_keys)
    return json.dumps(
        sorted((path, _canonical(value)) for path, value in overrides.items()), default=str
    )


def deployment_of(spec: RunSpec) -> Deployment:
    """The DEPLOY.yaml of a trial: its deployment serving its app under the app's name."""
    return spec.deployment.model_copy(update={"apps": {spec.app.name: spec.app}})


def _json_safe(data: dict[str, Any]) -> dict[str, Any]:
    """Metrics as plain JSON values (NaN and inf become None)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list | tuple):
            return [clean(item) for item in value]
        return value

    return json.loads(json.dumps({key: clean(value) for key, value in data.items()}))


@dataclass(frozen=True)
class StudySummary:
    """Counts of a study's trials by how they ended."""

    complete: int
    failed: int
    not_counted: int
    running: int
    by_failure_kind: dict[str, int] = field(default_factory=dict)


def summarize_study(study: optuna.Study) -> StudySummary:
    """How a study's trials ended."""
    trials = study.get_trials(deepcopy=False)
    kinds: dict[str, int] = {}
    for trial in trials:
        if trial.state == TrialState.FAIL:
            kind = str(trial.user_attrs.get(ATTR_KIND, "unknown"))
            kinds[kind] = kinds.get(kind, 0) + 1
    return StudySummary(
        complete=sum(1 for t in trials if t.state == TrialState.COMPLETE),
        failed=sum(1 for t in trials if t.state == TrialState.FAIL and counted(t)),
        not_counted=sum(1 for t in trials if t.state == TrialState.FAIL and not counted(t)),
        running=sum(1 for t in trials if t.state == TrialState.RUNNING),
        by_failure_kind=kinds,
    )
