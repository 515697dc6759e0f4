"""A study's report: the Pareto front as CSV, plots, one HTML page with every trial.

The front is drawn from the table :func:`tuner.pareto.front_table` returns (``trial``,
``params.<knob>``..., one column per objective metric, ``feasible``, ``on_front``) and the
study's objectives, so the report shows exactly what the front computation saw. The page also
lists every trial (failed ones with their failure kind and reason), the SLA attainment of
each, links to the front trials' exported bundles and MLflow runs, a parallel-coordinates view
of knobs and objectives, and the hypervolume after each trial (:func:`write_study_report`
writes all of it). Front points that are statistically indistinguishable (every objective's
95% interval overlaps: :func:`tuner.pareto.indistinguishable_from`) are marked, and the rule
is stated on the page; a trial that reused an earlier trial's result (same knobs) is listed
among all trials with the trial it duplicates, never on the front.

The HTML page is self-contained (plots embedded as base64, CSS inline; the PNG files are also
written beside it) so it can be mailed or attached to an MLflow run and opened anywhere; its
only links are to the bundles folder beside it and to the MLflow UI. Every value in it is
HTML-escaped, since knob values and failure reasons are free text.
"""

from __future__ import annotations

import base64
import html
import itertools
import logging
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from optuna.trial import TrialState

from runtime.errors import ConfigError
from tuner import tracking
from tuner.pareto import (
    INDISTINGUISHABLE_RULE,
    INTERVAL_SUFFIX,
    Objective,
    duplicate_of,
    front_table,
    hypervolume,
    indistinguishable_from,
    is_feasible,
    objective_intervals,
    pareto_front,
    reference_point,
)

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

PARAM_PREFIX = "params."
SLA_ATTAINMENT = "sla_attainment"
"""The run metric shown beside the objectives: the share of requests that met the SLA."""
DUPLICATE_OF = "duplicate_of"
"""Column of :func:`trials_table`: the trial whose result a trial reused (same knobs)."""
INDISTINGUISHABLE = "indistinguishable_from"
"""Column of the front: the other front trials a front trial cannot be told apart from."""
INFO_COLUMNS = (
    "state", SLA_ATTAINMENT, "failure_kind", "failure_reason", DUPLICATE_OF, "mlflow_run_id",
)  # fmt: skip
"""Columns of :func:`trials_table` that are neither a knob nor an objective."""
_STATUS_COLUMNS = ("trial", "feasible", "on_front", INDISTINGUISHABLE, *INFO_COLUMNS)
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"
"""Where `fmtune ui` serves the MLflow UI by default."""
_ANNOTATE_AT_MOST = 25
"""Front points are labelled with their trial number when there are at most this many."""
_MISSING_Y = -0.14
"""Where the parallel-coordinates view puts an inactive knob or a failed trial's objective."""

_COLORS = {
    "trial": "#b0b0b0",
    "infeasible": "#d62728",
    "front": "#1f77b4",
    "failed": "#ff7f0e",
}


def _objective_columns(table: pd.DataFrame) -> list[str]:
    """The metric columns of a front table: neither ``trial``, a param, nor a status flag."""
    return [
        c for c in table.columns if c not in _STATUS_COLUMNS and not str(c).startswith(PARAM_PREFIX)
    ]


def _check_objectives(table: pd.DataFrame, objectives: Sequence[Objective]) -> None:
    """Every objective has a column in ``table``."""
    if not objectives:
        raise ConfigError("objectives must not be empty, got []")
    missing = [o.metric for o in objectives if o.metric not in table.columns]
    if missing:
        raise ConfigError(
            f"objectives {missing} have no column in the table; columns: {list(table.columns)}"
        )


def axis_label(objective: Objective) -> str:
    """``"<metric> ↓ minimize"`` or ``"<metric> ↑ maximize"``."""
    arrow = "↓" if objective.direction == "minimize" else "↑"
    return f"{objective.metric} {arrow} {objective.direction}"


def front_rows(table: pd.DataFrame, objectives: Sequence[Objective] | None = None) -> pd.DataFrame:
    """The rows on the front, sorted by the first objective (best first when it is given)."""
    front = table[table["on_front"].astype(bool)] if "on_front" in table else table.iloc[0:0]
    if objectives:
        first, ascending = objectives[0].metric, objectives[0].direction == "minimize"
    else:
        metrics = _objective_columns(table)
        first, ascending = (metrics[0], True) if metrics else ("trial", True)
    return front.sort_values([first, "trial"], ascending=[ascending, True], kind="stable")


def write_pareto_csv(
    table: pd.DataFrame, path: Path, objectives: Sequence[Objective] | None = None
) -> Path:
    """pareto.csv: the front rows only, sorted by the first objective; returns ``path``.

    Without ``objectives`` the first metric column is sorted ascending; with them, best first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    front_rows(table, objectives).to_csv(path, index=False)
    return path


# --- every trial ------------------------------------------------------------------------


def _number(value: Any) -> float:
    """A metric as a float; NaN when absent or not a number."""
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def trials_table(study: optuna.Study, objectives: Sequence[Objective]) -> pd.DataFrame:
    """One row per trial of every state, by number.

    Columns: ``trial``, ``state`` (optuna's, e.g. COMPLETE, FAIL, RUNNING), ``params.<knob>``
    (None where a knob was inactive or never sampled), one column per objective metric (NaN
    unless complete), ``sla_attainment`` (from the trial's measured metrics; absent when it is
    an objective already), ``feasible`` and ``on_front`` (False unless complete),
    ``failure_kind``, ``failure_reason``, ``duplicate_of`` (the trial whose result a trial
    reused instead of measuring the same knobs again) and ``mlflow_run_id`` (None where not
    set). The front is the one :func:`tuner.pareto.front_table` computes, so both tables
    agree.
    """
    from tuner.study import ATTR_FAILURE, ATTR_KIND, ATTR_METRICS, ATTR_RUN_ID

    complete = front_table(study, objectives)  # also checks objectives against the study
    front = set(complete.loc[complete["on_front"].astype(bool), "trial"].tolist())
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    param_names = [
        str(c).removeprefix(PARAM_PREFIX)
        for c in complete.columns
        if str(c).startswith(PARAM_PREFIX)
    ]
    for trial in trials:
        param_names.extend(p for p in trial.params if p not in param_names)
    metrics = [o.metric for o in objectives]
    extra_sla = SLA_ATTAINMENT not in metrics
    rows = []
    for trial in trials:
        done = trial.state == TrialState.COMPLETE and trial.values is not None
        measured = trial.user_attrs.get(ATTR_METRICS) or {}
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name}
        row.update({f"{PARAM_PREFIX}{p}": trial.params.get(p) for p in param_names})
        values = list(trial.values) if done else [math.nan] * len(metrics)
        row.update(zip(metrics, (float(v) for v in values), strict=True))
        if extra_sla:
            row[SLA_ATTAINMENT] = _number(measured.get(SLA_ATTAINMENT))
        row["feasible"] = bool(done and is_feasible(trial))
        row["on_front"] = trial.number in front
        row["failure_kind"] = trial.user_attrs.get(ATTR_KIND)
        row["failure_reason"] = trial.user_attrs.get(ATTR_FAILURE)
        row[DUPLICATE_OF] = duplicate_of(trial)
        row["mlflow_run_id"] = trial.user_attrs.get(ATTR_RUN_ID)
        rows.append(row)
    columns = [
        "trial", "state", *(f"{PARAM_PREFIX}{p}" for p in param_names), *metrics,
        *([SLA_ATTAINMENT] if extra_sla else []), "feasible", "on_front", "failure_kind",
        "failure_reason", DUPLICATE_OF, "mlflow_run_id",
    ]  # fmt: skip
    table = pd.DataFrame(rows, columns=columns)
    # trial numbers, None where measured (pandas would make them floats beside None)
    table[DUPLICATE_OF] = pd.Series([row[DUPLICATE_OF] for row in rows], dtype=object)
    return table


@dataclass(frozen=True)
class FrontDistinctions:
    """Which front points cannot be told apart, and on what evidence."""

    partners: dict[int, list[int]]
    """Front trial -> the other front trials it is indistinguishable from (by number)."""
    with_intervals: list[str]
    """The objectives at least one front trial has a 95% interval for."""

    def cell(self, trial: int) -> str:
        """The front table's cell: the partners, comma-separated (empty when none)."""
        return ", ".join(str(n) for n in self.partners.get(int(trial), []))

    def note(self) -> str:
        """The rule, the evidence and the outcome in words, for the report."""
        evidence = (
            f"Objectives with an interval here: {', '.join(self.with_intervals)}."
            if self.with_intervals
            else "No objective has an interval here."
        )
        pairs = sorted({tuple(sorted((a, b))) for a, bs in self.partners.items() for b in bs})
        found = (
            "Indistinguishable pairs: " + ", ".join(f"{a} and {b}" for a, b in pairs) + "."
            if pairs
            else "No two front points are indistinguishable."
        )
        return f"{INDISTINGUISHABLE_RULE} {evidence} {found}"


def front_distinctions(study: optuna.Study, objectives: Sequence[Objective]) -> FrontDistinctions:
    """The study's front points that are statistically indistinguishable
    (:func:`tuner.pareto.indistinguishable_from` on each front trial's stored intervals)."""
    from tuner.study import ATTR_METRICS

    intervals = {}
    with_intervals: list[str] = []
    for trial in pareto_front(study):
        assert trial.values is not None
        metrics = trial.user_attrs.get(ATTR_METRICS) or {}
        intervals[trial.number] = objective_intervals(trial.values, metrics, objectives)
        with_intervals += [
            o.metric
            for o in objectives
            if f"{o.metric}{INTERVAL_SUFFIX}" in metrics and o.metric not in with_intervals
        ]
    return FrontDistinctions(indistinguishable_from(intervals), with_intervals)


def _in_state(table: pd.DataFrame, state: TrialState) -> np.ndarray:
    """Rows of trials in ``state`` (a table without ``state``, a front table, has complete
    rows only)."""
    if "state" not in table:
        return np.full(len(table), state == TrialState.COMPLETE, dtype=bool)
    return (table["state"] == state.name).to_numpy()


def _failed(table: pd.DataFrame) -> np.ndarray:
    """Rows of failed trials."""
    return _in_state(table, TrialState.FAIL)


def _complete(table: pd.DataFrame) -> np.ndarray:
    """Rows of complete trials (the others, failed or still running, have no values)."""
    return _in_state(table, TrialState.COMPLETE)


# --- plots ------------------------------------------------------------------------------


def _numeric(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)


def _figure(width: float, height: float) -> Any:
    """A standalone Agg figure: needs no display, leaves pyplot's global state alone (safe
    from threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _label_front(ax: Any, xs: np.ndarray, ys: np.ndarray, trials: np.ndarray) -> None:
    """Each front point's trial number beside it (few points only: labels would pile up)."""
    if len(xs) > _ANNOTATE_AT_MOST:
        return
    for x, y, number in zip(xs, ys, trials, strict=True):
        ax.annotate(
            f"{int(number)}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7,
            color=_COLORS["front"],
        )  # fmt: skip


def _draw_pair(ax: Any, table: pd.DataFrame, x: Objective, y: Objective, connect: bool) -> None:
    """One scatter of objective ``y`` against ``x``: trials, infeasible, and the front.

    ``connect`` joins the front points by a line, which is the front itself only with two
    objectives; with more, the front is marked point by point (a projection of a 3-D front
    onto a plane is no curve, and some of its points look dominated there).
    """
    xs, ys = _numeric(table[x.metric]), _numeric(table[y.metric])
    feasible = table["feasible"].astype(bool).to_numpy()
    front = table["on_front"].astype(bool).to_numpy()
    ok = ~(np.isnan(xs) | np.isnan(ys))
    rest = ok & feasible & ~front
    ax.scatter(xs[rest], ys[rest], s=18, c=_COLORS["trial"], label="feasible trial")
    bad = ok & ~feasible
    if bad.any():
        ax.scatter(xs[bad], ys[bad], s=22, marker="x", c=_COLORS["infeasible"], label="infeasible")
    on = ok & front
    if on.any():
        if connect:
            order = np.argsort(xs[on], kind="stable")
            ax.plot(
                xs[on][order], ys[on][order], "-o", c=_COLORS["front"], ms=6, lw=1.2,
                label="Pareto front",
            )  # fmt: skip
        else:
            ax.scatter(
                xs[on], ys[on], s=48, c=_COLORS["front"], edgecolors="black", linewidths=0.6,
                zorder=3, label="Pareto-optimal (all objectives)",
            )  # fmt: skip
        _label_front(ax, xs[on], ys[on], _numeric(table["trial"])[on])
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    ax.grid(True, alpha=0.3)


def _draw_single(ax: Any, table: pd.DataFrame, objective: Objective) -> None:
    """One objective against trial number, with the best feasible value so far as a step."""
    from matplotlib.ticker import MaxNLocator

    trials = _numeric(table["trial"])
    values = _numeric(table[objective.metric])
    feasible = table["feasible"].astype(bool).to_numpy()
    front = table["on_front"].astype(bool).to_numpy()
    ok = ~np.isnan(values)
    rest = ok & feasible & ~front
    ax.scatter(trials[rest], values[rest], s=18, c=_COLORS["trial"], label="feasible trial")
    bad = ok & ~feasible
    if bad.any():
        ax.scatter(
            trials[bad], values[bad], s=22, marker="x", c=_COLORS["infeasible"], label="infeasible"
        )
    good = ok & feasible
    if good.any():
        order = np.argsort(trials[good], kind="stable")
        running = np.minimum if objective.direction == "minimize" else np.maximum
        best = running.accumulate(values[good][order])
        ax.step(
            trials[good][order],
            best,
            where="post",
            c=_COLORS["front"],
            lw=1.2,
            label="best so far",
        )
    on = ok & front
    if on.any():
        ax.scatter(trials[on], values[on], s=40, c=_COLORS["front"], label="best", zorder=3)
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(axis_label(objective))
    ax.grid(True, alpha=0.3)


def pareto_plot(table: pd.DataFrame, objectives: Sequence[Objective], path: Path) -> Path:
    """A PNG of every pair of objectives (one objective: value per trial); returns ``path``.

    Feasible trials are grey dots, infeasible ones red crosses, front points blue with their
    trial number. With exactly two objectives the front is drawn as a line; with three or
    more, each pair is a scatter with the front points marked and not connected, since a line
    through a projected 3-D front means nothing. Rows of trials that did not complete (a
    :func:`trials_table`) have no values and are left out.
    """
    return _save(pareto_figure(table, objectives), path)


def pareto_figure(table: pd.DataFrame, objectives: Sequence[Objective]) -> Any:
    """The matplotlib Figure :func:`pareto_plot` saves."""
    _check_objectives(table, objectives)
    table = table[_complete(table)]
    pairs = list(itertools.combinations(objectives, 2))
    panels = max(len(pairs), 1)
    ncols = min(panels, 3)
    nrows = math.ceil(panels / ncols)
    fig = _figure(5.0 * ncols, 4.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    if table.empty:
        axes[0].text(0.5, 0.5, "no complete trials", ha="center", va="center")
        axes[0].set_axis_off()
    elif len(objectives) == 1:
        _draw_single(axes[0], table, objectives[0])
    else:
        for ax, (x, y) in zip(axes, pairs, strict=False):
            _draw_pair(ax, table, x, y, connect=len(objectives) == 2)
    if not table.empty:
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            axes[0].legend(handles, labels, fontsize="small", loc="best")
    title = f"{len(table)} complete trials, {int(table['on_front'].sum())} on the front"
    if len(objectives) > 2:
        title += (
            f"\nfront points are non-dominated in all {len(objectives)} objectives; "
            "in one pair some of them may look dominated"
        )
    fig.suptitle(title)
    return fig


def _ticks_of_numbers(values: np.ndarray, flip: bool) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """Numbers scaled to [0, 1] (log scale when positive and spread over 20x or more; flipped
    so that the smallest is at the top when ``flip``) and their axis ticks."""
    present = values[~np.isnan(values)]
    if present.size == 0:
        return np.full(values.shape, np.nan), []
    low, high = float(present.min()), float(present.max())
    log = low > 0 and high / low >= 20
    transform = np.log10 if log else (lambda v: v)
    t_low, t_high = transform(low), transform(high)
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = (
            (transform(values) - t_low) / (t_high - t_low)
            if t_high > t_low
            else np.where(np.isnan(values), np.nan, 0.5)
        )
    if flip:
        scaled = 1.0 - scaled
    distinct = np.unique(present)
    shown = distinct if distinct.size <= 6 else np.array([low, high])
    ticks = []
    for value in shown:
        position = (transform(value) - t_low) / (t_high - t_low) if t_high > t_low else 0.5
        ticks.append((1.0 - position if flip else position, f"{value:.4g}"))
    return scaled, ticks


def _knob_axis(series: pd.Series) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """A knob's values on a [0, 1] axis: numbers scaled, anything else as evenly spaced
    categories; an inactive knob (None) at the 'inactive' mark below the axis."""
    present = series.dropna()
    numeric = pd.to_numeric(present, errors="coerce")
    is_number = (
        not present.empty
        and not numeric.isna().any()
        and not any(isinstance(v, bool | np.bool_) for v in present)
    )
    ticks: list[tuple[float, str]]
    if is_number:
        scaled, ticks = _ticks_of_numbers(_numeric(series), flip=False)
    else:
        categories = sorted({str(v) for v in present})
        spots = np.linspace(0.0, 1.0, len(categories)) if len(categories) > 1 else [0.5]
        where = dict(zip(categories, spots, strict=True))
        scaled = np.array([np.nan if _absent(v) else where[str(v)] for v in series], dtype=float)
        ticks = [(float(where[c]), c) for c in categories]
    if series.map(_absent).any():
        ticks.append((_MISSING_Y, "inactive"))
    return np.where(np.isnan(scaled), _MISSING_Y, scaled), ticks


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _objective_axis(
    series: pd.Series, objective: Objective
) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """An objective on a [0, 1] axis with the best value at the top; trials without a value
    (failed) at the 'no value' mark below the axis."""
    scaled, ticks = _ticks_of_numbers(_numeric(series), flip=objective.direction == "minimize")
    if np.isnan(scaled).any():
        ticks.append((_MISSING_Y, "no value"))
    return np.where(np.isnan(scaled), _MISSING_Y, scaled), ticks


def parallel_plot(trials: pd.DataFrame, objectives: Sequence[Objective], path: Path) -> Path:
    """A parallel-coordinates PNG of every trial: one vertical axis per knob, then one per
    objective (best at the top); returns ``path``.

    Each trial is a line across the axes: the front blue and thick, other feasible trials
    grey, infeasible ones red and dashed, failed ones orange and dotted (their objectives at
    'no value' below the axes). Categorical knobs are evenly spaced categories, numeric ones
    scaled (log scale when spread over 20x); an inactive conditional knob sits at 'inactive'.
    """
    from matplotlib.lines import Line2D

    _check_objectives(trials, objectives)
    knobs = [c for c in trials.columns if str(c).startswith(PARAM_PREFIX)]
    columns = [*knobs, *(o.metric for o in objectives)]
    fig = _figure(max(8.0, 1.45 * len(columns) + 1.5), 5.6)
    ax = fig.subplots()
    if trials.empty:
        ax.text(0.5, 0.5, "no trials", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)
    scales = [_knob_axis(trials[c]) for c in knobs]
    scales += [_objective_axis(trials[o.metric], o) for o in objectives]
    ys = np.column_stack([scaled for scaled, _ in scales])
    xs = np.arange(len(columns), dtype=float)
    failed, complete = _failed(trials), _complete(trials)  # running trials are left out
    feasible = trials["feasible"].astype(bool).to_numpy() & complete
    front = trials["on_front"].astype(bool).to_numpy() & complete
    kinds = [
        ("failed", failed, {"color": _COLORS["failed"], "ls": ":", "lw": 1.0, "alpha": 0.8}),
        ("infeasible", complete & ~feasible,
         {"color": _COLORS["infeasible"], "ls": "--", "lw": 0.9, "alpha": 0.7}),
        ("feasible", feasible & ~front, {"color": _COLORS["trial"], "lw": 1.0, "alpha": 0.8}),
        ("Pareto front", front, {"color": _COLORS["front"], "lw": 2.2, "alpha": 0.95}),
    ]  # fmt: skip
    handles = []
    for label, rows, style in kinds:
        for row in ys[rows]:
            ax.plot(xs, row, **style)
        if rows.any():
            handles.append(Line2D([], [], label=f"{label} ({int(rows.sum())})", **style))
    for x, (_, ticks) in zip(xs, scales, strict=True):
        ax.axvline(x, color="#444444", lw=0.8, zorder=0)
        for y, text in ticks:
            ax.text(
                x + 0.04, y, text, fontsize=7, va="center", ha="left",
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7},
            )  # fmt: skip
    names = [str(c).removeprefix(PARAM_PREFIX) for c in knobs]
    names += [f"{axis_label(o)}\n(best at top)" for o in objectives]
    ax.set_xticks(xs, labels=names, rotation=25, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(columns) - 0.4)
    ax.set_ylim(_MISSING_Y - 0.06, 1.06)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.legend(
        handles=handles,
        fontsize="small",
        loc="upper center",
        ncols=len(handles),
        bbox_to_anchor=(0.5, 1.12),
        frameon=False,
    )
    fig.suptitle(f"Every trial across its knobs and objectives ({len(trials)} trials)")
    return _save(fig, path)


def hypervolume_history(trials: pd.DataFrame, objectives: Sequence[Objective]) -> pd.DataFrame:
    """After each trial (by number), the hypervolume of the feasible complete trials up to it.

    One reference point for the whole history, from all feasible complete trials
    (:func:`tuner.pareto.reference_point`: the worst values pushed 10% further out), so the
    values are comparable from trial to trial and the last one is the study's hypervolume.
    With one objective the value is the best feasible value so far instead. Columns:
    ``trial``, ``hypervolume`` (NaN before the first feasible trial). Empty when no trial is
    feasible.
    """
    metrics = [o.metric for o in objectives]
    directions = [o.direction for o in objectives]
    ordered = trials.sort_values("trial", kind="stable")
    values = ordered[metrics].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    usable = (
        ordered["feasible"].astype(bool).to_numpy()
        & _complete(ordered)
        & ~np.isnan(values).any(axis=1)
    )
    if not usable.any():
        return pd.DataFrame(columns=["trial", "hypervolume"])
    reference = reference_point(values[usable], directions) if len(metrics) > 1 else None
    better = np.minimum if directions[0] == "minimize" else np.maximum
    history: list[float] = []
    seen: list[list[float]] = []
    current = math.nan
    for point, ok in zip(values, usable, strict=True):
        if ok:
            if reference is None:
                current = point[0] if math.isnan(current) else float(better(current, point[0]))
            else:
                seen.append(point.tolist())
                current = hypervolume(seen, reference, directions)
        history.append(current)
    return pd.DataFrame({"trial": ordered["trial"].to_numpy(), "hypervolume": history})


def hypervolume_plot(trials: pd.DataFrame, objectives: Sequence[Objective], path: Path) -> Path:
    """A PNG of :func:`hypervolume_history` as a step over trial numbers; returns ``path``.

    Trials that raised it are dots; failed and infeasible trials are ticks along the bottom,
    so a stretch of failures shows where the search stalled.
    """
    from matplotlib.ticker import MaxNLocator

    _check_objectives(trials, objectives)
    history = hypervolume_history(trials, objectives)
    fig = _figure(8.0, 4.0)
    ax = fig.subplots()
    single = len(objectives) == 1
    if history.empty or history["hypervolume"].isna().all():
        ax.text(0.5, 0.5, "no feasible complete trial yet", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)
    numbers = history["trial"].to_numpy(dtype=float)
    values = history["hypervolume"].to_numpy(dtype=float)
    ax.step(
        numbers,
        values,
        where="post",
        c=_COLORS["front"],
        lw=1.5,
        label="best so far" if single else "hypervolume so far",
    )
    previous = np.concatenate([[np.nan], values[:-1]])
    raised = ~np.isnan(values) & ((values != previous) | np.isnan(previous))
    ax.scatter(
        numbers[raised],
        values[raised],
        s=22,
        c=_COLORS["front"],
        zorder=3,
        label="trial that improved it",
    )
    failed = _failed(trials)
    infeasible = _complete(trials) & ~trials["feasible"].astype(bool).to_numpy()
    for label, rows in (("failed trial", failed), ("infeasible trial", infeasible)):
        if rows.any():
            kind = "failed" if label.startswith("failed") else "infeasible"
            ax.plot(
                _numeric(trials["trial"])[rows], np.zeros(int(rows.sum())), "|", ms=12, mew=1.5,
                c=_COLORS[kind], label=label, transform=ax.get_xaxis_transform(),
            )  # fmt: skip
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if single:
        ax.set_ylabel(f"best feasible {axis_label(objectives[0])}")
        fig.suptitle("Best feasible value after each trial")
    else:
        ax.set_ylabel("hypervolume (product of objective units)")
        fig.suptitle(
            "Hypervolume of the feasible trials after each trial\n"
            f"({', '.join(axis_label(o) for o in objectives)})",
            fontsize="medium",
        )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)


# --- HTML -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MlflowLinks:
    """Where a study's MLflow runs are seen: the MLflow UI and the study's experiment id.

    Without the experiment id (no tracking, or the store could not be read) the report shows
    each trial's run id as text instead of a link.
    """

    experiment_id: str | None = None
    ui_url: str = DEFAULT_MLFLOW_UI

    def experiment_url(self) -> str | None:
        """The experiment's page in the MLflow UI."""
        if not self.experiment_id:
            return None
        return tracking.ui_url(self.ui_url, self.experiment_id)

    def run_url(self, run_id: str) -> str | None:
        """A run's page in the MLflow UI."""
        if not self.experiment_id:
            return None
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"


def _cell(value: Any) -> str:
    """A table cell's text: floats to 6 significant digits, None and NaN empty."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else f"{float(value):.6g}"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    return str(value)


def _html_table(
    table: pd.DataFrame,
    objectives: Sequence[Objective],
    extra: Sequence[tuple[str, Sequence[str]]] = (),
) -> str:
    """An escaped HTML table; params shown by knob name, objectives with their arrows.

    ``extra`` adds columns of ready-made HTML (links), one cell per row of ``table``. Rows
    are classed ``front``, ``infeasible`` or ``failed`` for the style sheet.
    """
    labels = {o.metric: axis_label(o) for o in objectives}
    headers = [labels.get(str(c), str(c).removeprefix(PARAM_PREFIX)) for c in table.columns]
    headers += [header for header, _ in extra]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    front = table["on_front"].astype(bool).to_numpy() if "on_front" in table else None
    feasible = table["feasible"].astype(bool).to_numpy() if "feasible" in table else None
    failed, complete = _failed(table), _complete(table)
    body = []
    for index, row in enumerate(table.itertuples(index=False, name=None)):
        cells = "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row)
        cells += "".join(f"<td>{cells_of[index]}</td>" for _, cells_of in extra)
        kind = ""
        if front is not None and front[index]:
            kind = "front"
        elif failed[index]:
            kind = "failed"
        elif complete[index] and feasible is not None and not feasible[index]:
            kind = "infeasible"
        attrs = f' class="{kind}"' if kind else ""
        body.append(f"<tr{attrs}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def predictions_table(study: optuna.Study) -> pd.DataFrame:
    """Per trial that measured a simulated prediction (a `multi` study's confirmations) and
    per fidelity metric: the simulator's prediction, the measurement and the absolute error
    in percent of the measurement (None where no relative error exists). No rows when no
    trial carries a prediction."""
    from tuner.study import ATTR_METRICS, ATTR_PREDICTED, ATTR_PREDICTION_ERRORS

    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        errors = trial.user_attrs.get(ATTR_PREDICTION_ERRORS)
        if not errors:
            continue
        predicted = trial.user_attrs.get(ATTR_PREDICTED) or {}
        measured = trial.user_attrs.get(ATTR_METRICS) or {}
        for metric, error in errors.items():
            rows.append(
                {
                    "trial": trial.number,
                    "metric": metric,
                    "predicted": predicted.get(metric),
                    "measured": measured.get(metric),
                    "error_pct": error,
                }
            )
    return pd.DataFrame(rows, columns=["trial", "metric", "predicted", "measured", "error_pct"])


def _predictions_html(predictions: pd.DataFrame) -> str:
    """The predicted-vs-measured section: the median and worst error per metric, then every
    confirmed trial's values. Empty without predictions."""
    if predictions.empty:
        return ""
    trials = predictions["trial"].nunique()
    errors = predictions.dropna(subset=["error_pct"]).groupby("metric", sort=False)["error_pct"]
    summary = pd.DataFrame(
        {"median error %": errors.median(), "worst error %": errors.max(), "trials": errors.size()}
    ).reset_index()

    def table(frame: pd.DataFrame) -> str:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
            for row in frame.itertuples(index=False, name=None)
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    return (
        f"<h2>Predicted vs measured ({trials} confirmed trials)</h2>\n"
        "<p>The simulator's prediction of each configuration the study measured, and its "
        "absolute error in percent of the measurement.</p>\n"
        f"{table(summary)}\n{table(predictions)}\n"
    )


def _link(url: str | None, text: str, title: str = "") -> str:
    """An escaped link (plain escaped text without a URL)."""
    if url is None:
        return html.escape(text)
    hint = f' title="{html.escape(title)}"' if title else ""
    return f'<a href="{html.escape(url)}"{hint}>{html.escape(text)}</a>'


def bundle_folder(bundles_dir: Path, trial: int) -> Path:
    """Where `fmtune export` writes a trial's bundle."""
    return Path(bundles_dir) / f"trial-{int(trial):04d}"


def _bundle_cell(report_dir: Path, bundles_dir: Path | None, trial: int) -> str:
    """A relative link to the trial's exported bundle when its folder exists."""
    if bundles_dir is None:
        return ""
    folder = bundle_folder(bundles_dir, trial)
    if not folder.is_dir():
        return html.escape("not exported")
    relative = Path(os.path.relpath(folder, report_dir)).as_posix() + "/"
    return _link(relative, folder.name, title=str(folder))


def _run_cell(mlflow: MlflowLinks | None, run_id: Any) -> str:
    """A link to the trial's MLflow run, or its id when the experiment is not known."""
    if not isinstance(run_id, str) or not run_id:
        return ""
    url = mlflow.run_url(run_id) if mlflow is not None else None
    return _link(url, run_id[:12] if url else run_id, title=f"MLflow run {run_id}")


def _outcome_first(table: pd.DataFrame, objectives: Sequence[Objective]) -> pd.DataFrame:
    """The columns people read first first: trial, state, objectives, SLA, flags, failure,
    then the knobs (the MLflow run id becomes a link column of its own)."""
    metrics = [o.metric for o in objectives]
    first = [
        "trial",
        "state",
        *metrics,
        SLA_ATTAINMENT,
        "feasible",
        "on_front",
        INDISTINGUISHABLE,
        "failure_kind",
        "failure_reason",
        DUPLICATE_OF,
    ]
    ordered = [c for c in first if c in table.columns]
    ordered += [c for c in table.columns if str(c).startswith(PARAM_PREFIX)]
    return table[ordered]


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td { max-width: 32em; overflow-wrap: anywhere; }
th { background: #f3f3f3; }
tr.front td { background: #eaf2fb; }
tr.infeasible td { background: #fdf0f0; }
tr.failed td { background: #fff4e6; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: bold; }
dd { margin: 0; }
img { max-width: 100%; }
figure { margin: 1.5em 0; }
figcaption { color: #555; font-size: 0.9em; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _embedded(path: Path, alt: str) -> str:
    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def write_report_html(
    path: Path,
    *,
    title: str,
    summary: Mapping[str, Any],
    table: pd.DataFrame,
    objectives: Sequence[Objective],
    plot_path: Path | None,
    trials: pd.DataFrame | None = None,
    images: Sequence[tuple[str, Path]] = (),
    bundles_dir: Path | None = None,
    mlflow: MlflowLinks | None = None,
    notes: Sequence[str] = (),
    front_notes: Sequence[str] = (),
    predictions: pd.DataFrame | None = None,
) -> Path:
    """report.html: summary, plots (embedded), front table and all trials; returns ``path``.

    ``table`` is the front table of the complete trials. With ``trials`` (a
    :func:`trials_table`) the front also shows SLA attainment and links to each trial's
    bundle (under ``bundles_dir``, relative to the page, once exported) and MLflow run, and
    the last section lists every trial, failed ones with their failure kind and reason.
    ``images`` are (caption, PNG) shown after the Pareto plot; ``notes`` are plain-text lines
    under the summary, ``front_notes`` under the front's heading (e.g. which front points are
    indistinguishable, and by what rule). ``predictions`` (a :func:`predictions_table`) adds
    the predicted-vs-measured section of a `multi` study after the front. Self-contained: no
    external scripts, styles or images (the links point at the bundles beside it and the
    MLflow UI). Every text is escaped.
    """
    _check_objectives(table, objectives)
    report_dir = Path(path).resolve().parent
    summary_items = "".join(
        f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(_cell(v))}</dd>"
        for k, v in summary.items()
    )
    if mlflow is not None and mlflow.experiment_url() is not None:
        link = _link(mlflow.experiment_url(), f"experiment {mlflow.experiment_id}")
        summary_items += f"<dt>MLflow</dt><dd>{link}</dd>"
    figures = []
    if plot_path is not None:
        figures.append(_embedded(Path(plot_path), "Pareto plot"))
    for caption, image in images:
        figures.append(
            f"<figure>{_embedded(Path(image), caption)}"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    notes_html = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    front_notes_html = "".join(f"<p>{html.escape(n)}</p>" for n in front_notes)
    if trials is None:
        front = front_rows(table, objectives)
        front_html = _html_table(front, objectives)
        all_trials = table.sort_values("trial", kind="stable") if "trial" in table else table
        rest_title = f"All complete trials ({len(all_trials)})"
        rest_html = _html_table(all_trials, objectives)
    else:
        front = front_rows(trials, objectives)
        front_view = _outcome_first(front, objectives).drop(
            columns=["state", "feasible", "on_front", "failure_kind", "failure_reason",
                     DUPLICATE_OF],
            errors="ignore",
        )  # fmt: skip
        links: list[tuple[str, Sequence[str]]] = []
        if bundles_dir is not None:
            links.append(
                ("bundle", [_bundle_cell(report_dir, bundles_dir, n) for n in front["trial"]])
            )
        links.append(("MLflow run", [_run_cell(mlflow, r) for r in front["mlflow_run_id"]]))
        front_html = _html_table(front_view, objectives, links)
        ordered = trials.sort_values("trial", kind="stable")
        runs = [_run_cell(mlflow, r) for r in ordered["mlflow_run_id"]]
        rest_title = f"All trials ({len(ordered)}, {int(_failed(ordered).sum())} failed)"
        rest_html = _html_table(
            _outcome_first(ordered, objectives).drop(columns=[INDISTINGUISHABLE], errors="ignore"),
            objectives,
            [("MLflow run", runs)],
        )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Summary</h2>
<dl>{summary_items}</dl>
{notes_html}
<h2>Objectives</h2>
<p>{html.escape(", ".join(axis_label(o) for o in objectives))}</p>
{"".join(figures)}
<h2>Pareto front ({len(front)} trials)</h2>
{front_notes_html}
{front_html}
{_predictions_html(predictions if predictions is not None else pd.DataFrame())}
<h2>{html.escape(rest_title)}</h2>
{rest_html}
</body>
</html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# --- the whole report -------------------------------------------------------------------


@dataclass(frozen=True)
class StudyReport:
    """The files of a study's report, all in one folder."""

    csv: Path
    pareto_png: Path
    parallel_png: Path
    hypervolume_png: Path
    html: Path
    trials: pd.DataFrame = field(repr=False)
    """The :func:`trials_table` the report was drawn from."""

    def files(self) -> dict[str, Path]:
        """File name -> path, e.g. to log them as artifacts."""
        paths = (self.csv, self.pareto_png, self.parallel_png, self.hypervolume_png, self.html)
        return {p.name: p for p in paths}


def write_study_report(
    study: optuna.Study,
    objectives: Sequence[Objective],
    out: Path,
    *,
    summary: Mapping[str, Any],
    title: str | None = None,
    bundles_dir: Path | None = None,
    mlflow: MlflowLinks | None = None,
) -> StudyReport:
    """pareto.csv, pareto.png, parallel.png, hypervolume.png and report.html in ``out``.

    ``bundles_dir`` is where `fmtune export` writes (or will write) the front's bundles:
    the page links each front trial's folder relative to itself once it exists, and says how
    to export them otherwise. pareto.csv holds the front rows, best first by the first
    objective, with their SLA attainment, MLflow run id and the front trials each is
    statistically indistinguishable from (the page states the rule).
    """
    out = Path(out)
    table = front_table(study, objectives)
    trials = trials_table(study, objectives)
    distinctions = front_distinctions(study, objectives)
    for frame in (table, trials):
        frame[INDISTINGUISHABLE] = [
            distinctions.cell(n) if on else None
            for n, on in zip(frame["trial"], frame["on_front"].astype(bool), strict=True)
        ]
    extra = [c for c in (SLA_ATTAINMENT, "mlflow_run_id") if c in trials and c not in table]
    csv_table = table.merge(trials[["trial", *extra]], on="trial", how="left")
    csv = write_pareto_csv(csv_table, out / "pareto.csv", objectives)
    pareto_png = pareto_plot(table, objectives, out / "pareto.png")
    parallel_png = parallel_plot(trials, objectives, out / "parallel.png")
    hypervolume_png = hypervolume_plot(trials, objectives, out / "hypervolume.png")
    notes = []
    if bundles_dir is not None and not any(
        bundle_folder(bundles_dir, n).is_dir() for n in pareto_front_numbers(study)
    ):
        command = shlex.join(
            ["fmtune", "export", "--study", study.study_name, "--out", str(bundles_dir)]
        )
        notes.append(f"Deploy bundles of the front: not exported yet; {command} writes them.")
    page = write_report_html(
        out / "report.html",
        title=title or f"fmtune study {study.study_name}",
        summary=summary,
        table=table,
        objectives=objectives,
        plot_path=pareto_png,
        trials=trials,
        images=[
            ("Parallel coordinates: every trial across its knobs and objectives", parallel_png),
            ("Hypervolume after each trial", hypervolume_png),
        ],
        bundles_dir=bundles_dir,
        mlflow=mlflow,
        notes=notes,
        front_notes=[distinctions.note()] if distinctions.partners else [],
        predictions=predictions_table(study),
    )
    return StudyReport(csv, pareto_png, parallel_png, hypervolume_png, page, trials)


def pareto_front_numbers(study: optuna.Study) -> list[int]:
    """The trial numbers on the study's front."""
    return [t.number for t in pareto_front(study)]
