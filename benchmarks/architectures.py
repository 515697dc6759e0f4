"""The four cognitive architectures of the extraction app, by output format, on real replicas.

Runs experiments/extract-cpu.yaml once per (architecture, format) on one hot replica of the
bundled model (the pool reuses it: only the app changes) and prints calls per request,
latency, quality with its 95% interval and format validity, side by side.

Usage: .venv/bin/python benchmarks/architectures.py [--formats json tag] [--requests 12]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runtime.app.registry import get_application
from runtime.engine.pool import PoolLimits, ReplicaPool
from runtime.run import execute_run, load_run_spec

REPO = Path(__file__).resolve().parents[1]
COLUMNS = (
    ("llm_calls_per_request", "calls/req", "{:.2f}"),
    ("e2e_p50_s", "e2e p50 s", "{:.2f}"),
    ("e2e_p95_s", "e2e p95 s", "{:.2f}"),
    ("ttft_p50_s", "ttft p50 s", "{:.3f}"),
    ("tpot_p50_s", "tpot p50 s", "{:.4f}"),
    ("quality", "quality", "{:.3f}"),
    ("format_clean_rate", "clean", "{:.2f}"),
    ("format_repaired_rate", "repaired", "{:.2f}"),
    ("format_unparseable_rate", "unparsed", "{:.2f}"),
    ("error_rate", "errors", "{:.2f}"),
    ("cost_per_1k_usd", "$/1k req", "{:.4f}"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["json", "tag"])
    architectures = get_application("extraction").architectures
    parser.add_argument("--architectures", nargs="+", default=list(architectures))
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with ReplicaPool(PoolLimits(max_replicas=1, max_memory_gib=12)) as pool:
        for architecture in args.architectures:
            for fmt in args.formats:
                spec = load_run_spec(
                    REPO / "experiments" / "extract-cpu.yaml",
                    {
                        "app.architecture": architecture,
                        "app.format": fmt,
                        "workload.num_requests": args.requests,
                        "workload.arrivals.users": args.users,
                    },
                )
                metrics = execute_run(spec, pool).metrics_dict()
                rows.append({"architecture": architecture, "format": fmt, **metrics})
                ci = metrics.get("quality_ci95") or [None, None]
                print(
                    f"{architecture:<11}{fmt:<6} calls={metrics['llm_calls_per_request']} "
                    f"e2e_p50={metrics['e2e_p50_s']} quality={metrics['quality']} ci95={ci}",
                    flush=True,
                )
    print()
    print(f"{args.requests} requests per run, closed loop with {args.users} users, one replica")
    header = f"{'architecture':<13}{'format':<8}" + "".join(f"{t:>11}" for _, t, _ in COLUMNS)
    print(header + f"{'quality 95% CI':>18}")
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            cells.append(f"{'-' if value is None else fmt.format(value):>11}")
        ci = row.get("quality_ci95") or []
        shown_ci = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if len(ci) == 2 and None not in ci else "-"
        print(f"{row['architecture']:<13}{row['format']:<8}" + "".join(cells) + f"{shown_ci:>18}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
