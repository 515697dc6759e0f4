"""A RunSpec simulated (runtime.simrun): shared prompt segments, the SimSpec of a run,
contention, and how far a prediction is from a measurement."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from runtime.engine.config import EngineConfig
from runtime.run import RunSpec, load_run_spec
from runtime.sim.cluster import Segment
from runtime.simrun import (
    FIDELITY_METRICS,
    common_prefix,
    contended,
    error_summary,
    percent_error,
    prediction_errors,
    shapes_from_run,
    shared_segments,
    sim_spec,
    simulate_run,
    workload_examples,
)
from tests.runtime.sim.conftest import make_profile

ROOT = Path(__file__).resolve().parents[2]


def fake_chat_ids(_engine: EngineConfig, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids without a tokenizer: one id per character of the rendered messages."""
    text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
    return [ord(char) for char in text]


@pytest.fixture
def experiment() -> RunSpec:
    return load_run_spec(
        ROOT / "experiments" / "extract-cpu.yaml",
        {"app.architecture": "parallel", "workload.num_requests": 6},
    )


def trace_rows(spec: RunSpec, prompt: int = 400, completion: int = 20) -> list[dict[str, Any]]:
    """A real run's trace as rows: every llm node of every request, one call each."""
    nodes = [node.id for node in spec.app.build().nodes if node.kind == "llm"]
    return [
        {"request_id": request, "node_id": node, "kind": "llm", "round": 0, "skipped": False,
         "prompt_tokens": prompt, "completion_tokens": completion + request, "repeat": 0}
        for request in range(spec.workload.num_requests)
        for node in nodes
    ]  # fmt: skip


def test_common_prefix_is_the_longest_prefix_all_share() -> None:
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[1, 2]]) == 2
    assert common_prefix([[5], [6]]) == 0
    assert common_prefix([]) == 0


def test_a_nodes_head_is_global_and_what_a_requests_calls_share_after_it_is_per_request() -> None:
    calls = {
        0: {"a": [1, 1, 7, 7, 7, 2], "b": [1, 1, 7, 7, 7, 3]},
        1: {"a": [1, 1, 8, 8, 4], "b": [1, 1, 8, 8, 5]},
    }
    segments = shared_segments(calls)
    head_a, shared_a = segments[(0, "a")]
    assert (head_a.scope, head_a.tokens) == ("global", 2)
    assert segments[(1, "b")][0].key == head_a.key  # same content, same key
    assert shared_a == Segment(scope="request", key="shared", tokens=3)
    assert segments[(1, "a")][1].tokens == 2


def test_a_parallel_runs_shapes_share_the_system_prompt_and_the_article(
    experiment: RunSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runtime.simrun.chat_token_ids", fake_chat_ids)
    examples = workload_examples(experiment)
    shapes = shapes_from_run(experiment, trace_rows(experiment), examples)
    assert len(shapes) == 6
    name = shapes[0].calls["ask_name"][0]
    scopes = [segment.scope for segment in name.shared]
    assert scopes == ["global", "request"]
    assert name.shared[1].tokens > 100  # the article, read by all three sub-questions
    assert sum(s.tokens for s in name.shared) <= name.prompt_tokens == 400
    assert shapes[3].calls["ask_email"][0].completion_tokens == 23


def test_a_run_becomes_a_sim_spec_with_its_workload_engines_and_router(
    experiment: RunSpec,
) -> None:
    two = experiment.model_copy(
        update={
            "deployment": experiment.deployment.model_copy(
                update={
                    "models": {
                        "llm": experiment.deployment.models["llm"].model_copy(
                            update={"replicas": 2}
                        )
                    }
                }
            )
        }
    )
    from runtime.sim.cluster import CallShape, RequestShape

    calls = {n: (CallShape(prompt_tokens=300, completion_tokens=20),)
             for n in ("ask_name", "ask_email", "ask_address")}  # fmt: skip
    shapes = [RequestShape(calls=calls)] * 6
    profile = make_profile(contention=(1.0, 1.5))
    spec = sim_spec(two, shapes, {"llm": profile})
    assert spec.workload == experiment.workload and spec.sla_e2e_s == 30
    assert spec.models["llm"].replicas == 2
    assert spec.models["llm"].engine == experiment.deployment.models["llm"].engine
    # two replicas on this machine: every step 1.5 times as long
    assert spec.models["llm"].profile.coefficients.decode_seq_s == pytest.approx(0.015)
    alone = sim_spec(experiment, shapes, {"llm": profile})
    assert alone.models["llm"].profile == profile
    assert contended(profile, 3).coefficients.prefill_token_s == pytest.approx(0.001 * 2.25)
    result = simulate_run(two, shapes[:2], {"llm": profile})  # shapes cycle to 6 requests
    assert result.metrics.num_requests == 6 and result.metrics.num_failed == 0


def test_prediction_errors_are_absolute_percentages_of_the_measurement() -> None:
    assert percent_error(1.1, 1.0) == pytest.approx(10.0)
    assert percent_error(0.9, 1.0) == pytest.approx(10.0)
    assert percent_error(None, 1.0) is None
    assert percent_error(1.0, 0.0) is None and percent_error(0.0, 0.0) == 0.0
    errors = prediction_errors({"e2e_p50_s": 2.0, "sla_attainment": 1.0},
                               {"e2e_p50_s": 2.5, "sla_attainment": 0.8})  # fmt: skip
    assert errors["e2e_p50_s"] == pytest.approx(20.0)
    assert errors["sla_attainment"] == pytest.approx(25.0)
    assert errors["tpot_p50_s"] is None and set(errors) == set(FIDELITY_METRICS)
    summary = error_summary([errors, {**errors, "e2e_p50_s": 40.0}, {**errors, "e2e_p50_s": 1.0}])
    assert summary["e2e_p50_s"] == (20.0, 40.0, 3)
    assert summary["tpot_p50_s"] == (None, None, 0)
