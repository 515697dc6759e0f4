"""The router's live side against scripted endpoints: policy use, queueing, shedding, retry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from runtime.engine.client import (
    CallFailure,
    CallRecord,
    EngineClient,
    SamplingParams,
    call_deadline,
)
from runtime.engine.steptime import StepTimeCoefficients
from runtime.routing.policies import RouterConfig
from runtime.routing.prediction import StepModel
from runtime.routing.router import Endpoint, Router

USER = [{"role": "user", "content": "hello there"}]


def sse_answer(text: str) -> bytes:
    chunks = [
        {"choices": [{"delta": {"content": text}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}},
    ]
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n"


def scripted(
    name: str,
    delay_s: float = 0.0,
    refuse: bool = False,
    drop_calls: int = 0,
    probe_delay_s: float = 0.0,
) -> httpx.MockTransport:
    """An endpoint's transport: answers calls with its name after delay_s; `refuse`: nothing
    answers (a dead server); `drop_calls`: the first calls lose their connection before any
    byte (a keep-alive connection the server closed under them) while /v1/models answers
    after probe_delay_s."""
    dropped = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal dropped
        if refuse:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/metrics":
            return httpx.Response(200, text="")
        if request.url.path == "/v1/models":
            await asyncio.sleep(probe_delay_s)
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        if dropped < drop_calls:
            dropped += 1
            message = "Server disconnected without sending a response."
            raise httpx.RemoteProtocolError(message, request=request)
        await asyncio.sleep(delay_s)
        return httpx.Response(200, content=sse_answer(name))

    return httpx.MockTransport(handler)


#: Probes quick enough for tests (the defaults wait seconds between probes).
QUICK_PROBES = {"health_probes": 2, "health_probe_interval_s": 0.01}


async def settled(router: Router) -> None:
    """Wait until no endpoint is being probed."""
    for _ in range(500):
        if not any(e.probing for e in router.endpoints):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("probes did not settle")


def endpoint(name: str, max_num_seqs: int = 4, **script: object) -> Endpoint:
    url = f"http://{name}"
    client = EngineClient(url, connect_retries=0, transport=scripted(name, **script))  # type: ignore[arg-type]
    return Endpoint(
        endpoint_id=name, model_key="llm", served_model="m", base_url=url,
        max_num_seqs=max_num_seqs, client=client,
    )  # fmt: skip


async def test_round_robin_alternates_between_endpoints() -> None:
    router = Router([endpoint("a"), endpoint("b")], RouterConfig(policy="round_robin"))
    texts = [(await router.chat("llm", USER, SamplingParams())).text for _ in range(4)]
    assert texts == ["a", "b", "a", "b"]
    await router.aclose()


async def test_unknown_model_key_fails_the_call_with_a_reason() -> None:
    router = Router([endpoint("a")])
    record = await router.chat("judge", USER, SamplingParams())
    assert record.error == "no endpoint serves model key 'judge'"
    assert record.failure is CallFailure.NO_ENDPOINT
    await router.aclose()


async def test_full_replicas_queue_calls_and_release_least_slack_first() -> None:
    router = Router(
        [endpoint("a", max_num_seqs=1, delay_s=0.2)], RouterConfig(policy="round_robin")
    )
    order: list[str] = []

    async def call(tag: str, deadline: float) -> None:
        with call_deadline(deadline):
            record = await router.chat("llm", USER, SamplingParams())
        assert record.ok, record.error
        order.append(tag)

    now = router.clock()
    first = asyncio.create_task(call("first", now + 100))
    await asyncio.sleep(0.05)  # "first" occupies the only slot
    loose = asyncio.create_task(call("loose", now + 100))
    await asyncio.sleep(0.01)
    tight = asyncio.create_task(call("tight", now + 10))
    await asyncio.gather(first, loose, tight)
    assert order == ["first", "tight", "loose"]
    await router.aclose()


async def test_queue_capacity_rejects_with_queue_full() -> None:
    config = RouterConfig(policy="round_robin", queue_capacity=1)
    router = Router([endpoint("a", max_num_seqs=1, delay_s=0.3)], config)
    records = await asyncio.gather(*(router.chat("llm", USER, SamplingParams()) for _ in range(3)))
    errors = sorted(str(r.error) for r in records if r.error)
    assert len(errors) == 1 and errors[0].startswith("queue full:")
    assert [r.failure for r in records if not r.ok] == [CallFailure.QUEUE_FULL]
    assert router.stats.queue_rejected == 1
    await router.aclose()


async def test_sla_aware_sheds_a_call_whose_deadline_is_out_of_reach() -> None:
    router = Router([endpoint("a")], RouterConfig(policy="sla_aware"))
    with call_deadline(router.clock() - 1.0):
        record = await router.chat("llm", USER, SamplingParams(max_tokens=50))
    assert record.error is not None and record.error.startswith("shed:")
    assert record.failure is CallFailure.SHED
    assert router.stats.shed == 1
    assert router.endpoints[0].calls == 0  # shed before it reached the engine
    with call_deadline(router.clock() + 60.0):
        assert (await router.chat("llm", USER, SamplingParams())).ok
    await router.aclose()


async def test_a_call_is_retried_at_most_once_even_with_more_dead_endpoints() -> None:
    router = Router(
        [endpoint("a-dead", refuse=True), endpoint("b-alive"), endpoint("c-dead", refuse=True)],
        RouterConfig(policy="round_robin"),  # slot 0 is a-dead, then slot 1 of the rest: c-dead
    )
    first = await router.chat("llm", USER, SamplingParams())
    assert first.error is not None and first.error.startswith("connection:")
    assert first.failure is CallFailure.CONNECTION
    assert first.retries == 1 and router.stats.retried == 1
    assert [e.healthy for e in router.endpoints] == [False, True, False]
    second = await router.chat("llm", USER, SamplingParams())  # only the live one is left
    assert second.ok and second.text == "b-alive" and second.retries == 0
    await router.aclose()


async def test_retry_elsewhere_needs_another_healthy_endpoint() -> None:
    router = Router([endpoint("a"), endpoint("b")])
    a, b = router.endpoints
    tried: set[str] = set()
    assert router.retry_elsewhere("llm", a, tried, "connection: refused")
    assert tried == {"a"} and not a.healthy
    assert not router.retry_elsewhere("llm", b, tried, "connection: refused")  # once per call
    assert router.stats.retried == 1
    lone = Router([endpoint("c")])
    assert not lone.retry_elsewhere("llm", lone.endpoints[0], set(), "connection: refused")
    assert lone.stats.retried == 0
    await router.aclose()
    await lone.aclose()


async def test_dead_endpoint_is_taken_out_and_the_call_retried_elsewhere() -> None:
    dead_seen: list[str] = []
    router = Router(
        [endpoint("dead", refuse=True), endpoint("alive")],
        RouterConfig(policy="round_robin", **QUICK_PROBES),
        on_unhealthy=lambda e: dead_seen.append(e.endpoint_id),
    )
    records = [await router.chat("llm", USER, SamplingParams()) for _ in range(4)]
    assert all(r.ok and r.text == "alive" for r in records)
    assert sum(r.retries for r in records) == 1 and router.stats.retried == 1
    await settled(router)  # the probes of "dead" fail: it is declared dead, once
    assert dead_seen == ["dead"]
    assert [e.healthy for e in router.endpoints] == [False, True]
    await router.aclose()


async def test_a_dropped_connection_to_a_live_endpoint_does_not_declare_it_dead() -> None:
    dead_seen: list[str] = []
    router = Router(
        [endpoint("flaky", drop_calls=1, probe_delay_s=0.05), endpoint("steady")],
        RouterConfig(policy="round_robin", **QUICK_PROBES),
        on_unhealthy=lambda e: dead_seen.append(e.endpoint_id),
    )
    first = await router.chat("llm", USER, SamplingParams())  # flaky drops it: retried
    assert first.ok and first.text == "steady" and first.retries == 1
    flaky = router.endpoints[0]
    assert flaky.probing and not flaky.healthy  # out of rotation while probed
    await settled(router)
    assert flaky.healthy and dead_seen == []  # it answered its probe: back in rotation
    texts = {(await router.chat("llm", USER, SamplingParams())).text for _ in range(4)}
    assert texts == {"flaky", "steady"}
    await router.aclose()


async def test_a_call_waits_while_the_only_endpoint_is_probed() -> None:
    router = Router(
        [endpoint("lone", drop_calls=1, probe_delay_s=0.2)],
        RouterConfig(policy="round_robin", **QUICK_PROBES),
    )
    dropped = await router.chat("llm", USER, SamplingParams())  # nowhere else to retry
    assert dropped.failure is CallFailure.CONNECTION
    assert router.endpoints[0].probing
    waited = await router.chat("llm", USER, SamplingParams())  # queued until the probe answers
    assert waited.ok and waited.text == "lone"
    assert router.endpoints[0].healthy
    await router.aclose()


class _ExitedProcess:
    """A replica whose server process has exited (all the router asks of it)."""

    def running(self) -> bool:
        return False


async def test_a_replica_whose_process_exited_is_dead_without_probes() -> None:
    dead_seen: list[str] = []
    gone = endpoint("gone", refuse=True)
    gone.replica = _ExitedProcess()  # type: ignore[assignment]
    router = Router(
        [gone, endpoint("live")],
        RouterConfig(policy="round_robin"),  # default probes: seconds, if they ran
        on_unhealthy=lambda e: dead_seen.append(e.endpoint_id),
    )
    record = await router.chat("llm", USER, SamplingParams())  # "gone" sorts first
    assert record.ok and record.text == "live" and record.retries == 1
    assert dead_seen == ["gone"] and not gone.probing and not gone.healthy
    await router.aclose()


async def test_sla_aware_learns_and_prefers_the_faster_endpoint() -> None:
    router = Router(
        [endpoint("slow", delay_s=0.15), endpoint("fast", delay_s=0.01)],
        RouterConfig(policy="sla_aware"),
    )
    for _ in range(6):  # warm up both estimates
        await router.chat("llm", USER, SamplingParams(max_tokens=1))
    tally = {"slow": 0, "fast": 0}
    for _ in range(10):
        with call_deadline(router.clock() + 30):
            tally[(await router.chat("llm", USER, SamplingParams(max_tokens=1))).text] += 1
    assert tally["fast"] > tally["slow"]
    await router.aclose()


async def test_prompt_leaves_the_prefill_count_at_the_first_token() -> None:
    """outstanding_prefill_tokens counts only calls still before their first token."""
    first_sent, finish = asyncio.Event(), asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
        first_sent.set()
        await finish.wait()
        yield sse_answer("b")

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text="")
        return httpx.Response(200, content=body())

    client = EngineClient("http://a", connect_retries=0, transport=httpx.MockTransport(handler))
    target = Endpoint(
        endpoint_id="a", model_key="llm", served_model="m", base_url="http://a",
        max_num_seqs=4, client=client,
    )  # fmt: skip
    router = Router([target], RouterConfig(policy="sla_aware"))
    call = asyncio.create_task(router.chat("llm", USER, SamplingParams(max_tokens=8)))
    await first_sent.wait()
    await asyncio.sleep(0.01)
    assert target.outstanding == 1 and target.outstanding_decode_tokens == 8
    assert target.outstanding_prefill_tokens == 0  # decoding, no longer waiting for prefill
    finish.set()
    record = await call
    assert record.ok and record.text == "ab"
    assert (target.outstanding, target.outstanding_prefill_tokens) == (0, 0)
    assert target.outstanding_decode_tokens == 0
    await router.aclose()


async def test_only_sla_aware_sheds_calls_whose_deadline_passed_in_the_queue() -> None:
    for policy, shed in (("sla_aware", True), ("round_robin", False)):
        router = Router([endpoint("a", max_num_seqs=1, delay_s=0.3)], RouterConfig(policy=policy))
        now = router.clock()

        async def call(target: Router, deadline: float) -> CallRecord:
            with call_deadline(deadline):
                return await target.chat("llm", USER, SamplingParams())

        first = asyncio.create_task(call(router, now + 100))
        await asyncio.sleep(0.05)
        late = asyncio.create_task(call(router, now + 0.1))  # expires while "first" holds the slot
        records = await asyncio.gather(first, late)
        errors = [record.error for record in records]
        assert errors[0] is None
        if shed:
            assert errors[1] is not None and errors[1].startswith("shed:")
            assert records[1].failure is CallFailure.SHED
        else:
            assert errors[1] is None  # ran late instead
        await router.aclose()


async def test_a_freed_slot_lets_one_waiting_call_go_not_the_whole_queue() -> None:
    """Released waiters hold their slot until they are picked: the endpoint never runs more
    calls than its max_num_seqs."""
    running, peak = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal running, peak
        if request.url.path == "/metrics":
            return httpx.Response(200, text="")
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return httpx.Response(200, content=sse_answer("a"))

    client = EngineClient("http://a", connect_retries=0, transport=httpx.MockTransport(handler))
    target = Endpoint(
        endpoint_id="a", model_key="llm", served_model="m", base_url="http://a",
        max_num_seqs=2, client=client,
    )  # fmt: skip
    router = Router([target], RouterConfig(policy="round_robin"))
    records = await asyncio.gather(*(router.chat("llm", USER, SamplingParams()) for _ in range(8)))
    assert all(record.ok for record in records)
    assert peak == 2 and target.outstanding == 0
    assert router._released == {"llm": 0}
    await router.aclose()


async def test_a_released_call_that_is_cancelled_gives_its_slot_to_the_next() -> None:
    router = Router(
        [endpoint("a", max_num_seqs=1, delay_s=0.1)], RouterConfig(policy="round_robin")
    )
    first = asyncio.create_task(router.chat("llm", USER, SamplingParams()))
    await asyncio.sleep(0.02)  # first holds the only slot
    doomed = asyncio.create_task(router.chat("llm", USER, SamplingParams()))
    patient = asyncio.create_task(router.chat("llm", USER, SamplingParams()))
    await asyncio.sleep(0.01)
    assert (await first).ok  # the slot frees: "doomed" is released first (FIFO on ties)...
    doomed.cancel()  # ...and cancelled before it is picked
    assert (await patient).ok  # its slot went on to the next waiter
    assert router._released == {"llm": 0}
    await router.aclose()


#: A stored profile whose every step takes 40 ms: a 6-token call is predicted at 0.24 s.
STEADY = StepModel(StepTimeCoefficients(base_s=0.04))


async def test_each_prediction_is_compared_with_the_measured_completion() -> None:
    target = endpoint("a", delay_s=0.2)
    router = Router([target], RouterConfig(policy="least_outstanding"), profiles={"llm": STEADY})
    assert router.step_model(target).coefficients == STEADY.coefficients
    for _ in range(5):
        assert (await router.chat("llm", USER, SamplingParams(max_tokens=6))).ok
    stats = router.stats
    assert stats.predictions == 5 and sum(stats.prediction_error_buckets) == 5
    assert stats.prediction_error_p50 is not None and stats.prediction_error_p90 is not None
    assert stats.prediction_error_p50 <= stats.prediction_error_p90
    # Each answer is one token, which the profile gives 0.04 s and which took 0.2 s: the
    # replica's bias is learned from the predictions redone for the real length
    assert router.step_model(target).correction > 1.5
    # and so is what calls really generate: one token, not max_tokens
    assert router.lengths.expected("llm", 6) < 4
    assert not target.in_flight
    await router.aclose()


async def test_a_queued_call_that_can_no_longer_make_it_is_shed_when_its_slot_frees() -> None:
    router = Router(
        [endpoint("a", max_num_seqs=1, delay_s=0.6)],
        RouterConfig(policy="sla_aware"),
        profiles={"llm": STEADY},
    )
    now = router.clock()
    sampling = SamplingParams(max_tokens=6)

    async def call(deadline: float) -> CallRecord:
        with call_deadline(deadline):
            return await router.chat("llm", USER, sampling)

    first = asyncio.create_task(call(now + 100))
    await asyncio.sleep(0.05)
    # admitted on arrival: behind the first call (0.24 s predicted) it finishes 0.48 s later,
    # 0.6 s with the prior confidence, within its 0.75 s; when the first call really ends
    # (0.6 s) its 0.2 s left no longer hold even the 0.3 s it needs alone
    second = asyncio.create_task(call(now + 0.8))
    records = await asyncio.gather(first, second)
    assert records[0].ok
    assert records[1].failure is CallFailure.SHED
    assert records[1].error is not None and records[1].error.startswith("shed: predicted finish")
    assert router.stats.shed == 1 and router._released == {"llm": 0}
    assert router.endpoints[0].calls == 1  # only the first call ever reached the engine
    await router.aclose()


async def test_every_policy_notes_the_calls_it_predicts_out_of_reach() -> None:
    router = Router([endpoint("a")], RouterConfig(policy="round_robin"), profiles={"llm": STEADY})
    now = router.clock()
    for deadline in (now + 100, now + 0.01):  # 0.24 s predicted: the second cannot make it
        with call_deadline(deadline):
            assert (await router.chat("llm", USER, SamplingParams(max_tokens=6))).ok  # no shed
    assert [out for _, _, out in router.stats.out_of_reach] == [False, True]
    assert {key for _, key, _ in router.stats.out_of_reach} == {"llm"}
    await router.aclose()


async def test_a_dag_call_is_judged_by_its_request_and_a_committed_one_is_never_shed() -> None:
    router = Router(
        [endpoint("a", delay_s=0.2)], RouterConfig(policy="sla_aware"), profiles={"llm": STEADY}
    )
    now = router.clock()
    sampling = SamplingParams(max_tokens=6)  # 0.24 s predicted

    async def call(deadline: float, **budget: float | bool) -> CallRecord:
        with call_deadline(deadline, **budget):  # type: ignore[arg-type]
            return await router.chat("llm", USER, sampling)

    # its own share (0.1 s) is out of reach, its request (5 s, 2 calls after it) is not
    task = asyncio.create_task(call(now + 0.1, request_deadline_s=now + 5.0, rest_calls=2.0))
    await asyncio.sleep(0.05)
    sent = next(iter(router.endpoints[0].in_flight.values()))
    assert sent.predicted_s is not None
    # protected from later calls by the deadline it was judged by: the request's less the rest
    assert sent.deadline_s == pytest.approx(now + 5.0 - 2 * sent.predicted_s)
    assert (await task).ok
    assert (await call(now - 1.0, request_deadline_s=now - 1.0)).failure is CallFailure.SHED
    # an earlier call of its request ran: the request was admitted then, this one runs late
    assert (await call(now - 1.0, request_deadline_s=now - 1.0, committed=True)).ok
    assert router.stats.shed == 1
    await router.aclose()
