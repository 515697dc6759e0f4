"""The engine lane as the benchmarks see it: how many vLLM servers were already running.

Benchmarks here share 2 cores with whatever else runs; each report's header says how many
vLLM API servers it found at its start (another engineer's replica, or one still stopping),
so a reader knows whether the cores were contended. The count is the runtime's
(`runtime.engine.machine.vllm_server_pids`, which the profiler records in every profile too),
so a benchmark and a profile count servers the same way. Imported by the scripts of this
folder (run as `python benchmarks/NAME.py`, which puts this folder on sys.path).
"""

from __future__ import annotations

from runtime.engine.machine import vllm_server_pids


def foreign_engines() -> int:
    """vLLM API servers running now; a benchmark calls this before it starts its own, so
    every one found is someone else's."""
    return len(vllm_server_pids())
