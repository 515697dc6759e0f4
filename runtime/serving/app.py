"""The FastAPI app of `fmtune serve`, the OpenAI-compatible front door of a deployment.

Standard OpenAI clients, and tools written for vLLM (GuideLLM, `vllm bench serve`, health
checks of vLLM deployments), talk to a deployment as if it were one vLLM server; wherever
vLLM has a convention (a route's name, an error's status), the front door follows it:

- `POST /v1/chat/completions`, `POST /v1/completions`: the body's `model` is a deployment model
  key or the served model name of one; the call goes through the router (its policy, queue,
  shedding and retry on a dead replica) and is proxied to the endpoint it picks
  (runtime.serving.proxy), streamed responses relayed chunk by chunk.
- `GET /v1/models`: the model keys and served names.
- `POST /v1/apps/{name}`: runs one request of a deployment application through its DAG.
- `GET /health` (vLLM's name) and `GET /healthz`: 200 when every model key has a healthy
  endpoint, else 503; `GET /version`: `{"version": ...}` like vLLM's. These three are never
  behind the API key.
- `GET /metrics`: Prometheus text, per app and per model key, one registry per app so several
  apps in one process do not collide (runtime.serving.metrics).

The front-door middleware refuses a body over `max_body_bytes` with 413 before reading it
whole, and admits at most `max_queue` LLM requests at a time (in flight or waiting for the
router); beyond that it answers 429 with Retry-After, so overload turns into back-pressure
instead of unbounded memory and latency. Errors use OpenAI's shape (runtime.serving.errors):
400 for a body that is not JSON, 413 for one too large, 422 naming the field for a schema
error, 429 with Retry-After for a full queue or a call the router sheds (shed before it
reaches an engine), 5xx for what fails on fmtune's or an engine's side (an engine's own 4xx
answer to a proxied call is passed through as it is).

`create_app` is free of process management (tests give it fake endpoints); runtime.serving.server
starts the replicas and runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.app.dag import App
from runtime.app.executor import run_request
from runtime.deployment import Deployment
from runtime.engine.client import call_deadline
from runtime.errors import ConfigError
from runtime.routing.router import Endpoint, Router
from runtime.scaling.autoscaler import Autoscaler
from runtime.serving.config import ServeConfig
from runtime.serving.errors import (
    ProxyError,
    describe_unreadable_body,
    describe_validation,
    openai_error,
    rejection_reason,
    status_for_failure,
)
from runtime.serving.metrics import FrontDoorState, Metrics, RequestRecord, create_metrics
from runtime.serving.proxy import (
    CONNECTION_ERRORS,
    RelayResponse,
    RouterProxy,
    StreamMeter,
    relay,
)
from runtime.serving.schemas import (
    DEFAULT_CHAT_TOKENS,
    DEFAULT_COMPLETION_TOKENS,
    AppRequest,
    AppResponse,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
)

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
APPS_PREFIX = "/v1/apps/"
#: Routes answered without the API key: the health checks and the version, as vLLM's are
#: (load balancers and orchestrators probe them without credentials).
OPEN_PATHS = frozenset({"/health", "/healthz", "/version"})
#: Where the middleware keeps the request's RequestRecord in the ASGI scope's state (what
#: Starlette's `request.state` reads).
RECORD_KEY = "fmtune_request"
#: Status recorded for a request whose client went away while sending its body (nginx's
#: "client closed request"; no response is sent).
CLIENT_CLOSED = 499


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


def request_record(request: Request) -> RequestRecord:
    """The RequestRecord the middleware made for this request (a detached one if the app
    runs without the middleware)."""
    record = getattr(request.state, RECORD_KEY, None)
    if isinstance(record, RequestRecord):
        return record
    record = RequestRecord(start_s=time.monotonic())
    setattr(request.state, RECORD_KEY, record)
    return record


def _content_length(scope: Scope) -> int | None:
    """The request's declared Content-Length, if it has a valid one."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class _BodyTooLarge(Exception):
    """The body being received grew past max_body_bytes."""

    def __init__(self, received: int) -> None:
        super().__init__(received)
        self.received = received


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, read as it streams in but never past `limit` bytes
    (_BodyTooLarge as soon as it grows past); None if the client went away first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge(size)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the client's own messages
    (a streaming response listens there for the client going away)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _FrontDoor:
    """ASGI middleware: API key, body size limit, the bounded front door, latency and SLA
    accounting.

    It wraps the whole response, so a stream counts as in flight (and its latency runs) until
    its last chunk is sent or the client goes away. It reads the request body itself, up to
    max_body_bytes, before any route sees it: a body declared larger is refused from its
    Content-Length without being read, and one sent without a length is refused as soon as it
    grows past the limit, so neither is buffered whole nor forwarded to an engine.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: ServeConfig,
        sla_s: float,
        state: FrontDoorState,
        metrics: Metrics,
        app_names: frozenset[str] = frozenset(),
        on_outcome: Callable[[bool], None] | None = None,
    ) -> None:
        self.app = app
        self.on_outcome = on_outcome
        self.config = config
        self.sla_s = sla_s
        self.state = state
        self.metrics = metrics
        self.app_names = app_names
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
        record = RequestRecord(start_s=time.monotonic(), app=self._app_of(scope))
        scope.setdefault("state", {})[RECORD_KEY] = record
        limit = self.config.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, record, self._too_large(declared, limit))
            return
        limited = _limited(scope)
        state = self.state
        if limited and state.in_flight >= self.config.max_queue:
            self.metrics.rejected.labels("front_door").inc()
            response = openai_error(
                429,
                f"front door full: {state.in_flight} requests in flight or waiting "
                f"(max_queue={self.config.max_queue}); retry after {self.config.retry_after_s}s",
                kind="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
            await self._refuse(scope, receive, send, record, response)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        if limited:
            state.in_flight += 1
        try:
            try:
                body = await _read_body(receive, limit)
            except _BodyTooLarge as error:
                response = self._too_large(error.received, limit, streamed=True)
                await response(scope, receive, send_status)
                return
            if body is None:
                status = CLIENT_CLOSED
                return
            await self.app(scope, _replay(body, receive), send_status)
        finally:
            elapsed = time.monotonic() - record.start_s
            self._count(scope, record, status, elapsed)
            if limited:
                state.in_flight -= 1
                if status < 400 or status == 429 or status >= 500:
                    met_sla = status < 400 and elapsed <= self.sla_s
                    state.record_outcome(record.labels, met_sla)
                    if self.on_outcome is not None:
                        self.on_outcome(met_sla)

    def _app_of(self, scope: Scope) -> str:
        """The deployment app a /v1/apps/{name} request names ('' otherwise or if unknown)."""
        path = scope["path"]
        if scope["method"] == "POST" and path.startswith(APPS_PREFIX):
            name = path[len(APPS_PREFIX) :]
            return name if name in self.app_names else ""
        return ""

    def _count(self, scope: Scope, record: RequestRecord, status: int, elapsed: float) -> None:
        """Record one answered request's latency and status."""
        route = _route_label(scope)
        self.metrics.latency.labels(route, *record.labels).observe(elapsed)
        self.metrics.requests.labels(route, str(status), *record.labels).inc()

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: RequestRecord,
        response: Response,
    ) -> None:
        """Answer without reading the body or reaching a route, and count the answer."""
        await response(scope, receive, send)
        self._count(scope, record, response.status_code, time.monotonic() - record.start_s)

    @staticmethod
    def _too_large(size: int, limit: int, *, streamed: bool = False) -> Response:
        """The 413 answer to a body over the limit.

        The rest of the body never reaches the app: the HTTP server drops it as it arrives.
        The connection is not closed at once on purpose: a client still sending (httpx,
        requests) only reads the answer once its upload ends, and a close with its data
        unread resets the connection, which can destroy the 413 before the client reads it.
        """
        what = f"more than {limit} bytes received" if streamed else f"{size} bytes declared"
        return openai_error(
            413,
            f"request body too large: {what}, over max_body_bytes={limit}",
            kind="invalid_request_error",
            code="request_too_large",
        )


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


def fmtune_version() -> str:
    """The installed fmtune's version (what /version answers, as vLLM's /version does)."""
    try:
        return importlib.metadata.version("fmtune")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "0+unknown"


def build_apps(deployment: Deployment) -> dict[str, tuple[App, dict[str, str]]]:
    """Each deployment app, built once, with the model-key map its LLM nodes call through;
    ConfigError naming `apps.<name>` if one cannot be built."""
    apps: dict[str, tuple[App, dict[str, str]]] = {}
    for name, spec in deployment.apps.items():
        try:
            app = spec.build()
            models = spec.model_keys()
            app.validate_against(set(models))
        except ValueError as error:  # ConfigError included
            raise ConfigError(f"apps.{name}: {error}") from None
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
    apps = build_apps(deployment)
    proxy = RouterProxy(router, config.request_timeout_s)
    state = FrontDoorState()
    metrics = create_metrics(router, deployment, state, autoscalers or {})

    previous = router.on_unhealthy

    def on_unhealthy(endpoint: Endpoint) -> None:
        metrics.endpoint_failures.labels(endpoint.model_key).inc()
        if previous is not None:
            previous(endpoint)
        if on_replica_dead is not None:
            on_replica_dead(endpoint)

    router.on_unhealthy = on_unhealthy

    version = fmtune_version()
    app = FastAPI(
        title="fmtune",
        summary="OpenAI-compatible front door of an fmtune deployment.",
        version=version,
    )
    app.add_middleware(
        _FrontDoor,
        config=config,
        sla_s=sla_s,
        state=state,
        metrics=metrics,
        app_names=frozenset(apps),
        on_outcome=router.record_outcome,
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = list(error.errors())
        unreadable = describe_unreadable_body(
            errors, error.body, request.headers.get("content-type")
        )
        if unreadable is not None:  # not a JSON object at all: the request is malformed
            code, message = unreadable
            return openai_error(400, message, kind="invalid_request_error", code=code)
        message, param = describe_validation(errors)
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
            metrics.rejected.labels(rejection_reason(error.code)).inc()
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

    async def forward(
        request: Request, path: str, body: OpenAIRequest, prompt: str, max_tokens: int
    ) -> Response:
        record = request_record(request)
        key = resolve(body.model)
        record.model_key = key
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
                    proxy.connection_broke(upstream.endpoint, error)
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
        meter = upstream.meter = StreamMeter(chat=chat)

        async def finish() -> None:
            await proxy.close(upstream)
            if meter.first_token_s is not None:
                metrics.ttft.labels("", key).observe(meter.first_token_s - record.start_s)

        return RelayResponse(relay(proxy, upstream), finish)

    @app.post(CHAT_PATH)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        """OpenAI chat completions, routed and proxied (streamed or not)."""
        prompt = " ".join(_text_of(message.content) for message in body.messages)
        expected = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_TOKENS
        return await forward(request, CHAT_PATH, body, prompt, expected)

    @app.post(COMPLETIONS_PATH)
    async def completions(request: Request, body: CompletionRequest) -> Response:
        """OpenAI (legacy) completions, routed and proxied (streamed or not)."""
        prompt = body.prompt
        text = prompt if isinstance(prompt, str) else " ".join(str(p) for p in prompt)
        return await forward(
            request, COMPLETIONS_PATH, body, text, body.max_tokens or DEFAULT_COMPLETION_TOKENS
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
        of the first failure: 429 with Retry-After (router queue full, or shed by admission
        control before any call of it reached an engine), 503 (no healthy endpoint), 504
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
        for span in calls:
            if span.ttft_s is not None:
                node = dag.node_map[span.node_id]
                called = models.get(getattr(node, "model", ""), "")
                metrics.ttft.labels(name, called).observe(span.ttft_s)
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
        status, code = status_for_failure(result.failure)
        headers = {"Retry-After": str(config.retry_after_s)} if status == 429 else {}
        if status == 429:
            metrics.rejected.labels(rejection_reason(code)).inc()
        return JSONResponse(answer.model_dump(), status_code=status, headers=headers)

    @app.get("/health")
    @app.get("/healthz")
    async def health() -> JSONResponse:
        """200 when every model key has a healthy endpoint, else 503; lists each endpoint.

        /health is vLLM's name for it (what health checks copied from vLLM deployments
        probe, and what GuideLLM checks before a benchmark); /healthz the Kubernetes-style one.
        """
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

    @app.get("/version")
    async def version_info() -> dict[str, str]:
        """The fmtune version serving, in vLLM's /version shape."""
        return {"version": version}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus exposition text of this front door."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
