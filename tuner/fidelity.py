"""Trials evaluated in the simulator: `fidelity: sim` (and the screening of `multi`).

A simulated trial predicts latency, throughput, SLA attainment and cost of its deployment
with the simulator (`runtime.simrun.simulate_run`) from two measured inputs:

- the step-time profile of each model key's engine (`runtime.profiler`: stored once per
  model, dtype, quantization, machine and vLLM version; measured on first use, which starts
  replicas for a few minutes);
- a *calibration run*: one real run (the study's own evaluate, so the study's replica pool)
  of the trial's app knobs and models on the experiment's base deployment, measured once per
  app/model combination and kept under the fmtune home. It gives the request shapes (each
  LLM call's tokens, from its trace) and the quality: quality is not simulated, and depends
  on the app's knobs and the models, not on the engine or the deployment.

The simulated metrics take the calibration's quality and format rates, so a simulated
trial has every metric a real one has and objectives and constraints read it the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.engine.models import fmtune_home
from runtime.errors import ConfigError
from runtime.profiler import ProfileKey, profile_engine, profiling_config, vllm_version
from runtime.run import RunResult, RunSpec
from runtime.sim.cluster import RequestShape
from runtime.sim.steptime import StepTimeProfile
from runtime.simrun import prediction_errors, shapes_from_run, simulate_run
from tuner.capacity import measure_capacity

logger = logging.getLogger(__name__)

#: Metrics a simulation cannot predict: they come from the trial's calibration run.
APP_METRICS: tuple[str, ...] = (
    "quality",
    "quality_ci95",
    "format_clean_rate",
    "format_repaired_rate",
    "format_unparseable_rate",
    "score_errors",
)
#: Version of the calibration cache's layout; bumped when what it stores changes.
CALIBRATION_VERSION = 1

RealEvaluate = Callable[[RunSpec], RunResult]


def calibration_spec(trial: RunSpec, base: RunSpec) -> RunSpec:
    """The real run that calibrates a trial: the base experiment's deployment, workload and
    dataset, with the trial's app knobs and each model key's model as the trial has them.
    Trials that differ only in engine (dtype included: its effect on the answers is left
    out), replica or router knobs share it."""
    models = {}
    for key, model in base.deployment.models.items():
        engine = model.engine
        chosen = trial.deployment.models.get(key)
        if chosen is not None and chosen.engine.model != engine.model:
            engine = engine.with_knobs(model=chosen.engine.model)
        models[key] = model.model_copy(update={"engine": engine, "replicas": 1})
    deployment = base.deployment.model_copy(update={"models": models})
    return base.model_copy(update={"app": trial.app, "deployment": deployment})


def calibration_key(spec: RunSpec) -> str:
    """A stable name for a calibration run: its spec (app knobs, dataset, workload,
    deployment), the machine and the vLLM version."""
    text = json.dumps(
        {
            "spec": spec.model_dump(mode="json", exclude={"name", "description", "capacity"}),
            "machine": ProfileKey.for_engine(
                next(iter(spec.deployment.models.values())).engine
            ).hardware,
            "vllm": vllm_version(),
            "version": CALIBRATION_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def calibration_dir() -> Path:
    """Where calibration runs are kept: FMTUNE_HOME/calibration."""
    return fmtune_home() / "calibration"


@dataclass(frozen=True)
class Calibration:
    """What a calibration run gave: the metrics (quality among them) and the shapes."""

    metrics: dict[str, Any]
    shapes: tuple[RequestShape, ...]


def load_calibration(folder: Path) -> Calibration | None:
    """A stored calibration, or None when there is none (or an unreadable one)."""
    path = folder / "calibration.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        shapes = tuple(RequestShape.model_validate(item) for item in data["shapes"])
        return Calibration(metrics=dict(data["metrics"]), shapes=shapes)
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("calibration %s is unreadable (%s); measuring it again", path, error)
        return None


def save_calibration(folder: Path, calibration: Calibration) -> Path:
    """Write a calibration (metrics and shapes) as JSON; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "calibration.json"
    shapes = [shape.model_dump(mode="json") for shape in calibration.shapes]
    path.write_text(json.dumps({"metrics": calibration.metrics, "shapes": shapes}) + "\n")
    return path


def with_app_metrics(predicted: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """Simulated metrics completed with the metrics only a real run has (quality, formats)."""
    merged = dict(predicted)
    for name in APP_METRICS:
        if name in measured:
            merged[name] = measured[name]
    return merged


@dataclass
class SimulatedRun:
    """A simulated trial's outcome: metrics in the keys of a real run's metrics.json."""

    metrics: dict[str, Any]
    calibration: str
    """The calibration run's key (its folder under calibration_dir())."""
    seconds: float

    def metrics_dict(self) -> dict[str, Any]:
        """The metrics, as RunResult.metrics_dict gives a real run's."""
        return dict(self.metrics)


@dataclass
class SimEvaluator:
    """Evaluates RunSpecs in the simulator, calibrating each app/model combination once."""

    base: RunSpec
    """The experiment's run: its deployment calibrates every app/model combination."""
    evaluate_real: RealEvaluate
    """The study's real evaluation (its replica pool), for calibration runs."""
    on_phase: Callable[[str], None] | None = None
    profiles: dict[str, StepTimeProfile] = field(default_factory=dict)
    calibrations: dict[str, Calibration] = field(default_factory=dict)

    def _phase(self, text: str) -> None:
        logger.info(text)
        if self.on_phase is not None:
            self.on_phase(text)

    def profile(self, spec: RunSpec, key: str) -> StepTimeProfile:
        """The stored profile of a model key's engine (measured first if there is none, and
        completed with the drafter's rates the first time a trial speculates)."""
        engine = spec.deployment.models[key].engine
        identity = ProfileKey.for_engine(engine).file_name()
        known = self.profiles.get(identity)
        if known is None or (engine.speculative_method is not None and known.speculation is None):
            self._phase(f"step-time profile of {engine.model} ({engine.dtype})")
            outcome = profile_engine(profiling_config(engine))
            if not outcome.reused:
                logger.warning(
                    "profiled %s (%s) in %.0fs; stored in %s",
                    engine.model, engine.dtype, outcome.seconds, outcome.path,
                )  # fmt: skip
            self.profiles[identity] = outcome.profile
        return self.profiles[identity]

    def calibration(self, spec: RunSpec) -> tuple[str, Calibration]:
        """The calibration of this trial's app/model combination (measured on first use)."""
        calibrating = calibration_spec(spec, self.base)
        key = calibration_key(calibrating)
        if key in self.calibrations:
            return key, self.calibrations[key]
        folder = calibration_dir() / key
        found = load_calibration(folder)
        if found is None:
            self._phase(f"calibration run of {spec.app.architecture}/{spec.app.format.value}")
            result = self.evaluate_real(calibrating)
            rows = result.trace.to_dict("records")
            shapes = shapes_from_run(calibrating, rows, result.examples)
            found = Calibration(metrics=_json_safe(result.metrics_dict()), shapes=tuple(shapes))
            save_calibration(folder, found)
        self.calibrations[key] = found
        return key, found

    def __call__(self, spec: RunSpec) -> SimulatedRun:
        """Simulate one trial's RunSpec."""
        key, calibration = self.calibration(spec)
        profiles = {name: self.profile(spec, name) for name in spec.deployment.models}
        started = time.process_time()
        try:
            result = simulate_run(spec, calibration.shapes, profiles)
        except ValueError as error:  # a spec the simulator refuses (pydantic's included)
            raise ConfigError(f"the simulator refused the trial: {error}") from None
        metrics = with_app_metrics(result.metrics_dict(), calibration.metrics)
        if spec.capacity is not None:  # simulated only: a simulated trial confirms nothing
            found = measure_capacity(
                spec, calibration.shapes, profiles, start_rps=metrics.get("requests_per_s")
            )
            metrics.update(found.metrics())
        metrics["fidelity"] = "sim"
        return SimulatedRun(metrics, key, time.process_time() - started)


def confirmation_errors(predicted: dict[str, Any], measured: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of a confirmed trial: each predicted value and its error in percent
    against the measurement (`predicted.<metric>`, `error_pct.<metric>`)."""
    logged: dict[str, float] = {}
    for name, error in prediction_errors(predicted, measured).items():
        value = predicted.get(name)
        if isinstance(value, int | float):
            logged[f"predicted.{name}"] = float(value)
        if error is not None:
            logged[f"error_pct.{name}"] = error
    return logged


def _json_safe(data: dict[str, Any]) -> dict[str, Any]:
    """Metrics as JSON values (NaN and infinities become None)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [clean(item) for item in value]
        return value

    return json.loads(json.dumps(clean(data), default=str))
