"""Engine benchmark: cold start, warm reuse from the pool, and output tokens/s by dtype.

Runs real vLLM CPU replicas of the bundled model and prints:
- cold start time (launch until /v1/models answers) per dtype,
- warm reuse time (asking the pool again for a running config; the median of several),
- output tokens/s, TTFT and TPOT at concurrency 1, 8 and 32 (fixed-length requests,
  ignore_eos) for float32 and bfloat16: both engines run at once and the measurements are
  interleaved over several rounds (medians), so a change in machine load hits both alike;
  the float32/bfloat16 ratios come from the same run.

Usage: .venv/bin/python benchmarks/engine_bench.py [--max-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from runtime.engine.config import EngineConfig
from runtime.engine.pool import PoolLimits, ReplicaPool
from runtime.engine.probe import run_probe

CONCURRENCIES = (1, 8, 32)
DTYPES = ("float32", "bfloat16")


def _probe(replica: object, concurrency: int, max_tokens: int) -> dict[str, float | int | None]:
    requests = 4 if concurrency == 1 else concurrency
    result = asyncio.run(
        run_probe(
            replica.base_url,  # type: ignore[attr-defined]
            "smollm2-135m",
            requests=requests,
            concurrency=concurrency,
            max_tokens=max_tokens,
            replica=replica,  # type: ignore[arg-type]
        )
    )
    return result.metrics()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reuse-trials", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds per point.")
    parser.add_argument("--json", type=Path, default=None, help="Also write results here.")
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {dtype: {} for dtype in DTYPES}
    samples: dict[str, dict[str, list[float]]] = {dtype: {} for dtype in DTYPES}
    with ReplicaPool(PoolLimits(max_replicas=2, max_memory_gib=16)) as pool:
        replicas = {}
        for dtype in DTYPES:  # both engines up first, so load drift hits both alike
            config = EngineConfig(model="smollm2-135m", dtype=dtype, max_num_seqs=32)
            (replica,) = pool.acquire(config)
            replicas[dtype] = (config, replica)
            results[dtype]["cold_start_s"] = float(replica.start_s or 0.0)
            reuse = []
            for _ in range(args.reuse_trials):
                started = time.perf_counter()
                (again,) = pool.acquire(config)
                reuse.append(time.perf_counter() - started)
                assert again is replica
            results[dtype]["warm_reuse_ms"] = 1000 * statistics.median(reuse)
            _probe(replica, 2, 8)  # warm-up: first calls pay one-time costs
            print(f"[{dtype}] cold start {results[dtype]['cold_start_s']:.1f}s", flush=True)
        for round_index in range(args.rounds):
            for concurrency in CONCURRENCIES:
                for dtype in DTYPES:  # interleaved: the other engine idles meanwhile
                    _, replica = replicas[dtype]
                    metrics = _probe(replica, concurrency, args.max_tokens)
                    for key, value in (
                        (f"tok_s_c{concurrency}", metrics["output_tokens_per_s"]),
                        (f"ttft_p50_s_c{concurrency}", metrics["ttft_p50_s"]),
                        (f"tpot_p50_s_c{concurrency}", metrics["tpot_p50_s"]),
                    ):
                        samples[dtype].setdefault(key, []).append(float(value or 0.0))
                    print(
                        f"round {round_index} c={concurrency} {dtype}: "
                        f"{metrics['output_tokens_per_s']:.1f} tok/s",
                        flush=True,
                    )
        for dtype in DTYPES:
            for key, values in samples[dtype].items():
                results[dtype][key] = statistics.median(values)
            results[dtype]["rss_gib"] = replicas[dtype][1].rss_bytes() / 1024**3

    print()
    print(f"medians of {args.rounds} interleaved rounds, {args.max_tokens} tokens per request")
    print(f"{'metric':<22}" + "".join(f"{dtype:>12}" for dtype in DTYPES) + f"{'f32/bf16':>12}")
    for key in results[DTYPES[0]]:
        values = [results[dtype][key] for dtype in DTYPES]
        ratio = values[0] / values[1] if values[1] else float("nan")
        print(f"{key:<22}" + "".join(f"{v:>12.3f}" for v in values) + f"{ratio:>12.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
