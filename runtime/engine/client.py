"""Streaming calls to an OpenAI-compatible server, measured token by token.

Every call yields a `CallRecord`: when it started, time to first token, every inter-token gap,
end-to-end latency, the token counts the server reports, finish reason and error. Failures are
recorded, not raised, so a run measures them; only cancellation propagates. Connection errors
before any byte arrived are retried a bounded number of times (the server never saw the call).
A failed call carries a `CallFailure` kind next to its message, set where the failure happens
(here, in the router, in the executor), so that callers branch on the kind, never on the text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import httpx

logger = logging.getLogger(__name__)

#: Seconds a pooled connection may sit idle before it is dropped instead of reused. Servers
#: close idle keep-alive connections themselves (vLLM's uvicorn after 5 s,
#: VLLM_HTTP_TIMEOUT_KEEP_ALIVE); a client that reuses one at the moment the server closes it
#: sees "Server disconnected without sending a response" although nothing is wrong. Dropping
#: them well before the server does, with room for a server whose event loop runs late on a
#: saturated machine, keeps that race out of the calls.
KEEPALIVE_EXPIRY_S = 2.0


class CallFailure(StrEnum):
    """Why a call failed: an LLM call (client, router) or, in the executor, a node of a request.

    The message says the details to people; this kind is what code branches on.
    """

    SHED = "shed"
    """The router's admission control dropped it: its deadline was out of reach, or passed
    while it waited in the queue."""
    QUEUE_FULL = "queue_full"
    """Every replica of its model was full and the router's queue was at capacity."""
    NO_ENDPOINT = "no_endpoint"
    """No endpoint, or no healthy one, serves its model key."""
    CONNECTION = "connection"
    """The server could not be reached, or broke the protocol before answering (the replica
    likely died); the router retries such a call once on another replica."""
    TIMEOUT = "timeout"
    """The call or the node ran past its time limit."""
    UPSTREAM_ERROR = "upstream_error"
    """The server answered with an error status or an error in the stream, or the answer could
    not be read."""
    APP_ERROR = "app_error"
    """The application failed on its own: a code node raised or returned the wrong shape, an
    API node's answer lacked a field, or the request lacked an input."""


@dataclass(frozen=True)
class CallRecord:
    """What one LLM call did, measured at the client."""

    start_s: float
    """time.monotonic() when the call was sent."""
    ttft_s: float | None
    """Time to the first content token; None when none arrived."""
    itl_s: tuple[float, ...]
    """Gaps between consecutive content chunks (inter-token latencies)."""
    e2e_s: float
    """Send to last byte."""
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    text: str
    error: str | None = None
    """What went wrong, for people; None when the call succeeded."""
    failure: CallFailure | None = None
    """What went wrong, for code; set exactly when `error` is."""
    retries: int = 0
    endpoint: str = ""
    """Base URL of the server that answered (which replica)."""

    def __post_init__(self) -> None:
        if (self.error is None) != (self.failure is None):
            raise ValueError(
                f"a call's error and failure kind go together, got error={self.error!r} "
                f"failure={self.failure!r}"
            )

    @property
    def ok(self) -> bool:
        """Whether the call completed without an error."""
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters of one call (OpenAI names; vLLM extensions marked)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    """vLLM extension: keep generating to max_tokens (fixed-length load for benchmarks)."""
    json_schema: dict[str, Any] | None = None
    """vLLM structured outputs: constrain the output to this JSON schema."""

    def body(self) -> dict[str, Any]:
        """The request-body fields for these parameters."""
        body: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = list(self.stop)
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": self.json_schema},
            }
        return body


@dataclass(frozen=True)
class CallBudget:
    """When a call should finish, and what its request still has to do after it.

    Attributes:
        deadline_s: The call's own deadline (absolute, time.monotonic()): its share of the
            request's SLA along the critical path.
        request_deadline_s: The deadline of the whole request the call belongs to (None: the
            call is a request of its own).
        rest_calls: The request's critical path still to run once this call has ended, in
            calls (App.rest_of_path: an LLM or API node counts 1, a code node 0.1): SLA-aware
            admission judges the request, so a call that overruns its share is still
            admitted while the request as a whole can make its deadline.
        committed: An earlier call of the request already ran on an engine: the request was
            admitted then, and admission does not shed it now (that would waste the work).
        node_id: The app node the call comes from ("" if none): the router learns output
            lengths per node.
    """

    deadline_s: float | None
    request_deadline_s: float | None = None
    rest_calls: float = 0.0
    committed: bool = False
    node_id: str = ""


_CALL_BUDGET: ContextVar[CallBudget | None] = ContextVar("fmtune_call_budget", default=None)


@contextlib.contextmanager
def call_deadline(
    deadline_s: float | None,
    *,
    request_deadline_s: float | None = None,
    rest_calls: float = 0.0,
    committed: bool = False,
    node_id: str = "",
) -> Iterator[None]:
    """Calls made inside this block (and tasks it starts) must finish by this absolute
    time.monotonic() deadline, within a request due by ``request_deadline_s`` with
    ``rest_calls`` calls of critical path after them, ``committed`` once an earlier call of
    the request ran, from app node ``node_id`` (`CallBudget`); SLA-aware routing reads
    it through `current_call_budget`."""
    if rest_calls < 0:
        raise ValueError(f"rest_calls must be >= 0, got {rest_calls}")
    budget = CallBudget(deadline_s, request_deadline_s, rest_calls, committed, node_id)
    token = _CALL_BUDGET.set(budget)
    try:
        yield
    finally:
        _CALL_BUDGET.reset(token)


def current_call_budget() -> CallBudget | None:
    """The budget set by the innermost `call_deadline` block, if any."""
    return _CALL_BUDGET.get()


def current_call_deadline() -> float | None:
    """The deadline set by the innermost `call_deadline` block, if any."""
    budget = _CALL_BUDGET.get()
    return None if budget is None else budget.deadline_s


class ChatBackend(Protocol):
    """Anything that runs a chat call for a model: one endpoint, or a router over replicas."""

    async def chat(
        self, model: str, messages: list[dict[str, str]], sampling: SamplingParams
    ) -> CallRecord:
        """Run one chat completion and measure it."""
        ...


@dataclass
class _StreamState:
    first_token_at: float | None = None
    last_chunk_at: float | None = None
    gaps: list[float] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks_with_text: int = 0
    on_first_token: Callable[[], None] | None = None

    def on_text(self, text: str, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
            if self.on_first_token is not None:
                self.on_first_token()
        elif self.last_chunk_at is not None:
            self.gaps.append(now - self.last_chunk_at)
        self.last_chunk_at = now
        self.parts.append(text)
        self.chunks_with_text += 1


def parse_sse_line(line: str) -> dict[str, Any] | None:
    """The JSON payload of one server-sent-events line; None for keep-alives and [DONE]."""
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if not payload or payload == "[DONE]":
        return None
    parsed = json.loads(payload)
    return parsed if isinstance(parsed, dict) else None


class EngineClient:
    """Async client of one OpenAI-compatible server (a replica, or an existing endpoint).

    Endpoint mode is this class pointed at any URL: no process is managed.
    """

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 300.0,
        connect_retries: int = 3,
        retry_backoff_s: float = 0.5,
        api_key: str | None = None,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_retries = connect_retries
        self.retry_backoff_s = retry_backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=64,
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            ),
            transport=transport,
        )
        self._transport = transport
        self._headers = headers

    @property
    def http(self) -> httpx.AsyncClient:
        """The underlying HTTP client (for proxying raw streams through this connection pool)."""
        return self._http

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def answers(self, path: str = "/v1/models", timeout_s: float = 10.0) -> bool:
        """Whether the server answers `path` with 200 over a fresh connection (a health probe:
        a pooled connection may be the very one that broke)."""
        async with httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=timeout_s,
            limits=httpx.Limits(max_keepalive_connections=0),
            transport=self._transport,
        ) as fresh:
            try:
                response = await fresh.get(path)
            except httpx.HTTPError:
                return False
        return response.status_code == 200

    async def models(self) -> list[str]:
        """The model names the server serves."""
        response = await self._http.get("/v1/models")
        response.raise_for_status()
        return [entry["id"] for entry in response.json().get("data", [])]

    async def chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        sampling: SamplingParams,
        *,
        on_first_token: Callable[[], None] | None = None,
    ) -> CallRecord:
        """A streamed /v1/chat/completions call, measured; `on_first_token` is called once,
        when the first content token arrives (the router's prefill bookkeeping)."""
        body = {"model": model, "messages": messages, **sampling.body()}
        return await self._stream(
            "/v1/chat/completions", body, chat=True, on_first_token=on_first_token
        )

    async def complete(
        self, model: str, prompt: str | list[int], sampling: SamplingParams
    ) -> CallRecord:
        """A streamed /v1/completions call, measured; the prompt is text or token ids (exact
        prompt lengths, as the profiler needs them)."""
        body = {"model": model, "prompt": prompt, **sampling.body()}
        return await self._stream("/v1/completions", body, chat=False)

    async def _stream(
        self,
        path: str,
        body: dict[str, Any],
        chat: bool,
        on_first_token: Callable[[], None] | None = None,
    ) -> CallRecord:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        retries = 0
        start = time.monotonic()
        while True:
            state = _StreamState(on_first_token=on_first_token)
            start = time.monotonic()
            try:
                await asyncio.wait_for(
                    self._consume(path, body, chat, state), timeout=self.timeout_s
                )
                return self._record(start, state, None, retries, None)
            except (httpx.ConnectError, httpx.RemoteProtocolError) as error:
                if state.first_token_at is None and retries < self.connect_retries:
                    retries += 1
                    logger.debug("retrying %s after %s (%d)", path, error, retries)
                    await asyncio.sleep(self.retry_backoff_s * retries)
                    continue
                message = f"connection: {error}"
                return self._record(start, state, message, retries, CallFailure.CONNECTION)
            except TimeoutError:
                message = f"timeout after {self.timeout_s}s"
                return self._record(start, state, message, retries, CallFailure.TIMEOUT)
            except httpx.HTTPStatusError as error:
                message = _describe_status(error)
                return self._record(start, state, message, retries, CallFailure.UPSTREAM_ERROR)
            except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as error:
                message = f"{type(error).__name__}: {error}"
                timed_out = isinstance(error, httpx.TimeoutException)
                kind = CallFailure.TIMEOUT if timed_out else CallFailure.UPSTREAM_ERROR
                return self._record(start, state, message, retries, kind)

    async def _consume(
        self, path: str, body: dict[str, Any], chat: bool, state: _StreamState
    ) -> None:
        async with self._http.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                response.raise_for_status()
            async for line in response.aiter_lines():
                chunk = parse_sse_line(line)
                if chunk is None:
                    continue
                now = time.monotonic()
                if "error" in chunk:
                    raise ValueError(str(chunk["error"]))
                usage = chunk.get("usage")
                if usage:
                    state.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    state.completion_tokens = int(usage.get("completion_tokens") or 0)
                for choice in chunk.get("choices") or []:
                    text = (
                        (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    )
                    if text:
                        state.on_text(text, now)
                    if choice.get("finish_reason"):
                        state.finish_reason = choice["finish_reason"]

    def _record(
        self,
        start: float,
        state: _StreamState,
        error: str | None,
        retries: int,
        failure: CallFailure | None,
    ) -> CallRecord:
        end = time.monotonic()
        return CallRecord(
            start_s=start,
            ttft_s=None if state.first_token_at is None else state.first_token_at - start,
            itl_s=tuple(state.gaps),
            e2e_s=end - start,
            prompt_tokens=state.prompt_tokens,
            completion_tokens=state.completion_tokens or state.chunks_with_text,
            finish_reason=state.finish_reason,
            text="".join(state.parts),
            error=error,
            failure=failure,
            retries=retries,
            endpoint=self.base_url,
        )


def _describe_status(error: httpx.HTTPStatusError) -> str:
    """'HTTP 400: <server message>' from an error response."""
    response = error.response
    try:
        detail = response.json()
        message = detail.get("error", {}).get("message") if isinstance(detail, dict) else None
        message = message or detail.get("message") or detail.get("detail") or response.text
    except (ValueError, AttributeError):
        message = response.text
    return f"HTTP {response.status_code}: {str(message)[:300]}"
