"""The FastAPI app of `fmtune serve`, the OpenAI-compatible front door of a deployment.

Standard OpenAI clients talk to a deployment as if it were one vLLM server:

- `POST /v1/chat/completions`, `POST /v1/completions`: the body's `model` is a deployment model
  key or the served model name of one; the call goes through the router (its policy, queue,
  shedding and retry on a dead replica) and is proxied to the endpoint it picks
  (runtime.serving.proxy), streamed responses relayed chunk by chunk.
- `GET /v1/models`: the model keys and served names.
- `POST /v1/apps/{name}`: runs one request of a deployment application through its DAG.
- `GET /healthz` (never behind the API key) and `GET /metrics` (Prometheus text, one registry
  per app so several apps in one process do not collide; runtime.serving.metrics).

The front-door middleware admits at most `max_queue` LLM requests at a time (in flight or
waiting for the router); beyond that it answers 429 with Retry-After, so overload turns into
back-pressure instead of unbounded memory and latency. Errors use OpenAI's shape
(runtime.serving.errors).

`create_app` is free of process management (tests give it fake endpoints); runtime.serving.server
starts the replicas and runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
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
from runtime.routing.router import Endpoint, Router
from runtime.scaling.autoscaler import Autoscaler
from runtime.serving.config import ServeConfig
from runtime.serving.errors import (
    ProxyError,
    describe_validation,
    openai_error,
    status_for_failure,
)
from runtime.serving.metrics import FrontDoorState, Metrics, create_metrics
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
OPEN_PATHS = frozenset({"/healthz"})


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
        state: FrontDoorState,
        metrics: Metrics,
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
        message, param = describe_validation(list(error.errors()))
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

    async def forward(path: str, body: OpenAIRequest, prompt: str, max_tokens: int) -> Response:
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
        upstream.meter = StreamMeter(chat=chat)
        return RelayResponse(relay(proxy, upstream), lambda: proxy.close(upstream))

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
        status, _ = status_for_failure(result.failure)
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
