"""The provisioner's live side: sizing 'auto' models up front and scaling them while serving.

Two pieces turn the pure rules of runtime.scaling.provisioner into replica changes:

- :func:`initial_size` starts one replica of a model key, calibrates it with a few real chat
  calls (recording each call's end-to-end time), feeds those service times to
  :func:`~runtime.scaling.provisioner.size_replicas` and acquires the count it chooses.
  :func:`size_deployment` does that for every 'auto' model of a deployment and returns the
  deployment with concrete counts, which `cluster.start_endpoints` then serves (reusing the
  replicas the sizing left hot).
- :class:`Autoscaler` is an asyncio task per model key. Every ``policy.window_s`` it builds
  :class:`~runtime.scaling.provisioner.WindowStats` from the router, asks
  :func:`~runtime.scaling.provisioner.decide`, and applies a change through the pool in a worker
  thread (a cold start blocks about two minutes): up = ``pool.acquire`` then
  ``router.add_endpoint``; down = ``router.remove_endpoint`` with draining, then
  ``pool.release``.

Model and assumptions (stated once here, repeated where they matter):

- Calibration calls run one at a time on one replica, so a replica is modelled as one FCFS
  server of the M/G/c queue; vLLM batches calls, so this overestimates queueing and the
  replica count (the safe side). The first calibration call is a warm-up and is dropped.
- calls_per_request counts the app's LLM nodes on the model key, loop bodies times their
  ``max_rounds`` (an upper bound); plain serving without apps is one call per request.
- SLA attainment in a window is deployment-wide: the share of requests finished in the last
  ``window_s`` (recorded with `Router.record_outcome` by whoever sees a request end: the
  front door) that succeeded within the SLA. Every model key's autoscaler reads the same
  attainment but its own queue depth and KV usage.
- Queue depth per replica = the router's queued calls of the key / its healthy endpoints +
  the mean engine ``num_waiting``; KV usage = the mean engine ``kv_cache_usage`` (both from
  the router's /metrics refresh).
- The predicted pressure is the share of the window's calls that arrived out of reach: the
  router's step-time prediction of each call on its best replica (the one admission uses)
  already missed the call's deadline (`RouterStats.out_of_reach`, kept whatever the
  policy). It rises as soon as demand outgrows the replicas, before attainment falls.
- Counts stay within ``[min_replicas, min(policy.max_replicas, pool.limits.max_replicas)]``;
  a change the pool refuses (memory cap) is recorded as a held decision with the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from runtime.app.dag import App, LlmNode
from runtime.app.executor import run_request
from runtime.deployment import Deployment, ModelDeployment
from runtime.engine.client import EngineClient
from runtime.engine.config import EngineConfig
from runtime.engine.pool import ReplicaPool
from runtime.engine.probe import run_probe
from runtime.engine.replica import Replica
from runtime.errors import FmtuneError
from runtime.routing.router import Router, endpoints_for_replicas
from runtime.scaling.provisioner import (
    ScalingDecision,
    ScalingPolicy,
    SizingResult,
    WindowStats,
    decide,
    size_replicas,
)

logger = logging.getLogger(__name__)

#: Calibration calls whose service times feed the sizing (after the warm-up calls).
CALIBRATION_CALLS = 6
#: Calibration calls run first and discarded (a fresh replica's first call is slower).
WARMUP_CALLS = 1
#: Output tokens of a calibration call when there is no app to take the size from.
PROBE_MAX_TOKENS = 128
#: Longest a scaled-down replica may finish its open calls before it is stopped anyway.
DRAIN_TIMEOUT_S = 120.0
#: Most decisions an Autoscaler keeps in `decisions` (the oldest are dropped).
DECISION_HISTORY = 1000

#: Measures service times (seconds per call) on one running replica.
ServiceSampler = Callable[[Replica], Sequence[float]]


class SizingError(FmtuneError):
    """Initial sizing could not measure the replica."""


# --------------------------------------------------------------------------------------------
# Initial sizing
# --------------------------------------------------------------------------------------------


def llm_calls_per_request(app: App, model_key: str | None = None) -> int:
    """LLM calls one request of the app makes (on `model_key`, the app's own key, if given).

    Nodes in a loop body count ``max_rounds`` times: an upper bound, as the loop may stop
    earlier.
    """
    rounds = {node_id: loop.max_rounds for loop in app.loops for node_id in loop.body}
    return sum(
        rounds.get(node.id, 1)
        for node in app.nodes
        if isinstance(node, LlmNode) and (model_key is None or node.model == model_key)
    )


def probe_sampler(
    max_tokens: int = PROBE_MAX_TOKENS,
    calls: int = CALIBRATION_CALLS,
    warmup: int = WARMUP_CALLS,
) -> ServiceSampler:
    """Service times of `calls` fixed-length chat calls (runtime.engine.probe), one at a time."""

    def sample(replica: Replica) -> list[float]:
        result = asyncio.run(
            run_probe(
                replica.base_url,
                replica.config.model,
                requests=calls + warmup,
                concurrency=1,
                max_tokens=max_tokens,
            )
        )
        ok = [record.e2e_s for record in result.records[warmup:] if record.ok]
        if not ok:
            errors = {record.error for record in result.records}
            raise SizingError(f"calibration of {replica.replica_id} failed: {sorted(errors)}")
        return ok

    return sample


def app_sampler(
    app: App,
    inputs: Sequence[Mapping[str, Any]],
    app_model_key: str,
    calls: int = CALIBRATION_CALLS,
    warmup: int = WARMUP_CALLS,
) -> ServiceSampler:
    """Service times of the app's own LLM calls: requests of `inputs` (cycled) run one at a
    time through the app on the replica until `calls` + `warmup` calls were made; each call's
    time is its LLM span's duration. Calls of other model keys are not sent anywhere: the app
    must use only `app_model_key`."""
    if not inputs:
        raise ValueError("inputs must hold at least one request, got []")

    def sample(replica: Replica) -> list[float]:
        async def measure() -> list[float]:
            durations: list[float] = []
            errors: list[str] = []
            async with EngineClient(replica.base_url) as client:
                index = 0
                while len(durations) + len(errors) < calls + warmup and index < 4 * (
                    calls + warmup
                ):
                    result = await run_request(
                        app,
                        inputs[index % len(inputs)],
                        client,
                        {app_model_key: replica.config.model},
                        request_id=index,
                    )
                    index += 1
                    for span in result.spans:
                        if span.kind != "llm" or span.skipped:
                            continue
                        if span.error is None:
                            durations.append(span.duration_s)
                        else:
                            errors.append(span.error)
            return durations[warmup:] if len(durations) > warmup else durations

        samples = asyncio.run(measure())
        if not samples:
            raise SizingError(f"calibration of {replica.replica_id} made no successful call")
        return samples

    return sample


def _within_pool(policy: ScalingPolicy, pool: ReplicaPool) -> ScalingPolicy:
    """The policy with its replica bounds inside what the pool may run: max_replicas at most
    the pool's cap, min_replicas at most that max."""
    cap = min(policy.max_replicas, pool.limits.max_replicas)
    return policy.model_copy(
        update={"max_replicas": cap, "min_replicas": min(policy.min_replicas, cap)}
    )


def initial_size(
    deployment: Deployment,
    key: str,
    pool: ReplicaPool,
    calls_per_request: float,
    *,
    sampler: ServiceSampler | None = None,
    seed: int = 0,
) -> SizingResult:
    """Size model key `key` (replicas 'auto') and leave that many replicas running in `pool`.

    One replica is started (or a hot one reused), `sampler` (default: `probe_sampler()`)
    measures per-call service times on it, and `size_replicas` picks the smallest count
    predicted to meet ``provisioner.sla_p99_s`` for ``provisioner.target_rps`` requests/s of
    `calls_per_request` calls each. The count is clamped to the scaling policy's
    ``min_replicas`` and to ``min(scaling.max_replicas, pool.limits.max_replicas)``; the
    returned result carries the count actually acquired.
    """
    model = deployment.models[key]
    prov = deployment.provisioner
    bounds = _within_pool(prov.scaling, pool)
    cap, floor = bounds.max_replicas, bounds.min_replicas
    hot = len(pool.replicas(model.engine))
    replicas = pool.acquire(model.engine, count=min(max(1, hot), cap))
    samples = list((sampler or probe_sampler())(replicas[0]))
    result = size_replicas(
        prov.target_rps,
        calls_per_request,
        samples,
        prov.sla_p99_s,
        prov.epsilon,
        max_replicas=cap,
        seed=seed,
    )
    count = min(max(result.replicas, floor), cap)
    if count != result.replicas:
        result = dataclasses.replace(
            result, replicas=count, reason=f"{result.reason}; clamped to {count}"
        )
    pool.acquire(model.engine, count=count)
    logger.info(
        "sized model %s: %d replicas (%s); predicted p99 %.3fs, utilization %.2f, "
        "%d calibration calls, mean service %.3fs, %g calls/request at %g rps",
        key,
        count,
        "feasible" if result.feasible else "INFEASIBLE",
        result.predicted_p99_s,
        result.utilization,
        len(samples),
        sum(samples) / len(samples),
        calls_per_request,
        prov.target_rps,
    )
    return result


def size_deployment(
    deployment: Deployment,
    pool: ReplicaPool | None,
    calls: Mapping[str, float] | None = None,
    samplers: Mapping[str, ServiceSampler] | None = None,
) -> tuple[Deployment, dict[str, SizingResult]]:
    """Size every 'auto' model key of a local deployment with `initial_size`.

    Returns the deployment with those counts filled in (for `start_endpoints`) and the
    sizing of each key. `calls` gives calls per request by key (default 1) and `samplers`
    the calibration by key (default `probe_sampler()`); with neither given, both come from
    the deployment's apps (`serving_calls_and_samplers`). Deployments without 'auto' keys, or
    of cluster 'endpoints', come back unchanged.
    """
    auto = [key for key, m in deployment.models.items() if m.replicas == "auto"]
    if not auto or deployment.cluster != "local" or pool is None:
        return deployment, {}
    if calls is None and samplers is None:
        calls, samplers = serving_calls_and_samplers(deployment)
    sizing: dict[str, SizingResult] = {}
    models: dict[str, ModelDeployment] = dict(deployment.models)
    for key in auto:
        result = initial_size(
            deployment,
            key,
            pool,
            (calls or {}).get(key, 1.0),
            sampler=(samplers or {}).get(key),
        )
        sizing[key] = result
        models[key] = models[key].model_copy(update={"replicas": result.replicas})
    return deployment.model_copy(update={"models": models}), sizing


def serving_calls_and_samplers(
    deployment: Deployment,
) -> tuple[dict[str, float], dict[str, ServiceSampler]]:
    """For `fmtune serve`: each key's calls per request (the most over the deployment's apps
    on it, else 1) and a calibration with the first such app's requests (else the probe)."""
    calls: dict[str, float] = {}
    samplers: dict[str, ServiceSampler] = {}
    for spec in deployment.apps.values():
        inputs = [dict(example.inputs) for example in spec.application().examples(8, 0)]
        app = spec.build()
        keys = sorted(spec.model_keys())
        for key in keys:
            calls[key] = max(calls.get(key, 0), llm_calls_per_request(app, key))
        if len(keys) == 1:  # app_sampler calibrates an app that calls one key only
            samplers.setdefault(keys[0], app_sampler(app, inputs, keys[0]))
    return calls, samplers


# --------------------------------------------------------------------------------------------
# Reactive scaling
# --------------------------------------------------------------------------------------------


def window_stats(router: Router, model_key: str, window_s: float, now_s: float) -> WindowStats:
    """WindowStats of one model key: attainment of requests finished in ``(now - window,
    now]`` (from `router.stats.outcomes`), queue depth and KV usage of its healthy endpoints
    now (see the module docstring)."""
    recent = [met for end, met in router.stats.outcomes if now_s - window_s < end <= now_s]
    healthy = router.healthy(model_key)
    n = max(len(healthy), 1)
    queued = router.stats.queue_depth.get(model_key, 0) / n
    waiting = sum(e.num_waiting for e in healthy) / n
    kv = sum(e.kv_cache_usage for e in healthy) / n
    arrived = [
        out
        for when, key, out in router.stats.out_of_reach
        if key == model_key and now_s - window_s < when <= now_s
    ]
    return WindowStats(
        sla_attainment=sum(recent) / len(recent) if recent else 1.0,
        queue_depth=queued + waiting,
        kv_cache_usage=kv,
        requests_in_window=len(recent),
        out_of_reach=sum(arrived) / len(arrived) if arrived else 0.0,
    )


def _action(decision: ScalingDecision) -> str:
    if decision.to_replicas > decision.from_replicas:
        return "up"
    return "down" if decision.to_replicas < decision.from_replicas else "hold"


class Autoscaler:
    """Scales the replicas of one model key from the router's window statistics.

    `step()` makes one decision and applies it; `start()` runs a step every
    ``policy.window_s`` on the event loop until `aclose()`. `decisions` keeps the last
    `DECISION_HISTORY` decisions (holds included; a change the pool refused appears as a hold
    whose reason names the error); `counts` counts them by action (up, down, hold) for
    /metrics. `clock` must be the clock the router's `record_outcome` uses; `sleep` and
    `to_thread` are there for tests.
    """

    def __init__(
        self,
        router: Router,
        pool: ReplicaPool,
        model_key: str,
        engine: EngineConfig,
        policy: ScalingPolicy,
        *,
        last_change_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        to_thread: Callable[..., Awaitable[Any]] = asyncio.to_thread,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        self.policy = _within_pool(policy, pool)
        self.router = router
        self.pool = pool
        self.model_key = model_key
        self.engine = engine
        self.clock = clock
        self.last_change_s = last_change_s
        self.drain_timeout_s = drain_timeout_s
        self.decisions: list[ScalingDecision] = []
        self.counts: Counter[str] = Counter()
        self._sleep = sleep
        self._to_thread = to_thread
        self._task: asyncio.Task[None] | None = None

    @property
    def current(self) -> int:
        """Endpoints of the model key in the router (healthy or being replaced)."""
        return sum(1 for e in self.router.endpoints if e.model_key == self.model_key)

    async def step(self) -> ScalingDecision:
        """Decide from the last window and apply the decision; returns what was done."""
        now = self.clock()
        stats = window_stats(self.router, self.model_key, self.policy.window_s, now)
        decision = decide(self.policy, stats, self.current, now, self.last_change_s)
        if decision.changed:
            try:
                if decision.to_replicas > decision.from_replicas:
                    await self._scale_up(decision.to_replicas)
                else:
                    await self._scale_down(decision.from_replicas - decision.to_replicas)
            except Exception as error:  # a refused change must not stop scaling
                logger.warning("model %s: could not apply %s: %r", self.model_key, decision, error)
                decision = ScalingDecision(
                    now,
                    decision.from_replicas,
                    self.current,
                    f"failed to apply {decision.reason!r}: {error!r}",
                )
            self.last_change_s = self.clock()
        self._record(decision, stats)
        return decision

    def _record(self, decision: ScalingDecision, stats: WindowStats) -> None:
        self.decisions.append(decision)
        del self.decisions[:-DECISION_HISTORY]
        self.counts[_action(decision)] += 1
        log = logger.info if decision.changed else logger.debug
        log(
            "autoscaler %s at %.1fs: %d -> %d (%s) [%s]",
            self.model_key,
            decision.time_s,
            decision.from_replicas,
            decision.to_replicas,
            decision.reason,
            stats,
        )

    async def _scale_up(self, count: int) -> None:
        replicas = await self._to_thread(self.pool.acquire, self.engine, count=count)
        known = {id(e.replica) for e in self.router.endpoints if e.replica is not None}
        fresh = [r for r in replicas if id(r) not in known]
        for endpoint in endpoints_for_replicas(self.model_key, fresh):
            self.router.add_endpoint(endpoint)

    async def _scale_down(self, count: int) -> None:
        mine = [e for e in self.router.endpoints if e.model_key == self.model_key]
        # Fewest open calls first, and among those the newest (the last added).
        victims = sorted(reversed(mine), key=lambda e: (e.healthy, e.outstanding))[:count]
        for endpoint in victims:
            await self.router.remove_endpoint(endpoint, drain_timeout_s=self.drain_timeout_s)
            if endpoint.replica is not None:
                await self._to_thread(self.pool.release, endpoint.replica)

    async def run(self) -> None:
        """Step every ``policy.window_s`` until cancelled."""
        while True:
            await self._sleep(self.policy.window_s)
            await self.step()

    def start(self) -> None:
        """Run `run()` as a task of the running loop."""
        self._task = asyncio.create_task(self.run(), name=f"autoscaler-{self.model_key}")

    async def aclose(self) -> None:
        """Stop the task (a change being applied in a thread finishes there on its own)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def autoscalers_for(
    deployment: Deployment, router: Router, pool: ReplicaPool | None
) -> dict[str, Autoscaler]:
    """One Autoscaler per 'auto' model key of a local deployment (its policy from
    ``provisioner.scaling``; the initial sizing counts as the last change, so the first
    change waits out ``cooldown_s``)."""
    if pool is None or deployment.cluster != "local":
        return {}
    now = router.clock()
    return {
        key: Autoscaler(
            router,
            pool,
            key,
            model.engine,
            deployment.provisioner.scaling,
            last_change_s=now,
            clock=router.clock,
        )
        for key, model in deployment.models.items()
        if model.replicas == "auto"
    }


__all__ = [
    "Autoscaler",
    "ServiceSampler",
    "SizingError",
    "app_sampler",
    "autoscalers_for",
    "initial_size",
    "llm_calls_per_request",
    "probe_sampler",
    "serving_calls_and_samplers",
    "size_deployment",
    "window_stats",
]
