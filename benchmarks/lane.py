"""The engine lane as the benchmarks see it: how many vLLM servers were already running.

Benchmarks here share 2 cores with whatever else runs; each report's header says how many
vLLM API servers it found at its start (another engineer's replica, or one still stopping),
so a reader knows whether the cores were contended. Imported by the scripts of this folder
(run as `python benchmarks/NAME.py`, which puts this folder on sys.path).
"""

from __future__ import annotations

import subprocess


def foreign_engines() -> int:
    """vLLM API servers running now (`pgrep -f vllm.entrypoints`); a benchmark calls this
    before it starts its own, so every one found is someone else's."""
    found = subprocess.run(
        ["pgrep", "-f", "vllm.entrypoints"], capture_output=True, text=True, check=False
    )
    return len(found.stdout.split())
