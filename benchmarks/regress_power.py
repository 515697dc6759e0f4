"""How often `fmtune regress` cries wolf, and how often it sees a real slowdown (issue 12).

On real vLLM CPU replicas of the bundled SmolLM2-135M, the quickstart's extraction app
(experiments/quickstart.yaml: single architecture, JSON, max_num_seqs 16, block 128, eager)
served in bfloat16 with a small closed workload (3 requests, 3 users, 1 warm-up request:
one wave of three concurrent requests per repeat, about 10 s on one core).
Every comparison goes through `tuner.regress.measure_all`, the function `fmtune regress`
runs: the deployment measured with `repeats` 3 and each objective of the quickstart
(cost_per_1k_usd, e2e_p95_s, quality) compared with the baseline's own measurements by
`compare_objective` and `classify` (regressed: ratio >= 1.10 the worse way and its 95%
bootstrap interval excludes 1). Every replica is pinned to the core a lone replica gets, so
hot replicas of different configs compete for the same core as a nightly regress would.

Phases (each one engine-holding invocation; results go to reports/regress_power.json and
the whole table is rendered again into reports/regress_power.txt after each phase):

- ``calibrate``: the base config and each candidate knob change (``--candidate``, e.g.
  ``engine.max_num_batched_tokens=32``), measured interleaved on hot replicas (``--rounds``
  runs of each, one repeat per run), give each candidate's slowdown of e2e p95 (ratio of
  medians with a bootstrap interval): what picks the knobs of the next phase.
- ``nights``: the unchanged deployment: a baseline run, then ``--nights`` nights back to
  back on the same hot replica, each compared with the baseline; a night with any objective
  regressed is a false alarm (improved verdicts are counted too). The base config's runs
  of the slowdown invocations (each a new engine process, later) are compared with the same
  baseline by `compare_deployment` too: later nights, as a nightly regress meets them.
- ``slowdown`` (once per ``--level``, with its ``--knob``): a baseline of the base config
  (3 repeats), then the deployment with the knob changed measured ``--repetitions`` times,
  each compared with that baseline, as `fmtune regress` does after an edited DEPLOY.yaml;
  detected when the latency objective (e2e_p95_s) regressed. The repetitions share the one
  baseline (a nightly regress compares with one stored baseline too). A closing run of the
  base config gives the drift, and the slowdown is measured separately from the same
  invocation: the median of all slowed repeats over that of all base repeats, with its
  bootstrap interval.
- ``report``: render the table from the json only.

Besides the counts, the table gives what `tuner.regress.simulate_verdicts` predicts for the
noise the nights measured (coefficient of variation between repeats) and the slowdowns'
measured ratios.

Usage (each engine phase stops starting runs past --budget-s, 600 s; run it again to
resume from the json):
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/regress_power.py --phase calibrate \\
        --candidate engine.max_num_batched_tokens=32 --candidate engine.max_num_seqs=2
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/regress_power.py --phase nights
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/regress_power.py --phase slowdown \\
        --level 10% --knob engine.max_num_seqs=4,engine.max_num_batched_tokens=8
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/regress_power.py --phase slowdown \\
        --level 25% --knob engine.max_num_seqs=2
    .venv/bin/python benchmarks/regress_power.py --phase report
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from lane import foreign_engines

from runtime.engine.pool import PoolLimits, ReplicaPool, available_cpu_cores, choose_cpu_core
from runtime.run import RunSpec, execute_run
from runtime.stats import ratio_of_medians
from tuner.experiment import Experiment, load_experiment, run_spec_of
from tuner.regress import (
    BaselineDeployment,
    DeploymentResult,
    Measurement,
    compare_deployment,
    measure_all,
    simulate_verdicts,
)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "quickstart.yaml"
REPORT_JSON = REPO / "reports" / "regress_power.json"
REPORT_TXT = REPO / "reports" / "regress_power.txt"
LATENCY = "e2e_p95_s"
BASE_OVERRIDES: dict[str, Any] = {
    "deployment.models.llm.engine.dtype": "bfloat16",
    "workload.num_requests": 3,
    "workload.arrivals": {"kind": "closed", "users": 3, "think_time_s": 0},
    "workload.warmup_requests": 1,
}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def parse_knobs(text: str) -> dict[str, Any]:
    """'engine.max_num_batched_tokens=32,engine.block_size=32' -> experiment overrides (an
    `engine.X` knob is the llm model key's engine field, as in search spaces)."""
    knobs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"knob '{item}': expected name=value")
        if key.startswith("engine."):
            key = "deployment.models.llm." + key
        knobs[key] = yaml.safe_load(value)
    return knobs


def experiment(knobs: Mapping[str, Any] | None = None) -> Experiment:
    """The benchmark's experiment: the quickstart with the base overrides and `knobs`."""
    return load_experiment(EXPERIMENT, {**BASE_OVERRIDES, **(knobs or {})})


def spec_of(knobs: Mapping[str, Any] | None = None, repeats: int = 1) -> RunSpec:
    """The RunSpec measured, with its workload's repeats."""
    spec = run_spec_of(experiment(knobs))
    workload = spec.workload.model_copy(update={"repeats": repeats})
    return spec.model_copy(update={"workload": workload})


def baseline_of(name: str, spec: RunSpec, metrics: Mapping[str, Any]) -> BaselineDeployment:
    """What `fmtune regress` would load from an export: measure `spec` today and compare it
    with `metrics` (the baseline's metrics.json), under the quickstart's objectives and its
    regress thresholds and repeats."""
    base = experiment()
    assert base.tune is not None
    return BaselineDeployment(
        name=name,
        spec=spec,
        objectives=tuple(base.tune.objectives),
        regress=base.tune.regress,
        metrics=dict(metrics),
        origin="benchmarks/regress_power.py",
    )


def pin_replicas() -> str:
    """Pin every replica this process starts to the core a lone replica gets (the pool
    spreads replicas of different configs over cores otherwise, and a core is not a knob)."""
    core = str(choose_cpu_core(available_cpu_cores(), []))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = core
    return core


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------


def header() -> dict[str, Any]:
    """Where and when a phase ran."""
    from tuner.tracking import machine_tags

    tags = machine_tags()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "vllm": tags.get("fmtune.vllm_version", "?"),
        "load_avg_start": list(os.getloadavg()),
        "foreign_engines_at_start": foreign_engines(),
        "workload": spec_of().workload.model_dump(mode="json", exclude={"repeats", "seed"}),
    }


def load_record() -> dict[str, Any]:
    """The json written so far (phases add to it)."""
    return json.loads(REPORT_JSON.read_text()) if REPORT_JSON.is_file() else {}


def save_record(record: Mapping[str, Any]) -> None:
    """Write the json and render the table into the txt."""
    REPORT_JSON.parent.mkdir(parents=True, exist_ok=True)
    REPORT_JSON.write_text(json.dumps(record, indent=2) + "\n")
    REPORT_TXT.write_text(render(record))


def finish(meta: dict[str, Any], started: float) -> dict[str, Any]:
    """The phase's header completed with its duration and the load at its end."""
    return {
        **meta,
        "wall_s": round(time.monotonic() - started, 1),
        "load_avg_end": list(os.getloadavg()),
    }


def comparison_rows(result: DeploymentResult) -> dict[str, Any]:
    """A night's verdicts per objective, with ratios and intervals."""
    return {
        c.metric: {
            "verdict": c.verdict,
            "ratio": c.ratio,
            "low": c.ratio_low,
            "high": c.ratio_high,
            "method": c.method,
        }
        for c in result.comparisons
    }


def repeat_values(metrics: Mapping[str, Any], metric: str) -> list[float]:
    """A metric's value in every repeat of a run."""
    return [float(v) for v in (metrics.get("repeat_values") or {}).get(metric, [])]


# --------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------


def make_pool(replicas: int) -> ReplicaPool:
    """Hot replicas for the phase, one per engine config, logs under out/regress_power."""
    limits = PoolLimits(max_replicas=replicas, max_memory_gib=16)
    return ReplicaPool(limits, log_dir=REPO / "out" / "regress_power" / "logs")


def measure(pool: ReplicaPool, spec: RunSpec) -> dict[str, Any]:
    """metrics.json of one run."""
    return execute_run(spec, pool).metrics_dict()


def within_budget(args: argparse.Namespace, started: float, done: int) -> bool:
    """Whether another unit (night, repetition) fits in the phase's --budget-s, estimated
    as the average of the units done so far (start-up included: a safe overestimate)."""
    elapsed = time.monotonic() - started
    if done == 0 or elapsed + elapsed / done <= args.budget_s:
        return True
    print(f"stopping after {done} this time ({elapsed:.0f} s): run the phase again to resume")
    return False


def phase_calibrate(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """Base and candidates interleaved on hot replicas (two at a time: the base and the
    candidate under test), `rounds` single-repeat runs each."""
    started, meta = time.monotonic(), header()
    stored = record.get("calibration") or {}
    results: list[dict[str, Any]] = [
        {"rounds": stored.get("rounds"), "invocation": 0, **row}  # rows of a one-header record
        for row in stored.get("results", [])
    ]
    earlier = stored.get("headers") or ([stored["header"]] if "header" in stored else [])
    headers = [*earlier, meta]
    with make_pool(2) as pool:
        for index, candidate in enumerate(args.candidate):
            if not within_budget(args, started, index):
                break
            knobs = parse_knobs(candidate)
            base_values: list[float] = []
            cand_values: list[float] = []
            for _ in range(args.rounds):
                base_values += repeat_values(measure(pool, spec_of()), LATENCY)
                cand_values += repeat_values(measure(pool, spec_of(knobs)), LATENCY)
            ratio, low, high = ratio_of_medians(base_values, cand_values)
            results.append(
                {
                    "candidate": candidate,
                    "base": base_values,
                    "slowed": cand_values,
                    "ratio": ratio,
                    "low": low,
                    "high": high,
                    "rounds": args.rounds,
                    "invocation": len(headers) - 1,
                }
            )
            print(f"{candidate}: e2e p95 ratio {ratio:.3f} [{low:.3f}, {high:.3f}]", flush=True)
            record["calibration"] = {"headers": headers, "results": results}
            save_record(record)
    headers[-1] = finish(meta, started)
    record["calibration"] = {"headers": headers, "results": results}


def phase_nights(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """A baseline, then `nights` unchanged nights compared with it on the same hot replica
    (resumed from the json when it holds fewer nights: the stored baseline is kept)."""
    started, meta = time.monotonic(), header()
    stored = record.get("nights") or {}
    nights: list[dict[str, Any]] = list(stored.get("nights", []))
    headers = [*stored.get("headers", []), meta]
    with make_pool(1) as pool:
        base_metrics = stored.get("baseline")
        if base_metrics is None:
            base_metrics = measure(pool, spec_of(repeats=3))
        baseline = baseline_of("unchanged", spec_of(), base_metrics)
        while len(nights) < args.nights and within_budget(args, started, len(nights)):
            (result,) = measure_all([baseline], lambda spec: measure(pool, spec))
            nights.append(verdict_row(result, invocation=len(headers) - 1))
            print(
                f"night {len(nights)}: {result.verdict}; "
                + ", ".join(c.line() for c in result.comparisons),
                flush=True,
            )
            record["nights"] = {"headers": headers, "baseline": base_metrics, "nights": nights}
            save_record(record)
    headers[-1] = finish(meta, started)
    record["nights"] = {"headers": headers, "baseline": base_metrics, "nights": nights}


def verdict_row(result: DeploymentResult, invocation: int) -> dict[str, Any]:
    """One night's or one repetition's record: the verdict, each objective's comparison, the
    repeat values measured, and the invocation that measured them."""
    assert result.metrics is not None
    return {
        "verdict": result.verdict,
        "comparisons": comparison_rows(result),
        "values": result.metrics.get("repeat_values", {}),
        "invocation": invocation,
    }


def phase_slowdown(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """One slowdown level: a baseline of the base config (3 repeats), then `repetitions`
    measurements of the slowed config, each compared with that baseline by `measure_all` as
    after an edited DEPLOY.yaml, then the base config once more (the drift, and with the
    baseline the base side of the separately measured slowdown)."""
    started, meta = time.monotonic(), header()
    level, knob = args.level, args.knob
    levels = record.setdefault("slowdowns", {})
    stored = levels.get(level) or {}
    if stored.get("knob") not in (None, knob):
        stored = {}  # another knob: start over
    reps: list[dict[str, Any]] = list(stored.get("repetitions", []))
    headers = [*stored.get("headers", []), meta]
    entry: dict[str, Any] = {"knob": knob, "headers": headers, "repetitions": reps}
    with make_pool(2) as pool:
        base_metrics = stored.get("baseline")
        if base_metrics is None:
            base_metrics = measure(pool, spec_of(repeats=3))
        entry["baseline"] = base_metrics
        baseline = baseline_of(f"slowed {level}", spec_of(parse_knobs(knob)), base_metrics)
        while len(reps) < args.repetitions and within_budget(args, started, len(reps) + 1):
            (result,) = measure_all([baseline], lambda spec: measure(pool, spec))
            reps.append(verdict_row(result, invocation=len(headers) - 1))
            print(
                f"{level} ({knob}) repetition {len(reps)}: "
                + ", ".join(c.line() for c in result.comparisons),
                flush=True,
            )
            levels[level] = entry
            save_record(record)
        if within_budget(args, started, len(reps) + 1):
            closing = measure(pool, spec_of(repeats=3))
            entry["closing_base_values"] = closing.get("repeat_values", {})
            entry["closing_base"] = closing
    headers[-1] = finish(meta, started)
    levels[level] = entry


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def noise_cv(runs: Sequence[Mapping[str, Sequence[float]]], metric: str) -> float | None:
    """Median coefficient of variation of a metric between the repeats of one run."""
    cvs = [
        float(np.std(v, ddof=1) / np.mean(v))
        for run in runs
        if len(v := run.get(metric, [])) >= 2 and np.mean(v) > 0
    ]
    return float(np.median(cvs)) if cvs else None


def _fmt_ratio(ratio: float | None, low: float | None, high: float | None) -> str:
    if ratio is None or low is None or high is None:
        return "n/a"
    return f"{ratio:.3f} [{low:.3f}, {high:.3f}]"


def _head(meta: Mapping[str, Any]) -> str:
    contended = meta.get("foreign_engines_at_start", 0)
    load = meta.get("load_avg_start", [math.nan])[0]
    end = meta.get("load_avg_end", [math.nan])[0]
    workload = meta.get("workload")
    shown = (
        f"\n  workload: {workload['num_requests']} requests, {workload['arrivals']}, "
        f"{workload['warmup_requests']} warm-up"
        if workload
        else ""
    )
    return (
        f"  ran {meta.get('date')} on {meta.get('host')} ({meta.get('cpus')} cpus, vLLM "
        f"{meta.get('vllm')}), {meta.get('wall_s', '?')} s; load avg {load:.2f} -> "
        f"{end:.2f}; other vLLM servers at start: {contended}" + shown
    )


def _heads(phase: Mapping[str, Any]) -> list[str]:
    """One header line per invocation that ran the phase (a resumed phase has several)."""
    metas = phase.get("headers") or ([phase["header"]] if "header" in phase else [])
    return [_head(meta) for meta in metas]


def later_nights(record: Mapping[str, Any]) -> list[str]:
    """The base config's runs in the slowdown invocations (each on a new engine process, later
    than the nights) compared with the nights' baseline by `compare_deployment`, the rule
    measure_all applies: more unchanged nights, as a nightly regress meets them."""
    nights = record.get("nights") or {}
    if "baseline" not in nights:
        return []
    base = experiment()
    assert base.tune is not None
    before = Measurement.from_metrics(nights["baseline"])
    lines: list[str] = []
    verdicts: list[str] = []
    for level, entry in (record.get("slowdowns") or {}).items():
        for label, metrics in (("baseline", entry.get("baseline")),
                               ("closing", entry.get("closing_base"))):  # fmt: skip
            if not metrics:
                continue
            comparisons = compare_deployment(
                "unchanged", base.tune.objectives, base.tune.regress, before,
                Measurement.from_metrics(metrics),
            )  # fmt: skip
            worst = {c.verdict for c in comparisons}
            verdict = "regressed" if "regressed" in worst else (
                "improved" if "improved" in worst else "unchanged")  # fmt: skip
            verdicts.append(verdict)
            latency = next(c for c in comparisons if c.metric == LATENCY)
            lines.append(
                f"    {level} invocation's {label} base run: {verdict} "
                f"(e2e p95 {latency.ratio_text()})"
            )
    if not verdicts:
        return []
    head = (
        f"  later nights (the base config's runs of the slowdown invocations, new engine "
        f"processes, against the nights' baseline): regressed {verdicts.count('regressed')}/"
        f"{len(verdicts)}, improved {verdicts.count('improved')}/{len(verdicts)}"
    )
    return [head, *lines]


def render(record: Mapping[str, Any]) -> str:
    """The whole table from the json."""
    lines = [
        "fmtune regress: false alarms and detection power on real replicas (issue 12)",
        "quickstart extraction app (single, json), SmolLM2-135M bfloat16, one vLLM CPU replica "
        "pinned to one core; repeats 3 per night (workload per phase below)",
        "rule: tuner.regress.measure_all/classify, threshold 10%, 95% bootstrap interval must "
        "exclude 1; objectives cost_per_1k_usd, e2e_p95_s, quality (paired)",
        "",
    ]
    calibration = record.get("calibration")
    if calibration:
        lines.append(
            "calibration: e2e p95 of each candidate / base, interleaved single-repeat runs "
            "(rounds each), by invocation"
        )
        heads = _heads(calibration)
        for index, head in enumerate(heads):
            lines.append(head)
            for row in calibration["results"]:
                if row.get("invocation", 0) == index:
                    ratio = _fmt_ratio(row["ratio"], row["low"], row["high"])
                    rounds = row.get("rounds", calibration.get("rounds"))
                    lines.append(f"    {row['candidate']:<45} {ratio}  ({rounds} rounds)")
        lines.append("")
    nights = record.get("nights")
    if nights:
        runs = nights["nights"]
        alarms = sum(n["verdict"] == "regressed" for n in runs)
        improved = sum(n["verdict"] == "improved" for n in runs)
        metrics = sorted({m for n in runs for m in n["comparisons"]})
        lines.append(f"(a) unchanged deployment, {len(runs)} nights back to back")
        lines += _heads(nights)
        if len(nights.get("headers", [])) > 1:
            lines.append(
                "  (resumed: nights of later invocations ran on a new engine process, the "
                "baseline on the first one's)"
            )
        lines.append(
            f"  false alarms (any objective regressed): {alarms}/{len(runs)} = "
            f"{alarms / len(runs):.0%}; nights called improved: {improved}/{len(runs)}"
        )
        for metric in metrics:
            verdicts = [n["comparisons"][metric]["verdict"] for n in runs]
            ratios = [n["comparisons"][metric]["ratio"] for n in runs]
            shown = [r for r in ratios if r is not None]
            spread = f"{min(shown):.3f}..{max(shown):.3f}" if shown else "n/a"
            lines.append(
                f"  {metric:<16} regressed {verdicts.count('regressed')}, improved "
                f"{verdicts.count('improved')}, ratios {spread}"
            )
        cv = noise_cv(
            [nights["baseline"].get("repeat_values", {})] + [n["values"] for n in runs], LATENCY
        )
        if cv is not None:
            sim = simulate_verdicts(
                shift=1.0, noise_cv=cv, n_baseline=3, n_current=3, threshold=0.10, nights=400
            )
            lines.append(
                f"  e2e p95 noise between repeats: CV {cv:.1%}; simulate_verdicts "
                f"at that CV predicts {sim['regressed']:.1%} regressed per night"
            )
        lines += later_nights(record)
        lines.append("")
    slowdowns = record.get("slowdowns")
    if slowdowns:
        lines.append(
            "(b) real slowdowns: per level, one baseline of the base config (3 repeats), then "
            "the slowed config measured 5 times, each compared with it by measure_all"
        )
        lines.append(
            "    measured slowdown: median e2e p95 of all slowed repeats / of the base repeats "
            "of the same invocation (baseline and a closing base run), 95% bootstrap interval"
        )
        table: list[str] = []
        for level, entry in slowdowns.items():
            lines.append(f"  target {level}: {entry['knob']}")
            lines += ["  " + head for head in _heads(entry)]
            mine = entry["repetitions"]
            base_runs = [entry["baseline"].get("repeat_values", {})]
            if entry.get("closing_base_values"):
                base_runs.append(entry["closing_base_values"])
            base_all = [v for run in base_runs for v in run.get(LATENCY, [])]
            slowed_all = [v for m in mine for v in m["values"].get(LATENCY, [])]
            measured = ratio_of_medians(base_all, slowed_all) if base_all and slowed_all else None
            shown = _fmt_ratio(*measured) if measured else "n/a"
            hits = sum(m["comparisons"][LATENCY]["verdict"] == "regressed" for m in mine)
            anyhit = sum(m["verdict"] == "regressed" for m in mine)
            detected = f"{hits}/{len(mine)}"
            table.append(
                f"  {level:<6} {entry['knob']:<54} {shown:<26} {detected:<11} {anyhit}/{len(mine)}"
            )
            per_rep = ", ".join(
                f"{m['comparisons'][LATENCY]['ratio']:.3f}"
                for m in mine
                if m["comparisons"][LATENCY]["ratio"] is not None
            )
            table.append(f"  {'':<6} each repetition's e2e p95 ratio: {per_rep}")
            if len(base_runs) > 1:
                drift = ratio_of_medians(base_runs[0][LATENCY], base_runs[1][LATENCY])
                table.append(f"  {'':<6} base drift (closing / baseline): {_fmt_ratio(*drift)}")
            cv = noise_cv([*base_runs, *(m["values"] for m in mine)], LATENCY)
            if measured and cv is not None:
                sim = simulate_verdicts(
                    shift=measured[0], noise_cv=cv, n_baseline=3, n_current=3,
                    threshold=0.10, nights=400,
                )  # fmt: skip
                table.append(
                    f"  {'':<6} simulate_verdicts at shift {measured[0]:.3f}, CV {cv:.1%}: "
                    f"detection {sim['regressed']:.0%}"
                )
        lines.append(
            f"  {'target':<6} {'knob':<54} {'measured slowdown [95%]':<26} "
            f"{'e2e p95 hit':<11} any objective"
        )
        lines += table
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Run one phase, then print the whole table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--phase", choices=["calibrate", "nights", "slowdown", "report"], required=True
    )
    parser.add_argument(
        "--candidate",
        action="append",
        default=[],
        help="knob change to calibrate, e.g. engine.max_num_batched_tokens=32",
    )
    parser.add_argument("--rounds", type=int, default=3, help="calibration runs per config")
    parser.add_argument("--nights", type=int, default=10)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--level", default="", help="name of the slowdown, e.g. 10%%")
    parser.add_argument("--knob", default="", help="the slowing knob change, e.g. engine.x=1")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=600.0,
        help="start no night or repetition that would end past this many seconds of the "
        "phase (its average so far as the estimate); run the phase again to resume",
    )
    parser.add_argument("--fresh", action="store_true", help="forget this phase's stored runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    record = load_record()
    if args.fresh:
        record.pop({"slowdown": "slowdowns"}.get(args.phase, args.phase), None)
    if args.phase != "report":
        record["pinned_core"] = pin_replicas()
    if args.phase == "calibrate":
        if not args.candidate:
            parser.error("--phase calibrate needs at least one --candidate")
        phase_calibrate(args, record)
    elif args.phase == "nights":
        phase_nights(args, record)
    elif args.phase == "slowdown":
        if not (args.level and args.knob):
            parser.error("--phase slowdown needs --level and --knob")
        phase_slowdown(args, record)
    if args.phase != "report":
        save_record(record)  # the json only from an engine phase: report may run beside one
    text = render(record)
    REPORT_TXT.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
