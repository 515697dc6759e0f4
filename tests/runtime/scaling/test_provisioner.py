"""Tests of replica sizing by simulation and of the reactive scaling rule."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from runtime.scaling.provisioner import (
    ReplicaCount,
    ScalingPolicy,
    WindowStats,
    decide,
    parse_replica_count,
    size_replicas,
)

# Service times of one call, seconds: a spread like real LLM calls with varying output length.
SAMPLES = [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 1.0]


# ---------------------------------------------------------------- sizing


def test_trivial_load_needs_one_replica() -> None:
    result = size_replicas(0.05, 1, SAMPLES, sla_p99_s=3.0, epsilon=0.01, max_replicas=8)
    assert result.replicas == 1
    assert result.feasible
    assert result.predicted_violation_rate <= 0.01
    assert result.utilization == pytest.approx(0.05 * 0.565)


def test_sizing_grows_with_arrival_rate() -> None:
    counts = [
        size_replicas(rate, 2, SAMPLES, sla_p99_s=3.0, epsilon=0.01, max_replicas=64).replicas
        for rate in (0.5, 2.0, 8.0)
    ]
    assert counts[0] < counts[1] < counts[2]
    # Never below the stability bound: utilization must stay under 1.
    assert counts[2] > 8.0 * 2 * 0.565


def test_sizing_grows_as_the_sla_tightens() -> None:
    loose = size_replicas(6.0, 1, SAMPLES, sla_p99_s=5.0, epsilon=0.01, max_replicas=64)
    tight = size_replicas(6.0, 1, SAMPLES, sla_p99_s=1.05, epsilon=0.01, max_replicas=64)
    assert loose.feasible and tight.feasible
    assert tight.replicas > loose.replicas
    assert tight.predicted_p99_s <= 1.05


def test_sizing_table_is_monotone_and_unstable_counts_are_flagged() -> None:
    result = size_replicas(6.0, 1, SAMPLES, sla_p99_s=1.05, epsilon=0.01, max_replicas=64)
    table = result.candidates
    assert [c.replicas for c in table] == list(range(1, result.replicas + 1))
    assert all(not c.simulated and c.utilization >= 1 for c in table[:3])
    simulated = [c for c in table if c.simulated]
    p99s = [c.predicted_p99_s for c in simulated]
    assert p99s == sorted(p99s, reverse=True)
    assert table[-1].meets_sla and not any(c.meets_sla for c in table[:-1])


def test_sizing_is_deterministic_for_a_seed() -> None:
    a = size_replicas(4.0, 1.5, SAMPLES, 2.0, 0.01, 32, seed=7)
    b = size_replicas(4.0, 1.5, SAMPLES, 2.0, 0.01, 32, seed=7)
    assert a == b


def test_infeasible_sla_is_flagged() -> None:
    # Half the calls alone take longer than the SLA: no replica count can help.
    result = size_replicas(1.0, 1, SAMPLES, sla_p99_s=0.5, epsilon=0.01, max_replicas=4)
    assert (result.replicas, result.feasible) == (4, False)
    assert result.reason.startswith("infeasible: even with no queueing")
    # Queueing-bound infeasibility: the load needs more than max_replicas.
    capped = size_replicas(20.0, 1, SAMPLES, sla_p99_s=3.0, epsilon=0.01, max_replicas=4)
    assert (capped.replicas, capped.feasible) == (4, False)
    assert "max_replicas=4" in capped.reason


def test_sizing_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="arrival_rate_rps must be a finite number > 0, got 0"):
        size_replicas(0, 1, SAMPLES, 1.0, 0.01, 4)
    with pytest.raises(ValueError, match="epsilon must be in"):
        size_replicas(1, 1, SAMPLES, 1.0, 1.5, 4)
    with pytest.raises(ValueError, match=r"service_time_samples_s must all be .* got -1"):
        size_replicas(1, 1, [0.2, -1.0], 1.0, 0.01, 4)


# ---------------------------------------------------------------- scaling decisions

POLICY = ScalingPolicy(cooldown_s=60, min_replicas=1, max_replicas=4, step=1)
CALM = WindowStats(sla_attainment=0.97, queue_depth=1.0, kv_cache_usage=0.6, requests_in_window=50)


def test_scale_up_on_low_attainment() -> None:
    stats = WindowStats(0.80, 0.0, 0.3, 100)
    d = decide(POLICY, stats, current_replicas=2, now_s=500.0, last_change_s=100.0)
    assert (d.from_replicas, d.to_replicas, d.time_s) == (2, 3, 500.0)
    assert d.changed
    assert "sla_attainment 0.800 < 0.95" in d.reason


@pytest.mark.parametrize(
    ("stats", "signal"),
    [
        (WindowStats(1.0, 5.0, 0.3, 100), "queue_depth"),
        (WindowStats(1.0, 0.0, 0.95, 100), "kv_cache_usage"),
        (WindowStats(1.0, 0.0, 0.3, 100, out_of_reach=0.1), "predicted out of reach 0.100"),
    ],
)
def test_scale_up_on_queue_or_kv_pressure(stats: WindowStats, signal: str) -> None:
    d = decide(POLICY, stats, current_replicas=1, now_s=500.0, last_change_s=None)
    assert d.to_replicas == 2
    assert signal in d.reason


def test_scale_down_only_when_comfortably_above() -> None:
    # Inside the band (0.95 <= attainment < 0.99): hold.
    d = decide(POLICY, CALM, 3, now_s=500.0, last_change_s=None)
    assert d.to_replicas == 3 and "hysteresis" in d.reason
    # Attainment high but KV usage above kv_usage_low: still hold.
    d = decide(POLICY, WindowStats(1.0, 0.0, 0.7, 100), 3, now_s=500.0, last_change_s=None)
    assert d.to_replicas == 3
    # Everything comfortable: scale down.
    d = decide(POLICY, WindowStats(0.995, 0.1, 0.2, 100), 3, now_s=500.0, last_change_s=None)
    assert d.to_replicas == 2 and d.reason.startswith("scale down")
    # Everything measured is comfortable, but the router predicts calls it cannot serve in
    # time: hold.
    pressed = WindowStats(0.995, 0.1, 0.2, 100, out_of_reach=0.03)
    assert decide(POLICY, pressed, 3, now_s=500.0, last_change_s=None).to_replicas == 3
    # An idle window also scales down.
    d = decide(POLICY, WindowStats(0.0, 0.0, 0.0, 0), 3, now_s=500.0, last_change_s=None)
    assert d.to_replicas == 2 and "idle" in d.reason


def test_hold_during_cooldown() -> None:
    stats = WindowStats(0.5, 10.0, 0.99, 100)
    d = decide(POLICY, stats, 2, now_s=130.0, last_change_s=100.0)
    assert d.to_replicas == 2 and not d.changed
    assert d.reason == "cooldown (30.0s left)"
    assert decide(POLICY, stats, 2, now_s=160.0, last_change_s=100.0).to_replicas == 3


def test_respects_min_and_max() -> None:
    hot = WindowStats(0.5, 10.0, 0.99, 100)
    cold = WindowStats(1.0, 0.0, 0.0, 100)
    assert decide(POLICY, hot, 4, 500.0, None).to_replicas == 4
    assert "max_replicas=4" in decide(POLICY, hot, 4, 500.0, None).reason
    assert decide(POLICY, cold, 1, 500.0, None).to_replicas == 1
    big_step = POLICY.model_copy(update={"step": 3})
    assert decide(big_step, hot, 3, 500.0, None).to_replicas == 4
    assert decide(big_step, cold, 2, 500.0, None).to_replicas == 1
    # Out of range counts are clamped even during cooldown.
    assert decide(POLICY, CALM, 6, 500.0, 490.0).to_replicas == 4
    assert decide(POLICY, CALM, 0, 500.0, 490.0).to_replicas == 1


def test_hysteresis_validation_names_the_fields() -> None:
    with pytest.raises(ValidationError) as err:
        ScalingPolicy(scale_up_attainment_below=0.95, scale_down_attainment_above=0.9)
    assert (
        "scale_down_attainment_above must exceed scale_up_attainment_below, got 0.9 <= 0.95"
        in str(err.value)
    )
    with pytest.raises(ValidationError, match="kv_usage_low must be below kv_usage_high"):
        ScalingPolicy(kv_usage_low=0.9, kv_usage_high=0.8)
    with pytest.raises(ValidationError, match="queue_depth_low must be below queue_depth_high"):
        ScalingPolicy(queue_depth_low=5.0, queue_depth_high=4.0)
    with pytest.raises(ValidationError, match="min_replicas must be <= max_replicas, got 5 > 2"):
        ScalingPolicy(min_replicas=5, max_replicas=2)
    for name, info in ScalingPolicy.model_fields.items():
        assert info.description, name


# ---------------------------------------------------------------- replica counts


class _Deployment(BaseModel):
    replicas: ReplicaCount


@pytest.mark.parametrize(("raw", "parsed"), [(1, 1), (3, 3), ("auto", "auto"), ("2", 2)])
def test_replica_count_accepts_ints_and_auto(raw: object, parsed: object) -> None:
    assert parse_replica_count(raw) == parsed
    assert _Deployment(replicas=raw).replicas == parsed  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [0, -1, 1.5, True, "many", "0", None])
def test_replica_count_rejects_other_values(raw: object) -> None:
    with pytest.raises(ValueError, match=r"replicas must be an integer >= 1 or 'auto', got"):
        parse_replica_count(raw)
    with pytest.raises(ValidationError, match="replicas must be an integer"):
        _Deployment(replicas=raw)  # type: ignore[arg-type]
