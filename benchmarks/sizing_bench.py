"""How long replica sizing (runtime.scaling.provisioner.size_replicas) takes: it runs inside
`fmtune serve` start-up and in every autoscaler sizing, so it must stay well under a second.

Times the M/G/c simulation for loads that need from a few to ~35 replicas (the search scans
candidates upwards, so bigger fleets cost more) and prints the median and max over --repeats
runs per load, with the replica count chosen.

Usage: .venv/bin/python benchmarks/sizing_bench.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

from runtime.scaling.provisioner import size_replicas

# Service times of one call, seconds: a spread like real LLM calls with varying output length.
SAMPLES = [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 1.0]
LOADS_RPS = (0.5, 2.0, 10.0, 20.0)
CALLS_PER_REQUEST = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per load")
    args = parser.parse_args()
    print(
        f"{'load rps':>9} {'calls/req':>9} {'replicas':>8} {'feasible':>8} "
        f"{'median ms':>10} {'max ms':>8}"
    )
    for load in LOADS_RPS:
        times_ms = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = size_replicas(
                load, CALLS_PER_REQUEST, SAMPLES, sla_p99_s=4.0, epsilon=0.01, max_replicas=64
            )
            times_ms.append((time.perf_counter() - started) * 1000)
        print(
            f"{load:>9.1f} {CALLS_PER_REQUEST:>9} {result.replicas:>8} {result.feasible!s:>8} "
            f"{statistics.median(times_ms):>10.1f} {max(times_ms):>8.1f}"
        )


if __name__ == "__main__":
    main()
