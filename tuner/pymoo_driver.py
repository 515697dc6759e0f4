"""pymoo's NSGA-II driven through its ask/tell interface, on the same optuna storage.

pymoo proposes points in [0, 1]^d (one coordinate per knob); each is decoded into knob values
(categorical by index, int and float by their range, log scale where the knob says so,
inactive conditional knobs dropped) and enqueued into the optuna study, so every trial is
stored, tracked and exported exactly like an optuna-sampled one. Results flow back to pymoo
one individual at a time; when a whole generation is told, pymoo builds the next.

Failed trials are told as infeasible (constraint violation 1) with the worst objective
values seen, so the algorithm steers away from them. One worker drives a pymoo study: its
population lives in this process (a resumed study starts a fresh population).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np
import optuna

from tuner.experiment import TuneSpec
from tuner.space import CategoricalKnob, FloatKnob, IntKnob, SearchSpace


def decode(space: SearchSpace, x: np.ndarray) -> dict[str, Any]:
    """Knob values for a point of the unit cube (inactive conditional knobs left out)."""
    names = list(space.knobs)
    raw: dict[str, Any] = {}
    for name, u in zip(names, np.clip(x, 0.0, 1.0), strict=True):
        raw[name] = _decode_one(space.knobs[name], float(u))
    params: dict[str, Any] = {}
    for name in space._order:
        if space.is_active(name, params):
            params[name] = raw[name]
    return {name: params[name] for name in names if name in params}


def _decode_one(knob: Any, u: float) -> Any:
    if isinstance(knob, CategoricalKnob):
        return knob.choices[min(int(u * len(knob.choices)), len(knob.choices) - 1)]
    if isinstance(knob, IntKnob):
        if knob.log:
            value = math.exp(math.log(knob.low) + u * (math.log(knob.high) - math.log(knob.low)))
        else:
            value = knob.low + u * (knob.high - knob.low)
        step = knob.step or 1
        value = knob.low + round((value - knob.low) / step) * step
        return int(min(max(value, knob.low), knob.high))
    if isinstance(knob, FloatKnob):
        low, high = float(knob.low), float(knob.high)
        if knob.log:
            return float(math.exp(math.log(low) + u * (math.log(high) - math.log(low))))
        value = low + u * (high - low)
        if knob.step:
            value = low + round((value - low) / knob.step) * knob.step
        return float(min(max(value, low), high))
    raise TypeError(f"unsupported knob type {type(knob).__name__}")


class PymooDriver:
    """Feeds pymoo NSGA-II proposals to an optuna study and its results back to pymoo."""

    def __init__(self, space: SearchSpace, tune: TuneSpec, study: optuna.Study) -> None:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem

        self.space = space
        self.signs = np.array([1.0 if o.direction == "minimize" else -1.0 for o in tune.objectives])
        problem = Problem(
            n_var=len(space.knobs), n_obj=len(tune.objectives), n_ieq_constr=1, xl=0.0, xu=1.0
        )
        self.algorithm = NSGA2(pop_size=tune.population_size)
        self.algorithm.setup(problem, termination=("n_gen", 10**9), seed=tune.seed, verbose=False)
        self._population: Any = None
        self._pending: deque[int] = deque()
        self._told: dict[int, tuple[np.ndarray, float]] = {}
        self._worst: np.ndarray | None = None

    def next_params(self) -> dict[str, Any]:
        """The knobs of the next individual, asking pymoo for a generation when needed."""
        if self._population is None or not self._pending:
            if self._population is not None:
                return self._decode_index(len(self._population) - 1)  # generation still open
            self._population = self.algorithm.ask()
            self._pending = deque(range(len(self._population)))
            self._told = {}
        index = self._pending.popleft()
        self._in_flight = index
        return self._decode_index(index)

    def _decode_index(self, index: int) -> dict[str, Any]:
        self._in_flight = index
        return decode(self.space, self._population[index].X)

    def tell(self, params: dict[str, Any], values: list[float], feasible: bool) -> None:
        """The result of the individual handed out last."""
        objectives = np.asarray(values, dtype=float) * self.signs
        self._worst = objectives if self._worst is None else np.maximum(self._worst, objectives)
        self._record(objectives, 0.0 if feasible else 1.0)

    def fail(self) -> None:
        """The individual handed out last could not be measured."""
        worst = self._worst if self._worst is not None else np.full(len(self.signs), 1e9)
        self._record(worst * 1.0, 1.0)

    def _record(self, objectives: np.ndarray, violation: float) -> None:
        self._told[self._in_flight] = (objectives, violation)
        if self._population is not None and len(self._told) == len(self._population):
            order = sorted(self._told)
            F = np.array([self._told[i][0] for i in order])
            G = np.array([[self._told[i][1]] for i in order])
            self._population.set("F", F, "G", G)
            self.algorithm.tell(infills=self._population)
            self._population = None
            self._pending.clear()
