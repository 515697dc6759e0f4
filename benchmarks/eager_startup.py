"""Compiled vs eager vLLM CPU engines: cold-start time and output tokens/s.

Starts one replica compiled (vLLM's default) and one with enforce_eager, one after the other,
and prints seconds until /v1/models answers and tokens/s at concurrency 1 and 8 (64 tokens
per request, ignore_eos). The trade-off behind EngineConfig.enforce_eager.

Usage: .venv/bin/python benchmarks/eager_startup.py
"""

from __future__ import annotations

import asyncio

from runtime.engine.config import EngineConfig
from runtime.engine.probe import run_probe
from runtime.engine.replica import Replica


def main() -> None:
    for eager in (False, True):
        config = EngineConfig(
            model="smollm2-135m", dtype="float32", max_model_len=2048, max_num_seqs=16,
            enforce_eager=eager,
        )  # fmt: skip
        with Replica(config) as replica:
            asyncio.run(run_probe(replica.base_url, config.model, requests=2, concurrency=2,
                                  max_tokens=8))  # fmt: skip
            cells = []
            for concurrency in (1, 8):
                metrics = asyncio.run(
                    run_probe(replica.base_url, config.model, requests=max(4, concurrency),
                              concurrency=concurrency, max_tokens=64)
                ).metrics()  # fmt: skip
                cells.append(f"c{concurrency}={metrics['output_tokens_per_s']:.1f} tok/s")
            print(f"enforce_eager={eager}: start {replica.start_s:.1f}s, " + ", ".join(cells))


if __name__ == "__main__":
    main()
