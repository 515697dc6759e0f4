"""One measured run of an application on a real deployment: what `fmtune run` does.

A RunSpec (the runtime part of an experiment file) names the app and its knobs, the dataset,
the workload, the SLA, the deployment and the prices. `execute_run` serves the deployment
(replicas from the pool, kept hot for the caller), drives the workload through the router,
scores every answer, and returns the run's metrics and its trace (one row per span).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runtime.app.dag import App, LlmNode
from runtime.app.datasets import Example
from runtime.app.executor import RequestResult, run_requests, to_outcome
from runtime.app.scoring import Judge, Score, Scorer, score_all
from runtime.capacity import CapacitySpec
from runtime.cluster import reset_prefix_caches, start_endpoints
from runtime.deployment import AppSpec, Deployment, read_yaml_mapping
from runtime.engine.client import CallFailure
from runtime.engine.pool import ReplicaPool
from runtime.engine.replica import GIB
from runtime.engine.sizing import DEFAULT_MACHINES, MachineType, cheapest_machine, engine_resources
from runtime.errors import ConfigError, config_error
from runtime.metrics import (
    CostModel,
    ModelKeyUsage,
    RepeatedMetrics,
    RequestOutcome,
    RunMetrics,
    busy_replica_seconds,
    combine_repeats,
    example_quality,
    model_key_usage,
    summarize,
)
from runtime.profiler import router_step_models
from runtime.routing.router import Endpoint, Router, RouterStats
from runtime.scaling.autoscaler import app_sampler, llm_calls_per_request, size_deployment
from runtime.scaling.provisioner import SizingResult
from runtime.workload import WorkloadSpec, arrival_offsets, sample_requests, warmup_examples

logger = logging.getLogger(__name__)


class DatasetSpec(BaseModel):
    """Which examples of the app's dataset the workload draws from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(
        default=40,
        ge=1,
        le=100_000,
        description="Examples used: the first `size` evaluated rows of the app's dataset (all "
        "of them when it has fewer).",
    )
    seed: int = Field(
        default=0,
        ge=0,
        description="Seed of apps that generate their dataset in Python; an app folder's rows "
        "are its file's (and its split's seed, in app.yaml).",
    )


class SlaSpec(BaseModel):
    """The service-level agreement a run is measured against."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    e2e_s: float = Field(
        gt=0, description="End-to-end deadline of one application request, in seconds."
    )


class Pricing(BaseModel):
    """Prices that turn replica time and API tokens into dollars."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    machines: tuple[MachineType, ...] = Field(
        default=DEFAULT_MACHINES,
        min_length=1,
        description="Machine types a replica may run on, one replica per machine. A model "
        "key's replica-hour price is that of the cheapest machine with the memory its replica "
        "needs (weights as served + KV cache + runtime, runtime.engine.sizing), 2 vCPU and its "
        "GPUs. Default: AWS EC2 on-demand list prices, us-east-1, Linux (2024): t3.large "
        "(2 vCPU, 8 GiB) 0.0832, r5.large (2 vCPU, 16 GiB) 0.126, r5.xlarge (4, 32) 0.252, "
        "r5.2xlarge (8, 64) 0.504, g5.xlarge (4 vCPU, 16 GiB, 1 GPU) 1.006, g5.12xlarge "
        "(48, 192, 4 GPUs) 5.672, g5.48xlarge (192, 768, 8 GPUs) 16.288 USD/hour.",
    )
    per_model_key: dict[str, float] = Field(
        default_factory=dict,
        description="Replica-hour price by model key, instead of its machine's price.",
    )
    api_per_1k_tokens_usd: float = Field(
        default=0.0, ge=0, description="Price of 1000 tokens through external API nodes."
    )

    def machine_for(self, key: str, deployment: Deployment) -> MachineType:
        """The cheapest listed machine a replica of this model key fits on."""
        needed = engine_resources(deployment.models[key].engine)
        return cheapest_machine(needed, self.machines, what=f"model key '{key}'")

    def cost_model(self, deployment: Deployment) -> CostModel:
        """Replica-hour prices of the deployment's model keys, and the API price."""
        prices = {
            key: self.per_model_key[key]
            if key in self.per_model_key
            else self.machine_for(key, deployment).usd_per_hour
            for key in deployment.models
        }
        return CostModel(
            price_per_replica_hour_usd=prices,
            api_price_per_1k_tokens_usd=self.api_per_1k_tokens_usd,
        )


class RunSpec(BaseModel):
    """The runtime part of an experiment file: what to run, on what, against which SLA."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="Name of the experiment.")
    description: str = Field(default="", description="What this experiment is for.")
    app: AppSpec = Field(description="The application and its app-layer knobs.")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec, description="Task examples.")
    workload: WorkloadSpec = Field(description="Arrivals and number of requests.")
    sla: SlaSpec = Field(description="The end-to-end deadline.")
    deployment: Deployment = Field(description="Models, engines, replicas and router.")
    pricing: Pricing = Field(default_factory=Pricing, description="Replica and API prices.")
    node_timeout_s: float = Field(
        default=300.0, gt=0, description="Longest any one DAG node may take before it fails."
    )
    capacity: CapacitySpec | None = Field(
        default=None,
        description="Measure the deployment's capacity after the run (runtime.capacity): the "
        "highest arrival rate whose SLA attainment stays >= capacity.target, searched in the "
        "simulator and confirmed on the real engine, as the metrics max_goodput_rps and "
        "cost_per_1k_at_capacity_usd. Absent: not measured.",
    )

    @model_validator(mode="after")
    def _models_served(self) -> RunSpec:
        """Every model key the app's nodes (and its judge) call is a deployment model key."""
        self.app.check_models(self.deployment.models, "app", scorer=True)
        return self

    @model_validator(mode="after")
    def _machines_fit(self) -> RunSpec:
        """Every model key has a price: its own, or a listed machine its replica fits on."""
        self.pricing.cost_model(self.deployment)
        return self


@dataclass
class RunResult:
    """What a run measured (warm-up requests left out of all of it)."""

    metrics: RunMetrics
    """The run's metrics, combined over repeats (`runtime.metrics.combine_repeats`)."""
    trace: pd.DataFrame
    """One row per span of every measured request, with its repeat and dataset example."""
    results: list[RequestResult]
    """Every measured request's result, repeat after repeat."""
    router_stats: RouterStats
    replica_start_s: dict[str, float]
    endpoints: list[str] = field(default_factory=list)
    replica_logs: dict[str, str] = field(default_factory=dict)
    """The end of each replica's server log, for artifacts and failure reports."""
    extra_metrics: dict[str, Any] = field(default_factory=dict)
    """Metrics measured beside the run and reported with it (the capacity's: runtime.capacity),
    merged into metrics_dict()."""
    sizing: dict[str, SizingResult] = field(default_factory=dict)
    """How each model key with replicas 'auto' was sized before the run (none otherwise);
    the count stays fixed during the run (no autoscaling: runs are short, and the cost
    accounting counts a fixed number of replicas)."""
    repeated: RepeatedMetrics | None = None
    """Each repeat's metrics, the intervals over repeats and each example's quality (None
    for a result built without them)."""
    examples: list[int] = field(default_factory=list)
    """The dataset example each measured request carried, in request order (the same in
    every repeat, and in every run of the same workload and dataset)."""
    per_model_key: dict[str, ModelKeyUsage] = field(default_factory=dict)
    """Each model key's replicas, price, calls per request, cost share and memory peak."""

    def metrics_dict(self) -> dict[str, Any]:
        """metrics.json: the run metrics plus replica start times and router counters, and,
        for comparisons with other runs: `<metric>_ci95` (the 95% interval of each median
        over repeats, with two or more), `repeat_values` (each metric's value per repeat)
        and `examples` (`index`: the dataset examples in request order, `quality`: each
        one's score averaged over repeats)."""
        data = self.metrics.model_dump(mode="json")
        if self.repeated is not None:
            for name, interval in self.repeated.intervals.items():
                data[f"{name}_ci95"] = interval
            data["repeat_values"] = self.repeated.values()
            data["examples"] = {
                "index": list(self.examples),
                "quality": self.repeated.example_quality,
            }
        data["replica_start_s"] = max(self.replica_start_s.values(), default=None)
        data["router_shed"] = self.router_stats.shed
        data["router_retried"] = self.router_stats.retried
        data["router_queue_rejected"] = self.router_stats.queue_rejected
        if self.per_model_key:
            data["per_model_key"] = {
                key: usage.model_dump(mode="json") for key, usage in self.per_model_key.items()
            }
        data.update(self.extra_metrics)
        return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested mappings, creating levels; errors name the path."""
    parts = dotted.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(parts[:depth])}' is not a mapping")
        node = node.setdefault(part, {})
    if not isinstance(node, dict):
        raise ConfigError(f"--set {dotted}: '{'.'.join(parts[:-1])}' is not a mapping")
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an experiment mapping with dotted-path overrides applied."""
    import copy

    merged = copy.deepcopy(data)
    for dotted, value in overrides.items():
        set_dotted(merged, dotted, value)
    return merged


def load_run_spec(path: Path, overrides: Mapping[str, Any] | None = None) -> RunSpec:
    """Read an experiment file (with `--set` overrides; an app path relative to the file);
    errors name file, field and value."""
    data = apply_overrides(read_yaml_mapping(path), overrides or {})
    data.pop("tune", None)  # the tuner's section; a run ignores it
    try:
        return RunSpec.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as error:
        raise config_error(error, str(path), RunSpec) from None


async def _score_runs(
    scorer: Scorer,
    runs: list[list[RequestResult]],
    chosen: list[Example],
    endpoints: list[Endpoint],
    spec: RunSpec,
) -> list[list[Score]]:
    """Every measured answer's score, repeat by repeat (runtime.app.scoring: a scorer that
    fails gives an error, never raises). An LLM judge's calls go through a router of their own
    over the run's endpoints, after the measured requests, so they cost the run nothing."""

    async def score(judge: Judge | None) -> list[list[Score]]:
        return [
            await score_all(scorer, [r.outputs if r.ok else None for r in results], chosen, judge)
            for results in runs
        ]

    if not scorer.model_keys:
        return await score(None)
    router = Router(endpoints, spec.deployment.router, default_deadline_s=spec.node_timeout_s)
    async with router:
        return await score(Judge(router, {key: key for key in scorer.model_keys}))


def calls_by_model_key(results: Sequence[RequestResult], app: App) -> dict[str, float]:
    """Mean LLM calls per request by the model key each call's node names (calls that ran;
    a node skipped by its `when` made none). No requests: no calls."""
    node_keys = {node.id: node.model for node in app.nodes if isinstance(node, LlmNode)}
    counts = dict.fromkeys(sorted(set(node_keys.values())), 0)
    for result in results:
        for span in result.spans:
            if span.kind == "llm" and not span.skipped and span.node_id in node_keys:
                counts[node_keys[span.node_id]] += 1
    return {key: count / len(results) if results else 0.0 for key, count in counts.items()}


def _kind(failure: CallFailure | None) -> str | None:
    """A failure kind as the trace stores it: its plain string value."""
    return None if failure is None else failure.value


def _trace_frame(
    results: list[RequestResult],
    t0: float,
    quality: list[float | None],
    *,
    repeat: int = 0,
    examples: list[int] | None = None,
) -> pd.DataFrame:
    """One row per span, times relative to the run's start; `repeat` and the dataset
    `example` of each request (by request id) as columns."""
    rows = []
    for result, request_quality in zip(results, quality, strict=True):
        for span in result.spans:
            row = dataclasses.asdict(span)
            row["repeat"] = repeat
            if examples is not None:
                row["example"] = examples[result.request_id]
            row["itl_s"] = list(row.get("itl_s") or [])
            row["failure"] = _kind(span.failure)
            row["start_s"] = span.start_s - t0
            row["end_s"] = span.end_s - t0
            row["request_ok"] = result.ok
            row["request_error"] = result.error
            row["request_failure"] = _kind(result.failure)
            row["request_e2e_s"] = result.e2e_s
            row["request_quality"] = request_quality
            rows.append(row)
    return pd.DataFrame(rows)


class _MemorySampler:
    """Samples the resident memory of the deployment's replicas to find the peak."""

    def __init__(self, endpoints: list[Endpoint], interval_s: float = 0.5) -> None:
        self.endpoints = endpoints
        self.interval_s = interval_s
        self.peak_gib = 0.0
        self.peak_gib_by_key: dict[str, float] = {}
        """Peak of each model key's replicas together (keys with a started replica)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fmtune-memory", daemon=True)

    def _sample(self) -> None:
        by_key: dict[str, float] = {}
        for e in self.endpoints:
            if e.replica is not None:
                by_key[e.model_key] = by_key.get(e.model_key, 0.0) + e.replica.rss_bytes() / GIB
        self.peak_gib = max(self.peak_gib, sum(by_key.values()))
        for key, gib in by_key.items():
            self.peak_gib_by_key[key] = max(self.peak_gib_by_key.get(key, 0.0), gib)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> _MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()


def execute_run(
    spec: RunSpec,
    pool: ReplicaPool | None,
    *,
    on_phase: Callable[[str], None] | None = None,
    on_request_done: Callable[[RequestResult], None] | None = None,
) -> RunResult:
    """Serve the deployment, drive the workload through the router, score, measure.

    Model keys with replicas 'auto' are sized first (runtime.scaling.autoscaler.initial_size,
    calibrated with the app's own calls on the run's first examples) and keep that count.
    Before each repeat the replicas' prefix caches are emptied (a hot replica may hold these
    very prompts from an earlier trial) and the workload's warm-up requests are sent all at
    once and forgotten (no metric, trace row, router counter or replica-second comes from
    them), and the measured workload is sent `repeats` times, one repeat after the other,
    each with the same examples in the same order and the same schedule. on_request_done is
    called for measured requests only.
    """
    app = spec.app.build()
    keys = sorted(spec.deployment.models)
    app.validate_against(set(keys))
    application = spec.app.application()
    dataset = application.examples(spec.dataset.size, spec.dataset.seed)
    examples = sample_requests(spec.workload, len(dataset))
    chosen = [dataset[index] for index in examples]
    warmup = [dict(dataset[index].inputs) for index in warmup_examples(spec.workload, len(dataset))]
    offsets = arrival_offsets(spec.workload)
    arrivals = spec.workload.arrivals
    users = getattr(arrivals, "users", None) if offsets is None else None
    think_s = float(getattr(arrivals, "think_time_s", 0.0) or 0.0)
    repeats = spec.workload.repeats

    def phase(text: str) -> None:
        logger.info(text)
        if on_phase is not None:
            on_phase(text)

    phase("starting replicas")
    inputs = [dict(example.inputs) for example in chosen]
    calls = {key: llm_calls_per_request(app, key) for key in keys}
    deployment, sizing = size_deployment(
        spec.deployment,
        pool,
        calls={key: max(1, count) for key, count in calls.items()},
        samplers={key: app_sampler(app, inputs, key) for key, count in calls.items() if count},
    )
    endpoints = start_endpoints(deployment, pool)
    starts = {e.endpoint_id: float(e.replica.start_s or 0.0) for e in endpoints if e.replica}
    models = {key: key for key in keys}

    async def drive() -> tuple[
        list[list[RequestResult]], list[float], RouterStats, float, _MemorySampler
    ]:
        router = Router(
            endpoints,
            spec.deployment.router,
            default_deadline_s=spec.sla.e2e_s,
            profiles=router_step_models(deployment, len(endpoints)),
        )
        runs: list[list[RequestResult]] = []
        walls: list[float] = []
        unmeasured = {"routed": 0, "shed": 0, "queue_rejected": 0, "retried": 0}

        async def prepare() -> None:
            """Every repeat starts from the same engine state: empty prefix caches (a hot
            replica may hold these very prompts from an earlier trial, or the previous
            repeat), then the warm-up requests, whose router counts are not the run's."""
            await asyncio.to_thread(reset_prefix_caches, endpoints)
            if not warmup:
                return
            phase(f"warming up with {len(warmup)} requests")
            before = dataclasses.replace(router.stats)
            done = await run_requests(
                app, warmup, router, models, arrival_offsets_s=[0.0] * len(warmup),
                node_timeout_s=spec.node_timeout_s, sla_e2e_s=spec.sla.e2e_s,
            )  # fmt: skip
            for name in unmeasured:
                unmeasured[name] += getattr(router.stats, name) - getattr(before, name)
            failed = sum(not result.ok for result in done)
            if failed:
                logger.warning("%d of %d warm-up requests failed", failed, len(done))

        async with router:
            before = dataclasses.replace(router.stats)
            await prepare()
            phase(f"running {len(chosen)} requests")
            with _MemorySampler(endpoints) as memory:
                t0 = time.monotonic()
                for repeat in range(repeats):
                    if repeats > 1:
                        if repeat:
                            await prepare()
                        phase(f"running {len(chosen)} requests (repeat {repeat + 1} of {repeats})")
                    started = time.monotonic()
                    runs.append(
                        await run_requests(
                            app,
                            inputs,
                            router,
                            models,
                            arrival_offsets_s=offsets,
                            users=users,
                            think_time_s=think_s,
                            node_timeout_s=spec.node_timeout_s,
                            on_done=on_request_done,
                            sla_e2e_s=spec.sla.e2e_s,
                        )
                    )
                    walls.append(time.monotonic() - started)
        stats = dataclasses.replace(
            router.stats,
            **{
                name: getattr(router.stats, name) - getattr(before, name) - unmeasured[name]
                for name in unmeasured
            },
        )  # the warm-ups' calls are not the run's
        return runs, walls, stats, t0, memory

    runs, walls, stats, t0, memory = asyncio.run(drive())
    peak_gib = memory.peak_gib
    scores = asyncio.run(_score_runs(application.scorer, runs, chosen, endpoints, spec))

    replicas = {
        key: sum(1 for e in endpoints if e.model_key == key and e.replica is not None)
        for key in keys
    }
    prices = spec.pricing.cost_model(spec.deployment)
    per_repeat: list[RunMetrics] = []
    repeat_outcomes: list[list[RequestOutcome]] = []
    busy_by_repeat: list[dict[str, float]] = []
    frames: list[pd.DataFrame] = []
    for repeat, (results, wall) in enumerate(zip(runs, walls, strict=True)):
        qualities: list[float | None] = []
        outcomes: list[RequestOutcome] = []
        for result, score in zip(results, scores[repeat], strict=True):
            qualities.append(score.value)
            outcomes.append(to_outcome(result, score.value, score.error))  # shed by its kind
        repeat_outcomes.append(outcomes)
        busy_by_repeat.append(busy_replica_seconds(outcomes, replicas))
        per_repeat.append(
            summarize(
                outcomes,
                wall_s=wall,
                sla_e2e_s=spec.sla.e2e_s,
                replica_seconds=busy_by_repeat[-1],
                prices=prices,
                peak_memory_gib=peak_gib if starts else None,
            )
        )
        frames.append(_trace_frame(results, t0, qualities, repeat=repeat, examples=examples))
    repeated = combine_repeats(per_repeat, example_quality(repeat_outcomes))
    measured = [result for results in runs for result in results]
    per_key = model_key_usage(
        calls_per_request=calls_by_model_key(measured, app),
        replicas=replicas,
        replica_seconds_by_repeat=busy_by_repeat,
        prices=prices.price_per_replica_hour_usd,
        n_requests=len(chosen),
        peak_memory_gib=memory.peak_gib_by_key if starts else None,
    )
    return RunResult(
        metrics=repeated.metrics,
        trace=pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0],
        results=measured,
        router_stats=stats,
        replica_start_s=starts,
        endpoints=[e.endpoint_id for e in endpoints],
        replica_logs={e.endpoint_id: e.replica.log_tail() for e in endpoints if e.replica},
        sizing=sizing,
        repeated=repeated,
        examples=examples,
        per_model_key=per_key,
    )


def write_run(result: RunResult, out: Path) -> list[Path]:
    """metrics.json and trace.parquet in `out`."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(result.metrics_dict(), indent=2) + "\n")
    trace_path = out / "trace.parquet"
    with contextlib.suppress(FileNotFoundError):
        trace_path.unlink()
    result.trace.to_parquet(trace_path, index=False)
    return [metrics_path, trace_path]
