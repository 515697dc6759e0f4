"""`fmtune regress`: measure exported deployments again and say whether they got worse.

A nightly job: the baseline is what `fmtune export` wrote (a folder of bundles, each with its
DEPLOY.yaml and measured.json) or the Pareto front of a study. Each baseline deployment is
measured again on today's stack (same app, dataset, workload, SLA and prices, through the
same `runtime.run.execute_run` as `fmtune run`, `repeats` >= 3 times), then every objective
is compared with the baseline's own measurements:

- latency, cost and the other metrics: the ratio of today's median over repeats to the
  baseline's, with a percentile-bootstrap 95% interval (`runtime.stats.ratio_of_medians`);
- quality: the ratio of mean scores over the same dataset examples, with a paired bootstrap
  (`runtime.stats.paired_ratio_of_means`); when the examples differ from the baseline's (a
  changed dataset), as the other metrics.

The rule (`classify`, pure): a deployment x objective is *regressed* when the ratio is at
least 1 + threshold the worse way (1 - threshold for a metric to maximize) and its 95%
interval excludes 1; *improved* symmetrically; *unchanged* otherwise. The threshold is the
experiment's `tune.regress.threshold` (default 10%). False alarms: with 3 baseline and 3
current repeats the interval excludes 1 only when all three of today's values lie beyond all
three of the baseline's, which unchanged measurements do with probability 1/20 whatever
their noise; the 10% threshold lowers that further (`simulate_verdicts` gives the rate for a
noise level, and regress.md states it for the night's numbers of repeats).

Files in the output folder: regress.md, regress.html (the verdicts and a trend plot per
deployment over every night in the history), regress.xml (JUnit: one testcase per deployment
x objective, a failure for each regression), trend-<deployment>.png, and history.db, the
history store: a SQLite file in the output folder (one row per night x deployment x
objective), so running regress nightly into the same folder builds the trend. One MLflow run
per night (experiment `fmtune-regress`, tracking store mlflow.db in the output folder unless
told) carries the ratios, the files and the stack's tags: vLLM version, model names and
checksums, machine.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from runtime.deployment import load_deployment
from runtime.errors import ConfigError, EngineFailure, FmtuneError, config_error
from runtime.run import RunSpec
from runtime.stats import (
    bootstrap_ci,
    bootstrap_median_ci,
    paired_ratio_of_means,
    ratio_of_medians,
)
from tuner.experiment import Experiment, RegressSpec
from tuner.pareto import Direction, Objective

logger = logging.getLogger(__name__)

Verdict = Literal["improved", "unchanged", "regressed"]
Method = Literal["repeats", "paired", "failed", "undefined"]
Measure = Callable[[RunSpec], Mapping[str, Any]]
"""Measures a RunSpec and returns its metrics.json mapping (`RunResult.metrics_dict`)."""

HISTORY_FILE = "history.db"
MARKDOWN_FILE = "regress.md"
HTML_FILE = "regress.html"
JUNIT_FILE = "regress.xml"
MLFLOW_EXPERIMENT = "fmtune-regress"
SIMULATED_NOISE_CV = 0.05
"""The noise level (coefficient of variation between repeats) the report's false-alarm rate
is simulated at."""
RULE = (
    "A deployment x objective is regressed when today's median is at least the threshold "
    "worse than the baseline's (ratio >= 1 + t for a metric to minimize, <= 1 - t for one to "
    "maximize) and the 95% bootstrap interval of the ratio excludes 1; improved the same way "
    "in the better direction; unchanged otherwise. Quality compares mean scores on the same "
    "examples (paired bootstrap); the other metrics the medians over repeats."
)


# --------------------------------------------------------------------------------------------
# Measurements and comparisons (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """What a measurement of a deployment offers a comparison.

    Attributes:
        values: Each metric's value in every repeat (one value for a run without repeats).
        examples: The dataset examples, in request order; None when not recorded.
        example_quality: Each example's quality averaged over repeats, in the same order.
    """

    values: dict[str, list[float]]
    examples: list[int] | None = None
    example_quality: list[float] | None = None

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> Measurement:
        """From a metrics.json mapping: `repeat_values` where recorded, else each numeric
        metric as a single value; `examples` where recorded."""
        values: dict[str, list[float]] = {}
        for name, value in metrics.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if number and math.isfinite(float(value)):
                values[name] = [float(value)]
        for name, repeated in (metrics.get("repeat_values") or {}).items():
            finite = [float(v) for v in repeated if v is not None and math.isfinite(float(v))]
            if finite:
                values[name] = finite
            else:
                values.pop(name, None)
        examples = metrics.get("examples") or {}
        index, quality = examples.get("index"), examples.get("quality")
        if index is None or quality is None or len(index) != len(quality):
            return cls(values)
        return cls(values, [int(i) for i in index], [float(q) for q in quality])


@dataclass(frozen=True)
class Comparison:
    """One deployment x objective: today's measurement against the baseline's.

    Attributes:
        ratio, ratio_low, ratio_high: today / baseline and its 95% interval (None when the
            metric could not be compared: failed or undefined today or in the baseline).
        baseline, current: the medians compared (means over examples for paired quality).
        current_low, current_high: 95% interval of today's value alone (for trend plots).
        n_baseline, n_current: the repeats (or examples, for paired quality) compared.
    """

    deployment: str
    metric: str
    direction: Direction
    threshold: float
    verdict: Verdict
    method: Method
    ratio: float | None = None
    ratio_low: float | None = None
    ratio_high: float | None = None
    baseline: float | None = None
    current: float | None = None
    current_low: float | None = None
    current_high: float | None = None
    n_baseline: int = 0
    n_current: int = 0
    note: str = ""

    def ratio_text(self) -> str:
        """'1.52 [1.31, 1.77]', or what stood in the way."""
        if self.ratio is None or self.ratio_low is None or self.ratio_high is None:
            return self.note or "n/a"
        return f"{self.ratio:.3g} [{self.ratio_low:.3g}, {self.ratio_high:.3g}]"

    def line(self) -> str:
        """One line for people: deployment, objective, verdict, ratio and interval."""
        text = f"{self.deployment} {self.metric}: {self.verdict}, ratio {self.ratio_text()}"
        return text + (f" ({self.note})" if self.note and self.ratio is not None else "")


def classify(
    ratio: float, low: float, high: float, direction: Direction, threshold: float
) -> Verdict:
    """The verdict of one ratio (today / baseline) and its 95% interval: regressed when the
    ratio is at least `threshold` the worse way and the interval excludes 1, improved when
    it is that far the better way and the interval excludes 1, unchanged otherwise."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if not low <= ratio <= high:
        raise ValueError(f"ratio must lie in its interval [{low}, {high}], got {ratio}")
    up = low > 1 and ratio >= 1 + threshold
    down = high < 1 and ratio <= 1 - threshold
    if direction == "minimize":
        return "regressed" if up else "improved" if down else "unchanged"
    return "regressed" if down else "improved" if up else "unchanged"


def compare_objective(
    deployment: str,
    objective: Objective,
    threshold: float,
    baseline: Measurement,
    current: Measurement,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Comparison:
    """Compare one objective (see the module's rule). Quality is compared on the same
    examples when both measurements recorded them and they are the same, in the same order;
    a metric today's run left undefined (no successful request) counts as regressed, one the
    baseline lacks as unchanged (nothing to compare with)."""
    metric, direction = objective.metric, objective.direction
    base = {"deployment": deployment, "metric": metric, "direction": direction}
    base["threshold"] = threshold
    paired = (
        metric == "quality"
        and baseline.examples is not None
        and baseline.examples == current.examples
        and baseline.example_quality is not None
        and current.example_quality is not None
    )
    if paired:
        assert baseline.example_quality is not None and current.example_quality is not None
        ratio, low, high = paired_ratio_of_means(
            baseline.example_quality, current.example_quality, n_resamples=n_resamples, seed=seed
        )
        current_low, current_high = bootstrap_ci(current.example_quality, seed=seed)
        return Comparison(
            **base, verdict=classify(ratio, low, high, direction, threshold), method="paired",
            ratio=ratio, ratio_low=low, ratio_high=high,
            baseline=float(np.mean(baseline.example_quality)),
            current=float(np.mean(current.example_quality)),
            current_low=current_low, current_high=current_high,
            n_baseline=len(baseline.example_quality), n_current=len(current.example_quality),
        )  # fmt: skip
    before, today = baseline.values.get(metric), current.values.get(metric)
    if not today:
        return Comparison(**base, verdict="regressed", method="undefined",
                          note="undefined today (no successful request)")  # fmt: skip
    if not before:
        return Comparison(**base, verdict="unchanged", method="undefined",
                          current=float(np.median(today)), n_current=len(today),
                          note="the baseline did not measure it")  # fmt: skip
    ratio, low, high = ratio_of_medians(before, today, n_resamples=n_resamples, seed=seed)
    current_low, current_high = bootstrap_median_ci(today, seed=seed)
    note = ""
    if metric == "quality" and baseline.examples is not None and current.examples is not None:
        note = "examples differ from the baseline's: compared unpaired"
    return Comparison(
        **base, verdict=classify(ratio, low, high, direction, threshold), method="repeats",
        ratio=ratio, ratio_low=low, ratio_high=high, baseline=float(np.median(before)),
        current=float(np.median(today)), current_low=current_low, current_high=current_high,
        n_baseline=len(before), n_current=len(today), note=note,
    )  # fmt: skip


def compare_deployment(
    deployment: str,
    objectives: Sequence[Objective],
    regress: RegressSpec,
    baseline: Measurement,
    current: Measurement | None,
    error: str | None = None,
) -> list[Comparison]:
    """Every objective of one deployment; a deployment that could not be measured today
    (`error`: it no longer starts, its run failed) is regressed on every objective."""
    if current is None:
        reason = error or "not measured"
        return [
            Comparison(
                deployment=deployment,
                metric=o.metric,
                direction=o.direction,
                threshold=regress.threshold_for(o.metric),
                verdict="regressed",
                method="failed",
                note=f"not measured today: {reason}",
            )
            for o in objectives
        ]
    return [
        compare_objective(deployment, o, regress.threshold_for(o.metric), baseline, current)
        for o in objectives
    ]


def simulate_verdicts(
    *,
    shift: float,
    noise_cv: float,
    n_baseline: int,
    n_current: int,
    threshold: float,
    direction: Direction = "minimize",
    nights: int = 1000,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[Verdict, float]:
    """How often each verdict comes out when today's true value is `shift` times the
    baseline's and every measurement has log-normal noise of coefficient of variation
    `noise_cv`: the share of `nights` simulated comparisons per verdict (seeded).

    shift 1 gives the false-alarm rate (regressed or improved though nothing changed); a
    shift past the threshold gives the detection rate.
    """
    if nights < 1:
        raise ValueError(f"nights must be >= 1, got {nights}")
    if shift <= 0 or noise_cv < 0:
        raise ValueError(f"shift must be > 0 and noise_cv >= 0, got {shift} and {noise_cv}")
    rng = np.random.default_rng(seed)
    sigma = math.sqrt(math.log1p(noise_cv**2))
    counts: dict[Verdict, int] = {"improved": 0, "unchanged": 0, "regressed": 0}
    for night in range(nights):
        before = np.exp(rng.normal(-(sigma**2) / 2, sigma, n_baseline))
        today = shift * np.exp(rng.normal(-(sigma**2) / 2, sigma, n_current))
        ratio, low, high = ratio_of_medians(
            before.tolist(), today.tolist(), n_resamples=n_resamples, seed=night
        )
        counts[classify(ratio, low, high, direction, threshold)] += 1
    return {verdict: count / nights for verdict, count in counts.items()}


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineDeployment:
    """One deployment to measure again, with what the baseline measured.

    Attributes:
        name: Its name across nights (the bundle's folder name, trial-NNNN).
        spec: What to measure: the baseline's app, dataset, workload, SLA and prices with the
            deployment (and app) of its DEPLOY.yaml as it is now.
        objectives: What to compare.
        regress: The experiment's thresholds and repeats.
        metrics: The baseline's metrics.json mapping.
        origin: Where it came from (a bundle folder, or a study and trial).
        params: The trial's knobs (empty for a bundle exported without them).
        experiment: The study's experiment (None for a bundle exported without it): what
            `--retune` searches again.
    """

    name: str
    spec: RunSpec
    objectives: tuple[Objective, ...]
    regress: RegressSpec
    metrics: dict[str, Any]
    origin: str
    params: dict[str, Any] = field(default_factory=dict)
    experiment: Experiment | None = None

    def measurement(self) -> Measurement:
        """The baseline's measurement."""
        return Measurement.from_metrics(self.metrics)


def _bundle_folders(folder: Path) -> list[Path]:
    """The bundle itself when it holds a DEPLOY.yaml, else its subfolders that do."""
    if (folder / "DEPLOY.yaml").is_file():
        return [folder]
    return sorted(path.parent for path in folder.glob("*/DEPLOY.yaml"))


def load_bundle(folder: Path) -> BaselineDeployment:
    """One exported bundle as a baseline: measured.json says what was measured and how, and
    DEPLOY.yaml (which may have been edited since) what to measure now."""
    from tuner.export import MEASURED_FILE

    deploy_path = folder / "DEPLOY.yaml"
    if not deploy_path.is_file():
        raise ConfigError(f"{folder}: no DEPLOY.yaml (not a bundle of `fmtune export`)")
    measured_path = folder / MEASURED_FILE
    if not measured_path.is_file():
        raise ConfigError(
            f"{measured_path}: no such file (a bundle exported before `fmtune regress` "
            "existed holds no measurements): export the study again with `fmtune export`"
        )
    try:
        record = json.loads(measured_path.read_text())
    except ValueError as error:
        raise ConfigError(f"{measured_path}: not valid JSON ({error})") from None
    missing = [key for key in ("run_spec", "objectives", "metrics") if key not in record]
    if missing:
        raise ConfigError(f"{measured_path}: missing {', '.join(missing)}")
    deployment = load_deployment(deploy_path)
    if len(deployment.apps) != 1:
        raise ConfigError(
            f"{deploy_path}: apps must hold the one app the bundle was measured with, "
            f"got {sorted(deployment.apps)}"
        )
    (app,) = deployment.apps.values()
    data = dict(record["run_spec"])
    data["deployment"] = deployment.model_dump(mode="json", exclude={"apps"})
    data["app"] = app.model_dump(mode="json")
    try:
        spec = RunSpec.model_validate(data, context={"base_dir": folder})
        objectives = tuple(Objective.model_validate(o) for o in record["objectives"])
        regress = RegressSpec.model_validate(record.get("regress") or {})
        stored = record.get("experiment")
        experiment = Experiment.model_validate(stored) if stored is not None else None
    except ValidationError as error:  # e.g. a field today's fmtune no longer has
        raise config_error(error, f"{measured_path} (run_spec)", RunSpec) from None
    return BaselineDeployment(
        name=folder.name, spec=spec, objectives=objectives, regress=regress,
        metrics=dict(record["metrics"]), origin=str(folder),
        params=dict(record.get("params") or {}), experiment=experiment,
    )  # fmt: skip


def load_export(folder: Path) -> list[BaselineDeployment]:
    """Every bundle of an export folder (or the one bundle the folder is); a ConfigError
    naming the folder when it holds no DEPLOY.yaml at all."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder")
    bundles = _bundle_folders(folder)
    if not bundles:
        raise ConfigError(
            f"{folder}: no DEPLOY.yaml in it or its subfolders (not an export of `fmtune export`)"
        )
    return [load_bundle(bundle) for bundle in bundles]


def load_study_front(study_name: str, storage_url: str) -> list[BaselineDeployment]:
    """The Pareto front of a study as baselines, named as `fmtune export` names its bundles,
    so a study and its export share one history."""
    from tuner.export import bundle_name, load_study, study_experiment, trial_run_spec
    from tuner.pareto import pareto_front
    from tuner.study import ATTR_METRICS

    study = load_study(study_name, storage_url)
    experiment = study_experiment(study)
    assert experiment.tune is not None
    front = pareto_front(study)
    if not front:
        raise ConfigError(f"study '{study_name}' has no feasible complete trial to compare with")
    baselines = []
    for trial in front:
        spec = trial_run_spec(experiment, trial)  # what export writes as DEPLOY.yaml
        baselines.append(
            BaselineDeployment(
                name=bundle_name(trial.number),
                spec=spec,
                objectives=tuple(experiment.tune.objectives),
                regress=experiment.tune.regress,
                metrics=dict(trial.user_attrs.get(ATTR_METRICS, {})),
                origin=f"study {study_name} trial {trial.number}",
                params=dict(trial.params),
                experiment=experiment,
            )
        )
    return baselines


def load_baseline(baseline: str, storage: str | None) -> tuple[str, list[BaselineDeployment]]:
    """(source, deployments) of what `fmtune regress BASELINE` names: an existing folder (an
    export, or one bundle; a DEPLOY.yaml path stands for its folder) or a study name (with
    its storage URL, default out/<name>/study.db). The source is the history's key: the
    folder's absolute path, or `study NAME`."""
    path = Path(baseline)
    if path.name == "DEPLOY.yaml" and path.is_file():
        path = path.parent
    if path.is_dir():
        return str(path.resolve()), load_export(path)
    if "/" in baseline:
        raise ConfigError(f"baseline '{baseline}': no such folder")
    if storage is None:
        default = Path("out") / baseline / "study.db"
        if not default.is_file():
            raise ConfigError(
                f"baseline '{baseline}': no such folder, and no study database at {default} "
                "(give an export folder, or a study name with --storage)"
            )
        storage = f"sqlite:///{default}"
    return f"study {baseline}", load_study_front(baseline, storage)


# --------------------------------------------------------------------------------------------
# The night
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentResult:
    """One baseline deployment measured again (or not) and compared."""

    baseline: BaselineDeployment
    repeats: int
    metrics: dict[str, Any] | None
    comparisons: list[Comparison]
    error: str | None = None

    @property
    def verdict(self) -> Verdict:
        """regressed if any objective regressed, else improved if any improved."""
        verdicts = {c.verdict for c in self.comparisons}
        if "regressed" in verdicts:
            return "regressed"
        return "improved" if "improved" in verdicts else "unchanged"


@dataclass
class RegressReport:
    """One night of regress: what was compared, the stack it ran on, the files written."""

    night: str
    source: str
    deployments: list[DeploymentResult]
    stack: dict[str, str] = field(default_factory=dict)
    false_alarm: dict[str, float] = field(default_factory=dict)
    """Simulated rate of each wrong verdict on unchanged measurements, per (n_baseline,
    n_current) pair seen tonight, keyed 'n_baseline x n_current'."""
    files: dict[str, Path] = field(default_factory=dict)
    run_id: str | None = None

    def comparisons(self) -> list[Comparison]:
        """Every deployment x objective."""
        return [c for d in self.deployments for c in d.comparisons]

    def regressions(self) -> list[Comparison]:
        """The deployment x objectives that regressed."""
        return [c for c in self.comparisons() if c.verdict == "regressed"]

    @property
    def regressed(self) -> bool:
        """Whether anything regressed (the command's exit code 1)."""
        return bool(self.regressions())


def with_repeats(spec: RunSpec, repeats: int) -> RunSpec:
    """The spec with its workload measured `repeats` times."""
    workload = spec.workload.model_copy(update={"repeats": repeats})
    return spec.model_copy(update={"workload": workload})


def measure_all(
    baselines: Sequence[BaselineDeployment],
    measure: Measure,
    *,
    repeats: int | None = None,
    on_deployment: Callable[[BaselineDeployment, int], None] | None = None,
) -> list[DeploymentResult]:
    """Measure each baseline deployment again (max of its experiment's `regress.repeats`
    and `repeats`) and compare it; a deployment whose run fails is regressed, the others
    are still measured."""
    results = []
    for baseline in baselines:
        count = max(baseline.regress.repeats, repeats or 0)
        if on_deployment is not None:
            on_deployment(baseline, count)
        metrics: dict[str, Any] | None = None
        error: str | None = None
        try:
            metrics = dict(measure(with_repeats(baseline.spec, count)))
        except EngineFailure as failure:
            error = str(failure).splitlines()[0]
        except (FmtuneError, OSError, RuntimeError, ValueError, TimeoutError) as failure:
            error = f"{type(failure).__name__}: {failure}"
        if error is not None:
            logger.warning("%s: not measured: %s", baseline.name, error)
        current = Measurement.from_metrics(metrics) if metrics is not None else None
        comparisons = compare_deployment(
            baseline.name, baseline.objectives, baseline.regress, baseline.measurement(),
            current, error,
        )  # fmt: skip
        results.append(DeploymentResult(baseline, count, metrics, comparisons, error))
    return results


def false_alarm_rates(results: Sequence[DeploymentResult]) -> dict[str, float]:
    """The simulated share of unchanged measurements (noise SIMULATED_NOISE_CV) classified
    regressed, for each pair of repeat counts compared tonight (at the default threshold of
    the first deployment with that pair)."""
    rates: dict[str, float] = {}
    for result in results:
        for c in result.comparisons:
            if c.method != "repeats":
                continue
            key = f"{c.n_baseline} x {c.n_current}"
            if key not in rates:
                rates[key] = simulate_verdicts(
                    shift=1.0, noise_cv=SIMULATED_NOISE_CV, n_baseline=c.n_baseline,
                    n_current=c.n_current, threshold=c.threshold, nights=400,
                )["regressed"]  # fmt: skip
    return rates


def run_regress(
    baselines: Sequence[BaselineDeployment],
    measure: Measure,
    out: Path,
    *,
    source: str,
    repeats: int | None = None,
    stack: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
    night: datetime | None = None,
    on_deployment: Callable[[BaselineDeployment, int], None] | None = None,
) -> RegressReport:
    """One night: measure, compare, append to the history, write the files, and log to
    MLflow at tracking_uri (none: no MLflow run; a failing MLflow costs a warning, not the
    night's files)."""
    out.mkdir(parents=True, exist_ok=True)
    when = (night or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    results = measure_all(baselines, measure, repeats=repeats, on_deployment=on_deployment)
    report = RegressReport(when, source, results, dict(stack or {}), false_alarm_rates(results))
    history = History(out / HISTORY_FILE)
    history.append(report)
    report.files = write_files(report, history, out)
    report.files["history"] = history.path
    if tracking_uri is not None:
        try:
            report.run_id = log_night(report, tracking_uri)
        except Exception as error:  # MLflow must not cost the night's verdicts
            logger.warning("MLflow: tonight's regress run was not logged: %s", error)
    return report


# --------------------------------------------------------------------------------------------
# The history store
# --------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS regress_history (
    night TEXT NOT NULL,
    source TEXT NOT NULL,
    deployment TEXT NOT NULL,
    metric TEXT NOT NULL,
    direction TEXT NOT NULL,
    verdict TEXT NOT NULL,
    method TEXT NOT NULL,
    threshold REAL NOT NULL,
    baseline REAL,
    current REAL,
    current_low REAL,
    current_high REAL,
    ratio REAL,
    ratio_low REAL,
    ratio_high REAL,
    n_baseline INTEGER NOT NULL,
    n_current INTEGER NOT NULL,
    note TEXT NOT NULL,
    stack TEXT NOT NULL,
    PRIMARY KEY (night, source, deployment, metric)
)
"""


def _finite(value: float | None) -> float | None:
    """SQLite and JSON keep no infinities: an infinite ratio is stored as NULL."""
    return value if value is None or math.isfinite(value) else None


class History:
    """Every night's comparisons, one row per night x deployment x objective, in a SQLite
    file (`HISTORY_FILE` in regress's output folder). The source (the baseline folder or
    study) is part of the key, so one folder can hold the history of several baselines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._connect() as db:
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path)
        db.row_factory = sqlite3.Row
        return db

    def append(self, report: RegressReport) -> None:
        """Add the night's comparisons (a night already stored is replaced)."""
        stack = json.dumps(report.stack, sort_keys=True)
        rows = [
            (
                report.night,
                report.source,
                c.deployment,
                c.metric,
                c.direction,
                c.verdict,
                c.method,
                c.threshold,
                _finite(c.baseline),
                _finite(c.current),
                _finite(c.current_low),
                _finite(c.current_high),
                _finite(c.ratio),
                _finite(c.ratio_low),
                _finite(c.ratio_high),
                c.n_baseline,
                c.n_current,
                c.note,
                stack,
            )
            for c in report.comparisons()
        ]
        with self._connect() as db:
            db.executemany(
                f"INSERT OR REPLACE INTO regress_history VALUES ({', '.join('?' * 19)})", rows
            )

    def rows(self, source: str, deployment: str) -> list[dict[str, Any]]:
        """Every night's rows of one deployment, oldest first."""
        with self._connect() as db:
            cursor = db.execute(
                "SELECT * FROM regress_history WHERE source = ? AND deployment = ? "
                "ORDER BY night, metric",
                (source, deployment),
            )
            return [dict(row) for row in cursor.fetchall()]

    def nights(self, source: str) -> list[str]:
        """The nights stored for a source, oldest first."""
        with self._connect() as db:
            cursor = db.execute(
                "SELECT DISTINCT night FROM regress_history WHERE source = ? ORDER BY night",
                (source,),
            )
            return [row[0] for row in cursor.fetchall()]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def trend_plot(rows: Sequence[Mapping[str, Any]], deployment: str, path: Path) -> Path:
    """One panel per objective: today's median (with its interval) on every night, the
    baseline as a dashed line, regressed nights in red and improved ones in green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({row["metric"] for row in rows})
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7, 2.2 * len(metrics) + 0.6), squeeze=False)
    colors = {"regressed": "tab:red", "improved": "tab:green", "unchanged": "tab:gray"}
    nights = sorted({row["night"] for row in rows})
    for axis, metric in zip(axes[:, 0], metrics, strict=True):
        mine = [row for row in rows if row["metric"] == metric and row["current"] is not None]
        xs = [nights.index(row["night"]) for row in mine]
        for x, row in zip(xs, mine, strict=True):
            low = row["current_low"] if row["current_low"] is not None else row["current"]
            high = row["current_high"] if row["current_high"] is not None else row["current"]
            axis.errorbar(
                [x], [row["current"]], yerr=[[row["current"] - low], [high - row["current"]]],
                fmt="o", color=colors[row["verdict"]], capsize=3,
            )  # fmt: skip
        baselines = [row["baseline"] for row in mine if row["baseline"] is not None]
        if baselines:
            axis.axhline(baselines[-1], linestyle="--", color="tab:blue", label="baseline")
            axis.legend(loc="best", fontsize="small")
        direction = mine[-1]["direction"] if mine else ""
        axis.set_ylabel(metric, fontsize="small")
        axis.set_title(f"{metric} ({direction})", fontsize="small")
        axis.set_xticks(range(len(nights)))
        axis.set_xticklabels([n[:16].replace("T", " ") for n in nights], fontsize="x-small")
    fig.suptitle(f"{deployment}: every night in the history")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def markdown(report: RegressReport) -> str:
    """regress.md: the verdicts, the rule and its false-alarm rate, the stack."""
    status = "REGRESSED" if report.regressed else "no regression"
    lines = [
        f"# fmtune regress: {status}",
        "",
        f"- night: {report.night}",
        f"- baseline: {report.source}",
        f"- deployments: {len(report.deployments)}",
        "",
        "| deployment | objective | verdict | baseline | today | ratio [95% interval] | "
        "threshold | compared |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report.comparisons():
        compared = {"paired": f"{c.n_current} examples, paired"}.get(
            c.method, f"{c.n_baseline} vs {c.n_current} repeats" if c.method == "repeats" else "-"
        )
        lines.append(
            f"| {c.deployment} | {c.metric} ({c.direction}) | **{c.verdict}** | "
            f"{_fmt(c.baseline)} | {_fmt(c.current)} | {c.ratio_text()} | "
            f"{c.threshold:.0%} | {compared} |"
        )
    notes = [c for c in report.comparisons() if c.note and c.ratio is not None]
    if notes:
        lines += ["", *[f"- {c.deployment} {c.metric}: {c.note}" for c in notes]]
    lines += ["", "## Rule", "", RULE, ""]
    for key, rate in report.false_alarm.items():
        lines.append(
            f"- {key} repeats: unchanged measurements with {SIMULATED_NOISE_CV:.0%} noise were "
            f"classified regressed in {rate:.1%} of 400 simulated nights."
        )
    lines.append(
        "- With 3 repeats on each side the interval excludes 1 only when every value of "
        "today lies beyond every value of the baseline: probability 1/20 for unchanged "
        "measurements, whatever their noise, before the threshold is applied."
    )
    thin = sorted({c.deployment for c in report.comparisons()
                   if c.method == "repeats" and c.n_baseline < 3})  # fmt: skip
    if thin:
        lines.append(
            f"- {', '.join(thin)}: the baseline has fewer than 3 repeats, so its interval "
            "holds today's spread only and false alarms are more frequent; measure the "
            "baseline with `workload.repeats: 3` (a study run with it, then `fmtune export`)."
        )
    failed = [d for d in report.deployments if d.error]
    if failed:
        lines += ["", "## Not measured", ""]
        lines += [f"- {d.baseline.name}: {d.error}" for d in failed]
    lines += ["", "## Stack", ""]
    lines += [f"- {key}: {value}" for key, value in sorted(report.stack.items())]
    return "\n".join(lines) + "\n"


def html_page(report: RegressReport, plots: Mapping[str, Path]) -> str:
    """regress.html: the same table, and each deployment's trend plot."""
    esc = html.escape
    colors = {"regressed": "#c0392b", "improved": "#1e8449", "unchanged": "#555"}
    rows = "".join(
        f"<tr><td>{esc(c.deployment)}</td><td>{esc(c.metric)} ({c.direction})</td>"
        f"<td style='color:{colors[c.verdict]}'><b>{c.verdict}</b></td>"
        f"<td>{_fmt(c.baseline)}</td><td>{_fmt(c.current)}</td>"
        f"<td>{esc(c.ratio_text())}</td><td>{c.threshold:.0%}</td></tr>"
        for c in report.comparisons()
    )
    sections = "".join(
        f"<h2>{esc(name)}</h2><img src='{esc(path.name)}' alt='trend of {esc(name)}'>"
        for name, path in plots.items()
    )
    rates = "".join(
        f"<li>{esc(key)} repeats: {rate:.1%} false alarms in simulation "
        f"({SIMULATED_NOISE_CV:.0%} noise)</li>"
        for key, rate in report.false_alarm.items()
    )
    status = "REGRESSED" if report.regressed else "no regression"
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>fmtune regress {esc(report.night)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}</style></head><body>"
        f"<h1>fmtune regress: {status}</h1>"
        f"<p>night {esc(report.night)}, baseline {esc(report.source)}</p>"
        "<table><tr><th>deployment</th><th>objective</th><th>verdict</th><th>baseline</th>"
        f"<th>today</th><th>ratio [95% interval]</th><th>threshold</th></tr>{rows}</table>"
        f"<p>{esc(RULE)}</p><ul>{rates}</ul>{sections}</body></html>\n"
    )


def junit_xml(report: RegressReport) -> str:
    """JUnit XML: one testcase per deployment x objective (classname the deployment, name
    the objective), a failure for each regression; CI systems show them as tests."""
    comparisons = report.comparisons()
    suites = ET.Element("testsuites", name="fmtune regress")
    suite = ET.SubElement(
        suites, "testsuite", name=f"fmtune regress {report.source}",
        tests=str(len(comparisons)), failures=str(len(report.regressions())), errors="0",
        skipped="0", timestamp=report.night, hostname=report.stack.get("fmtune.host", ""),
    )  # fmt: skip
    properties = ET.SubElement(suite, "properties")
    for key, value in sorted(report.stack.items()):
        ET.SubElement(properties, "property", name=key, value=value)
    for c in comparisons:
        case = ET.SubElement(suite, "testcase", classname=c.deployment, name=c.metric)
        if c.verdict == "regressed":
            failure = ET.SubElement(case, "failure", type="regressed", message=c.line())
            failure.text = f"{c.line()}\nthreshold {c.threshold:.0%}; {RULE}"
        else:
            ET.SubElement(case, "system-out").text = c.line()
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, "unicode") + "\n"


def write_files(report: RegressReport, history: History, out: Path) -> dict[str, Path]:
    """regress.md, regress.html with a trend plot per deployment, regress.xml."""
    plots = {}
    for result in report.deployments:
        name = result.baseline.name
        rows = history.rows(report.source, name)
        plots[name] = trend_plot(rows, name, out / f"trend-{_safe(name)}.png")
    files = {
        "markdown": out / MARKDOWN_FILE,
        "html": out / HTML_FILE,
        "junit": out / JUNIT_FILE,
    }
    files["markdown"].write_text(markdown(report))
    files["html"].write_text(html_page(report, plots))
    files["junit"].write_text(junit_xml(report))
    return {**files, **{f"trend {name}": path for name, path in plots.items()}}


def log_night(report: RegressReport, tracking_uri: str) -> str:
    """The night as one MLflow run: ratios and intervals as metrics, the stack as tags, the
    files as artifacts. Returns the run's id."""
    from tuner.tracking import log_run

    metrics: dict[str, Any] = {"regressed": len(report.regressions())}
    for c in report.comparisons():
        prefix = f"{c.deployment}.{c.metric}"
        metrics[f"{prefix}.ratio"] = _finite(c.ratio)
        metrics[f"{prefix}.ratio_ci95"] = [_finite(c.ratio_low), _finite(c.ratio_high)]
        metrics[f"{prefix}.current"] = c.current
    tags = {**report.stack, "fmtune.regress.verdict": "regressed" if report.regressed else "ok"}
    params = {"baseline": report.source, "night": report.night,
              "deployments": [d.baseline.name for d in report.deployments],
              "repeats": sorted({d.repeats for d in report.deployments})}  # fmt: skip
    artifacts = {path.name: path for path in report.files.values() if path.is_file()}
    return log_run(
        tracking_uri, MLFLOW_EXPERIMENT, f"regress-{report.night}", kind="regress",
        params=params, metrics=metrics, tags=tags, artifacts=artifacts,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------


def folder_checksum(folder: Path) -> str:
    """sha256 over a model folder's files (relative names and bytes, in name order): a new
    model build, a re-conversion or an edited config changes it."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def stack_tags(specs: Sequence[RunSpec]) -> dict[str, str]:
    """What today's stack is: the machine and vLLM version (`tuner.tracking.machine_tags`),
    and the checksum of each folder the deployments' replicas serve, under its served name
    (`fmtune.model.<name>`, `<name>-int8` for an engine with quantization int8: the variant
    folder `runtime.engine.models.served_model` gives the replica, not the dense folder it
    was written from). 'unavailable' when the folder cannot be found (e.g. an endpoints
    cluster, or an int8 variant not written yet: it is not written here)."""
    from runtime.engine.models import served_folder_name, served_model
    from tuner.tracking import machine_tags

    tags = dict(machine_tags())
    engines = {
        (m.engine.model, m.engine.quantization)
        for spec in specs
        for m in spec.deployment.models.values()
    }
    for name, quantization in sorted(engines, key=lambda pair: (pair[0], pair[1] or "")):
        try:
            checksum = folder_checksum(served_model(name, quantization, prepare=False))
        except (FmtuneError, OSError) as error:
            logger.info("model %s (quantization %s): no checksum: %s", name, quantization, error)
            checksum = "unavailable"
        tags[f"fmtune.model.{_safe(served_folder_name(name, quantization))}"] = checksum
    tags["fmtune.models"] = ",".join(sorted({name for name, _ in engines}))
    return tags
