"""Every shipped app's variants on the bundled model: calls, latency, quality with its interval.

Runs each shipped app's experiment (experiments/<app>-cpu.yaml, extraction's is
extract-cpu.yaml) once per variant on one hot replica (the pool reuses it: only the app's DAG
changes) and prints, per app and variant, LLM calls per request, e2e p50/p95 and quality with
its 95% bootstrap interval, under a header naming the machine, its load, the date and the
vLLM servers already running when it started (another engine user contending for the cores).

Usage: .venv/bin/python benchmarks/app_variants.py [--apps arithmetic] [--requests 60]
       [--requests extraction=12 arithmetic=60] [--set app.few_shot=false]
       [--json reports/app_variants.json] | tee reports/app_variants.txt
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import yaml
from lane import foreign_engines

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
        f"{app:<12}{variant:<14}{cell('num_requests', '{}'):>9}"
        f"{cell('llm_calls_per_request', '{:.2f}'):>10}"
        f"{cell('e2e_p50_s', '{:.2f}'):>11}{cell('e2e_p95_s', '{:.2f}'):>11}"
        f"{cell('quality', '{:.3f}'):>9}{shown_ci:>17}{cell('error_rate', '{:.2f}'):>8}"
        f"{metrics.get('score_errors', 0):>9}{cell('run_wall_s', '{:.0f}'):>7}"
    )


def _requests_per_app(values: list[str], apps: list[str]) -> dict[str, int | None]:
    """`--requests N` (every app) or `--requests APP=N ...` (each named app; the others keep
    their experiment's count)."""
    counts: dict[str, int | None] = dict.fromkeys(apps)
    for value in values:
        app, _, count = value.rpartition("=")
        if app:
            counts[app] = int(count)
        else:
            counts = dict.fromkeys(apps, int(count))
    return counts


def main() -> None:
    """Run every (app, variant) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", nargs="+", default=application_names())
    parser.add_argument(
        "--requests", nargs="+", default=[], help="N or APP=N per run (default: the file's)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="field=value (YAML)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    overrides: dict[str, Any] = {}
    for text in args.overrides:
        key, _, value = text.partition("=")
        overrides[key] = yaml.safe_load(value)
    requests = _requests_per_app(args.requests, args.apps)
    load = "/".join(f"{value:.1f}" for value in os.getloadavg())
    header = (
        f"app variants on the bundled model, one replica; {platform.machine()} "
        f"{os.cpu_count()} cores, load average {load} at the start, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{foreign_engines()} other vLLM processes running at the start"
    )
    print(header, flush=True)
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    with ReplicaPool(PoolLimits(max_replicas=1, max_memory_gib=12)) as pool:
        for app in args.apps:
            experiment = REPO / "experiments" / EXPERIMENTS.get(app, f"{app}-cpu.yaml")
            counts = {} if requests[app] is None else {"workload.num_requests": requests[app]}
            for variant in get_application(app).architectures:
                spec = load_run_spec(
                    experiment, {**overrides, **counts, "app.architecture": variant}
                )
                started = time.monotonic()
                metrics = execute_run(spec, pool).metrics_dict()
                metrics["run_wall_s"] = round(time.monotonic() - started, 1)
                rows.append({"app": app, "variant": variant, **metrics})
                lines.append(_row(app, variant, metrics))
                print(lines[-1], flush=True)
    print()
    print(header)
    print(f"overrides: {overrides or 'none'}; requests per run: {requests} (None: the file's)")
    print(
        f"{'app':<12}{'variant':<14}{'requests':>9}{'calls/req':>10}"
        f"{'e2e p50 s':>11}{'e2e p95 s':>11}"
        f"{'quality':>9}{'quality 95% CI':>17}{'errors':>8}{'unscored':>9}{'wall s':>7}"
    )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
