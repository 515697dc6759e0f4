"""Pareto fronts and hypervolume on studies with known points."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from tuner.pareto import (
    ATTR_DUPLICATE_OF,
    INDISTINGUISHABLE_RULE,
    Objective,
    duplicate_of,
    front_table,
    hypervolume,
    indistinguishable_from,
    is_feasible,
    objective_intervals,
    overlaps,
    pareto_front,
    reference_point,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

DIST = {"engine.block_size": CategoricalDistribution([16, 32]), "x": IntDistribution(0, 999)}


def add(
    study: optuna.Study,
    values: list[float] | None,
    *,
    constraint: float | None = None,
    legacy_constraint: float | None = None,
    state: TrialState = TrialState.COMPLETE,
    block_size: int = 16,
) -> None:
    """Add a finished trial with the given values and optional constraint value."""
    system_attrs = {"constraints": [legacy_constraint]} if legacy_constraint is not None else None
    study.add_trial(
        create_trial(
            state=state,
            values=values,
            params={"engine.block_size": block_size, "x": len(study.trials)},
            distributions=DIST,
            system_attrs=system_attrs,
            constraints={"mem": constraint} if constraint is not None else None,
        )
    )


@pytest.fixture
def two_min_study() -> optuna.Study:
    """Two minimized objectives with dominated, duplicate, infeasible and failed trials."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    add(study, [1, 5], constraint=0.0)  # 0 front
    add(study, [2, 2])  # 1 front
    add(study, [5, 1])  # 2 dominated by 7
    add(study, [3, 3])  # 3 dominated by 1
    add(study, [0.5, 0.5], constraint=1.0)  # 4 infeasible, would dominate all
    add(study, [2, 2], block_size=32)  # 5 duplicate of 1: front
    add(study, None, state=TrialState.FAIL)  # 6 failed
    add(study, [4, 0.8], constraint=-3.0)  # 7 front
    add(study, [1.5, 1.5], legacy_constraint=0.5)  # 8 infeasible (list format)
    return study


def test_feasibility_reads_named_and_legacy_constraints(two_min_study: optuna.Study) -> None:
    feasible = [is_feasible(t) for t in two_min_study.trials]
    assert feasible == [True, True, True, True, False, True, True, True, False]


def test_pareto_front_exact(two_min_study: optuna.Study) -> None:
    assert [t.number for t in pareto_front(two_min_study)] == [0, 1, 5, 7]


def test_pareto_front_maximize() -> None:
    study = optuna.create_study(directions=["minimize", "maximize"])
    add(study, [1, 0.2])  # 0 front: fastest
    add(study, [2, 0.9])  # 1 front: best quality
    add(study, [3, 0.5])  # 2 dominated by 1
    add(study, [2, 0.8])  # 3 dominated by 1
    add(study, [0.1, 0.95], constraint=2.0)  # 4 infeasible
    assert [t.number for t in pareto_front(study)] == [0, 1]


def test_pareto_front_matches_optuna_best_trials() -> None:
    rng = np.random.default_rng(0)
    study = optuna.create_study(directions=["minimize", "maximize", "minimize"])
    for _ in range(200):
        add(study, rng.integers(0, 10, size=3).tolist(), constraint=float(rng.normal()))
    ours = [t.number for t in pareto_front(study)]
    assert ours == sorted(t.number for t in study.best_trials)
    assert 0 < len(ours) < 100


def test_single_objective_best_feasible() -> None:
    study = optuna.create_study(direction="minimize")
    add(study, [3.0])
    add(study, [1.0], constraint=0.1)  # infeasible
    add(study, [2.0])
    add(study, [2.0])
    assert [t.number for t in pareto_front(study)] == [2]
    up = optuna.create_study(direction="maximize")
    add(up, [3.0])
    add(up, [9.0], legacy_constraint=1.0)
    add(up, [4.0])
    assert [t.number for t in pareto_front(up)] == [2]


def test_empty_front() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    assert pareto_front(study) == []
    add(study, [1, 1], constraint=1.0)
    assert pareto_front(study) == []


def test_hypervolume_2d_by_hand() -> None:
    # staircase under (1,3), (2,2), (3,1) up to (4,4): 1*1 + 1*2 + 1*3 = 6
    points = [[1, 3], [2, 2], [3, 1]]
    assert hypervolume(points, [4, 4], ["minimize", "minimize"]) == pytest.approx(6.0)
    # a dominated point and a point beyond the reference add nothing
    more = [*points, [3, 3], [5, 0]]
    assert hypervolume(more, [4, 4], ["minimize", "minimize"]) == pytest.approx(6.0)
    assert hypervolume([], [4, 4], ["minimize", "minimize"]) == 0.0


def test_hypervolume_maximize() -> None:
    # quality maximized: (1, q=1), (2, q=2), (3, q=3) against (4, q=0) is the same staircase
    points = [[1, 1], [2, 2], [3, 3]]
    directions = [Objective(metric="p95_s", direction="minimize"), "maximize"]
    assert hypervolume(points, [4, 0], directions) == pytest.approx(6.0)
    assert hypervolume([[3, 4]], [1, 1], ["maximize", "maximize"]) == pytest.approx(6.0)
    assert hypervolume([[1, 1]], [2, 3], ["maximize", "maximize"]) == 0.0  # worse than ref


def test_hypervolume_3d_and_agrees_with_optuna() -> None:
    assert hypervolume([[1, 1, 1]], [2, 3, 4], ["minimize"] * 3) == pytest.approx(6.0)
    from optuna._hypervolume import compute_hypervolume

    rng = np.random.default_rng(1)
    points = rng.uniform(0, 1, size=(30, 3))
    expected = compute_hypervolume(points, np.ones(3))
    assert hypervolume(points, [1, 1, 1], ["minimize"] * 3) == pytest.approx(expected)


def test_hypervolume_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"points: expected shape \(n, 2\)"):
        hypervolume([[1, 2, 3]], [4, 4], ["minimize", "minimize"])
    with pytest.raises(ValueError, match=r"reference_point: expected 2 values"):
        hypervolume([[1, 2]], [4], ["minimize", "minimize"])
    with pytest.raises(ValueError, match=r"directions\[1\]: must be 'minimize' or 'maximize'"):
        hypervolume([[1, 2]], [4, 4], ["minimize", "up"])


def test_reference_point() -> None:
    points = [[1, 0.2], [2, 0.9], [5, 0.5]]
    ref = reference_point(points, ["minimize", "maximize"])
    assert ref == pytest.approx([5.4, 0.13])  # worst + 10% of range, per direction
    assert reference_point([[10, 0]], ["minimize", "minimize"]) == pytest.approx([11, 0.1])
    front = [[1, 3], [2, 2], [3, 1]]
    assert hypervolume(front, reference_point(front, ["minimize"] * 2), ["minimize"] * 2) > 0
    with pytest.raises(ValueError, match="at least one point"):
        reference_point([], ["minimize"])


def test_front_table(two_min_study: optuna.Study) -> None:
    objectives = [
        Objective(metric="p95_latency_s", direction="minimize"),
        Objective(metric="cost_usd", direction="minimize"),
    ]
    table = front_table(two_min_study, objectives)
    assert list(table.columns) == [
        "trial",
        "params.engine.block_size",
        "params.x",
        "p95_latency_s",
        "cost_usd",
        "feasible",
        "on_front",
    ]
    assert table["trial"].tolist() == [0, 1, 2, 3, 4, 5, 7, 8]  # failed trial 6 left out
    assert table["feasible"].tolist() == [True, True, True, True, False, True, True, False]
    assert table.loc[table["on_front"], "trial"].tolist() == [0, 1, 5, 7]
    row = table.set_index("trial").loc[5]
    assert (row["params.engine.block_size"], row["p95_latency_s"], row["cost_usd"]) == (32, 2, 2)


def test_front_table_checks_objectives(two_min_study: optuna.Study) -> None:
    with pytest.raises(ValueError, match="study has 2 objectives, got 1"):
        front_table(two_min_study, [Objective(metric="a", direction="minimize")])
    wrong = [
        Objective(metric="a", direction="minimize"),
        Objective(metric="quality", direction="maximize"),
    ]
    with pytest.raises(ValueError, match=r"objective 'quality': direction 'maximize' does not"):
        front_table(two_min_study, wrong)


# --- a knob set on the front once -------------------------------------------------------


def test_a_knob_set_stands_on_the_front_once() -> None:
    """A duplicate (told an earlier trial's values by the study) and a twin measured by
    another worker at the same time have the knobs of trial 0: trial 0 stands for them, even
    where the twin measured better."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    knobs = {"engine.block_size": 16, "x": 7}
    for values, attrs in (
        ([1.0, 5.0], {}),  # 0: measured
        ([1.0, 5.0], {ATTR_DUPLICATE_OF: 0}),  # 1: the study reused trial 0's result
        ([0.5, 4.0], {}),  # 2: the same knobs measured at once by another worker
        ([5.0, 1.0], {}),  # 3: other knobs
    ):
        params = knobs if len(study.trials) < 3 else {"engine.block_size": 32, "x": 8}
        study.add_trial(
            create_trial(values=values, params=params, distributions=DIST, user_attrs=attrs)
        )

    assert [t.number for t in pareto_front(study)] == [0, 3]
    assert [duplicate_of(t) for t in study.trials] == [None, 0, None, None]
    table = front_table(study, [Objective(metric="a", direction="minimize"),
                                Objective(metric="b", direction="minimize")])  # fmt: skip
    assert table["on_front"].tolist() == [True, False, False, True]


# --- indistinguishable front points -----------------------------------------------------

QUALITY = Objective(metric="quality", direction="maximize")
COST = Objective(metric="cost_per_1k_usd", direction="minimize")


def test_objective_intervals_read_the_stored_ci95_and_fall_back_to_the_value() -> None:
    metrics = {"quality": 0.5, "quality_ci95": [0.4, 0.7], "cost_per_1k_usd_ci95": None}
    assert objective_intervals([0.5, 2.0], metrics, [QUALITY, COST]) == [(0.4, 0.7), (2.0, 2.0)]
    # an interval that misses its own value is widened to hold it
    assert objective_intervals([0.8], {"quality_ci95": [0.4, 0.7]}, [QUALITY]) == [(0.4, 0.8)]
    for broken in ([0.4], [None, 0.7], ["a", "b"], [float("nan"), 0.7], "0.4-0.7"):
        assert objective_intervals([0.5], {"quality_ci95": broken}, [QUALITY]) == [(0.5, 0.5)]
    with pytest.raises(ValueError, match="expected 2 values"):
        objective_intervals([0.5], {}, [QUALITY, COST])


def test_overlaps_is_closed_and_symmetric() -> None:
    assert overlaps((0.0, 1.0), (1.0, 2.0)) and overlaps((1.0, 2.0), (0.0, 1.0))
    assert overlaps((0.0, 3.0), (1.0, 2.0)) and overlaps((1.0, 2.0), (0.0, 3.0))
    assert not overlaps((0.0, 1.0), (1.01, 2.0)) and not overlaps((1.01, 2.0), (0.0, 1.0))
    assert overlaps((2.0, 2.0), (2.0, 2.0)) and not overlaps((2.0, 2.0), (2.5, 2.5))


def test_indistinguishable_when_every_objective_overlaps() -> None:
    """Quality intervals chain 0 ~ 1 ~ 2 but 0 and 2 are apart; 3 overlaps 0 on quality
    but its cost (a value without interval) differs: it is told apart from everyone."""
    intervals = {
        0: [(0.30, 0.50), (1.0, 1.0)],
        1: [(0.45, 0.65), (1.0, 1.0)],
        2: [(0.60, 0.80), (1.0, 1.0)],
        3: [(0.35, 0.45), (1.5, 1.5)],
        4: [(0.10, 0.20), (0.8, 1.2)],
    }
    assert indistinguishable_from(intervals) == {0: [1], 1: [0, 2], 2: [1], 3: [], 4: []}
    # with an interval on its cost that holds 1.0, 3 is like 0 and 1 (it touches 1's quality
    # interval at 0.45); 4's quality is still apart from everyone's
    intervals[3] = [(0.35, 0.45), (0.9, 1.5)]
    assert indistinguishable_from(intervals)[3] == [0, 1]
    assert indistinguishable_from({}) == {}
    with pytest.raises(ValueError, match="same objectives"):
        indistinguishable_from({0: [(0.0, 1.0)], 1: [(0.0, 1.0), (2.0, 2.0)]})


def test_the_rule_is_stated_in_words() -> None:
    assert "95% bootstrap intervals overlap" in INDISTINGUISHABLE_RULE
    assert "<metric>_ci95" in INDISTINGUISHABLE_RULE
