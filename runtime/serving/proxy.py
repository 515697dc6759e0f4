"""The streaming proxy of the front door: raw OpenAI calls through a live Router.

`RouterProxy` applies the router's admission, pick, retry and bookkeeping to a call but hands
back the engine's open HTTP response, so the front door can pass the engine's JSON through
unchanged or relay a stream chunk by chunk as the engine produces it (clients see the real
time-to-first-token). While relaying, `StreamMeter` times the stream's tokens to teach the
router each replica's speed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from runtime.engine.client import parse_sse_line
from runtime.routing.policies import CallDemand
from runtime.routing.router import Endpoint, FirstToken, Rejected, Router
from runtime.serving.errors import ProxyError, openai_error, status_for_failure

logger = logging.getLogger(__name__)

#: Transport failures that mean the endpoint is gone (the call may be retried elsewhere).
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)


@dataclass
class StreamMeter:
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
    meter: StreamMeter | None = None
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
        meter = upstream.meter
        if meter is not None and meter.complete and meter.first_token_s is not None:
            self.router.observe(  # before release: it compares the call's prediction
                upstream.endpoint,
                upstream.demand,
                meter.first_token_s - upstream.start_s,
                meter.gaps_s,
                upstream.running_at_start,
                len(meter.gaps_s) + 1,  # one token per content chunk, as vLLM streams
            )
        self.router.release(upstream.endpoint, upstream.demand, prefilled=upstream.first_token.seen)
        with anyio.CancelScope(shield=True):
            await upstream.response.aclose()

    def connection_broke(self, endpoint: Endpoint, error: Exception) -> None:
        """An open response from this endpoint broke: the router finds out whether it died."""
        self.router.connection_failed(endpoint, f"connection: {error!r}")

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
    status, code = status_for_failure(rejected.kind)
    kind = "rate_limit_error" if status == 429 else "server_error"
    return ProxyError(status, code, str(rejected), kind=kind)


def _http_of(endpoint: Endpoint) -> httpx.AsyncClient:
    """The endpoint's connection pool (its EngineClient's, so the same transport, headers and
    limits serve the router's own calls and the proxied ones)."""
    assert endpoint.client is not None, f"endpoint {endpoint.endpoint_id} has no client"
    return endpoint.client.http


class RelayResponse(StreamingResponse):
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


async def relay(proxy: RouterProxy, upstream: Upstream) -> AsyncIterator[bytes]:
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
            proxy.connection_broke(upstream.endpoint, error)
        logger.warning("stream from %s broke: %r", upstream.endpoint.endpoint_id, error)
        message = f"stream from endpoint '{upstream.endpoint.endpoint_id}' broke: {error!r}"
        body = openai_error(502, message, kind="server_error", code="upstream_error").body
        yield b"data: " + bytes(body) + b"\n\n"
        return
    if meter is not None:
        meter.complete = True
