"""Tests of the router's pure decisions on synthetic replica states."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from runtime.engine.steptime import StepTimeCoefficients
from runtime.routing.policies import (
    POLICIES,
    Assessment,
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
    assess,
    get_policy,
    least_outstanding,
    power_of_two,
    round_robin,
    sla_aware,
)
from runtime.routing.prediction import (
    MIN_SAMPLES,
    PRIOR_CONFIDENCE,
    InFlightCall,
    PredictionError,
    PredictionTracker,
    StepModel,
)

#: 1 ms per prefill token, 10 ms per decoding sequence: hand-checkable times.
FAST = StepModel(StepTimeCoefficients(base_s=0.0, prefill_token_s=0.001, decode_seq_s=0.01))
#: Five times slower.
SLOW = StepModel(StepTimeCoefficients(base_s=0.0, prefill_token_s=0.005, decode_seq_s=0.05))


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


def running(tokens_left: int, deadline: float, prompt: int = 100) -> InFlightCall:
    """A call that got its first token just now and expects ``tokens_left`` more."""
    return InFlightCall(
        prompt_tokens=prompt,
        expected_tokens=tokens_left + 1,
        sent_s=-0.1,
        first_token_s=0.0,
        deadline_s=deadline,
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


def test_every_policy_predicts_the_completion_on_its_choice() -> None:
    ctx = RouteContext(models={"a": FAST})
    for name, policy in POLICIES.items():
        decision = policy([snap("a")], call(prompt=100, out=11), ctx)
        # 100 prefill tokens give the first token, 10 decode steps the rest
        assert decision.predicted_s == pytest.approx(0.1 + 10 * 0.01), name


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


def test_power_of_two_takes_the_less_loaded_of_a_reproducible_pair() -> None:
    replicas = [snap(r, outstanding_requests=n) for r, n in zip("abcd", (4, 1, 3, 2), strict=True)]
    picks = [power_of_two(replicas, call(), RouteContext(counter=i)).replica_id for i in range(40)]
    assert picks == [
        power_of_two(replicas, call(), RouteContext(counter=i)).replica_id for i in range(40)
    ]
    assert "a" not in picks  # the most loaded one loses every pair it is drawn in
    assert len(set(picks)) == 3  # "b" does not win pairs it is not drawn in
    two = replicas[:2]
    assert {power_of_two(two, call(), RouteContext(counter=i)).replica_id for i in range(9)} == {
        "b"
    }


def test_sla_aware_avoids_a_loaded_slow_replica() -> None:
    replicas = [
        snap("slow", outstanding_requests=2, calls=(running(80, 99.0), running(80, 99.0))),
        snap("fast", outstanding_requests=2, calls=(running(40, 99.0), running(40, 99.0))),
    ]
    ctx = RouteContext(models={"slow": SLOW, "fast": FAST})
    decision = sla_aware(replicas, call(), ctx)
    assert decision.replica_id == "fast"
    assert decision.predicted_s == pytest.approx(assess(replicas[1], call(), ctx).predicted_s)


def test_sla_aware_prefers_fast_replica_where_least_outstanding_picks_the_slow_one() -> None:
    # The slow replica is idle; the fast one has one more call in flight, yet finishes first.
    replicas = [
        snap("slow"),
        snap("fast", outstanding_requests=1, num_running=1, calls=(running(40, 99.0),)),
    ]
    ctx = RouteContext(models={"slow": SLOW, "fast": FAST})
    c = call()
    assert least_outstanding(replicas, c, ctx).replica_id == "slow"
    assert sla_aware(replicas, c, ctx).replica_id == "fast"
    assert assess(replicas[1], c, ctx).predicted_s < assess(replicas[0], c, ctx).predicted_s


def test_sla_aware_balances_equal_replicas_by_their_calls_not_by_guessed_lengths() -> None:
    # a's two calls are guessed to end within two tokens, b's one call in 80: the earliest
    # predicted completion is on a, but the guesses are guesses; b holds fewer calls
    replicas = [
        snap("a", outstanding_requests=2, calls=(running(1, 99.0), running(1, 99.0))),
        snap("b", outstanding_requests=1, calls=(running(80, 99.0),)),
    ]
    ctx = RouteContext(models={"a": FAST, "b": FAST})
    c = call()
    assert assess(replicas[0], c, ctx).predicted_s < assess(replicas[1], c, ctx).predicted_s
    assert sla_aware(replicas, c, ctx).replica_id == "b"
    # where it would miss its deadline on b, it goes to a
    hurried = call(deadline=assess(replicas[0], c, ctx).predicted_s * 1.01)
    assert sla_aware(replicas, hurried, ctx).replica_id == "a"


def test_a_replica_without_a_model_predicts_with_the_default_speed() -> None:
    prior = SpeedEstimate(prefill_s_per_token=0.001, decode_s_per_token=0.02, overhead_s=0.05)
    ctx = RouteContext(default_speed=prior)
    predicted = assess(snap("a"), call(prompt=100, out=11), ctx).predicted_s
    # base 0.02 * 0.9 per step: the prefill step, then 10 decode steps of 0.02 each
    assert predicted == pytest.approx(0.018 + 0.1 + 10 * 0.02 + (0.05 - 0.018))


def test_speeds_become_step_time_coefficients_with_the_same_decode_steps() -> None:
    speed = SpeedEstimate(0.001, 0.02, 0.01, batch_slowdown=0.5)
    model = speed.step_model()
    for n in (1, 2, 5, 16):
        assert model.decode_step_s(n, 0) == pytest.approx(speed.step_s(n))
    assert model.coefficients.prefill_token_s == 0.001


def test_get_policy_resolves_names_and_names_the_choices_on_error() -> None:
    assert get_policy("sla_aware") is sla_aware
    assert get_policy("power_of_two") is power_of_two
    with pytest.raises(ValueError) as err:
        get_policy("random")
    assert str(err.value) == (
        "router policy must be one of ['least_outstanding', 'power_of_two', 'round_robin', "
        "'sla_aware'], got 'random'"
    )


def test_config_policy_choices_match_the_registry() -> None:
    assert set(get_args(PolicyName)) == set(POLICIES)
    assert RouterConfig().policy == "sla_aware"
    with pytest.raises(ValidationError, match="policy"):
        RouterConfig(policy="random")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="ewma_alpha"):
        RouterConfig(ewma_alpha=0.0)
    with pytest.raises(ValidationError, match="admission_quantile"):
        RouterConfig(admission_quantile=1.0)
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


def test_admission_admits_a_call_that_meets_its_deadline_with_confidence() -> None:
    ctx = RouteContext(models={"a": FAST}, confidence=1.25)
    c = call(prompt=100, out=11, deadline=10.3, now=10.0)  # predicted 0.2 s, padded 0.25 s
    assessment = assess(snap("a"), c, ctx)
    assert assessment.late_s == pytest.approx(-0.05)
    decision = admit(c, assessment)
    assert decision.admit and "slack 0.050s" in decision.reason


def test_admission_sheds_a_call_that_meets_its_deadline_only_without_the_padding() -> None:
    c = call(prompt=100, out=11, deadline=10.22, now=10.0)
    trusting = assess(snap("a"), c, RouteContext(models={"a": FAST}, confidence=1.0))
    assert admit(c, trusting).admit
    padded = assess(snap("a"), c, RouteContext(models={"a": FAST}, confidence=1.25))
    shed = admit(c, padded)
    assert not shed.admit
    assert "misses the deadline with confidence by 0.030s" in shed.reason
    assert admit(c, padded, tolerance_s=0.05).admit


def test_admission_judges_a_call_at_its_expected_output_length() -> None:
    ctx = RouteContext(models={"a": FAST})
    # expected 11 tokens: 0.1 s of prefill and 10 decode steps (0.2 s); 21 tokens: 0.3 s
    typical = CallDemand("m", 100, 64, deadline_s=0.25, now_s=0.0, expected_tokens=11)
    assert admit(typical, assess(snap("a"), typical, ctx)).admit
    longer = replace(typical, expected_tokens=21)
    assessment = assess(snap("a"), longer, ctx)
    assert assessment.predicted_s == pytest.approx(0.3)
    assert assessment.late_s == pytest.approx(0.05)
    assert not admit(longer, assessment).admit


def test_admission_protects_a_running_call_it_would_push_past_its_deadline() -> None:
    # The running call decodes its last 10 tokens alone in 0.1 s. Beside the new call: one
    # step prefills its 100 tokens and decodes one (0.11 s), 5 shared decode steps (0.02 s
    # each) finish the new call at 0.21 s, 4 more alone end the running call at 0.25 s.
    ctx = RouteContext(models={"a": FAST})
    c = call(prompt=100, out=6, deadline=5.0)
    tight = snap("a", outstanding_requests=1, calls=(running(10, deadline=0.2),))
    assessment = assess(tight, c, ctx)
    assert assessment.predicted_s == pytest.approx(0.21)
    assert assessment.late_s < 0 and assessment.endangered == 1
    assert assessment.delay_s == pytest.approx(0.25 - 0.1)
    decision = admit(c, assessment)
    assert not decision.admit and "push 1 admitted call(s) on a past" in decision.reason
    loose = snap("a", outstanding_requests=1, calls=(running(10, deadline=0.5),))
    assert admit(c, assess(loose, c, ctx)).admit
    # a call that misses its deadline anyway is not the new call's fault
    lost = snap("a", outstanding_requests=1, calls=(running(10, deadline=0.05),))
    assert assess(lost, c, ctx).endangered == 0


def test_admission_admits_what_a_corrected_pessimistic_model_would_shed() -> None:
    tracker = PredictionTracker(quantile=0.9)
    for i in range(MIN_SAMPLES):  # the model is 1 / 0.6 too slow given the real lengths
        tracker.record(PredictionError("a", 1.0, 0.6, given_length_s=1.0), now_s=float(i))
    now = float(MIN_SAMPLES)
    learned = RouteContext(
        models={"a": replace(FAST, correction=tracker.correction("a", now))},
        confidence=tracker.confidence(now),
    )
    uncorrected = RouteContext(models={"a": FAST}, confidence=PRIOR_CONFIDENCE)
    c = call(prompt=100, out=11, deadline=now + 0.15, now=now)  # 0.2 s by the model
    assert not admit(c, assess(snap("a"), c, uncorrected)).admit
    assessment = assess(snap("a"), c, learned)
    assert assessment.predicted_s == pytest.approx(0.2 * 0.6, rel=0.05)
    assert admit(c, assessment).admit
    # a call that misses even as corrected is still shed
    tight = replace(c, deadline_s=now + 0.1)
    assert not admit(tight, assess(snap("a"), tight, learned)).admit


def test_admission_pads_below_one_where_the_corrected_model_still_runs_long() -> None:
    # measured / predicted at 0.8 around the corrected model: a call predicted at 0.2 s
    # makes a deadline 0.18 s away (the old margin, never below 1, shed it)
    ctx = RouteContext(models={"a": FAST}, confidence=0.8)
    c = call(prompt=100, out=11, deadline=0.18)
    assessment = assess(snap("a"), c, ctx)
    assert assessment.predicted_s == pytest.approx(0.2)
    assert assessment.late_s == pytest.approx(-0.02)
    assert admit(c, assessment).admit
    assert not admit(c, assess(snap("a"), c, RouteContext(models={"a": FAST}))).admit
    longer = call(prompt=100, out=21, deadline=0.2)  # 0.3 s, padded 0.24 s: still shed
    assert not admit(longer, assess(snap("a"), longer, ctx)).admit
    with pytest.raises(ValueError, match="confidences must be > 0"):
        assess(snap("a"), c, RouteContext(models={"a": FAST}, confidence=0.0))
    with pytest.raises(ValueError, match="confidences must be > 0"):
        assess(snap("a"), c, RouteContext(models={"a": FAST}, protect_confidence=0.0))


def test_a_running_call_stays_protected_with_a_margin_below_one() -> None:
    # As in the protection test above: the running call ends at 0.25 s beside the new call,
    # at 0.1 s without it; padded by 0.8, at 0.2 s and 0.08 s.
    ctx = RouteContext(models={"a": FAST}, confidence=0.8, protect_confidence=0.8)
    c = call(prompt=100, out=6, deadline=5.0)
    tight = snap("a", outstanding_requests=1, calls=(running(10, deadline=0.15),))
    assessment = assess(tight, c, ctx)
    assert assessment.endangered == 1
    assert not admit(c, assessment).admit
    # a deadline the padded finish beside the new call still makes: admitted
    enough = snap("a", outstanding_requests=1, calls=(running(10, deadline=0.21),))
    assert admit(c, assess(enough, c, ctx)).admit


def test_running_calls_are_protected_at_their_expected_finish_not_the_admission_pad() -> None:
    # The running call ends at 0.25 s beside the new call (0.1 s without it). Its deadline,
    # 0.3 s, is met as expected (median pad 1.0) and missed at the admission pad (1.5:
    # 0.375 s): the new call is checked against the former.
    c = call(prompt=100, out=6, deadline=5.0)
    there = snap("a", outstanding_requests=1, calls=(running(10, deadline=0.3),))
    expected = RouteContext(models={"a": FAST}, confidence=1.5, protect_confidence=1.0)
    assessment = assess(there, c, expected)
    assert assessment.endangered == 0 and admit(c, assessment).admit
    padded = RouteContext(models={"a": FAST}, confidence=1.5, protect_confidence=1.5)
    assert assess(there, c, padded).endangered == 1
    # the call's own completion is still judged at the admission pad: 0.21 s x 1.5 = 0.315 s
    tight = call(prompt=100, out=6, deadline=0.3)
    verdict = admit(tight, assess(there, tight, expected))
    assert not verdict.admit and "misses the deadline with confidence" in verdict.reason


def test_sla_aware_goes_where_it_endangers_no_one_and_sheds_when_nowhere() -> None:
    c = call(prompt=100, out=6, deadline=5.0)
    ctx = RouteContext(models={"a": FAST, "b": SLOW})
    a = snap("a", outstanding_requests=1, calls=(running(10, deadline=0.2),))
    b = snap("b")  # slower but empty: the call makes its deadline there, endangering no one
    decision = sla_aware([a, b], c, ctx)
    assert decision.replica_id == "b"
    assert isinstance(decision.assessment, Assessment) and decision.assessment.keeps_promises
    nowhere = sla_aware([a], c, ctx)
    assert nowhere.replica_id == "a"
    assert nowhere.assessment is not None and not admit(c, nowhere.assessment).admit


def test_admission_judges_a_dag_call_by_its_request_less_the_rest_of_the_request() -> None:
    ctx = RouteContext(models={"a": FAST})  # the call alone: 0.2 s (prefill 0.1 s + 10 steps)
    first = CallDemand("m", 100, 11, deadline_s=0.15, now_s=0.0, expected_tokens=11)
    assert not admit(first, assess(snap("a"), first, ctx)).admit  # its share alone: shed
    # two more calls like it after it: 3 x 0.2 s = 0.6 s fits the request's 0.65 s
    request = replace(first, request_deadline_s=0.65, rest_calls=2.0)
    assessment = assess(snap("a"), request, ctx)
    assert assessment.deadline_s == pytest.approx(0.65 - 0.4)  # the rest: 2 x 0.2 s
    assert assessment.late_s == pytest.approx(-0.05)
    assert admit(request, assessment).admit
    hopeless = replace(request, request_deadline_s=0.55)  # 0.6 s needed, 0.55 s left
    verdict = admit(hopeless, assess(snap("a"), hopeless, ctx))
    assert not verdict.admit and "misses the deadline with confidence by 0.050s" in verdict.reason


def test_a_call_of_a_committed_request_is_never_shed() -> None:
    ctx = RouteContext(models={"a": FAST})
    late = CallDemand("m", 100, 11, deadline_s=0.0, now_s=0.0, request_deadline_s=0.1)
    assert not admit(late, assess(snap("a"), late, ctx)).admit
    committed = replace(late, committed=True)
    verdict = admit(committed, assess(snap("a"), committed, ctx))
    assert verdict.admit and "earlier call" in verdict.reason


def test_admission_rejects_a_negative_tolerance() -> None:
    c = call()
    with pytest.raises(ValueError, match="shed_tolerance_s must be >= 0"):
        admit(c, assess(snap("a"), c, RouteContext()), tolerance_s=-1.0)


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
    for name, deadline in [("kept", 1.0), ("gone", 1.0)]:
        q.push(name, deadline, 0.5)
    assert q.drop_expired(now_s=2.5, keep=lambda item: item == "kept") == ["gone"]
    assert q.pop(2.5).item == "kept"
