"""How well the simulator predicts real runs (issue 11: <= 5% median e2e p50 error, <= 10% p95).

Each configuration is a short real run of the extraction app on SmolLM2-135M with vLLM's CPU
build (`runtime.run.execute_run`, the path of `fmtune run`), then the same RunSpec simulated
(`runtime.simrun.simulate_run`) with the stored step-time profile of its engine
(`fmtune profile smollm2-135m --set dtype=float32 ...`, measured on probes of random token
ids, never on these runs). The configurations differ from the profiled one in batch size,
KV block size, token budget, replica count, routing policy, the app's architecture and
format, and the arrival process; every run has the same workload seed.

Every real run starts with the prefix caches of its replicas emptied (runtime.run does it
before each repeat, through vLLM's /reset_prefix_cache): the runs send the same examples, and
a replica that served them before would skip their prefills. The simulator starts from the
same state: empty caches, then the warm-up requests' shared content.

Request shapes (each call's prompt and output tokens) come from two places, both reported:

- **own trace**: the real run's own trace (the simulator gets exactly the token counts of
  the run it predicts: the error is the timing model's alone);
- **calibration trace**: the trace of the first run of the same app configuration (the
  situation of a simulated trial in a study, whose shapes come from one calibration run).

Per metric (e2e p50 and p95, TTFT p50, TPOT p50, throughput, SLA attainment) the median and
the worst absolute percentage error over the configurations are printed and written to
reports/sim_fidelity.txt; the raw numbers (and the shapes, so `--resimulate` can predict
again after a change of the simulator without running an engine) go to
reports/sim_fidelity.json.

Usage (real engines: hold the engine lock):
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/sim_fidelity.py
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/sim_fidelity.py --resume
        # only the configurations the .json does not hold yet (an interrupted measurement)
    .venv/bin/python benchmarks/sim_fidelity.py --resimulate   # the stored runs, simulated again
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.engine.pool import PoolLimits, ReplicaPool
from runtime.profiler import require_profile
from runtime.run import RunSpec, apply_overrides, execute_run
from runtime.sim.cluster import RequestShape
from runtime.simrun import (
    FIDELITY_METRICS,
    error_summary,
    prediction_errors,
    shapes_from_run,
    simulate_run,
)

#: The profiled engine: what `fmtune profile` measured (the configurations change its knobs).
ENGINE: dict[str, Any] = {
    "model": "smollm2-135m",
    "dtype": "float32",
    "max_model_len": 2048,
    "max_num_seqs": 16,
    "block_size": 128,
    "enforce_eager": True,
}

BASE: dict[str, Any] = {
    "name": "sim-fidelity",
    "app": {"source": "extraction", "architecture": "single", "format": "json"},
    "dataset": {"size": 40, "seed": 0},
    "workload": {
        "arrivals": {"kind": "closed", "users": 4, "think_time_s": 0},
        "num_requests": 12,
        "seed": 0,
    },
    "sla": {"e2e_s": 10},
    "deployment": {
        "models": {"llm": {"engine": ENGINE, "replicas": 1}},
        "router": {"policy": "least_outstanding"},
    },
}


@dataclass(frozen=True)
class Config:
    """One measured configuration: a label and its overrides of BASE (dotted paths)."""

    label: str
    overrides: tuple[tuple[str, Any], ...] = ()

    def spec(self) -> RunSpec:
        return RunSpec.model_validate(apply_overrides(BASE, dict(self.overrides)))

    def app_key(self) -> str:
        """The app configuration whose first run calibrates the others."""
        spec = self.spec()
        return f"{spec.app.architecture}/{spec.app.format.value}"


LOG_DIR = Path("out/sim_fidelity/logs")
"""Where the replicas of the real runs log."""
ENGINE_PATH = "deployment.models.llm.engine"
POISSON = "workload.arrivals"
CONFIGS: tuple[Config, ...] = (
    # the profiled engine, app and arrivals varied (no restart between these)
    Config("single json, 4 users"),
    Config("single json, poisson 0.4 rps", ((POISSON, {"kind": "poisson", "rate_rps": 0.4}),)),
    Config("single json, poisson 1.2 rps", ((POISSON, {"kind": "poisson", "rate_rps": 1.2}),)),
    Config("single yaml, 4 users", (("app.format", "yaml"),)),
    Config("parallel json, 2 users", (("app.architecture", "parallel"),
                                      ("workload.arrivals.users", 2),
                                      ("workload.num_requests", 8))),
    Config("sequential json, 2 users", (("app.architecture", "sequential"),
                                        ("workload.arrivals.users", 2),
                                        ("workload.num_requests", 8))),
    # engine knobs
    Config("max_num_seqs 2", ((f"{ENGINE_PATH}.max_num_seqs", 2),)),
    Config("max_num_seqs 4, 8 users", ((f"{ENGINE_PATH}.max_num_seqs", 4),
                                       ("workload.arrivals.users", 8),
                                       ("workload.num_requests", 16))),
    Config("block_size 32", ((f"{ENGINE_PATH}.block_size", 32),)),
    Config("block_size 64, parallel", ((f"{ENGINE_PATH}.block_size", 64),
                                       ("app.architecture", "parallel"),
                                       ("workload.arrivals.users", 2),
                                       ("workload.num_requests", 8))),
    Config("max_num_batched_tokens 256", ((f"{ENGINE_PATH}.max_num_batched_tokens", 256),)),
    # two replicas (each on its own core)
    Config("2 replicas, least_outstanding, 6 users", (("deployment.models.llm.replicas", 2),
                                                      ("workload.arrivals.users", 6))),
    Config("2 replicas, round_robin, poisson 1 rps", (
        ("deployment.models.llm.replicas", 2), ("deployment.router.policy", "round_robin"),
        (POISSON, {"kind": "poisson", "rate_rps": 1.0}))),
    Config("2 replicas, parallel, 3 users", (("deployment.models.llm.replicas", 2),
                                             ("app.architecture", "parallel"),
                                             ("workload.arrivals.users", 3))),
)  # fmt: skip


def measure(
    configs: tuple[Config, ...],
    pool: ReplicaPool,
    raw: Path,
    header: list[str],
    stored: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run every configuration for real; each record keeps the metrics and the shapes (saved
    to ``raw`` after every run, beside the ``stored`` records of an earlier measurement, so a
    later failure loses no measurement). Returns the stored records and the new ones."""
    records: list[dict[str, Any]] = list(stored or [])
    for index, config in enumerate(configs):
        spec = config.spec()
        started = time.monotonic()
        result = execute_run(spec, pool)
        seconds = time.monotonic() - started
        rows = result.trace.to_dict("records")
        shapes = shapes_from_run(spec, rows, result.examples)
        records.append(
            {
                "label": config.label,
                "app": config.app_key(),
                "measured": _plain(result.metrics_dict()),
                "shapes": [shape.model_dump(mode="json") for shape in shapes],
                "real_seconds": seconds,
                "failed": sum(1 for r in result.results if not r.ok),
                "load_average": os.getloadavg()[0],
            }
        )
        raw.write_text(json.dumps({"header": header, "records": records}, indent=1) + "\n")
        print(
            f"[{index + 1}/{len(configs)}] {config.label}: real e2e p50 "
            f"{records[-1]['measured'].get('e2e_p50_s')} in {seconds:.0f}s",
            flush=True,
        )
    return records


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = (*FIDELITY_METRICS, "e2e_p99_s", "num_requests", "num_failed", "wall_s", "quality")
    return {key: metrics.get(key) for key in keep}


def predict(configs: tuple[Config, ...], records: list[dict[str, Any]]) -> None:
    """Simulate every configuration with its own shapes and with its app's calibration
    shapes; the predictions and errors go into the records."""
    calibration: dict[str, list[RequestShape]] = {}
    for record in records:
        shapes = [RequestShape.model_validate(shape) for shape in record["shapes"]]
        calibration.setdefault(record["app"], shapes)
    for config, record in zip(configs, records, strict=True):
        spec = config.spec()
        profiles = {key: require_profile(m.engine) for key, m in spec.deployment.models.items()}
        own = [RequestShape.model_validate(shape) for shape in record["shapes"]]
        for name, shapes in (("own", own), ("calibration", calibration[record["app"]])):
            started = time.process_time()
            simulated = simulate_run(spec, shapes, profiles)
            predicted = _plain(simulated.metrics_dict())
            record[f"predicted_{name}"] = predicted
            record[f"errors_{name}"] = prediction_errors(predicted, record["measured"])
            record[f"sim_cpu_ms_{name}"] = 1000 * (time.process_time() - started)


def in_config_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records in CONFIGS order (a resumed measurement appends the missing ones)."""
    order = {config.label: index for index, config in enumerate(CONFIGS)}
    return sorted(records, key=lambda record: order.get(record["label"], len(order)))


def lane_note(records: list[dict[str, Any]]) -> str:
    """The load the real runs saw: the 1-minute load average at the end of each run (the
    machine has 2 cores; above 2 other work, other engineers' engines among it, shared them)."""
    loads = [record["load_average"] for record in records if "load_average" in record]
    if not loads:
        return "load average during the real runs: not recorded"
    busy = sum(1 for load in loads if load > 2.0)
    return (
        f"load average (1 min) after the real runs: {min(loads):.1f}-{max(loads):.1f}, above "
        f"2.0 (more work than cores: the engine lane contended) after {busy} of {len(loads)}"
    )


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(records: list[dict[str, Any]], header: list[str]) -> str:
    """The table per configuration and the error summary per metric."""
    lines = [*header, lane_note(records), ""]
    lines.append(
        f"{'configuration':42} {'e2e p50 real':>12} {'sim':>7} {'err%':>6} "
        f"{'ttft p50 real':>13} {'sim':>7} {'tpot real':>9} {'sim':>7} {'rps real':>8} "
        f"{'sim':>6} {'sla real':>8} {'sim':>5}"
    )
    for record in records:
        real, sim, err = record["measured"], record["predicted_own"], record["errors_own"]
        lines.append(
            f"{record['label'][:42]:42} {_cell(real['e2e_p50_s']):>12} "
            f"{_cell(sim['e2e_p50_s']):>7} {_cell(err['e2e_p50_s'], 1):>6} "
            f"{_cell(real['ttft_p50_s']):>13} {_cell(sim['ttft_p50_s']):>7} "
            f"{_cell(real['tpot_p50_s']):>9} {_cell(sim['tpot_p50_s']):>7} "
            f"{_cell(real['requests_per_s']):>8} {_cell(sim['requests_per_s']):>6} "
            f"{_cell(real['sla_attainment'], 2):>8} {_cell(sim['sla_attainment'], 2):>5}"
        )
    for name, title in (("own", "own trace"), ("calibration", "calibration trace")):
        summary = error_summary([record[f"errors_{name}"] for record in records])
        lines += ["", f"absolute percentage error over {len(records)} configurations, "
                  f"shapes from the {title}:", f"{'metric':16} {'median %':>9} {'worst %':>9} "
                  f"{'n':>3}"]  # fmt: skip
        for metric, (median, worst, count) in summary.items():
            lines.append(f"{metric:16} {_cell(median, 1):>9} {_cell(worst, 1):>9} {count:>3}")
    cpu = [record["sim_cpu_ms_own"] for record in records]
    lines += ["", f"simulation CPU time per configuration: median {sorted(cpu)[len(cpu) // 2]:.0f}"
              f" ms, max {max(cpu):.0f} ms"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/sim_fidelity.txt"))
    parser.add_argument(
        "--resimulate",
        action="store_true",
        help="Predict the runs stored in the .json beside --out again (no engine starts).",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Measure only the configurations the .json beside --out does not hold yet.",
    )
    parser.add_argument("--only", type=int, default=None, help="Run only the first N configs.")
    args = parser.parse_args()
    configs = CONFIGS[: args.only] if args.only else CONFIGS
    raw = args.out.with_suffix(".json")
    started = time.monotonic()
    if args.resimulate or args.resume:
        stored = json.loads(raw.read_text())
        records = in_config_order(stored["records"])
        header = [line for line in stored["header"] if not line.startswith("re-simulated at")]
    if args.resume:
        done = {record["label"] for record in records}
        todo = tuple(config for config in configs if config.label not in done)
        load = os.getloadavg()
        header.append(
            f"resumed at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
            f"{len(done)} of {len(configs)} configurations stored, the {len(todo)} others "
            f"measured then, load average {load[0]:.1f} "
            f"{load[1]:.1f} {load[2]:.1f} at the start"
        )
        limits = PoolLimits(max_replicas=3, max_memory_gib=16)
        with ReplicaPool(limits, log_dir=LOG_DIR) as pool:
            records = measure(todo, pool, raw, header, records)
        header.append(f"the resumed real runs took {time.monotonic() - started:.0f}s")
        records = in_config_order(records)
    if args.resimulate or args.resume:
        header.append(
            f"re-simulated at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the "
            f"{len(records)} stored real runs"
        )
        configs = tuple(c for c in CONFIGS if c.label in {r["label"] for r in records})
    else:
        load = os.getloadavg()
        header = [
            f"measured at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"simulator fidelity: {len(configs)} configurations, real runs (runtime.run) vs "
            f"simulated (runtime.simrun), {platform.machine()} {os.cpu_count()} cores, "
            f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the start",
            "profile: the stored one of " + json.dumps(ENGINE, sort_keys=True)
            + " (runtime.profiler; random-token probes, none of these runs)",
        ]  # fmt: skip
        limits = PoolLimits(max_replicas=3, max_memory_gib=16)
        with ReplicaPool(limits, log_dir=LOG_DIR) as pool:
            raw.parent.mkdir(parents=True, exist_ok=True)
            records = measure(configs, pool, raw, header)
        header.append(f"real runs took {time.monotonic() - started:.0f}s in all")
    predict(configs, records)
    text = report(records, header)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    raw.write_text(json.dumps({"header": header, "records": records}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
