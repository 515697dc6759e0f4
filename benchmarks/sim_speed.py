"""How fast the simulator runs: simulated seconds per second of one core (issue 11, goal >= 1000x).

Each row simulates a realistic deployment of the shipped extraction app: two replicas of
SmolLM2-135M on vLLM's CPU build (max_num_seqs 16, block_size 128, prefix caching on, 1 GiB
of KV cache), a few hundred requests with Poisson arrivals, the router policy named. Token
counts are drawn from what the quickstart study measured on this machine (prompts of 216-301
tokens with a 45-token system prompt shared by every call and the article shared by the
calls of one request; answers of 7-96 tokens for the sub-questions, 34-192 for the single
call). The step-time profile is a stand-in with the shape of reports/engine_bench.txt (about
28 ms per decode step alone, 80 ms with 32 sequences) until a profiler measures one; speed
depends on it only through how many steps a simulated second holds.

Each run builds the SimSpec (what a trial would do) and simulates it. Speed is simulated
seconds (the simulated run's wall_s) over the CPU seconds of this process (time.process_time:
one core's work, unaffected by other processes on a shared machine); wall-clock speed is
printed beside it. The median of --repeats runs is reported per row.

Usage: .venv/bin/python benchmarks/sim_speed.py [--repeats 7] [--out reports/sim_speed.txt]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.app.application import AppKnobs
from runtime.app.dag import App, LlmNode
from runtime.app.registry import get_application
from runtime.engine.config import EngineConfig
from runtime.metrics import CostModel
from runtime.routing.policies import RouterConfig
from runtime.sim.cluster import (
    NodeTokens,
    RequestShape,
    Segment,
    SimModel,
    SimSpec,
    simulate,
    synthetic_shapes,
)
from runtime.sim.steptime import SpeculationProfile, StepTimeCoefficients, StepTimeProfile
from runtime.workload import PoissonArrivals, WorkloadSpec

PROFILE = StepTimeProfile(
    model="smollm2-135m",
    dtype="bfloat16",
    hardware="stand-in (shape of reports/engine_bench.txt)",
    vllm_version="0.32.0",
    coefficients=StepTimeCoefficients(
        base_s=0.022,
        prefill_token_s=0.00012,
        prefill_attention_s=1e-9,
        decode_seq_s=0.0017,
        context_token_s=1e-6,
        spec_token_s=0.0012,
    ),
    startup_s=50.0,
    kv_bytes_per_token=30 * 3 * (64 + 64) * 2,
    request_overhead_s=0.004,
    response_overhead_s=0.001,
    speculation=SpeculationProfile(proposal_rate=0.7, acceptance_rate=0.6),
    memory_gib_without_kv=0.8,
)
SYSTEM = Segment(scope="global", key="system", tokens=45)
ARTICLE = Segment(scope="request", key="article", tokens=150)


@dataclass(frozen=True)
class Case:
    """One benchmarked deployment."""

    label: str
    architecture: str
    rate_rps: float
    policy: str
    requests: int = 300
    engine: tuple[tuple[str, object], ...] = ()


CASES = (
    Case("single call, 3 rps, least_outstanding", "single", 3.0, "least_outstanding"),
    Case("3 parallel calls, 1.5 rps, sla_aware", "parallel", 1.5, "sla_aware"),
    Case("3 sequential calls, 1.5 rps, round_robin", "sequential", 1.5, "round_robin"),
    Case("single call, 6 rps (saturated), round_robin", "single", 6.0, "round_robin"),
    Case(
        "single call, 3 rps, ngram speculation k=3",
        "single",
        3.0,
        "least_outstanding",
        engine=(("speculative_method", "ngram"), ("num_speculative_tokens", 3)),
    ),
)


def tokens(node: LlmNode) -> NodeTokens:
    """Measured-like token counts: the single call answers three fields at once."""
    completions = range(34, 193) if node.sampling.max_tokens > 96 else range(7, 97)
    return NodeTokens(
        prompt_tokens=tuple(range(216, 302)),
        completion_tokens=tuple(completions),
        shared=(SYSTEM, ARTICLE),
    )


def build(case: Case, shapes: tuple[RequestShape, ...], app: App) -> SimSpec:
    """The trial's SimSpec: what a simulated trial builds before it simulates."""
    knobs = {"max_num_seqs": 16, "block_size": 128, "max_model_len": 2048, **dict(case.engine)}
    engine = EngineConfig.model_validate({"model": "smollm2-135m", **knobs})
    return SimSpec(
        app=app,
        workload=WorkloadSpec(
            arrivals=PoissonArrivals(rate_rps=case.rate_rps), num_requests=case.requests, seed=0
        ),
        shapes=shapes,
        sla_e2e_s=20.0,
        models={"llm": SimModel(engine=engine, replicas=2, profile=PROFILE)},
        router=RouterConfig.model_validate({"policy": case.policy}),
        prices=CostModel(price_per_replica_hour_usd={"llm": 0.0832}),
    )


def measure(case: Case, repeats: int) -> dict[str, float]:
    app = get_application("extraction").build(AppKnobs(architecture=case.architecture))
    nodes = {node.id: tokens(node) for node in app.nodes if isinstance(node, LlmNode)}
    shapes = tuple(synthetic_shapes(app, nodes, case.requests, seed=1))
    cpu, wall = [], []
    for _ in range(repeats):
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        result = simulate(build(case, shapes, app))
        cpu.append(time.process_time() - cpu_start)
        wall.append(time.perf_counter() - wall_start)
    simulated = result.metrics.wall_s
    steps = sum(counters.steps for counters in result.replicas.values())
    busy = sum(c.busy_s for c in result.replicas.values()) / (2 * simulated)
    return {
        "simulated_s": simulated,
        "steps": steps,
        "busy": busy,
        "cpu_ms": statistics.median(cpu) * 1000,
        "speed_cpu": simulated / statistics.median(cpu),
        "speed_wall": simulated / statistics.median(wall),
        "e2e_p50_s": result.metrics.e2e_p50_s or 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines = [
        f"simulator speed: median of {args.repeats} runs per case, one process, "
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load} at the start",
        "speed = simulated seconds / CPU seconds of the process (x); wall-clock speed beside it",
        "",
        f"{'case':<46} {'sim s':>7} {'steps':>7} {'busy':>5} {'cpu ms':>7} "
        f"{'speed x':>8} {'wall x':>7} {'e2e p50':>8}",
    ]
    print("\n".join(lines), flush=True)
    for case in CASES:
        row = measure(case, args.repeats)
        line = (
            f"{case.label:<46} {row['simulated_s']:>7.1f} {row['steps']:>7.0f} "
            f"{row['busy']:>5.0%} {row['cpu_ms']:>7.1f} {row['speed_cpu']:>8.0f} "
            f"{row['speed_wall']:>7.0f} {row['e2e_p50_s']:>8.3f}"
        )
        print(line, flush=True)
        lines.append(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
