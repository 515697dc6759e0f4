"""Router benchmark: round_robin vs least_outstanding vs sla_aware on unequal real replicas.

Two real vLLM CPU replicas of the bundled model that differ only in max_num_seqs (a small
"slow" one and a large "fast" one; the pool pins each to its own core) serve the same
open-loop Poisson arrival sequence (seeded) once per policy, through runtime.routing.router.Router
in this one process. Every request is a fixed-length chat call (ignore_eos) with a deadline.

A short calibration first measures the fast replica's throughput and latency at a full
batch (and the slow one's, for the record); the arrival rate is `--load` times the fast
replica's throughput and the deadline is `--sla-factor` times its full-batch median e2e
latency. Round robin sends half the calls to the slow replica, beyond what it can serve;
a policy that knows the replicas' speeds and queues keeps most on the fast one.

Printed per policy: SLA attainment (share of requests answered within the deadline, shed
and failed requests count as misses), p50/p99 end-to-end latency (from the request's issue,
router queueing included, over answered requests), the calls each replica served, and the
sla_aware/round_robin attainment ratio.

Usage (one real-engine job at a time on a shared machine):
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/router_bench.py [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from runtime.engine.client import SamplingParams
from runtime.engine.config import EngineConfig
from runtime.engine.pool import PoolLimits, ReplicaPool
from runtime.engine.probe import PROBE_PROMPTS, run_probe
from runtime.engine.replica import Replica, parse_metrics
from runtime.routing.policies import RouterConfig
from runtime.routing.router import Endpoint, Router, endpoints_for_replicas
from runtime.stats import percentiles
from runtime.workload import poisson_offsets

MODEL = "smollm2-135m"
MODEL_KEY = "llm"
POLICIES = ("round_robin", "least_outstanding", "sla_aware")


@dataclass(frozen=True)
class Outcome:
    """One benchmark request: when it was issued, how long it took, how it ended."""

    issued_s: float
    lag_s: float
    e2e_s: float
    ok: bool
    error: str | None
    endpoint: str


def _fmt(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def calibrate(replica: Replica, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """Closed-loop fixed-length load at `concurrency`: throughput and latency."""
    asyncio.run(run_probe(replica.base_url, MODEL, requests=2, concurrency=2, max_tokens=4))
    result = asyncio.run(
        run_probe(
            replica.base_url,
            MODEL,
            requests=requests,
            concurrency=concurrency,
            max_tokens=max_tokens,
        )
    )
    metrics = result.metrics()
    if metrics["errors"]:
        first = next(r.error for r in result.records if r.error)
        raise RuntimeError(f"calibration of {replica.base_url} failed: {first}")
    return {
        "concurrency": concurrency,
        "requests": requests,
        "rps": requests / result.wall_s,
        "e2e_p50_s": metrics["e2e_p50_s"],
        "e2e_p99_s": metrics["e2e_p99_s"],
        "output_tokens_per_s": metrics["output_tokens_per_s"],
    }


async def wait_idle(replicas: list[Replica], timeout_s: float = 60.0) -> None:
    """Block until no sequence runs or waits on any replica (the previous policy's tail)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5.0) as http:
        while time.monotonic() < deadline:
            busy = 0.0
            for replica in replicas:
                metrics = parse_metrics((await http.get(f"{replica.base_url}/metrics")).text)
                busy += metrics.num_requests_running + metrics.num_requests_waiting
            if busy == 0:
                return
            await asyncio.sleep(0.5)


async def run_policy(
    policy: str,
    replicas: list[Replica],
    offsets: list[float],
    sla_s: float,
    max_tokens: int,
    give_up_s: float,
) -> tuple[list[Outcome], dict[str, int], dict[str, int]]:
    """Replay the arrival offsets through a fresh Router with this policy."""
    endpoints: list[Endpoint] = []
    for replica in replicas:
        endpoints.extend(endpoints_for_replicas(MODEL_KEY, [replica]))
    labels = {e.endpoint_id: f"max_num_seqs={e.max_num_seqs}" for e in endpoints}
    urls = {e.base_url: labels[e.endpoint_id] for e in endpoints}
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    router = Router(endpoints, RouterConfig(policy=policy), default_deadline_s=sla_s)
    outcomes: list[Outcome] = []

    async def one(index: int, scheduled: float) -> None:
        issued = time.monotonic()
        messages = [{"role": "user", "content": PROBE_PROMPTS[index % len(PROBE_PROMPTS)]}]
        try:
            record = await asyncio.wait_for(router.chat(MODEL_KEY, messages, sampling), give_up_s)
            ok, error, endpoint = record.ok, record.error, urls.get(record.endpoint, "-")
        except TimeoutError:
            ok, error, endpoint = False, f"gave up after {give_up_s:.0f}s", "-"
        done = time.monotonic()
        outcomes.append(Outcome(issued, issued - scheduled, done - issued, ok, error, endpoint))

    async with router:
        tasks = []
        start = time.monotonic()
        for index, offset in enumerate(offsets):
            delay = start + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, start + offset)))
        await asyncio.gather(*tasks)
        calls = {labels[e.endpoint_id]: e.calls for e in router.endpoints}
        stats = {
            "shed": router.stats.shed,
            "queue_rejected": router.stats.queue_rejected,
            "retried": router.stats.retried,
        }
    await wait_idle(replicas)
    return outcomes, calls, stats


def summarize(
    outcomes: list[Outcome], sla_s: float, calls: dict[str, int], stats: dict[str, int]
) -> dict[str, Any]:
    """The numbers printed for one policy."""
    answered = [o.e2e_s for o in outcomes if o.ok]
    within = sum(1 for o in outcomes if o.ok and o.e2e_s <= sla_s)
    shed = sum(1 for o in outcomes if not o.ok and o.error and "shed" in o.error)
    answered_by: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.ok:
            answered_by[outcome.endpoint] = answered_by.get(outcome.endpoint, 0) + 1
    return {
        "requests": len(outcomes),
        "within_sla": within,
        "attainment": within / len(outcomes),
        "answered": len(answered),
        "shed": shed,
        "failed": len(outcomes) - len(answered) - shed,
        **{f"e2e_{key}_s": value for key, value in percentiles(answered, (50, 99)).items()},
        "calls_per_replica": calls,
        "answered_per_replica": answered_by,
        "router_stats": stats,
        "arrival_lag_max_s": max(o.lag_s for o in outcomes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow-seqs", type=int, default=2, help="max_num_seqs of the slow one.")
    parser.add_argument("--fast-seqs", type=int, default=16, help="max_num_seqs of the fast one.")
    parser.add_argument("--max-tokens", type=int, default=32, help="Tokens per request.")
    parser.add_argument("--duration", type=float, default=60.0, help="Arrival window, seconds.")
    parser.add_argument(
        "--load", type=float, default=0.8, help="Arrival rate / the fast replica's throughput."
    )
    parser.add_argument(
        "--sla-factor",
        type=float,
        default=1.5,
        help="Deadline / the fast replica's median e2e latency at a full batch.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the arrival sequence.")
    parser.add_argument("--json", type=Path, default=None, help="Also write results here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    began = time.monotonic()
    base = {"model": MODEL, "max_model_len": 2048, "block_size": 128}
    fast_config = EngineConfig(**base, max_num_seqs=args.fast_seqs)
    slow_config = EngineConfig(**base, max_num_seqs=args.slow_seqs)
    with ReplicaPool(PoolLimits(max_replicas=2, max_memory_gib=16)) as pool:
        (fast,) = pool.acquire(fast_config)
        (slow,) = pool.acquire(slow_config)
        print(
            f"replicas: fast max_num_seqs={args.fast_seqs} (cold start {fast.start_s:.0f}s), "
            f"slow max_num_seqs={args.slow_seqs} (cold start {slow.start_s:.0f}s), "
            "each pinned to its own core",
            flush=True,
        )
        fast_cal = calibrate(fast, args.fast_seqs, 2 * args.fast_seqs, args.max_tokens)
        slow_cal = calibrate(slow, args.slow_seqs, 3 * args.slow_seqs, args.max_tokens)
        for name, cal in (("fast", fast_cal), ("slow", slow_cal)):
            print(
                f"calibration {name}: concurrency {cal['concurrency']}, {cal['rps']:.2f} req/s, "
                f"{cal['output_tokens_per_s']:.0f} tok/s, e2e p50 {cal['e2e_p50_s']:.2f}s",
                flush=True,
            )
        rate = args.load * fast_cal["rps"]
        sla_s = round(args.sla_factor * fast_cal["e2e_p50_s"] * 2) / 2  # to 0.5 s
        count = max(1, round(rate * args.duration))
        offsets = poisson_offsets(rate, count, np.random.default_rng(args.seed))
        give_up_s = 3 * sla_s
        print(
            f"workload: {count} requests, Poisson {rate:.2f} req/s (load {args.load} x fast "
            f"throughput; slow+fast capacity {fast_cal['rps'] + slow_cal['rps']:.2f} req/s) "
            f"over {offsets[-1]:.0f}s, {args.max_tokens} tokens each (ignore_eos), "
            f"deadline {sla_s:.1f}s, seed {args.seed}",
            flush=True,
        )

        results: dict[str, dict[str, Any]] = {}
        for policy in POLICIES:
            outcomes, calls, stats = asyncio.run(
                run_policy(policy, [fast, slow], offsets, sla_s, args.max_tokens, give_up_s)
            )
            summary = summarize(outcomes, sla_s, calls, stats)
            results[policy] = summary
            print(
                f"{policy:>17}: SLA attainment {summary['attainment']:.3f} "
                f"({summary['within_sla']}/{summary['requests']}), shed {summary['shed']}, "
                f"failed {summary['failed']}, e2e p50 {_fmt(summary['e2e_p50_s'])} "
                f"p99 {_fmt(summary['e2e_p99_s'])}, calls per replica {calls}, "
                f"max arrival lag {summary['arrival_lag_max_s']:.2f}s",
                flush=True,
            )

    rr = results["round_robin"]["attainment"]
    sa = results["sla_aware"]["attainment"]
    lo = results["least_outstanding"]["attainment"]
    ratio = sa / rr if rr > 0 else float("inf")
    print(f"SLA attainment ratio sla_aware/round_robin: {ratio:.2f} ({sa:.3f} / {rr:.3f})")
    lo_ratio = sa / lo if lo > 0 else float("inf")
    print(f"SLA attainment ratio sla_aware/least_outstanding: {lo_ratio:.2f} ({sa:.3f} / {lo:.3f})")
    print(f"total wall time {time.monotonic() - began:.0f}s")
    if args.json is not None:
        payload = {
            "args": vars(args) | {"json": str(args.json)},
            "calibration": {"fast": fast_cal, "slow": slow_cal},
            "rate_rps": rate,
            "sla_s": sla_s,
            "requests": count,
            "policies": results,
            "ratio_sla_aware_over_round_robin": ratio,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
