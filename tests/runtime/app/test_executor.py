"""Tests of the DAG executor against a fake chat backend (no servers, small time scale)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from runtime.app.dag import App, app_from_dict
from runtime.app.executor import RequestResult, Span, run_request, run_requests, to_outcome
from runtime.engine.client import (
    CallBudget,
    CallFailure,
    CallRecord,
    SamplingParams,
    current_call_budget,
    current_call_deadline,
)
from runtime.errors import ConfigError

MODELS = {"llm": "served-llm"}


@dataclass(frozen=True)
class Reply:
    """What the fake backend answers: text, after delay_s, or an error of a kind."""

    text: str = ""
    delay_s: float | None = None
    error: str | None = None
    failure: CallFailure = CallFailure.UPSTREAM_ERROR


Respond = Callable[[str, SamplingParams], "str | Reply"]


class FakeBackend:
    """A ChatBackend test double: answers via `respond(prompt, sampling)` after a sleep.

    It reports a fake TTFT (a fifth of the delay), equal inter-token gaps and one token per
    word, and keeps every call and the most calls it ever had in flight.
    """

    def __init__(self, respond: Respond, delay_s: float = 0.02) -> None:
        self.respond = respond
        self.delay_s = delay_s
        self.calls: list[tuple[str, str, SamplingParams]] = []
        self.deadlines: list[float | None] = []
        self.budgets: list[CallBudget | None] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def chat(
        self, model: str, messages: list[dict[str, str]], sampling: SamplingParams
    ) -> CallRecord:
        prompt = messages[-1]["content"]
        self.calls.append((model, prompt, sampling))
        self.deadlines.append(current_call_deadline())
        self.budgets.append(current_call_budget())
        reply = self.respond(prompt, sampling)
        if isinstance(reply, str):
            reply = Reply(reply)
        delay = self.delay_s if reply.delay_s is None else reply.delay_s
        start = time.monotonic()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(delay)
        finally:
            self.in_flight -= 1
        tokens = max(1, len(reply.text.split()))
        ttft = delay / 5
        return CallRecord(
            start_s=start,
            ttft_s=ttft,
            itl_s=tuple([(delay - ttft) / tokens] * (tokens - 1)),
            e2e_s=delay,
            prompt_tokens=len(prompt.split()),
            completion_tokens=0 if reply.error else tokens,
            finish_reason="stop",
            text="" if reply.error else reply.text,
            error=reply.error,
            failure=reply.failure if reply.error is not None else None,
            endpoint="fake://replica-0",
        )


def by_pattern(rules: Sequence[tuple[str, str | Reply]], default: str = "ok") -> Respond:
    """Answer with the first rule whose pattern occurs in the prompt."""

    def respond(prompt: str, sampling: SamplingParams) -> str | Reply:
        for pattern, reply in rules:
            if pattern in prompt:
                return reply
        return default

    return respond


def llm(node_id: str, prompt: str, **kw: Any) -> dict[str, Any]:
    return {"id": node_id, "kind": "llm", "model": "llm", "prompt": prompt, **kw}


def make_app(nodes: list[dict[str, Any]], outputs: dict[str, str], **kw: Any) -> App:
    return app_from_dict(
        {"name": "t", "inputs": ["article"], "nodes": nodes, "outputs": outputs, **kw}
    )


def span(result: RequestResult, node_id: str, round_index: int = 0) -> Span:
    (found,) = [s for s in result.spans if s.node_id == node_id and s.round == round_index]
    return found


# Code-node callables (imported by dotted path).


def join_words(inputs: dict[str, Any]) -> dict[str, Any]:
    return {"joined": " ".join(str(inputs[k]) for k in sorted(inputs))}


async def async_upper(inputs: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"upper": str(inputs["text"]).upper()}


def explode_on_boom(inputs: dict[str, Any]) -> dict[str, Any]:
    if inputs["article"] == "boom":
        raise RuntimeError("boom")
    return {"out": inputs["article"]}


def returns_list(inputs: dict[str, Any]) -> Any:
    return [1, 2]


# --------------------------------------------------------------------------------------------
# Concurrency and data flow
# --------------------------------------------------------------------------------------------


def fan_app() -> App:
    """root -> (b, c, d in parallel) -> join (code)."""
    return make_app(
        [
            llm("root", "ROOT {article}\n{format_instructions}", output_fields=["topic"]),
            *(llm(x, f"{x.upper()} about {{root.topic}}", depends_on=["root"]) for x in "bcd"),
            {
                "id": "join",
                "kind": "code",
                "callable": "tests.runtime.app.test_executor:join_words",
                "inputs": {"b": "b.text", "c": "c.text", "d": "d.text"},
                "output_fields": ["joined"],
                "depends_on": ["b", "c", "d"],
            },
        ],
        {"answer": "join.joined", "topic": "root.topic"},
    )


async def test_parallel_branches_overlap_and_join_waits() -> None:
    backend = FakeBackend(
        by_pattern([("ROOT", '{"topic": "bees"}'), ("B about", "bee"), ("C about", "see")]),
        delay_s=0.05,
    )
    result = await run_request(fan_app(), {"article": "text"}, backend, MODELS)
    assert result.ok, result.error
    b, c, d, join = (span(result, x) for x in ("b", "c", "d", "join"))
    for one, other in ((b, c), (b, d), (c, d), (c, b), (d, b), (d, c)):
        assert one.start_s < other.end_s  # each parallel span starts before the others end
    assert join.start_s >= max(b.end_s, c.end_s, d.end_s)
    assert span(result, "root").end_s <= min(b.start_s, c.start_s, d.start_s)
    assert result.e2e_s < 3 * 0.05 + 0.05  # root + one parallel layer, not four calls
    assert result.outputs == {"answer": "bee see ok", "topic": "bees"}
    prompts = [prompt for _, prompt, _ in backend.calls]
    assert "B about bees" in prompts  # root's parsed field flowed along the edge
    assert backend.max_in_flight == 3
    assert all(model == "served-llm" for model, _, _ in backend.calls)


async def test_sequential_nodes_do_not_overlap() -> None:
    app = make_app(
        [
            llm("first", "FIRST {article}"),
            llm("second", "SECOND after {first.text}", depends_on=["first"]),
            llm("third", "THIRD after {second.text}", depends_on=["second"]),
        ],
        {"answer": "third.text"},
    )
    backend = FakeBackend(by_pattern([("FIRST", "one"), ("SECOND", "two")], "three"))
    result = await run_request(app, {"article": "x"}, backend, MODELS)
    first, second, third = (span(result, x) for x in ("first", "second", "third"))
    assert first.end_s <= second.start_s and second.end_s <= third.start_s
    assert second.queued_s >= 0 and second.queued_s < 0.01
    assert backend.calls[2][1] == "THIRD after two"
    assert result.outputs == {"answer": "three"}


async def test_spans_carry_call_measurements_and_outcome_counts_them() -> None:
    backend = FakeBackend(
        by_pattern([("ROOT", '```json\n{"topic": "bees"}\n```'), ("B about", "bee")])
    )
    result = await run_request(fan_app(), {"article": "text"}, backend, MODELS, request_id=7)
    root = span(result, "root")
    assert root.request_id == 7 and root.kind == "llm" and root.round == 0
    assert root.ttft_s == pytest.approx(0.004)
    assert root.format_status == "repaired"  # fenced JSON needed a repair
    assert root.endpoint == "fake://replica-0"
    assert root.completion_tokens == 4 and root.prompt_tokens > 0  # one per word
    outcome = to_outcome(result, quality=0.5)
    assert outcome.request_id == 7 and outcome.ok and outcome.quality == 0.5
    assert outcome.llm_calls == 4
    assert outcome.format_statuses == ["repaired"]
    assert len(outcome.ttfts_s) == 4 and len(outcome.tpots_s) == 1  # one multi-token answer
    assert outcome.completion_tokens == sum(s.completion_tokens for s in result.spans)
    assert outcome.e2e_s == pytest.approx(result.e2e_s)


async def test_async_code_node_and_structured_output() -> None:
    app = make_app(
        [
            llm("ask", "{article}", output_fields=["name"], structured_output=True),
            {
                "id": "up",
                "kind": "code",
                "callable": "tests.runtime.app.test_executor:async_upper",
                "inputs": {"text": "ask.name"},
                "output_fields": ["upper"],
                "depends_on": ["ask"],
            },
        ],
        {"name": "up.upper"},
        format="xml",
    )
    backend = FakeBackend(lambda prompt, sampling: '{"name": "ann lee"}')
    result = await run_request(app, {"article": "x"}, backend, MODELS)
    assert result.outputs == {"name": "ANN LEE"}
    sampling = backend.calls[0][2]
    assert sampling.json_schema is not None and sampling.json_schema["required"] == ["name"]
    assert span(result, "ask").format_status == "clean"  # parsed as JSON, not the app's XML


async def test_format_override_changes_instructions_and_parser() -> None:
    app = make_app(
        [llm("ask", "{article}\n{format_instructions}", output_fields=["name"])], {"n": "ask.name"}
    )
    backend = FakeBackend(lambda prompt, sampling: '<NAME="Ann">')
    result = await run_request(app, {"article": "x"}, backend, MODELS, fmt="tag")
    assert result.outputs == {"n": "Ann"}
    assert '<NAME="...">' in backend.calls[0][1]


# --------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------


async def test_backend_error_fails_only_its_request() -> None:
    backend = FakeBackend(
        by_pattern(
            [
                ("ROOT poison", '{"topic": "poison"}'),
                ("B about poison", Reply(error="HTTP 500: x")),
            ],
            '{"topic": "fine"}',
        )
    )
    app = fan_app()
    results = await run_requests(
        app, [{"article": a} for a in ("a", "poison", "c")], backend, MODELS, users=3
    )
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error == "node 'b': HTTP 500: x"
    assert results[1].failure is CallFailure.UPSTREAM_ERROR
    assert results[0].failure is None and results[2].failure is None
    assert results[1].outputs == {}
    failed = span(results[1], "b")
    assert failed.error == "HTTP 500: x" and failed.endpoint == "fake://replica-0"
    assert failed.failure is CallFailure.UPSTREAM_ERROR
    assert to_outcome(results[1], quality=1.0).quality is None


async def test_a_shed_call_makes_a_shed_outcome_by_its_kind_not_its_message() -> None:
    shed = Reply(error="shed: deadline passed while queued", failure=CallFailure.SHED)
    # A server's own message may say "shed:" too; only the router's kind counts.
    lookalike = Reply(error="HTTP 503: shed: overloaded", failure=CallFailure.UPSTREAM_ERROR)
    backend = FakeBackend(by_pattern([("ROOT shed", shed), ("ROOT busy", lookalike)]))
    results = await run_requests(
        fan_app(), [{"article": a} for a in ("shed", "busy")], backend, MODELS, users=2
    )
    assert [r.failure for r in results] == [CallFailure.SHED, CallFailure.UPSTREAM_ERROR]
    assert [to_outcome(r, None).shed for r in results] == [True, False]


async def test_code_node_exception_fails_its_request() -> None:
    app = make_app(
        [
            {
                "id": "boom",
                "kind": "code",
                "callable": "tests.runtime.app.test_executor:explode_on_boom",
                "inputs": {"article": "article"},
                "output_fields": ["out"],
            }
        ],
        {"out": "boom.out"},
    )
    backend = FakeBackend(by_pattern([]))
    results = await run_requests(
        app, [{"article": "fine"}, {"article": "boom"}], backend, MODELS, arrival_offsets_s=[0, 0]
    )
    assert results[0].ok and results[0].outputs == {"out": "fine"}
    assert not results[1].ok
    assert results[1].error == "node 'boom': RuntimeError: boom"
    assert results[1].failure is CallFailure.APP_ERROR


async def test_code_node_must_return_a_dict_with_its_fields() -> None:
    app = make_app(
        [{"id": "c", "kind": "code", "callable": "tests.runtime.app.test_executor:returns_list"}],
        {"x": "article"},
    )
    result = await run_request(app, {"article": "x"}, FakeBackend(by_pattern([])), MODELS)
    assert result.error == "node 'c': callable returned list, expected a dict"
    assert result.failure is CallFailure.APP_ERROR


async def test_timeout_fails_the_node_and_cancels_the_rest() -> None:
    app = make_app(
        [llm("slow", "SLOW {article}"), llm("fast", "FAST {article}")],
        {"a": "slow.text", "b": "fast.text"},
    )
    backend = FakeBackend(
        by_pattern([("SLOW stuck", Reply("late", delay_s=5.0))], "quick"), delay_s=0.01
    )
    started = time.monotonic()
    results = await run_requests(
        app,
        [{"article": "stuck"}, {"article": "fine"}],
        backend,
        MODELS,
        users=2,
        node_timeout_s=0.1,
    )
    assert time.monotonic() - started < 1.0
    assert results[0].error == "node 'slow': timeout after 0.1s"
    assert results[0].failure is CallFailure.TIMEOUT
    assert span(results[0], "slow").error == "timeout after 0.1s"
    assert span(results[0], "slow").failure is CallFailure.TIMEOUT
    assert results[1].ok and results[1].outputs == {"a": "quick", "b": "quick"}


async def test_first_failure_cancels_running_siblings() -> None:
    app = make_app([llm("bad", "BAD {article}"), llm("long", "LONG {article}")], {"a": "long.text"})
    backend = FakeBackend(
        by_pattern(
            [
                (
                    "BAD",
                    Reply(
                        error="connection: refused", delay_s=0.01, failure=CallFailure.CONNECTION
                    ),
                ),
                ("LONG", Reply("x", delay_s=2.0)),
            ]
        )
    )
    result = await run_request(app, {"article": "x"}, backend, MODELS)
    assert result.error == "node 'bad': connection: refused"
    assert result.failure is CallFailure.CONNECTION
    assert result.e2e_s < 1.0
    assert [s.node_id for s in result.spans] == ["bad"]


async def test_missing_input_and_unknown_model() -> None:
    app = make_app([llm("a", "{article}")], {"a": "a.text"})
    result = await run_request(app, {"text": "x"}, FakeBackend(by_pattern([])), MODELS)
    assert not result.ok and result.error == "request is missing input 'article'"
    assert result.failure is CallFailure.APP_ERROR
    with pytest.raises(ConfigError, match=r"node 'a': unknown model 'llm'"):
        await run_request(app, {"article": "x"}, FakeBackend(by_pattern([])), {"other": "m"})


# --------------------------------------------------------------------------------------------
# Loops and conditions
# --------------------------------------------------------------------------------------------


def judge_app(max_rounds: int) -> App:
    return make_app(
        [
            llm("agent", "AGENT {article} last verdict: [{judge.verdict}]", depends_on=["judge"]),
            llm("other", "OTHER {article}"),
            llm(
                "judge",
                "JUDGE {agent.text} {other.text}\n{format_instructions}",
                output_fields=["verdict"],
                depends_on=["agent", "other"],
            ),
            llm("final", "FINAL {judge.verdict}", depends_on=["judge"]),
        ],
        {"verdict": "judge.verdict", "final": "final.text"},
        loops=[
            {
                "id": "review",
                "body": ["agent", "other", "judge"],
                "until": "judge.verdict == 'accept'",
                "max_rounds": max_rounds,
            }
        ],
    )


def verdicts(*answers: str) -> Respond:
    """The judge answers these verdicts in turn (the last one repeats)."""
    judged: list[int] = []

    def respond(prompt: str, sampling: SamplingParams) -> str:
        if prompt.startswith("JUDGE"):
            judged.append(1)
            return json.dumps({"verdict": answers[min(len(judged), len(answers)) - 1]})
        return "draft" if prompt.startswith(("AGENT", "OTHER")) else "done"

    return respond


async def test_judge_loop_stops_at_accept() -> None:
    backend = FakeBackend(verdicts("retry", "Accept"), delay_s=0.005)
    result = await run_request(judge_app(max_rounds=5), {"article": "x"}, backend, MODELS)
    assert result.ok
    assert result.outputs == {"verdict": "Accept", "final": "done"}
    judges = [s for s in result.spans if s.node_id == "judge"]
    assert [s.round for s in judges] == [0, 1]
    agent_prompts = [p for _, p, _ in backend.calls if p.startswith("AGENT")]
    assert agent_prompts == ["AGENT x last verdict: []", "AGENT x last verdict: [retry]"]
    assert span(result, "final").start_s >= judges[-1].end_s
    assert to_outcome(result, None).llm_calls == 7  # 2 rounds x 3 + final


async def test_judge_loop_caps_at_max_rounds() -> None:
    backend = FakeBackend(verdicts("retry"), delay_s=0.005)
    result = await run_request(judge_app(max_rounds=3), {"article": "x"}, backend, MODELS)
    assert result.ok and result.outputs["verdict"] == "retry"
    assert sorted({s.round for s in result.spans if s.node_id == "agent"}) == [0, 1, 2]
    assert sum(p.startswith("JUDGE") for _, p, _ in backend.calls) == 3


async def test_loop_rounds_run_the_body_in_parallel_then_in_order() -> None:
    backend = FakeBackend(verdicts("retry", "accept"), delay_s=0.03)
    result = await run_request(judge_app(max_rounds=2), {"article": "x"}, backend, MODELS)
    for round_index in (0, 1):
        agent, other, judge = (span(result, x, round_index) for x in ("agent", "other", "judge"))
        assert agent.start_s < other.end_s and other.start_s < agent.end_s
        assert judge.start_s >= max(agent.end_s, other.end_s)
    assert span(result, "agent", 1).start_s >= span(result, "judge", 0).end_s


async def test_conditional_node_is_skipped_when_false() -> None:
    app = make_app(
        [
            llm("route", "ROUTE {article}\n{format_instructions}", output_fields=["kind"]),
            llm("web", "WEB {article}", depends_on=["route"], when="route.kind == 'web'"),
            llm("local", "LOCAL {article}", depends_on=["route"], when="route.kind != 'web'"),
            llm("after", "AFTER [{web.text}] [{local.text}]", depends_on=["web", "local"]),
        ],
        {"web": "web.text", "local": "local.text", "after": "after.text"},
    )
    backend = FakeBackend(
        by_pattern([("ROUTE", '{"kind": "Local"}'), ("LOCAL", "answer from local")], "end")
    )
    result = await run_request(app, {"article": "x"}, backend, MODELS)
    assert result.ok
    web = span(result, "web")
    assert web.skipped and web.error is None and web.duration_s < 0.01
    assert not any(p.startswith("WEB") for _, p, _ in backend.calls)
    assert result.outputs == {"web": None, "local": "answer from local", "after": "end"}
    assert backend.calls[-1][1] == "AFTER [] [answer from local]"
    assert to_outcome(result, None).llm_calls == 3


# --------------------------------------------------------------------------------------------
# API nodes
# --------------------------------------------------------------------------------------------


def api_app() -> App:
    return make_app(
        [
            {
                "id": "geo",
                "kind": "api",
                "url": "http://geo.test/lookup",
                "method": "POST",
                "body": {"q": "city of {article}"},
                "output_fields": ["city"],
                "timeout_s": 0.2,
            },
            llm("say", "SAY {geo.city}", depends_on=["geo"]),
        ],
        {"city": "geo.city", "said": "say.text"},
    )


async def test_api_node_calls_http_and_exposes_json_fields() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        if "down" in body["q"]:
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json={"city": "Leeds"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        backend = FakeBackend(lambda prompt, sampling: prompt.lower())
        results = await run_requests(
            api_app(),
            [{"article": "ann"}, {"article": "down"}],
            backend,
            MODELS,
            arrival_offsets_s=[0.0, 0.0],
            http=http,
        )
    assert seen[0] == {"q": "city of ann"}
    assert results[0].outputs == {"city": "Leeds", "said": "say leeds"}
    assert span(results[0], "geo").endpoint == "http://geo.test/lookup"
    assert results[1].error == "node 'geo': HTTP 503 from http://geo.test/lookup"
    assert results[1].failure is CallFailure.UPSTREAM_ERROR


async def test_api_node_timeout_is_reported() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        result = await run_request(
            api_app(), {"article": "x"}, FakeBackend(by_pattern([])), MODELS, http=http
        )
    assert result.error == "node 'geo': timeout after 0.2s"
    assert result.failure is CallFailure.TIMEOUT


# --------------------------------------------------------------------------------------------
# Driving many requests
# --------------------------------------------------------------------------------------------


def one_call_app() -> App:
    return make_app([llm("a", "{article}")], {"a": "a.text"})


def max_overlap(results: Sequence[RequestResult]) -> int:
    events = sorted(
        [(r.start_s, 1) for r in results] + [(r.end_s, -1) for r in results],
        key=lambda e: (e[0], e[1]),
    )
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


async def test_closed_loop_keeps_at_most_n_requests_in_flight() -> None:
    backend = FakeBackend(lambda prompt, sampling: "ok", delay_s=0.02)
    done: list[int] = []
    results = await run_requests(
        one_call_app(),
        [{"article": str(i)} for i in range(9)],
        backend,
        MODELS,
        users=3,
        on_done=lambda r: done.append(r.request_id),
    )
    assert [r.request_id for r in results] == list(range(9))
    assert all(r.ok for r in results)
    assert backend.max_in_flight == 3
    assert max_overlap(results) <= 3
    assert sorted(done) == list(range(9))
    wall = max(r.end_s for r in results) - min(r.start_s for r in results)
    assert wall >= 3 * 0.02  # three waves of three


async def test_closed_loop_think_time_spaces_a_users_requests() -> None:
    backend = FakeBackend(lambda prompt, sampling: "ok", delay_s=0.01)
    results = await run_requests(
        one_call_app(), [{"article": "x"}] * 3, backend, MODELS, users=1, think_time_s=0.05
    )
    gaps = [b.start_s - a.end_s for a, b in itertools.pairwise(results)]
    assert all(gap >= 0.045 for gap in gaps)


async def test_open_loop_respects_offsets() -> None:
    backend = FakeBackend(lambda prompt, sampling: "ok", delay_s=0.3)
    offsets = [0.0, 0.1, 0.2, 0.2]
    results = await run_requests(
        one_call_app(),
        [{"article": str(i)} for i in range(4)],
        backend,
        MODELS,
        arrival_offsets_s=offsets,
    )
    t0 = results[0].start_s
    for result, offset in zip(results, offsets, strict=True):
        assert result.start_s - t0 == pytest.approx(offset, abs=0.04)
    assert backend.max_in_flight == 4  # open loop: arrivals do not wait for answers


async def test_run_requests_checks_its_arguments() -> None:
    backend = FakeBackend(lambda prompt, sampling: "ok")
    app = one_call_app()
    with pytest.raises(ValueError, match="exactly one of"):
        await run_requests(app, [{"article": "x"}], backend, MODELS)
    with pytest.raises(ValueError, match=r"one offset per request \(1\), got 2"):
        await run_requests(app, [{"article": "x"}], backend, MODELS, arrival_offsets_s=[0, 1])
    with pytest.raises(ValueError, match="users must be >= 1, got 0"):
        await run_requests(app, [{"article": "x"}], backend, MODELS, users=0)
    assert await run_requests(app, [], backend, MODELS, users=2) == []


async def test_calls_get_their_share_of_the_sla_along_the_critical_path() -> None:
    app = make_app(
        [llm("a", "first"), llm("b", "second {a.text}", depends_on=["a"]),
         llm("c", "third {b.text}", depends_on=["b"])],
        {"answer": "c.text"},
    )  # fmt: skip
    backend = FakeBackend(by_pattern([]), delay_s=0.01)
    result = await run_request(app, {"article": "x"}, backend, {"llm": "m"}, sla_e2e_s=30.0)
    assert result.ok
    offsets = [deadline - result.start_s for deadline in backend.deadlines]  # type: ignore[operator]
    assert offsets == pytest.approx([10.0, 20.0, 30.0])
    # each call also carries its request's deadline, what the request has left after it, and
    # whether an earlier call of the request ran (then admission does not shed it)
    budgets = [b for b in backend.budgets if b is not None]
    assert [b.request_deadline_s - result.start_s for b in budgets] == pytest.approx([30.0] * 3)  # type: ignore[operator]
    assert [(b.rest_calls, b.committed) for b in budgets] == [
        (2.0, False),
        (1.0, True),
        (0.0, True),
    ]
    backend_without = FakeBackend(by_pattern([]), delay_s=0.01)
    await run_request(app, {"article": "x"}, backend_without, {"llm": "m"})
    assert backend_without.deadlines == [None, None, None]
