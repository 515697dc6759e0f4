"""The metrics of one run, computed from per-request outcomes.

A run is judged the way its users would judge it: latency percentiles of the requests that
succeeded, the share of all requests answered within the SLA deadline (failures and shed
requests count as misses), the rate of such requests (goodput), what the replicas and API
tokens cost per thousand requests, peak memory, and answer quality with a bootstrap
confidence interval (a failed request scores 0, since its user got nothing).

Cost counts the replica time of the work itself: each replica is charged from the first
measured request's send to the last measured answer (`busy_replica_seconds`), not its
start-up, the warm-up requests or idle time around the run.

A run measured several times (the workload's `repeats`) is summarized by `combine_repeats`:
the median of each metric over repeats with a 95% bootstrap interval, and quality over the
same examples averaged across repeats.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from runtime.app.formats import FormatTally
from runtime.stats import bootstrap_ci, bootstrap_median_ci, percentiles

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestOutcome:
    """What happened to one request of a run (an immutable record).

    Attributes:
        request_id: Index of the request within the run.
        start_s: Monotonic time the request was sent, seconds.
        end_s: Monotonic time its answer (or failure) came back, seconds.
        ok: True when the application returned an answer.
        error: Why it failed, None when ok.
        quality: Task score of the answer in [0, 1]; None when unscored or failed.
        llm_calls: LLM calls the request made.
        prompt_tokens: Prompt tokens over all its LLM calls.
        completion_tokens: Generated tokens over all its LLM calls.
        ttfts_s: Time to first token of each LLM call, seconds.
        tpots_s: Time per output token of each LLM call with more than one token,
            (e2e - ttft) / (completion_tokens - 1), seconds.
        format_statuses: Parse status of each structured LLM answer
            ("clean", "repaired", "unparseable").
        shed: True when the router refused the request to protect the SLA of others.
        score_error: Why the scorer could not score the answer (it raised, or returned no
            number in [0, 1]); None when it scored it or there was no answer. Such an answer
            has no quality and scores 0, as a failed request does.
    """

    request_id: int
    start_s: float
    end_s: float
    ok: bool
    error: str | None = None
    quality: float | None = None
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttfts_s: list[float] = field(default_factory=list)
    tpots_s: list[float] = field(default_factory=list)
    format_statuses: list[str] = field(default_factory=list)
    shed: bool = False
    score_error: str | None = None

    def __post_init__(self) -> None:
        if self.end_s < self.start_s:
            raise ValueError(
                f"end_s must be >= start_s ({self.start_s}), got {self.end_s} "
                f"(request {self.request_id})"
            )
        if self.quality is not None and not 0.0 <= self.quality <= 1.0:
            raise ValueError(f"quality must be in [0, 1], got {self.quality}")

    @property
    def e2e_s(self) -> float:
        """End-to-end latency, seconds."""
        return self.end_s - self.start_s

    @property
    def succeeded(self) -> bool:
        """Answered and not shed."""
        return self.ok and not self.shed


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------


class CostModel(BaseModel):
    """Prices that turn replica time and API tokens into dollars."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    price_per_replica_hour_usd: dict[str, float] = Field(
        default_factory=dict,
        description="USD per hour of one replica, by model name (what its machine costs).",
    )
    api_price_per_1k_tokens_usd: float = Field(
        0.0, ge=0, description="USD per 1000 tokens sent to or from external LLM APIs."
    )


def busy_replica_seconds(
    outcomes: Sequence[RequestOutcome], replicas: Mapping[str, int]
) -> dict[str, float]:
    """Replica-seconds of the work itself, by model key: every replica of a key is charged
    the run's busy span, from the first request's send (min start_s) to the last answer
    (max end_s), whether or not it served a call at every moment of it (a replica is held
    for the whole run). Start-up, warm-up requests and idle time before the first send or
    after the last answer are not charged, so an engine that starts slowly or a pause
    between repeats does not move the cost. No requests: zero.

    replicas: running replicas by model key (all >= 0).
    """
    for key, count in replicas.items():
        if count < 0:
            raise ValueError(f"replicas[{key!r}] must be >= 0, got {count}")
    if not outcomes:
        return dict.fromkeys(replicas, 0.0)
    span = max(o.end_s for o in outcomes) - min(o.start_s for o in outcomes)
    return {key: span * count for key, count in replicas.items()}


def cost_per_1k_requests(
    replica_seconds: Mapping[str, float],
    prices: Mapping[str, float],
    api_tokens: int,
    api_price_per_1k_tokens: float,
    n_requests: int,
) -> float:
    """USD per 1000 requests: replica-hours times hourly prices plus API tokens, per request.

    replica_seconds: seconds of replica time used in the run, by model name.
    prices: USD per replica-hour, by model name; every model used needs a price.
    """
    if n_requests < 1:
        raise ValueError(f"n_requests must be >= 1, got {n_requests}")
    if api_tokens < 0:
        raise ValueError(f"api_tokens must be >= 0, got {api_tokens}")
    if api_price_per_1k_tokens < 0:
        raise ValueError(f"api_price_per_1k_tokens must be >= 0, got {api_price_per_1k_tokens}")
    total = 0.0
    for model, seconds in replica_seconds.items():
        if seconds < 0:
            raise ValueError(f"replica_seconds[{model!r}] must be >= 0, got {seconds}")
        if model not in prices:
            raise ValueError(f"prices has no entry for model {model!r}, got {sorted(prices)}")
        total += seconds / 3600.0 * prices[model]
    total += api_tokens / 1000.0 * api_price_per_1k_tokens
    return total / n_requests * 1000.0


class ModelKeyUsage(BaseModel):
    """What one model key of a deployment served and cost in a run (metrics.json's
    `per_model_key`): a deployment with several keys says where its calls, money and memory
    went, not only their totals."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(ge=0, description="Replicas of the key that served the run.")
    usd_per_replica_hour: float = Field(ge=0, description="The key's replica-hour price.")
    llm_calls_per_request: float = Field(
        ge=0, description="Mean LLM calls per measured request made to this key."
    )
    cost_per_1k_usd: float | None = Field(
        default=None,
        description="This key's share of cost_per_1k_usd (its busy replica-seconds times its "
        "price, per 1000 requests; median over repeats). None without requests.",
    )
    peak_memory_gib: float | None = Field(
        default=None,
        description="Peak resident memory of the key's replicas together (None when the "
        "run started none: external endpoints).",
    )


def model_key_usage(
    calls_per_request: Mapping[str, float],
    replicas: Mapping[str, int],
    replica_seconds_by_repeat: Sequence[Mapping[str, float]],
    prices: Mapping[str, float],
    n_requests: int,
    peak_memory_gib: Mapping[str, float] | None,
) -> dict[str, ModelKeyUsage]:
    """Each model key's calls, cost and memory in a run (see ModelKeyUsage).

    calls_per_request: mean LLM calls per request by key (a key no call reached: 0).
    replica_seconds_by_repeat: each repeat's busy replica-seconds by key (busy_replica_seconds).
    prices: USD per replica-hour by key; n_requests: measured requests per repeat.
    """
    usage: dict[str, ModelKeyUsage] = {}
    for key, count in replicas.items():
        costs = [
            cost_per_1k_requests({key: seconds[key]}, prices, 0, 0.0, n_requests)
            for seconds in (replica_seconds_by_repeat if n_requests >= 1 else ())
        ]
        usage[key] = ModelKeyUsage(
            replicas=count,
            usd_per_replica_hour=prices[key],
            llm_calls_per_request=float(calls_per_request.get(key, 0.0)),
            cost_per_1k_usd=float(np.median(costs)) if costs else None,
            peak_memory_gib=None if peak_memory_gib is None else peak_memory_gib.get(key),
        )
    return usage


# --------------------------------------------------------------------------------------------
# Run summary
# --------------------------------------------------------------------------------------------


def _desc(text: str) -> Any:
    """An optional metric field: None until defined, documented where declared."""
    return Field(None, description=text)


class RunMetrics(BaseModel):
    """Everything measured about one run. Fields are None where they are undefined (no
    successful request, no LLM call, zero wall time)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_requests: int = Field(ge=0, description="Requests in the run.")
    num_failed: int = Field(ge=0, description="Requests that failed or were shed.")
    num_shed: int = Field(0, ge=0, description="Requests the router shed.")
    wall_s: float = Field(ge=0, description="Wall-clock length of the run, seconds.")
    sla_e2e_s: float = Field(gt=0, description="The end-to-end deadline SLA attainment uses.")
    e2e_p50_s: float | None = _desc("Median end-to-end latency of successful requests.")
    e2e_p90_s: float | None = _desc("90th percentile end-to-end latency, successful requests.")
    e2e_p95_s: float | None = _desc("95th percentile end-to-end latency, successful requests.")
    e2e_p99_s: float | None = _desc("99th percentile end-to-end latency, successful requests.")
    ttft_p50_s: float | None = _desc("Median time to first token over LLM calls.")
    ttft_p99_s: float | None = _desc("99th percentile time to first token over LLM calls.")
    tpot_p50_s: float | None = _desc("Median time per output token over LLM calls.")
    tpot_p99_s: float | None = _desc("99th percentile time per output token over LLM calls.")
    requests_per_s: float | None = _desc("Successful requests per wall second.")
    output_tokens_per_s: float | None = _desc("Generated tokens (all requests) per wall second.")
    sla_attainment: float | None = _desc(
        "Share of all requests that succeeded within sla_e2e_s; failed and shed are misses."
    )
    goodput_rps: float | None = _desc("Requests that met the SLA, per wall second.")
    error_rate: float | None = _desc("Share of requests that failed or were shed.")
    cost_per_1k_usd: float | None = _desc(
        "USD per 1000 requests: replica-seconds of the work itself (each replica charged from "
        "the first measured request's send to the last measured answer; start-up, warm-up "
        "and idle time not charged) times the replica price, plus API tokens."
    )
    peak_memory_gib: float | None = _desc("Peak memory of the deployment, GiB.")
    quality: float | None = _desc(
        "Mean task score over all requests, a failed request scoring 0; None if unscored."
    )
    quality_ci95: list[float] | None = _desc(
        "95% bootstrap interval of quality over the examples: [low, high] (with repeats, "
        "each example's score is its mean over repeats)."
    )
    format_clean_rate: float | None = _desc("Share of structured answers parsed strictly.")
    format_repaired_rate: float | None = _desc("Share parsed only after CPU-side repair.")
    format_unparseable_rate: float | None = _desc("Share that could not be parsed at all.")
    llm_calls_per_request: float | None = _desc("Mean LLM calls per request.")
    tokens_per_request: float | None = _desc("Mean prompt + completion tokens per request.")
    score_errors: int = Field(
        0,
        ge=0,
        description="Answers the scorer could not score (it raised, or returned no number in "
        "[0, 1]); each scores 0 in quality, as a failed request does.",
    )
    repeats: int = Field(
        1,
        ge=1,
        description="Times the workload was measured. With more than one, num_requests, "
        "num_failed, num_shed and wall_s add up over repeats, peak_memory_gib is the "
        "highest, quality is over the examples (each averaged over repeats), and every "
        "other metric is the median over repeats.",
    )


def _per_second(count: float, wall_s: float) -> float | None:
    return count / wall_s if wall_s > 0 else None


def _quality_scores(outcomes: Sequence[RequestOutcome]) -> list[float] | None:
    """Per-request scores with failures as 0; None when no successful request was scored."""
    if not any(o.succeeded and o.quality is not None for o in outcomes):
        return None
    return [o.quality if o.succeeded and o.quality is not None else 0.0 for o in outcomes]


def summarize(
    outcomes: Sequence[RequestOutcome],
    wall_s: float,
    sla_e2e_s: float,
    replica_seconds: Mapping[str, float],
    prices: CostModel,
    peak_memory_gib: float | None,
    api_tokens: int = 0,
) -> RunMetrics:
    """The run's metrics from its request outcomes and what the deployment used.

    Latency percentiles cover successful requests (and their LLM calls); rates, SLA
    attainment, quality and cost are over all requests, so failing fast never looks good.
    """
    if wall_s < 0 or math.isnan(wall_s):
        raise ValueError(f"wall_s must be >= 0, got {wall_s}")
    if sla_e2e_s <= 0:
        raise ValueError(f"sla_e2e_s must be > 0, got {sla_e2e_s}")
    n = len(outcomes)
    good = [o for o in outcomes if o.succeeded]
    e2e = percentiles([o.e2e_s for o in good])
    ttft = percentiles([t for o in good for t in o.ttfts_s], (50, 99))
    tpot = percentiles([t for o in good for t in o.tpots_s], (50, 99))
    met_sla = sum(o.e2e_s <= sla_e2e_s for o in good)
    num_failed = n - len(good)

    tally = FormatTally()
    for outcome in outcomes:
        for status in outcome.format_statuses:
            tally.add(status)
    rates = tally.rates() if tally.total else None

    scores = _quality_scores(outcomes)
    cost = (
        cost_per_1k_requests(
            replica_seconds,
            prices.price_per_replica_hour_usd,
            api_tokens,
            prices.api_price_per_1k_tokens_usd,
            n,
        )
        if n
        else None
    )
    if n == 0:
        logger.warning("summarizing a run with no requests")
    return RunMetrics(
        num_requests=n,
        num_failed=num_failed,
        num_shed=sum(o.shed for o in outcomes),
        wall_s=wall_s,
        sla_e2e_s=sla_e2e_s,
        e2e_p50_s=e2e["p50"],
        e2e_p90_s=e2e["p90"],
        e2e_p95_s=e2e["p95"],
        e2e_p99_s=e2e["p99"],
        ttft_p50_s=ttft["p50"],
        ttft_p99_s=ttft["p99"],
        tpot_p50_s=tpot["p50"],
        tpot_p99_s=tpot["p99"],
        requests_per_s=_per_second(len(good), wall_s),
        output_tokens_per_s=_per_second(sum(o.completion_tokens for o in outcomes), wall_s),
        sla_attainment=met_sla / n if n else None,
        goodput_rps=_per_second(met_sla, wall_s),
        error_rate=num_failed / n if n else None,
        cost_per_1k_usd=cost,
        peak_memory_gib=peak_memory_gib,
        quality=float(np.mean(scores)) if scores else None,
        quality_ci95=list(bootstrap_ci(scores)) if scores else None,
        format_clean_rate=rates["clean"] if rates else None,
        format_repaired_rate=rates["repaired"] if rates else None,
        format_unparseable_rate=rates["unparseable"] if rates else None,
        llm_calls_per_request=float(np.mean([o.llm_calls for o in outcomes])) if n else None,
        tokens_per_request=(
            float(np.mean([o.prompt_tokens + o.completion_tokens for o in outcomes])) if n else None
        ),
        score_errors=sum(o.score_error is not None for o in outcomes),
    )


# --------------------------------------------------------------------------------------------
# Repeats
# --------------------------------------------------------------------------------------------

_SUMMED = ("num_requests", "num_failed", "num_shed", "wall_s", "score_errors")
"""Counts and durations that add up over repeats."""
_KEPT = ("sla_e2e_s", "quality", "quality_ci95", "repeats")
"""Fields not taken per repeat: the deadline, quality (over examples) and the count."""
_HIGHEST = ("peak_memory_gib",)


def median_metric_names() -> list[str]:
    """The metrics a run with repeats reports as the median over repeats (each with a 95%
    bootstrap interval): every numeric RunMetrics field but the counts, durations, peak
    memory and quality."""
    skip = set(_SUMMED) | set(_KEPT) | set(_HIGHEST)
    return [name for name in RunMetrics.model_fields if name not in skip]


def example_quality(repeats: Sequence[Sequence[RequestOutcome]]) -> list[float] | None:
    """Each example's quality averaged over repeats, in request order (request i of every
    repeat carries example i), a failed or shed request scoring 0; None when no repeat
    scored a successful request (an unscored app)."""
    scored = [_quality_scores(outcomes) for outcomes in repeats]
    if all(scores is None for scores in scored):
        return None
    sizes = {len(outcomes) for outcomes in repeats}
    if len(sizes) != 1:
        raise ValueError(f"every repeat must send the same requests, got sizes {sorted(sizes)}")
    (size,) = sizes
    table = [scores if scores is not None else [0.0] * size for scores in scored]
    return [float(value) for value in np.mean(np.asarray(table, dtype=float), axis=0)]


@dataclass(frozen=True)
class RepeatedMetrics:
    """A run measured once or several times: the combined metrics and where they came from.

    Attributes:
        metrics: The combined metrics (RunMetrics.repeats says how they combine).
        per_repeat: Each repeat's own metrics, in the order they ran.
        intervals: 95% bootstrap interval of each median metric over repeats, by metric
            name: [low, high]; empty with one repeat (quality's is metrics.quality_ci95).
        example_quality: Each example's quality averaged over repeats, in request order;
            None when the app is unscored.
    """

    metrics: RunMetrics
    per_repeat: tuple[RunMetrics, ...]
    intervals: dict[str, list[float]] = field(default_factory=dict)
    example_quality: list[float] | None = None

    def values(self) -> dict[str, list[float]]:
        """Each median metric's value in every repeat that defined it, by metric name."""
        out: dict[str, list[float]] = {}
        for name in median_metric_names():
            values = [getattr(m, name) for m in self.per_repeat]
            out[name] = [float(v) for v in values if v is not None]
        return out


def combine_repeats(
    per_repeat: Sequence[RunMetrics], example_scores: Sequence[float] | None = None
) -> RepeatedMetrics:
    """The metrics of a run from its repeats' metrics and its examples' scores.

    Medians (numpy's, the mean of the middle two for an even count) over the repeats that
    defined the metric, with a seeded 95% bootstrap interval of the median when two or more
    did; counts and wall_s add up; peak memory is the highest; quality is the mean of the
    examples' scores (each averaged over repeats) and quality_ci95 its bootstrap interval
    over examples, since quality varies with the examples far more than between repeats of
    greedy decoding. Without example scores, quality is the one repeat's own, or the median
    over repeats.
    """
    if not per_repeat:
        raise ValueError("per_repeat must not be empty")
    slas = {m.sla_e2e_s for m in per_repeat}
    if len(slas) != 1:
        raise ValueError(f"every repeat must use the same sla_e2e_s, got {sorted(slas)}")
    data: dict[str, Any] = {"sla_e2e_s": per_repeat[0].sla_e2e_s, "repeats": len(per_repeat)}
    for name in _SUMMED:
        data[name] = sum(getattr(m, name) for m in per_repeat)
    peaks = [m.peak_memory_gib for m in per_repeat if m.peak_memory_gib is not None]
    data["peak_memory_gib"] = max(peaks) if peaks else None
    intervals: dict[str, list[float]] = {}
    for name in median_metric_names():
        values = [float(v) for v in (getattr(m, name) for m in per_repeat) if v is not None]
        data[name] = float(np.median(values)) if values else None
        if len(values) >= 2:
            intervals[name] = list(bootstrap_median_ci(values))
    if example_scores is not None and len(example_scores):
        data["quality"] = float(np.mean(example_scores))
        data["quality_ci95"] = list(bootstrap_ci(example_scores))
    elif len(per_repeat) == 1:  # no scores given: the one repeat's own
        data["quality"], data["quality_ci95"] = per_repeat[0].quality, per_repeat[0].quality_ci95
    else:
        qualities = [m.quality for m in per_repeat if m.quality is not None]
        data["quality"] = float(np.median(qualities)) if qualities else None
        data["quality_ci95"] = list(bootstrap_median_ci(qualities)) if qualities else None
    metrics = RunMetrics.model_validate(data)
    return RepeatedMetrics(
        metrics=metrics,
        per_repeat=tuple(per_repeat),
        intervals=intervals,
        example_quality=list(example_scores) if example_scores is not None else None,
    )
