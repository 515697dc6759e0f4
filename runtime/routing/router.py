"""The router's live side: endpoints, their refreshed state, and the dispatch of each call.

`Router` implements the ChatBackend protocol over the replicas of every model key. For each
call it builds snapshots of the replicas (its own outstanding counters plus the engine's
/metrics, refreshed in the background), asks the configured pure policy
(runtime.routing.policies) for a replica, and sends the call there. Around that decision:
- calls wait in a bounded least-slack-first queue while every replica of their model is full
  (outstanding calls >= max_num_seqs), so the tightest deadlines go first;
- every call's completion is predicted from the step-time model over the calls the router
  sent to each replica (runtime.routing.prediction; a stored profile's coefficients when the
  router is given one, else the speeds learned online), and logged against the measured
  completion when it ends: a correction factor per replica and the confidence quantile are
  learned from that, and the median and p90 relative error are kept in `RouterStats`;
- with the sla_aware policy, admission control sheds a call, before it takes any capacity,
  unless it meets its deadline with the configured confidence on some replica without pushing
  the calls admitted there past theirs; a call that waited in the queue is checked again when
  a slot frees (and shed if it can no longer make it); the other policies never shed: late
  calls run late;
- a replica that fails a call (or a /metrics scrape) at the connection level is taken out
  of rotation and the call is retried once on another replica; then the replica is found
  out: dead at once if its process exited, otherwise probed over fresh connections and back
  in rotation as soon as it answers (one broken connection is not a dead engine), declared
  dead (`on_unhealthy`, which replaces it when serving) after `health_probes` failures.
A call the router refuses comes back as a failed CallRecord whose `failure` says why (SHED,
QUEUE_FULL, NO_ENDPOINT), so the executor and the run read the kind, never the message.
Deadlines come from `client.call_deadline()`, which the executor sets for every call from
the request's end-to-end SLA split along the app's critical path, with the request's own
deadline and the critical path left after the call: admission judges the request (the call
must end by the request's deadline less the rest, predicted like this call), and a call of a
request that already ran a call is never shed (a request is shed at its first call or not
at all, so no engine work is thrown away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import httpx

from runtime.engine.client import (
    KEEPALIVE_EXPIRY_S,
    CallFailure,
    CallRecord,
    EngineClient,
    SamplingParams,
    current_call_budget,
)
from runtime.engine.replica import Replica, parse_metrics
from runtime.routing.policies import (
    Assessment,
    CallDemand,
    QueueFull,
    ReplicaSnapshot,
    RouteContext,
    RouterConfig,
    SlackQueue,
    SpeedEstimator,
    admit,
    get_policy,
    sla_aware,
)
from runtime.routing.prediction import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    InFlightCall,
    OutputLengths,
    PredictionError,
    PredictionTracker,
    StepModel,
    Traffic,
    given_length,
)

logger = logging.getLogger(__name__)

#: Characters per token when estimating a prompt's length before the server counts it.
CHARS_PER_TOKEN = 4.0
#: Finished-request outcomes `RouterStats.outcomes` keeps (the autoscaler's window).
OUTCOME_HISTORY = 10_000


@dataclass
class Endpoint:
    """One server of a model key, and what the router tracks about it."""

    endpoint_id: str
    model_key: str
    served_model: str
    base_url: str
    max_num_seqs: int
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    replica: Replica | None = None
    client: EngineClient | None = None
    healthy: bool = True
    """In rotation: calls may be routed here."""
    probing: bool = False
    """Out of rotation while health probes find out whether a connection failure means the
    endpoint is dead (see `Router.connection_failed`)."""
    outstanding: int = 0
    outstanding_prefill_tokens: int = 0
    outstanding_decode_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    calls: int = 0
    in_flight: dict[int, Sent] = field(default_factory=dict)
    """The calls sent here that have not ended, by `id` of their CallDemand, in send order."""

    def snapshot(self) -> ReplicaSnapshot:
        """The state a pure policy decides on."""
        return ReplicaSnapshot(
            replica_id=self.endpoint_id,
            model=self.model_key,
            healthy=self.healthy,
            outstanding_requests=self.outstanding,
            outstanding_prefill_tokens=self.outstanding_prefill_tokens,
            outstanding_decode_tokens=self.outstanding_decode_tokens,
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_cache_usage=self.kv_cache_usage,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            calls=tuple(sent.call() for sent in self.in_flight.values()),
        )


@dataclass
class Sent:
    """One call on an endpoint, from `Router.pick` to `Router.release`: what the router
    predicted for it and what it has seen of it."""

    demand: CallDemand
    sent_s: float
    predicted_s: float | None
    """Its predicted completion, seconds after sent_s (None: the policy made none)."""
    predicted_first_token_s: float
    """Its predicted first token, seconds after sent_s."""
    correction: float
    """The replica's correction factor the prediction was made with."""
    deadline_s: float
    """The deadline it was judged by when sent (`Assessment.deadline_s`): the one admission
    protects for it from later calls."""
    first_token_s: float | None = None
    """When its first token arrived (the router's clock)."""

    def call(self) -> InFlightCall:
        """What the predictions read of it."""
        return InFlightCall(
            prompt_tokens=self.demand.prompt_tokens,
            expected_tokens=self.demand.output_tokens,
            sent_s=self.sent_s,
            first_token_s=self.first_token_s,
            deadline_s=self.deadline_s,
        )


class Rejected(Exception):
    """A call the router will not run: `kind` is NO_ENDPOINT, SHED or QUEUE_FULL."""

    def __init__(self, kind: CallFailure, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Waiter:
    future: asyncio.Future[None]
    released: bool = False
    """Let go to take a free slot (counted in `Router._released` until it is picked)."""
    committed: bool = False
    """A call of a request already committed (`CallDemand.committed`): never shed."""


@dataclass
class RouterStats:
    """Counters the server's /metrics and the run report read."""

    routed: int = 0
    shed: int = 0
    queue_rejected: int = 0
    retried: int = 0
    queue_depth: dict[str, int] = field(default_factory=dict)
    predictions: int = 0
    """Calls whose predicted completion was compared with the measured one."""
    prediction_error_p50: float | None = None
    """Median of |predicted - measured| / measured over the last `prediction_window` calls."""
    prediction_error_p90: float | None = None
    """Its 90th percentile over the same calls."""
    model_error_p50: float | None = None
    """Median relative error of the same predictions redone for each call's real output
    length: the step-time model's own error (runtime.routing.prediction.PredictionError)."""
    model_error_p90: float | None = None
    """Its 90th percentile."""
    prediction_error_buckets: list[int] = field(default_factory=list)
    """Calls per bucket of that relative error (upper bounds `prediction.ERROR_BUCKETS`, then
    +Inf), over every measured call: the /metrics histogram."""
    prediction_error_sum: float = 0.0
    """Sum of the relative errors of every measured call."""
    out_of_reach: deque[tuple[float, str, bool]] = field(
        default_factory=lambda: deque(maxlen=OUTCOME_HISTORY)
    )
    """(arrival time on the router's clock, model key, out of reach) of the last calls that
    asked for admission: whether their predicted completion on the best replica, padded at the
    median, already missed their deadline. Demand the replicas cannot serve in time, seen
    before any SLA is missed: the autoscaler's predicted pressure."""
    outcomes: deque[tuple[float, bool]] = field(
        default_factory=lambda: deque(maxlen=OUTCOME_HISTORY)
    )
    """(end time on the router's clock, met its SLA) of the last finished requests, recorded
    with `Router.record_outcome` by whoever sees requests end (the front door); the
    autoscaler's SLA attainment per window."""


def estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """A quick token estimate of a chat prompt (the server's count arrives only later)."""
    return max(1, int(sum(len(m.get("content", "")) for m in messages) / CHARS_PER_TOKEN) + 8)


class Router:
    """Routes chat calls by model key over endpoints, per a RouterConfig (a ChatBackend)."""

    def __init__(
        self,
        endpoints: list[Endpoint],
        config: RouterConfig | None = None,
        *,
        default_deadline_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_unhealthy: Callable[[Endpoint], None] | None = None,
        profiles: Mapping[str, StepModel] | None = None,
    ) -> None:
        """Route over `endpoints` per `config`. `profiles` gives, by model key, the step-time
        model of its replicas from a stored profile; keys without one predict with the
        speeds learned online from their calls."""
        self.config = config or RouterConfig()
        self.policy = get_policy(self.config.policy)
        self.default_deadline_s = default_deadline_s
        self.clock = clock
        self.on_unhealthy = on_unhealthy
        self.speeds = SpeedEstimator(alpha=self.config.ewma_alpha)
        self.profiles = dict(profiles or {})
        self.predictions = PredictionTracker(
            self.config.admission_quantile, self.config.prediction_window
        )
        self.lengths = OutputLengths()
        self.traffic = Traffic()
        self.endpoints: list[Endpoint] = []
        self.stats = RouterStats()
        self._queues: dict[str, SlackQueue[_Waiter]] = {}
        self._released: dict[str, int] = {}
        """Waiters let go for a free slot that have not yet been picked onto an endpoint:
        the slots they will take are not free any more (else one freed slot lets the whole
        queue go at once)."""
        self._counter = 0
        self._refresher: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self._http = httpx.AsyncClient(
            timeout=5.0, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)
        )
        for endpoint in endpoints:
            self.add_endpoint(endpoint)

    # --- membership ----------------------------------------------------------------------

    def add_endpoint(self, endpoint: Endpoint) -> None:
        """Put an endpoint into rotation (e.g. a replica the provisioner just started)."""
        if endpoint.client is None:
            endpoint.client = EngineClient(endpoint.base_url, connect_retries=1)
        self.endpoints.append(endpoint)
        self._queues.setdefault(endpoint.model_key, SlackQueue(self.config.queue_capacity))
        self._wake(endpoint.model_key)

    async def remove_endpoint(self, endpoint: Endpoint, drain_timeout_s: float = 0.0) -> None:
        """Take an endpoint out of rotation and close its connections.

        With drain_timeout_s > 0, its open calls (outstanding) may finish first, for at most
        that many seconds, before the connections close (scaling down).
        """
        if endpoint in self.endpoints:
            self.endpoints.remove(endpoint)
        deadline = time.monotonic() + drain_timeout_s
        while endpoint.outstanding > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if endpoint.outstanding > 0 and drain_timeout_s > 0:
            logger.warning(
                "endpoint %s removed with %d calls still open after draining %gs",
                endpoint.endpoint_id, endpoint.outstanding, drain_timeout_s,
            )  # fmt: skip
        if endpoint.client is not None:
            await endpoint.client.aclose()

    def record_outcome(self, met_sla: bool, end_s: float | None = None) -> None:
        """Note that a request finished (at end_s, default now) and whether it met its SLA."""
        self.stats.outcomes.append((self.clock() if end_s is None else end_s, met_sla))

    def seed_lengths(
        self, model_key: str, max_tokens: int, lengths: list[int], node_id: str = ""
    ) -> None:
        """Start the output lengths of calls of this model key, max_tokens and app node from
        a trace's (`OutputLengths.seed`): the first calls after a start are then predicted
        at the lengths the app really produces, not at the cap."""
        self.lengths.seed(model_key, max_tokens, lengths, node_id)

    def model_keys(self) -> list[str]:
        """Model keys with at least one endpoint."""
        return sorted({endpoint.model_key for endpoint in self.endpoints})

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Router:
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_forever())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop refreshing and close every connection."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        for probe in list(self._probes):
            probe.cancel()
        await asyncio.gather(*self._probes, return_exceptions=True)
        for endpoint in self.endpoints:
            if endpoint.client is not None:
                await endpoint.client.aclose()
        await self._http.aclose()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.metrics_refresh_s)
            await self.refresh()
            for model_key in list(self._queues):
                self._wake(model_key)  # sheds waiters whose deadline passed

    async def refresh(self) -> None:
        """Scrape every endpoint's /metrics into its state; mark failures unhealthy."""
        await asyncio.gather(*(self._refresh_one(endpoint) for endpoint in self.endpoints))

    async def _refresh_one(self, endpoint: Endpoint) -> None:
        if endpoint.replica is not None and not endpoint.replica.running():
            self._mark_unhealthy(endpoint, "process exited")
            return
        if endpoint.probing:
            return
        if not endpoint.healthy:
            if endpoint.replica is None and await self._answers(endpoint):
                logger.info("endpoint %s answers again; back in rotation", endpoint.endpoint_id)
                endpoint.healthy = True
                self._wake(endpoint.model_key)
            return
        try:
            response = await self._http.get(f"{endpoint.base_url}/metrics")
            response.raise_for_status()
            metrics = parse_metrics(response.text)
        except (httpx.HTTPError, ValueError) as error:
            if endpoint.replica is not None:
                self.connection_failed(endpoint, f"metrics scrape failed: {error!r}")
            return
        endpoint.num_running = int(metrics.num_requests_running)
        endpoint.num_waiting = int(metrics.num_requests_waiting)
        endpoint.kv_cache_usage = metrics.kv_cache_usage

    async def _answers(self, endpoint: Endpoint) -> bool:
        """Whether an endpoint answers /v1/models, over a fresh connection."""
        assert endpoint.client is not None
        return await endpoint.client.answers(timeout_s=self.config.health_probe_timeout_s)

    def _mark_unhealthy(self, endpoint: Endpoint, reason: str) -> None:
        """Declare an endpoint dead: out of rotation, and `on_unhealthy` told (once)."""
        if endpoint.healthy or endpoint.probing:
            logger.warning("endpoint %s out of rotation: %s", endpoint.endpoint_id, reason)
            endpoint.healthy = False
            endpoint.probing = False
            if self.on_unhealthy is not None:
                self.on_unhealthy(endpoint)
            self._wake(endpoint.model_key)

    def connection_failed(self, endpoint: Endpoint, reason: str) -> None:
        """A call or a scrape to this endpoint failed at the connection level: take it out of
        rotation and find out why. A local replica whose process exited is dead at once;
        anything else (a keep-alive connection closed under the call, an engine too busy to
        answer a scrape in time) is probed over fresh connections in the background, back in
        rotation at the first answer, dead after `health_probes` failures."""
        if not endpoint.healthy:
            return  # already being probed, or dead
        if endpoint.replica is not None and not endpoint.replica.running():
            self._mark_unhealthy(endpoint, f"{reason}; its process exited")
            return
        logger.warning("endpoint %s out of rotation, probing it: %s", endpoint.endpoint_id, reason)
        endpoint.healthy = False
        endpoint.probing = True
        self._wake(endpoint.model_key)
        probe = asyncio.get_running_loop().create_task(self._probe(endpoint, reason))
        self._probes.add(probe)
        probe.add_done_callback(self._probes.discard)

    async def _probe(self, endpoint: Endpoint, reason: str) -> None:
        """Health-probe a suspect endpoint until it answers or has failed every probe."""
        config = self.config
        for attempt in range(config.health_probes):
            if attempt:
                await asyncio.sleep(config.health_probe_interval_s)
            if not endpoint.probing:
                return  # declared dead meanwhile (its process exited)
            if endpoint.replica is not None and not endpoint.replica.running():
                break
            if await self._answers(endpoint):
                endpoint.probing = False
                if endpoint in self.endpoints:
                    logger.info("endpoint %s answers; back in rotation", endpoint.endpoint_id)
                    endpoint.healthy = True
                    self._wake(endpoint.model_key)
                return
        self._mark_unhealthy(endpoint, f"{reason}; then {config.health_probes} probes failed")

    # --- dispatch steps (public: the server's streaming proxy uses them too) ---------------

    def healthy(self, model_key: str) -> list[Endpoint]:
        """Endpoints of a model key that are in rotation."""
        return [e for e in self.endpoints if e.model_key == model_key and e.healthy]

    def _has_room(self, model_key: str) -> bool:
        """A slot is free on some endpoint in rotation, beyond those promised to released
        waiters."""
        free = sum(max(0, e.max_num_seqs - e.outstanding) for e in self.healthy(model_key))
        return free > self._released.get(model_key, 0)

    def _unservable(self, model_key: str) -> bool:
        """No endpoint of the model is in rotation, nor being probed to come back: waiting
        calls are released to fail (NO_ENDPOINT) instead of waiting for nothing."""
        return not any(e.healthy or e.probing for e in self.endpoints if e.model_key == model_key)

    def _wake(self, model_key: str) -> None:
        """Release waiting calls, least slack first, while the model has room. With the
        sla_aware policy (admission control) calls whose deadline passed while queued are shed
        (but for calls of committed requests); the other policies let them run late (an SLA
        miss, not an error)."""
        queue = self._queues.get(model_key)
        if queue is None:
            return
        if self.config.policy == "sla_aware":
            for waiter in queue.drop_expired(self.clock(), keep=lambda w: w.committed):
                if not waiter.future.done():
                    waiter.future.set_exception(TimeoutError("deadline passed while queued"))
        while len(queue) and (self._has_room(model_key) or self._unservable(model_key)):
            waiter = queue.pop(self.clock()).item
            if not waiter.future.done():
                if not self._unservable(model_key):
                    waiter.released = True
                    self._released[model_key] = self._released.get(model_key, 0) + 1
                waiter.future.set_result(None)
        self.stats.queue_depth[model_key] = len(queue)

    def demand(self, model_key: str, messages: list[dict[str, str]], max_tokens: int) -> CallDemand:
        """What a call asks of a replica, with its deadline, its request's and the rest of
        its request (from `call_deadline`)."""
        now = self.clock()
        budget = current_call_budget()
        deadline = budget.deadline_s if budget is not None else None
        kind = budget.node_id if budget is not None else ""
        return CallDemand(
            model=model_key,
            prompt_tokens=estimate_prompt_tokens(messages),
            max_tokens=max_tokens,
            deadline_s=deadline if deadline is not None else now + self.default_deadline_s,
            now_s=now,
            expected_tokens=self.lengths.expected(model_key, max_tokens, kind),
            kind=kind,
            request_deadline_s=budget.request_deadline_s if budget is not None else None,
            rest_calls=budget.rest_calls if budget is not None else 0.0,
            committed=budget.committed if budget is not None else False,
        )

    def step_model(self, endpoint: Endpoint) -> StepModel:
        """The endpoint's step-time model: its model key's stored profile, else the speeds
        learned from its calls, with the correction learned from its predictions."""
        base = self.profiles.get(endpoint.model_key)
        if base is None:
            base = self.speeds.estimate(endpoint.endpoint_id).step_model()
        correction = self.predictions.correction(endpoint.endpoint_id, self.clock())
        return replace(base, correction=correction)

    def _context(self, model_key: str) -> RouteContext:
        healthy = self.healthy(model_key)
        queue = self._queues.get(model_key)
        waiting = len(queue) if queue is not None else 0
        now = self.clock()
        # the call's own completion at the admission level, the calls there at their median
        confidence, protect = self.predictions.confidences(now, None, 0.5)
        return RouteContext(
            counter=self._counter,
            models={e.endpoint_id: self.step_model(e) for e in healthy},
            default_speed=self.speeds.prior,
            confidence=confidence,
            protect_confidence=protect,
            queued_ahead=math.ceil(waiting / max(len(healthy), 1)),
            arrivals=self.traffic.expected(model_key, now, len(healthy)),
        )

    def _admission(self, model_key: str, demand: CallDemand, arriving: bool) -> Assessment | None:
        """Assess the call on the best replica (the sla_aware choice, whatever the policy). On
        arrival, note whether it is out of reach even at the median (the autoscaler's
        `RouterStats.out_of_reach`) and, for a new request, whether every replica was full
        (the strain, `PredictionTracker.level`). With sla_aware: shed it (Rejected, SHED)
        unless it keeps its promises there, and return its assessment there (its predicted
        completion and the deadline it was judged by); None with other policies, which never
        shed."""
        candidates = [e.snapshot() for e in self.healthy(model_key)]
        if not candidates:
            return None
        tracker = self.predictions
        fresh = replace(demand, now_s=self.clock())
        decision = sla_aware(candidates, fresh, self._context(model_key))
        best = decision.assessment
        if best is None:
            return None
        if arriving:
            median = tracker.confidence(fresh.now_s, 0.5)
            missing = fresh.now_s + best.predicted_s * median > best.deadline_s
            if not demand.committed:  # the strain counts admission decisions, one per request
                tracker.arrived(not self._has_room(model_key))
            self.stats.out_of_reach.append((fresh.now_s, model_key, missing))
        if self.config.policy != "sla_aware":
            return None
        verdict = admit(fresh, best, self.config.shed_tolerance_s)
        if not verdict.admit:
            self.stats.shed += 1
            logger.debug("call of %s %s", model_key, verdict.reason)
            raise Rejected(CallFailure.SHED, verdict.reason)
        return best

    async def admit(self, model_key: str, demand: CallDemand) -> None:
        """Shed a call that cannot make its deadline, or wait (least slack first) while every
        replica of its model is full or being probed; raises Rejected with the reason."""
        if model_key not in self._queues:
            raise Rejected(CallFailure.NO_ENDPOINT, f"no endpoint serves model key '{model_key}'")
        if self._unservable(model_key):
            raise Rejected(
                CallFailure.NO_ENDPOINT, f"no healthy endpoint serves model key '{model_key}'"
            )
        assessed = self._admission(model_key, demand, arriving=True)
        if self._has_room(model_key):
            return
        waiter = _Waiter(asyncio.get_running_loop().create_future(), committed=demand.committed)
        queue = self._queues[model_key]
        # the queue orders and expires it by the deadline it was judged by (its request's
        # deadline less the rest, for a call of a longer request)
        deadline, predicted = demand.deadline_s, 0.0
        if assessed is not None:
            deadline, predicted = assessed.deadline_s, assessed.predicted_s
        try:
            queue.push(waiter, deadline, predicted)
        except QueueFull as full:
            self.stats.queue_rejected += 1
            raise Rejected(CallFailure.QUEUE_FULL, f"queue full: {full}") from None
        self.stats.queue_depth[model_key] = len(queue)
        try:
            await waiter.future
        except TimeoutError:
            self.stats.shed += 1
            message = "shed: deadline passed while queued"
            raise Rejected(CallFailure.SHED, message) from None
        except asyncio.CancelledError:
            if waiter.released:  # its promised slot goes to the next waiter
                self._released[model_key] -= 1
                self._wake(model_key)
            raise
        if waiter.released:  # the caller picks an endpoint right after this returns
            self._released[model_key] -= 1
        try:  # it waited: check again that it can still keep its promises
            self._admission(model_key, demand, arriving=False)
        except Rejected:
            self._wake(model_key)  # the slot it would have taken goes to the next waiter
            raise

    def pick(self, model_key: str, demand: CallDemand, tried: set[str]) -> Endpoint:
        """Ask the policy for an endpoint (not one of `tried`) and count the call on it."""
        snapshots = [e.snapshot() for e in self.healthy(model_key) if e.endpoint_id not in tried]
        now = self.clock()
        decision = self.policy(snapshots, replace(demand, now_s=now), self._context(model_key))
        self._counter += 1
        endpoint = next((e for e in self.endpoints if e.endpoint_id == decision.replica_id), None)
        if endpoint is None:
            raise Rejected(CallFailure.NO_ENDPOINT, decision.reason)
        self.stats.routed += 1
        self.traffic.sent(model_key, now, demand.prompt_tokens, demand.output_tokens)
        assessment = decision.assessment
        endpoint.in_flight[id(demand)] = Sent(
            demand,
            now,
            decision.predicted_s,
            assessment.first_token_s if assessment else 0.0,
            self.predictions.correction(endpoint.endpoint_id, now),
            assessment.deadline_s if assessment else demand.deadline_s,
        )
        endpoint.calls += 1
        endpoint.outstanding += 1
        endpoint.outstanding_prefill_tokens += demand.prompt_tokens
        endpoint.outstanding_decode_tokens += demand.max_tokens
        return endpoint

    def first_token(self, endpoint: Endpoint, demand: CallDemand) -> None:
        """The call's first token arrived: its prompt no longer waits for prefill (the
        snapshot's outstanding_prefill_tokens counts only calls still before their first
        token; counting decoding calls too made sla_aware predict a busy replica several
        times too slow, and shed calls it would have served in time)."""
        endpoint.outstanding_prefill_tokens -= demand.prompt_tokens
        sent = endpoint.in_flight.get(id(demand))
        if sent is not None:
            sent.first_token_s = self.clock()

    def retry_elsewhere(
        self, model_key: str, endpoint: Endpoint, tried: set[str], error: str
    ) -> bool:
        """After `endpoint` could not be reached: take it out of rotation (`connection_failed`),
        add it to `tried`, and say whether the call goes once more to another healthy endpoint.
        A call is retried at most once, so a dying fleet costs each call one extra connect, not
        one per replica."""
        self.connection_failed(endpoint, error)
        tried.add(endpoint.endpoint_id)
        retry = len(tried) == 1 and any(
            other.endpoint_id not in tried for other in self.healthy(model_key)
        )
        if retry:
            self.stats.retried += 1
        return retry

    def release(self, endpoint: Endpoint, demand: CallDemand, *, prefilled: bool = False) -> None:
        """The call picked onto this endpoint ended: free its slot, let a waiter in.
        `prefilled`: `first_token` was already called for it."""
        endpoint.outstanding -= 1
        if not prefilled:
            endpoint.outstanding_prefill_tokens -= demand.prompt_tokens
        endpoint.outstanding_decode_tokens -= demand.max_tokens
        endpoint.in_flight.pop(id(demand), None)
        self._wake(endpoint.model_key)

    def observe(
        self,
        endpoint: Endpoint,
        demand: CallDemand,
        ttft_s: float,
        gaps_s: list[float],
        running_at_start: int,
        completion_tokens: int,
    ) -> None:
        """A call on this endpoint finished well (call it before `release`): teach the speed
        estimator and the output lengths what it measured, and compare its predicted
        completion with the measured one (logged, folded into the correction, the confidence
        and the error statistics). The speeds learn per token of the router's own prompt
        estimate (`demand.prompt_tokens`), the unit its predictions multiply them by: a
        biased estimate then costs nothing, where the server's count would carry the bias
        into every prediction."""
        self.speeds.observe(
            endpoint.endpoint_id, ttft_s, demand.prompt_tokens, gaps_s, running_at_start
        )
        self.lengths.observe(demand.model, demand.max_tokens, completion_tokens, demand.kind)
        sent = endpoint.in_flight.get(id(demand))
        if sent is None or sent.predicted_s is None:
            return
        error = PredictionError(
            endpoint.endpoint_id,
            sent.predicted_s,
            self.clock() - sent.sent_s,
            given_length(
                sent.predicted_s,
                sent.predicted_first_token_s,
                demand.output_tokens,
                completion_tokens,
            ),
        )
        self.predictions.record(error, sent.correction, self.clock())
        logger.debug(
            "call on %s: predicted %.3fs, measured %.3fs (error %.0f%%)",
            endpoint.endpoint_id, error.predicted_s, error.measured_s, 100 * error.relative,
        )  # fmt: skip
        stats, tracker = self.stats, self.predictions
        stats.predictions = tracker.measured
        stats.prediction_error_p50, stats.prediction_error_p90 = tracker.error_quantiles()
        stats.model_error_p50, stats.model_error_p90 = tracker.model_error_quantiles()
        stats.prediction_error_buckets = list(tracker.bucket_counts)
        stats.prediction_error_sum = tracker.error_sum

    # --- the ChatBackend call ------------------------------------------------------------

    def _failed(self, rejected: Rejected) -> CallRecord:
        """The record of a call the router refused: its message and its kind."""
        return CallRecord(
            start_s=self.clock(), ttft_s=None, itl_s=(), e2e_s=0.0, prompt_tokens=0,
            completion_tokens=0, finish_reason=None, text="", error=str(rejected),
            failure=rejected.kind,
        )  # fmt: skip

    async def chat(
        self, model: str, messages: list[dict[str, str]], sampling: SamplingParams
    ) -> CallRecord:
        """Route one chat call for model key `model` and run it (ChatBackend)."""
        demand = self.demand(model, messages, sampling.max_tokens)
        try:
            await self.admit(model, demand)
        except Rejected as rejected:
            return self._failed(rejected)
        tried: set[str] = set()
        while True:
            try:
                endpoint = self.pick(model, demand, tried)
            except Rejected as rejected:
                return self._failed(rejected)
            running_at_start = max(endpoint.num_running, endpoint.outstanding)
            assert endpoint.client is not None
            first = FirstToken(self, endpoint, demand)
            try:
                record = await endpoint.client.chat(
                    endpoint.served_model, messages, sampling, on_first_token=first
                )
                if record.ok and record.ttft_s is not None:
                    self.observe(
                        endpoint, demand, record.ttft_s, list(record.itl_s), running_at_start,
                        record.completion_tokens,
                    )  # fmt: skip
            finally:
                self.release(endpoint, demand, prefilled=first.seen)
            if record.failure is CallFailure.CONNECTION:
                if self.retry_elsewhere(model, endpoint, tried, record.error):
                    continue
                return _with_retry(record) if len(tried) > 1 else record
            return _with_retry(record) if tried else record


@dataclass
class FirstToken:
    """The first-token callback of one dispatched call (see `Router.first_token`): calling it
    again is a no-op, and `seen` is what `Router.release(prefilled=...)` needs."""

    router: Router
    endpoint: Endpoint
    demand: CallDemand
    seen: bool = False

    def __call__(self) -> None:
        if not self.seen:
            self.seen = True
            self.router.first_token(self.endpoint, self.demand)


def _with_retry(record: CallRecord) -> CallRecord:
    from dataclasses import replace

    return replace(record, retries=record.retries + 1)


def endpoints_for_replicas(
    model_key: str, replicas: list[Replica], max_num_seqs_default: int = 256
) -> list[Endpoint]:
    """Endpoints for pool replicas of one model key."""
    return [
        Endpoint(
            endpoint_id=f"{model_key}/{replica.replica_id}",
            model_key=model_key,
            served_model=replica.config.model,
            base_url=replica.base_url,
            max_num_seqs=replica.config.max_num_seqs or max_num_seqs_default,
            max_num_batched_tokens=(
                replica.config.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
            ),
            replica=replica,
        )
        for replica in replicas
    ]
