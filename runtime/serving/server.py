"""`fmtune serve`: the OpenAI-compatible front door of a deployment.

Standard OpenAI clients talk to a deployment as if it were one vLLM server:

- `POST /v1/chat/completions`, `POST /v1/completions`: the body's `model` is a deployment model
  key or the served model name of one; the call goes through the router (its policy, queue,
  shedding and retry on a dead replica) and is proxied to the endpoint it picks. Streaming
  responses are relayed chunk by chunk as the engine produces them, so clients see real
  time-to-first-token; the relay also measures the stream to teach the router each replica's
  speed.
- `GET /v1/models`: the model keys and served names.
- `POST /v1/apps/{name}`: runs one request of a deployment application through its DAG.
- `GET /healthz` (never behind the API key) and `GET /metrics` (Prometheus text, one registry
  per app so several apps in one process do not collide).

The front door admits at most `max_queue` LLM requests at a time (in flight or waiting for the
router); beyond that it answers 429 with Retry-After, so overload turns into back-pressure
instead of unbounded memory and latency. Errors use OpenAI's shape, `{"error": {"message",
"type", "param", "code"}}`, and name the field and value at fault.

`create_app` is free of process management (tests give it fake endpoints); `serve` is the
blocking CLI entry point that starts replicas, runs uvicorn and stops everything on Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.app.dag import App
from runtime.app.executor import run_request
from runtime.cluster import start_endpoints
from runtime.deployment import Deployment, load_deployment
from runtime.engine.client import call_deadline, parse_sse_line
from runtime.engine.pool import ReplicaPool
from runtime.errors import FmtuneError
from runtime.routing.policies import CallDemand
from runtime.routing.router import (
    QUEUE_FULL_PREFIX,
    SHED_PREFIX,
    Endpoint,
    FirstToken,
    Rejected,
    Router,
    endpoints_for_replicas,
)
from runtime.scaling.autoscaler import (
    Autoscaler,
    autoscalers_for,
    size_deployment,
)

logger = logging.getLogger(__name__)

#: Output tokens a chat call is expected to produce when it sets no max_tokens (for routing
#: predictions only; the engine decides the real length).
DEFAULT_CHAT_TOKENS = 256
#: vLLM's (and OpenAI's) default max_tokens of a legacy completion.
DEFAULT_COMPLETION_TOKENS = 16
#: Transport failures that mean the endpoint is gone (the call may be retried elsewhere).
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)
#: Request latency buckets, seconds: from a cached short answer to a long agentic request.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
APPS_PREFIX = "/v1/apps/"
OPEN_PATHS = frozenset({"/healthz"})


class ServeError(FmtuneError):
    """The front door could not start (e.g. its port is taken)."""


# --------------------------------------------------------------------------------------------
# Configuration and request bodies
# --------------------------------------------------------------------------------------------


class ServeConfig(BaseModel):
    """How the front door listens, authenticates, bounds its load and judges its SLA."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", min_length=1, description="Interface to listen on.")
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port to listen on.")
    api_key: SecretStr | None = Field(
        default=None,
        min_length=1,
        description="Bearer key clients must send (`Authorization: Bearer KEY`) on every "
        "route but /healthz; None leaves the front door open.",
    )
    max_queue: int = Field(
        default=512,
        ge=1,
        le=1_000_000,
        description="Most LLM and app requests in flight or waiting at the front door at once; "
        "further ones are answered 429 with Retry-After (back-pressure).",
    )
    retry_after_s: int = Field(
        default=1, ge=1, le=3600, description="Retry-After seconds sent with every 429."
    )
    request_timeout_s: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="Longest a request may wait for the router plus the engine's answer (a "
        "stream: the longest gap between chunks) before it fails with 504.",
    )
    sla_e2e_s: float | None = Field(
        default=None,
        gt=0,
        description="End-to-end deadline of every request, in seconds: the router's deadline "
        "for its calls (queue order, shedding; split along the critical path for apps) and "
        "the bound of the SLA-attainment metric. None takes the deployment's "
        "provisioner.sla_p99_s.",
    )
    replace_dead: bool = Field(
        default=True,
        description="Start a replacement when a local replica dies (always done for models "
        "with replicas 'auto').",
    )
    shutdown_grace_s: float = Field(
        default=10.0,
        ge=0,
        le=600,
        description="On Ctrl-C/SIGTERM, how long open requests may finish before the "
        "connections are closed and the replicas stopped.",
    )


class StreamOptions(BaseModel):
    """OpenAI's stream_options; unknown keys are forwarded to the engine."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool = Field(
        default=False, description="Send a last chunk carrying the token usage."
    )


class ChatMessage(BaseModel):
    """One chat message; tool calls and other OpenAI keys are forwarded unchanged."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1, description="system, user, assistant, tool or developer.")
    content: str | list[dict[str, Any]] | None = Field(
        default=None, description="Text, or a list of content parts, or None (tool calls)."
    )


class _OpenAIRequest(BaseModel):
    """Fields the front door itself reads; every other OpenAI or vLLM sampling parameter is
    forwarded unchanged to the engine, which validates it and answers 400 naming it."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="A deployment model key or its served name.")
    stream: bool = Field(default=False, description="Answer as server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Stream options.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate.")


class ChatCompletionRequest(_OpenAIRequest):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Most tokens to generate (newer name of max_tokens)."
    )


class CompletionRequest(_OpenAIRequest):
    """Body of POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Prompt text, several prompts, or token ids."
    )


class AppRequest(BaseModel):
    """Body of POST /v1/apps/{name}."""

    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, Any] = Field(
        description='The app\'s request inputs by name, e.g. {"article": "..."}.'
    )


class AppResponse(BaseModel):
    """What one app request produced."""

    outputs: dict[str, Any] = Field(description="The app's answer fields (empty on failure).")
    ok: bool = Field(description="Whether every node succeeded.")
    error: str | None = Field(description="The first failing node's reason, if any.")
    e2e_s: float = Field(description="End-to-end latency, seconds.")
    llm_calls: int = Field(description="LLM calls the request made.")
    prompt_tokens: int = Field(description="Prompt tokens over all LLM calls.")
    completion_tokens: int = Field(description="Generated tokens over all LLM calls.")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ProxyError(Exception):
    """A call the front door answers with an error status instead of the engine's answer."""

    def __init__(self, status: int, code: str, message: str, *, kind: str = "server_error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.kind = kind


def openai_error(
    status: int,
    message: str,
    *,
    kind: str,
    code: str,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An error response in OpenAI's shape, which OpenAI clients turn into typed exceptions."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def status_for_router_error(error: str) -> tuple[int, str]:
    """HTTP status and error code for a failure string of the router or the executor."""
    if QUEUE_FULL_PREFIX in error:
        return 429, "queue_full"
    if SHED_PREFIX in error:
        return 503, "shed"
    if "no endpoint serves" in error or "no healthy replica" in error:
        return 503, "no_healthy_endpoint"
    if "timeout" in error:
        return 504, "timeout"
    return 502, "upstream_error"


def _describe_validation(errors: list[Any]) -> tuple[str, str | None]:
    """One line naming each rejected field (body prefix dropped) and its value, plus the first
    field's name for OpenAI's `param`."""
    parts: list[str] = []
    first: str | None = None
    for item in errors:
        loc = [str(part) for part in item.get("loc", ()) if part != "body"]
        where = ".".join(loc) or "body"
        first = first or where
        message = str(item.get("msg", "invalid value"))
        if item.get("type") == "missing":
            parts.append(f"{where}: {message}")
        else:
            parts.append(f"{where}: {message}, got {item.get('input')!r}"[:300])
    return "; ".join(parts) or "invalid request body", first


# --------------------------------------------------------------------------------------------
# Proxying through the router
# --------------------------------------------------------------------------------------------


@dataclass
class _StreamMeter:
    """Reads the SSE stream as it is relayed to time its tokens (for the router's speeds)."""

    chat: bool
    first_token_s: float | None = None
    last_token_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    complete: bool = False
    _buffer: bytes = b""

    def feed(self, chunk: bytes, now: float) -> None:
        """Fold in one received piece of the stream (may hold partial lines)."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            try:
                payload = parse_sse_line(raw.decode("utf-8", "replace").strip())
            except ValueError:
                continue
            if payload is not None:
                self._payload(payload, now)

    def _payload(self, payload: dict[str, Any], now: float) -> None:
        usage = payload.get("usage")
        if isinstance(usage, dict) and usage.get("prompt_tokens") is not None:
            self.prompt_tokens = int(usage["prompt_tokens"])
        for choice in payload.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if not text:
                continue
            if self.first_token_s is None:
                self.first_token_s = now
            elif self.last_token_s is not None:
                self.gaps_s.append(now - self.last_token_s)
            self.last_token_s = now


@dataclass
class Upstream:
    """An open engine response for one routed call, and the bookkeeping it must undo."""

    endpoint: Endpoint
    response: httpx.Response
    demand: CallDemand
    start_s: float
    running_at_start: int
    first_token: FirstToken
    meter: _StreamMeter | None = None
    closed: bool = False


class RouterProxy:
    """Routes raw OpenAI calls through a Router's endpoints, keeping the router's books.

    It applies what `Router.chat` applies (SLA-aware shedding, the least-slack-first queue
    while every replica is full, the policy's pick, outstanding counters, taking a dead
    endpoint out of rotation and retrying on another) but hands back the engine's open HTTP
    response instead of a finished CallRecord, so the front door can relay a stream token by
    token and pass the engine's JSON through unchanged. It uses the Router's internals; see
    the module docstring of runtime.routing.router for their meaning.
    """

    def __init__(self, router: Router, timeout_s: float) -> None:
        self.router = router
        self.timeout = httpx.Timeout(timeout_s, connect=10.0)

    async def open(
        self, path: str, body: dict[str, Any], model_key: str, demand: CallDemand
    ) -> Upstream:
        """Admit the call, pick an endpoint and send it there; ProxyError if none answers."""
        await self._admit(model_key, demand)
        router = self.router
        tried: set[str] = set()
        while True:
            endpoint = self._pick(model_key, demand, tried)
            start = time.monotonic()
            running = max(endpoint.num_running, endpoint.outstanding)
            http = _http_of(endpoint)
            request = http.build_request(
                "POST", path, json={**body, "model": endpoint.served_model}, timeout=self.timeout
            )
            try:
                response = await http.send(request, stream=True)
            except CONNECTION_ERRORS as error:
                self._release(endpoint, demand)
                if router.retry_elsewhere(model_key, endpoint, tried, f"connection: {error!r}"):
                    logger.info(
                        "retrying a call of %s: %s is unreachable", model_key, endpoint.endpoint_id
                    )
                    continue
                why = (
                    "the call was already retried once"
                    if len(tried) > 1
                    else "no other healthy endpoint serves it"
                )
                raise ProxyError(
                    503,
                    "upstream_unavailable",
                    f"endpoint '{endpoint.endpoint_id}' of model '{model_key}' is unreachable "
                    f"({error!r}) and {why}",
                ) from None
            except httpx.TimeoutException:
                self._release(endpoint, demand)
                raise ProxyError(
                    504, "timeout", f"endpoint '{endpoint.endpoint_id}' did not answer in time"
                ) from None
            except BaseException:
                self._release(endpoint, demand)
                raise
            first_token = FirstToken(router, endpoint, demand)
            return Upstream(endpoint, response, demand, start, running, first_token)

    async def close(self, upstream: Upstream) -> None:
        """Close the engine response and undo the call's bookkeeping (idempotent)."""
        if upstream.closed:
            return
        upstream.closed = True
        self.router.release(upstream.endpoint, upstream.demand, prefilled=upstream.first_token.seen)
        meter = upstream.meter
        if meter is not None and meter.complete and meter.first_token_s is not None:
            self.router.observe(
                upstream.endpoint,
                meter.first_token_s - upstream.start_s,
                meter.prompt_tokens or upstream.demand.prompt_tokens,
                meter.gaps_s,
                upstream.running_at_start,
            )
        with anyio.CancelScope(shield=True):
            await upstream.response.aclose()

    def mark_dead(self, endpoint: Endpoint, error: Exception) -> None:
        """Take an endpoint whose connection broke out of rotation."""
        self.router.mark_unhealthy(endpoint, f"connection: {error!r}")

    async def _admit(self, model_key: str, demand: CallDemand) -> None:
        """The router's admission (shedding, least-slack queue) as HTTP errors."""
        try:
            await self.router.admit(model_key, demand)
        except Rejected as rejected:
            raise _proxy_error(rejected) from None

    def _pick(self, model_key: str, demand: CallDemand, tried: set[str]) -> Endpoint:
        try:
            return self.router.pick(model_key, demand, tried)
        except Rejected as rejected:
            raise _proxy_error(rejected) from None

    def _release(self, endpoint: Endpoint, demand: CallDemand) -> None:
        self.router.release(endpoint, demand)


def _proxy_error(rejected: Rejected) -> ProxyError:
    """The HTTP answer to a call the router rejected."""
    if rejected.kind == "queue_full":
        return ProxyError(429, "queue_full", str(rejected), kind="rate_limit_error")
    if rejected.kind == "shed":
        return ProxyError(503, "shed", str(rejected))
    return ProxyError(503, "no_healthy_endpoint", str(rejected))


def _http_of(endpoint: Endpoint) -> httpx.AsyncClient:
    """The endpoint's connection pool (its EngineClient's, so the same transport, headers and
    limits serve the router's own calls and the proxied ones)."""
    assert endpoint.client is not None, f"endpoint {endpoint.endpoint_id} has no client"
    return endpoint.client.http


class _RelayResponse(StreamingResponse):
    """A streamed engine response whose upstream is closed however the relay ends (finished,
    client gone, cancelled): Starlette does not close an interrupted body iterator."""

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


# --------------------------------------------------------------------------------------------
# Metrics and the front-door middleware
# --------------------------------------------------------------------------------------------


@dataclass
class _FrontDoorState:
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
        state: _FrontDoorState,
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
class _Metrics:
    """The app's Prometheus registry and the metrics updated as requests happen."""

    registry: CollectorRegistry
    latency: Histogram
    requests: Counter
    rejected: Counter
    endpoint_failures: Counter


def _metrics(
    router: Router,
    deployment: Deployment,
    state: _FrontDoorState,
    autoscalers: Mapping[str, Autoscaler],
) -> _Metrics:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_StateCollector(router, deployment, state, autoscalers))
    return _Metrics(
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


def _limited(scope: Scope) -> bool:
    """Whether a request counts against max_queue (the routes that reach the engines)."""
    path = scope["path"]
    return scope["method"] == "POST" and (
        path in (CHAT_PATH, COMPLETIONS_PATH) or path.startswith(APPS_PREFIX)
    )


def _route_label(scope: Scope) -> str:
    """The route template (bounded label values), or 'unmatched'."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if scope["path"].startswith(APPS_PREFIX):
        return APPS_PREFIX + "{name}"
    return scope["path"] if scope["path"] in (CHAT_PATH, COMPLETIONS_PATH) else "unmatched"


class _FrontDoor:
    """ASGI middleware: API key, the bounded front door, latency and SLA accounting.

    It wraps the whole response, so a stream counts as in flight (and its latency runs) until
    its last chunk is sent or the client goes away.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: ServeConfig,
        sla_s: float,
        state: _FrontDoorState,
        metrics: _Metrics,
        on_outcome: Callable[[bool], None] | None = None,
    ) -> None:
        self.app = app
        self.on_outcome = on_outcome
        self.config = config
        self.sla_s = sla_s
        self.state = state
        self.metrics = metrics
        key = config.api_key.get_secret_value() if config.api_key else None
        self._expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._expected is not None and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                response = openai_error(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <api_key>'",
                    kind="invalid_request_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        limited = _limited(scope)
        state = self.state
        if limited and state.in_flight >= self.config.max_queue:
            self.metrics.rejected.labels("front_door").inc()
            self.metrics.requests.labels(_route_label(scope), "429").inc()
            response = openai_error(
                429,
                f"front door full: {state.in_flight} requests in flight or waiting "
                f"(max_queue={self.config.max_queue}); retry after {self.config.retry_after_s}s",
                kind="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
            await response(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        start = time.monotonic()
        if limited:
            state.in_flight += 1
        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.monotonic() - start
            route = _route_label(scope)
            self.metrics.latency.labels(route).observe(elapsed)
            self.metrics.requests.labels(route, str(status)).inc()
            if limited:
                state.in_flight -= 1
                if status < 400 or status == 429 or status >= 500:
                    met_sla = status < 400 and elapsed <= self.sla_s
                    state.finished += 1
                    state.within_sla += int(met_sla)
                    if self.on_outcome is not None:
                        self.on_outcome(met_sla)


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    """The text of a message content or prompt, for a token estimate."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "") if isinstance(part, dict) else str(part) for part in content
        )
    return ""


def _model_names(deployment: Deployment) -> dict[str, str]:
    """Every name a client may send as `model` -> the model key it means (keys win; a served
    name shared by several keys means the first in the deployment)."""
    names: dict[str, str] = {}
    for key, model in deployment.models.items():
        names.setdefault(model.engine.model, key)
    names.update({key: key for key in deployment.models})
    return names


def _build_apps(deployment: Deployment) -> dict[str, tuple[App, dict[str, str]]]:
    """Each deployment app, built once, with the model-key map its LLM nodes call through."""
    apps: dict[str, tuple[App, dict[str, str]]] = {}
    for name, spec in deployment.apps.items():
        app = spec.build()
        models = spec.model_keys()
        app.validate_against(set(models))
        apps[name] = (app, models)
    return apps


def create_app(
    router: Router,
    deployment: Deployment,
    config: ServeConfig,
    *,
    on_replica_dead: Callable[[Endpoint], None] | None = None,
    autoscalers: Mapping[str, Autoscaler] | None = None,
) -> FastAPI:
    """The front door of a deployment over a router the caller has entered.

    It chains onto `router.on_unhealthy` to count failed endpoints and to call
    on_replica_dead(endpoint) (on the event loop; must not block) for every endpoint taken
    out of rotation, so the caller can start a replacement. Every finished LLM or app request
    is recorded with `router.record_outcome` (the autoscalers' SLA attainment); /metrics shows
    the `autoscalers` (by model key) replica counts and decisions.
    """
    sla_s = config.sla_e2e_s or deployment.provisioner.sla_p99_s
    names = _model_names(deployment)
    apps = _build_apps(deployment)
    proxy = RouterProxy(router, config.request_timeout_s)
    state = _FrontDoorState()
    metrics = _metrics(router, deployment, state, autoscalers or {})

    previous = router.on_unhealthy

    def on_unhealthy(endpoint: Endpoint) -> None:
        metrics.endpoint_failures.labels(endpoint.model_key).inc()
        if previous is not None:
            previous(endpoint)
        if on_replica_dead is not None:
            on_replica_dead(endpoint)

    router.on_unhealthy = on_unhealthy

    app = FastAPI(
        title="fmtune",
        summary="OpenAI-compatible front door of an fmtune deployment.",
        version="0.1.0",
    )
    app.add_middleware(
        _FrontDoor,
        config=config,
        sla_s=sla_s,
        state=state,
        metrics=metrics,
        on_outcome=router.record_outcome,
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(list(error.errors()))
        return openai_error(
            422, message, kind="invalid_request_error", code="invalid_value", param=param
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return openai_error(
            error.status_code,
            str(error.detail),
            kind="invalid_request_error",
            code=str(error.status_code),
            headers=error.headers,
        )

    @app.exception_handler(ProxyError)
    async def _proxy_error(_: Request, error: ProxyError) -> JSONResponse:
        headers: dict[str, str] = {}
        if error.status == 429:
            metrics.rejected.labels("router_queue").inc()
            headers["Retry-After"] = str(config.retry_after_s)
        return openai_error(
            error.status, error.message, kind=error.kind, code=error.code, headers=headers
        )

    def resolve(model: str) -> str:
        key = names.get(model)
        if key is None:
            raise ProxyError(
                404,
                "model_not_found",
                f"model '{model}' is not served here; use one of {sorted(names)}",
                kind="invalid_request_error",
            )
        return key

    async def forward(path: str, body: _OpenAIRequest, prompt: str, max_tokens: int) -> Response:
        key = resolve(body.model)
        chat = path == CHAT_PATH
        payload = body.model_dump(mode="json", exclude_unset=True)
        with call_deadline(router.clock() + sla_s):
            demand = router.demand(key, [{"content": prompt}], max_tokens)
        try:
            async with asyncio.timeout(config.request_timeout_s):
                upstream = await proxy.open(path, payload, key, demand)
        except TimeoutError:
            raise ProxyError(
                504, "timeout", f"no answer within request_timeout_s={config.request_timeout_s}"
            ) from None
        response = upstream.response
        if response.status_code >= 400 or not body.stream:
            try:
                content = await response.aread()
            except httpx.HTTPError as error:
                if isinstance(error, CONNECTION_ERRORS):
                    proxy.mark_dead(upstream.endpoint, error)
                raise ProxyError(
                    502, "upstream_error", f"endpoint '{upstream.endpoint.endpoint_id}': {error!r}"
                ) from None
            finally:
                await proxy.close(upstream)
            if response.status_code >= 500:
                raise ProxyError(
                    502,
                    "upstream_error",
                    f"endpoint '{upstream.endpoint.endpoint_id}' answered HTTP "
                    f"{response.status_code}: {content.decode('utf-8', 'replace')[:300]}",
                )
            return Response(
                content,
                status_code=response.status_code,
                media_type=response.headers.get("content-type", "application/json"),
            )
        upstream.meter = _StreamMeter(chat=chat)
        return _RelayResponse(_relay(proxy, upstream), lambda: proxy.close(upstream))

    @app.post(CHAT_PATH)
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        """OpenAI chat completions, routed and proxied (streamed or not)."""
        prompt = " ".join(_text_of(message.content) for message in body.messages)
        expected = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_TOKENS
        return await forward(CHAT_PATH, body, prompt, expected)

    @app.post(COMPLETIONS_PATH)
    async def completions(body: CompletionRequest) -> Response:
        """OpenAI (legacy) completions, routed and proxied (streamed or not)."""
        prompt = body.prompt
        text = prompt if isinstance(prompt, str) else " ".join(str(p) for p in prompt)
        return await forward(
            COMPLETIONS_PATH, body, text, body.max_tokens or DEFAULT_COMPLETION_TOKENS
        )

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The model keys and served model names a client may send as `model`."""
        created = int(time.time())
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "fmtune",
                "root": deployment.models[key].engine.model,
                "parent": None if name == key else key,
            }
            for name, key in sorted(names.items())
        ]
        return {"object": "list", "data": data}

    @app.post(APPS_PREFIX + "{name}", response_model=AppResponse)
    async def run_app(name: str, body: AppRequest) -> AppResponse | JSONResponse:
        """Run one request of a deployment app through its DAG on the router.

        200 when every node succeeded; otherwise the same body with ok=false and the status
        of the first failure: 429 (router queue full), 503 (shed, no healthy endpoint), 504
        (timeout) or 502 (an engine, API or code node failed).
        """
        if name not in apps:
            raise ProxyError(
                404,
                "app_not_found",
                f"app '{name}' is not in this deployment; apps: {sorted(apps)}",
                kind="invalid_request_error",
            )
        dag, models = apps[name]
        missing = [field for field in dag.inputs if field not in body.inputs]
        if missing:
            return openai_error(
                422,
                f"inputs.{missing[0]}: Field required (app '{name}' takes {list(dag.inputs)})",
                kind="invalid_request_error",
                code="invalid_value",
                param=f"inputs.{missing[0]}",
            )
        down = sorted(key for key in set(models.values()) if not router.healthy(key))
        if down:  # fail fast: the router would hold the calls until an endpoint comes back
            raise ProxyError(
                503, "no_healthy_endpoint", f"no healthy endpoint serves model '{down[0]}'"
            )
        try:
            async with asyncio.timeout(config.request_timeout_s):
                result = await run_request(dag, body.inputs, router, models, sla_e2e_s=sla_s)
        except TimeoutError:
            raise ProxyError(
                504,
                "timeout",
                f"app '{name}' took longer than request_timeout_s={config.request_timeout_s}",
            ) from None
        calls = [s for s in result.spans if s.kind == "llm" and not s.skipped]
        answer = AppResponse(
            outputs=result.outputs,
            ok=result.ok,
            error=result.error,
            e2e_s=result.e2e_s,
            llm_calls=len(calls),
            prompt_tokens=sum(s.prompt_tokens for s in calls),
            completion_tokens=sum(s.completion_tokens for s in calls),
        )
        if result.error is None:
            return answer
        status, _ = status_for_router_error(result.error)
        headers = {"Retry-After": str(config.retry_after_s)} if status == 429 else {}
        if status == 429:
            metrics.rejected.labels("router_queue").inc()
        return JSONResponse(answer.model_dump(), status_code=status, headers=headers)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 when every model key has a healthy endpoint, else 503; lists each endpoint."""
        per_key = {
            key: sum(e.healthy for e in router.endpoints if e.model_key == key)
            for key in deployment.models
        }
        ok = all(per_key.values())
        body = {
            "status": "ok" if ok else "unhealthy",
            "healthy_endpoints": sum(per_key.values()),
            "models": per_key,
            "endpoints": {e.endpoint_id: e.healthy for e in router.endpoints},
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus exposition text of this front door."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _relay(proxy: RouterProxy, upstream: Upstream) -> AsyncIterator[bytes]:
    """The engine's stream, byte for byte; a break mid-stream ends it with an error event."""
    meter = upstream.meter
    try:
        async for chunk in upstream.response.aiter_bytes():
            if meter is not None:
                meter.feed(chunk, time.monotonic())
                if meter.first_token_s is not None:
                    upstream.first_token()
            yield chunk
    except httpx.HTTPError as error:
        if isinstance(error, CONNECTION_ERRORS):
            proxy.mark_dead(upstream.endpoint, error)
        logger.warning("stream from %s broke: %r", upstream.endpoint.endpoint_id, error)
        message = f"stream from endpoint '{upstream.endpoint.endpoint_id}' broke: {error!r}"
        body = openai_error(502, message, kind="server_error", code="upstream_error").body
        yield b"data: " + bytes(body) + b"\n\n"
        return
    if meter is not None:
        meter.complete = True


# --------------------------------------------------------------------------------------------
# serve(): replicas, uvicorn, signals
# --------------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: serve() owns SIGINT/SIGTERM so that stopping
    always runs the cleanup (uvicorn re-raises a captured SIGTERM, which would kill the
    process before the replicas are stopped)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave the process's signal handlers alone."""
        yield


class _ShutdownSignals:
    """SIGINT/SIGTERM while serving: first a graceful stop, a second one forces it; before the
    server runs, KeyboardInterrupt (unwinding through serve's cleanup)."""

    def __init__(self) -> None:
        self.server: uvicorn.Server | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler (runs in the main thread)."""
        server = self.server
        if server is None:
            raise KeyboardInterrupt
        if server.should_exit:
            logger.warning("second %s: closing open connections now", signal.Signals(signum).name)
            server.force_exit = True
        else:
            logger.info("%s: stopping the front door", signal.Signals(signum).name)
            server.should_exit = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT and SIGTERM inside the block (main thread only), then restore."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class ReplicaReplacer:
    """Starts a replacement for a dead local replica and swaps it into the router.

    Called on the event loop when the router takes an endpoint out of rotation; the slow part
    (a cold start) runs in a thread, one replacement at a time, so serving goes on meanwhile.
    """

    def __init__(
        self,
        router: Router,
        deployment: Deployment,
        pool: ReplicaPool,
        loop: asyncio.AbstractEventLoop,
        replace_dead: bool,
    ) -> None:
        self.router = router
        self.deployment = deployment
        self.pool = pool
        self.loop = loop
        self.replace_dead = replace_dead
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def __call__(self, endpoint: Endpoint) -> None:
        """Schedule a replacement if the endpoint is a local replica that should be replaced."""
        if endpoint.replica is None:
            return
        model = self.deployment.models.get(endpoint.model_key)
        if model is None or not (model.replicas == "auto" or self.replace_dead):
            return
        wanted = sum(1 for e in self.router.endpoints if e.model_key == endpoint.model_key)
        thread = threading.Thread(
            target=self._replace,
            args=(endpoint, wanted),
            name=f"replace-{endpoint.endpoint_id}",
            daemon=True,
        )
        self.threads.append(thread)
        thread.start()

    def _replace(self, dead: Endpoint, wanted: int) -> None:
        key = dead.model_key
        engine = self.deployment.models[key].engine
        with self._lock:
            try:
                assert dead.replica is not None
                self.pool.release(dead.replica)
                replicas = self.pool.acquire(engine, count=wanted)
            except Exception:
                logger.exception("could not replace dead endpoint %s", dead.endpoint_id)
                return
            known = {id(e.replica) for e in list(self.router.endpoints) if e.replica}
            fresh = endpoints_for_replicas(key, [r for r in replicas if id(r) not in known])
            try:
                swap = asyncio.run_coroutine_threadsafe(self._swap(dead, fresh), self.loop)
                swap.result(timeout=30)
            except (RuntimeError, TimeoutError) as error:
                logger.warning("replacement of %s not swapped in: %r", dead.endpoint_id, error)
                return
            logger.info("replaced %s with %s", dead.endpoint_id, [e.endpoint_id for e in fresh])

    async def _swap(self, dead: Endpoint, fresh: list[Endpoint]) -> None:
        await self.router.remove_endpoint(dead)
        for endpoint in fresh:
            self.router.add_endpoint(endpoint)


async def _serve_async(
    deployment: Deployment,
    config: ServeConfig,
    endpoints: list[Endpoint],
    pool: ReplicaPool | None,
    signals: _ShutdownSignals,
) -> None:
    sla_s = config.sla_e2e_s or deployment.provisioner.sla_p99_s
    router = Router(endpoints, deployment.router, default_deadline_s=sla_s)
    replacer = None
    if pool is not None:
        replacer = ReplicaReplacer(
            router, deployment, pool, asyncio.get_running_loop(), config.replace_dead
        )
    autoscalers = autoscalers_for(deployment, router, pool)
    async with router:
        app = create_app(
            router, deployment, config, on_replica_dead=replacer, autoscalers=autoscalers
        )
        for scaler in autoscalers.values():
            scaler.start()
        server = _Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_config=None,
                timeout_graceful_shutdown=config.shutdown_grace_s,
            )
        )
        signals.server = server
        try:
            await server.serve()
        except SystemExit:
            raise ServeError(
                f"could not listen on {config.host}:{config.port} (see the log above)"
            ) from None
        finally:
            signals.server = None
            for scaler in autoscalers.values():
                await scaler.aclose()


def serve(
    deployment_path: str | Path, config: ServeConfig, *, pool: ReplicaPool | None = None
) -> None:
    """Serve a DEPLOY.yaml until Ctrl-C or SIGTERM (blocking; the CLI's `fmtune serve`).

    With cluster 'local' its replicas start in `pool` (a new pool with default limits if
    None), models with replicas 'auto' sized first (runtime.scaling.autoscaler.size_deployment, with
    a calibration on the deployment's apps) and then scaled by an Autoscaler each; with
    cluster 'endpoints' nothing is started. Whatever stops the server (a signal,
    an error, a failed start), the pool is closed on the way out, so no replica outlives it.
    """
    deployment = load_deployment(Path(deployment_path))
    signals = _ShutdownSignals()
    with signals.installed():
        if pool is None and deployment.cluster == "local":
            pool = ReplicaPool()
        try:
            sized, _ = size_deployment(deployment, pool)
            endpoints = start_endpoints(sized, pool)
            logger.info(
                "serving %s on http://%s:%d with %d endpoints",
                deployment_path,
                config.host,
                config.port,
                len(endpoints),
            )
            asyncio.run(_serve_async(deployment, config, endpoints, pool, signals))
        except KeyboardInterrupt:
            logger.info("interrupted; stopping")
        finally:
            if pool is not None:
                pool.close()
