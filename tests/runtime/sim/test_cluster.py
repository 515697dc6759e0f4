"""The deployment simulation: the workload's arrivals, the DAG and its deadline split, the
router's real policies, the real run's metric names, and determinism."""

from __future__ import annotations

import itertools

import pytest
from pydantic import ValidationError

from runtime.app.dag import App, LlmNode, Loop, NodeSampling
from runtime.engine.config import EngineConfig
from runtime.metrics import RunMetrics
from runtime.sim.cluster import (
    CallShape,
    NodeTokens,
    RequestShape,
    Segment,
    SimModel,
    shapes_for_workload,
    shapes_from_spans,
    simulate,
    synthetic_shapes,
)
from runtime.workload import (
    ClosedLoop,
    PoissonArrivals,
    WorkloadSpec,
    arrival_offsets,
    sample_requests,
)
from tests.runtime.sim.conftest import (
    make_profile,
    make_spec,
    parallel_app,
    sequential_app,
    shapes,
    single_app,
)


def test_the_same_spec_gives_the_same_run_and_another_seed_another() -> None:
    spec = make_spec(requests=40, rate_rps=5.0, policy="least_outstanding", seed=3)
    first, second = simulate(spec), simulate(spec)
    assert first.metrics_dict() == second.metrics_dict()
    assert first.calls == second.calls
    other = simulate(make_spec(requests=40, rate_rps=5.0, policy="least_outstanding", seed=4))
    assert other.metrics.e2e_p50_s != first.metrics.e2e_p50_s


def test_requests_arrive_when_the_workload_sends_them() -> None:
    spec = make_spec(requests=15, rate_rps=3.0, seed=7)
    result = simulate(spec)
    offsets = arrival_offsets(spec.workload)
    assert offsets is not None
    assert [o.start_s for o in result.outcomes] == offsets


def test_a_call_on_an_idle_replica_takes_the_hand_worked_time() -> None:
    profile = make_profile(request_overhead_s=0.005, response_overhead_s=0.002)
    result = simulate(make_spec(requests=1, replicas=1, profile=profile))
    (outcome,) = result.outcomes
    # 5 ms to the engine, 40 prefill tokens (0.04 s) give token 1, 7 decodes of 0.01 s give
    # tokens 2-8, each step's tokens reach the client 2 ms after the step
    assert outcome.ttfts_s == pytest.approx([0.005 + 0.04 + 0.002])
    assert outcome.e2e_s == pytest.approx(0.005 + 0.04 + 0.07 + 0.002)
    assert outcome.tpots_s == pytest.approx([0.07 / 7])
    assert (outcome.prompt_tokens, outcome.completion_tokens, outcome.llm_calls) == (40, 8, 1)


def test_the_run_reports_the_real_runs_metric_names() -> None:
    result = simulate(make_spec())
    data = result.metrics_dict()
    assert set(RunMetrics.model_fields) <= set(data)
    assert {"replica_start_s", "router_shed", "router_retried", "router_queue_rejected"} <= set(
        data
    )
    metrics = result.metrics
    assert metrics.num_requests == 20 and metrics.num_failed == 0
    assert metrics.sla_attainment == 1.0
    assert metrics.quality is None  # quality is measured for real, never simulated
    assert metrics.peak_memory_gib == pytest.approx(2 * (0.75 + 1))
    assert data["replica_start_s"] == 45.0
    assert metrics.cost_per_1k_usd == pytest.approx(metrics.wall_s * 2 / 3600 * 0.0832 / 20 * 1000)


def test_round_robin_alternates_the_replicas() -> None:
    result = simulate(make_spec(requests=8, rate_rps=None, users=1, policy="round_robin"))
    ordered = sorted(result.calls, key=lambda call: call.start_s)
    assert [call.endpoint for call in ordered] == ["llm/0", "llm/1"] * 4


def test_least_outstanding_spreads_calls_sent_together() -> None:
    result = simulate(make_spec(requests=6, rate_rps=None, users=6, policy="least_outstanding"))
    endpoints = [call.endpoint for call in result.calls]
    assert endpoints.count("llm/0") == endpoints.count("llm/1") == 3


def test_sequential_nodes_add_up_and_parallel_ones_overlap() -> None:
    one = simulate(make_spec(sequential_app(), requests=1)).outcomes[0]
    assert one.e2e_s == pytest.approx(2 * (0.04 + 0.07))  # two calls in a row
    fan = simulate(make_spec(parallel_app(), requests=1)).outcomes[0]
    assert fan.e2e_s == pytest.approx(0.04 + 0.07)  # one replica each, at the same time
    assert fan.llm_calls == 2
    slow_join = make_spec(parallel_app(), requests=1, node_latency_s={"join": 0.5})
    assert simulate(slow_join).outcomes[0].e2e_s == pytest.approx(0.11 + 0.5)


def test_each_call_gets_its_share_of_the_sla_as_deadline() -> None:
    # The router predicts with the profile and, before any call finished, expects max_tokens:
    # 40 prefill tokens (0.04 s) and 63 decode steps (0.63 s) for a 64-token call, padded by
    # the prior confidence x1.25 to 0.8375 s. With a 1.2 s SLA, the first of two sequential
    # calls must finish within 0.6 s (its share, 0.5): sla_aware sheds it; a single call has
    # the whole 1.2 s and is admitted.
    two = simulate(make_spec(sequential_app(), requests=3, policy="sla_aware", sla_e2e_s=1.2))
    assert two.metrics.num_shed == 3 and two.metrics.sla_attainment == 0.0
    assert two.router_stats.shed == 3
    assert all("shed" in (o.error or "") for o in two.outcomes)
    one = simulate(make_spec(single_app(), requests=3, policy="sla_aware", sla_e2e_s=1.2))
    assert one.metrics.num_shed == 0 and one.metrics.sla_attainment == 1.0
    # Admission judges the request: with 1.6 s the first call misses its share (0.8 s) but
    # 0.8375 s and one more call like it (0.67 s) fit the request, so it is admitted, and the
    # second call, of a request already committed, is not judged again.
    judged = simulate(make_spec(sequential_app(), requests=3, policy="sla_aware", sla_e2e_s=1.6))
    assert judged.metrics.num_shed == 0 and judged.metrics.sla_attainment == 1.0


def test_a_loop_runs_the_rounds_its_shape_records() -> None:
    app = App(
        name="judge",
        inputs=("article",),
        nodes=(
            LlmNode(id="draft", model="llm", prompt="{article}", output_fields=("answer",)),
            LlmNode(
                id="check", model="llm", prompt="{draft.answer}", depends_on=("draft",),
                output_fields=("verdict",), sampling=NodeSampling(max_tokens=8),
            ),
        ),
        loops=(Loop(id="refine", body=("draft", "check"), until="check.verdict == 'ok'",
                    max_rounds=3),),
        outputs={"answer": "draft.answer"},
    )  # fmt: skip
    call = CallShape(prompt_tokens=40, completion_tokens=8)
    once = RequestShape(calls={"draft": (call,), "check": (call,)})
    thrice = RequestShape(calls={"draft": (call,) * 3, "check": (call,) * 3})
    spec = make_spec(app, requests=2, replicas=1, shapes=(once, thrice))
    outcomes = simulate(spec).outcomes
    assert [o.llm_calls for o in outcomes] == [2, 6]
    assert outcomes[1].e2e_s > 2.5 * outcomes[0].e2e_s


def test_a_node_skipped_by_its_condition_costs_nothing() -> None:
    app = sequential_app()
    only_first = RequestShape(calls={"first": (CallShape(prompt_tokens=40, completion_tokens=8),)})
    spec = make_spec(app, requests=1, shapes=(only_first,))
    (outcome,) = simulate(spec).outcomes
    assert outcome.llm_calls == 1
    assert outcome.e2e_s == pytest.approx(0.11)


def test_a_closed_loop_user_sends_the_next_request_when_the_last_one_ends() -> None:
    spec = make_spec(requests=5, rate_rps=None, users=1)
    outcomes = simulate(spec).outcomes
    for before, after in itertools.pairwise(outcomes):
        assert after.start_s == pytest.approx(before.end_s)


def test_a_node_slower_than_its_timeout_fails_its_request() -> None:
    result = simulate(make_spec(requests=3, node_timeout_s=0.05))
    assert result.metrics.num_failed == 3
    assert all("timed out after 0.05s" in (o.error or "") for o in result.outcomes)
    assert all(o.e2e_s == pytest.approx(0.05) for o in result.outcomes)


def test_a_failed_node_cancels_its_requests_other_calls() -> None:
    result = simulate(make_spec(parallel_app(), requests=1, node_timeout_s=0.09))
    # both calls would take 0.11 s: the first timeout ends the request, the other call is
    # cancelled (and freed in its replica)
    assert result.metrics.num_failed == 1
    errors = sorted(call.error or "" for call in result.calls)
    assert errors[0] == "cancelled" and errors[1].startswith("timed out")
    assert all(c.busy_s < 0.1 for c in result.replicas.values())


def test_a_full_router_queue_rejects_the_call() -> None:
    spec = make_spec(
        requests=3, rate_rps=None, users=3, replicas=1, engine={"max_num_seqs": 1},
        router={"policy": "round_robin", "queue_capacity": 1},
    )  # fmt: skip
    result = simulate(spec)
    assert result.router_stats.queue_rejected == 1
    assert result.metrics.num_failed == 1
    assert sum("queue full" in (o.error or "") for o in result.outcomes) == 1


def test_a_call_the_engine_cannot_hold_fails() -> None:
    spec = make_spec(requests=2, engine={"max_model_len": 32})  # the prompts have 40 tokens
    result = simulate(spec)
    assert result.metrics.num_failed == 2
    assert all("max_model_len" in (o.error or "") for o in result.outcomes)


def test_calls_of_one_request_share_their_request_content_in_the_prefix_cache() -> None:
    shared = (Segment(scope="global", key="system", tokens=64),
              Segment(scope="request", key="article", tokens=192))  # fmt: skip
    call = CallShape(prompt_tokens=300, completion_tokens=8, shared=shared)
    app = sequential_app()
    shape = RequestShape(calls={"first": (call,), "second": (call,)})
    result = simulate(make_spec(app, requests=2, replicas=1, rate_rps=None, shapes=(shape,) * 2))
    cached = {(c.request_id, c.node_id): c.cached_tokens for c in result.calls}
    # request 0's first call finds nothing; its second reuses all 256 shared tokens
    # (2 blocks of 128); request 1 shares only the global 64 tokens, less than a block,
    # with request 0, so its first call finds nothing either
    assert cached == {(0, "first"): 0, (0, "second"): 256, (1, "first"): 0, (1, "second"): 256}


@pytest.mark.parametrize(("warmups", "cached"), [(0, [0, 0]), (1, [256, 0]), (3, [256, 256])])
def test_warm_up_requests_leave_the_shared_content_cached_on_the_replicas_they_reached(
    warmups: int, cached: list[int]
) -> None:
    # as a real run: prefix caches emptied, then `warmups` requests of other dataset items;
    # what every request shares (256 global tokens, 2 blocks of 128) is cached where they ran
    shared = (Segment(scope="global", key="system", tokens=256),
              Segment(scope="request", key="article", tokens=64))  # fmt: skip
    call = CallShape(prompt_tokens=400, completion_tokens=4, shared=shared)
    shape = RequestShape(calls={"ask": (call,)})
    workload = WorkloadSpec(
        arrivals=ClosedLoop(users=2), num_requests=2, seed=0, warmup_requests=warmups
    )
    spec = make_spec(replicas=2, policy="round_robin", shapes=(shape,) * 2, workload=workload)
    result = simulate(spec)
    by_endpoint = {c.endpoint: c.cached_tokens for c in result.calls}
    assert [by_endpoint["llm/0"], by_endpoint["llm/1"]] == cached


def test_the_spec_names_what_is_inconsistent() -> None:
    with pytest.raises(ValidationError, match="one shape per request"):
        make_spec(requests=3, shapes=shapes(single_app(), 2))
    bad_app = App(
        name="x", inputs=("a",), nodes=(LlmNode(id="q", model="other", prompt="{a}"),),
        outputs={"o": "q.text"},
    )  # fmt: skip
    with pytest.raises(ValidationError, match="'other'"):
        make_spec(bad_app, shapes=shapes(bad_app, 20))
    with pytest.raises(ValidationError, match="no price"):
        make_spec(prices={"price_per_replica_hour_usd": {}})
    with pytest.raises(ValidationError, match="not llm nodes"):
        strange = RequestShape(calls={"nope": (CallShape(prompt_tokens=4, completion_tokens=1),)})
        make_spec(requests=1, shapes=(strange,))


def test_shapes_come_from_a_real_runs_trace_rows() -> None:
    rows = [
        {"request_id": 0, "node_id": "draft", "kind": "llm", "round": 1,
         "prompt_tokens": 50, "completion_tokens": 9},
        {"request_id": 0, "node_id": "draft", "kind": "llm", "round": 0,
         "prompt_tokens": 40, "completion_tokens": 8},
        {"request_id": 0, "node_id": "join", "kind": "code", "round": 0,
         "prompt_tokens": 0, "completion_tokens": 0},
        {"request_id": 1, "node_id": "draft", "kind": "llm", "round": 0, "skipped": True,
         "prompt_tokens": 0, "completion_tokens": 0},
        {"request_id": 0, "node_id": "draft", "kind": "llm", "round": 0, "repeat": 1,
         "prompt_tokens": 99, "completion_tokens": 99},
    ]  # fmt: skip
    system = (Segment(scope="global", key="system", tokens=45),)
    found = shapes_from_spans(rows, shared={"draft": system})
    # round order, at least the shared part, and only the first repeat's rows
    assert [c.prompt_tokens for c in found[0].calls["draft"]] == [45, 50]
    assert found[0].calls["draft"][1].completion_tokens == 9
    assert found[0].calls["draft"][0].shared == system
    assert found[1].calls == {}


def test_shapes_follow_the_workloads_choice_of_examples() -> None:
    examples = [
        RequestShape(calls={"ask": (CallShape(prompt_tokens=10 + i, completion_tokens=2),)})
        for i in range(7)
    ]
    workload = WorkloadSpec(arrivals=PoissonArrivals(rate_rps=1.0), num_requests=12, seed=5)
    chosen = shapes_for_workload(examples, workload)
    expected = sample_requests(workload, 7)
    assert [s.calls["ask"][0].prompt_tokens - 10 for s in chosen] == expected


def test_synthetic_shapes_draw_from_the_distributions_with_a_seed() -> None:
    app = sequential_app()
    nodes = {
        "first": NodeTokens(prompt_tokens=(100, 200), completion_tokens=(5,)),
        "second": NodeTokens(prompt_tokens=(30,), completion_tokens=(7, 9)),
    }
    drawn = synthetic_shapes(app, nodes, 50, seed=2)
    assert drawn == synthetic_shapes(app, nodes, 50, seed=2)
    assert {s.calls["first"][0].prompt_tokens for s in drawn} == {100, 200}
    assert {s.calls["second"][0].completion_tokens for s in drawn} == {7, 9}
    with pytest.raises(ValueError, match="second"):
        synthetic_shapes(app, {"first": nodes["first"]}, 1)


def test_speculation_on_the_engine_needs_its_rates_in_the_profile() -> None:
    engine = {"speculative_method": "ngram", "num_speculative_tokens": 3}
    with pytest.raises(Exception, match="speculation"):
        simulate(make_spec(requests=2, engine=engine))
    faster = make_profile(speculation={"proposal_rate": 1.0, "acceptance_rate": 1.0})
    fast = simulate(make_spec(requests=2, replicas=1, engine=engine, profile=faster))
    plain = simulate(make_spec(requests=2, replicas=1))
    assert fast.metrics.tpot_p50_s < plain.metrics.tpot_p50_s


def test_auto_replicas_are_sized_by_the_provisioner_from_calibration_calls() -> None:
    # one call takes 0.11 s on an idle replica: 1 rps needs one replica, 20 rps needs more
    light = make_spec(replicas="auto", provisioner={"target_rps": 1.0, "sla_p99_s": 1.0})
    result = simulate(light)
    assert result.sizing["llm"].replicas == 1
    assert result.sizing["llm"].feasible
    heavy = make_spec(
        replicas="auto", provisioner={"target_rps": 20.0, "sla_p99_s": 1.0}, rate_rps=20.0
    )
    sized = simulate(heavy)
    assert sized.sizing["llm"].replicas >= 3  # 20 rps * 0.11 s = 2.2 replicas busy
    assert {call.endpoint for call in sized.calls} == {
        f"llm/{i}" for i in range(sized.sizing["llm"].replicas)
    }
    capped = make_spec(
        replicas="auto", rate_rps=20.0,
        provisioner={"target_rps": 20.0, "sla_p99_s": 1.0, "scaling": {"max_replicas": 2}},
    )  # fmt: skip
    assert simulate(capped).sizing["llm"].replicas == 2


def test_every_sent_call_carries_the_routers_prediction() -> None:
    result = simulate(make_spec(requests=1, replicas=1, policy="least_outstanding"))
    (call,) = result.calls
    # expected at max_tokens before any call finished: 40 prefill tokens give the first
    # token, 63 decode steps the rest; it generated 8 tokens in 0.11 s
    assert call.predicted_s == pytest.approx(0.04 + 0.63)
    assert call.sent_s == 0.0 and call.deadline_s == 30.0
    stats = result.router_stats
    assert stats.predictions == 1
    assert stats.prediction_error_p50 == pytest.approx((0.67 - 0.11) / 0.11)
    assert stats.model_error_p50 == pytest.approx(0.0, abs=1e-9)  # redone for 8 tokens


def test_a_request_class_carries_its_own_sla() -> None:
    app = single_app()
    strict = RequestShape(calls=shapes(app, 1)[0].calls, sla_e2e_s=0.5)
    spec = make_spec(app, requests=4, policy="sla_aware", shapes=(strict, *shapes(app, 3)))
    result = simulate(spec)
    # 0.67 s predicted (x1.25) misses the strict 0.5 s: shed; the others have 30 s
    assert [o.shed for o in result.outcomes] == [True, False, False, False]
    assert sorted(c.deadline_s or 0 for c in result.calls)[1:] == pytest.approx(
        sorted(o.start_s + 30 for o in result.outcomes[1:])
    )


def test_unequal_replicas_of_one_model_key() -> None:
    engines = (
        EngineConfig(model="smollm2-135m", max_num_seqs=1),
        EngineConfig(model="smollm2-135m", max_num_seqs=4),
    )
    spec = make_spec(requests=8, rate_rps=None, users=8, policy="round_robin")
    model = spec.models["llm"].model_copy(update={"replica_engines": engines})
    result = simulate(spec.model_copy(update={"models": {"llm": model}}))
    ends: dict[str, list[float]] = {}
    for call in result.calls:
        ends.setdefault(call.endpoint, []).append(call.end_s)
    one, four = sorted(ends["llm/0"]), sorted(ends["llm/1"])
    assert len(one) == len(four) == 4
    # one slot: its calls end one call's time (0.11 s) apart; four slots: they overlap
    assert all(b - a == pytest.approx(0.11) for a, b in itertools.pairwise(one))
    assert four[-1] - four[0] < 0.11
    with pytest.raises(ValidationError, match="one engine per replica"):
        SimModel(engine=engines[0], replicas=3, profile=make_profile(), replica_engines=engines)


def test_the_oracle_admits_only_what_it_can_serve_in_time() -> None:
    # One slot, 0.11 s per call: of four calls sent at once, two finish within 0.25 s
    kwargs = {"requests": 4, "rate_rps": None, "users": 4, "replicas": 1, "sla_e2e_s": 0.25}
    engine = {"max_num_seqs": 1}
    oracle = simulate(make_spec(engine=engine, oracle=True, **kwargs))
    assert [o.shed for o in oracle.outcomes].count(True) == 2
    assert all(o.e2e_s <= 0.25 for o in oracle.outcomes if not o.shed)
    assert oracle.metrics.sla_attainment == 0.5
    late = simulate(make_spec(engine=engine, policy="least_outstanding", **kwargs))
    assert late.metrics.num_shed == 0 and late.metrics.sla_attainment == 0.5
    # its predictions are exact: it played the true replica forward
    assert all(
        c.predicted_s == pytest.approx(c.end_s - (c.sent_s or 0))
        for c in oracle.calls
        if c.error is None
    )
