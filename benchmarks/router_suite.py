"""Router benchmark suite: every policy side by side, loads 0.5..1.3 of joint capacity (issue 14).

In the simulator (runtime.sim.cluster.simulate: vLLM's scheduler on a virtual clock, the
router's own pure policies, admission and queue), each scenario is a deployment of
SmolLM2-135M replicas and a traffic mix:

- ``equal``: two equal replicas (max_num_seqs 16), one call per request, mixed sizes: 70 %
  short prompts (216-301 tokens) and 30 % long ones (900-1400), output lengths drawn from
  the extraction app's measured answers (34-192 tokens, its single-call architecture).
- ``equal-tight``: the same with an SLA of 2x the idle e2e instead of 4x: at 4x every
  policy keeps up until 0.95 load, at 2x the queueing a policy causes decides.
- ``unequal``: the same traffic on replicas with max_num_seqs 16 and 4.
- ``dag``: two equal replicas, whole requests of the extraction app's sequential
  architecture (three calls in a row, each with its critical-path share of the request's SLA,
  answers of 7-96 tokens, prompts short or long per request as above), two request classes:
  half interactive (SLA 3x the idle e2e), half batch (8x).

The joint capacity of a scenario (requests/s with both replicas serving at once) is found by
bisection: the highest Poisson rate whose run keeps up (least_outstanding, no deadline: the
last request ends within 10 % of the arrival window plus one idle e2e after the last
arrival). The single-class SLA is 4x the idle e2e p50 (a request alone in the deployment).
Every load runs the same seeded arrivals and request shapes through each policy: round_robin,
least_outstanding, power_of_two, sla_aware, and the simulator's oracle (each call goes where
a what-if copy of the true replicas finishes it soonest while it and every admitted call
meet their deadlines, else it is shed: perfect knowledge of service times, the upper bound). The
router's expected output lengths start from a calibration trace's (each node's answers in the
60 requests of the idle run, `SimSpec.output_lengths`), as a deployment's would from its app's
earlier runs, instead of from max_tokens.
Each cell is the mean over --seeds seeds (arrivals and sizes); the noise column is half the
range of SLA attainment over the seeds.

Printed per scenario and load: SLA attainment (requests answered within their own SLA, shed
and failed ones count as misses), goodput (such requests per second of arrival window, and
as a share of the oracle's), shed, the share of admitted requests that met their SLA, and the
router's prediction error of call completion (median and p90 of |predicted - measured| /
measured), with the error of the same predictions redone for each call's real output length
(the step-time model's own error) beside it; the median of measured / predicted ("m/p p50":
below 1, the predictions run long, pessimistic; above 1, short, optimistic) and the shed calls
by the rule that shed them ("shed by": own/endangers/queued, i.e. the call's own padded
prediction missed its deadline, it would have pushed admitted calls past theirs, its
deadline passed while it waited in the queue). Then the issue's goals, each marked met or not.

With --real, one scenario runs on real vLLM CPU replicas through the live Router (the
machinery of benchmarks/router_bench.py): joint capacity measured with both replicas at once
(a closed loop of mixed requests through least_outstanding), then each policy at each of
--real-loads of it (no oracle: it needs the simulator), for the --policies chosen among the
four. Real requests have exact output lengths (ignore_eos with max_tokens drawn from the same
distribution). Each of --seeds seeds draws its own arrivals and requests; the policies run
interleaved (every policy on a seed's arrivals, in an order rotated by seed, then the next
seed), and a cell is the mean over the seeds, its noise half the range. The real cells also
keep every measured call's endpoint, predicted and measured completion in the .json
("calls" of each seed's run: from the router's debug log of each prediction against its
measure).

The step-time profile is one fitted to this machine (`fmtune profile --list`) when the fmtune
home holds one for the model, else the stand-in of benchmarks/sim_speed.py; the output says
which.

Usage:
    .venv/bin/python benchmarks/router_suite.py [--seeds 3] [--requests 400]
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/router_suite.py --real
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/router_suite.py --real-only \
        --seeds 3 --real-loads 1.3 --policies least_outstanding sla_aware
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from lane import foreign_engines

from runtime.app.application import AppKnobs
from runtime.app.dag import App, LlmNode
from runtime.app.registry import get_application
from runtime.engine.config import EngineConfig
from runtime.metrics import CostModel
from runtime.routing.policies import RouterConfig
from runtime.sim.cluster import (
    CallShape,
    RequestShape,
    Segment,
    SimModel,
    SimResult,
    SimSpec,
    simulate,
)
from runtime.sim.steptime import StepTimeProfile
from runtime.workload import ClosedLoop, PoissonArrivals, WorkloadSpec

# `python benchmarks/router_suite.py` puts this folder first on sys.path, where a script's name
# can shadow a package (apps.py would shadow apps): the packages come from the installation.
HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]


def sibling(name: str) -> ModuleType:
    """Another script of benchmarks/, loaded from its file: the folder is never put on
    sys.path, where a script's name could shadow a package (apps.py would shadow apps)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


PROFILE: StepTimeProfile = sibling("sim_speed").PROFILE  # the stand-in, defined once there

MODEL = "smollm2-135m"
POLICIES = ("round_robin", "least_outstanding", "power_of_two", "sla_aware", "oracle")
LOADS = (0.5, 0.7, 0.85, 0.95, 1.1, 1.3)
SYSTEM = Segment(scope="global", key="system", tokens=45)
SHORT_PROMPTS = (216, 302)
LONG_PROMPTS = (900, 1400)
LONG_SHARE = 0.3
NO_DEADLINE_S = 1e6


@dataclass(frozen=True)
class Scenario:
    """One deployment and traffic mix."""

    name: str
    description: str
    architecture: str
    seqs: tuple[int, ...]
    classes: tuple[tuple[str, float, float], ...]
    """(name, share of requests, SLA as a multiple of the idle e2e p50)."""


SCENARIOS = (
    Scenario(
        "equal",
        "2 equal replicas (max_num_seqs 16), one call per request, mixed sizes",
        "single",
        (16, 16),
        (("all", 1.0, 4.0),),
    ),
    Scenario(
        "equal-tight",
        "2 equal replicas (max_num_seqs 16), one call per request, mixed sizes, SLA 2x the "
        "idle e2e (a deadline at which placement matters)",
        "single",
        (16, 16),
        (("all", 1.0, 2.0),),
    ),
    Scenario(
        "unequal",
        "2 unequal replicas (max_num_seqs 16 and 4), one call per request, mixed sizes",
        "single",
        (16, 4),
        (("all", 1.0, 4.0),),
    ),
    Scenario(
        "dag",
        "2 equal replicas, 3 sequential calls per request (critical-path deadlines), "
        "classes interactive (SLA 3x idle) and batch (8x), half each",
        "sequential",
        (16, 16),
        (("interactive", 0.5, 3.0), ("batch", 0.5, 8.0)),
    ),
)


# --------------------------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------------------------


def build_app(architecture: str) -> App:
    """The shipped extraction app's DAG in this architecture."""
    return get_application("extraction").build(AppKnobs(architecture=architecture))


def completion_range(node: LlmNode) -> tuple[int, int]:
    """The measured answer lengths of an extraction node (as benchmarks/sim_speed.py uses)."""
    return (34, 193) if node.sampling.max_tokens > 96 else (7, 97)


def request_shapes(app: App, count: int, seed: int) -> list[RequestShape]:
    """Mixed sizes: per request a short or long article (every call of it reads it, shared
    in the prefix cache with the request's other calls), answers drawn per call."""
    rng = np.random.default_rng(seed)
    shapes: list[RequestShape] = []
    llm_nodes = [node for node in app.nodes if isinstance(node, LlmNode)]
    for _ in range(count):
        low, high = LONG_PROMPTS if rng.random() < LONG_SHARE else SHORT_PROMPTS
        prompt = int(rng.integers(low, high))
        article = Segment(scope="request", key="article", tokens=prompt - SYSTEM.tokens - 20)
        calls = {}
        for node in llm_nodes:
            first, last = completion_range(node)
            calls[node.id] = (
                CallShape(
                    prompt_tokens=prompt,
                    completion_tokens=int(rng.integers(first, last)),
                    shared=(SYSTEM, article),
                ),
            )
        shapes.append(RequestShape(calls=calls))
    return shapes


def with_classes(
    shapes: Sequence[RequestShape], scenario: Scenario, idle_e2e_s: float, seed: int
) -> tuple[list[RequestShape], list[str]]:
    """Each request assigned a class (seeded) and that class's SLA."""
    rng = np.random.default_rng(seed + 7919)
    names = [name for name, _, _ in scenario.classes]
    shares = [share for _, share, _ in scenario.classes]
    factors = {name: factor for name, _, factor in scenario.classes}
    chosen = [str(rng.choice(names, p=shares)) for _ in shapes]
    return [
        shape.model_copy(update={"sla_e2e_s": factors[name] * idle_e2e_s})
        for shape, name in zip(shapes, chosen, strict=True)
    ], chosen


def spec_for(
    scenario: Scenario,
    profile: StepTimeProfile,
    app: App,
    shapes: Sequence[RequestShape],
    *,
    rate_rps: float | None,
    policy: str,
    seed: int,
    sla_s: float,
    output_lengths: dict[str, tuple[int, ...]] | None = None,
) -> SimSpec:
    """The simulated experiment (rate None: one user, one request at a time); the router's
    output lengths start from ``output_lengths`` (a calibration trace's, by node)."""
    engines = tuple(
        EngineConfig(model=MODEL, max_num_seqs=seqs, block_size=128, max_model_len=2048)
        for seqs in scenario.seqs
    )
    arrivals = PoissonArrivals(rate_rps=rate_rps) if rate_rps else ClosedLoop(users=1)
    return SimSpec(
        app=app,
        workload=WorkloadSpec(arrivals=arrivals, num_requests=len(shapes), seed=seed),
        shapes=tuple(shapes),
        sla_e2e_s=sla_s,
        models={
            "llm": SimModel(
                engine=engines[0],
                replicas=len(engines),
                profile=profile,
                replica_engines=engines if len(set(engines)) > 1 else (),
            )
        },
        router=RouterConfig(policy="sla_aware" if policy == "oracle" else policy),  # type: ignore[arg-type]
        prices=CostModel(price_per_replica_hour_usd={"llm": 0.0832}),
        seed=seed,
        oracle=policy == "oracle",
        output_lengths=output_lengths or {},
    )


# --------------------------------------------------------------------------------------------
# Capacity and the idle e2e
# --------------------------------------------------------------------------------------------


def calibration_lengths(app: App) -> dict[str, tuple[int, ...]]:
    """Each LLM node's output lengths in a calibration trace (the 60 requests of the idle
    run, seeds apart from every measured run's): what a deployment knows of its app before
    it serves, and what the router's expected lengths start from."""
    lengths: dict[str, list[int]] = {}
    for shape in request_shapes(app, 60, seed=1):
        for node_id, calls in shape.calls.items():
            lengths.setdefault(node_id, []).extend(c.completion_tokens for c in calls)
    return {node_id: tuple(values) for node_id, values in lengths.items()}


def idle_e2e_s(scenario: Scenario, profile: StepTimeProfile, app: App) -> float:
    """Median end-to-end latency of a request alone in the deployment."""
    shapes = request_shapes(app, 60, seed=1)
    spec = spec_for(
        scenario, profile, app, shapes, rate_rps=None, policy="least_outstanding", seed=1,
        sla_s=NO_DEADLINE_S,
    )  # fmt: skip
    return statistics.median(o.e2e_s for o in simulate(spec).outcomes)


def keeps_up(result: SimResult, idle_s: float) -> bool:
    """The run kept up with its arrivals: its last request ended within 10 % of the arrival
    window plus one idle e2e after the last arrival."""
    starts = [o.start_s for o in result.outcomes]
    window = max(starts) - min(starts)
    last_end = max(o.end_s for o in result.outcomes)
    return last_end - max(starts) <= 0.1 * window + idle_s


def joint_capacity(
    scenario: Scenario, profile: StepTimeProfile, app: App, idle_s: float, requests: int
) -> float:
    """The highest Poisson rate (requests/s) both replicas keep up with, by bisection."""
    shapes = request_shapes(app, requests, seed=2)

    def ok(rate: float) -> bool:
        spec = spec_for(
            scenario, profile, app, shapes, rate_rps=rate, policy="least_outstanding", seed=2,
            sla_s=NO_DEADLINE_S,
        )  # fmt: skip
        return keeps_up(simulate(spec), idle_s)

    low, high = 0.05, 1.0
    while ok(high):
        low, high = high, 2 * high
    for _ in range(12):
        middle = (low + high) / 2
        low, high = (middle, high) if ok(middle) else (low, middle)
    return low


# --------------------------------------------------------------------------------------------
# One cell: a scenario, a load, a policy, over the seeds
# --------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """The numbers of one policy at one load (means over the seeds)."""

    attainment: float
    attainment_range: tuple[float, float]
    goodput_rps: float
    shed_share: float
    admitted_met: float | None
    error_p50: float | None
    error_p90: float | None
    model_error_p50: float | None
    by_class: dict[str, float] = field(default_factory=dict)
    bias_p50: float | None = None
    """Median of measured / predicted completion over the calls measured (all seeds)."""
    shed_by: dict[str, int] = field(default_factory=dict)
    """Shed calls by the rule that shed them (:func:`shed_reason`), summed over the seeds."""
    cpu_s: float = 0.0


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def shed_reason(error: str) -> str:
    """Which admission rule a shed call's message names: 'own' (its padded prediction
    missed its deadline), 'endangers' (it would have pushed admitted calls past theirs),
    'queued' (its deadline passed in the queue), else 'other'."""
    if "misses the deadline" in error:
        return "own"
    if "would push" in error:
        return "endangers"
    if "queued" in error:
        return "queued"
    return "other"


def _shed_by(counts: dict[str, int]) -> str:
    """own/endangers/queued counts of shed calls (+ others, the oracle's), '-' with none."""
    if not sum(counts.values()):
        return "-"
    text = "/".join(str(counts.get(k, 0)) for k in ("own", "endangers", "queued"))
    return text + (f"+{counts['other']}" if counts.get("other") else "")


def run_cell(
    scenario: Scenario,
    profile: StepTimeProfile,
    app: App,
    idle_s: float,
    rate: float,
    policy: str,
    seeds: Sequence[int],
    requests: int,
) -> Cell:
    """Simulate one policy at one rate once per seed and average."""
    attainments, goodputs, sheds, met_admitted, p50s, p90s, m50s = [], [], [], [], [], [], []
    classes: dict[str, list[float]] = {}
    ratios: list[float] = []
    shed_by: dict[str, int] = {}
    cpu = 0.0
    for seed in seeds:
        shapes, names = with_classes(
            request_shapes(app, requests, seed=100 + seed), scenario, idle_s, seed
        )
        spec = spec_for(
            scenario, profile, app, shapes, rate_rps=rate, policy=policy, seed=seed,
            sla_s=NO_DEADLINE_S, output_lengths=calibration_lengths(app),
        )  # fmt: skip
        began = time.process_time()
        result = simulate(spec)
        cpu += time.process_time() - began
        within = [
            o.ok and o.e2e_s <= (shape.sla_e2e_s or NO_DEADLINE_S)
            for o, shape in zip(result.outcomes, shapes, strict=True)
        ]
        starts = [o.start_s for o in result.outcomes]
        window = max(starts) - min(starts) or 1.0
        shed = sum(o.shed for o in result.outcomes)
        attainments.append(sum(within) / len(within))
        goodputs.append(sum(within) / window)
        sheds.append(shed / len(within))
        admitted = len(within) - shed
        met_admitted.append(sum(within) / admitted if admitted else None)
        for sim_call in result.calls:
            if sim_call.error is None and sim_call.predicted_s and sim_call.sent_s is not None:
                ratios.append((sim_call.end_s - sim_call.sent_s) / sim_call.predicted_s)
            elif sim_call.error and sim_call.error.startswith("shed"):
                reason = shed_reason(sim_call.error)
                shed_by[reason] = shed_by.get(reason, 0) + 1
        stats = result.router_stats
        p50s.append(stats.prediction_error_p50)
        p90s.append(stats.prediction_error_p90)
        m50s.append(stats.model_error_p50)
        for name in {n for n, _, _ in scenario.classes}:
            mine = [w for w, n in zip(within, names, strict=True) if n == name]
            classes.setdefault(name, []).append(sum(mine) / len(mine) if mine else 0.0)
    return Cell(
        attainment=statistics.fmean(attainments),
        attainment_range=(min(attainments), max(attainments)),
        goodput_rps=statistics.fmean(goodputs),
        shed_share=statistics.fmean(sheds),
        admitted_met=_mean(met_admitted),
        error_p50=_mean(p50s),
        error_p90=_mean(p90s),
        model_error_p50=_mean(m50s),
        by_class={name: statistics.fmean(values) for name, values in classes.items()},
        cpu_s=cpu,
        bias_p50=statistics.median(ratios) if ratios else None,
        shed_by=shed_by,
    )


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(scenario: Scenario, load: float, rate: float, cells: dict[str, Cell]) -> list[str]:
    """The lines of one load's table."""
    oracle = cells.get("oracle")
    header = (
        f"{'policy':<18} {'SLA att':>8} {'noise':>6} {'goodput':>8} {'/oracle':>8} "
        f"{'shed':>6} {'adm met':>8} {'err p50':>8} {'err p90':>8} {'model p50':>9} "
        f"{'m/p p50':>8} {'shed by':>10}"
    )
    if len(scenario.classes) > 1:
        header += "  " + " ".join(f"{name:>12}" for name, _, _ in scenario.classes)
    lines = [f"load {load:.2f} ({rate:.2f} req/s)", header]
    for policy, cell in cells.items():
        noise = (cell.attainment_range[1] - cell.attainment_range[0]) / 2
        share = cell.goodput_rps / oracle.goodput_rps if oracle and oracle.goodput_rps else None
        line = (
            f"{policy:<18} {cell.attainment:>8.3f} {noise:>6.3f} {cell.goodput_rps:>8.3f} "
            f"{_pct(share):>8} {_pct(cell.shed_share):>6} {_pct(cell.admitted_met):>8} "
            f"{_pct(cell.error_p50):>8} {_pct(cell.error_p90):>8} {_pct(cell.model_error_p50):>9} "
            f"{_ratio(cell.bias_p50):>8} "
            f"{_shed_by(cell.shed_by):>10}"
        )
        if len(scenario.classes) > 1:
            line += "  " + " ".join(
                f"{cell.by_class.get(name, 0.0):>12.3f}" for name, _, _ in scenario.classes
            )
        lines.append(line)
    return lines


def goals(results: dict[str, dict[float, dict[str, Cell]]]) -> list[str]:
    """The issue's goals, each marked met or not, with the numbers behind the verdict."""
    lines = ["goals (issue 14), in the simulator:"]
    below = []
    for name, loads in results.items():
        for load, cells in loads.items():
            sa, lo = cells["sla_aware"], cells["least_outstanding"]
            noise = max(
                (sa.attainment_range[1] - sa.attainment_range[0]) / 2,
                (lo.attainment_range[1] - lo.attainment_range[0]) / 2,
            )
            if sa.attainment < lo.attainment - noise:
                below.append(
                    f"{name} @{load:.2f}: {sa.attainment:.3f} < {lo.attainment:.3f} - {noise:.3f}"
                )
    verdict = "MET" if not below else "NOT MET"
    lines.append(
        f"- sla_aware never below least_outstanding (noise: half the seeds' range of either): "
        f"{verdict}" + ("" if not below else " (" + "; ".join(below) + ")")
    )
    admitted, goodput = [], []
    for name, loads in results.items():
        for load, cells in loads.items():
            if load < 0.95:
                continue
            sa, oracle = cells["sla_aware"], cells.get("oracle")
            admitted.append((name, load, sa.admitted_met))
            if oracle and oracle.goodput_rps:
                goodput.append((name, load, sa.goodput_rps / oracle.goodput_rps))
    bad = [(n, ld, v) for n, ld, v in admitted if v is None or v < 0.9]
    lines.append(
        "- loads >= 0.95: >= 90% of admitted requests meet their SLA (sla_aware): "
        + ("MET" if not bad else "NOT MET")
        + " ("
        + ", ".join(f"{n}@{ld:.2f} {_pct(v)}" for n, ld, v in admitted)
        + ")"
    )
    bad = [(n, ld, v) for n, ld, v in goodput if v < 0.8]
    lines.append(
        "- loads >= 0.95: goodput >= 80% of the oracle's (sla_aware): "
        + ("MET" if not bad and goodput else "NOT MET")
        + " ("
        + ", ".join(f"{n}@{ld:.2f} {_pct(v)}" for n, ld, v in goodput)
        + ")"
    )
    for name in ("equal", "equal-tight"):
        equal = results.get(name, {}).get(0.95)
        if equal is None:
            continue
        gap = equal["sla_aware"].attainment - equal["round_robin"].attainment
        oracle = equal.get("oracle")
        bound = (
            f"; the oracle {100 * (oracle.attainment - equal['round_robin'].attainment):+.1f}"
            if oracle is not None
            else ""
        )
        lines.append(
            f"- load 0.95, mixed sizes, equal replicas ({name}): sla_aware >= round_robin + 20 "
            f"points: {'MET' if gap >= 0.2 else 'NOT MET'} ({100 * gap:+.1f} points{bound})"
        )
    errors = [
        (n, ld, cells["sla_aware"].error_p50)
        for n, loads in results.items()
        for ld, cells in loads.items()
    ]
    worst = max((e for _, _, e in errors if e is not None), default=None)
    lines.append(
        "- prediction error of completion time, median <= 10% (sla_aware, every cell): "
        + ("MET" if worst is not None and worst <= 0.1 else "NOT MET")
        + f" (worst cell {_pct(worst)}; the error given the real output length is the "
        "'model p50' column)"
    )
    return lines


# --------------------------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------------------------


def machine_profile() -> tuple[StepTimeProfile, str]:
    """This machine's fitted profile of the model if the fmtune home holds one, else the
    stand-in; and a line saying which."""
    engine = EngineConfig(model=MODEL, max_num_seqs=16, block_size=128, max_model_len=2048)
    try:
        from runtime.profiler import find_profile  # the profiler may not be installed yet
    except ImportError:
        found = None
    else:
        found = find_profile(engine)
    if found is not None:
        return found, f"profile fitted on this machine: {found.key()}"
    return PROFILE, (
        "profile: the stand-in of benchmarks/sim_speed.py (no profile of this machine under "
        "the fmtune home; `fmtune profile` fits one)"
    )


# --------------------------------------------------------------------------------------------
# Real replicas (--real)
# --------------------------------------------------------------------------------------------

#: Filler text for prompts of a given length (about 4 characters per token).
FILLER = (
    "The committee met on Tuesday to review the quarterly report, the budget for the new "
    "library wing and the schedule of public consultations planned for the spring. "
)
REAL_POLICIES = ("round_robin", "least_outstanding", "power_of_two", "sla_aware")


class PredictionLog(logging.Handler):
    """Collects (predicted, measured) seconds of each call from the live router's debug log
    ("call on ...: predicted ...s, measured ...s"): the per-call data of a real cell."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.calls: list[tuple[str, float, float]] = []
        """(endpoint, predicted s, measured s) per measured call, in the order they ended."""

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if str(record.msg).startswith("call on ") and isinstance(args, tuple) and len(args) >= 3:
            self.calls.append((str(args[0]), float(args[1]), float(args[2])))


@dataclass(frozen=True)
class RealRequest:
    """One real request: its prompt text and its exact output length (ignore_eos)."""

    prompt: str
    max_tokens: int


def real_requests(count: int, seed: int) -> list[RealRequest]:
    """Mixed sizes as in the simulated scenarios: 30 % long prompts, answers of 34-192."""
    rng = np.random.default_rng(seed)
    requests = []
    for index in range(count):
        low, high = LONG_PROMPTS if rng.random() < LONG_SHARE else SHORT_PROMPTS
        chars = 4 * int(rng.integers(low, high))
        text = f"Request {index}. " + (FILLER * (chars // len(FILLER) + 1))[:chars]
        requests.append(RealRequest(text + "\nSummarize.", int(rng.integers(34, 193))))
    return requests


def real_cell(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One policy's real runs at one load (one per seed) as one cell: rates and errors
    averaged over the seeds, the noise as half their attainments' range, shed reasons summed,
    and the runs themselves (with every call) under "seeds"."""
    attainments = [run["attainment"] for run in runs]
    shed_by: dict[str, int] = {}
    for run in runs:
        for reason, count in run["shed_by"].items():
            shed_by[reason] = shed_by.get(reason, 0) + count
    ratios = [
        c["measured_s"] / c["predicted_s"] for run in runs for c in run["calls"]
        if c["predicted_s"] > 0
    ]  # fmt: skip
    cell: dict[str, Any] = {
        name: _mean([run[name] for run in runs])
        for name in (
            "attainment", "goodput_rps", "shed_share", "admitted_met", "error_p50",
            "error_p90", "model_error_p50", "e2e_p50_s",
        )
    }  # fmt: skip
    cell.update(
        noise=(max(attainments) - min(attainments)) / 2,
        failed=sum(run["failed"] for run in runs),
        bias_p50=statistics.median(ratios) if ratios else None,
        shed_by=shed_by,
        seeds=list(runs),
    )
    return cell


def run_real(args: argparse.Namespace, profile: StepTimeProfile | None) -> tuple[list[str], Any]:
    """The equal scenario on two real replicas: capacity, then every policy at each load."""
    import asyncio

    from runtime.engine.client import SamplingParams, call_deadline
    from runtime.engine.pool import PoolLimits, ReplicaPool
    from runtime.routing.prediction import StepModel
    from runtime.routing.router import Router, endpoints_for_replicas
    from runtime.stats import percentiles
    from runtime.workload import poisson_offsets

    wait_idle = sibling("router_bench").wait_idle
    router_log = logging.getLogger("runtime.routing.router")
    engine = EngineConfig(model=MODEL, max_num_seqs=16, block_size=128, max_model_len=2048)
    profiles = {}
    if profile is not None:
        overhead = profile.request_overhead_s + profile.response_overhead_s
        profiles["llm"] = StepModel(profile.coefficients, overhead_s=overhead)
    lines = [
        "",
        "== real: 2 equal vLLM CPU replicas of smollm2-135m (max_num_seqs 16) on this machine, "
        "one call per request, mixed sizes (exact output lengths: ignore_eos)",
        "router predictions from "
        + ("the fitted profile" if profiles else "speeds learned online (no fitted profile)"),
    ]
    print("\n".join(lines), flush=True)

    async def one(
        router: Router, request: RealRequest, deadline_s: float
    ) -> tuple[bool, float, str | None]:
        sampling = SamplingParams(max_tokens=request.max_tokens, ignore_eos=True)
        messages = [{"role": "user", "content": request.prompt}]
        began = time.monotonic()
        with call_deadline(deadline_s):
            record = await router.chat("llm", messages, sampling)
        return record.ok, time.monotonic() - began, record.error

    async def closed_loop(replicas: list[Any], users: int, duration_s: float) -> float:
        """Requests/s both replicas complete with `users` requests always in flight."""
        router = Router(
            endpoints_for_replicas("llm", replicas), RouterConfig(policy="least_outstanding")
        )
        pending = iter(real_requests(10_000, seed=5))
        done = 0
        stop = time.monotonic() + duration_s

        async def user() -> None:
            nonlocal done
            while time.monotonic() < stop:
                ok, _, _ = await one(router, next(pending), time.monotonic() + NO_DEADLINE_S)
                done += ok

        async with router:
            began = time.monotonic()
            await asyncio.gather(*(user() for _ in range(users)))
            elapsed = time.monotonic() - began
        return done / elapsed

    async def idle_e2e(replicas: list[Any]) -> float:
        router = Router(
            endpoints_for_replicas("llm", replicas), RouterConfig(policy="least_outstanding")
        )
        times = []
        async with router:
            for request in real_requests(6, seed=6)[1:]:
                ok, e2e, error = await one(
                    router, RealRequest(request.prompt, 113), time.monotonic() + NO_DEADLINE_S
                )
                if not ok:
                    raise RuntimeError(f"idle request failed: {error}")
                times.append(e2e)
        return statistics.median(times)

    async def run_policy(
        replicas: list[Any],
        policy: str,
        offsets: list[float],
        requests: list[RealRequest],
        sla_s: float,
    ) -> dict[str, Any]:
        router = Router(
            endpoints_for_replicas("llm", replicas),
            RouterConfig(policy=policy),  # type: ignore[arg-type]
            default_deadline_s=sla_s,
            profiles=profiles,
        )
        outcomes: list[tuple[bool, float, str | None]] = []
        measured = PredictionLog()

        async def send(request: RealRequest, at: float) -> None:
            outcomes.append(await one(router, request, at + sla_s))

        level = router_log.level
        router_log.addHandler(measured)
        router_log.setLevel(logging.DEBUG)
        try:
            async with router:
                start = time.monotonic()
                tasks = []
                for offset, request in zip(offsets, requests, strict=True):
                    delay = start + offset - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(send(request, time.monotonic())))
                await asyncio.gather(*tasks)
                stats = router.stats
        finally:
            router_log.removeHandler(measured)
            router_log.setLevel(level)
        window = max(offsets[-1] - offsets[0], 1.0)
        within = sum(ok and e2e <= sla_s for ok, e2e, _ in outcomes)
        shed = sum(1 for ok, _, error in outcomes if not ok and error and "shed" in error)
        failed = sum(1 for ok, _, error in outcomes if not ok) - shed
        answered = [e2e for ok, e2e, _ in outcomes if ok]
        shed_by: dict[str, int] = {}
        for ok, _, error in outcomes:
            if not ok and error and "shed" in error:
                shed_by[shed_reason(error)] = shed_by.get(shed_reason(error), 0) + 1
        ratios = [m / p for _, p, m in measured.calls if p > 0]
        return {
            "attainment": within / len(outcomes),
            "goodput_rps": within / window,
            "shed_share": shed / len(outcomes),
            "failed": failed,
            "admitted_met": within / (len(outcomes) - shed) if len(outcomes) > shed else None,
            "error_p50": stats.prediction_error_p50,
            "error_p90": stats.prediction_error_p90,
            "model_error_p50": stats.model_error_p50,
            "e2e_p50_s": percentiles(answered, (50,)).get("p50") if answered else None,
            "bias_p50": statistics.median(ratios) if ratios else None,
            "shed_by": shed_by,
            "calls": [
                {"endpoint": e, "predicted_s": p, "measured_s": m} for e, p, m in measured.calls
            ],
        }

    payload: dict[str, Any] = {"loads": {}}
    began = time.monotonic()
    with ReplicaPool(PoolLimits(max_replicas=2, max_memory_gib=16)) as pool:
        replicas = pool.acquire(engine, count=2)
        started = f"replicas ready after {time.monotonic() - began:.0f}s"
        idle = asyncio.run(idle_e2e(replicas))
        asyncio.run(wait_idle(replicas))
        capacity = asyncio.run(closed_loop(replicas, users=40, duration_s=args.real_duration))
        asyncio.run(wait_idle(replicas))
        sla_s = 4.0 * idle
        head = [
            f"{started}; idle e2e p50 {idle:.2f}s; SLA 4x = {sla_s:.2f}s; joint capacity "
            f"{capacity:.2f} req/s (closed loop of 40 requests in flight through "
            f"least_outstanding, both replicas at once, {args.real_duration:.0f}s)",
        ]
        print("\n".join(head), flush=True)
        lines += head
        payload.update({"idle_e2e_s": idle, "capacity_rps": capacity, "sla_s": sla_s})
        policies = [policy for policy in REAL_POLICIES if policy in args.policies]
        for load in args.real_loads:
            rate = load * capacity
            count = max(4, round(rate * args.real_duration))
            runs: dict[str, list[dict[str, Any]]] = {policy: [] for policy in policies}
            # interleaved: every policy on one seed's arrivals, then the next seed, the order
            # of the policies rotated, so a drift of the machine lands on all of them
            for seed in range(args.seeds):
                offsets = poisson_offsets(rate, count, np.random.default_rng(11 + seed))
                requests = real_requests(count, seed=12 + seed)
                turn = seed % len(policies)
                for policy in policies[turn:] + policies[:turn]:
                    cell = asyncio.run(run_policy(replicas, policy, offsets, requests, sla_s))
                    runs[policy].append({"seed": seed, **cell})
                    asyncio.run(wait_idle(replicas))
            cells = {policy: real_cell(found) for policy, found in runs.items()}
            payload["loads"][str(load)] = cells
            block = [
                f"load {load:.2f} ({rate:.2f} req/s, {count} requests per seed, "
                f"{args.seeds} seed(s); noise: half the range over the seeds)",
                f"{'policy':<18} {'SLA att':>8} {'noise':>6} {'goodput':>8} {'shed':>6} "
                f"{'failed':>6} {'adm met':>8} {'err p50':>8} {'err p90':>8} {'model p50':>9} "
                f"{'e2e p50':>8} {'m/p p50':>8} {'shed by':>10}",
            ]
            for policy, cell in cells.items():
                e2e = cell["e2e_p50_s"]
                block.append(
                    f"{policy:<18} {cell['attainment']:>8.3f} {cell['noise']:>6.3f} "
                    f"{cell['goodput_rps']:>8.3f} "
                    f"{_pct(cell['shed_share']):>6} {cell['failed']:>6} "
                    f"{_pct(cell['admitted_met']):>8} {_pct(cell['error_p50']):>8} "
                    f"{_pct(cell['error_p90']):>8} {_pct(cell['model_error_p50']):>9} "
                    f"{'-' if e2e is None else f'{e2e:.2f}s':>8} "
                    f"{_ratio(cell['bias_p50']):>8} "
                    f"{_shed_by(cell['shed_by']):>10}"
                )
            print("\n".join(block), flush=True)
            lines += block
    return lines, payload


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def simulated(
    args: argparse.Namespace, profile: StepTimeProfile
) -> tuple[list[str], dict[str, Any]]:
    """Every scenario in the simulator: its lines and its numbers."""
    lines: list[str] = []
    results: dict[str, dict[float, dict[str, Cell]]] = {}
    payload: dict[str, Any] = {}
    seeds = list(range(args.seeds))
    chosen = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    for scenario in chosen:
        app = build_app(scenario.architecture)
        idle = idle_e2e_s(scenario, profile, app)
        capacity = joint_capacity(scenario, profile, app, idle, args.capacity_requests)
        head = [
            "",
            f"== {scenario.name}: {scenario.description}",
            f"joint capacity {capacity:.2f} req/s (bisection, both replicas at once); idle e2e "
            f"p50 {idle:.2f}s; SLA "
            + ", ".join(f"{n} {f:g}x = {f * idle:.2f}s" for n, _, f in scenario.classes),
        ]
        print("\n".join(head), flush=True)
        lines += head
        results[scenario.name] = {}
        payload[scenario.name] = {"capacity_rps": capacity, "idle_e2e_s": idle, "loads": {}}
        for load in args.loads:
            rate = load * capacity
            cells = {
                policy: run_cell(scenario, profile, app, idle, rate, policy, seeds, args.requests)
                for policy in args.policies
            }
            results[scenario.name][load] = cells
            payload[scenario.name]["loads"][str(load)] = {p: asdict(c) for p, c in cells.items()}
            block = table(scenario, load, rate, cells)
            print("\n".join(block), flush=True)
            lines += block
    if all(p in args.policies for p in ("sla_aware", "least_outstanding", "round_robin")):
        block = ["", *goals(results)]
        print("\n".join(block), flush=True)
        lines += block
    return lines, payload


def engine_lane() -> str:
    """How many vLLM servers were already running when the suite started: their replicas
    compete for the cores the simulation and the real replicas run on. (The lane's lock
    says nothing here: the real suite runs under it, so it is always held by its own
    `flock` wrapper.)"""
    others = foreign_engines()
    state = "contended" if others else "free"
    return f"engine lane: {state} at start (other vLLM servers running: {others})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per cell (simulated and real).")
    parser.add_argument("--requests", type=int, default=400, help="Requests per run.")
    parser.add_argument(
        "--capacity-requests", type=int, default=800, help="Requests per capacity probe."
    )
    parser.add_argument("--loads", type=float, nargs="+", default=list(LOADS))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--scenario", nargs="*", default=[], choices=[s.name for s in SCENARIOS])
    parser.add_argument("--out", type=Path, default=Path("reports/router_suite.txt"))
    parser.add_argument("--real", action="store_true", help="Also run on real replicas.")
    parser.add_argument("--real-loads", type=float, nargs="+", default=[0.5, 0.95, 1.3])
    parser.add_argument("--real-duration", type=float, default=40.0, help="Arrival window, s.")
    parser.add_argument("--real-only", action="store_true", help="Skip the simulator.")
    args = parser.parse_args()

    began = time.monotonic()
    profile, which = machine_profile()
    load_avg = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        f"router suite: {args.seeds} seeds x {args.requests} requests per cell, Python "
        f"{platform.python_version()}, {os.cpu_count()} cores, load average {load_avg}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {engine_lane()}",
        which,
    ]
    print("\n".join(lines), flush=True)
    payload: dict[str, Any] = {"profile": which, "args": {k: str(v) for k, v in vars(args).items()}}
    if not args.real_only:
        sim_lines, payload["simulated"] = simulated(args, profile)
        lines += sim_lines
    if args.real or args.real_only:
        real_lines, payload["real"] = run_real(args, profile if "fitted" in which else None)
        lines += real_lines
    lines.append(f"\ntotal wall time {time.monotonic() - began:.0f}s")
    print(lines[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
