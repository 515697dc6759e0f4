"""Engine benchmark: cold start, warm reuse from the pool, and output tokens/s by dtype.

Runs real vLLM CPU replicas of the bundled model and prints:
- cold start time (launch until /v1/models answers) per dtype,
- warm reuse time (asking the pool again for a running config; the median of several),
- output tokens/s at concurrency 1, 8 and 32 (fixed-length requests, ignore_eos) for
  float32 and bfloat16, and the float32/bfloat16 ratio measured in the same run.

Usage: .venv/bin/python benchmarks/engine_bench.py [--max-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from runtime.config import EngineConfig
from runtime.pool import PoolLimits, ReplicaPool
from runtime.probe import run_probe

CONCURRENCIES = (1, 8, 32)
DTYPES = ("float32", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reuse-trials", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="Also write results here.")
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {}
    with ReplicaPool(PoolLimits(max_replicas=1, max_memory_gib=16)) as pool:
        for dtype in DTYPES:
            config = EngineConfig(model="smollm2-135m", dtype=dtype, max_num_seqs=32)
            (replica,) = pool.acquire(config)
            row: dict[str, float] = {"cold_start_s": float(replica.start_s or 0.0)}
            reuse = []
            for _ in range(args.reuse_trials):
                started = time.perf_counter()
                (again,) = pool.acquire(config)
                reuse.append(time.perf_counter() - started)
                assert again is replica
            row["warm_reuse_s"] = statistics.median(reuse)
            # one short warm-up so the first measured request pays no first-call costs
            asyncio.run(run_probe(replica.base_url, config.model, requests=2, concurrency=2,
                                  max_tokens=8))  # fmt: skip
            for concurrency in CONCURRENCIES:
                requests = max(4, concurrency) if concurrency > 1 else 4
                probe = asyncio.run(
                    run_probe(
                        replica.base_url,
                        config.model,
                        requests=requests,
                        concurrency=concurrency,
                        max_tokens=args.max_tokens,
                        replica=replica,
                    )
                )
                metrics = probe.metrics()
                row[f"tok_s_c{concurrency}"] = float(metrics["output_tokens_per_s"] or 0.0)
                row[f"ttft_p50_s_c{concurrency}"] = float(metrics["ttft_p50_s"] or 0.0)
            row["rss_gib"] = replica.rss_bytes() / 1024**3
            results[dtype] = row
            print(f"[{dtype}] " + "  ".join(f"{k}={v:.3f}" for k, v in row.items()), flush=True)

    print()
    print(f"{'metric':<22}" + "".join(f"{dtype:>12}" for dtype in DTYPES) + f"{'f32/bf16':>12}")
    for key in results[DTYPES[0]]:
        values = [results[dtype][key] for dtype in DTYPES]
        ratio = values[0] / values[1] if values[1] else float("nan")
        print(f"{key:<22}" + "".join(f"{v:>12.3f}" for v in values) + f"{ratio:>12.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
