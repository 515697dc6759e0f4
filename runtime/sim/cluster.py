"""A whole deployment on a virtual clock: arrivals, the app's DAG, the router, the replicas.

`simulate` runs the same experiment a real run (`runtime.run.execute_run`) measures, as a
discrete-event simulation:

- **Arrivals** come from the experiment's workload through the same functions a real run
  uses (`runtime.workload.arrival_offsets`; closed loops send each user's next request when
  the previous one ends, after the think time), so one seed gives one schedule.
- **Each request walks the app's DAG** (`runtime.app.dag.App`) as the executor does: a stage
  starts when the stages it depends on have finished, parallel branches overlap, a loop runs
  its body round after round, a node that fails (shed, queue full, timeout, refused by the
  engine) ends its request at once and cancels the request's other calls. Every LLM call
  gets its share of the SLA as its deadline (`App.deadline_shares`). What the DAG's
  conditions decide (which nodes are skipped, how many rounds a loop runs) and each call's
  token counts come from a `RequestShape` per request, taken from measured traces
  (`shapes_from_spans`) or drawn from distributions (`synthetic_shapes`).
- **Calls are routed** as `runtime.routing.router.Router` routes them, with the same pure
  pieces (`runtime.routing.policies`, `runtime.routing.prediction`): admission control (and
  the check again when a queued call is let go) for `sla_aware`, the least-slack queue, the
  policy's choice over replica snapshots (the router's own outstanding counters and the calls
  it sent, and the engine's running/waiting/KV usage as of the last `/metrics` refresh).
  The router predicts with the replica's profile (as a live router given the stored
  profile does), corrected online by the measured completions, and learns output lengths
  from finished calls; each call's prediction is kept beside its measured completion.
- **The oracle** (``SimSpec.oracle``), an upper bound no live router can reach: each call
  goes at once to the replica where a what-if copy of the simulated replica (true output
  lengths, true step times, the prefix cache) finishes it soonest, among those where it
  meets its deadline without pushing a call already there past its own; it is shed when
  there is none. Only arrivals after the decision are unknown to it.
- **Each replica** is a `runtime.sim.scheduler.ReplicaScheduler` (vLLM's scheduler) whose
  steps last what the replica's `StepTimeProfile` predicts, plus the profile's API overheads
  before the engine sees a call and after each step's tokens.
- **Replicas 'auto'** are sized as a real run sizes them (`runtime.scaling.autoscaler.
  initial_size`): the app's own calls, one request at a time on one simulated replica, give
  the service-time sample, and the provisioner's pure `size_replicas` picks the count.

The output is per-request `RequestOutcome` records and `RunMetrics` computed by the same
`runtime.metrics.summarize` as a real run, so simulated and measured runs compare key by
key; quality is not simulated (it is None). Pure: no clock, no process, no file (beyond a
replayed arrival trace the workload names).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.app.dag import App, LlmNode, Stage
from runtime.engine.config import EngineConfig
from runtime.metrics import CostModel, RequestOutcome, RunMetrics, summarize
from runtime.routing.policies import (
    Assessment,
    CallDemand,
    QueueFull,
    ReplicaSnapshot,
    RouteContext,
    RouterConfig,
    SlackQueue,
    admit,
    get_policy,
)
from runtime.routing.prediction import (
    InFlightCall,
    OutputLengths,
    PredictionError,
    PredictionTracker,
    StepModel,
    Traffic,
    given_length,
)
from runtime.scaling.provisioner import (
    ReplicaCount,
    ScalingPolicy,
    SizingResult,
    size_replicas,
)
from runtime.sim.scheduler import (
    ReplicaCounters,
    ReplicaScheduler,
    RequestState,
    SchedulerConfig,
    SimRequest,
)
from runtime.sim.steptime import StepTimeProfile
from runtime.workload import ClosedLoop, WorkloadSpec, arrival_offsets, sample_requests

logger = logging.getLogger(__name__)

#: Calls the live router lets into a replica when the engine's max_num_seqs is unset
#: (runtime.routing.router.endpoints_for_replicas's default).
ROUTER_DEFAULT_MAX_NUM_SEQS = 256


# --------------------------------------------------------------------------------------------
# What each request asks of the models
# --------------------------------------------------------------------------------------------


class Segment(BaseModel):
    """Leading prompt content that other calls share token for token.

    ``global`` content is the same in every request (a system prompt, instructions);
    ``request`` content is the same in every call of one request with the same key (the
    request's input text read by several nodes). Equal content over a whole KV block lets
    the prefix cache skip computing it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    scope: Literal["global", "request"] = Field(description="Who shares this content.")
    key: str = Field(min_length=1, description="Names the content within its scope.")
    tokens: int = Field(ge=1, description="Its length in tokens.")


class CallShape(BaseModel):
    """One LLM call's size: prompt tokens (with their shared leading part) and output tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_tokens: int = Field(ge=1, description="Prompt tokens, chat template included.")
    completion_tokens: int = Field(ge=1, description="Tokens the call generates.")
    shared: tuple[Segment, ...] = Field(
        (),
        description="The prompt's leading segments shared with other calls, in order; "
        "the rest of the prompt is this call's own.",
    )

    @model_validator(mode="after")
    def _check(self) -> CallShape:
        shared = sum(segment.tokens for segment in self.shared)
        if shared > self.prompt_tokens:
            raise ValueError(
                f"shared segments hold {shared} tokens, more than prompt_tokens="
                f"{self.prompt_tokens}"
            )
        return self


class RequestShape(BaseModel):
    """What one request's LLM nodes do: per node id, one call per round it ran.

    A node missing (or with no calls) was skipped by its condition; a loop runs as many
    rounds as its body's nodes have calls.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    calls: dict[str, tuple[CallShape, ...]] = Field(
        default_factory=dict, description="LLM node id -> its calls, round by round."
    )
    sla_e2e_s: float | None = Field(
        None,
        gt=0,
        description="This request's own end-to-end deadline, seconds (a request class with "
        "its own SLA); None: the spec's sla_e2e_s. Its calls' deadlines are their shares of it.",
    )


class NodeTokens(BaseModel):
    """Token counts of one LLM node as distributions: samples drawn with replacement."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_tokens: tuple[int, ...] = Field(min_length=1, description="Prompt token samples.")
    completion_tokens: tuple[int, ...] = Field(
        min_length=1, description="Completion token samples."
    )
    shared: tuple[Segment, ...] = Field((), description="Leading shared segments of the prompt.")


def synthetic_shapes(
    app: App,
    nodes: Mapping[str, NodeTokens],
    count: int,
    seed: int = 0,
    loop_rounds: Mapping[str, int] | None = None,
) -> list[RequestShape]:
    """``count`` request shapes with each LLM node's tokens drawn from ``nodes`` (seeded).

    Every LLM node runs (no condition is false); a loop runs ``loop_rounds[loop id]`` rounds
    (default its max_rounds). Prompts are at least as long as their shared segments.
    """
    missing = [node.id for node in app.nodes if isinstance(node, LlmNode) and node.id not in nodes]
    if missing:
        raise ValueError(f"nodes has no token distribution for llm nodes {missing}")
    rounds = {
        node_id: (loop_rounds or {}).get(loop.id, loop.max_rounds)
        for loop in app.loops
        for node_id in loop.body
    }
    rng = np.random.default_rng(seed)
    shapes: list[RequestShape] = []
    for _ in range(count):
        calls: dict[str, tuple[CallShape, ...]] = {}
        for node in app.nodes:
            if not isinstance(node, LlmNode):
                continue
            spec = nodes[node.id]
            floor = sum(segment.tokens for segment in spec.shared)
            calls[node.id] = tuple(
                CallShape(
                    prompt_tokens=max(int(rng.choice(spec.prompt_tokens)), floor, 1),
                    completion_tokens=max(int(rng.choice(spec.completion_tokens)), 1),
                    shared=spec.shared,
                )
                for _ in range(rounds.get(node.id, 1))
            )
        shapes.append(RequestShape(calls=calls))
    return shapes


def shapes_from_spans(
    rows: Iterable[Mapping[str, Any]],
    shared: Mapping[str, tuple[Segment, ...]] | None = None,
    repeat: int = 0,
) -> list[RequestShape]:
    """Request shapes from a real run's trace rows (trace.parquet as dicts, one per span).

    Uses each row's request_id, node_id, kind, round, skipped, prompt_tokens and
    completion_tokens; LLM spans that were skipped or produced no token are left out. A run
    measured several times has a ``repeat`` column: only that repeat's rows are read.
    ``shared`` gives each node's shared leading segments (the trace does not record them).
    Returns one shape per request id, in request id order (ids 0..n-1 expected).
    """
    by_request: dict[int, dict[str, list[tuple[int, CallShape]]]] = {}
    for row in rows:
        if int(row.get("repeat") or 0) != repeat:
            continue
        request_id = int(row["request_id"])
        calls = by_request.setdefault(request_id, {})
        if row.get("kind") != "llm" or row.get("skipped"):
            continue
        prompt, completion = (
            int(row.get("prompt_tokens") or 0),
            int(row.get("completion_tokens") or 0),
        )
        if prompt < 1 or completion < 1:
            continue
        node_id = str(row["node_id"])
        segments = (shared or {}).get(node_id, ())
        floor = sum(segment.tokens for segment in segments)
        shape = CallShape(
            prompt_tokens=max(prompt, floor), completion_tokens=completion, shared=segments
        )
        calls.setdefault(node_id, []).append((int(row.get("round") or 0), shape))
    if sorted(by_request) != list(range(len(by_request))):
        raise ValueError(
            f"trace request ids must be 0..{len(by_request) - 1}, got {sorted(by_request)[:10]}"
        )
    return [
        RequestShape(
            calls={
                node: tuple(shape for _, shape in sorted(found, key=lambda item: item[0]))
                for node, found in by_request[index].items()
            }
        )
        for index in range(len(by_request))
    ]


def shapes_for_workload(
    examples: Sequence[RequestShape], workload: WorkloadSpec
) -> list[RequestShape]:
    """The shape of each request of the workload: request i carries the dataset example a
    real run would send it (`runtime.workload.sample_requests`), given one shape per example."""
    return [examples[index] for index in sample_requests(workload, len(examples))]


# --------------------------------------------------------------------------------------------
# The simulated experiment
# --------------------------------------------------------------------------------------------


class SimModel(BaseModel):
    """One model key of the simulated deployment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: EngineConfig = Field(description="The engine knobs of every replica.")
    replicas: ReplicaCount = Field(
        description="Replicas serving this model key, or 'auto' for the provisioner to size."
    )
    profile: StepTimeProfile = Field(description="The measured model of one replica.")
    replica_engines: tuple[EngineConfig, ...] = Field(
        (),
        description="The engine knobs of each replica when they differ (unequal replicas of "
        "one model key, e.g. different max_num_seqs); empty: every replica runs `engine`.",
    )

    @model_validator(mode="after")
    def _check(self) -> SimModel:
        if self.replica_engines and len(self.replica_engines) != self.replicas:
            raise ValueError(
                f"replica_engines must hold one engine per replica ({self.replicas}), got "
                f"{len(self.replica_engines)}"
            )
        return self

    def engines(self) -> tuple[EngineConfig, ...]:
        """The engine of each replica (of a sized model key)."""
        return self.replica_engines or (self.engine,) * _count(self)


class SimProvisioner(BaseModel):
    """How 'auto' replica counts are sized (runtime.deployment.ProvisionerConfig's fields,
    and the calibration runtime.scaling.autoscaler.app_sampler makes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target_rps: float = Field(1.0, gt=0, description="Application requests per second to size for.")
    sla_p99_s: float = Field(
        30.0, gt=0, description="End-to-end p99 latency the sizing must stay within."
    )
    epsilon: float = Field(
        0.01, gt=0, lt=1, description="Largest predicted share of requests allowed to miss the SLA."
    )
    scaling: ScalingPolicy = Field(
        default_factory=ScalingPolicy, description="min_replicas and max_replicas bound the count."
    )
    calibration_calls: int = Field(
        6, ge=1, description="Calls whose service times make the sample (the live default)."
    )
    warmup_calls: int = Field(1, ge=0, description="First calls left out of the sample.")


class SimSpec(BaseModel):
    """Everything a simulated run needs: the experiment's parts plus the measured inputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    app: App = Field(description="The application's DAG (llm nodes name model keys).")
    workload: WorkloadSpec = Field(description="Arrivals and number of requests, seeded.")
    shapes: tuple[RequestShape, ...] = Field(
        description="What each request's LLM nodes do, one per request of the workload."
    )
    sla_e2e_s: float = Field(gt=0, description="End-to-end deadline of one request, seconds.")
    models: dict[str, SimModel] = Field(min_length=1, description="Model keys and replicas.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="Routing.")
    provisioner: SimProvisioner = Field(
        default_factory=SimProvisioner, description="Sizing of model keys with replicas 'auto'."
    )
    prices: CostModel = Field(
        description="Replica-hour price of every model key (and the API token price)."
    )
    node_timeout_s: float = Field(300.0, gt=0, description="Longest one DAG node may take.")
    node_latency_s: dict[str, float] = Field(
        default_factory=dict,
        description="Seconds each code or api node takes, by node id (default 0).",
    )
    seed: int = Field(0, ge=0, description="Seed of the simulator's own draws (speculation).")
    oracle: bool = Field(
        False,
        description="Route and admit with perfect knowledge of service times instead of "
        "router.policy (see the module docstring): the upper bound of a router benchmark.",
    )
    output_lengths: dict[str, tuple[int, ...]] = Field(
        default_factory=dict,
        description="Output tokens of each LLM node's calls in a trace of the app (a "
        "calibration run; by node id): the router's output lengths start from them "
        "(Router.seed_lengths) instead of from max_tokens. Empty: learned from the run alone.",
    )

    @model_validator(mode="after")
    def _check(self) -> SimSpec:
        if len(self.shapes) != self.workload.num_requests:
            raise ValueError(
                f"shapes must hold one shape per request ({self.workload.num_requests}), "
                f"got {len(self.shapes)}"
            )
        unpriced = sorted(set(self.models) - set(self.prices.price_per_replica_hour_usd))
        if unpriced:
            raise ValueError(f"prices.price_per_replica_hour_usd has no price for {unpriced}")
        llm = {node.id: node for node in self.app.nodes if isinstance(node, LlmNode)}
        unknown = sorted({node.model for node in llm.values()} - set(self.models))
        if unknown:
            raise ValueError(
                f"llm nodes call model keys {unknown} that models does not have "
                f"(models: {sorted(self.models)})"
            )
        for index, shape in enumerate(self.shapes):
            strange = sorted(set(shape.calls) - set(llm))
            if strange:
                raise ValueError(
                    f"shapes[{index}] has calls of {strange}, which are not llm nodes of app "
                    f"'{self.app.name}' (llm nodes: {sorted(llm)})"
                )
        return self


@dataclass(frozen=True)
class SimCall:
    """One simulated LLM call, as a trace span would show it (times in simulated seconds).

    ``start_s``/``end_s`` span the node (router queue included); ``ttft_s`` counts from the
    moment the call left the router, as the client measures it.
    """

    request_id: int
    node_id: str
    round: int
    endpoint: str
    start_s: float
    end_s: float
    ttft_s: float | None
    tpot_s: float | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    preemptions: int
    error: str | None
    sent_s: float | None = None
    """When the router sent it to its replica (None: it never left the router)."""
    predicted_s: float | None = None
    """The router's predicted completion, seconds from sent_s (None: not sent)."""
    deadline_s: float | None = None
    """Its deadline (its request's start plus its share of the request's SLA)."""


@dataclass
class RouterCounters:
    """The simulated router's counters (runtime.routing.router.RouterStats's names)."""

    routed: int = 0
    shed: int = 0
    queue_rejected: int = 0
    retried: int = 0
    predictions: int = 0
    prediction_error_p50: float | None = None
    prediction_error_p90: float | None = None
    model_error_p50: float | None = None
    """Median relative error of the predictions redone for each call's real output length
    (the step-time model's own error; see runtime.routing.prediction.PredictionError)."""
    model_error_p90: float | None = None


@dataclass
class SimResult:
    """What a simulated run produced."""

    metrics: RunMetrics
    outcomes: list[RequestOutcome]
    calls: list[SimCall]
    replicas: dict[str, ReplicaCounters]
    router_stats: RouterCounters
    replica_start_s: dict[str, float]
    events: int = 0
    """Events the simulation processed (a measure of its work)."""
    sizing: dict[str, SizingResult] = field(default_factory=dict)
    """How each model key with replicas 'auto' was sized (none otherwise)."""

    def metrics_dict(self) -> dict[str, Any]:
        """The keys a real run's metrics.json has (runtime.run.RunResult.metrics_dict)."""
        data = self.metrics.model_dump(mode="json")
        data["replica_start_s"] = max(self.replica_start_s.values(), default=None)
        data["router_shed"] = self.router_stats.shed
        data["router_retried"] = self.router_stats.retried
        data["router_queue_rejected"] = self.router_stats.queue_rejected
        return data


def simulate(spec: SimSpec) -> SimResult:
    """Run the experiment on the virtual clock and measure it as a real run is measured.

    Model keys with replicas 'auto' are sized first (`size_auto_replicas`) and keep that
    count for the run, as in a real run.
    """
    sized, sizing = size_auto_replicas(spec)
    result = _Simulation(sized).run()
    result.sizing = sizing
    return result


def llm_calls_per_request(app: App, model_key: str) -> int:
    """LLM calls of one request on a model key, loop bodies counted max_rounds times (as
    runtime.scaling.autoscaler.llm_calls_per_request counts them)."""
    rounds = {node_id: loop.max_rounds for loop in app.loops for node_id in loop.body}
    return sum(
        rounds.get(node.id, 1)
        for node in app.nodes
        if isinstance(node, LlmNode) and node.model == model_key
    )


def size_auto_replicas(spec: SimSpec) -> tuple[SimSpec, dict[str, SizingResult]]:
    """The spec with every 'auto' replica count sized, and how each was sized.

    As runtime.scaling.autoscaler.initial_size does on real replicas: the run's requests (in
    order, cycled) run one at a time through the app on one replica per model key until
    warm-up plus calibration calls were made; each LLM call's duration on the key is a
    service-time sample; `size_replicas` picks the smallest count predicted to meet the
    provisioner's p99 for its target rate with the app's calls per request, clamped to the
    scaling policy's min and max.
    """
    auto = [key for key, model in spec.models.items() if model.replicas == "auto"]
    if not auto:
        return spec, {}
    prov = spec.provisioner
    wanted = prov.calibration_calls + prov.warmup_calls
    single = {
        key: model.model_copy(update={"replicas": 1}) if model.replicas == "auto" else model
        for key, model in spec.models.items()
    }
    per_request = {key: max(1, llm_calls_per_request(spec.app, key)) for key in auto}
    count = 4 * wanted  # at most 4 tries per wanted call, as the live sampler
    shapes = tuple(spec.shapes[index % len(spec.shapes)] for index in range(count))
    calibration = spec.model_copy(
        update={
            "models": single,
            "router": RouterConfig(policy="round_robin"),  # the live sampler skips the router
            "workload": WorkloadSpec(arrivals=ClosedLoop(users=1), num_requests=count),
            "shapes": shapes,
        }
    )
    calls = _Simulation(calibration).run().calls
    sizing: dict[str, SizingResult] = {}
    models = dict(spec.models)
    cap = prov.scaling.max_replicas
    floor = min(prov.scaling.min_replicas, cap)
    model_of = {node.id: node.model for node in spec.app.nodes if isinstance(node, LlmNode)}
    for key in auto:
        durations = [
            call.end_s - call.start_s
            for call in sorted(calls, key=lambda c: c.start_s)
            if model_of.get(call.node_id) == key and call.error is None
        ][:wanted]
        samples = durations[prov.warmup_calls :] or durations
        if not samples:
            raise ValueError(f"calibration of model key '{key}' made no successful call")
        result = size_replicas(
            prov.target_rps,
            per_request[key],
            samples,
            prov.sla_p99_s,
            prov.epsilon,
            max_replicas=cap,
        )
        chosen = min(max(result.replicas, floor), cap)
        if chosen != result.replicas:
            result = replace(
                result, replicas=chosen, reason=f"{result.reason}; clamped to {chosen}"
            )
        sizing[key] = result
        models[key] = models[key].model_copy(update={"replicas": chosen})
    return spec.model_copy(update={"models": models}), sizing


# --------------------------------------------------------------------------------------------
# The event loop
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Endpoint:
    """A simulated replica and what the router tracks about it."""

    endpoint_id: str
    model_key: str
    scheduler: ReplicaScheduler
    profile: StepTimeProfile
    max_num_seqs: int
    model: StepModel
    """What the router predicts this replica's steps with (the profile's coefficients)."""
    outstanding: int = 0
    outstanding_prefill_tokens: int = 0
    outstanding_decode_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    step_end_s: float | None = None
    version: int = 0
    calls: dict[_Node, None] = field(default_factory=dict)
    """The calls sent here that have not ended, in send order (the router's in_flight)."""

    def snapshot(self) -> ReplicaSnapshot:
        """What a pure policy decides on (runtime.routing.router.Endpoint.snapshot)."""
        return ReplicaSnapshot(
            replica_id=self.endpoint_id,
            model=self.model_key,
            healthy=True,
            outstanding_requests=self.outstanding,
            outstanding_prefill_tokens=self.outstanding_prefill_tokens,
            outstanding_decode_tokens=self.outstanding_decode_tokens,
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_cache_usage=self.kv_cache_usage,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.scheduler.config.max_num_batched_tokens,
            calls=tuple(run.in_flight() for run in self.calls),
        )


@dataclass(eq=False)
class _Request:
    """One application request walking the DAG."""

    index: int
    shape: RequestShape
    start_s: float = 0.0
    end_s: float | None = None
    error: str | None = None
    shed: bool = False
    sla_s: float = 0.0
    committed: bool = False
    """A call of it was sent to a replica: admission sheds none of its later calls."""
    deps_left: dict[str, int] = field(default_factory=dict)
    stages_left: int = 0
    rounds: dict[str, int] = field(default_factory=dict)
    round_deps_left: dict[str, dict[str, int]] = field(default_factory=dict)
    round_nodes_left: dict[str, int] = field(default_factory=dict)
    round_index: dict[str, int] = field(default_factory=dict)
    active: set[_Node] = field(default_factory=set)
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    tpots: list[float] = field(default_factory=list)


@dataclass(eq=False)
class _Node:
    """One execution of one node (an LLM call's state included)."""

    request: _Request
    node_id: str
    stage: Stage
    round: int
    start_s: float
    shape: CallShape | None = None
    done: bool = False
    demand: CallDemand | None = None
    endpoint: _Endpoint | None = None
    engine_request: SimRequest | None = None
    sent_s: float | None = None
    first_token_s: float | None = None
    prefilled: bool = False
    queued: bool = False
    released: bool = False
    predicted_s: float | None = None
    predicted_first_token_s: float = 0.0
    correction: float = 1.0
    judged_deadline_s: float | None = None
    """The deadline it was judged by when sent (Assessment.deadline_s; its request's
    deadline less the rest of the request): the one admission protects for it."""

    def in_flight(self) -> InFlightCall:
        """What the router's predictions read of this call while it is on a replica."""
        demand = self.demand
        assert demand is not None and self.sent_s is not None
        return InFlightCall(
            prompt_tokens=demand.prompt_tokens,
            expected_tokens=demand.output_tokens,
            sent_s=self.sent_s,
            first_token_s=self.first_token_s,
            deadline_s=_deadline(self),
        )


class _Simulation:
    """The state of one simulated run (used once)."""

    def __init__(self, spec: SimSpec) -> None:
        self.spec = spec
        self.app = spec.app
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = itertools.count()
        self.events = 0
        self.shares = spec.app.deadline_shares()
        self.rest = spec.app.rest_of_path()
        self.stage_of = {stage.id: stage for stage in spec.app.stages}
        self.dependents: dict[str, list[str]] = {stage.id: [] for stage in spec.app.stages}
        for stage in spec.app.stages:
            for dep in stage.deps:
                self.dependents[dep].append(stage.id)
        self.inner_dependents: dict[str, dict[str, list[str]]] = {}
        for stage in spec.app.stages:
            if stage.loop is not None:
                inner: dict[str, list[str]] = {node_id: [] for node_id in stage.loop.body}
                for node_id, deps in stage.inner_deps.items():
                    for dep in deps:
                        inner[dep].append(node_id)
                self.inner_dependents[stage.id] = inner
        self.roots = [stage for stage in spec.app.stages if not stage.deps]

        config = spec.router
        self.policy = get_policy(config.policy)
        self.sla_aware = config.policy == "sla_aware" and not spec.oracle
        self.predictions = PredictionTracker(config.admission_quantile, config.prediction_window)
        self.lengths = OutputLengths()
        for node in spec.app.nodes:
            if isinstance(node, LlmNode) and node.id in spec.output_lengths:
                lengths = spec.output_lengths[node.id]
                self.lengths.seed(node.model, node.sampling.max_tokens, lengths, node.id)
        self.traffic = Traffic()
        self.counter = 0
        self.router_stats = RouterCounters()
        self.endpoints: dict[str, list[_Endpoint]] = {}
        self.queues: dict[str, SlackQueue[_Node]] = {}
        seeds = itertools.count(spec.seed * 1_000_003)
        for key in sorted(spec.models):
            model = spec.models[key]
            self.endpoints[key] = [
                _Endpoint(
                    endpoint_id=f"{key}/{index}",
                    model_key=key,
                    scheduler=ReplicaScheduler(
                        SchedulerConfig.for_engine(engine, model.profile),
                        model.profile.coefficients,
                        seed=next(seeds),
                    ),
                    profile=model.profile,
                    max_num_seqs=engine.max_num_seqs or ROUTER_DEFAULT_MAX_NUM_SEQS,
                    model=StepModel(
                        coefficients=model.profile.coefficients,
                        overhead_s=model.profile.request_overhead_s
                        + model.profile.response_overhead_s,
                    ),
                )
                for index, engine in enumerate(model.engines())
            ]
            self.queues[key] = SlackQueue(config.queue_capacity)
        self.all_endpoints = [e for key in sorted(self.endpoints) for e in self.endpoints[key]]
        if spec.workload.warmup_requests:
            self._warm_prefix_caches(spec.workload.warmup_requests)

        self.requests = [_Request(index, shape) for index, shape in enumerate(spec.shapes)]
        self.unfinished = len(self.requests)
        self.calls: list[SimCall] = []
        self._next_request = 0
        self.closed = False
        self.think_s = 0.0

    def _warm_prefix_caches(self, warmups: int) -> None:
        """The engine state a real run measures from: runtime.run empties the replicas'
        prefix caches, then sends ``warmups`` warm-up requests at once, with dataset items
        the measured requests do not carry. What they leave cached that a measured call can
        hit is the content every request shares (its leading global segments); the router
        spreads the warm-ups, so the first ``warmups`` replicas of each model key hold it."""
        spec = self.spec
        model_of = {node.id: node.model for node in spec.app.nodes if isinstance(node, LlmNode)}
        for key, endpoints in self.endpoints.items():
            prefixes: set[tuple[tuple[Hashable, int], ...]] = set()
            for shape in spec.shapes:
                for node_id, calls in shape.calls.items():
                    if model_of.get(node_id) != key:
                        continue
                    for call in calls:
                        head: list[tuple[Hashable, int]] = []
                        for segment in call.shared:
                            if segment.scope != "global":
                                break
                            head.append((("g", segment.key), segment.tokens))
                        if head:
                            prefixes.add(tuple(head))
            for endpoint in endpoints[:warmups]:
                for prefix in sorted(prefixes, key=lambda runs: sum(t for _, t in runs)):
                    endpoint.scheduler.warm(prefix)

    # --- the clock ----------------------------------------------------------------------

    def at(self, when: float, action: Callable[[Any], None], argument: Any) -> None:
        """Run ``action(argument)`` at simulated time ``when``."""
        heapq.heappush(self._heap, (when, next(self._seq), action, argument))

    def run(self) -> SimResult:
        spec = self.spec
        offsets = arrival_offsets(spec.workload)
        if offsets is None:
            arrivals = spec.workload.arrivals
            users = int(getattr(arrivals, "users", 1))
            self.think_s = float(getattr(arrivals, "think_time_s", 0.0))
            self._next_request = min(users, len(self.requests))
            for index in range(self._next_request):
                self.at(0.0, self._arrive, self.requests[index])
            self.closed = True
        else:
            for request, offset in zip(self.requests, offsets, strict=True):
                self.at(offset, self._arrive, request)
        self.at(spec.router.metrics_refresh_s, self._refresh, None)
        heap = self._heap
        pop = heapq.heappop
        while heap:
            when, _, action, argument = pop(heap)
            self.now = when
            self.events += 1
            action(argument)
        return self._result()

    # --- requests and the DAG ------------------------------------------------------------

    def _arrive(self, request: _Request) -> None:
        request.start_s = self.now
        request.sla_s = request.shape.sla_e2e_s or self.spec.sla_e2e_s
        request.stages_left = len(self.app.stages)
        request.deps_left = {stage.id: len(stage.deps) for stage in self.app.stages}
        for stage in self.roots:
            if request.end_s is None:
                self._start_stage(request, stage)

    def _start_stage(self, request: _Request, stage: Stage) -> None:
        if stage.loop is None:
            self._start_node(request, stage.id, stage, 0)
            return
        calls = request.shape.calls
        request.rounds[stage.id] = max(
            [len(calls.get(node_id, ())) for node_id in stage.loop.body] + [1]
        )
        self._start_round(request, stage, 0)

    def _start_round(self, request: _Request, stage: Stage, round_index: int) -> None:
        assert stage.loop is not None
        request.round_index[stage.id] = round_index
        request.round_nodes_left[stage.id] = len(stage.loop.body)
        request.round_deps_left[stage.id] = {
            node_id: len(stage.inner_deps[node_id]) for node_id in stage.loop.body
        }
        for node_id in stage.loop.body:
            if request.end_s is None and not stage.inner_deps[node_id]:
                self._start_node(request, node_id, stage, round_index)

    def _start_node(self, request: _Request, node_id: str, stage: Stage, round_index: int) -> None:
        node = self.app.node_map[node_id]
        run = _Node(request, node_id, stage, round_index, self.now)
        if isinstance(node, LlmNode):
            calls = request.shape.calls.get(node_id, ())
            if round_index >= len(calls):  # skipped by its condition (or the loop's end)
                self._node_done(run)
                return
            run.shape = calls[round_index]
            request.active.add(run)
            self.at(self.now + self.spec.node_timeout_s, self._timeout, run)
            self._route(run, node)
            return
        latency = self.spec.node_latency_s.get(node_id, 0.0)
        if latency <= 0:
            self._node_done(run)
        elif latency > self.spec.node_timeout_s:
            request.active.add(run)
            self.at(self.now + self.spec.node_timeout_s, self._timeout, run)
        else:
            request.active.add(run)
            self.at(self.now + latency, self._node_done, run)

    def _node_done(self, run: _Node) -> None:
        request = run.request
        if run.done or request.end_s is not None:
            return
        run.done = True
        request.active.discard(run)
        stage = run.stage
        if stage.loop is None:
            self._stage_done(request, stage)
            return
        inner = request.round_deps_left[stage.id]
        for follower in self.inner_dependents[stage.id][run.node_id]:
            inner[follower] -= 1
            if inner[follower] == 0 and request.end_s is None:
                self._start_node(request, follower, stage, run.round)
        request.round_nodes_left[stage.id] -= 1
        if request.round_nodes_left[stage.id] == 0 and request.end_s is None:
            following = request.round_index[stage.id] + 1
            if following < request.rounds[stage.id]:
                self._start_round(request, stage, following)
            else:
                self._stage_done(request, stage)

    def _stage_done(self, request: _Request, stage: Stage) -> None:
        request.stages_left -= 1
        for follower in self.dependents[stage.id]:
            request.deps_left[follower] -= 1
            if request.deps_left[follower] == 0 and request.end_s is None:
                self._start_stage(request, self.stage_of[follower])
        if request.stages_left == 0 and request.end_s is None:
            self._end_request(request, None)

    def _fail(self, run: _Node, error: str, shed: bool = False) -> None:
        """A node failed: its call is abandoned, its request ends now and the request's
        other calls are cancelled."""
        request = run.request
        if request.end_s is not None:
            return
        request.active.discard(run)
        request.shed = shed
        self._abandon(run, error)
        self._end_request(request, f"node '{run.node_id}': {error}")

    def _end_request(self, request: _Request, error: str | None) -> None:
        request.end_s = self.now
        request.error = error
        for run in list(request.active):
            self._abandon(run, "cancelled")
        request.active.clear()
        self.unfinished -= 1
        if self.closed and self._next_request < len(self.requests):
            following = self.requests[self._next_request]
            self._next_request += 1
            self.at(self.now + self.think_s, self._arrive, following)

    def _timeout(self, run: _Node) -> None:
        if run.done or run.request.end_s is not None:
            return
        self._fail(run, f"timed out after {self.spec.node_timeout_s:g}s")

    # --- the router ------------------------------------------------------------------------

    def _route(self, run: _Node, node: LlmNode) -> None:
        """Router.chat up to the dispatch: admission, the queue, the policy's pick."""
        assert run.shape is not None
        request = run.request
        key = node.model
        now = self.now
        max_tokens = node.sampling.max_tokens
        run.demand = CallDemand(
            model=key,
            prompt_tokens=run.shape.prompt_tokens,
            max_tokens=max_tokens,
            deadline_s=request.start_s + request.sla_s * self.shares.get(run.node_id, 1.0),
            now_s=now,
            expected_tokens=self.lengths.expected(key, max_tokens, run.node_id),
            kind=run.node_id,
            request_deadline_s=request.start_s + request.sla_s,
            rest_calls=self.rest.get(run.node_id, 0.0),
            committed=request.committed,
        )
        if self.spec.oracle:
            self._oracle_route(run)
            return
        assessed = self._admission(run)
        if assessed is False:
            return
        endpoints = self.endpoints[key]
        if any(e.outstanding < e.max_num_seqs for e in endpoints):
            self._pick(run)
            return
        deadline, predicted = run.demand.deadline_s, 0.0
        if isinstance(assessed, Assessment):  # judged by its request's deadline less the rest
            deadline, predicted = assessed.deadline_s, assessed.predicted_s
        try:
            self.queues[key].push(run, deadline, predicted)
        except QueueFull as full:
            self.router_stats.queue_rejected += 1
            self._fail(run, f"queue full: {full}")
            return
        run.queued = True

    def _admission(self, run: _Node, arriving: bool = True) -> Assessment | bool | None:
        """Router._admission: with sla_aware, shed the call (False) unless it keeps its
        promises on the replica the policy picks (its assessment there); on arrival, a call
        of a request not yet committed counts towards the strain."""
        if not self.sla_aware:
            return None
        assert run.demand is not None
        demand = replace(run.demand, now_s=self.now)
        endpoints = self.endpoints[demand.model]
        decision = self.policy(
            [e.snapshot() for e in endpoints], demand, self._context(demand.model)
        )
        if decision.assessment is None:
            return None
        best = decision.assessment
        if arriving and not demand.committed:  # Router._admission: the strain
            self.predictions.arrived(not any(e.outstanding < e.max_num_seqs for e in endpoints))
        verdict = admit(demand, best, self.spec.router.shed_tolerance_s)
        if not verdict.admit:
            self.router_stats.shed += 1
            self._fail(run, verdict.reason, shed=True)
            return False
        return best

    def _context(self, key: str) -> RouteContext:
        endpoints = self.endpoints[key]
        tracker = self.predictions
        confidence, protect = tracker.confidences(self.now, None, 0.5)
        return RouteContext(
            counter=self.counter,
            models={
                e.endpoint_id: replace(
                    e.model, correction=tracker.correction(e.endpoint_id, self.now)
                )
                for e in endpoints
            },
            confidence=confidence,
            protect_confidence=protect,
            queued_ahead=math.ceil(len(self.queues[key]) / max(len(endpoints), 1)),
            arrivals=self.traffic.expected(key, self.now, len(endpoints)),
        )

    def _pick(self, run: _Node) -> None:
        """Router.pick: the policy chooses, then the call goes there."""
        demand = run.demand
        assert demand is not None
        run.queued = False
        endpoints = self.endpoints[demand.model]
        decision = self.policy(
            [e.snapshot() for e in endpoints],
            replace(demand, now_s=self.now),
            self._context(demand.model),
        )
        self.counter += 1
        endpoint = next(e for e in endpoints if e.endpoint_id == decision.replica_id)
        assessment = decision.assessment
        first = assessment.first_token_s if assessment else 0.0
        run.judged_deadline_s = assessment.deadline_s if assessment else None
        self._send(run, endpoint, decision.predicted_s, first)

    def _send(
        self,
        run: _Node,
        endpoint: _Endpoint,
        predicted_s: float | None,
        predicted_first_token_s: float,
    ) -> None:
        """The router's counters count the call, and it leaves for its replica."""
        demand = run.demand
        assert demand is not None and run.shape is not None
        self.router_stats.routed += 1
        self.traffic.sent(demand.model, self.now, demand.prompt_tokens, demand.output_tokens)
        endpoint.outstanding += 1
        endpoint.outstanding_prefill_tokens += demand.prompt_tokens
        endpoint.outstanding_decode_tokens += demand.max_tokens
        run.endpoint = endpoint
        run.sent_s = self.now
        run.request.committed = True
        run.predicted_s = predicted_s
        run.predicted_first_token_s = predicted_first_token_s
        run.correction = self.predictions.correction(endpoint.endpoint_id, self.now)
        endpoint.calls[run] = None
        run.engine_request = self._engine_request(run)
        overhead = endpoint.profile.request_overhead_s
        if overhead > 0:
            self.at(self.now + overhead, self._reach_engine, run)
        else:
            self._reach_engine(run)

    def _engine_request(self, run: _Node) -> SimRequest:
        """The call as its replica's scheduler sees it (true sizes, shared prefix)."""
        assert run.shape is not None
        request = run.request
        prefix = tuple(
            (("g", s.key) if s.scope == "global" else ("r", request.index, s.key), s.tokens)
            for s in run.shape.shared
        )
        return SimRequest(run, run.shape.prompt_tokens, run.shape.completion_tokens, prefix)

    def _release(self, run: _Node) -> None:
        """Router.release: the call ended (or was cancelled); a waiting call may go."""
        endpoint, demand = run.endpoint, run.demand
        assert endpoint is not None and demand is not None
        if run.released:
            return
        run.released = True
        endpoint.outstanding -= 1
        if not run.prefilled:
            endpoint.outstanding_prefill_tokens -= demand.prompt_tokens
        endpoint.outstanding_decode_tokens -= demand.max_tokens
        endpoint.calls.pop(run, None)
        self._wake(endpoint.model_key)

    def _wake(self, key: str) -> None:
        """Router._wake: shed expired waiters (sla_aware), release waiters while there is room.

        As in the live router, a released waiter holds its slot until it is picked (here at
        once), so each freed slot lets one waiter go, least slack first; with sla_aware it is
        checked again first (Router.admit after the wait) and shed if it can no longer make it.
        """
        queue = self.queues[key]
        if not len(queue):
            return
        if self.sla_aware:
            for run in queue.drop_expired(self.now, keep=lambda r: r.demand.committed):
                if not run.done and run.request.end_s is None:
                    self.router_stats.shed += 1
                    self._fail(run, "shed: deadline passed while queued", shed=True)
        endpoints = self.endpoints[key]
        while len(queue) and any(e.outstanding < e.max_num_seqs for e in endpoints):
            run = queue.pop(self.now).item
            if run.done or run.request.end_s is not None:
                continue
            run.queued = False
            if self._admission(run, arriving=False) is not False:
                self._pick(run)

    def _refresh(self, _: None) -> None:
        """The router's /metrics scrape of every replica, then a wake of every queue."""
        for endpoint in self.all_endpoints:
            scheduler = endpoint.scheduler
            endpoint.num_running = scheduler.num_running
            endpoint.num_waiting = scheduler.num_waiting
            endpoint.kv_cache_usage = scheduler.kv_usage()
        for key in self.queues:
            self._wake(key)
        if self.unfinished:
            self.at(self.now + self.spec.router.metrics_refresh_s, self._refresh, None)

    # --- the oracle --------------------------------------------------------------------------

    def _oracle_route(self, run: _Node) -> None:
        """Send the call at once where a what-if run of the true replica finishes it soonest
        while it and every call already there meet their deadlines; shed it otherwise."""
        demand = run.demand
        assert demand is not None
        best: tuple[tuple[bool, int, float, float, str], _Endpoint, float] | None = None
        for endpoint in self.endpoints[demand.model]:
            finishes = self._what_if(endpoint, run)
            finish = finishes.pop(run)
            missing = [other for other, end in finishes.items() if end > _deadline(other)]
            endangered = 0
            if missing:
                without = self._what_if(endpoint, None)
                endangered = sum(1 for other in missing if without[other] <= _deadline(other))
            late = finish - demand.judged_deadline(demand.rest_calls * (finish - self.now))
            key = (
                late > 0 or endangered > 0,
                endangered,
                max(late, 0.0),
                finish,
                endpoint.endpoint_id,
            )
            if best is None or key < best[0]:
                best = (key, endpoint, finish)
        assert best is not None
        (refused, endangered, late, _, _), endpoint, finish = best
        if refused and not demand.committed:
            self.router_stats.shed += 1
            reason = (
                f"shed by the oracle: it would push {endangered} admitted call(s) past their "
                "deadlines"
                if endangered
                else f"shed by the oracle: it would miss its deadline by {late:.3f}s"
            )
            self._fail(run, reason, shed=True)
            return
        self.counter += 1
        run.judged_deadline_s = demand.judged_deadline(demand.rest_calls * (finish - self.now))
        # it predicted with the true output length: nothing to redo for the real one
        self._send(run, endpoint, finish - self.now, finish - self.now)

    def _what_if(self, endpoint: _Endpoint, run: _Node | None) -> dict[_Node, float]:
        """When each call on the replica would reach the client if ``run`` (None: nothing)
        were sent there now and nothing else arrived: a copy of the replica played forward."""
        scheduler = endpoint.scheduler.clone()
        profile = endpoint.profile
        arrivals: list[tuple[float, SimRequest]] = []
        for other in endpoint.calls:
            engine_request = other.engine_request
            if engine_request is not None and engine_request.state is RequestState.NEW:
                assert other.sent_s is not None  # in transit: it reaches the engine later
                copy = self._engine_request(other)
                arrivals.append((other.sent_s + profile.request_overhead_s, copy))
        if run is not None:
            arrivals.append((self.now + profile.request_overhead_s, self._engine_request(run)))
        arrivals.sort(key=lambda item: item[0])
        finishes: dict[_Node, float] = {}
        now = self.now
        end = endpoint.step_end_s if scheduler.busy else None
        while True:
            if end is not None:
                while arrivals and arrivals[0][0] <= end:
                    at, engine_request = arrivals.pop(0)
                    scheduler.add(engine_request, max(at, now))
                    cut = scheduler.interrupt(max(at, now))
                    if cut is not None:
                        end = cut
                now = end
                _, done = scheduler.finish_step(now)
                for finished in done:
                    finishes[finished.key] = now + profile.response_overhead_s
                end = None
            elif arrivals and (not scheduler.has_work or arrivals[0][0] <= now):
                at, engine_request = arrivals.pop(0)
                now = max(now, at)
                scheduler.add(engine_request, now)
                continue
            if not scheduler.has_work:
                if not arrivals:
                    break
                continue
            end = scheduler.start_step(now)
            if end is None:
                break
        for refused in scheduler.rejected:
            finishes[refused.key] = math.inf
        for other in endpoint.calls:
            engine_request = other.engine_request
            if engine_request is not None and engine_request.finished_s is not None:
                # done in the engine, its last tokens still on their way to the client
                finishes[other] = engine_request.finished_s + profile.response_overhead_s
            finishes.setdefault(other, math.inf)
        if run is not None:
            finishes.setdefault(run, math.inf)
        return finishes

    # --- the replicas ---------------------------------------------------------------------

    def _reach_engine(self, run: _Node) -> None:
        """The call reaches its replica's scheduler."""
        if run.done or run.request.end_s is not None:
            return
        endpoint, engine_request = run.endpoint, run.engine_request
        assert endpoint is not None and engine_request is not None
        scheduler = endpoint.scheduler
        scheduler.add(engine_request, self.now)
        if engine_request.state is RequestState.REJECTED:
            self._fail(run, f"the engine refused the call: {engine_request.error}")
            return
        self._poke(endpoint)

    def _poke(self, endpoint: _Endpoint) -> None:
        """Something changed in the replica: start a step if it is idle, or cut a macro step."""
        scheduler = endpoint.scheduler
        if scheduler.busy:
            end = scheduler.interrupt(self.now)
            if end is not None:
                endpoint.version += 1
                endpoint.step_end_s = end
                self.at(end, self._step_end, (endpoint, endpoint.version))
        elif scheduler.has_work:
            end = scheduler.start_step(self.now)
            if end is not None:
                endpoint.version += 1
                endpoint.step_end_s = end
                self.at(end, self._step_end, (endpoint, endpoint.version))

    def _step_end(self, item: tuple[_Endpoint, int]) -> None:
        endpoint, version = item
        if version != endpoint.version:
            return  # a macro step cut short: a newer end is scheduled
        scheduler = endpoint.scheduler
        first_tokens, done = scheduler.finish_step(self.now)
        delay = endpoint.profile.response_overhead_s
        for engine_request in first_tokens:
            run = engine_request.key
            if delay > 0:
                self.at(self.now + delay, self._first_token, run)
            else:
                self._first_token(run)
        for engine_request in done:
            run = engine_request.key
            if delay > 0:
                self.at(self.now + delay, self._call_done, run)
            else:
                self._call_done(run)
        if scheduler.has_work and not scheduler.busy:
            end = scheduler.start_step(self.now)
            if end is not None:
                endpoint.version += 1
                endpoint.step_end_s = end
                self.at(end, self._step_end, (endpoint, endpoint.version))

    def _first_token(self, run: _Node) -> None:
        """The first token reached the client: its prompt no longer waits for prefill."""
        if run.done or run.request.end_s is not None or run.prefilled:
            return
        run.first_token_s = self.now
        run.prefilled = True
        assert run.endpoint is not None and run.demand is not None
        run.endpoint.outstanding_prefill_tokens -= run.demand.prompt_tokens

    def _call_done(self, run: _Node) -> None:
        """The call's last token reached the client: release, observe, record, go on."""
        if run.done or run.request.end_s is not None:
            return
        engine_request, endpoint = run.engine_request, run.endpoint
        assert engine_request is not None and endpoint is not None and run.sent_s is not None
        if not run.prefilled:
            self._first_token(run)
        demand = run.demand
        assert demand is not None
        self.lengths.observe(
            demand.model, demand.max_tokens, engine_request.num_output, demand.kind
        )
        if run.predicted_s is not None:  # Router.observe: the prediction against the measure
            error = PredictionError(
                endpoint.endpoint_id,
                run.predicted_s,
                self.now - run.sent_s,
                given_length(
                    run.predicted_s,
                    run.predicted_first_token_s,
                    demand.output_tokens,
                    engine_request.num_output,
                ),
            )
            self.predictions.record(error, run.correction, self.now)
        self._release(run)
        ttft = (run.first_token_s or self.now) - run.sent_s
        request = run.request
        request.llm_calls += 1
        request.prompt_tokens += engine_request.prompt_tokens
        request.completion_tokens += engine_request.num_output
        request.ttfts.append(ttft)
        e2e = self.now - run.sent_s
        if engine_request.num_output > 1:
            request.tpots.append((e2e - ttft) / (engine_request.num_output - 1))
        self._record_call(run, None)
        self._node_done(run)

    def _abandon(self, run: _Node, error: str) -> None:
        """The node failed, or its request ended while it ran: its call is abandoned as the
        executor abandons it (the router releases it, the client's disconnect makes the
        engine abort it; a call still in the router's queue is skipped when released)."""
        if run.done:
            return
        run.done = True
        if run.shape is not None:
            self._record_call(run, error)
        if run.queued or run.endpoint is None:
            return
        self._release(run)
        engine_request = run.engine_request
        if engine_request is not None and engine_request.state in (
            RequestState.WAITING,
            RequestState.RUNNING,
        ):
            run.endpoint.scheduler.abort(engine_request, self.now)
            self._poke(run.endpoint)

    def _record_call(self, run: _Node, error: str | None) -> None:
        engine_request = run.engine_request
        ttft = tpot = None
        if error is None and run.sent_s is not None:
            ttft = (run.first_token_s or self.now) - run.sent_s
            if engine_request is not None and engine_request.num_output > 1:
                tpot = (self.now - run.sent_s - ttft) / (engine_request.num_output - 1)
        self.calls.append(
            SimCall(
                request_id=run.request.index,
                node_id=run.node_id,
                round=run.round,
                endpoint=run.endpoint.endpoint_id if run.endpoint else "",
                start_s=run.start_s,
                end_s=self.now,
                ttft_s=ttft,
                tpot_s=tpot,
                prompt_tokens=run.shape.prompt_tokens if run.shape else 0,
                completion_tokens=engine_request.num_output if engine_request else 0,
                cached_tokens=(engine_request.cached_tokens or 0) if engine_request else 0,
                preemptions=engine_request.preemptions if engine_request else 0,
                error=error,
                sent_s=run.sent_s,
                predicted_s=run.predicted_s,
                deadline_s=run.demand.deadline_s if run.demand else None,
            )
        )

    # --- the result ------------------------------------------------------------------------

    def _result(self) -> SimResult:
        spec = self.spec
        outcomes = [
            RequestOutcome(
                request_id=request.index,
                start_s=request.start_s,
                end_s=request.end_s if request.end_s is not None else request.start_s,
                ok=request.error is None,
                error=request.error,
                llm_calls=request.llm_calls,
                prompt_tokens=request.prompt_tokens,
                completion_tokens=request.completion_tokens,
                ttfts_s=request.ttfts,
                tpots_s=request.tpots,
                shed=request.shed,
            )
            for request in self.requests
        ]
        wall = max((o.end_s for o in outcomes), default=0.0)
        replica_seconds = {key: wall * _count(spec.models[key]) for key in spec.models}
        metrics = summarize(
            outcomes,
            wall_s=wall,
            sla_e2e_s=spec.sla_e2e_s,
            replica_seconds=replica_seconds,
            prices=spec.prices,
            peak_memory_gib=_peak_memory_gib(spec),
        )
        stats = self.router_stats
        stats.predictions = self.predictions.measured
        stats.prediction_error_p50, stats.prediction_error_p90 = self.predictions.error_quantiles()
        stats.model_error_p50, stats.model_error_p90 = self.predictions.model_error_quantiles()
        return SimResult(
            metrics=metrics,
            outcomes=outcomes,
            calls=sorted(self.calls, key=lambda c: (c.request_id, c.start_s, c.node_id)),
            replicas={e.endpoint_id: e.scheduler.counters for e in self.all_endpoints},
            router_stats=self.router_stats,
            replica_start_s={e.endpoint_id: e.profile.startup_s for e in self.all_endpoints},
            events=self.events,
        )


def _deadline(run: _Node) -> float:
    """A routed call's deadline: the one it was judged by when sent, else its own."""
    assert run.demand is not None
    if run.judged_deadline_s is not None:
        return run.judged_deadline_s
    return run.demand.deadline_s


def _peak_memory_gib(spec: SimSpec) -> float | None:
    """Replicas' resident memory: each idle replica's memory plus its KV cache (allocated in
    full at start on CPU); None when a profile lacks it or a replica is on CUDA."""
    total = 0.0
    for model in spec.models.values():
        profile = model.profile
        for engine in model.engines():
            if profile.memory_gib_without_kv is None or engine.device != "cpu":
                return None
            total += profile.memory_gib_without_kv + (engine.kv_cache_space_gib or 1)
    return total


def _count(model: SimModel) -> int:
    """A sized model's replica count ('auto' is sized before a simulation starts)."""
    if model.replicas == "auto":
        raise ValueError("replicas 'auto' must be sized before simulating (size_auto_replicas)")
    return int(model.replicas)
