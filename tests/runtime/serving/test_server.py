"""The OpenAI-compatible front door, against fake engines served on loopback.

The front door runs under a real uvicorn on 127.0.0.1 and is driven by the real `openai`
client and by httpx; the engines behind it are tiny OpenAI-compatible fakes (FakeEngine), so
these tests need no vLLM and finish in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
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

from runtime.cluster import start_endpoints
from runtime.deployment import Deployment
from runtime.engine.config import EngineConfig
from runtime.engine.pool import ReplicaPool
from runtime.engine.replica import free_port
from runtime.routing.router import Router
from runtime.serving.app import create_app
from runtime.serving.config import ServeConfig
from runtime.serving.server import serve
from tests.runtime.fake_openai import FakeEngine, FakeReplica, LoopbackServer

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
            "apps": {"extract": {"architecture": "single", "format": "json"}},
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

        not_json = http.post("/v1/completions", content=b"{oops", headers={"content-type": "j"})
        assert not_json.status_code == 422


def test_api_key_guards_every_route_but_healthz() -> None:
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
        assert http.get("/healthz").status_code == 200
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


async def test_router_queue_full_is_429_and_shed_is_503() -> None:
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
        config = ServeConfig(sla_e2e_s=0.05)
        with front_door(deployment, config) as (door, router):
            client = openai_client(door)
            with pytest.raises(openai.InternalServerError) as shed:
                client.completions.create(model="llm", prompt="hi", max_tokens=500)
            assert shed.value.status_code == 503
            assert shed.value.code == "shed"
            assert router.stats.shed == 1
            assert engines[0][0].calls == 0


# --------------------------------------------------------------------------------------------
# Failures: a dying endpoint
# --------------------------------------------------------------------------------------------


def test_dead_endpoint_calls_retried_none_lost_and_reported() -> None:
    with fake_engines(2, reply=REPLY) as engines:
        (alive, _), (doomed, doomed_server) = engines
        deployment = deployment_for([server.url for _, server in engines])
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
        count = sample_value(latency, "fmtune_request_duration_seconds_count", route=route)
        assert count == 4
        infinite = sample_value(
            latency, "fmtune_request_duration_seconds_bucket", route=route, le="+Inf"
        )
        assert infinite == 4
        attainment = samples["fmtune_sla_attainment"]
        assert sample_value(attainment, "fmtune_sla_attainment") == 1.0  # the 404 is not counted
        requests = samples["fmtune_requests"]
        assert sample_value(requests, "fmtune_requests_total", route=route, code="404") == 1
        for family in (
            "fmtune_router_queue_depth",
            "fmtune_router_shed",
            "fmtune_in_flight_requests",
        ):
            assert family in samples


# --------------------------------------------------------------------------------------------
# serve(): local replicas, replacement of a dead one, SIGTERM
# --------------------------------------------------------------------------------------------


def _healthz(base: str) -> dict[str, Any] | None:
    try:
        return httpx.get(f"{base}/healthz", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return None


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

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    try:
        serve(path, ServeConfig(port=port), pool=ReplicaPool(factory=factory))
    finally:
        served.set()
        driver.join(timeout=15)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["first"] == outcome["after"] == "Hello from the fake engine"
    assert len(outcome["endpoints"]) == 2
    assert f"llm/{started[0].replica_id}" not in outcome["endpoints"]
    assert len(started) == 3
    assert all(not replica.running() for replica in started)  # the pool was closed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
