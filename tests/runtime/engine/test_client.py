"""The streaming client against a scripted transport: timings, usage, errors, retries."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from runtime.engine.client import (
    CallFailure,
    CallRecord,
    EngineClient,
    SamplingParams,
    parse_sse_line,
)


def sse(*chunks: dict[str, object]) -> bytes:
    lines = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks]
    return ("".join(lines) + "data: [DONE]\n\n").encode()


def chat_chunk(text: str | None, finish: str | None = None) -> dict[str, object]:
    delta = {} if text is None else {"content": text}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}


def test_parse_sse_line_skips_keepalives_and_done() -> None:
    assert parse_sse_line("") is None
    assert parse_sse_line(": ping") is None
    assert parse_sse_line("data: [DONE]") is None
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}


async def test_chat_records_text_tokens_and_gaps() -> None:
    seen: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        body = sse(
            chat_chunk(""), chat_chunk("Hel"), chat_chunk("lo"), chat_chunk("!", "stop"), USAGE
        )
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async with EngineClient("http://engine", transport=httpx.MockTransport(handler)) as client:
        sampling = SamplingParams(max_tokens=5, ignore_eos=True, json_schema={"type": "object"})
        record = await client.chat("m", [{"role": "user", "content": "hi"}], sampling)
    assert record.ok and record.text == "Hello!" and record.failure is None
    assert (record.prompt_tokens, record.completion_tokens) == (7, 3)
    assert record.finish_reason == "stop"
    assert len(record.itl_s) == 2 and record.ttft_s is not None
    assert record.e2e_s >= record.ttft_s
    assert record.tpot_s is not None and record.tpot_s >= 0
    body = seen[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 5
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}  # type: ignore[index]


async def test_completions_endpoint_reads_text_choices() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        chunks = [{"choices": [{"text": "ab", "finish_reason": "length"}]}, USAGE]
        return httpx.Response(200, content=sse(*chunks))

    async with EngineClient("http://engine", transport=httpx.MockTransport(handler)) as client:
        record = await client.complete("m", "prompt", SamplingParams(max_tokens=2))
    assert record.text == "ab" and record.finish_reason == "length"


async def test_http_error_is_recorded_with_the_servers_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "max_tokens is too large"}})

    async with EngineClient("http://engine", transport=httpx.MockTransport(handler)) as client:
        record = await client.chat("m", [], SamplingParams())
    assert not record.ok
    assert record.error == "HTTP 400: max_tokens is too large"
    assert record.failure is CallFailure.UPSTREAM_ERROR


async def test_connection_errors_are_retried_then_recorded() -> None:
    attempts = 0

    def refusing(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        raise httpx.ConnectError("refused", request=request)

    client = EngineClient(
        "http://engine", connect_retries=2, retry_backoff_s=0.0,
        transport=httpx.MockTransport(refusing),
    )  # fmt: skip
    async with client:
        record = await client.chat("m", [], SamplingParams())
    assert attempts == 3 and record.retries == 2
    assert record.error is not None and record.error.startswith("connection:")
    assert record.failure is CallFailure.CONNECTION


async def test_retry_succeeds_after_a_transient_refusal() -> None:
    attempts = 0

    def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, content=sse(chat_chunk("ok", "stop"), USAGE))

    transport = httpx.MockTransport(flaky)
    async with EngineClient("http://e", retry_backoff_s=0.0, transport=transport) as client:
        record = await client.chat("m", [], SamplingParams())
    assert record.ok and record.retries == 1 and record.text == "ok"


async def test_every_failure_carries_its_kind() -> None:
    def error_chunk(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse({"error": "engine crashed"}))

    def read_timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    async def stalled(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(1.0)
        return httpx.Response(200, content=sse(USAGE))

    cases = [
        (error_chunk, 5.0, "ValueError: engine crashed", CallFailure.UPSTREAM_ERROR),
        (read_timeout, 5.0, "ReadTimeout: slow", CallFailure.TIMEOUT),
        (stalled, 0.05, "timeout after 0.05s", CallFailure.TIMEOUT),
    ]
    for handler, timeout_s, error, failure in cases:
        transport = httpx.MockTransport(handler)  # type: ignore[arg-type]
        async with EngineClient("http://e", timeout_s=timeout_s, transport=transport) as client:
            record = await client.chat("m", [], SamplingParams())
        assert (record.error, record.failure) == (error, failure)


def test_a_record_has_an_error_exactly_when_it_has_a_failure_kind() -> None:
    fields = {
        "start_s": 0.0, "ttft_s": None, "itl_s": (), "e2e_s": 0.0, "prompt_tokens": 0,
        "completion_tokens": 0, "finish_reason": None, "text": "",
    }  # fmt: skip
    with pytest.raises(ValueError, match="error and failure kind go together"):
        CallRecord(**fields, error="HTTP 500: x")
    with pytest.raises(ValueError, match="error and failure kind go together"):
        CallRecord(**fields, failure=CallFailure.TIMEOUT)
    assert CallRecord(**fields, error="x", failure=CallFailure.TIMEOUT).ok is False
