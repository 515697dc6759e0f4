"""The tuner's own overhead per trial: ask, tell and MLflow logging, without the measurement.

Runs a real study loop (StudyRunner on SQLite storage, NSGA-II, a real MLflow SQLite store,
artifacts written) whose evaluation returns a prepared result at once, so what is timed is
everything fmtune adds around a measurement. Prints the median and p90 per component over
--trials trials (default 100).

Usage: .venv/bin/python benchmarks/tuner_overhead.py [--trials 100] [--sampler nsga2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from runtime.metrics import RunMetrics
from runtime.routing.router import RouterStats
from runtime.run import RunResult, RunSpec
from tuner.experiment import load_experiment
from tuner.study import StudyRunner, default_storage_url
from tuner.tracking import StudyTracker, default_tracking_uri

REPO = Path(__file__).resolve().parents[1]
TIMINGS: dict[str, list[float]] = defaultdict(list)


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TIMINGS[name].append(time.perf_counter() - started)

    return wrapper


def prepared_result(spec: RunSpec) -> RunResult:
    """A plausible measured result, different per knob set (no engine involved)."""
    seed = abs(hash(spec.app.architecture + spec.app.format.value)) % 1000
    rng = np.random.default_rng(seed + (spec.deployment.models["llm"].engine.max_num_seqs or 0))
    fields = {name: None for name in RunMetrics.model_fields}
    fields.update(
        e2e_p50_s=float(rng.uniform(2, 10)), e2e_p95_s=float(rng.uniform(5, 20)),
        cost_per_1k_usd=float(rng.uniform(0.01, 0.1)), quality=float(rng.uniform(0, 1)),
        error_rate=0.0, num_requests=8, num_failed=0, num_shed=0, quality_ci95=[0.1, 0.9],
        wall_s=10.0, sla_e2e_s=30.0,
    )  # fmt: skip
    metrics = RunMetrics.model_validate(fields)
    trace = pd.DataFrame({"request_id": [0, 1], "node_id": ["extract", "extract"]})
    return RunResult(metrics, trace, [], RouterStats(), {"llm/0": 100.0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--sampler", default="nsga2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fmtune-overhead-") as scratch:
        out = Path(scratch)
        space = out / "space.yaml"
        knobs = {
            "app": {
                "architecture": ["single", "parallel", "sequential", "judge"],
                "format": ["json", "yaml", "xml", "text", "tag"],
            },
            "engine": {"max_num_seqs": {"type": "int", "low": 1, "high": 64, "log": True}},
        }
        space.write_text(yaml.safe_dump(knobs))
        data = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())
        data["tune"].update(search_space=str(space), trials=args.trials, population_size=10)
        experiment_path = out / "experiment.yaml"
        experiment_path.write_text(yaml.safe_dump(data))
        experiment = load_experiment(experiment_path, need_tune=True)
        tracker = StudyTracker(default_tracking_uri(out), "fmtune-overhead", "overhead")
        tracker.start_trial = timed("mlflow start_trial", tracker.start_trial)  # type: ignore[method-assign]
        tracker.finish_trial = timed("mlflow finish_trial", tracker.finish_trial)  # type: ignore[method-assign]
        runner = StudyRunner(
            experiment, storage_url=default_storage_url(out), study_name="overhead",
            out_dir=out, evaluate=prepared_result, tracker=tracker, sampler_name=args.sampler,
        )  # fmt: skip
        runner.study.ask = timed("optuna ask", runner.study.ask)  # type: ignore[method-assign]
        runner.study.tell = timed("optuna tell", runner.study.tell)  # type: ignore[method-assign]
        object.__setattr__(runner.space, "suggest", timed("suggest knobs", runner.space.suggest))
        runner._measure = timed("write trial artifacts", runner._measure)  # type: ignore[method-assign]
        original = runner._one_trial
        runner._one_trial = timed("whole trial (no measurement)", original)  # type: ignore[method-assign]
        started = time.perf_counter()
        runner.run(args.trials)
        total = time.perf_counter() - started

    print(f"{args.trials} trials, sampler {args.sampler}, SQLite storage, MLflow SQLite store")
    print(f"{'component':<32}{'median ms':>12}{'p90 ms':>12}{'n':>6}")
    for name, values in TIMINGS.items():
        p90 = float(np.percentile(values, 90))
        print(f"{name:<32}{1000 * statistics.median(values):>12.1f}{1000 * p90:>12.1f}"
              f"{len(values):>6}")  # fmt: skip
    print(f"total {total:.1f}s, {1000 * total / args.trials:.1f} ms per trial on average")


if __name__ == "__main__":
    main()
