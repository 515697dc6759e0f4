"""Engine benchmark: cold start, warm reuse, output tokens/s and RSS per model and dtype.

Runs real vLLM CPU replicas of every prepared catalog model (or those named) and prints, per
model, for float32 and bfloat16 (or the dtypes named):
- cold start time (launch until /v1/models answers),
- warm reuse time (asking the pool again for a running config; the median of several),
- output tokens/s, TTFT and TPOT at concurrency 1, 8 and 32 (fixed-length requests,
  ignore_eos): a model's engines of all dtypes run at once and the measurements are
  interleaved over several rounds (medians), so a change in machine load hits every dtype
  alike and the float32/bfloat16 ratio comes from the same run,
- resident memory (RSS of the server and its workers) after the load.

Engines run eagerly (enforce_eager, as the shipped CPU experiments do: a start of about half
the compiled one for about 10% fewer tokens/s), max_num_seqs 32, max_model_len 2048.

Models run one after the other (a model's engines stop before the next model's start), so a
large model can be measured alone, one dtype at a time, in pieces: `--models NAME --dtypes
bfloat16 --append reports/engine_bench_models.json` adds a piece to an earlier run's file.
The header names the machine, its load, the date and how many vLLM processes of others were
running at the start (the engine lane contended when > 0).

Usage: .venv/bin/python benchmarks/engine_bench.py [--models smollm2-135m ...]
       [--dtypes float32 bfloat16] [--max-tokens 64] [--rounds 3]
       [--json reports/engine_bench_models.json] [--append] | tee -a reports/engine_bench_models.txt
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from lane import foreign_engines

from runtime.engine.config import EngineConfig
from runtime.engine.models import CATALOG, is_prepared
from runtime.engine.pool import PoolLimits, ReplicaPool
from runtime.engine.probe import run_probe
from runtime.engine.replica import Replica

CONCURRENCIES = (1, 8, 32)
DTYPES = ("float32", "bfloat16")


def _probe(
    replica: Replica, model: str, concurrency: int, max_tokens: int
) -> dict[str, float | int | None]:
    """One fixed-length load at `concurrency` (4 requests at 1, else one per stream)."""
    requests = 4 if concurrency == 1 else concurrency
    result = asyncio.run(
        run_probe(
            replica.base_url,
            model,
            requests=requests,
            concurrency=concurrency,
            max_tokens=max_tokens,
            replica=replica,
        )
    )
    return result.metrics()


def bench_model(
    model: str, dtypes: list[str], max_tokens: int, rounds: int, reuse_trials: int
) -> dict[str, dict[str, float]]:
    """All measurements of one model, per dtype; its engines stop before returning."""
    results: dict[str, dict[str, float]] = {dtype: {} for dtype in dtypes}
    samples: dict[str, dict[str, list[float]]] = {dtype: {} for dtype in dtypes}
    with ReplicaPool(PoolLimits(max_replicas=len(dtypes), max_memory_gib=22)) as pool:
        replicas: dict[str, Replica] = {}
        for dtype in dtypes:  # every engine up first, so load drift hits all alike
            config = EngineConfig(
                model=model, dtype=dtype, max_num_seqs=32, max_model_len=2048, enforce_eager=True
            )
            (replica,) = pool.acquire(config)
            replicas[dtype] = replica
            results[dtype]["cold_start_s"] = float(replica.start_s or 0.0)
            reuse = []
            for _ in range(reuse_trials):
                started = time.perf_counter()
                (again,) = pool.acquire(config)
                reuse.append(time.perf_counter() - started)
                assert again is replica
            results[dtype]["warm_reuse_ms"] = 1000 * statistics.median(reuse)
            _probe(replica, model, 2, 8)  # warm-up: first calls pay one-time costs
            print(f"[{model} {dtype}] cold start {results[dtype]['cold_start_s']:.1f}s", flush=True)
        for round_index in range(rounds):
            for concurrency in CONCURRENCIES:
                for dtype in dtypes:  # interleaved: the other engines idle meanwhile
                    metrics = _probe(replicas[dtype], model, concurrency, max_tokens)
                    for key, value in (
                        (f"tok_s_c{concurrency}", metrics["output_tokens_per_s"]),
                        (f"ttft_p50_s_c{concurrency}", metrics["ttft_p50_s"]),
                        (f"tpot_p50_s_c{concurrency}", metrics["tpot_p50_s"]),
                    ):
                        samples[dtype].setdefault(key, []).append(float(value or 0.0))
                    print(
                        f"[{model}] round {round_index} c={concurrency} {dtype}: "
                        f"{metrics['output_tokens_per_s']:.1f} tok/s",
                        flush=True,
                    )
        for dtype in dtypes:
            for key, values in samples[dtype].items():
                results[dtype][key] = statistics.median(values)
            results[dtype]["rss_gib"] = replicas[dtype].rss_bytes() / 1024**3
    return results


def table(model: str, results: dict[str, dict[str, float]], rounds: int, max_tokens: int) -> str:
    """One model's measurements, one column per dtype (and the f32/bf16 ratio with both)."""
    dtypes = list(results)
    ratio = dtypes == list(DTYPES)
    lines = [f"{model}: medians of {rounds} interleaved rounds, {max_tokens} tokens per request"]
    lines.append(
        f"{'metric':<22}"
        + "".join(f"{dtype:>12}" for dtype in dtypes)
        + (f"{'f32/bf16':>12}" if ratio else "")
    )
    for key in results[dtypes[0]]:
        values = [results[dtype][key] for dtype in dtypes]
        line = f"{key:<22}" + "".join(f"{value:>12.3f}" for value in values)
        if ratio:
            line += f"{values[0] / values[1] if values[1] else float('nan'):>12.2f}"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    """Benchmark the chosen models and dtypes, print one table per model, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    prepared = [name for name in CATALOG if is_prepared(name)]
    parser.add_argument("--models", nargs="+", default=prepared, choices=sorted(CATALOG))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reuse-trials", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds per point.")
    parser.add_argument("--json", type=Path, default=None, help="Also write results here.")
    parser.add_argument(
        "--append", action="store_true", help="Merge into the --json file's earlier results."
    )
    args = parser.parse_args()

    load = "/".join(f"{value:.1f}" for value in os.getloadavg())
    header: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "load_average": load,
        "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "other_vllm_processes": foreign_engines(),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
    }
    print(
        f"engine bench; {header['machine']}, load average {load} at the start, {header['date']}, "
        f"{header['other_vllm_processes']} other vLLM processes running at the start",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    if args.append and args.json and args.json.exists():
        runs = json.loads(args.json.read_text())["runs"]
    for model in args.models:
        results = bench_model(model, args.dtypes, args.max_tokens, args.rounds, args.reuse_trials)
        print()
        print(table(model, results, args.rounds, args.max_tokens), flush=True)
        runs.append({"model": model, **header, "results": results})
        if args.json:  # after every model, so a piece cut short keeps what it measured
            args.json.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
