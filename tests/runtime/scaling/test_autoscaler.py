"""The provisioner's live side: initial sizing and the Autoscaler, against test doubles.

Replicas and the pool are fakes that record what they are asked; endpoints answer through
httpx.MockTransport (as in test_dispatch.py); time is a fake clock the test advances. The one
real test (marker engine) sizes the extraction experiment on the session's hot replica.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.app.application import AppKnobs
from runtime.app.dag import App
from runtime.app.registry import get_application
from runtime.deployment import Deployment
from runtime.engine.client import EngineClient, SamplingParams
from runtime.engine.config import EngineConfig
from runtime.engine.pool import PoolCapacityError, PoolLimits, ReplicaPool
from runtime.engine.replica import Replica
from runtime.routing.policies import RouterConfig
from runtime.routing.router import Endpoint, Router
from runtime.scaling.autoscaler import (
    Autoscaler,
    initial_size,
    llm_calls_per_request,
    size_deployment,
    window_stats,
)
from runtime.scaling.provisioner import ScalingPolicy, size_replicas
from runtime.serving.app import create_app
from runtime.serving.config import ServeConfig
from tests.runtime.routing.test_router import USER, scripted

ENGINE = EngineConfig(model="smollm2-135m", max_num_seqs=4)
POLICY = ScalingPolicy(window_s=10, cooldown_s=60, min_replicas=1, max_replicas=4)


class Clock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeReplica:
    """Stands in for a vLLM server: an id, a URL, a config."""

    def __init__(self, config: EngineConfig, replica_id: str) -> None:
        self.config = config
        self.replica_id = replica_id
        self.base_url = f"http://{replica_id}"

    def running(self) -> bool:
        return True


class FakePool:
    """Records acquire/release calls; keeps replicas by config like ReplicaPool does."""

    def __init__(self, max_replicas: int = 4, fail: bool = False) -> None:
        self.limits = PoolLimits(max_replicas=max_replicas)
        self.running: list[FakeReplica] = []
        self.calls: list[tuple[str, object]] = []
        self.released_at: dict[str, float] = {}
        self.fail = fail
        self._made = 0

    def replicas(self, config: EngineConfig | None = None) -> list[FakeReplica]:
        return list(self.running)

    def acquire(self, config: EngineConfig, count: int = 1) -> list[FakeReplica]:
        self.calls.append(("acquire", count))
        if self.fail:
            raise PoolCapacityError("no room for another replica")
        del self.running[count:]
        while len(self.running) < count:
            self._made += 1
            self.running.append(FakeReplica(config, f"r{self._made}"))
        return list(self.running)

    def release(self, replica: FakeReplica) -> None:
        self.calls.append(("release", replica.replica_id))
        self.released_at[replica.replica_id] = time.monotonic()
        self.running.remove(replica)


def endpoint_of(replica: FakeReplica, delay_s: float = 0.0) -> Endpoint:
    client = EngineClient(
        replica.base_url, connect_retries=0, transport=scripted(replica.replica_id, delay_s)
    )
    return Endpoint(
        endpoint_id=f"llm/{replica.replica_id}", model_key="llm", served_model="m",
        base_url=replica.base_url, max_num_seqs=4, replica=replica, client=client,  # type: ignore[arg-type]
    )  # fmt: skip


def setup(
    replicas: int, policy: ScalingPolicy = POLICY, pool: FakePool | None = None, **kw: object
) -> tuple[Autoscaler, Router, FakePool, Clock]:
    """An autoscaler over `replicas` running fake replicas, on a fake clock."""
    pool = pool or FakePool()
    clock = Clock()
    running = pool.acquire(ENGINE, count=replicas)
    pool.calls.clear()
    router = Router(
        [endpoint_of(r, **kw) for r in running],  # type: ignore[arg-type]
        RouterConfig(policy="round_robin"),
        clock=clock,
    )
    scaler = Autoscaler(router, pool, "llm", ENGINE, policy, clock=clock)  # type: ignore[arg-type]
    return scaler, router, pool, clock


def record(router: Router, met: int, missed: int) -> None:
    for index in range(met + missed):
        router.record_outcome(index < met)


async def test_window_stats_read_outcomes_queue_and_kv() -> None:
    _, router, _, clock = setup(2)
    router.record_outcome(False, end_s=clock.now - 50)  # outside the 10 s window
    record(router, met=3, missed=1)
    router.stats.queue_depth["llm"] = 4
    router.endpoints[0].num_waiting, router.endpoints[1].num_waiting = 1, 3
    router.endpoints[0].kv_cache_usage, router.endpoints[1].kv_cache_usage = 0.2, 0.6
    stats = window_stats(router, "llm", 10.0, clock.now)
    assert stats.requests_in_window == 4 and stats.sla_attainment == 0.75
    assert stats.queue_depth == pytest.approx(4 / 2 + 2) and stats.kv_cache_usage == 0.4
    assert stats.out_of_reach == 0.0  # no call asked for admission
    await router.aclose()


async def test_window_stats_read_the_calls_the_router_predicted_out_of_reach() -> None:
    _, router, _, clock = setup(2)
    now = clock.now
    router.stats.out_of_reach.extend(
        [(now - 50, "llm", True), (now - 5, "llm", True), (now - 3, "llm", False),
         (now - 2, "llm", False), (now - 1, "other", True)]
    )  # fmt: skip
    stats = window_stats(router, "llm", 10.0, now)
    assert stats.out_of_reach == pytest.approx(1 / 3)  # this key's calls in the window
    await router.aclose()


async def test_low_attainment_scales_up_through_the_pool_and_router() -> None:
    scaler, router, pool, clock = setup(1)
    record(router, met=5, missed=5)
    decision = await scaler.step()
    assert (decision.from_replicas, decision.to_replicas) == (1, 2)
    assert decision.reason.startswith("scale up: sla_attainment 0.500")
    assert pool.calls == [("acquire", 2)]
    assert [e.endpoint_id for e in router.endpoints] == ["llm/r1", "llm/r2"]
    assert scaler.decisions == [decision] and scaler.counts["up"] == 1
    assert scaler.last_change_s == clock.now
    await router.aclose()


async def test_high_queue_scales_up_and_cooldown_holds_the_next_change() -> None:
    scaler, router, pool, clock = setup(1)
    router.endpoints[0].num_waiting = 9
    assert (await scaler.step()).to_replicas == 2
    for e in router.endpoints:
        e.num_waiting = 9
    clock.now += 30
    held = await scaler.step()
    assert not held.changed and held.reason.startswith("cooldown (30.0s left)")
    clock.now += 31
    again = await scaler.step()
    assert again.to_replicas == 3 and "queue_depth 9.00 >= 4.0" in again.reason
    assert pool.calls == [("acquire", 2), ("acquire", 3)]
    assert [scaler.counts[a] for a in ("up", "down", "hold")] == [2, 0, 1]
    await router.aclose()


async def test_sustained_comfort_scales_down_one_step_per_cooldown() -> None:
    scaler, router, pool, clock = setup(3)
    scaler.last_change_s = clock.now
    clock.now += 10
    record(router, met=10, missed=0)
    assert (await scaler.step()).reason.startswith("cooldown")
    clock.now += 55
    record(router, met=10, missed=0)
    down = await scaler.step()
    assert (down.from_replicas, down.to_replicas) == (3, 2)
    assert down.reason.startswith("scale down: sla_attainment 1.000")
    assert pool.calls == [("release", "r3")]  # the newest idle replica goes
    assert [e.endpoint_id for e in router.endpoints] == ["llm/r1", "llm/r2"]
    clock.now += 61
    assert (await scaler.step()).to_replicas == 1  # idle window: nothing to attain
    clock.now += 61
    floor = await scaler.step()
    assert not floor.changed and floor.reason == "hold at min_replicas=1"
    assert [d.to_replicas for d in scaler.decisions] == [3, 2, 1, 1]
    await router.aclose()


async def test_scale_down_drains_open_calls_before_releasing_the_replica() -> None:
    scaler, router, pool, _ = setup(2, delay_s=0.4)
    scaler.drain_timeout_s = 5.0
    ended: dict[str, float] = {}

    async def call() -> bool:
        record = await router.chat("llm", USER, SamplingParams())
        ended[record.text] = time.monotonic()
        return record.ok

    calls = [asyncio.create_task(call()) for _ in range(2)]  # round robin: one per replica
    await asyncio.sleep(0.1)
    assert [e.outstanding for e in router.endpoints] == [1, 1]
    started = time.monotonic()
    down = await scaler.step()
    assert (down.from_replicas, down.to_replicas) == (2, 1)
    assert time.monotonic() - started >= 0.2  # waited for the open call
    assert all(await asyncio.gather(*calls))  # its client stayed open until it finished
    assert pool.calls == [("release", "r2")]
    assert ended["r2"] <= pool.released_at["r2"]
    await router.aclose()


async def test_pool_caps_bound_the_count_and_refusals_are_recorded() -> None:
    scaler, router, pool, clock = setup(2, pool=FakePool(max_replicas=2))
    assert scaler.policy.max_replicas == 2  # min(policy 4, pool 2)
    record(router, met=0, missed=4)
    capped = await scaler.step()
    assert not capped.changed and capped.reason.startswith("hold at max_replicas=2")
    await router.aclose()

    scaler, router, pool, clock = setup(1)
    pool.fail = True
    record(router, met=0, missed=4)
    failed = await scaler.step()
    assert (failed.from_replicas, failed.to_replicas) == (1, 1)
    assert "failed to apply" in failed.reason and "no room" in failed.reason
    assert scaler.counts["hold"] == 1 and scaler.last_change_s == clock.now
    await router.aclose()


async def test_run_steps_every_window_until_closed() -> None:
    clock = Clock()

    async def sleep(seconds: float) -> None:
        clock.now += seconds
        await asyncio.sleep(0.01)

    pool = FakePool()
    router = Router([endpoint_of(pool.acquire(ENGINE)[0])], clock=clock)
    scaler = Autoscaler(router, pool, "llm", ENGINE, POLICY, clock=clock, sleep=sleep)  # type: ignore[arg-type]
    scaler.start()
    await asyncio.sleep(0.1)
    await scaler.aclose()
    times = [d.time_s - 1000.0 for d in scaler.decisions]
    assert len(times) >= 3 and times[:3] == [10.0, 20.0, 30.0]
    assert all(d.reason == "hold at min_replicas=1" for d in scaler.decisions)
    await router.aclose()


# --- initial sizing -------------------------------------------------------------------------


def auto_deployment(**provisioner: object) -> Deployment:
    return Deployment.model_validate(
        {
            "models": {
                "llm": {"engine": ENGINE.model_dump(), "replicas": "auto"},
                "fixed": {"engine": {"model": "smollm2-135m"}, "replicas": 2},
            },
            "provisioner": provisioner,
        }
    )


def test_initial_size_feeds_measured_samples_to_size_replicas() -> None:
    pool = FakePool(max_replicas=6)
    samples = [1.5, 2.0, 2.5, 2.0, 1.8, 2.2]
    measured: list[str] = []

    def sampler(replica: Replica) -> list[float]:
        measured.append(replica.replica_id)
        return samples

    deployment = auto_deployment(target_rps=1.0, sla_p99_s=10.0, epsilon=0.05)
    result = initial_size(deployment, "llm", pool, 1.5, sampler=sampler)  # type: ignore[arg-type]
    expected = size_replicas(1.0, 1.5, samples, 10.0, 0.05, max_replicas=6)  # pool cap 6
    assert result == expected and result.feasible and result.replicas == 4  # load 3 calls
    assert measured == ["r1"]  # one replica started and calibrated, then the rest
    assert pool.calls == [("acquire", 1), ("acquire", result.replicas)]
    assert len(pool.running) == result.replicas


def test_initial_size_is_capped_by_the_pool_and_reuses_hot_replicas() -> None:
    pool = FakePool(max_replicas=2)
    pool.acquire(ENGINE, count=2)
    deployment = auto_deployment(target_rps=5.0, sla_p99_s=10.0)
    result = initial_size(deployment, "llm", pool, 1, sampler=lambda r: [2.0] * 6)  # type: ignore[arg-type]
    assert result.replicas == 2 and not result.feasible
    assert pool.calls[1:] == [("acquire", 2), ("acquire", 2)]  # the hot pair is kept


def test_size_deployment_fills_auto_counts_and_leaves_numbers_alone() -> None:
    pool = FakePool()
    deployment = auto_deployment(target_rps=0.05, sla_p99_s=30.0)
    sized, sizing = size_deployment(
        deployment,
        pool,  # type: ignore[arg-type]
        calls={"llm": 3},
        samplers={"llm": lambda r: [1.0, 1.2, 0.9, 1.1, 1.0, 1.3]},
    )
    assert sizing["llm"].replicas == 1 and sizing["llm"].feasible
    assert sized.models["llm"].replicas == 1 and sized.models["fixed"].replicas == 2
    numeric = deployment.model_copy(update={"models": {"fixed": deployment.models["fixed"]}})
    assert size_deployment(numeric, pool) == (numeric, {})  # type: ignore[arg-type]


def build_app(architecture: str, fmt: str) -> App:
    """The shipped extraction app's DAG of one architecture."""
    return get_application("extraction").build(AppKnobs(architecture=architecture, format=fmt))


def test_calls_per_request_counts_llm_nodes_and_loop_rounds() -> None:
    archs = ("single", "parallel", "judge")
    counts = {arch: llm_calls_per_request(build_app(arch, "json")) for arch in archs}
    assert counts == {"single": 1, "parallel": 3, "judge": 6}
    assert llm_calls_per_request(build_app("single", "json"), "other") == 0


# --- the front door records outcomes and shows the autoscalers -----------------------------


async def test_front_door_records_outcomes_and_exposes_autoscaler_metrics() -> None:
    scaler, router, _, clock = setup(1)
    deployment = auto_deployment()
    app = create_app(router, deployment, ServeConfig(sla_e2e_s=30), autoscalers={"llm": scaler})
    await scaler.step()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://door") as http:
        body = {"model": "llm", "messages": USER}
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
        text = (await http.get("/metrics")).text
    assert list(router.stats.outcomes) == [(clock.now, True)]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("fmtune_autoscaler_replicas", (("model_key", "llm"),))] == 1
    hold = ("fmtune_autoscaler_decisions_total", (("action", "hold"), ("model_key", "llm")))
    assert samples[hold] == 1
    await router.aclose()


# --- a real run ------------------------------------------------------------------------------

EXTRACT = Path(__file__).resolve().parents[3] / "experiments" / "extract-cpu.yaml"


@pytest.mark.engine
def test_execute_run_sizes_an_auto_model_on_the_hot_replica(
    engine_pool: ReplicaPool, hot_replica: Replica
) -> None:
    from runtime.run import execute_run, load_run_spec

    spec = load_run_spec(
        EXTRACT,
        {
            "deployment.models.llm.replicas": "auto",
            "deployment.provisioner": {"target_rps": 0.01, "sla_p99_s": 60, "epsilon": 0.05},
            "workload.num_requests": 4,
            "workload.arrivals.users": 2,
        },
    )
    assert spec.deployment.models["llm"].engine == hot_replica.config
    result = execute_run(spec, engine_pool)
    sizing = result.sizing["llm"]
    assert sizing.replicas == 1 and sizing.feasible and sizing.utilization < 0.5
    assert 0 < sizing.predicted_p99_s < 60
    assert engine_pool.replicas() == [hot_replica]  # reused, nothing else started
    assert result.metrics.num_requests == 4 and result.metrics.error_rate == 0.0
