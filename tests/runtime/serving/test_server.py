"""The OpenAI-compatible front door, against fake engines served on loopback.

The front door runs under a real uvicorn on 127.0.0.1 and is driven by the real `openai`
client and by httpx; the engines behind it are tiny OpenAI-compatible fakes (FakeEngine), so
these tests need no vLLM and finish in seconds. `fmtune serve` itself is run in-process
through the CLI for what it checks before it starts anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message
from typer.testing import CliRunner

import runtime.engine.models
from runtime.cluster import start_endpoints
from runtime.deployment import Deployment, load_deployment
from runtime.engine.config import EngineConfig
from runtime.engine.pool import ReplicaPool
from runtime.engine.replica import free_port
from runtime.routing.prediction import StepModel
from runtime.routing.router import Router
from runtime.serving.app import _BodyTooLarge, _read_body, build_apps, create_app
from runtime.serving.config import ServeConfig
from runtime.serving.server import bind_listener, serve
from tests.runtime.fake_openai import FakeEngine, FakeReplica, LoopbackServer
from tuner.cli import app as fmtune_cli

REPO = Path(__file__).resolve().parents[3]

SERVED = "fake-model"
REPLY = "The quick brown fox jumps"
ANSWER = {"name": "Ada Lovelace", "email": "ada@example.org", "address": "12 St James Sq, London"}


@contextlib.contextmanager
def fake_engines(count: int, **kwargs: Any) -> Iterator[list[tuple[FakeEngine, LoopbackServer]]]:
    """`count` fake engines, each served on its own loopback port."""
    with contextlib.ExitStack() as stack:
        pairs = []
        for _ in range(count):
            engine = FakeEngine(served_model=SERVED, **kwargs)
            pairs.append((engine, stack.enter_context(LoopbackServer(engine.app))))
        yield pairs


def deployment_for(urls: list[str], **router: Any) -> Deployment:
    """An endpoints-mode deployment of one model key 'llm' over these URLs, with one app."""
    return Deployment.model_validate(
        {
            "cluster": "endpoints",
            "models": {"llm": {"engine": {"model": SERVED, "max_num_seqs": 8}, "endpoints": urls}},
            "router": {"policy": "round_robin", "metrics_refresh_s": 0.2, **router},
            "apps": {
                "extract": {"source": "extraction", "architecture": "single", "format": "json"}
            },
        }
    )


@contextlib.contextmanager
def front_door(
    deployment: Deployment, config: ServeConfig | None = None
) -> Iterator[tuple[LoopbackServer, Router]]:
    """create_app over a Router of the deployment's endpoints, served by uvicorn on loopback
    (the router is entered on the server's event loop, as serve() does)."""
    router = Router(start_endpoints(deployment, None), deployment.router, default_deadline_s=30)
    app = create_app(router, deployment, config or ServeConfig())
    with LoopbackServer(app, context=lambda: router) as door:
        yield door, router


def openai_client(door: LoopbackServer, api_key: str = "unused") -> openai.OpenAI:
    """The real OpenAI client pointed at the front door, without its own retries."""
    return openai.OpenAI(base_url=f"{door.url}/v1", api_key=api_key, max_retries=0, timeout=10)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll until `condition` holds (the server runs in its own thread, so blocking here is
    fine even in an async test); AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def metric_samples(text: str) -> dict[str, list[Any]]:
    """Samples of Prometheus text by family name (parsing fails loudly on bad text)."""
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def sample_value(samples: list[Any], name: str, **labels: str) -> float:
    """The value of the sample with this name and these labels."""
    for sample in samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    raise AssertionError(f"no sample {name} {labels} in {samples}")


# --------------------------------------------------------------------------------------------
# OpenAI API through the real client
# --------------------------------------------------------------------------------------------


def test_openai_client_chat_and_completions_streamed_and_not() -> None:
    with fake_engines(1, reply=REPLY) as engines:
        config = ServeConfig(api_key="s3cret")
        with front_door(deployment_for([engines[0][1].url]), config) as (door, _):
            client = openai_client(door, api_key="s3cret")
            messages = [{"role": "user", "content": "Say something."}]

            chat = client.chat.completions.create(model="llm", messages=messages, max_tokens=8)
            assert chat.choices[0].message.content == REPLY
            assert chat.usage is not None and chat.usage.completion_tokens == 5

            chunks = list(
                client.chat.completions.create(
                    model=SERVED,  # the served name maps to its key
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == REPLY
            assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 16
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

            completion = client.completions.create(model="llm", prompt="Once upon", max_tokens=8)
            assert completion.choices[0].text == REPLY
            assert completion.usage is not None and completion.usage.prompt_tokens == 11

            streamed = list(client.completions.create(model="llm", prompt="Once", stream=True))
            assert "".join(c.choices[0].text for c in streamed if c.choices) == REPLY
            assert all(c.usage is None for c in streamed)  # not asked for

    engine = engines[0][0]
    assert [body["model"] for body in engine.bodies] == [SERVED] * 4  # keys mapped to served
    assert engine.bodies[1]["stream_options"] == {"include_usage": True}


def test_models_unknown_model_and_upstream_error() -> None:
    with (
        fake_engines(1) as engines,
        front_door(deployment_for([engines[0][1].url])) as (door, _),
    ):
        client = openai_client(door)
        assert sorted(model.id for model in client.models.list()) == ["fake-model", "llm"]

        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(
                model="gpt-4", messages=[{"role": "user", "content": "hi"}]
            )
        assert missing.value.code == "model_not_found"
        assert "gpt-4" in missing.value.message

        with pytest.raises(openai.BadRequestError) as rejected:  # the engine's 400 passes through
            client.completions.create(model="llm", prompt="hi", max_tokens=5000)
        assert "max_tokens must be at most 1000, got 5000" in rejected.value.message


def test_bad_bodies_name_the_field() -> None:
    with (
        fake_engines(1) as engines,
        front_door(deployment_for([engines[0][1].url])) as (door, _),
        httpx.Client(base_url=door.url, timeout=10) as http,
    ):
        no_messages = http.post("/v1/chat/completions", json={"model": "llm"})
        assert no_messages.status_code == 422
        error = no_messages.json()["error"]
        assert error["param"] == "messages"
        assert "messages" in error["message"] and "required" in error["message"]

        bad_tokens = http.post(
            "/v1/chat/completions",
            json={"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        )
        assert bad_tokens.status_code == 422
        assert bad_tokens.json()["error"]["param"] == "max_tokens"
        assert "got 0" in bad_tokens.json()["error"]["message"]

        assert engines[0][0].calls == 0


def test_malformed_bodies_are_400_with_the_parsers_message() -> None:
    with (
        fake_engines(1) as engines,
        front_door(deployment_for([engines[0][1].url])) as (door, _),
        httpx.Client(base_url=door.url, timeout=10) as http,
    ):
        text = '{"model": "llm", "messages": [}'
        with pytest.raises(json.JSONDecodeError) as parser:
            json.loads(text)
        invalid = http.post(
            "/v1/chat/completions", content=text, headers={"content-type": "application/json"}
        )
        assert invalid.status_code == 400
        error = invalid.json()["error"]
        assert error["code"] == "invalid_json" and error["type"] == "invalid_request_error"
        assert error["message"] == f"request body is not valid JSON: {parser.value}"
        assert "line 1 column 31 (char 30)" in error["message"]

        form = http.post("/v1/completions", content=b'{"model": "llm", "prompt": "hi"}')
        assert form.status_code == 400  # no Content-Type: not parsed as JSON, as vLLM does
        assert form.json()["error"]["code"] == "unsupported_media_type"
        assert "Content-Type: application/json" in form.json()["error"]["message"]
        wrong = http.post("/v1/completions", content=b"{oops", headers={"content-type": "j"})
        assert wrong.status_code == 400
        assert "got Content-Type 'j'" in wrong.json()["error"]["message"]

        empty = http.post("/v1/completions", headers={"content-type": "application/json"})
        assert empty.status_code == 400
        assert empty.json()["error"]["code"] == "missing_body"

        app_invalid = http.post(
            "/v1/apps/extract", content=b"{", headers={"content-type": "application/json"}
        )
        assert app_invalid.status_code == 400
        assert app_invalid.json()["error"]["code"] == "invalid_json"
    assert engines[0][0].calls == 0


def test_api_key_guards_every_route_but_the_health_checks_and_version() -> None:
    with (
        fake_engines(1) as engines,
        front_door(deployment_for([engines[0][1].url]), ServeConfig(api_key="k1")) as (door, _),
        httpx.Client(base_url=door.url, timeout=10) as http,
    ):
        body = {"model": "llm", "prompt": "hi"}
        assert http.post("/v1/completions", json=body).status_code == 401
        wrong = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k2"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/metrics").status_code == 401
        assert http.get("/v1/models").status_code == 401
        right = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k1"})
        assert right.status_code == 200
        for path in ("/health", "/healthz", "/version"):  # open, as vLLM leaves them
            assert http.get(path).status_code == 200, path
        with pytest.raises(openai.AuthenticationError):
            openai_client(door, api_key="nope").models.list()


async def test_streams_are_relayed_as_produced_and_freed_on_disconnect() -> None:
    with (
        fake_engines(1, reply="a b c d e f", chunk_delay_s=0.25) as engines,
        front_door(deployment_for([engines[0][1].url])) as (door, router),
    ):
        body = {"model": "llm", "prompt": "hi", "stream": True}
        async with httpx.AsyncClient(base_url=door.url, timeout=10) as http:
            start = time.monotonic()
            arrivals: list[float] = []
            async with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        arrivals.append(time.monotonic() - start)
                    if len(arrivals) == 2:  # mid-stream: decoding, past its prefill
                        mid = router.endpoints[0]
                        assert (mid.outstanding, mid.outstanding_prefill_tokens) == (1, 0)
            assert len(arrivals) == 7  # six chunks and [DONE]
            assert arrivals[0] < 0.5 < 1.2 < arrivals[-1]  # first token long before the end
            assert engines[0][0].bodies[0]["model"] == SERVED
            # the relay teaches the router when it closes the upstream, just after the last
            # byte went out: the client can see the end first
            wait_for(lambda: "llm/0" in router.speeds.snapshot(), 2.0, "the relay's observation")

            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for _ in response.aiter_lines():
                    break  # the client goes away after the first chunk
            gone_at = time.monotonic()

            def drained() -> bool:
                endpoint = router.endpoints[0]
                return endpoint.outstanding == 0 and endpoint.outstanding_decode_tokens == 0

            wait_for(drained, 2.0, "the disconnected stream's slot")
            assert time.monotonic() - gone_at < 1.0  # freed before the stream would have ended
            samples = metric_samples((await http.get("/metrics")).text)
            in_flight = samples["fmtune_in_flight_requests"]
            assert sample_value(in_flight, "fmtune_in_flight_requests") == 0


def test_health_and_version_as_vllm_answers_them() -> None:
    with fake_engines(2) as engines:
        deployment = deployment_for([server.url for _, server in engines])
        with (
            front_door(deployment) as (door, router),
            httpx.Client(base_url=door.url, timeout=10) as http,
        ):
            version = http.get("/version")
            assert version.status_code == 200
            assert version.json() == {"version": importlib.metadata.version("fmtune")}

            for path in ("/health", "/healthz"):
                answer = http.get(path)
                assert answer.status_code == 200, path
                assert answer.json()["models"] == {"llm": 2}

            for _, server in engines:
                server.stop()  # both replicas die; the next call finds out (and retries once)
            gone = http.post("/v1/completions", json={"model": "llm", "prompt": "hi"})
            assert gone.status_code == 503
            assert not any(endpoint.healthy for endpoint in router.endpoints)
            for path in ("/health", "/healthz"):
                answer = http.get(path)
                assert answer.status_code == 503, path
                assert answer.json()["status"] == "unhealthy"


# --------------------------------------------------------------------------------------------
# Request size: 413 before the body is read whole or forwarded
# --------------------------------------------------------------------------------------------

BIG = 20_000_000


def test_bodies_over_max_body_bytes_are_413_and_never_forwarded() -> None:
    limit = 64 * 1024
    with fake_engines(1, reply=json.dumps(ANSWER)) as engines:
        config = ServeConfig(max_body_bytes=limit)
        with (
            front_door(deployment_for([engines[0][1].url]), config) as (door, _),
            httpx.Client(base_url=door.url, timeout=30) as http,
        ):
            prompt = "a" * BIG
            declared = http.post("/v1/completions", json={"model": "llm", "prompt": prompt})
            assert declared.status_code == 413
            error = declared.json()["error"]
            assert error["code"] == "request_too_large"
            assert error["type"] == "invalid_request_error"
            assert f"bytes declared, over max_body_bytes={limit}" in error["message"]

            def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
                yield b'{"model": "llm", "prompt": "'
                for _ in range(BIG // 65536):
                    yield b"a" * 65536
                yield b'"}'

            streamed = http.post(
                "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
            )
            assert streamed.status_code == 413
            assert f"more than {limit} bytes received" in streamed.json()["error"]["message"]

            app_run = http.post("/v1/apps/extract", json={"inputs": {"article": prompt}})
            assert app_run.status_code == 413  # not 502: the engine never sees it
            assert app_run.json()["error"]["code"] == "request_too_large"

            article = "Contact Ada Lovelace at ada@example.org."
            small = http.post("/v1/apps/extract", json={"inputs": {"article": article}})
            assert small.status_code == 200  # the same client (connection) carries on
            assert engines[0][0].calls == 1  # the small one only

            samples = metric_samples(http.get("/metrics").text)["fmtune_requests"]
            for route, app, count in (
                ("/v1/completions", "", 2),
                ("/v1/apps/{name}", "extract", 1),
            ):
                value = sample_value(
                    samples, "fmtune_requests_total", route=route, code="413", app=app
                )
                assert value == count


async def test_body_reader_stops_at_the_limit_of_an_endless_body() -> None:
    received = 0

    async def endless() -> Message:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    with pytest.raises(_BodyTooLarge) as too_large:
        await _read_body(endless, 10_000)
    assert received == 11 and too_large.value.received == 11_000  # one message past it

    messages = iter(
        [
            {"type": "http.request", "body": b"ab", "more_body": True},
            {"type": "http.request", "body": b"c", "more_body": False},
        ]
    )

    async def short() -> Message:
        return next(messages)

    assert await _read_body(short, 10_000) == b"abc"

    async def gone() -> Message:
        return {"type": "http.disconnect"}

    assert await _read_body(gone, 10_000) is None


# --------------------------------------------------------------------------------------------
# Load: the bounded front door, the router's queue and shedding
# --------------------------------------------------------------------------------------------


async def test_burst_beyond_max_queue_gets_429_with_retry_after() -> None:
    with fake_engines(1, delay_s=0.6) as engines:
        config = ServeConfig(max_queue=2, retry_after_s=3)
        with front_door(deployment_for([engines[0][1].url]), config) as (door, _):
            async with httpx.AsyncClient(base_url=door.url, timeout=10) as http:
                body = {"model": "llm", "messages": [{"role": "user", "content": "hi"}]}
                answers = await asyncio.gather(
                    *(http.post("/v1/chat/completions", json=body) for _ in range(6))
                )
                codes = sorted(answer.status_code for answer in answers)
                assert codes == [200, 200, 429, 429, 429, 429]
                for answer in answers:
                    if answer.status_code == 429:
                        assert answer.headers["retry-after"] == "3"
                        assert answer.json()["error"]["code"] == "queue_full"
                samples = metric_samples((await http.get("/metrics")).text)
                assert (
                    sample_value(
                        samples["fmtune_rejected_429"],
                        "fmtune_rejected_429_total",
                        reason="front_door",
                    )
                    == 4
                )
                assert (
                    sample_value(samples["fmtune_in_flight_requests"], "fmtune_in_flight_requests")
                    == 0
                )
    assert engines[0][0].calls == 2


async def test_router_queue_full_and_shed_are_429_with_retry_after() -> None:
    with fake_engines(1, delay_s=0.6) as engines:
        deployment = deployment_for([engines[0][1].url], queue_capacity=1)
        engine = deployment.models["llm"].engine.with_knobs(max_num_seqs=1)
        deployment = deployment.model_copy(
            update={
                "models": {"llm": deployment.models["llm"].model_copy(update={"engine": engine})}
            }
        )
        with front_door(deployment) as (door, router):
            async with httpx.AsyncClient(base_url=door.url, timeout=10) as http:
                body = {"model": "llm", "prompt": "hi"}
                first = asyncio.create_task(http.post("/v1/completions", json=body))
                await asyncio.sleep(0.2)
                second = asyncio.create_task(http.post("/v1/completions", json=body))  # queued
                await asyncio.sleep(0.2)
                third = await http.post("/v1/completions", json=body)  # queue full
                assert third.status_code == 429
                assert third.headers["retry-after"] == "1"
                assert third.json()["error"]["message"].startswith("queue full:")
                assert (await first).status_code == 200
                assert (await second).status_code == 200
                assert router.stats.queue_rejected == 1

    with fake_engines(1) as engines:
        deployment = deployment_for([engines[0][1].url], policy="sla_aware")
        config = ServeConfig(sla_e2e_s=0.05, retry_after_s=2)
        with front_door(deployment, config) as (door, router):
            client = openai_client(door)
            with pytest.raises(openai.RateLimitError) as shed:
                client.completions.create(model="llm", prompt="hi", max_tokens=500)
            assert shed.value.status_code == 429
            assert shed.value.code == "shed"
            assert shed.value.response.headers["retry-after"] == "2"
            async with httpx.AsyncClient(base_url=door.url, timeout=10) as http:
                body = {"model": "llm", "messages": [{"role": "user", "content": "hi"}]}
                again = await http.post("/v1/chat/completions", json=body | {"max_tokens": 500})
                assert again.status_code == 429
                assert again.headers["retry-after"] == "2"
                app_run = await http.post("/v1/apps/extract", json={"inputs": {"article": "x"}})
                assert app_run.status_code == 429  # a failed request, answered at once
                assert app_run.headers["retry-after"] == "2"
                assert app_run.json()["ok"] is False
                assert app_run.json()["error"].startswith("node ")
                samples = metric_samples((await http.get("/metrics")).text)
            rejected = samples["fmtune_rejected_429"]
            assert sample_value(rejected, "fmtune_rejected_429_total", reason="shed") == 3
            assert router.stats.shed == 3
            assert engines[0][0].calls == 0  # shed before any engine saw it


# --------------------------------------------------------------------------------------------
# Failures: a dying endpoint
# --------------------------------------------------------------------------------------------


def test_dead_endpoint_calls_retried_none_lost_and_reported() -> None:
    with fake_engines(2, reply=REPLY) as engines:
        (alive, _), (doomed, doomed_server) = engines
        urls = [server.url for _, server in engines]
        deployment = deployment_for(urls, health_probes=2, health_probe_interval_s=0.05)
        with (
            front_door(deployment) as (door, router),
            httpx.Client(base_url=door.url, timeout=10) as http,
        ):
            client = openai_client(door)
            messages = [{"role": "user", "content": "hi"}]
            for _ in range(4):
                assert client.chat.completions.create(model="llm", messages=messages)
            assert alive.calls == 2 and doomed.calls == 2

            doomed_server.stop()  # connection refused from now on

            def one(index: int) -> str:
                if index % 2:
                    stream = client.chat.completions.create(
                        model="llm", messages=messages, stream=True
                    )
                    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                reply = client.chat.completions.create(model="llm", messages=messages)
                return reply.choices[0].message.content or ""

            texts = [one(index) for index in range(8)]
            assert texts == [REPLY] * 8  # none lost
            assert alive.calls == 10 and doomed.calls == 2
            assert router.stats.retried == 1  # the first call that hit the dead one

            health = http.get("/healthz")
            assert health.status_code == 200
            assert health.json()["healthy_endpoints"] == 1
            assert health.json()["endpoints"] == {"llm/0": True, "llm/1": False}

            def declared_dead() -> bool:  # once its health probes have failed
                failures = metric_samples(http.get("/metrics").text)["fmtune_endpoint_failures"]
                return any(sample.value == 1 for sample in failures)

            wait_for(declared_dead, 5, "the dead endpoint's probes to fail")
            samples = metric_samples(http.get("/metrics").text)
            healthy = samples["fmtune_endpoints_healthy"]
            assert sample_value(healthy, "fmtune_endpoints_healthy", model_key="llm") == 1
            retries = samples["fmtune_router_retries"]
            assert sample_value(retries, "fmtune_router_retries_total") == 1
            failures = samples["fmtune_endpoint_failures"]
            assert sample_value(failures, "fmtune_endpoint_failures_total", model_key="llm") == 1

            engines[0][1].stop()  # the last one too: nothing can serve
            gone = http.post("/v1/completions", json={"model": "llm", "prompt": "hi"})
            assert gone.status_code == 503
            assert gone.json()["error"]["code"] in ("upstream_unavailable", "no_healthy_endpoint")
            assert http.get("/healthz").status_code == 503
            app_run = http.post("/v1/apps/extract", json={"inputs": {"article": "x"}})
            assert app_run.status_code == 503
            assert app_run.json()["error"]["code"] == "no_healthy_endpoint"


# --------------------------------------------------------------------------------------------
# Apps and metrics
# --------------------------------------------------------------------------------------------


def test_app_route_runs_the_extraction_dag() -> None:
    with (
        fake_engines(1, reply=json.dumps(ANSWER)) as engines,
        front_door(deployment_for([engines[0][1].url])) as (door, _),
        httpx.Client(base_url=door.url, timeout=10) as http,
    ):
        article = "Contact Ada Lovelace at ada@example.org, 12 St James Sq, London."
        answer = http.post("/v1/apps/extract", json={"inputs": {"article": article}})
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["ok"] is True and result["error"] is None
        assert result["outputs"] == ANSWER
        assert result["llm_calls"] == 1 and result["e2e_s"] > 0
        assert article in engines[0][0].bodies[0]["messages"][-1]["content"]

        missing = http.post("/v1/apps/extract", json={"inputs": {}})
        assert missing.status_code == 422
        assert missing.json()["error"]["param"] == "inputs.article"
        unknown = http.post("/v1/apps/nope", json={"inputs": {"article": article}})
        assert unknown.status_code == 404
        assert "nope" in unknown.json()["error"]["message"]
        no_inputs = http.post("/v1/apps/extract", json={"article": article})
        assert no_inputs.status_code == 422


def test_app_failure_keeps_the_body_with_an_error_status() -> None:
    engine = FakeEngine(served_model="another-model")  # answers 404 to the deployment's name
    with (
        LoopbackServer(engine.app) as server,
        front_door(deployment_for([server.url])) as (door, _),
        httpx.Client(base_url=door.url, timeout=10) as http,
    ):
        answer = http.post("/v1/apps/extract", json={"inputs": {"article": "text"}})
        assert answer.status_code == 502
        result = answer.json()
        assert result["ok"] is False and result["outputs"] == {}
        assert "node 'extract'" in result["error"] and "HTTP 404" in result["error"]


def test_metrics_parse_and_hold_latency_histogram_and_sla() -> None:
    with (
        fake_engines(1) as engines,
        front_door(deployment_for([engines[0][1].url]), ServeConfig(sla_e2e_s=5)) as (door, _),
        httpx.Client(base_url=door.url, timeout=10) as http,
    ):
        for _ in range(3):
            assert http.post("/v1/completions", json={"model": "llm", "prompt": "x"}).is_success
        http.post("/v1/completions", json={"model": "unknown", "prompt": "x"})  # 404
        samples = metric_samples(http.get("/metrics").text)
        latency = samples["fmtune_request_duration_seconds"]
        route = "/v1/completions"
        by_key = {"route": route, "app": "", "model_key": "llm"}
        count = sample_value(latency, "fmtune_request_duration_seconds_count", **by_key)
        assert count == 3
        infinite = sample_value(
            latency, "fmtune_request_duration_seconds_bucket", **by_key, le="+Inf"
        )
        assert infinite == 3
        unknown = {"route": route, "app": "", "model_key": ""}  # never a client's model name
        assert sample_value(latency, "fmtune_request_duration_seconds_count", **unknown) == 1
        attainment = samples["fmtune_sla_attainment"]
        assert sample_value(attainment, "fmtune_sla_attainment", model_key="llm") == 1.0
        requests = samples["fmtune_requests"]
        assert sample_value(requests, "fmtune_requests_total", **unknown, code="404") == 1
        for family in (
            "fmtune_router_queue_depth",
            "fmtune_router_shed",
            "fmtune_in_flight_requests",
            "fmtune_time_to_first_token_seconds",
        ):
            assert family in samples


def test_metrics_by_app_and_model_key_with_ttft_and_sla_attainment() -> None:
    good = FakeEngine(served_model=SERVED, reply=json.dumps(ANSWER), delay_s=0.2)
    wrong = FakeEngine(served_model="another-model")  # answers 404 to the deployment's name
    with LoopbackServer(good.app) as good_server, LoopbackServer(wrong.app) as wrong_server:
        deployment = Deployment.model_validate(
            {
                "cluster": "endpoints",
                "models": {
                    "llm": {"engine": {"model": SERVED}, "endpoints": [good_server.url]},
                    "other": {"engine": {"model": SERVED}, "endpoints": [wrong_server.url]},
                },
                "router": {"policy": "round_robin"},
                "apps": {
                    "extract": {"source": "extraction", "model_key": "llm"},
                    "broken": {"source": "extraction", "model_key": "other"},
                },
            }
        )
        with (
            front_door(deployment, ServeConfig(sla_e2e_s=30)) as (door, _),
            httpx.Client(base_url=door.url, timeout=10) as http,
        ):
            client = openai_client(door)
            messages = [{"role": "user", "content": "hi"}]
            assert client.chat.completions.create(model="llm", messages=messages)
            stream = client.chat.completions.create(model="llm", messages=messages, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            inputs = {"inputs": {"article": "Contact Ada Lovelace at ada@example.org."}}
            assert http.post("/v1/apps/extract", json=inputs).status_code == 200
            assert http.post("/v1/apps/broken", json=inputs).status_code == 502
            samples = metric_samples(http.get("/metrics").text)

    requests = samples["fmtune_requests"]
    chat = {"route": "/v1/chat/completions", "code": "200", "app": "", "model_key": "llm"}
    assert sample_value(requests, "fmtune_requests_total", **chat) == 2
    apps = {"route": "/v1/apps/{name}", "model_key": ""}
    assert sample_value(requests, "fmtune_requests_total", **apps, app="extract", code="200") == 1
    assert sample_value(requests, "fmtune_requests_total", **apps, app="broken", code="502") == 1

    ttft = samples["fmtune_time_to_first_token_seconds"]
    name = "fmtune_time_to_first_token_seconds"
    # the streamed call only (a JSON answer has no first token to see), from its arrival
    assert sample_value(ttft, f"{name}_count", app="", model_key="llm") == 1
    assert 0.2 <= sample_value(ttft, f"{name}_sum", app="", model_key="llm") < 5
    # the app's one LLM call, on the model key it called
    assert sample_value(ttft, f"{name}_count", app="extract", model_key="llm") == 1
    assert 0.2 <= sample_value(ttft, f"{name}_sum", app="extract", model_key="llm") < 5

    attainment = samples["fmtune_sla_attainment"]
    sla = "fmtune_sla_attainment"
    assert sample_value(attainment, sla, app="", model_key="llm") == 1.0
    assert sample_value(attainment, sla, app="", model_key="other") == 1.0  # none finished
    assert sample_value(attainment, sla, app="extract", model_key="") == 1.0
    assert sample_value(attainment, sla, app="broken", model_key="") == 0.0

    # the router's predicted completions of the calls it measured: the streamed call and the
    # app's call (a JSON answer is not timed token by token, a failed call not at all)
    error = samples["fmtune_router_prediction_error"]
    assert sample_value(error, "fmtune_router_prediction_error_count") == 2
    assert sample_value(error, "fmtune_router_prediction_error_bucket", le="+Inf") == 2
    assert "fmtune_router_prediction_error_quantile" in samples


# --------------------------------------------------------------------------------------------
# serve(): local replicas, replacement of a dead one, SIGTERM
# --------------------------------------------------------------------------------------------


def _healthz(base: str) -> dict[str, Any] | None:
    try:
        return httpx.get(f"{base}/healthz", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return None


@pytest.fixture
def no_model_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake replicas serve any model name: skip the check that it is a prepared model."""
    monkeypatch.setattr(runtime.engine.models, "resolve_model", lambda name: Path(name))


@pytest.mark.usefixtures("no_model_check")
@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="needs the main thread"
)
def test_serve_replaces_a_dead_replica_and_stops_all_on_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "DEPLOY.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": {"llm": {"engine": {"model": SERVED}, "replicas": 2}},
                "router": {"policy": "round_robin", "metrics_refresh_s": 0.1},
            }
        )
    )
    started: list[FakeReplica] = []

    def factory(config: EngineConfig, replica_id: str, env: dict[str, str]) -> FakeReplica:
        replica = FakeReplica(config, replica_id)
        started.append(replica)
        return replica

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    outcome: dict[str, Any] = {}
    served = threading.Event()

    def drive() -> None:
        try:
            wait_for(lambda: (_healthz(base) or {}).get("healthy_endpoints") == 2, 10, "startup")
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=10)
            reply = client.completions.create(model="llm", prompt="hi")
            outcome["first"] = reply.choices[0].text
            started[0].die()  # a replica crashes; the router notices, the pool replaces it

            def replaced() -> bool:
                health = _healthz(base) or {}
                return health.get("healthy_endpoints") == 2 and len(started) == 3

            wait_for(replaced, 10, "the replacement replica")
            outcome["endpoints"] = sorted((_healthz(base) or {})["endpoints"])
            outcome["after"] = client.completions.create(model="llm", prompt="hi").choices[0].text
        except BaseException as error:
            outcome["error"] = error
        finally:
            if not served.is_set():
                os.kill(os.getpid(), signal.SIGTERM)

    phases: list[str] = []
    ready: list[tuple[str, bool]] = []

    def on_ready(url: str) -> None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            ready.append((url, len(started) == 2))  # listening, every replica already up
            return
        ready.append((url, False))

    looked_up: list[tuple[list[str], int]] = []

    def step_models(deployment: Deployment, replicas: int) -> dict[str, StepModel]:
        looked_up.append((sorted(deployment.models), replicas))
        return {}

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    try:
        serve(
            path,
            ServeConfig(port=port),
            pool=ReplicaPool(factory=factory),
            on_phase=phases.append,
            on_ready=on_ready,
            step_models=step_models,
        )
    finally:
        served.set()
        driver.join(timeout=15)
    assert "error" not in outcome, outcome.get("error")
    assert phases == [f"starting 2 replica(s) of {SERVED} for model key 'llm'"]
    assert ready == [(base, True)]
    assert looked_up == [(["llm"], 2)]  # the router's predictions, once its replicas are up
    assert outcome["first"] == outcome["after"] == "Hello from the fake engine"
    assert len(outcome["endpoints"]) == 2
    assert f"llm/{started[0].replica_id}" not in outcome["endpoints"]
    assert len(started) == 3
    assert all(not replica.running() for replica in started)  # the pool was closed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


# --------------------------------------------------------------------------------------------
# fmtune serve: bad input is one line before anything starts or is announced
# --------------------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    """A runner of the `fmtune` CLI in this process, undoing the logging set-up it does."""
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield CliRunner()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def acquired(monkeypatch: pytest.MonkeyPatch) -> list[EngineConfig]:
    """Every replica any pool is asked for (none is started)."""
    calls: list[EngineConfig] = []

    def acquire(self: ReplicaPool, config: EngineConfig, count: int = 1) -> list[Any]:
        calls.append(config)
        raise AssertionError("a replica was asked for")

    monkeypatch.setattr(ReplicaPool, "acquire", acquire)
    return calls


def _write(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


LOCAL = {"models": {"llm": {"engine": {"model": "smollm2-135m"}, "replicas": 2}}}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"models": {"llm": {"engine": {"model": "smollm2-135m", "max_num_seqs": 0}}}},
            ("models.llm.engine.max_num_seqs: ", "got 0"),
        ),
        (
            {"models": {"llm": {"engine": {"model": "no-such-model"}}}},
            ("models.llm.engine.model: ", "catalog name", "got 'no-such-model'"),
        ),
        (
            {"apps": {"extract": {"source": "extraction", "architecture": "nope"}}},
            ("apps.extract: architecture must be one of", "got 'nope'"),
        ),
        ({"router": {"polcy": "sla_aware"}}, ("'router.polcy'", "did you mean 'policy'")),
    ],
    ids=["value", "model", "app", "misspelled"],
)
def test_serve_a_bad_deploy_file_is_one_line_exit_2_nothing_started_or_announced(
    tmp_path: Path,
    cli: CliRunner,
    acquired: list[EngineConfig],
    change: dict[str, Any],
    expected: tuple[str, ...],
) -> None:
    path = _write(tmp_path / "DEPLOY.yaml", {**LOCAL, **change})

    result = cli.invoke(fmtune_cli, ["serve", str(path), "--port", str(free_port())])

    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: ")
    assert all(part in lines[0] for part in expected), lines[0]
    assert "serving" not in result.stdout and "starting" not in result.stdout
    assert acquired == []


@pytest.mark.usefixtures("no_model_check")
def test_serve_on_a_taken_port_fails_before_any_replica_starts(
    tmp_path: Path, cli: CliRunner, acquired: list[EngineConfig]
) -> None:
    path = _write(tmp_path / "DEPLOY.yaml", LOCAL)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli.invoke(fmtune_cli, ["serve", str(path), "--port", str(port)])

    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert result.stdout == "" and acquired == []


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="needs the main thread"
)
def test_serve_announces_itself_once_it_answers(tmp_path: Path, cli: CliRunner) -> None:
    with fake_engines(1) as engines:
        path = _write(
            tmp_path / "DEPLOY.yaml",
            {
                "cluster": "endpoints",
                "models": {"llm": {"engine": {"model": SERVED}, "endpoints": [engines[0][1].url]}},
            },
        )
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        health: list[int] = []
        served = threading.Event()

        def drive() -> None:
            try:
                wait_for(
                    lambda: served.is_set() or (_healthz(base) or {}).get("status") == "ok",
                    20,
                    "/healthz",
                )
                health.append(httpx.get(f"{base}/health", timeout=5).status_code)
            finally:
                if not served.is_set():  # never signal a process that no longer serves
                    os.kill(os.getpid(), signal.SIGTERM)

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        try:
            result = cli.invoke(fmtune_cli, ["serve", str(path), "--port", str(port)])
        finally:
            served.set()
            driver.join(timeout=15)

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"serving {path} on {base} (Ctrl-C stops it)"
    assert health == [200]


# --------------------------------------------------------------------------------------------
# The shipped example: experiments/serve-cpu.deploy.yaml
# --------------------------------------------------------------------------------------------


def test_the_shipped_serve_example_is_two_eager_replicas_behind_sla_aware_with_the_app() -> None:
    deployment = load_deployment(REPO / "experiments" / "serve-cpu.deploy.yaml")
    assert deployment.cluster == "local"
    assert list(deployment.models) == ["llm"]
    model = deployment.models["llm"]
    assert model.replicas == 2
    quickstart = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())
    assert model.engine == EngineConfig(**quickstart["deployment"]["models"]["llm"]["engine"])
    assert model.engine.model == "smollm2-135m" and model.engine.enforce_eager
    assert deployment.router.policy == "sla_aware"
    assert {name: app.source for name, app in deployment.apps.items()} == {"extract": "extraction"}
    assert deployment.apps["extract"].model_key == ""  # each node calls the key the app names
    built = build_apps(deployment)  # what the front door builds before it serves
    assert list(built) == ["extract"] and built["extract"][1] == {"llm": "llm"}


def test_the_listener_is_tcp_without_nagle() -> None:
    """Accepted connections send small writes at once: with Nagle's algorithm on, a response
    written as headers then body waited ~40 ms for the client's delayed ACK."""
    listener = bind_listener(ServeConfig(port=free_port()))
    try:
        assert listener.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY only then
        listener.listen()
        with socket.create_connection(listener.getsockname()[:2]):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listener.close()


def test_one_app_folder_calls_two_model_keys_node_by_node(tmp_path: Path) -> None:
    """A deployment of two model keys serves an app whose nodes call both: the app of
    `fmtune init`, its recall node on 'llm' and its answer node on 'big'."""
    assert CliRunner().invoke(fmtune_cli, ["init", str(tmp_path / "mine")]).exit_code == 0
    small = FakeEngine(served_model=SERVED, reply="Paris is the capital of France.")
    big = FakeEngine(served_model="big-model", reply='{"capital": "Paris"}')
    with LoopbackServer(small.app) as small_server, LoopbackServer(big.app) as big_server:
        deployment = Deployment.model_validate(
            {
                "cluster": "endpoints",
                "models": {
                    "llm": {"engine": {"model": SERVED}, "endpoints": [small_server.url]},
                    "big": {"engine": {"model": "big-model"}, "endpoints": [big_server.url]},
                },
                "apps": {
                    "capitals": {
                        "source": str(tmp_path / "mine"),
                        "architecture": "recall_then_answer",
                        "nodes": {"answer": {"model": "big"}},
                    }
                },
            }
        )
        with (
            front_door(deployment) as (door, _),
            httpx.Client(base_url=door.url, timeout=10) as http,
        ):
            answer = http.post("/v1/apps/capitals", json={"inputs": {"country": "France"}})
            missing = http.post("/v1/apps/capitals", json={"inputs": {"article": "x"}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"] == {"capital": "Paris"} and answer.json()["llm_calls"] == 2
    assert (small.calls, big.calls) == (1, 1)
    assert "France" in big.bodies[0]["messages"][-1]["content"]
    assert missing.status_code == 422 and "inputs.country" in missing.text
