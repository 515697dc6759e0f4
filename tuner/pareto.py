"""Pareto fronts and hypervolume of tuning studies.

The front is what fmtune hands to people: the deployments no other feasible deployment beats
on every objective. Non-dominated sorting and the hypervolume indicator come from pymoo
(``NonDominatedSorting``, ``HV``, both backed by moocore), not from code written here; this
module only turns optuna studies into the minimization matrices those functions expect
(maximized objectives are negated) and drops trials that are failed or infeasible.

A trial is infeasible when any of its optuna constraint values is > 0 (optuna's convention:
``trial.set_constraint(name, value)`` or a sampler's ``constraints_func``, stored in the
trial's system attrs under ``"constraints"``).

A knob set stands on the front once: a trial recorded as a duplicate of an earlier one
(user attr ``fmtune.duplicate_of``, set by the study instead of measuring the knobs again),
and a complete trial with the same params as an earlier complete one (two workers that
measured the same knobs at the same time), are left out; the earliest trial stands for them.

Front points can be too close to tell apart: :func:`indistinguishable_from` pairs those
whose every objective's 95% interval overlaps the other's (the rule the report states).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import optuna
import pandas as pd
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

Direction = Literal["minimize", "maximize"]

ATTR_DUPLICATE_OF = "fmtune.duplicate_of"
"""User attribute of a trial the study did not measure because an earlier complete trial had
the same knobs: that trial's number (the duplicate carries its values and constraints)."""
INTERVAL_SUFFIX = "_ci95"
"""A metric's 95% bootstrap interval is stored beside it as ``<metric>_ci95`` = [low, high]
(e.g. ``quality_ci95``, see runtime.metrics.RunMetrics)."""

Interval = tuple[float, float]
"""A closed interval [low, high] of an objective's value."""


class Objective(BaseModel):
    """One objective of a study: which metric, and which way is better."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = Field(min_length=1, description="Metric name, e.g. 'p95_latency_s'.")
    direction: Direction = Field(description="Whether smaller or larger values are better.")


DirectionLike = Direction | StudyDirection | Objective
"""A direction given as a string, optuna's enum, or an :class:`Objective`."""


def _signs(directions: Sequence[DirectionLike]) -> np.ndarray:
    """+1 for minimize, -1 for maximize, so that ``values * signs`` is to be minimized."""
    signs = []
    for i, d in enumerate(directions):
        if isinstance(d, Objective):
            d = d.direction
        if d in ("minimize", StudyDirection.MINIMIZE):
            signs.append(1.0)
        elif d in ("maximize", StudyDirection.MAXIMIZE):
            signs.append(-1.0)
        else:
            raise ValueError(f"directions[{i}]: must be 'minimize' or 'maximize', got {d!r}")
    return np.asarray(signs)


def _as_matrix(
    points: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[DirectionLike]
) -> np.ndarray:
    """Points as an (n, m) float array in minimization form; checks shapes against directions."""
    signs = _signs(directions)
    arr = np.asarray(points, dtype=float)
    if arr.size == 0:
        return np.empty((0, len(signs)))
    if arr.ndim != 2 or arr.shape[1] != len(signs):
        raise ValueError(
            f"points: expected shape (n, {len(signs)}) for {len(signs)} directions, got {arr.shape}"
        )
    return arr * signs


def trial_constraints(trial: FrozenTrial) -> list[float]:
    """The optuna constraint values of ``trial`` (empty when it has none)."""
    named = getattr(trial, "constraints", None)  # optuna >= 5: named and legacy list
    if isinstance(named, dict):
        return [float(v) for v in named.values()]
    return [float(v) for v in trial.system_attrs.get("constraints", ())]  # optuna 4


def is_feasible(trial: FrozenTrial) -> bool:
    """Whether every constraint value of ``trial`` is <= 0 (true when it has none)."""
    return all(v <= 0.0 for v in trial_constraints(trial))


def duplicate_of(trial: FrozenTrial) -> int | None:
    """The number of the earlier trial whose result ``trial`` reuses, or None when it was
    measured itself."""
    number = trial.user_attrs.get(ATTR_DUPLICATE_OF)
    return int(number) if number is not None else None


def _params_key(trial: FrozenTrial) -> str:
    return json.dumps(sorted(trial.params.items()), default=str)


def _candidates(study: optuna.Study) -> list[FrozenTrial]:
    """Complete, feasible trials of ``study``, by trial number, each knob set once: the
    earliest complete trial of a knob set stands for its duplicates and twins."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    seen: set[str] = set()
    originals = []
    for trial in sorted(trials, key=lambda t: t.number):
        key = _params_key(trial)
        if duplicate_of(trial) is None and key not in seen:
            originals.append(trial)
        seen.add(key)
    return [t for t in originals if is_feasible(t)]


def _front_mask(trials: Sequence[FrozenTrial], directions: Sequence[DirectionLike]) -> np.ndarray:
    """Boolean mask of the non-dominated ``trials`` (pymoo's non-dominated sorting)."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    mask = np.zeros(len(trials), dtype=bool)
    if not trials:
        return mask
    if len(directions) == 1:
        losses = _as_matrix([t.values for t in trials], directions)[:, 0]
        mask[int(np.argmin(losses))] = True  # first of equal bests: lowest trial number
        return mask
    losses = _as_matrix([t.values for t in trials], directions)
    mask[NonDominatedSorting().do(losses, only_non_dominated_front=True)] = True
    return mask


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The non-dominated complete feasible trials of ``study``, by trial number.

    For a single-objective study this is the one best feasible trial (the earliest on ties).
    Trials with equal objective values but different knobs are all kept; a knob set is there
    once (duplicates and twins of a trial are left out). Empty when nothing is feasible.
    """
    trials = _candidates(study)
    mask = _front_mask(trials, study.directions)
    return [t for t, on in zip(trials, mask, strict=True) if on]


def hypervolume(
    points: Sequence[Sequence[float]] | np.ndarray,
    reference_point: Sequence[float],
    directions: Sequence[DirectionLike],
) -> float:
    """Hypervolume dominated by ``points`` and bounded by ``reference_point`` (pymoo's HV).

    Points and reference are in the objectives' own units; maximized objectives are negated
    before computing. Points not strictly better than the reference add nothing.
    """
    from pymoo.indicators.hv import HV

    losses = _as_matrix(points, directions)
    ref = np.asarray(reference_point, dtype=float)
    if ref.shape != (losses.shape[1],):
        raise ValueError(f"reference_point: expected {losses.shape[1]} values, got {ref.tolist()}")
    if len(losses) == 0:
        return 0.0
    return float(HV(ref_point=ref * _signs(directions))(losses))


def reference_point(
    points: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[DirectionLike]
) -> list[float]:
    """The worst value per objective pushed 10% further out, in the objectives' own units.

    The margin is 10% of the objective's range over ``points``; when the range is zero it is
    10% of the worst value's magnitude, and 0.1 when that is zero too. The margin keeps the
    extreme points of a front contributing to the hypervolume.
    """
    losses = _as_matrix(points, directions)
    if len(losses) == 0:
        raise ValueError("points: need at least one point to derive a reference point")
    worst, best = losses.max(axis=0), losses.min(axis=0)
    span = worst - best
    scale = np.where(span > 0, span, np.where(np.abs(worst) > 0, np.abs(worst), 1.0))
    return [float(v) for v in (worst + 0.1 * scale) * _signs(directions)]


def front_table(study: optuna.Study, objectives: Sequence[Objective]) -> pd.DataFrame:
    """One row per complete trial: number, params, objective values, feasible, on_front.

    Columns: ``trial``, ``params.<knob>`` (None where a conditional knob was inactive), one
    column per objective metric, ``feasible`` and ``on_front``. ``objectives`` must match the
    study's directions one by one.
    """
    directions = study.directions
    if len(objectives) != len(directions):
        raise ValueError(
            f"objectives: study has {len(directions)} objectives, got {len(objectives)}: "
            f"{[o.metric for o in objectives]}"
        )
    for objective, direction in zip(objectives, directions, strict=True):
        if _signs([objective])[0] != _signs([direction])[0]:
            raise ValueError(
                f"objective {objective.metric!r}: direction {objective.direction!r} does not "
                f"match the study's {direction.name.lower()!r}"
            )
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    feasible = [is_feasible(t) for t in trials]
    front = {t.number for t in pareto_front(study)}
    param_names: list[str] = []
    for t in trials:
        param_names.extend(p for p in t.params if p not in param_names)
    metrics = [o.metric for o in objectives]
    rows = []
    for t, ok in zip(trials, feasible, strict=True):
        row: dict[str, object] = {"trial": t.number}
        row.update({f"params.{p}": t.params.get(p) for p in param_names})
        row.update(dict(zip(metrics, t.values, strict=True)))
        row.update(feasible=ok, on_front=t.number in front)
        rows.append(row)
    columns = ["trial", *(f"params.{p}" for p in param_names), *metrics, "feasible", "on_front"]
    return pd.DataFrame(rows, columns=columns)


# --- indistinguishable front points -----------------------------------------------------


INDISTINGUISHABLE_RULE = (
    "Two front points are statistically indistinguishable when, for every objective, their "
    "95% bootstrap intervals overlap. An objective measured without an interval (only "
    "those with a stored <metric>_ci95 have one) counts as its value alone, so it tells two "
    "points apart unless their values are equal."
)
"""The rule :func:`indistinguishable_from` applies, in words, for reports."""


def objective_intervals(
    values: Sequence[float], metrics: Mapping[str, Any], objectives: Sequence[Objective]
) -> list[Interval]:
    """Each objective's 95% interval: ``metrics["<metric>_ci95"]`` when it is a pair of
    finite numbers (widened to hold the value itself), else the value alone [v, v]."""
    if len(values) != len(objectives):
        raise ValueError(f"values: expected {len(objectives)} values, got {list(values)}")
    intervals = []
    for value, objective in zip(values, objectives, strict=True):
        value = float(value)
        stored = metrics.get(f"{objective.metric}{INTERVAL_SUFFIX}")
        bounds: list[float] = []
        if isinstance(stored, list | tuple) and len(stored) == 2:
            try:
                bounds = [float(b) for b in stored]
            except (TypeError, ValueError):
                bounds = []
        if len(bounds) == 2 and all(math.isfinite(b) for b in bounds):
            intervals.append((min(*bounds, value), max(*bounds, value)))
        else:
            intervals.append((value, value))
    return intervals


def overlaps(a: Interval, b: Interval) -> bool:
    """Whether two closed intervals share a point."""
    return a[0] <= b[1] and b[0] <= a[1]


def indistinguishable_from(intervals: Mapping[int, Sequence[Interval]]) -> dict[int, list[int]]:
    """For each point (trial number -> its objectives' intervals), the other points it cannot
    be told apart from: every objective's interval overlaps (:data:`INDISTINGUISHABLE_RULE`).

    Pure; the relation is symmetric but not transitive (a ~ b and b ~ c need not give a ~ c),
    so each point lists its own partners, by number; a point with none maps to [].
    """
    numbers = sorted(intervals)
    widths = {len(intervals[n]) for n in numbers}
    if len(widths) > 1:
        raise ValueError(f"intervals: every point needs the same objectives, got sizes {widths}")
    partners: dict[int, list[int]] = {n: [] for n in numbers}
    for i, a in enumerate(numbers):
        for b in numbers[i + 1 :]:
            if all(overlaps(x, y) for x, y in zip(intervals[a], intervals[b], strict=True)):
                partners[a].append(b)
                partners[b].append(a)
    return partners
