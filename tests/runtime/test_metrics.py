"""Run metrics on hand-computed inputs: percentiles, SLA, goodput, cost, quality, formats."""

from __future__ import annotations

import pytest

from runtime.metrics import (
    CostModel,
    RequestOutcome,
    RunMetrics,
    cost_per_1k_requests,
    model_key_usage,
    summarize,
)

PRICES = CostModel(price_per_replica_hour_usd={"smollm2": 0.36}, api_price_per_1k_tokens_usd=0.0)


def _ok(i: int, e2e: float, quality: float | None = 1.0, **extra: object) -> RequestOutcome:
    return RequestOutcome(
        request_id=i,
        start_s=10.0 + i,
        end_s=10.0 + i + e2e,
        ok=True,
        error=None,
        quality=quality,
        **extra,  # type: ignore[arg-type]
    )


def _failed(i: int, e2e: float = 0.1, shed: bool = False) -> RequestOutcome:
    return RequestOutcome(
        request_id=i, start_s=float(i), end_s=i + e2e, ok=False, error="timeout", shed=shed
    )


def test_cost_arithmetic() -> None:
    # 2 replica-hours at $0.36 + 1.5 hours at $2.00 + 50k API tokens at $0.01/1k = $3.72 + $0.50
    cost = cost_per_1k_requests(
        {"small": 7200.0, "large": 5400.0}, {"small": 0.36, "large": 2.0}, 50_000, 0.01, 500
    )
    assert cost == pytest.approx((0.72 + 3.0 + 0.5) / 500 * 1000)


def test_cost_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="no entry for model 'big'"):
        cost_per_1k_requests({"big": 1.0}, {"small": 1.0}, 0, 0.0, 10)
    with pytest.raises(ValueError, match="n_requests must be >= 1, got 0"):
        cost_per_1k_requests({}, {}, 0, 0.0, 0)


def test_outcome_rejects_end_before_start() -> None:
    with pytest.raises(ValueError, match="end_s must be >= start_s"):
        RequestOutcome(request_id=1, start_s=5.0, end_s=4.0, ok=True, error=None)


def test_summary_sla_goodput_errors_and_quality() -> None:
    outcomes = [
        _ok(0, 0.5, quality=1.0, ttfts_s=[0.1], tpots_s=[0.01], completion_tokens=20),
        _ok(1, 1.0, quality=0.5, ttfts_s=[0.2, 0.3], tpots_s=[0.02], completion_tokens=30),
        _ok(2, 3.0, quality=1.0, ttfts_s=[0.4], tpots_s=[0.03], completion_tokens=50),
        _failed(3),
        _failed(4, shed=True),
    ]
    metrics = summarize(
        outcomes,
        wall_s=10.0,
        sla_e2e_s=2.0,
        replica_seconds={"smollm2": 3600.0},
        prices=PRICES,
        peak_memory_gib=1.5,
    )
    assert metrics.num_requests == 5
    assert metrics.num_failed == 2 and metrics.num_shed == 1
    assert metrics.error_rate == pytest.approx(0.4)
    # Two of five requests met the 2 s deadline; failures and shed ones are misses.
    assert metrics.sla_attainment == pytest.approx(0.4)
    assert metrics.goodput_rps == pytest.approx(0.2)
    assert metrics.requests_per_s == pytest.approx(0.3)
    assert metrics.output_tokens_per_s == pytest.approx(10.0)
    assert metrics.e2e_p50_s == pytest.approx(1.0)
    assert metrics.e2e_p99_s == pytest.approx(1.0 + 0.98 * 2.0)
    assert metrics.ttft_p50_s == pytest.approx(0.25)
    assert metrics.tpot_p50_s == pytest.approx(0.02)
    # Failed requests score 0: (1 + 0.5 + 1 + 0 + 0) / 5.
    assert metrics.quality == pytest.approx(0.5)
    assert metrics.quality_ci95 is not None
    assert metrics.quality_ci95[0] <= 0.5 <= metrics.quality_ci95[1]
    assert metrics.cost_per_1k_usd == pytest.approx(0.36 / 5 * 1000)
    assert metrics.peak_memory_gib == 1.5
    assert metrics.format_clean_rate is None


def test_summary_format_rates_tokens_and_calls() -> None:
    outcomes = [
        _ok(
            0,
            0.5,
            llm_calls=2,
            prompt_tokens=100,
            completion_tokens=10,
            format_statuses=["clean", "repaired"],
        ),
        _ok(
            1,
            0.5,
            llm_calls=1,
            prompt_tokens=50,
            completion_tokens=20,
            format_statuses=["clean", "unparseable"],
        ),
    ]
    metrics = summarize(
        outcomes,
        wall_s=2.0,
        sla_e2e_s=1.0,
        replica_seconds={},
        prices=PRICES,
        peak_memory_gib=None,
        api_tokens=1000,
    )
    assert (metrics.format_clean_rate, metrics.format_repaired_rate) == (0.5, 0.25)
    assert metrics.format_unparseable_rate == 0.25
    assert metrics.llm_calls_per_request == 1.5
    assert metrics.tokens_per_request == 90.0
    assert metrics.cost_per_1k_usd == 0.0


def test_unscored_app_has_no_quality() -> None:
    metrics = summarize(
        [_ok(0, 0.2, quality=None)],
        wall_s=1.0,
        sla_e2e_s=1.0,
        replica_seconds={},
        prices=PRICES,
        peak_memory_gib=None,
    )
    assert metrics.quality is None and metrics.quality_ci95 is None
    assert metrics.sla_attainment == 1.0


def test_empty_run() -> None:
    metrics = summarize(
        [], wall_s=0.0, sla_e2e_s=1.0, replica_seconds={}, prices=PRICES, peak_memory_gib=None
    )
    assert metrics.num_requests == 0 and metrics.num_failed == 0
    undefined = set(RunMetrics.model_fields) - {
        "num_requests",
        "num_failed",
        "num_shed",
        "wall_s",
        "sla_e2e_s",
        "repeats",
        "score_errors",
    }
    assert all(getattr(metrics, name) is None for name in undefined)


def test_all_failed_run() -> None:
    metrics = summarize(
        [_failed(0), _failed(1)],
        wall_s=4.0,
        sla_e2e_s=1.0,
        replica_seconds={"smollm2": 10.0},
        prices=PRICES,
        peak_memory_gib=0.8,
    )
    assert metrics.sla_attainment == 0.0 and metrics.goodput_rps == 0.0
    assert metrics.error_rate == 1.0
    assert metrics.e2e_p50_s is None and metrics.ttft_p99_s is None
    assert metrics.quality is None


def test_summary_rejects_bad_deadline() -> None:
    with pytest.raises(ValueError, match="sla_e2e_s must be > 0, got 0"):
        summarize(
            [], wall_s=1.0, sla_e2e_s=0, replica_seconds={}, prices=PRICES, peak_memory_gib=None
        )


def test_busy_replica_seconds_is_the_span_of_the_work_per_replica() -> None:
    from runtime.metrics import busy_replica_seconds

    outcomes = [_ok(0, 2.0), _ok(3, 1.5)]  # sends at 10 and 13, answers at 12 and 14.5
    assert busy_replica_seconds(outcomes, {"llm": 2, "judge": 1}) == {"llm": 9.0, "judge": 4.5}
    assert busy_replica_seconds([], {"llm": 1}) == {"llm": 0.0}
    with pytest.raises(ValueError, match=r"replicas\['llm'\] must be >= 0, got -1"):
        busy_replica_seconds(outcomes, {"llm": -1})


def _metrics(e2e: list[float], quality: float = 1.0, peak: float = 1.0) -> RunMetrics:
    outcomes = [_ok(i, value, quality=quality) for i, value in enumerate(e2e)]
    return summarize(outcomes, 10.0, 30.0, {"smollm2": 10.0}, PRICES, peak)


def test_repeats_combine_to_medians_sums_and_examples() -> None:
    from runtime.metrics import combine_repeats, example_quality, median_metric_names

    runs = [_metrics([1.0, 2.0], peak=1.0), _metrics([3.0, 4.0], peak=3.0),
            _metrics([2.0, 3.0], peak=2.0)]  # fmt: skip
    scores = [[1.0, 0.0], [1.0, 1.0], [1.0, 0.5]]
    outcomes = [[_ok(i, 1.0, quality=q) for i, q in enumerate(repeat)] for repeat in scores]
    per_example = example_quality(outcomes)
    assert per_example == pytest.approx([1.0, 0.5])
    combined = combine_repeats(runs, per_example)
    m = combined.metrics
    assert m.repeats == 3 and m.num_requests == 6 and m.wall_s == 30.0
    assert m.e2e_p50_s == pytest.approx(2.5)  # the repeats' medians are 1.5, 3.5, 2.5
    assert combined.intervals["e2e_p50_s"] == pytest.approx([1.5, 3.5])
    assert m.peak_memory_gib == 3.0
    assert m.quality == pytest.approx(0.75) and m.quality_ci95 is not None
    assert combined.values()["e2e_p50_s"] == pytest.approx([1.5, 3.5, 2.5])
    assert "quality" not in median_metric_names() and "num_requests" not in median_metric_names()
    # one repeat is itself, with no interval over repeats
    single = combine_repeats(runs[:1])
    assert single.metrics.model_dump(exclude={"repeats"}) == runs[0].model_dump(exclude={"repeats"})
    assert single.intervals == {}


def test_example_quality_counts_failures_as_zero_and_needs_equal_repeats() -> None:
    from runtime.metrics import example_quality

    assert example_quality([[_ok(0, 1.0, quality=1.0), _failed(1)]]) == [1.0, 0.0]
    assert example_quality([[_ok(0, 1.0, quality=None)]]) is None
    with pytest.raises(ValueError, match="same requests"):
        example_quality([[_ok(0, 1.0)], [_ok(0, 1.0), _ok(1, 1.0)]])


def test_each_model_key_gets_its_calls_cost_share_and_memory() -> None:
    usage = model_key_usage(
        calls_per_request={"big": 2.0},
        replicas={"big": 1, "small": 2},
        replica_seconds_by_repeat=[{"big": 36.0, "small": 72.0}, {"big": 72.0, "small": 144.0}],
        prices={"big": 1.0, "small": 0.5},
        n_requests=10,
        peak_memory_gib={"big": 3.0, "small": 1.5},
    )
    # 36 s at 1 USD/h over 10 requests = 1.0 USD per 1000; the median of 1.0 and 2.0
    assert usage["big"].cost_per_1k_usd == pytest.approx(1.5)
    assert usage["small"].cost_per_1k_usd == pytest.approx(1.5)
    assert (usage["big"].llm_calls_per_request, usage["small"].llm_calls_per_request) == (2.0, 0.0)
    assert (usage["small"].replicas, usage["small"].usd_per_replica_hour) == (2, 0.5)
    assert usage["big"].peak_memory_gib == 3.0


def test_a_key_without_requests_or_replicas_started_has_no_cost_or_memory() -> None:
    usage = model_key_usage({}, {"llm": 1}, [{"llm": 0.0}], {"llm": 1.0}, 0, None)
    assert usage["llm"].cost_per_1k_usd is None and usage["llm"].peak_memory_gib is None
