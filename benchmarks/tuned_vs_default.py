"""vLLM's defaults against the best deployment a study found, interleaved (issue 12).

The product promises at least 1.5x the goodput per dollar of vLLM's defaults. Two arms (and
any extra ones given with --arm), measured interleaved in one run (A B A B ...) on the same
SLA, workload, dataset examples and prices, every replica pinned to the same core:

- ``default``: the experiment's app with its default variant and knobs (`app: {source}`
  only: the app's first architecture, its default format), one replica of the model with
  vLLM's own engine defaults: dtype 'auto' (vLLM downcasts the float32 checkpoint to
  bfloat16 on this CPU), no max_num_seqs, max_num_batched_tokens, block_size, max_model_len
  or enforce_eager (vLLM compiles the model), and no admission control in front of it (the
  router's round_robin over the one replica: vLLM has no router, and fmtune's default
  sla_aware policy would shed). The one knob vLLM has no usable default for on CPU, the
  KV-cache size, is fmtune's default.
- ``tuned``: the study's Pareto front point (`tuner.pareto.pareto_front`: feasible,
  non-dominated, one trial per knob set) with the highest goodput per dollar in the study's
  own measurement, rebuilt on the experiment file as it is today
  (`tuner.knobs.trial_spec`): what `fmtune export` would deploy. A study written by an older
  fmtune whose stored experiment today's cannot read is still usable: its trials' knobs are
  applied to the experiment file given with --experiment.
- ``--arm NAME=knob=value,...``: the tuned deployment with some knobs changed (e.g.
  ``tuned-bf16=engine.dtype=bfloat16``).

Each arm is measured --rounds times (one run of the workload each, warm-up requests
excluded). Per arm: goodput per dollar (requests answered within the SLA per USD of busy
replica time: 1000 x sla_attainment / cost_per_1k_usd, the cost counting replica-seconds
from the first measured send to the last answer), e2e p95, quality; the median over rounds,
and each arm's ratio to the default (ratio of medians with a 95% bootstrap interval;
quality paired on the same examples, averaged over rounds).

Usage (replicas start in about 150 s for the compiled default, 55 s for an eager one; a
round of three arms then takes about 70 s on the quickstart workload; an invocation starts
no round past --budget-s, and --resume adds rounds to the json's):
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/tuned_vs_default.py \\
        [--study quickstart --storage sqlite:///out/quickstart/study.db] \\
        [--experiment experiments/quickstart.yaml] [--rounds 3] \\
        [--arm tuned-bf16=engine.dtype=bfloat16] [--resume]
    .venv/bin/python benchmarks/tuned_vs_default.py --report   # the table from the json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from lane import foreign_engines

from runtime.engine.pool import PoolLimits, ReplicaPool, available_cpu_cores, choose_cpu_core
from runtime.run import RunSpec, apply_overrides, execute_run
from runtime.stats import paired_ratio_of_means, ratio_of_medians
from tuner.experiment import Experiment, load_experiment
from tuner.knobs import trial_spec
from tuner.pareto import pareto_front
from tuner.space import load_space
from tuner.study import ATTR_METRICS

REPO = Path(__file__).resolve().parents[1]
REPORT_JSON = REPO / "reports" / "tuned_vs_default.json"
REPORT_TXT = REPO / "reports" / "tuned_vs_default.txt"
METRICS = ("goodput_per_usd", "e2e_p95_s", "quality")


def goodput_per_usd(metrics: Mapping[str, Any]) -> float | None:
    """Requests answered within the SLA per USD: 1000 x sla_attainment / cost_per_1k_usd."""
    attainment, cost = metrics.get("sla_attainment"), metrics.get("cost_per_1k_usd")
    if attainment is None or not cost:
        return None
    return 1000.0 * float(attainment) / float(cost)


# --------------------------------------------------------------------------------------------
# The arms
# --------------------------------------------------------------------------------------------


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The front point with the highest goodput per dollar in the study's own measurement."""
    front = pareto_front(study)
    if not front:
        raise SystemExit(f"study '{study.study_name}' has no feasible complete trial")
    scored = [(goodput_per_usd(t.user_attrs.get(ATTR_METRICS, {})) or 0.0, t) for t in front]
    return max(scored, key=lambda pair: (pair[0], -pair[1].number))[1]


def tuned_spec(experiment: Experiment, params: Mapping[str, Any]) -> RunSpec:
    """The trial's knobs applied to the experiment, as `fmtune export` rebuilds a trial."""
    assert experiment.tune is not None
    return trial_spec(experiment, load_space(experiment.tune.search_space), params)


def default_spec(tuned: RunSpec) -> RunSpec:
    """The same app source, dataset, workload, SLA and prices; the app's default knobs; one
    replica per model key with vLLM's engine defaults (dtype 'auto')."""
    data = tuned.model_dump(mode="json")
    data["app"] = {"source": data["app"]["source"]}
    data["deployment"] = {
        "models": {
            key: {"engine": {"model": model["engine"]["model"], "dtype": "auto"}, "replicas": 1}
            for key, model in data["deployment"]["models"].items()
        },
        "router": {"policy": "round_robin"},  # a pass-through: vLLM itself has no router
    }
    return RunSpec.model_validate(data)


def changed(spec: RunSpec, knobs: Mapping[str, Any]) -> RunSpec:
    """`spec` with knobs changed (`engine.X` for every model key, else a dotted path)."""
    data = spec.model_dump(mode="json")
    overrides: dict[str, Any] = {}
    for key, value in knobs.items():
        if key.startswith("engine."):
            for model in data["deployment"]["models"]:
                overrides[f"deployment.models.{model}.{key}"] = value
        else:
            overrides[key] = value
    return RunSpec.model_validate(apply_overrides(data, overrides))


def parse_arm(text: str) -> tuple[str, dict[str, Any]]:
    """'name=knob=value,knob=value' -> (name, knobs)."""
    name, sep, rest = text.partition("=")
    knobs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--arm {text}: expected NAME=knob=value[,knob=value]")
        knobs[key] = yaml.safe_load(value)
    if not sep or not name or not knobs:
        raise SystemExit(f"--arm {text}: expected NAME=knob=value[,knob=value]")
    return name, knobs


def describe(spec: RunSpec) -> dict[str, Any]:
    """What an arm deploys: app knobs set, engine knobs set, replicas."""
    app = spec.app.model_dump(mode="json", exclude_defaults=True)
    models = {
        key: {
            "engine": model.engine.model_dump(mode="json", exclude_none=True),
            "replicas": model.replicas,
        }
        for key, model in spec.deployment.models.items()
    }
    return {"app": app, "models": models, "router": spec.deployment.router.policy}


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def summarize_arm(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per metric, each round's value and the median."""
    out: dict[str, Any] = {}
    for metric in METRICS:
        values = [v for v in (run_value(r, metric) for r in runs) if v is not None]
        out[metric] = {"rounds": values, "median": float(np.median(values)) if values else None}
    return out


def run_value(metrics: Mapping[str, Any], metric: str) -> float | None:
    """One metric of one run (goodput per dollar derived)."""
    if metric == "goodput_per_usd":
        return goodput_per_usd(metrics)
    value = metrics.get(metric)
    return None if value is None else float(value)


def example_quality(runs: Sequence[Mapping[str, Any]]) -> list[float] | None:
    """Each example's quality averaged over an arm's rounds (same examples in every run)."""
    rows = [(r.get("examples") or {}).get("quality") for r in runs]
    if not rows or any(row is None for row in rows):
        return None
    return [float(v) for v in np.mean(np.asarray(rows, dtype=float), axis=0)]


def ratios(record: Mapping[str, Any], arm: str) -> dict[str, list[float] | None]:
    """The arm's ratio to the default per metric, with its 95% interval."""
    base, mine = record["runs"]["default"], record["runs"][arm]
    out: dict[str, list[float] | None] = {}
    for metric in METRICS:
        if metric == "quality":
            before, after = example_quality(base), example_quality(mine)
            if before is not None and after is not None and len(before) == len(after):
                out[metric] = list(paired_ratio_of_means(before, after))
                continue
        before_v = [v for v in (run_value(r, metric) for r in base) if v is not None]
        after_v = [v for v in (run_value(r, metric) for r in mine) if v is not None]
        out[metric] = list(ratio_of_medians(before_v, after_v)) if before_v and after_v else None
    return out


def render(record: Mapping[str, Any]) -> str:
    """The table from the json."""
    metas = record.get("headers") or [record["header"]]
    lines = ["vLLM defaults vs the study's best deployment, interleaved (issue 12)"]
    for meta in metas:
        lines.append(
            f"ran {meta['date']} on {meta['host']} ({meta['cpus']} cpus, vLLM {meta['vllm']}), "
            f"{meta.get('wall_s', '?')} s, {meta.get('rounds_run', '?')} rounds; load avg "
            f"{meta['load_avg_start'][0]:.2f} -> "
            f"{meta.get('load_avg_end', [float('nan')])[0]:.2f}; other vLLM servers at start: "
            f"{meta['foreign_engines_at_start']}; replicas pinned to core {meta['pinned_core']}"
        )
    if len(metas) > 1:
        lines.append("(resumed: each invocation started its replicas afresh)")
    lines += [
        f"study {record['study']} trial {record['trial']} (picked: highest goodput/$ on its "
        f"front; study measured {record['trial_metrics']}); experiment {record['experiment']}",
        f"workload: {record['workload']}; SLA e2e {record['sla_e2e_s']} s; "
        f"{len(record['runs']['default'])} interleaved rounds, one run per arm per round",
        "",
    ]
    for arm, what in record["arms"].items():
        lines.append(f"{arm:<12} {json.dumps(what, sort_keys=True)}")
    lines.append("")
    lines.append(
        f"{'arm':<12} {'goodput/$ (SLA-met req per USD)':>32} {'e2e p95 s':>10} "
        f"{'quality':>8}   per round goodput/$"
    )
    for arm in record["arms"]:
        summary = summarize_arm(record["runs"][arm])
        cells = [summary[m]["median"] for m in METRICS]
        shown = [f"{c:.4g}" if c is not None else "n/a" for c in cells]
        rounds = ", ".join(f"{v:.4g}" for v in summary["goodput_per_usd"]["rounds"])
        lines.append(f"{arm:<12} {shown[0]:>32} {shown[1]:>10} {shown[2]:>8}   {rounds}")
    lines.append("")
    lines.append("ratio to default (median ratio [95% bootstrap interval]; quality paired):")
    for arm in record["arms"]:
        if arm == "default":
            continue
        cells = []
        for metric, value in ratios(record, arm).items():
            cells.append(
                f"{metric} {value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]"
                if value
                else f"{metric} n/a"
            )
        lines.append(f"  {arm:<12} " + "; ".join(cells))
    promise = ratios(record, "tuned")["goodput_per_usd"]
    if promise:
        met = "met" if promise[0] >= 1.5 else "not met"
        lines.append(f"promise (tuned >= 1.5x default goodput/$): {met} ({promise[0]:.2f}x)")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def header(core: str) -> dict[str, Any]:
    """Where and when it ran."""
    from tuner.tracking import machine_tags

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "vllm": machine_tags().get("fmtune.vllm_version", "?"),
        "load_avg_start": list(os.getloadavg()),
        "foreign_engines_at_start": foreign_engines(),
        "pinned_core": core,
    }


def main() -> None:
    """Measure the arms interleaved and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="quickstart")
    parser.add_argument("--storage", default=f"sqlite:///{REPO / 'out/quickstart/study.db'}")
    parser.add_argument("--experiment", type=Path, default=REPO / "experiments/quickstart.yaml")
    parser.add_argument("--trial", type=int, default=None, help="this trial, not the best")
    parser.add_argument("--rounds", type=int, default=3, help="rounds in this invocation")
    parser.add_argument("--arm", action="append", default=[], help="NAME=knob=value,...")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=600.0,
        help="start no round that would end past this many seconds (last round as estimate)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="add rounds to the json's (same trial and arms)"
    )
    parser.add_argument("--report", action="store_true", help="only render the stored json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.report:
        text = render(json.loads(REPORT_JSON.read_text()))
        REPORT_TXT.write_text(text)
        print(text, end="")
        return

    study = optuna.load_study(study_name=args.study, storage=args.storage)
    trial = study.trials[args.trial] if args.trial is not None else best_trial(study)
    experiment = load_experiment(args.experiment, need_tune=True)
    specs = {"tuned": tuned_spec(experiment, trial.params)}
    specs = {"default": default_spec(specs["tuned"]), **specs}
    for text in args.arm:
        name, knobs = parse_arm(text)
        specs[name] = changed(specs["tuned"], knobs)

    core = str(choose_cpu_core(available_cpu_cores(), []))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = core
    started = time.monotonic()
    stored = {
        k: v
        for k, v in trial.user_attrs.get(ATTR_METRICS, {}).items()
        if k in ("cost_per_1k_usd", "e2e_p95_s", "quality", "sla_attainment")
    }
    tuned = specs["tuned"]
    meta = header(core)
    record: dict[str, Any] = {
        "headers": [meta],
        "study": args.study,
        "trial": trial.number,
        "trial_params": trial.params,
        "trial_metrics": stored,
        "experiment": str(
            args.experiment.relative_to(REPO)
            if args.experiment.is_absolute() and args.experiment.is_relative_to(REPO)
            else args.experiment
        ),
        "workload": tuned.workload.model_dump(mode="json"),
        "sla_e2e_s": tuned.sla.e2e_s,
        "arms": {name: describe(s) for name, s in specs.items()},
        "runs": {name: [] for name in specs},
    }
    if args.resume and REPORT_JSON.is_file():
        earlier = json.loads(REPORT_JSON.read_text())
        if earlier.get("trial") != trial.number or earlier.get("arms") != record["arms"]:
            raise SystemExit(f"{REPORT_JSON}: another trial or other arms; run without --resume")
        record["headers"] = [*(earlier.get("headers") or [earlier["header"]]), meta]
        record["runs"] = earlier["runs"]
    limits = PoolLimits(max_replicas=len(specs), max_memory_gib=18)
    with ReplicaPool(limits, log_dir=REPO / "out" / "tuned_vs_default" / "logs") as pool:
        last_round_s = 0.0
        meta["rounds_run"] = 0
        for round_ in range(args.rounds):
            elapsed = time.monotonic() - started
            if round_ and elapsed + last_round_s > args.budget_s:
                print(f"stopping after {round_} rounds ({elapsed:.0f} s of --budget-s)")
                break
            round_started = time.monotonic()
            starts_s = 0.0  # the first round starts every replica: not in the next's estimate
            for name, spec in specs.items():
                metrics = execute_run(spec, pool).metrics_dict()
                record["runs"][name].append(metrics)
                if round_ == 0:
                    starts_s += float(metrics.get("replica_start_s") or 0.0)
                print(
                    f"round {round_ + 1} {name}: goodput/$ {goodput_per_usd(metrics)}, "
                    f"e2e p95 {metrics.get('e2e_p95_s')}, quality {metrics.get('quality')}, "
                    f"start {metrics.get('replica_start_s')}",
                    flush=True,
                )
                REPORT_JSON.write_text(json.dumps(record, indent=2) + "\n")
            last_round_s = time.monotonic() - round_started - starts_s
            meta["rounds_run"] = round_ + 1
    meta["wall_s"] = round(time.monotonic() - started, 1)
    meta["load_avg_end"] = list(os.getloadavg())
    REPORT_JSON.write_text(json.dumps(record, indent=2) + "\n")
    text = render(record)
    REPORT_TXT.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
