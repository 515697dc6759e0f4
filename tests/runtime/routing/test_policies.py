"""Tests of the router's pure decisions on synthetic replica states."""

from __future__ import annotations

from typing import Any, get_args

import pytest
from pydantic import ValidationError

from runtime.routing.policies import (
    POLICIES,
    CallDemand,
    PolicyName,
    QueueFull,
    ReplicaSnapshot,
    RouteContext,
    RouterConfig,
    SlackQueue,
    SpeedEstimate,
    SpeedEstimator,
    admit,
    get_policy,
    least_outstanding,
    predict_completion_s,
    round_robin,
    sla_aware,
)

FAST = SpeedEstimate(
    prefill_s_per_token=0.0002, decode_s_per_token=0.01, overhead_s=0.01, uncertainty=0.1
)
SLOW = SpeedEstimate(
    prefill_s_per_token=0.001, decode_s_per_token=0.05, overhead_s=0.01, uncertainty=0.1
)


def snap(rid: str, **kw: Any) -> ReplicaSnapshot:
    """A replica snapshot with idle defaults, overridden by ``kw``."""
    base: dict[str, Any] = {
        "replica_id": rid,
        "model": "m",
        "healthy": True,
        "outstanding_requests": 0,
        "outstanding_prefill_tokens": 0,
        "outstanding_decode_tokens": 0,
        "num_running": 0,
        "num_waiting": 0,
        "kv_cache_usage": 0.0,
        "max_num_seqs": 8,
    }
    base.update(kw)
    return ReplicaSnapshot(**base)


def call(prompt: int = 200, out: int = 50, deadline: float = 10.0, now: float = 0.0) -> CallDemand:
    return CallDemand(
        model="m", prompt_tokens=prompt, max_tokens=out, deadline_s=deadline, now_s=now
    )


# ---------------------------------------------------------------- policies


def test_round_robin_cycles_over_healthy_replicas_and_skips_unhealthy() -> None:
    replicas = [snap("c"), snap("a"), snap("b", healthy=False), snap("d", model="other")]
    picks = [round_robin(replicas, call(), RouteContext(counter=i)).replica_id for i in range(4)]
    assert picks == ["a", "c", "a", "c"]


def test_policies_return_none_when_no_replica_serves_the_model() -> None:
    replicas = [snap("a", healthy=False), snap("b", model="other")]
    for name, policy in POLICIES.items():
        decision = policy(replicas, call(), RouteContext())
        assert decision.replica_id is None, name
        assert decision.predicted_s is None
        assert "'m'" in decision.reason


def test_least_outstanding_picks_the_idle_replica() -> None:
    replicas = [
        snap("a", outstanding_requests=3, outstanding_decode_tokens=300),
        snap("b"),
        snap("c", outstanding_requests=1, outstanding_decode_tokens=10),
    ]
    assert least_outstanding(replicas, call(), RouteContext()).replica_id == "b"


def test_least_outstanding_breaks_ties_by_outstanding_tokens() -> None:
    replicas = [
        snap("a", outstanding_requests=2, outstanding_decode_tokens=500),
        snap("b", outstanding_requests=2, outstanding_prefill_tokens=100),
    ]
    assert least_outstanding(replicas, call(), RouteContext()).replica_id == "b"


def test_sla_aware_avoids_a_loaded_slow_replica() -> None:
    replicas = [
        snap(
            "slow",
            outstanding_requests=8,
            num_running=8,
            num_waiting=4,
            outstanding_decode_tokens=800,
        ),
        snap("fast", outstanding_requests=2, num_running=2, outstanding_decode_tokens=100),
    ]
    ctx = RouteContext(speeds={"slow": SLOW, "fast": FAST})
    decision = sla_aware(replicas, call(), ctx)
    assert decision.replica_id == "fast"
    assert decision.predicted_s == pytest.approx(predict_completion_s(replicas[1], FAST, call()))


def test_sla_aware_prefers_fast_replica_where_least_outstanding_picks_the_slow_one() -> None:
    # The slow replica is idle; the fast one has one more call in flight, yet finishes first.
    replicas = [
        snap("slow"),
        snap("fast", outstanding_requests=1, num_running=1, outstanding_decode_tokens=40),
    ]
    ctx = RouteContext(speeds={"slow": SLOW, "fast": FAST})
    c = call()
    assert least_outstanding(replicas, c, ctx).replica_id == "slow"
    assert sla_aware(replicas, c, ctx).replica_id == "fast"
    assert predict_completion_s(replicas[1], FAST, c) < predict_completion_s(replicas[0], SLOW, c)


def test_sla_aware_safety_factor_penalises_uncertain_replicas() -> None:
    # Same raw prediction; the one we know little about is riskier once padding applies.
    known = SpeedEstimate(0.0005, 0.02, 0.01, uncertainty=0.05)
    unknown = SpeedEstimate(0.0004, 0.019, 0.01, uncertainty=0.9)
    replicas = [snap("known"), snap("unknown")]
    c = call()
    assert predict_completion_s(replicas[1], unknown, c) < predict_completion_s(
        replicas[0], known, c
    )
    padded = RouteContext(speeds={"known": known, "unknown": unknown}, safety_factor=2.0)
    trusting = RouteContext(speeds={"known": known, "unknown": unknown}, safety_factor=0.0)
    assert sla_aware(replicas, c, padded).replica_id == "known"
    assert sla_aware(replicas, c, trusting).replica_id == "unknown"


def test_prediction_grows_with_load_and_queues_when_batch_is_full() -> None:
    speed = SpeedEstimate(0.001, 0.02, 0.0, batch_slowdown=0.5)
    c = call(prompt=100, out=11)
    idle = predict_completion_s(snap("a"), speed, c)
    assert idle == pytest.approx(100 * 0.001 + 10 * 0.02)
    busy = snap(
        "a",
        num_running=3,
        outstanding_requests=3,
        outstanding_prefill_tokens=50,
        outstanding_decode_tokens=300,
    )
    # 150 prefill tokens; batch of 4 → step 0.02 * (1 + 0.5 * 3) = 0.05.
    assert predict_completion_s(busy, speed, c) == pytest.approx(0.15 + 10 * 0.05)
    full = snap(
        "a",
        max_num_seqs=4,
        num_running=4,
        num_waiting=4,
        outstanding_requests=8,
        outstanding_decode_tokens=800,
    )
    # waits for (4 + 1) / 4 of a batch run of 100 tokens at step 0.05.
    expected = (5 / 4) * 100 * 0.05 + 0.1 + 10 * 0.05
    assert predict_completion_s(full, speed, c) == pytest.approx(expected)


def test_get_policy_resolves_names_and_names_the_choices_on_error() -> None:
    assert get_policy("sla_aware") is sla_aware
    with pytest.raises(ValueError) as err:
        get_policy("random")
    assert str(err.value) == (
        "router policy must be one of ['least_outstanding', 'round_robin', 'sla_aware'], "
        "got 'random'"
    )


def test_config_policy_choices_match_the_registry() -> None:
    assert set(get_args(PolicyName)) == set(POLICIES)
    assert RouterConfig().policy == "sla_aware"
    with pytest.raises(ValidationError, match="policy"):
        RouterConfig(policy="random")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="ewma_alpha"):
        RouterConfig(ewma_alpha=0.0)
    for name, info in RouterConfig.model_fields.items():
        assert info.description, name


# ---------------------------------------------------------------- speed estimation


def test_estimator_returns_prior_before_any_observation() -> None:
    est = SpeedEstimator(alpha=0.3, prior=SLOW)
    assert est.estimate("r") == SLOW


def test_estimator_converges_to_true_speed() -> None:
    true = SpeedEstimate(0.0008, 0.03, 0.05, batch_slowdown=0.2)
    est = SpeedEstimator(alpha=0.3)
    for i in range(60):
        prompt = 100 + 37 * (i % 9)
        running = 1 + i % 5
        gap = true.step_s(running)
        est.observe(
            "r",
            ttft_s=true.overhead_s + true.prefill_s_per_token * prompt,
            prompt_tokens=prompt,
            itl_gaps_s=[gap] * 20,
            concurrent_running=running,
        )
    got = est.estimate("r")
    assert got.prefill_s_per_token == pytest.approx(true.prefill_s_per_token, rel=1e-6)
    assert got.overhead_s == pytest.approx(true.overhead_s, rel=1e-6)
    assert got.decode_s_per_token == pytest.approx(true.decode_s_per_token, rel=1e-6)
    assert got.batch_slowdown == pytest.approx(true.batch_slowdown, rel=1e-6)
    assert got.uncertainty < 0.01
    assert est.snapshot() == {"r": got}


def test_estimator_normalises_gaps_by_prior_slowdown_at_constant_concurrency() -> None:
    prior = SpeedEstimate(0.001, 0.05, 0.02, batch_slowdown=0.25)
    est = SpeedEstimator(alpha=0.2, prior=prior)
    for _ in range(5):
        # 5 running sequences: gap = d * (1 + 0.25 * 4) = 2 d; same prompt length each time.
        est.observe(
            "r",
            ttft_s=0.02 + 300 * 0.002,
            prompt_tokens=300,
            itl_gaps_s=[0.04],
            concurrent_running=5,
        )
    got = est.estimate("r")
    assert got.decode_s_per_token == pytest.approx(0.02)
    assert got.batch_slowdown == 0.25
    assert got.overhead_s == 0.02
    assert got.prefill_s_per_token == pytest.approx(0.002)


def test_estimator_tracks_a_slowdown_and_keeps_replicas_apart() -> None:
    est = SpeedEstimator(alpha=0.5)
    for _ in range(30):
        est.observe("a", 0.11, 200, [0.02] * 5, 1)
        est.observe("b", 0.11, 200, [0.08] * 5, 1)
    assert est.estimate("a").decode_s_per_token == pytest.approx(0.02)
    assert est.estimate("b").decode_s_per_token == pytest.approx(0.08)


def test_estimator_rejects_bad_alpha_and_negative_ttft() -> None:
    with pytest.raises(ValueError, match="ewma_alpha must be in"):
        SpeedEstimator(alpha=1.5)
    with pytest.raises(ValueError, match="ttft_s must be >= 0, got -1"):
        SpeedEstimator().observe("r", -1, 10, [], 1)


# ---------------------------------------------------------------- admission


def test_admission_sheds_an_impossible_call_and_admits_a_feasible_one() -> None:
    c = call(deadline=11.0, now=10.0)
    shed = admit(c, best_prediction_s=2.5)
    assert not shed.admit
    assert "misses the deadline by 1.500s" in shed.reason
    assert admit(c, best_prediction_s=0.6).admit
    assert admit(c, best_prediction_s=1.2, tolerance_s=0.5).admit


# ---------------------------------------------------------------- slack queue


def test_slack_queue_releases_least_slack_first() -> None:
    q: SlackQueue[str] = SlackQueue(capacity=10)
    q.push("lax", deadline_s=10.0, predicted_s=1.0)  # latest start 9
    q.push("urgent", deadline_s=5.0, predicted_s=1.0)  # latest start 4
    q.push("long", deadline_s=8.0, predicted_s=6.0)  # latest start 2
    q.push("tie", deadline_s=5.0, predicted_s=1.0)  # same as urgent, pushed later
    assert len(q) == 4
    first = q.pop(now_s=1.0)
    assert (first.item, first.slack_s) == ("long", pytest.approx(1.0))
    assert [q.pop(1.0).item for _ in range(3)] == ["urgent", "tie", "lax"]
    with pytest.raises(IndexError):
        q.pop(1.0)


def test_slack_queue_capacity() -> None:
    q: SlackQueue[int] = SlackQueue(capacity=2)
    q.push(1, 1.0, 0.1)
    q.push(2, 2.0, 0.1)
    with pytest.raises(QueueFull, match="capacity"):
        q.push(3, 3.0, 0.1)
    q.pop(0.0)
    q.push(3, 3.0, 0.1)
    assert len(q) == 2
    with pytest.raises(ValueError, match="queue_capacity must be >= 1, got 0"):
        SlackQueue(capacity=0)


def test_slack_queue_drops_expired_items() -> None:
    q: SlackQueue[str] = SlackQueue(capacity=10)
    for name, deadline in [("c", 3.0), ("a", 1.0), ("d", 9.0), ("b", 2.0)]:
        q.push(name, deadline, 0.5)
    assert q.drop_expired(now_s=2.5) == ["a", "b"]
    assert len(q) == 2
    assert q.drop_expired(now_s=2.5) == []
    assert [q.pop(2.5).item for _ in range(2)] == ["c", "d"]
