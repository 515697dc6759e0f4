"""The Prometheus side of the front door: what `GET /metrics` shows.

Each app gets its own registry, so several front doors in one process do not collide. Request
latency, answers by status, time to first token and 429s are updated as requests happen (by the
front-door middleware and the routes); the in-flight count, SLA attainment, router counters,
endpoint health and the autoscalers' replicas and decisions are read from live state at scrape
time.

The per-request series carry two labels besides the route: `model_key`, the deployment model
key an OpenAI call was routed to (or that an app's LLM call went to, for the time to first
token), and `app`, the deployment app a `/v1/apps/{name}` request ran. A label is empty where
it does not apply or is not known (a call to an unknown model, a body that did not parse), so
every label value is a model key or app name of the deployment and the series stay bounded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from runtime.deployment import Deployment
from runtime.routing.prediction import ERROR_BUCKETS
from runtime.routing.router import Router, RouterStats
from runtime.scaling.autoscaler import Autoscaler

#: Request latency buckets, seconds: from a cached short answer to a long agentic request.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
#: Time-to-first-token buckets, seconds: from a short prompt on an idle replica to a long
#: prefill behind a full batch (a subset of vLLM's own TTFT buckets).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
#: The label names of the per-request series, after the route.
TARGET_LABELS = ("app", "model_key")


@dataclass
class RequestRecord:
    """What the front door learns about one request while serving it, for its metric labels.

    The middleware creates it when the request arrives and reads it when the response ends;
    the routes fill in the target once they know it (the model key a call resolves to, the
    app a request runs).
    """

    start_s: float
    app: str = ""
    model_key: str = ""

    @property
    def labels(self) -> tuple[str, str]:
        """The values of TARGET_LABELS."""
        return (self.app, self.model_key)


@dataclass
class SlaCount:
    """Finished requests of one target and how many met the SLA."""

    finished: int = 0
    within_sla: int = 0

    @property
    def attainment(self) -> float:
        """Share within the SLA (1 before any finished)."""
        return self.within_sla / self.finished if self.finished else 1.0


@dataclass
class FrontDoorState:
    """Counts the middleware keeps; read by /metrics."""

    in_flight: int = 0
    sla: dict[tuple[str, str], SlaCount] = field(default_factory=dict)
    """SLA outcomes by (app, model_key)."""

    def record_outcome(self, labels: tuple[str, str], met_sla: bool) -> None:
        """Count one finished request of a target."""
        count = self.sla.setdefault(labels, SlaCount())
        count.finished += 1
        count.within_sla += int(met_sla)


def _targets(deployment: Deployment, state: FrontDoorState) -> Iterable[tuple[str, str]]:
    """Every (app, model_key) with an SLA series: each model key and each app from the start
    (so the series exist before the first request), then any other target seen."""
    known = [("", key) for key in deployment.models] + [(name, "") for name in deployment.apps]
    return known + sorted(set(state.sla) - set(known))


class _StateCollector(Collector):
    """Metrics read from live state at scrape time (router counters, endpoint health)."""

    def __init__(
        self,
        router: Router,
        deployment: Deployment,
        state: FrontDoorState,
        autoscalers: Mapping[str, Autoscaler],
    ) -> None:
        self.router = router
        self.deployment = deployment
        self.state = state
        self.autoscalers = autoscalers

    def collect(
        self,
    ) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        """Yield the current values."""
        router, state = self.router, self.state
        in_flight = GaugeMetricFamily(
            "fmtune_in_flight_requests",
            "LLM and app requests in flight or waiting at the front door.",
            value=state.in_flight,
        )
        sla = GaugeMetricFamily(
            "fmtune_sla_attainment",
            "Share of finished LLM and app requests answered successfully within sla_e2e_s "
            "(1 before any finished), by app (app requests) and model key (OpenAI calls).",
            labels=list(TARGET_LABELS),
        )
        for labels in _targets(self.deployment, state):
            sla.add_metric(list(labels), state.sla.get(labels, SlaCount()).attainment)
        depth = GaugeMetricFamily(
            "fmtune_router_queue_depth",
            "Calls waiting in the router's least-slack-first queue.",
            labels=["model_key"],
        )
        healthy = GaugeMetricFamily(
            "fmtune_endpoints_healthy", "Endpoints in rotation.", labels=["model_key"]
        )
        total = GaugeMetricFamily(
            "fmtune_endpoints", "Endpoints known, healthy or not.", labels=["model_key"]
        )
        for key in sorted(set(self.deployment.models) | set(router.model_keys())):
            mine = [e for e in router.endpoints if e.model_key == key]
            depth.add_metric([key], router.stats.queue_depth.get(key, 0))
            healthy.add_metric([key], sum(e.healthy for e in mine))
            total.add_metric([key], len(mine))
        yield from (in_flight, sla, depth, healthy, total)
        stats = router.stats
        for name, help_text, value in (
            ("fmtune_router_routed", "Calls the router sent to an endpoint.", stats.routed),
            ("fmtune_router_shed", "Calls shed (deadline out of reach).", stats.shed),
            ("fmtune_router_retries", "Calls retried on another endpoint.", stats.retried),
            (
                "fmtune_router_queue_rejected",
                "Calls refused by a full queue.",
                stats.queue_rejected,
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        yield from _prediction_error(stats)
        if self.autoscalers:
            replicas = GaugeMetricFamily(
                "fmtune_autoscaler_replicas",
                "Replicas of an 'auto' model key now (its endpoints in the router).",
                labels=["model_key"],
            )
            decisions = CounterMetricFamily(
                "fmtune_autoscaler_decisions",
                "Scaling decisions of an 'auto' model key, by action (up, down, hold).",
                labels=["model_key", "action"],
            )
            for key, scaler in sorted(self.autoscalers.items()):
                replicas.add_metric([key], scaler.current)
                for action in ("up", "down", "hold"):
                    decisions.add_metric([key, action], scaler.counts[action])
            yield from (replicas, decisions)


def _prediction_error(stats: RouterStats) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
    """The router's relative error of predicted vs measured completion: every measured call
    as a histogram, the median and p90 over its recent calls as gauges (absent before any)."""
    cumulative: list[tuple[str, float]] = []
    total = 0
    counts = stats.prediction_error_buckets or [0] * (len(ERROR_BUCKETS) + 1)
    for bound, count in zip([*map(str, ERROR_BUCKETS), "+Inf"], counts, strict=True):
        total += count
        cumulative.append((bound, total))
    yield HistogramMetricFamily(
        "fmtune_router_prediction_error",
        "Relative error |predicted - measured| / measured of the router's predicted "
        "completion of each call that finished.",
        buckets=cumulative,
        sum_value=stats.prediction_error_sum,
    )
    quantiles = GaugeMetricFamily(
        "fmtune_router_prediction_error_quantile",
        "Median and p90 of the router's relative prediction error over its recent calls.",
        labels=["quantile"],
    )
    for label, value in (("0.5", stats.prediction_error_p50), ("0.9", stats.prediction_error_p90)):
        if value is not None:
            quantiles.add_metric([label], value)
    yield quantiles


@dataclass
class Metrics:
    """The app's Prometheus registry and the metrics updated as requests happen."""

    registry: CollectorRegistry
    latency: Histogram
    requests: Counter
    ttft: Histogram
    rejected: Counter
    endpoint_failures: Counter


def create_metrics(
    router: Router,
    deployment: Deployment,
    state: FrontDoorState,
    autoscalers: Mapping[str, Autoscaler],
) -> Metrics:
    """A fresh registry with the front door's metrics, including those read from `router`,
    `state` and the `autoscalers` at scrape time."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_StateCollector(router, deployment, state, autoscalers))
    return Metrics(
        registry=registry,
        latency=Histogram(
            "fmtune_request_duration_seconds",
            "Request latency at the front door, to the last byte of the response, by route, "
            "app and model key.",
            ["route", *TARGET_LABELS],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        requests=Counter(
            "fmtune_requests",
            "Requests answered, by route, status code, app and model key.",
            ["route", "code", *TARGET_LABELS],
            registry=registry,
        ),
        ttft=Histogram(
            "fmtune_time_to_first_token_seconds",
            "Time to the first generated token: of a streamed OpenAI call, from its arrival at "
            "the front door (model_key set, app empty); of each LLM call an app request made "
            "(app and the model key it called).",
            list(TARGET_LABELS),
            buckets=TTFT_BUCKETS,
            registry=registry,
        ),
        rejected=Counter(
            "fmtune_rejected_429",
            "Requests answered 429, by reason: the front door was full (front_door), the "
            "router's queue was full (router_queue), or the router shed a call that could not "
            "meet its deadline (shed).",
            ["reason"],
            registry=registry,
        ),
        endpoint_failures=Counter(
            "fmtune_endpoint_failures",
            "Endpoints taken out of rotation (dead or unreachable).",
            ["model_key"],
            registry=registry,
        ),
    )
