"""Measurement you can compare: warm-up requests left out, the same examples in the same order
in every run, repeats with medians and intervals, cost from the work itself.

`execute_run` runs here against fake replicas (tests/runtime/fake_openai.py) served in this
process, so the whole run path is exercised without vLLM.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest

import runtime.engine.models
from runtime.engine.config import EngineConfig
from runtime.engine.pool import ReplicaPool
from runtime.run import RunResult, RunSpec, execute_run, load_run_spec
from runtime.workload import WorkloadSpec, sample_requests, warmup_examples
from tests.runtime.fake_openai import FakeReplica

EXTRACT = Path(__file__).resolve().parents[2] / "experiments" / "extract-cpu.yaml"
PRICE = 0.0832


@pytest.fixture
def fake_pool(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A replica pool whose replicas are fake engines (any model name is accepted)."""
    monkeypatch.setattr(runtime.engine.models, "resolve_model", lambda name: Path(name))
    started: list[FakeReplica] = []

    def factory(config: EngineConfig, replica_id: str, env: dict[str, str]) -> FakeReplica:
        replica = FakeReplica(config, replica_id)
        replica.engine.delay_s = 0.02
        started.append(replica)
        return replica

    with ReplicaPool(factory=factory) as pool:
        pool.started = started  # type: ignore[attr-defined]
        yield pool


def _spec(**overrides: Any) -> RunSpec:
    base = {
        "app.architecture": "single",
        "workload.num_requests": 5,
        "workload.arrivals.users": 2,
        "dataset.size": 12,
    }
    return load_run_spec(EXTRACT, {**base, **overrides})


def _articles(bodies: list[dict[str, Any]]) -> list[str]:
    """The user message of each chat call, in the order the engine received them."""
    return [body["messages"][-1]["content"] for body in bodies]


def _article_of(spec: RunSpec, index: int) -> str:
    return str(spec.app.application().examples(spec.dataset.size, spec.dataset.seed)[index].inputs)


def test_warmup_requests_are_sent_first_and_left_out_of_every_metric(fake_pool: Any) -> None:
    spec = _spec(**{"workload.warmup_requests": 3})
    done: list[int] = []
    result = execute_run(spec, fake_pool, on_request_done=lambda r: done.append(r.request_id))

    (replica,) = fake_pool.started
    assert replica.engine.calls == 3 + 5  # one llm call per request of 'single'
    assert result.metrics.num_requests == 5 and len(result.results) == 5 and len(done) == 5
    assert set(result.trace["request_id"]) == set(range(5))
    # the warm-ups went first and carried the examples after the measured ones
    dataset = spec.app.application().examples(spec.dataset.size, spec.dataset.seed)
    warm = warmup_examples(spec.workload, spec.dataset.size)
    first_three = _articles(replica.engine.bodies[:3])
    for index in warm:
        assert sum(dataset[index].inputs["article"] in text for text in first_three) == 1
    assert not set(warm) & set(result.examples)
    # no measured request started before the warm-ups ended
    assert result.trace["start_s"].min() >= 0


def test_no_warmup_when_set_to_zero(fake_pool: Any) -> None:
    result = execute_run(_spec(**{"workload.warmup_requests": 0}), fake_pool)
    assert fake_pool.started[0].engine.calls == 5
    assert result.metrics.num_requests == 5


def test_every_run_of_an_experiment_sends_the_same_examples_in_the_same_order(
    fake_pool: Any,
) -> None:
    """Paired comparisons: trials that differ in app or engine knobs carry the same examples,
    request by request, and so does every repeat."""
    one = _spec(**{"app.format": "json", "workload.repeats": 2})
    other = _spec(**{"app.format": "tag", "deployment.models.llm.engine.max_num_seqs": 4})
    first, second = execute_run(one, fake_pool), execute_run(other, fake_pool)

    expected = sample_requests(one.workload, one.dataset.size)
    assert first.examples == second.examples == expected
    assert len(set(expected)) == 5  # distinct examples while the dataset has them
    for result in (first, second):
        rows = result.trace.drop_duplicates(["repeat", "request_id"])
        for _, row in rows.iterrows():
            assert row["example"] == expected[row["request_id"]]
    # what the engines saw: each repeat of each run carried exactly those examples
    dataset = one.app.application().examples(one.dataset.size, one.dataset.seed)
    articles = {dataset[index].inputs["article"]: index for index in range(len(dataset))}

    def examples_in(bodies: list[dict[str, Any]]) -> list[int]:
        return sorted(
            index for text in _articles(bodies) for article, index in articles.items()
            if article in text
        )  # fmt: skip

    first_engine, second_engine = (replica.engine for replica in fake_pool.started)
    for repeat in range(2):
        # each repeat: the prefix cache emptied, 3 warm-ups, then the 5 measured requests
        bodies = first_engine.bodies[repeat * 8 + 3 : (repeat + 1) * 8]
        assert examples_in(bodies) == sorted(expected)
    assert first_engine.resets == [0, 8]
    assert examples_in(second_engine.bodies[3:]) == sorted(expected)
    assert second_engine.resets == [0]


def test_the_order_depends_only_on_the_workload_seed() -> None:
    workload = WorkloadSpec.model_validate(
        {"arrivals": {"kind": "closed", "users": 2}, "num_requests": 6, "seed": 3}
    )
    assert sample_requests(workload, 20) == sample_requests(workload, 20)
    other_seed = workload.model_copy(update={"seed": 4})
    assert sample_requests(other_seed, 20) != sample_requests(workload, 20)
    # more warm-ups or repeats never change the measured examples
    more = workload.model_copy(update={"warmup_requests": 10, "repeats": 5})
    assert sample_requests(more, 20) == sample_requests(workload, 20)
    assert warmup_examples(more, 20)[:3] == warmup_examples(workload, 20)
    # a dataset smaller than the measured requests: warm-ups reuse examples (no other left)
    assert len(warmup_examples(workload, 4)) == 3


def test_repeats_give_medians_intervals_and_per_repeat_values(fake_pool: Any) -> None:
    result = execute_run(_spec(**{"workload.repeats": 3}), fake_pool)
    m = result.metrics
    assert m.repeats == 3 and m.num_requests == 15 and len(result.results) == 15
    assert sorted(set(result.trace["repeat"])) == [0, 1, 2]
    data = result.metrics_dict()
    values = data["repeat_values"]["e2e_p95_s"]
    assert len(values) == 3
    assert data["e2e_p95_s"] == pytest.approx(sorted(values)[1])
    low, high = data["e2e_p95_s_ci95"]
    assert low <= data["e2e_p95_s"] <= high
    assert low == pytest.approx(min(values)) and high == pytest.approx(max(values))
    assert "cost_per_1k_usd_ci95" in data and "quality_ci95" in data
    assert data["examples"]["index"] == result.examples
    assert len(data["examples"]["quality"]) == 5


def test_one_repeat_has_no_interval_over_repeats(fake_pool: Any) -> None:
    data = execute_run(_spec(), fake_pool).metrics_dict()
    assert data["repeats"] == 1
    assert "e2e_p95_s_ci95" not in data
    assert data["repeat_values"]["e2e_p95_s"] == [data["e2e_p95_s"]]


def _busy_cost(result: RunResult, repeat: int, n: int, price: float = PRICE) -> float:
    """USD per 1000 requests from the repeat's own busy span: its first request's send to its
    last answer, recomputed from the request results."""
    results = result.results[repeat * n : (repeat + 1) * n]
    span = max(r.end_s for r in results) - min(r.start_s for r in results)
    return span / 3600 * price / n * 1000


def test_cost_counts_the_replica_time_of_the_work_not_the_waiting(fake_pool: Any) -> None:
    """Warm-up and replica start-up are not charged: the cost is the busy span of the
    measured requests times the replica price, whatever happened before."""
    slow_warmup = _spec(**{"workload.warmup_requests": 6, "workload.repeats": 2})
    result = execute_run(slow_warmup, fake_pool)
    per_repeat = result.repeated.per_repeat if result.repeated else ()
    for repeat, metrics in enumerate(per_repeat):
        assert metrics.cost_per_1k_usd == pytest.approx(_busy_cost(result, repeat, 5))
    both = [_busy_cost(result, repeat, 5) for repeat in range(2)]
    assert result.metrics.cost_per_1k_usd == pytest.approx(statistics.median(both))


def test_calls_cost_and_memory_are_reported_per_model_key(fake_pool: Any) -> None:
    """Two model keys, the parallel variant's three ask nodes split 2 + 1 between them."""
    spec = _spec(
        **{
            "app.architecture": "parallel",
            "deployment.models.small": {"engine": {"model": "small-model"}, "replicas": 1},
            "app.nodes": {"ask_email": {"model": "small"}},
            "workload.warmup_requests": 0,
        }
    )
    result = execute_run(spec, fake_pool)
    usage = result.metrics_dict()["per_model_key"]

    assert sorted(usage) == ["llm", "small"]
    assert usage["llm"]["llm_calls_per_request"] == 2.0
    assert usage["small"]["llm_calls_per_request"] == 1.0
    engines = {replica.config.model: replica.engine for replica in fake_pool.started}
    assert engines["small-model"].calls == 5  # no warm-ups: one ask_email per request
    assert {key: u["replicas"] for key, u in usage.items()} == {"llm": 1, "small": 1}
    # each key's share of the cost, which add up to the run's (one repeat, no API tokens)
    shares = [u["cost_per_1k_usd"] for u in usage.values()]
    assert all(share > 0 for share in shares)
    assert sum(shares) == pytest.approx(result.metrics.cost_per_1k_usd)
    assert all(u["peak_memory_gib"] is not None for u in usage.values())
