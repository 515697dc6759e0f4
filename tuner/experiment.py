"""Experiment files: the run (app, workload, SLA, deployment) plus what to tune and how.

```yaml
name: quickstart
app: {...}; dataset: {...}; workload: {...}; sla: {...}; deployment: {...}   # a RunSpec
tune:
  search_space: search_spaces/cpu-smollm2.yaml   # relative to the experiment file
  objectives:                                    # any metric of `fmtune run`
    - {metric: cost_per_1k_usd, direction: minimize}
    - {metric: quality, direction: maximize}
  constraints: ["e2e_p95_s <= 20", "quality >= 0.3"]   # SLA bounds: infeasible trials stay
  trials: 8                                            # in the study, never on the front
  sampler: nsga2
  fidelity: real           # real | sim (simulated trials) | multi (screen in sim, confirm real)
```
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.capacity import CAPACITY_METRICS
from runtime.deployment import read_yaml_mapping
from runtime.errors import ConfigError, config_error, unknown_name_message
from runtime.metrics import RunMetrics
from runtime.run import RunSpec, apply_overrides
from tuner.pareto import Objective
from tuner.samplers import SAMPLERS, sampler_help

Fidelity = Literal["real", "sim", "multi"]
"""How a study evaluates its trials (TuneSpec.fidelity)."""
#: Metrics an objective or constraint may name: every RunMetrics field and the run extras.
RUN_EXTRAS = ("replica_start_s", "router_shed", "router_retried", "router_queue_rejected")
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*(-?[0-9.eE+-]+)\s*$")


def metric_names() -> set[str]:
    """Every metric `fmtune run` reports by name (the capacity metrics when the experiment
    sets `capacity`)."""
    return set(RunMetrics.model_fields) | set(RUN_EXTRAS) | set(CAPACITY_METRICS)


class MetricBound(BaseModel):
    """An SLA bound on one metric: `metric op bound`."""

    model_config = ConfigDict(frozen=True)

    metric: str
    op: Literal["<=", ">=", "<", ">"]
    bound: float
    text: str

    def violation(self, metrics: dict[str, Any]) -> float:
        """How far the metric is past its bound: <= 0 when satisfied (optuna's convention).

        A metric the run could not measure (no successful request) counts as violated by 1e9.
        """
        value = metrics.get(self.metric)
        if value is None:
            return 1e9
        value = float(value)
        return value - self.bound if self.op in ("<=", "<") else self.bound - value


def parse_bound(text: str) -> MetricBound:
    """'e2e_p95_s <= 20' -> MetricBound; errors name the text and the known metrics."""
    match = _CONSTRAINT.match(text)
    if match is None:
        raise ValueError(f"constraint must look like 'metric <= number', got '{text}'")
    metric, op, bound = match.groups()
    if metric not in metric_names():
        raise ValueError(f"constraint '{text}': unknown metric '{metric}'")
    try:
        value = float(bound)
    except ValueError:
        raise ValueError(f"constraint '{text}': bound must be a number, got '{bound}'") from None
    return MetricBound(metric=metric, op=op, bound=value, text=text.strip())  # type: ignore[arg-type]


class RegressSpec(BaseModel):
    """How `fmtune regress` judges a re-measured deployment against its baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(
        default=0.10,
        gt=0,
        lt=1,
        description="Smallest relative change of an objective that counts: the ratio of "
        "today's median to the baseline's must be at least 1 + threshold the worse way (or "
        "1 - threshold for a metric to maximize), and its 95% interval must exclude 1.",
    )
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Per-metric thresholds overriding `threshold`, by objective metric.",
    )
    repeats: int = Field(
        default=3,
        ge=3,
        le=100,
        description="Times regress measures each deployment (the workload's `repeats`); at "
        "least 3, so the interval over repeats means something.",
    )

    @field_validator("thresholds")
    @classmethod
    def _known_thresholds(cls, thresholds: dict[str, float]) -> dict[str, float]:
        known = metric_names()
        for metric, value in thresholds.items():
            if metric not in known:
                raise ValueError(unknown_name_message("threshold metric", metric, sorted(known)))
            if not 0 < value < 1:
                raise ValueError(f"thresholds.{metric} must be in (0, 1), got {value}")
        return thresholds

    def threshold_for(self, metric: str) -> float:
        """The threshold of one metric."""
        return self.thresholds.get(metric, self.threshold)


class TuneSpec(BaseModel):
    """What the study searches, what it optimizes, under which bounds, for how long."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    search_space: Path = Field(
        description="Search-space file (search_spaces/*.yaml), relative to the experiment file."
    )
    objectives: list[Objective] = Field(
        min_length=1, description="Metrics of `fmtune run` with a direction."
    )
    constraints: list[str] = Field(
        default_factory=list,
        description="SLA bounds such as 'e2e_p95_s <= 20': trials that break one stay in the "
        "study as infeasible and never reach the Pareto front.",
    )
    trials: int = Field(default=8, ge=1, le=100_000, description="Trials in the budget.")
    timeout_min: float | None = Field(
        default=None,
        gt=0,
        description="Wall-clock budget of one worker's run in minutes, as optuna's "
        "`optimize(timeout=...)`: no trial starts after it has passed (the running one "
        "finishes, so a run can overshoot by one trial). None: the trial budget alone.",
    )
    sampler: str | None = Field(
        default=None,
        description="Search algorithm; default nsga2 with two or more objectives, tpe with one. "
        f"One of: {sampler_help()}.",
        json_schema_extra={"enum": [*SAMPLERS, None]},
    )
    seed: int = Field(default=0, ge=0, description="Seed of the sampler.")
    population_size: int = Field(
        default=8, ge=2, le=1000, description="Population of the evolutionary samplers."
    )
    regress: RegressSpec = Field(
        default_factory=RegressSpec,
        description="How `fmtune regress` compares the exported deployments with today's "
        "measurements of them.",
    )
    max_failures_per_config: int = Field(
        default=1,
        ge=1,
        description="After an engine config failed this many times (start failure, out of "
        "memory), trials that sample it again are skipped without running.",
    )
    fidelity: Fidelity = Field(
        default="real",
        description="How trials are evaluated: 'real' on real replicas; 'sim' in the "
        "simulator (stored step-time profiles, and one real calibration run per app/model "
        "combination for quality and token counts); 'multi' screens in the simulator and "
        "confirms the most promising on real replicas.",
    )
    screen_trials: int = Field(
        default=200,
        ge=1,
        le=1_000_000,
        description="With fidelity 'multi': simulated trials screened per round before the "
        "round's confirmations; `trials` is then the budget of real (confirmed) trials.",
    )
    confirm: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="With fidelity 'multi': configurations of the screened front measured on "
        "real replicas per round (those not measured yet).",
    )

    @field_validator("objectives")
    @classmethod
    def _known_metrics(cls, objectives: list[Objective]) -> list[Objective]:
        known = metric_names()
        for objective in objectives:
            if objective.metric not in known:
                raise ValueError(
                    f"objective metric must be a metric of `fmtune run`, got '{objective.metric}'"
                )
        return objectives

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, name: str | None) -> str | None:
        if name is not None and name not in SAMPLERS:
            raise ValueError(unknown_name_message("sampler", name, SAMPLERS))
        return name

    @field_validator("constraints")
    @classmethod
    def _parseable(cls, constraints: list[str]) -> list[str]:
        for text in constraints:
            parse_bound(text)
        return constraints

    def bounds(self) -> list[MetricBound]:
        """The parsed SLA bounds."""
        return [parse_bound(text) for text in self.constraints]

    def sampler_name(self) -> str:
        """The sampler to use, resolving the default by the number of objectives."""
        if self.sampler is not None:
            return self.sampler
        return "nsga2" if len(self.objectives) > 1 else "tpe"


class Experiment(RunSpec):
    """An experiment file: a run plus its tuning section."""

    tune: TuneSpec | None = Field(default=None, description="What to tune; needed by `tune`.")

    @model_validator(mode="after")
    def _capacity_measured(self) -> Experiment:
        """An objective or constraint on a capacity metric needs the `capacity` setting."""
        if self.tune is None or self.capacity is not None:
            return self
        named = [o.metric for o in self.tune.objectives]
        named += [bound.metric for bound in self.tune.bounds()]
        for metric in named:
            if metric in CAPACITY_METRICS:
                raise ValueError(
                    f"tune: metric '{metric}' is measured only with the capacity setting "
                    "(add e.g. `capacity: {target: 0.95}` to the experiment)"
                )
        return self


def load_experiment(
    path: Path, overrides: dict[str, Any] | None = None, *, need_tune: bool = False
) -> Experiment:
    """Read an experiment file (an app path relative to it); errors name the file, the field
    and the value."""
    data = apply_overrides(read_yaml_mapping(path), overrides or {})
    try:
        experiment = Experiment.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as error:
        raise config_error(error, str(path), Experiment) from None
    if need_tune and experiment.tune is None:
        raise ConfigError(f"{path}: tune: a tuning section is required by `fmtune tune`")
    if experiment.tune is not None and not experiment.tune.search_space.is_absolute():
        resolved = (path.parent / experiment.tune.search_space).resolve()
        if not resolved.exists():
            resolved = Path.cwd() / experiment.tune.search_space
        tune = experiment.tune.model_copy(update={"search_space": resolved})
        experiment = experiment.model_copy(update={"tune": tune})
    return experiment


def run_spec_of(experiment: Experiment) -> RunSpec:
    """The runtime part of an experiment (what one trial evaluates)."""
    data = experiment.model_dump(mode="python", exclude={"tune"})
    return RunSpec.model_validate(data)
