"""The Prometheus side of the front door: what `GET /metrics` shows.

Each app gets its own registry, so several front doors in one process do not collide. Request
latency, answers by status and 429s are updated as requests happen (by the front-door
middleware); the in-flight count, SLA attainment, router counters, endpoint health and the
autoscalers' replicas and decisions are read from live state at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime.deployment import Deployment
from runtime.routing.router import Router
from runtime.scaling.autoscaler import Autoscaler

#: Request latency buckets, seconds: from a cached short answer to a long agentic request.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class FrontDoorState:
    """Counts the middleware keeps; read by /metrics."""

    in_flight: int = 0
    finished: int = 0
    within_sla: int = 0


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

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
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
            "(1 before any finished).",
            value=state.within_sla / state.finished if state.finished else 1.0,
        )
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


@dataclass
class Metrics:
    """The app's Prometheus registry and the metrics updated as requests happen."""

    registry: CollectorRegistry
    latency: Histogram
    requests: Counter
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
            "Request latency at the front door, to the last byte of the response.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        requests=Counter(
            "fmtune_requests",
            "Requests answered, by route and status code.",
            ["route", "code"],
            registry=registry,
        ),
        rejected=Counter(
            "fmtune_rejected_429",
            "Requests answered 429: the front door or the router's queue was full.",
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
