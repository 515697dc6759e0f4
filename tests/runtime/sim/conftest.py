"""Shared pieces of the simulator tests: a profile with simple numbers, small apps, specs."""

from __future__ import annotations

from typing import Any

import pytest

from runtime.app.dag import App, CodeNode, LlmNode, NodeSampling
from runtime.engine.config import EngineConfig
from runtime.metrics import CostModel
from runtime.routing.policies import RouterConfig
from runtime.sim.cluster import CallShape, RequestShape, SimModel, SimSpec
from runtime.sim.steptime import StepTimeCoefficients, StepTimeProfile
from runtime.workload import ClosedLoop, PoissonArrivals, WorkloadSpec

#: 1 ms per prefill token, 10 ms per decoding sequence: hand-checkable times.
SIMPLE = StepTimeCoefficients(base_s=0.0, prefill_token_s=0.001, decode_seq_s=0.01)


def make_profile(**changes: Any) -> StepTimeProfile:
    """A profile of the bundled model with SIMPLE step times and no API overheads."""
    base: dict[str, Any] = {
        "model": "smollm2-135m",
        "dtype": "bfloat16",
        "hardware": "test",
        "vllm_version": "0.32.0",
        "coefficients": SIMPLE,
        "startup_s": 45.0,
        "kv_bytes_per_token": 23040,
        "memory_gib_without_kv": 0.75,
    }
    return StepTimeProfile.model_validate({**base, **changes})


def llm(node_id: str, max_tokens: int = 64, depends_on: tuple[str, ...] = ()) -> LlmNode:
    return LlmNode(
        id=node_id,
        model="llm",
        prompt="{article}",
        depends_on=depends_on,
        sampling=NodeSampling(max_tokens=max_tokens),
    )


def single_app(max_tokens: int = 64) -> App:
    """One LLM call per request."""
    return App(
        name="single", inputs=("article",), nodes=(llm("ask", max_tokens),),
        outputs={"answer": "ask.text"},
    )  # fmt: skip


def sequential_app() -> App:
    """Two LLM calls in a row: each gets half of the SLA as its deadline."""
    return App(
        name="two", inputs=("article",),
        nodes=(llm("first"), llm("second", depends_on=("first",))),
        outputs={"answer": "second.text"},
    )  # fmt: skip


def parallel_app() -> App:
    """Two independent LLM calls joined by a code node."""
    return App(
        name="fan", inputs=("article",),
        nodes=(
            llm("left"), llm("right"),
            CodeNode(
                id="join", callable="json:dumps", inputs={"obj": "left.text"},
                depends_on=("left", "right"), output_fields=("merged",),
            ),
        ),
        outputs={"answer": "join.merged"},
    )  # fmt: skip


def shapes(app: App, count: int, prompt: int = 40, completion: int = 8) -> tuple[RequestShape, ...]:
    """Every request: each LLM node one call of ``prompt`` and ``completion`` tokens."""
    calls = {
        node.id: (CallShape(prompt_tokens=prompt, completion_tokens=completion),)
        for node in app.nodes
        if isinstance(node, LlmNode)
    }
    return tuple(RequestShape(calls=calls) for _ in range(count))


def make_spec(
    app: App | None = None,
    *,
    requests: int = 20,
    rate_rps: float | None = 2.0,
    users: int = 1,
    replicas: int = 2,
    policy: str = "round_robin",
    sla_e2e_s: float = 30.0,
    seed: int = 0,
    engine: dict[str, Any] | None = None,
    profile: StepTimeProfile | None = None,
    **changes: Any,
) -> SimSpec:
    """A simulated experiment: Poisson arrivals (or a closed loop when rate_rps is None)."""
    app = app or single_app()
    arrivals = PoissonArrivals(rate_rps=rate_rps) if rate_rps else ClosedLoop(users=users)
    data: dict[str, Any] = {
        "app": app,
        "workload": WorkloadSpec(arrivals=arrivals, num_requests=requests, seed=seed),
        "shapes": shapes(app, requests),
        "sla_e2e_s": sla_e2e_s,
        "models": {
            "llm": SimModel(
                engine=EngineConfig(model="smollm2-135m", **(engine or {})),
                replicas=replicas,
                profile=profile or make_profile(),
            )
        },
        "router": RouterConfig(policy=policy),  # type: ignore[arg-type]
        "prices": CostModel(price_per_replica_hour_usd={"llm": 0.0832}),
    }
    return SimSpec.model_validate({**data, **changes})


@pytest.fixture
def spec() -> SimSpec:
    """Twenty requests of one call, two replicas, round robin."""
    return make_spec()
