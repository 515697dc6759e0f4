"""Replica counts: sizing a deployment up front and scaling it while it runs.

Two pure pieces live here. :func:`size_replicas` turns a measured service-time sample, an
arrival rate and an SLA into the smallest replica count predicted to meet the SLA, by
simulating a queue. :func:`decide` is the reactive autoscaling rule: from statistics of the
last window it returns a scaling decision with its reason, using separate up and down
thresholds (hysteresis) and a cooldown so the replica count does not oscillate. Neither reads
a clock or touches a process; the caller passes ``now`` and applies the decision.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Replica counts in configuration
# --------------------------------------------------------------------------------------------


def parse_replica_count(value: Any) -> int | Literal["auto"]:
    """Validate a deployment's replica count: an integer >= 1 or the string ``"auto"``.

    Strings of digits (from a CLI flag or an environment variable) are accepted as integers;
    booleans and floats are refused so ``true`` or ``1.5`` in a YAML file is an error.
    """
    if isinstance(value, str):
        text = value.strip()
        if text == "auto":
            return "auto"
        if text.isdigit() and int(text) >= 1:
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"replicas must be an integer >= 1 or 'auto', got {value!r}")


#: Pydantic field type for a replica count; ``"auto"`` hands the count to the provisioner.
ReplicaCount = Annotated[int | Literal["auto"], BeforeValidator(parse_replica_count)]


# --------------------------------------------------------------------------------------------
# Up-front sizing by simulation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizingCandidate:
    """Predicted behaviour of one candidate replica count.

    ``simulated`` is False for counts whose utilization is >= 1 (the queue grows without
    bound, so p99 is reported as infinity and every request as a violation).
    """

    replicas: int
    utilization: float
    predicted_p99_s: float
    predicted_violation_rate: float
    meets_sla: bool
    simulated: bool


@dataclass(frozen=True)
class SizingResult:
    """The replica count chosen by :func:`size_replicas` and the evidence for it."""

    replicas: int
    feasible: bool
    predicted_p99_s: float
    predicted_violation_rate: float
    utilization: float
    reason: str
    candidates: tuple[SizingCandidate, ...]


def _sojourn_times(arrivals: np.ndarray, services: np.ndarray, servers: int) -> np.ndarray:
    """Time in system of each call in an FCFS queue with ``servers`` identical servers."""
    free = [0.0] * servers
    out = np.empty_like(arrivals)
    for i in range(arrivals.shape[0]):
        a = float(arrivals[i])
        start = max(a, heapq.heappop(free))
        finish = start + float(services[i])
        heapq.heappush(free, finish)
        out[i] = finish - a
    return out


def size_replicas(
    arrival_rate_rps: float,
    calls_per_request: float,
    service_time_samples_s: Sequence[float],
    sla_p99_s: float,
    epsilon: float,
    max_replicas: int,
    seed: int = 0,
    num_calls: int = 2000,
) -> SizingResult:
    """Smallest replica count whose requests meet ``sla_p99_s`` with probability >= 1 - eps.

    Model: the replicas of one model form an M/G/c FCFS queue. Calls arrive as a Poisson
    process of rate ``arrival_rate_rps * calls_per_request``; each call's service time is
    drawn with replacement from ``service_time_samples_s`` (measured on one replica at the
    concurrency it will run at); a call waits until one of the ``c`` replicas is free. A
    request is ``calls_per_request`` consecutive calls of that stream (``floor`` or ``ceil``
    of it at random so the mean matches) executed one after another, so its end-to-end
    latency is the sum of its calls' sojourn times; correlation between a request's calls is
    ignored. The first 10 % of requests are discarded as warm-up.

    The same random arrivals and service times are used for every candidate (common random
    numbers), so the predictions are monotone in ``c`` and comparisons are not noise.
    Candidates run from the smallest stable count (utilization < 1) upwards; the first whose
    violation rate (fraction of requests slower than ``sla_p99_s``) is at most ``epsilon`` is
    returned. If even ``max_replicas`` misses, it is returned with ``feasible=False``.
    """
    if not arrival_rate_rps > 0 or not math.isfinite(arrival_rate_rps):
        raise ValueError(f"arrival_rate_rps must be a finite number > 0, got {arrival_rate_rps}")
    if not calls_per_request >= 1 or not math.isfinite(calls_per_request):
        raise ValueError(f"calls_per_request must be a finite number >= 1, got {calls_per_request}")
    if len(service_time_samples_s) == 0:
        raise ValueError("service_time_samples_s must hold at least one sample, got []")
    samples = np.asarray(service_time_samples_s, dtype=float)
    if not np.all(np.isfinite(samples)) or samples.min() <= 0:
        bad = next(float(s) for s in samples if not (math.isfinite(s) and s > 0))
        raise ValueError(f"service_time_samples_s must all be finite and > 0, got {bad}")
    if not sla_p99_s > 0:
        raise ValueError(f"sla_p99_s must be > 0, got {sla_p99_s}")
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    if max_replicas < 1:
        raise ValueError(f"max_replicas must be >= 1, got {max_replicas}")
    if num_calls < 100:
        raise ValueError(f"num_calls must be >= 100, got {num_calls}")

    rng = np.random.default_rng(seed)
    call_rate = arrival_rate_rps * calls_per_request
    lo = math.floor(calls_per_request)
    frac = calls_per_request - lo
    n_requests = max(math.ceil(num_calls / calls_per_request), 100)
    calls_of = lo + (rng.random(n_requests) < frac).astype(int)
    total_calls = int(calls_of.sum())
    arrivals = np.cumsum(rng.exponential(1.0 / call_rate, size=total_calls))
    services = rng.choice(samples, size=total_calls, replace=True)
    bounds = np.concatenate(([0], np.cumsum(calls_of)))
    warmup = n_requests // 10
    offered_load = call_rate * float(samples.mean())

    def evaluate(c: int) -> SizingCandidate:
        util = offered_load / c
        if util >= 1.0:
            return SizingCandidate(c, util, math.inf, 1.0, False, False)
        sojourn = _sojourn_times(arrivals, services, c)
        e2e = np.add.reduceat(sojourn, bounds[:-1])[warmup:]
        p99 = float(np.quantile(e2e, 0.99))
        viol = float(np.mean(e2e > sla_p99_s))
        return SizingCandidate(c, util, p99, viol, viol <= epsilon, True)

    # Lower bound with no queueing at all: if it already fails, no replica count helps.
    no_wait = np.add.reduceat(services, bounds[:-1])[warmup:]
    no_wait_viol = float(np.mean(no_wait > sla_p99_s))
    if no_wait_viol > epsilon:
        cand = evaluate(max_replicas)
        return SizingResult(
            replicas=max_replicas,
            feasible=False,
            predicted_p99_s=cand.predicted_p99_s,
            predicted_violation_rate=cand.predicted_violation_rate,
            utilization=cand.utilization,
            reason=f"infeasible: even with no queueing {no_wait_viol:.1%} of requests exceed "
            f"sla_p99_s={sla_p99_s}s (epsilon={epsilon}); service times alone are too slow",
            candidates=(cand,),
        )

    table: list[SizingCandidate] = []
    first_stable = min(max(1, math.floor(offered_load) + 1), max_replicas)
    table.extend(evaluate(c) for c in range(1, first_stable))
    for c in range(first_stable, max_replicas + 1):
        cand = evaluate(c)
        table.append(cand)
        if cand.meets_sla:
            logger.debug("sized %d replicas: %s", c, cand)
            return SizingResult(
                replicas=c,
                feasible=True,
                predicted_p99_s=cand.predicted_p99_s,
                predicted_violation_rate=cand.predicted_violation_rate,
                utilization=cand.utilization,
                reason=f"{c} replicas: predicted p99 {cand.predicted_p99_s:.3f}s, "
                f"violation rate {cand.predicted_violation_rate:.2%} <= epsilon {epsilon}",
                candidates=tuple(table),
            )
    last = table[-1]
    return SizingResult(
        replicas=max_replicas,
        feasible=False,
        predicted_p99_s=last.predicted_p99_s,
        predicted_violation_rate=last.predicted_violation_rate,
        utilization=last.utilization,
        reason=f"infeasible: max_replicas={max_replicas} gives violation rate "
        f"{last.predicted_violation_rate:.2%} > epsilon {epsilon} at sla_p99_s={sla_p99_s}s",
        candidates=tuple(table),
    )


# --------------------------------------------------------------------------------------------
# Reactive scaling
# --------------------------------------------------------------------------------------------


class ScalingPolicy(BaseModel):
    """Thresholds of the reactive autoscaler, with hysteresis between up and down.

    Scale up when any pressure signal crosses its high threshold; scale down only when all
    of them are comfortably on the low side. The gap between the pairs of thresholds keeps
    the count from oscillating; ``cooldown_s`` lets a change take effect before the next.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: Annotated[float, Field(gt=0.0, le=3600.0)] = Field(
        default=30.0,
        description="Length in seconds of the sliding window whose statistics drive a decision.",
    )
    scale_up_attainment_below: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.95,
        description="Scale up when the fraction of requests meeting the SLA in the window "
        "falls below this.",
    )
    scale_down_attainment_above: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.99,
        description="Scale down only if SLA attainment is at least this (must exceed "
        "scale_up_attainment_below: the band between them is the hysteresis).",
    )
    queue_depth_high: Annotated[float, Field(gt=0.0)] = Field(
        default=4.0,
        description="Scale up when the mean number of calls waiting per replica reaches this.",
    )
    queue_depth_low: Annotated[float, Field(ge=0.0)] = Field(
        default=0.5,
        description="Scale down only if the mean number of calls waiting per replica is at "
        "most this (must be below queue_depth_high).",
    )
    kv_usage_high: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        default=0.9,
        description="Scale up when mean KV-cache usage (0..1) reaches this: preemptions are near.",
    )
    kv_usage_low: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        default=0.5,
        description="Scale down only if mean KV-cache usage is at most this (must be below "
        "kv_usage_high).",
    )
    out_of_reach_high: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        default=0.05,
        description="Scale up when this share of the window's calls arrived out of reach: "
        "the router's step-time predictions said they would miss their deadlines on any "
        "replica (the same predictions its admission uses).",
    )
    out_of_reach_low: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        default=0.01,
        description="Scale down only if at most this share of the window's calls arrived "
        "out of reach (must be below out_of_reach_high).",
    )
    cooldown_s: Annotated[float, Field(ge=0.0, le=86_400.0)] = Field(
        default=60.0,
        description="Seconds after a change during which no further change is made.",
    )
    min_replicas: Annotated[int, Field(ge=1)] = Field(
        default=1, description="Fewest replicas ever kept running."
    )
    max_replicas: Annotated[int, Field(ge=1)] = Field(
        default=8, description="Most replicas ever started (the budget)."
    )
    step: Annotated[int, Field(ge=1)] = Field(
        default=1, description="Replicas added or removed by one decision."
    )

    @model_validator(mode="after")
    def _check_hysteresis(self) -> Self:
        """Each down threshold must sit strictly on the comfortable side of its up threshold."""
        if self.scale_down_attainment_above <= self.scale_up_attainment_below:
            raise ValueError(
                "scale_down_attainment_above must exceed scale_up_attainment_below, got "
                f"{self.scale_down_attainment_above} <= {self.scale_up_attainment_below}"
            )
        if self.queue_depth_low >= self.queue_depth_high:
            raise ValueError(
                "queue_depth_low must be below queue_depth_high, got "
                f"{self.queue_depth_low} >= {self.queue_depth_high}"
            )
        if self.kv_usage_low >= self.kv_usage_high:
            raise ValueError(
                f"kv_usage_low must be below kv_usage_high, got "
                f"{self.kv_usage_low} >= {self.kv_usage_high}"
            )
        if self.out_of_reach_low >= self.out_of_reach_high:
            raise ValueError(
                f"out_of_reach_low must be below out_of_reach_high, got "
                f"{self.out_of_reach_low} >= {self.out_of_reach_high}"
            )
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas must be <= max_replicas, got "
                f"{self.min_replicas} > {self.max_replicas}"
            )
        return self


@dataclass(frozen=True)
class WindowStats:
    """Statistics of the last ``window_s`` seconds of a deployment.

    ``sla_attainment`` is ignored when ``requests_in_window`` is 0 (nothing to attain).
    ``queue_depth`` is the mean number of calls waiting per replica; ``kv_cache_usage`` the
    mean fraction of KV-cache blocks in use across replicas.
    """

    sla_attainment: float
    queue_depth: float
    kv_cache_usage: float
    requests_in_window: int
    out_of_reach: float = 0.0
    """Share of the calls that arrived in the window whose completion the router predicted
    to miss their deadline on the best replica (RouterStats.out_of_reach): the pressure the
    predictions see coming, before SLAs are missed."""


@dataclass(frozen=True)
class ScalingDecision:
    """A scaling decision at ``time_s``; ``to_replicas == from_replicas`` means hold."""

    time_s: float
    from_replicas: int
    to_replicas: int
    reason: str

    @property
    def changed(self) -> bool:
        """True when the decision changes the replica count."""
        return self.to_replicas != self.from_replicas


def decide(
    policy: ScalingPolicy,
    stats: WindowStats,
    current_replicas: int,
    now_s: float,
    last_change_s: float | None,
) -> ScalingDecision:
    """Decide the replica count for the next period from the last window's statistics.

    In order: a count outside ``[min_replicas, max_replicas]`` is clamped at once; within
    ``cooldown_s`` of the last change (``last_change_s``; ``None`` for never) the count is
    held; scale up by ``step`` if attainment < ``scale_up_attainment_below`` or queue depth
    >= ``queue_depth_high`` or KV usage >= ``kv_usage_high`` or the share of calls predicted
    out of reach >= ``out_of_reach_high``; scale down by ``step`` only if attainment >=
    ``scale_down_attainment_above`` (or no requests), queue depth <= ``queue_depth_low``, KV
    usage <= ``kv_usage_low`` and the share out of reach <= ``out_of_reach_low``; otherwise
    hold.
    """
    cur = current_replicas

    def out(to: int, reason: str) -> ScalingDecision:
        return ScalingDecision(now_s, cur, to, reason)

    if cur < policy.min_replicas:
        return out(policy.min_replicas, f"below min_replicas={policy.min_replicas}")
    if cur > policy.max_replicas:
        return out(policy.max_replicas, f"above max_replicas={policy.max_replicas}")
    if last_change_s is not None and now_s - last_change_s < policy.cooldown_s:
        left = policy.cooldown_s - (now_s - last_change_s)
        return out(cur, f"cooldown ({left:.1f}s left)")

    has_requests = stats.requests_in_window > 0
    pressure: list[str] = []
    if has_requests and stats.sla_attainment < policy.scale_up_attainment_below:
        pressure.append(
            f"sla_attainment {stats.sla_attainment:.3f} < {policy.scale_up_attainment_below}"
        )
    if stats.queue_depth >= policy.queue_depth_high:
        pressure.append(f"queue_depth {stats.queue_depth:.2f} >= {policy.queue_depth_high}")
    if stats.kv_cache_usage >= policy.kv_usage_high:
        pressure.append(f"kv_cache_usage {stats.kv_cache_usage:.2f} >= {policy.kv_usage_high}")
    if stats.out_of_reach >= policy.out_of_reach_high:
        pressure.append(
            f"predicted out of reach {stats.out_of_reach:.3f} >= {policy.out_of_reach_high}"
        )
    if pressure:
        why = "; ".join(pressure)
        if cur >= policy.max_replicas:
            return out(cur, f"hold at max_replicas={policy.max_replicas} despite {why}")
        return out(min(cur + policy.step, policy.max_replicas), f"scale up: {why}")

    comfortable = (
        (not has_requests or stats.sla_attainment >= policy.scale_down_attainment_above)
        and stats.queue_depth <= policy.queue_depth_low
        and stats.kv_cache_usage <= policy.kv_usage_low
        and stats.out_of_reach <= policy.out_of_reach_low
    )
    if comfortable:
        if cur <= policy.min_replicas:
            return out(cur, f"hold at min_replicas={policy.min_replicas}")
        attained = f"{stats.sla_attainment:.3f}" if has_requests else "n/a (idle)"
        return out(
            max(cur - policy.step, policy.min_replicas),
            f"scale down: sla_attainment {attained}, queue_depth {stats.queue_depth:.2f}, "
            f"kv_cache_usage {stats.kv_cache_usage:.2f}, out of reach "
            f"{stats.out_of_reach:.3f} all comfortable",
        )
    return out(cur, "hold: within the hysteresis band")
