"""Runs application requests through their DAG on asyncio and traces every node.

Each request is a set of asyncio tasks, one per stage (a node outside loops, or a whole
loop), each starting as soon as the stages it depends on finish, so independent branches
run concurrently. A loop runs its body round by round, each round itself a small DAG. Every
node execution leaves a `Span`. A node that fails (the backend returns an error, the code
raises, the call times out) cancels the rest of its request and the request comes back with
ok=False and the first failing node's reason: its message and its `CallFailure` kind (the
router's or the client's for an LLM call, the executor's own for timeouts, code and API
nodes); the executor never raises for a node failure, so one bad request does not disturb
the others of a run.

`run_requests` drives many requests, open loop (each at its offset from a common start) or
closed loop (N users, each sending its next request when the previous one ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import httpx

from runtime.app.dag import (
    FORMAT_INSTRUCTIONS,
    ApiNode,
    App,
    CodeNode,
    Condition,
    LlmNode,
    Ref,
    Stage,
    render,
    resolve_callable,
)
from runtime.app.formats import OutputFormat, format_instructions, json_schema, parse_output
from runtime.engine.client import CallFailure, CallRecord, ChatBackend, call_deadline
from runtime.metrics import RequestOutcome

logger = logging.getLogger(__name__)

AnyNode = LlmNode | CodeNode | ApiNode
#: Failures of a call the router refused before any engine saw it.
_ROUTER_REFUSALS = (CallFailure.SHED, CallFailure.QUEUE_FULL, CallFailure.NO_ENDPOINT)


@dataclass(frozen=True)
class Span:
    """One execution of one node (one per round for loop bodies); times are monotonic s."""

    request_id: int
    node_id: str
    kind: str
    round: int
    start_s: float
    end_s: float
    queued_s: float
    """Time between the node's dependencies finishing and the node starting."""
    ttft_s: float | None = None
    itl_s: tuple[float, ...] = ()
    tpot_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    error: str | None = None
    failure: CallFailure | None = None
    """Why the node failed (set exactly when error is)."""
    format_status: str | None = None
    """Parse status of an LLM node with output fields: clean, repaired or unparseable."""
    endpoint: str = ""
    """The replica that served an LLM call, or the URL of an API call."""
    skipped: bool = False
    """The node's `when` condition was false; nothing ran."""

    @property
    def duration_s(self) -> float:
        """How long the node ran."""
        return self.end_s - self.start_s


@dataclass(frozen=True)
class RequestResult:
    """What one request produced: its answer, its trace, and whether it failed."""

    request_id: int
    outputs: dict[str, Any]
    spans: tuple[Span, ...]
    start_s: float
    end_s: float
    ok: bool
    error: str | None = None
    failure: CallFailure | None = None
    """Why the request failed: the first failing node's kind (set exactly when error is)."""

    @property
    def e2e_s(self) -> float:
        """End-to-end latency, seconds."""
        return self.end_s - self.start_s


def to_outcome(
    result: RequestResult, quality: float | None, score_error: str | None = None
) -> RequestOutcome:
    """The metrics record of a request; quality counts only when the request succeeded, a
    request the router shed (its failure kind, never its message) counts as shed, and
    score_error says why the scorer could not score its answer."""
    calls = [s for s in result.spans if s.kind == "llm" and not s.skipped]
    return RequestOutcome(
        request_id=result.request_id,
        start_s=result.start_s,
        end_s=result.end_s,
        ok=result.ok,
        error=result.error,
        shed=result.failure is CallFailure.SHED,
        quality=quality if result.ok else None,
        llm_calls=len(calls),
        prompt_tokens=sum(s.prompt_tokens for s in calls),
        completion_tokens=sum(s.completion_tokens for s in calls),
        ttfts_s=[s.ttft_s for s in calls if s.ttft_s is not None],
        tpots_s=[s.tpot_s for s in calls if s.tpot_s is not None],
        format_statuses=[s.format_status for s in calls if s.format_status is not None],
        score_error=score_error if result.ok else None,
    )


# --------------------------------------------------------------------------------------------
# One request
# --------------------------------------------------------------------------------------------


class _NodeFailed(Exception):
    """A node failed; carries the request's error message, its kind and when it happened."""

    def __init__(self, reason: str, failure: CallFailure, at: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failure = failure
        self.at = at


class _StepError(Exception):
    """Raised inside a node runner: the reason, its kind, and the measurements taken so far."""

    def __init__(
        self, reason: str, failure: CallFailure, measured: dict[str, Any] | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failure = failure
        self.measured = measured or {}


@dataclass
class _Context:
    """What every request of a run shares."""

    app: App
    backend: ChatBackend
    models: Mapping[str, str]
    fmt: OutputFormat
    node_timeout_s: float | None
    http: httpx.AsyncClient | None
    sla_e2e_s: float | None = None
    deadline_shares: Mapping[str, float] = field(default_factory=dict)
    rest_of_path: Mapping[str, float] = field(default_factory=dict)


@lru_cache(maxsize=256)
def _function(path: str) -> Callable[..., Any]:
    return resolve_callable(path)


def _timeout_text(seconds: float) -> str:
    return f"timeout after {seconds:g}s"


@dataclass
class _RequestRun:
    """The state of one request while it runs."""

    ctx: _Context
    inputs: Mapping[str, Any]
    request_id: int
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    previous: dict[str, dict[str, Any]] = field(default_factory=dict)
    ended_at: dict[str, float] = field(default_factory=dict)
    spans: list[Span] = field(default_factory=list)
    start_s: float = 0.0
    committed: bool = False
    """An LLM call of the request ran on an engine: admission sheds none of its later calls."""

    def call_deadline_s(self, node_id: str) -> float | None:
        """When this node's call should finish: its share of the request's SLA."""
        if self.ctx.sla_e2e_s is None:
            return None
        return self.start_s + self.ctx.sla_e2e_s * self.ctx.deadline_shares.get(node_id, 1.0)

    async def run(self) -> RequestResult:
        """Run every stage; a node failure ends the request with ok=False, never raises."""
        start = time.monotonic()
        self.start_s = start
        app = self.ctx.app
        missing = [name for name in app.inputs if name not in self.inputs]
        if missing:
            message = f"request is missing input '{missing[0]}'"
            return self._result(start, message, CallFailure.APP_ERROR)
        done = {stage.id: asyncio.Event() for stage in app.stages}
        failed: list[_NodeFailed] = []
        try:
            async with asyncio.TaskGroup() as group:
                for stage in app.stages:
                    group.create_task(self._stage(stage, done, start))
        except* _NodeFailed as failures:
            failed = _flatten(failures)
        if failed:
            first = min(failed, key=lambda failure: failure.at)
            return self._result(start, first.reason, first.failure)
        return self._result(start, None, None)

    def _result(
        self, start: float, error: str | None, failure: CallFailure | None
    ) -> RequestResult:
        outputs: dict[str, Any] = {}
        if error is None:
            for name, text in self.ctx.app.outputs.items():
                outputs[name] = self._value(Ref.parse(text), feedback=False)
        spans = tuple(sorted(self.spans, key=lambda span: (span.start_s, span.node_id)))
        return RequestResult(
            request_id=self.request_id,
            outputs=outputs,
            spans=spans,
            start_s=start,
            end_s=time.monotonic(),
            ok=error is None,
            error=error,
            failure=failure,
        )

    async def _stage(self, stage: Stage, done: dict[str, asyncio.Event], start: float) -> None:
        for dep in stage.deps:
            await done[dep].wait()
        ready = max((self.ended_at[d] for d in stage.deps), default=start)
        if stage.loop is None:
            await self._node(self.ctx.app.node_map[stage.id], 0, ready)
        else:
            await self._loop(stage, ready)
        self.ended_at[stage.id] = time.monotonic()
        done[stage.id].set()

    async def _loop(self, stage: Stage, ready: float) -> None:
        assert stage.loop is not None
        until = Condition.parse(stage.loop.until)
        for round_index in range(stage.loop.max_rounds):
            for node_id in stage.loop.body:
                if node_id in self.outputs:
                    self.previous[node_id] = self.outputs.pop(node_id)
            round_start = time.monotonic() if round_index else ready
            done = {node_id: asyncio.Event() for node_id in stage.loop.body}
            async with asyncio.TaskGroup() as group:
                for node_id in stage.loop.body:
                    group.create_task(
                        self._body_node(node_id, stage, round_index, done, round_start)
                    )
            if until.holds(self._value(until.ref, feedback=False)):
                logger.debug("loop '%s' accepted in round %d", stage.id, round_index)
                return
        logger.debug("loop '%s' stopped at max_rounds=%d", stage.id, stage.loop.max_rounds)

    async def _body_node(
        self,
        node_id: str,
        stage: Stage,
        round_index: int,
        done: dict[str, asyncio.Event],
        round_start: float,
    ) -> None:
        deps = stage.inner_deps[node_id]
        for dep in deps:
            await done[dep].wait()
        ready = max((self.ended_at[d] for d in deps), default=round_start)
        await self._node(self.ctx.app.node_map[node_id], round_index, ready)
        done[node_id].set()

    # ---- one node --------------------------------------------------------------------------

    async def _node(self, node: AnyNode, round_index: int, ready: float) -> None:
        """Run (or skip) a node, record its span and outputs; _NodeFailed on failure."""
        start = time.monotonic()
        base = {
            "request_id": self.request_id,
            "node_id": node.id,
            "kind": node.kind,
            "round": round_index,
            "start_s": start,
            "queued_s": max(0.0, start - ready),
        }
        if node.when is not None:
            condition = Condition.parse(node.when)
            actual = self._value(condition.ref, feedback=self._is_feedback(node.id, condition.ref))
            if not condition.holds(actual):
                self.outputs[node.id] = dict.fromkeys(node.fields())
                self._finish(node.id, Span(**base, end_s=time.monotonic(), skipped=True))
                return
        timeout = self.ctx.node_timeout_s
        measured: dict[str, Any] = {}
        error: str | None = None
        kind: CallFailure | None = None
        try:
            async with asyncio.timeout(timeout) as scope:
                outputs, measured = await self._execute(node)
        except _StepError as failure:
            error, kind, measured = failure.reason, failure.failure, failure.measured
        except TimeoutError as failure:
            expired = timeout is not None and scope.expired()
            error = _timeout_text(timeout or 0.0) if expired else f"TimeoutError: {failure}"
            kind = CallFailure.TIMEOUT
        except Exception as failure:  # a code node may raise anything; it fails the node
            error = f"{type(failure).__name__}: {failure}"
            kind = CallFailure.APP_ERROR
        end = time.monotonic()
        if error is not None:
            assert kind is not None
            reason = f"node '{node.id}': {error}"
            self._finish(node.id, Span(**base, end_s=end, error=error, failure=kind, **measured))
            logger.debug("request %d failed: %s", self.request_id, reason)
            raise _NodeFailed(reason, kind, end)
        self.outputs[node.id] = outputs
        self._finish(node.id, Span(**base, end_s=end, **measured))

    def _finish(self, node_id: str, span: Span) -> None:
        self.spans.append(span)
        self.ended_at[node_id] = span.end_s

    async def _execute(self, node: AnyNode) -> tuple[dict[str, Any], dict[str, Any]]:
        if isinstance(node, LlmNode):
            return await self._llm(node)
        if isinstance(node, CodeNode):
            return await self._code(node), {}
        return await self._api(node)

    async def _llm(self, node: LlmNode) -> tuple[dict[str, Any], dict[str, Any]]:
        fmt = OutputFormat.JSON if node.structured_output else self.ctx.fmt

        def lookup(ref: Ref) -> Any:
            if ref.node is None and ref.field == FORMAT_INSTRUCTIONS:
                return format_instructions(fmt, node.output_fields)
            return self._value(ref, feedback=self._is_feedback(node.id, ref))

        messages = []
        if node.system:
            messages.append({"role": "system", "content": render(node.system, lookup)})
        messages.append({"role": "user", "content": render(node.prompt, lookup)})
        schema = json_schema(node.output_fields) if node.structured_output else None
        model = self.ctx.models[node.model]
        request_deadline = None if self.ctx.sla_e2e_s is None else self.start_s + self.ctx.sla_e2e_s
        with call_deadline(
            self.call_deadline_s(node.id),
            request_deadline_s=request_deadline,
            rest_calls=self.ctx.rest_of_path.get(node.id, 0.0),
            committed=self.committed,
            node_id=node.id,
        ):
            record = await self.ctx.backend.chat(model, messages, node.sampling.params(schema))
        if record.failure not in _ROUTER_REFUSALS:  # it ran on an engine: the request is in
            self.committed = True
        measured = _measured(record)
        if record.failure is not None:  # failed: error and failure are set together
            raise _StepError(str(record.error), record.failure, measured)
        outputs: dict[str, Any] = {"text": record.text}
        if node.output_fields:
            parsed = parse_output(fmt, record.text, node.output_fields)
            outputs.update(parsed.values)
            measured["format_status"] = parsed.status
        return outputs, measured

    async def _code(self, node: CodeNode) -> dict[str, Any]:
        arguments = {
            name: self._value(ref, feedback=self._is_feedback(node.id, ref))
            for name, ref in ((name, Ref.parse(text)) for name, text in node.inputs.items())
        }
        result = _function(node.callable)(arguments)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, Mapping):
            message = f"callable returned {type(result).__name__}, expected a dict"
            raise _StepError(message, CallFailure.APP_ERROR)
        missing = [name for name in node.output_fields if name not in result]
        if missing:
            raise _StepError(f"callable returned no field '{missing[0]}'", CallFailure.APP_ERROR)
        return dict(result)

    async def _api(self, node: ApiNode) -> tuple[dict[str, Any], dict[str, Any]]:
        def lookup(ref: Ref) -> Any:
            return self._value(ref, feedback=self._is_feedback(node.id, ref))

        url = render(node.url, lookup)
        body = {key: render(template, lookup) for key, template in node.body.items()}
        measured: dict[str, Any] = {"endpoint": url}
        http = self.ctx.http
        if http is None:
            raise _StepError("api nodes need an HTTP client", CallFailure.APP_ERROR, measured)
        try:
            response = await http.request(
                node.method,
                url,
                headers=node.headers,
                params=body if node.method == "GET" else None,
                json=body if node.method != "GET" and body else None,
                timeout=node.timeout_s,
            )
        except httpx.TimeoutException:
            raise _StepError(_timeout_text(node.timeout_s), CallFailure.TIMEOUT, measured) from None
        except httpx.HTTPError as error:
            kind = (
                CallFailure.CONNECTION
                if isinstance(error, httpx.TransportError)
                else CallFailure.UPSTREAM_ERROR
            )
            raise _StepError(f"{type(error).__name__}: {error}", kind, measured) from None
        if response.status_code >= 400:
            message = f"HTTP {response.status_code} from {url}"
            raise _StepError(message, CallFailure.UPSTREAM_ERROR, measured)
        outputs: dict[str, Any] = {"status": response.status_code, "text": response.text}
        try:
            decoded = response.json()
        except ValueError:
            decoded = None
        if isinstance(decoded, dict):
            outputs.update({k: v for k, v in decoded.items() if k not in ("status", "text")})
        missing = [name for name in node.output_fields if name not in outputs]
        if missing:
            raise _StepError(
                f"response has no field '{missing[0]}'", CallFailure.APP_ERROR, measured
            )
        return outputs, measured

    # ---- values ----------------------------------------------------------------------------

    def _is_feedback(self, node_id: str, ref: Ref) -> bool:
        return ref.node is not None and self.ctx.app.is_feedback(node_id, ref.node)

    def _value(self, ref: Ref, feedback: bool) -> Any:
        """A request input, or a node field (the previous round's for feedback edges)."""
        if ref.node is None:
            return self.inputs[ref.field]
        source = self.previous if feedback else self.outputs
        return source.get(ref.node, {}).get(ref.field)


def _measured(record: CallRecord) -> dict[str, Any]:
    return {
        "ttft_s": record.ttft_s,
        "itl_s": record.itl_s,
        "tpot_s": record.tpot_s,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "retries": record.retries,
        "endpoint": record.endpoint,
    }


def _flatten(group: BaseExceptionGroup[_NodeFailed]) -> list[_NodeFailed]:
    found: list[_NodeFailed] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found += _flatten(error)
        else:
            found.append(error)
    return found


def _has_api_nodes(app: App) -> bool:
    return any(isinstance(node, ApiNode) for node in app.nodes)


async def run_request(
    app: App,
    inputs: Mapping[str, Any],
    backend: ChatBackend,
    models: Mapping[str, str],
    *,
    fmt: OutputFormat | None = None,
    node_timeout_s: float | None = None,
    http: httpx.AsyncClient | None = None,
    request_id: int = 0,
    sla_e2e_s: float | None = None,
) -> RequestResult:
    """Run one request through the app.

    models maps the app's model keys to served model names; fmt overrides app.format (the
    format knob) without rebuilding the app; node_timeout_s bounds every node; http is the
    client API nodes use (one is opened for this request if the app needs it and none is
    given); sla_e2e_s gives every LLM call a deadline (its share of the SLA along the critical
    path) for SLA-aware routing. ConfigError if the app names a model key not in models.
    """
    app.validate_against(set(models))
    async with contextlib.AsyncExitStack() as stack:
        ctx = await _open_context(stack, app, backend, models, fmt, node_timeout_s, http, sla_e2e_s)
        return await _RequestRun(ctx, inputs, request_id).run()


async def _open_context(
    stack: contextlib.AsyncExitStack,
    app: App,
    backend: ChatBackend,
    models: Mapping[str, str],
    fmt: OutputFormat | None,
    node_timeout_s: float | None,
    http: httpx.AsyncClient | None,
    sla_e2e_s: float | None,
) -> _Context:
    """What every request of a run shares; opens an HTTP client (closed with the stack)
    when the app has API nodes and the caller gave none."""
    if http is None and _has_api_nodes(app):
        http = await stack.enter_async_context(httpx.AsyncClient())
    return _Context(
        app, backend, models, OutputFormat(fmt or app.format), node_timeout_s, http,
        sla_e2e_s, app.deadline_shares(), app.rest_of_path(),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Many requests
# --------------------------------------------------------------------------------------------


async def run_requests(
    app: App,
    requests: Sequence[Mapping[str, Any]],
    backend: ChatBackend,
    models: Mapping[str, str],
    *,
    arrival_offsets_s: Sequence[float] | None = None,
    users: int | None = None,
    think_time_s: float = 0.0,
    fmt: OutputFormat | None = None,
    node_timeout_s: float | None = None,
    http: httpx.AsyncClient | None = None,
    on_done: Callable[[RequestResult], None] | None = None,
    sla_e2e_s: float | None = None,
) -> list[RequestResult]:
    """Run every request and return their results in request order (request_id = index).

    Give exactly one of arrival_offsets_s (open loop: request i starts at t0 + offset i,
    whether or not earlier ones finished) or users (closed loop: that many users, each
    sending the next unsent request when its previous one ends, after think_time_s).
    on_done is called with each result as it completes.
    """
    if (arrival_offsets_s is None) == (users is None):
        raise ValueError("give exactly one of arrival_offsets_s (open loop) or users (closed loop)")
    if arrival_offsets_s is not None:
        if len(arrival_offsets_s) != len(requests):
            raise ValueError(
                f"arrival_offsets_s must have one offset per request ({len(requests)}), "
                f"got {len(arrival_offsets_s)}"
            )
        negative = [x for x in arrival_offsets_s if x < 0]
        if negative:
            raise ValueError(f"arrival_offsets_s must be >= 0, got {negative[0]}")
    if users is not None and users < 1:
        raise ValueError(f"users must be >= 1, got {users}")
    if think_time_s < 0:
        raise ValueError(f"think_time_s must be >= 0, got {think_time_s}")
    app.validate_against(set(models))

    results: list[RequestResult | None] = [None] * len(requests)
    async with contextlib.AsyncExitStack() as stack:
        ctx = await _open_context(stack, app, backend, models, fmt, node_timeout_s, http, sla_e2e_s)

        async def one(index: int) -> None:
            result = await _RequestRun(ctx, requests[index], index).run()
            results[index] = result
            if on_done is not None:
                on_done(result)

        async with asyncio.TaskGroup() as group:
            t0 = time.monotonic()
            if arrival_offsets_s is not None:
                for index, offset in enumerate(arrival_offsets_s):
                    group.create_task(_at(t0 + offset, one, index))
            else:
                assert users is not None
                queue = iter(range(len(requests)))
                for _ in range(min(users, len(requests))):
                    group.create_task(_user(queue, one, think_time_s))
    done = [result for result in results if result is not None]
    logger.info(
        "ran %d requests of app '%s': %d failed",
        len(done),
        app.name,
        sum(not result.ok for result in done),
    )
    return done


async def _at(when_s: float, one: Callable[[int], Awaitable[None]], index: int) -> None:
    """Open loop: start request index at when_s (monotonic)."""
    delay = when_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    await one(index)


async def _user(
    queue: Iterator[int], one: Callable[[int], Awaitable[None]], think_time_s: float
) -> None:
    """Closed loop: one user sending the next unsent request after each answer."""
    first = True
    for index in queue:
        if not first and think_time_s:
            await asyncio.sleep(think_time_s)
        first = False
        await one(index)
