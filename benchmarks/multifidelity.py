"""Real-only search against multi-fidelity search on one budget of real-engine minutes (issue 11).

Two studies of one experiment (default: experiments/quickstart.yaml and its search space),
same sampler and seed, each in its own SQLite storage under out/multifidelity/<arm>/:

- ``real``: `fidelity: real`, trials one at a time until the arm's real minutes are spent;
- ``multi``: `fidelity: multi`, rounds of screening in the simulator (CPU only, not counted)
  and `confirm` real confirmations per round, until the real minutes are spent. Its
  calibration runs (one real run per app/model combination) count as real minutes: each arm
  starts with an empty calibration cache (a fresh FMTUNE_HOME whose `models` and `profiles`
  are the user's: the step-time profile is measured once per model and shared by every
  study, so it is not charged to one).

Real minutes are the wall time spent inside the arm's real evaluation (`execute_run` on the
arm's own replica pool: engine cold starts, requests, scoring), summed by a wrapper around
the evaluation. An arm starts no real work once its budget is spent; the run in progress
then finishes, so an arm may overshoot by one run (the minutes are reported as spent).

Compared per arm: the hypervolume of the front of measured trials (`tuner.pareto.pareto_front`
of the arm's study; a multi study holds only confirmed, measured trials), with one reference
point over both arms' measured trials (`tuner.pareto.reference_point`), the front's size,
the real trials and calibration runs, real and wall minutes.

Each arm is one engine-lane command (about 15 minutes with the default 14-minute budget: with
an empty calibration cache the quickstart space's nine calibration runs take about 9 real
minutes, so a budget under ~10 minutes leaves the multi arm nothing to confirm); the json keeps
both, and the table is printed once both are there:
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/multifidelity.py --arm real
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/multifidelity.py --arm multi
    .venv/bin/python benchmarks/multifidelity.py --report
Output: reports/multifidelity.txt and .json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lane import foreign_engines

REPO = Path(__file__).resolve().parents[1]
REPORT_TXT = REPO / "reports" / "multifidelity.txt"
REPORT_JSON = REPORT_TXT.with_suffix(".json")
ARMS = ("real", "multi")


@dataclass
class RealClock:
    """Wall seconds spent in real evaluations, and how many there were."""

    seconds: float = 0.0
    runs: int = 0

    def timed(self, evaluate: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``evaluate`` with its wall time added to this clock."""

        def run(spec: Any) -> Any:
            started = time.monotonic()
            try:
                return evaluate(spec)
            finally:
                self.seconds += time.monotonic() - started
                self.runs += 1

        return run


def fresh_home(folder: Path) -> Path:
    """An FMTUNE_HOME with no calibration runs whose models and profiles are the user's."""
    from runtime.engine.models import fmtune_home

    user = fmtune_home()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in ("models", "profiles"):
        if (user / name).exists():
            (folder / name).symlink_to((user / name).resolve())
    return folder


def run_arm(arm: str, experiment_path: Path, minutes: float, max_trials: int) -> dict[str, Any]:
    """One arm's study on its own replica pool until its real minutes are spent."""
    import optuna

    from runtime.engine.pool import PoolLimits, ReplicaPool
    from runtime.run import execute_run
    from tuner.experiment import load_experiment
    from tuner.study import StudyRunner, budget_used

    out = REPO / "out" / "multifidelity" / arm
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    os.environ["FMTUNE_HOME"] = str(fresh_home(out / "home"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    experiment = load_experiment(experiment_path, {"tune.fidelity": arm}, need_tune=True)
    assert experiment.tune is not None
    clock = RealClock()
    budget_s = 60.0 * minutes
    started = time.monotonic()
    with ReplicaPool(PoolLimits(max_replicas=3, max_memory_gib=16), log_dir=out / "logs") as pool:
        evaluate = clock.timed(lambda spec: execute_run(spec, pool))
        runner = StudyRunner(
            experiment,
            storage_url=f"sqlite:///{out / 'study.db'}",
            study_name=f"multifidelity-{arm}",
            out_dir=out,
            evaluate=evaluate,
        )
        step = experiment.tune.confirm if arm == "multi" else 1
        while clock.seconds < budget_s:
            done, _ = budget_used(runner.study)
            if done >= max_trials:
                break
            before = clock.runs
            runner.run(min(done + step, max_trials))
            if budget_used(runner.study)[0] == done and clock.runs == before:
                break  # nothing new to measure (the space or the screened front is exhausted)
            print(
                f"[{arm}] {budget_used(runner.study)[0]} trials, {clock.runs} real runs, "
                f"{clock.seconds / 60:.1f} of {minutes:g} real minutes",
                flush=True,
            )
    return summarize_arm(arm, runner.study, clock, time.monotonic() - started, minutes)


def summarize_arm(
    arm: str, study: Any, clock: RealClock, wall_s: float, minutes: float
) -> dict[str, Any]:
    """What the arm measured: its measured trials' values, its front, its minutes."""
    from optuna.trial import TrialState

    from tuner.pareto import ATTR_DUPLICATE_OF, pareto_front
    from tuner.study import ATTR_FIDELITY, ATTR_PREDICTION_ERRORS

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    measured = [t for t in complete if t.user_attrs.get(ATTR_FIDELITY, "real") == "real"]
    front = [t for t in pareto_front(study) if t.user_attrs.get(ATTR_FIDELITY, "real") == "real"]
    errors = [t.user_attrs[ATTR_PREDICTION_ERRORS] for t in measured if ATTR_PREDICTION_ERRORS
              in t.user_attrs]  # fmt: skip
    return {
        "arm": arm,
        "budget_minutes": minutes,
        "real_minutes": clock.seconds / 60,
        "real_runs": clock.runs,
        "measured_trials": len(measured),
        # a trial that reused an earlier trial's result (same knobs) ran nothing
        "calibration_runs": clock.runs
        - sum(ATTR_DUPLICATE_OF not in t.user_attrs for t in measured),
        "wall_minutes": wall_s / 60,
        "measured_values": [list(t.values) for t in measured],
        "front_values": [list(t.values) for t in front],
        "front_params": [t.params for t in front],
        "prediction_errors": errors,
        "load_avg_end": list(os.getloadavg()),
    }


def render(record: Mapping[str, Any]) -> str:
    """The comparison table (the hypervolume needs both arms' points for its reference)."""
    from runtime.simrun import error_summary
    from tuner.pareto import hypervolume, reference_point

    directions = [o["direction"] for o in record["objectives"]]
    arms = [record["arms"][name] for name in ARMS if name in record["arms"]]
    lines = [
        f"multi-fidelity vs real-only search: {record['experiment']}, sampler "
        f"{record['sampler']}, seed {record['seed']}, {platform.machine()} "
        f"{record['cpus']} cores",
        "objectives: "
        + ", ".join(f"{o['metric']} ({o['direction']})" for o in record["objectives"]),
    ]
    for arm in arms:
        header = record["headers"][arm["arm"]]
        lines.append(
            f"arm {arm['arm']}: started {header['date']}, load average at start "
            f"{header['load_avg_start'][0]:.1f}, at end {arm['load_avg_end'][0]:.1f}, vLLM "
            f"servers of others running at start: {header['foreign_engines_at_start']} (the "
            "engine lane was contended when that is above 0)"
        )
    points = [values for arm in arms for values in arm["measured_values"]]
    if not points:
        return "\n".join([*lines, "no measured trial in any arm"]) + "\n"
    reference = reference_point(points, directions)
    lines += [
        "hypervolume reference point (worst measured value per objective, 10% beyond): "
        + ", ".join(f"{value:.4g}" for value in reference),
        "",
        f"{'arm':6} {'budget min':>10} {'real min':>8} {'wall min':>8} {'real runs':>9} "
        f"{'calib':>5} {'trials':>6} {'front':>5} {'hypervolume':>12}",
    ]
    for arm in arms:
        volume = hypervolume(arm["front_values"], reference, directions)
        lines.append(
            f"{arm['arm']:6} {arm['budget_minutes']:>10g} {arm['real_minutes']:>8.1f} "
            f"{arm['wall_minutes']:>8.1f} {arm['real_runs']:>9} {arm['calibration_runs']:>5} "
            f"{arm['measured_trials']:>6} {len(arm['front_values']):>5} {volume:>12.5g}"
        )
    for arm in arms:
        errors = arm.get("prediction_errors") or []
        if errors:
            lines += ["", f"{arm['arm']}: absolute % error of the screening predictions over "
                      f"{len(errors)} confirmations (median, worst):"]  # fmt: skip
            for metric, (median, worst, count) in error_summary(errors).items():
                if count:
                    lines.append(f"  {metric:16} {median:7.1f} {worst:7.1f}")
    return "\n".join(lines) + "\n"


def header() -> dict[str, Any]:
    """When the arm started and how loaded the machine was."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_avg_start": list(os.getloadavg()),
        "foreign_engines_at_start": foreign_engines(),
    }


def main() -> None:
    """Run one arm (stored in the json) or render the stored arms."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", choices=ARMS, help="the arm to run (one engine-lane command)")
    parser.add_argument("--experiment", type=Path, default=REPO / "experiments/quickstart.yaml")
    parser.add_argument("--minutes", type=float, default=14.0, help="real-engine minutes per arm")
    parser.add_argument("--max-trials", type=int, default=60, help="stop an arm after N trials")
    parser.add_argument("--report", action="store_true", help="only render the stored json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from tuner.experiment import load_experiment

    record: dict[str, Any] = (
        json.loads(REPORT_JSON.read_text()) if REPORT_JSON.is_file() else {"arms": {}}
    )
    if args.arm is not None:
        experiment = load_experiment(args.experiment, need_tune=True)
        assert experiment.tune is not None
        started = header()
        arm = run_arm(args.arm, args.experiment, args.minutes, args.max_trials)
        record.update(
            experiment=str(args.experiment.resolve().relative_to(REPO)),
            sampler=experiment.tune.sampler_name(),
            seed=experiment.tune.seed,
            cpus=os.cpu_count(),
            objectives=[o.model_dump(mode="json") for o in experiment.tune.objectives],
        )
        record["arms"][args.arm] = arm
        record.setdefault("headers", {})[args.arm] = started
        REPORT_JSON.parent.mkdir(parents=True, exist_ok=True)
        REPORT_JSON.write_text(json.dumps(record, indent=1) + "\n")
    elif not args.report:
        parser.error("give --arm real|multi or --report")
    if record["arms"]:
        text = render(record)
        REPORT_TXT.write_text(text)
        print(text, end="")


if __name__ == "__main__":
    main()
