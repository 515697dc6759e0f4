"""Every shipped app's variants on the bundled model: calls, latency, quality with its interval.

Runs each shipped app's experiment (experiments/<app>-cpu.yaml, extraction's is
extract-cpu.yaml) once per variant on one hot replica (the pool reuses it: only the app's DAG
changes) and prints, per app and variant, LLM calls per request, e2e p50/p95 and quality with
its 95% bootstrap interval.

Usage: .venv/bin/python benchmarks/app_variants.py [--apps arithmetic] [--requests 60]
       [--set app.few_shot=false] [--json reports/apps.json] | tee reports/apps.txt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from runtime.app.registry import application_names, get_application
from runtime.engine.pool import PoolLimits, ReplicaPool
from runtime.run import execute_run, load_run_spec

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"arithmetic": "arithmetic-cpu.yaml", "extraction": "extract-cpu.yaml"}


def _row(app: str, variant: str, metrics: dict[str, Any]) -> str:
    def cell(key: str, fmt: str) -> str:
        value = metrics.get(key)
        return "-" if value is None else fmt.format(value)

    ci = metrics.get("quality_ci95") or []
    shown_ci = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if len(ci) == 2 else "-"
    return (
        f"{app:<12}{variant:<14}{cell('llm_calls_per_request', '{:.2f}'):>10}"
        f"{cell('e2e_p50_s', '{:.2f}'):>11}{cell('e2e_p95_s', '{:.2f}'):>11}"
        f"{cell('quality', '{:.3f}'):>9}{shown_ci:>17}{cell('error_rate', '{:.2f}'):>8}"
        f"{metrics.get('score_errors', 0):>8}"
    )


def main() -> None:
    """Run every (app, variant) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", nargs="+", default=application_names())
    parser.add_argument("--requests", type=int, default=None, help="per run (default: file's)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="field=value (YAML)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    overrides: dict[str, Any] = {}
    for text in args.overrides:
        key, _, value = text.partition("=")
        overrides[key] = yaml.safe_load(value)
    if args.requests is not None:
        overrides["workload.num_requests"] = args.requests
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    with ReplicaPool(PoolLimits(max_replicas=1, max_memory_gib=12)) as pool:
        for app in args.apps:
            experiment = REPO / "experiments" / EXPERIMENTS.get(app, f"{app}-cpu.yaml")
            for variant in get_application(app).architectures:
                spec = load_run_spec(experiment, {**overrides, "app.architecture": variant})
                metrics = execute_run(spec, pool).metrics_dict()
                rows.append({"app": app, "variant": variant, **metrics})
                lines.append(_row(app, variant, metrics))
                print(lines[-1], flush=True)
    print()
    print(f"bundled model, one replica; overrides: {overrides or 'none'}")
    print(
        f"{'app':<12}{'variant':<14}{'calls/req':>10}{'e2e p50 s':>11}{'e2e p95 s':>11}"
        f"{'quality':>9}{'quality 95% CI':>17}{'errors':>8}{'unscored':>8}"
    )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
