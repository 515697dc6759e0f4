"""`fmtune regress --retune N`: a small study seeded with the previous front, and whether the
front moved.

Today's stack may make another deployment better than the ones exported. The previous front's
knobs are queued first in a new study (optuna's `enqueue_trial`), so they are measured again
under the same conditions as the N new trials that follow (the study's own sampler proposes
them, with the experiment's search space and objectives). Then each point of the new front
that is not an old knob set is compared with every old deployment: it *dominates* one when it
is at least as good on every objective and better on one (`dominations`, pure), and the
report says by how much (today's new value over the old one's, per objective).

The study lives in retune.db in regress's output folder (its trials in retune/), one study
per night, so `fmtune export --study NAME --storage sqlite:///DIR/retune.db` exports the new
front.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from runtime.errors import ConfigError
from runtime.run import RunResult, RunSpec
from tuner.pareto import Objective, pareto_front
from tuner.regress import BaselineDeployment

logger = logging.getLogger(__name__)

RETUNE_DB = "retune.db"
RETUNE_FILE = "retune.md"


@dataclass(frozen=True)
class Domination:
    """A new deployment that beats an old one on every objective (or ties on some).

    Attributes:
        new_trial: Its trial number in the retune study.
        new_params: Its knobs.
        old: The old deployment's name (its bundle, trial-NNNN).
        ratios: new / old per objective metric, both measured today.
    """

    new_trial: int
    new_params: dict[str, Any]
    old: str
    ratios: dict[str, float]

    def line(self) -> str:
        """'trial 5 dominates trial-0004: cost_per_1k_usd x0.82, quality x1.05'."""
        changes = ", ".join(f"{metric} x{ratio:.3g}" for metric, ratio in self.ratios.items())
        return f"trial {self.new_trial} dominates {self.old}: {changes}"


def dominates(a: Sequence[float], b: Sequence[float], objectives: Sequence[Objective]) -> bool:
    """Whether values `a` are no worse than `b` on every objective and better on one."""
    if len(a) != len(objectives) or len(b) != len(objectives):
        raise ValueError(f"expected {len(objectives)} values each, got {list(a)} and {list(b)}")
    better = False
    for x, y, objective in zip(a, b, objectives, strict=True):
        gain = (y - x) if objective.direction == "minimize" else (x - y)
        if gain < 0:
            return False
        better = better or gain > 0
    return better


def _ratio(new: float, old: float) -> float:
    if old == 0:
        return 1.0 if new == 0 else float("inf")
    return new / old


def dominations(
    new: Mapping[int, tuple[Sequence[float], Mapping[str, Any]]],
    old: Mapping[str, Sequence[float]],
    objectives: Sequence[Objective],
) -> list[Domination]:
    """Every (new, old) pair where the new point dominates the old one, new points by trial
    number, old ones by name. new: trial number -> (objective values, knobs)."""
    found = []
    for number in sorted(new):
        values, params = new[number]
        for name in sorted(old):
            if dominates(values, old[name], objectives):
                ratios = {
                    o.metric: _ratio(v, w)
                    for o, v, w in zip(objectives, values, old[name], strict=True)
                }
                found.append(Domination(number, dict(params), name, ratios))
    return found


@dataclass
class RetuneReport:
    """One night's re-tuning: where the study is, which trials were the old front, what
    dominates what."""

    study_name: str
    storage: str
    seeds: dict[int, str]
    """Trial number in the retune study -> the old deployment whose knobs it measured."""
    front: list[int]
    dominations: list[Domination] = field(default_factory=list)

    @property
    def moved(self) -> bool:
        """Whether a new deployment dominates an old one."""
        return bool(self.dominations)

    def lines(self) -> list[str]:
        """What people read: the verdict, each domination, how to export the new front."""
        if not self.moved:
            head = f"re-tuning: no new deployment dominates the previous front ({self.study_name})"
        else:
            head = f"re-tuning: the front moved ({self.study_name})"
        return [
            head,
            *(d.line() for d in self.dominations),
            f"export it: fmtune export --study {self.study_name} --storage {self.storage} "
            "--out DIR",
        ]


def check_retune(baselines: Sequence[BaselineDeployment]) -> None:
    """A ConfigError naming the bundle when one cannot seed a study (no knobs or experiment
    recorded: exported before --retune existed), so nothing starts for a doomed night."""
    for baseline in baselines:
        if baseline.experiment is None or baseline.experiment.tune is None or not baseline.params:
            raise ConfigError(
                f"{baseline.origin}: --retune needs the trial's knobs and experiment, which "
                "this bundle does not record: export the study again with `fmtune export`"
            )


def retune(
    baselines: Sequence[BaselineDeployment],
    trials: int,
    out: Path,
    evaluate: Callable[[RunSpec], RunResult],
    *,
    study_name: str,
) -> RetuneReport:
    """Run a study of len(baselines) + trials trials, the old front's knobs first, into
    out/retune.db; report what of the new front dominates the old one."""
    from tuner.study import StudyRunner

    if trials < 1:
        raise ConfigError(f"--retune must be >= 1, got {trials}")
    check_retune(baselines)
    experiment = baselines[0].experiment
    assert experiment is not None and experiment.tune is not None
    tune = experiment.tune.model_copy(update={"trials": len(baselines) + trials})
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(out / RETUNE_DB).resolve()}"
    runner = StudyRunner(
        experiment.model_copy(update={"tune": tune}), storage_url=storage,
        study_name=study_name, out_dir=out / "retune", evaluate=evaluate,
    )  # fmt: skip
    first = len(runner.study.trials)
    for baseline in baselines:
        runner.study.enqueue_trial(baseline.params, skip_if_exists=False)
    runner.run()
    trials_by_number = {t.number: t for t in runner.study.get_trials(deepcopy=False)}
    seeds = {first + i: b.name for i, b in enumerate(baselines)}
    objectives = list(tune.objectives)
    old = {
        name: list(trials_by_number[number].values or [])
        for number, name in seeds.items()
        if trials_by_number[number].state == TrialState.COMPLETE
    }
    seed_knobs = [b.params for b in baselines]
    front = pareto_front(runner.study)
    new = {
        t.number: (list(t.values or []), t.params)
        for t in front
        if t.number not in seeds and t.params not in seed_knobs
    }
    report = RetuneReport(study_name, storage, seeds, [t.number for t in front])
    report.dominations = dominations(new, old, objectives)
    (out / RETUNE_FILE).write_text(markdown(report, objectives))
    return report


def markdown(report: RetuneReport, objectives: Sequence[Objective]) -> str:
    """retune.md: the seeds, the new front, and what dominates what by how much."""
    metrics = ", ".join(f"{o.metric} ({o.direction})" for o in objectives)
    lines = [
        f"# fmtune regress --retune: {'the front moved' if report.moved else 'front unchanged'}",
        "",
        f"- study: {report.study_name} in {report.storage}",
        f"- objectives: {metrics}",
        "- seeds (the previous front, measured again first): "
        + ", ".join(f"trial {n} = {name}" for n, name in sorted(report.seeds.items())),
        f"- new front: {', '.join(f'trial {n}' for n in report.front) or 'empty'}",
        "",
    ]
    if report.dominations:
        lines += ["| new | dominates | new / old, per objective |", "|---|---|---|"]
        for d in report.dominations:
            ratios = ", ".join(f"{m} x{r:.3g}" for m, r in d.ratios.items())
            lines.append(f"| trial {d.new_trial} | {d.old} | {ratios} |")
    else:
        lines.append("No new deployment dominates an old one.")
    return "\n".join(lines) + "\n"
