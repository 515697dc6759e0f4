"""Tests of the step-time predictions on hand-worked replica states, and of what the router
learns from measured calls (correction, confidence, errors, output lengths)."""

from __future__ import annotations

import pytest

from runtime.engine.steptime import StepTimeCoefficients
from runtime.routing.prediction import (
    CONFIDENCE_HORIZON_S,
    CORRECTION_PRIOR_CALLS,
    ERROR_BUCKETS,
    LENGTH_PRIOR_CALLS,
    MIN_SAMPLES,
    PRIOR_CONFIDENCE,
    CallProgress,
    ExpectedArrivals,
    InFlightCall,
    OutputLengths,
    PredictionError,
    PredictionTracker,
    StepModel,
    Traffic,
    finish_offsets,
    forecast,
    given_length,
    progress,
    quantile,
)

#: 10 ms per step, 1 ms per prefill token, 10 ms per decoding sequence.
MODEL = StepModel(StepTimeCoefficients(base_s=0.01, prefill_token_s=0.001, decode_seq_s=0.01))


def decoding(left: float, context: int = 100) -> CallProgress:
    """A call past its prefill with ``left`` tokens to generate."""
    return CallProgress(prefill_tokens=0, decode_tokens=left, context_tokens=context)


def new(prompt: int, out: float) -> CallProgress:
    """A call that has not started: its whole prompt and every token to go."""
    return CallProgress(prefill_tokens=prompt, decode_tokens=out, context_tokens=0)


def test_an_idle_replica_prefills_then_decodes_alone() -> None:
    # one step prefills 50 tokens and yields token 1 (0.06 s), 4 decode steps of 0.02 s
    assert finish_offsets([new(50, 5)], MODEL, max_num_seqs=4) == [pytest.approx(0.06 + 0.08)]


def test_a_new_call_slows_the_call_running_beside_it() -> None:
    # Alone, the running call's 10 steps take 0.02 s each: 0.2 s. The new call's prefill step
    # carries one of its tokens (0.07 s), 4 shared steps of 0.03 s finish the new call at
    # 0.19 s, the running call's last 5 steps alone end it at 0.29 s.
    result = forecast([decoding(10)], new(50, 5), MODEL, max_num_seqs=4)
    assert result.completion_s == pytest.approx(0.19)
    assert result.finish_without_s == (pytest.approx(0.2),)
    assert result.finish_with_s == (pytest.approx(0.29),)
    assert result.delay_s == pytest.approx(0.09)


def test_a_call_waits_for_a_slot_when_the_batch_is_full() -> None:
    # max_num_seqs 1: the new call starts when the running one ends (10 steps of 0.02 s)
    offsets = finish_offsets([decoding(10), new(20, 3)], MODEL, max_num_seqs=1)
    assert offsets == [pytest.approx(0.2), pytest.approx(0.2 + 0.03 + 2 * 0.02)]


def test_calls_queued_ahead_in_the_router_delay_the_new_call() -> None:
    alone = forecast([], new(20, 3), MODEL, max_num_seqs=1)
    behind = forecast([], new(20, 3), MODEL, max_num_seqs=1, queued_ahead=2)
    assert behind.completion_s == pytest.approx(3 * alone.completion_s)


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget() -> None:
    # 100 tokens with a budget of 64: two prefill steps (0.074 s, 0.046 s), then 1 decode
    offsets = finish_offsets([new(100, 2)], MODEL, max_num_seqs=4, max_num_batched_tokens=64)
    assert offsets == [pytest.approx(0.074 + 0.046 + 0.02)]


def test_decode_steps_lengthen_as_contexts_grow_in_closed_form() -> None:
    model = StepModel(StepTimeCoefficients(base_s=0.0, decode_seq_s=0.0, context_token_s=0.001))
    # contexts of 10, 11, 12 tokens: 0.010 + 0.011 + 0.012 s
    assert finish_offsets([decoding(3, context=10)], model, max_num_seqs=1) == [
        pytest.approx(0.033)
    ]


def test_the_correction_and_the_overhead_scale_and_shift_the_prediction() -> None:
    slower = StepModel(MODEL.coefficients, overhead_s=0.01, correction=2.0)
    result = forecast([decoding(10)], new(50, 5), slower, max_num_seqs=4)
    assert result.completion_s == pytest.approx(2 * (0.19 + 0.01))
    assert result.finish_without_s == (pytest.approx(0.4),)


def test_progress_counts_the_tokens_a_call_decoded_since_its_first() -> None:
    calls = [
        InFlightCall(prompt_tokens=80, expected_tokens=20, sent_s=0.0, first_token_s=None,
                     deadline_s=9.0),
        InFlightCall(prompt_tokens=100, expected_tokens=20, sent_s=0.0, first_token_s=1.0,
                     deadline_s=9.0),
    ]  # fmt: skip
    model = StepModel(StepTimeCoefficients(base_s=0.0, decode_seq_s=0.02))
    waiting, started = progress(calls, model, now_s=1.2)
    assert waiting == CallProgress(prefill_tokens=80, decode_tokens=20, context_tokens=0)
    # one token at 1.0 s, then one per 0.02 s step: 11 generated, 9 to go
    assert started.prefill_tokens == 0
    assert started.decode_tokens == pytest.approx(9)
    assert started.context_tokens == 111
    # a call that ran longer than expected still has a token to go
    (late,) = progress(calls[1:], model, now_s=9.0)
    assert late.decode_tokens == 1.0


def test_the_tracker_learns_a_bias_and_pads_with_the_quantile() -> None:
    tracker = PredictionTracker(quantile=0.9, window=100)
    assert tracker.correction("a") == 1.0
    assert tracker.confidence() == PRIOR_CONFIDENCE
    for i in range(200):  # the model is 1.5x optimistic, with +-10 % scatter
        correction = tracker.correction("a")
        raw = 1.0
        measured = 1.5 * raw * (0.9 + 0.2 * (i % 11) / 10)
        tracker.record(PredictionError("a", raw * correction, measured), correction)
    assert tracker.correction("a") == pytest.approx(1.5, rel=0.05)
    assert tracker.correction("b") == 1.0
    assert 1.0 <= tracker.confidence() <= 1.2
    median, p90 = tracker.error_quantiles()
    assert median is not None and p90 is not None and median <= p90 <= 0.15
    assert tracker.measured == sum(tracker.bucket_counts) == 200
    assert len(tracker.bucket_counts) == len(ERROR_BUCKETS) + 1


def test_the_confidence_is_the_quantile_of_measured_over_predicted() -> None:
    tracker = PredictionTracker(quantile=0.5, window=MIN_SAMPLES)
    # the model is exact given the real length (nothing to correct): the scatter is the
    # length's, and the margin is its quantile
    for ratio in [1.0] * (MIN_SAMPLES // 2) + [3.0] * (MIN_SAMPLES // 2):
        tracker.record(PredictionError("a", 1.0, ratio, given_length_s=ratio))
    assert tracker.correction("a") == 1.0
    assert tracker.confidence() == pytest.approx(2.0)
    # several levels in one pass, as a routing decision asks for them
    assert tracker.confidences(None, None, 0.5, 0.25) == (
        pytest.approx(2.0), pytest.approx(2.0), pytest.approx(tracker.confidence(None, 0.25))
    )  # fmt: skip
    assert tracker.confidence(None, 0.25) == pytest.approx(1.0)
    # relative errors: 0 for half the calls, |1 - 3| / 3 for the other half
    assert tracker.error_quantiles() == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    with pytest.raises(ValueError, match="admission_quantile must be in"):
        PredictionTracker(quantile=1.0)


def test_quantile_interpolates_between_ranks() -> None:
    assert quantile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.5
    assert quantile([5.0], 0.9) == 5.0
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_output_lengths_start_at_the_cap_and_learn_the_mean() -> None:
    lengths = OutputLengths(alpha=0.1)
    assert lengths.expected("m", 64) == 64
    lengths.observe("m", 64, 20)
    lengths.observe("m", 64, 30)
    # the mean of the prior's calls of 64 tokens and the two real ones
    assert lengths.expected("m", 64) == pytest.approx((LENGTH_PRIOR_CALLS * 64 + 50) / 7)
    for _ in range(100):
        lengths.observe("m", 64, 25)
    assert lengths.expected("m", 64) == pytest.approx(25, abs=0.01)
    assert lengths.expected("m", 128) == 128
    assert lengths.expected("other", 64) == 64


def test_old_ratios_age_out_of_the_confidence() -> None:
    tracker = PredictionTracker(quantile=0.9)
    for i in range(MIN_SAMPLES):  # answers three times as long as expected
        tracker.record(PredictionError("a", 1.0, 3.0, given_length_s=3.0), now_s=float(i))
    assert tracker.confidence(now_s=float(MIN_SAMPLES)) == pytest.approx(3.0)
    later = MIN_SAMPLES + CONFIDENCE_HORIZON_S
    assert tracker.confidence(now_s=later) == PRIOR_CONFIDENCE  # too few recent ones
    assert tracker.confidence() == pytest.approx(3.0)  # no clock: every ratio in the window


def test_a_prediction_is_redone_for_the_real_output_length() -> None:
    # 0.1 s to the first token, 0.9 s for 9 more expected: 2 real tokens took one decode step
    assert given_length(1.0, 0.1, expected_tokens=10, completion_tokens=2) == pytest.approx(0.2)
    assert given_length(1.0, 0.1, expected_tokens=1, completion_tokens=5) == 1.0
    error = PredictionError("a", 1.0, 0.25, given_length_s=0.2)
    assert error.relative == pytest.approx(3.0)
    assert error.model_relative == pytest.approx(0.2)
    tracker = PredictionTracker()
    tracker.record(error)
    assert tracker.error_quantiles() == (pytest.approx(3.0), pytest.approx(3.0))
    assert tracker.model_error_quantiles() == (pytest.approx(0.2), pytest.approx(0.2))
    # the correction learns the model's bias given the length (x1.25), not the length's;
    # its first call weighs 1 / (1 + CORRECTION_PRIOR_CALLS)
    assert tracker.correction("a") == pytest.approx(1.25 ** (1 / (1 + CORRECTION_PRIOR_CALLS)))


def test_expected_arrivals_stall_a_call_with_their_prefill_and_join_its_batch() -> None:
    arriving = ExpectedArrivals(interval_s=0.025, call=new(10, 1))
    # alone: 3 decode steps of 0.02 s. With a call arriving at 0.025 s: 2 steps (0.04 s),
    # then its 10-token prefill step carries the last token (0.01 + 0.01 + 0.01 s)
    assert finish_offsets([decoding(3)], MODEL, max_num_seqs=4) == [pytest.approx(0.06)]
    loaded = finish_offsets([decoding(3)], MODEL, max_num_seqs=4, arrivals=arriving)
    assert loaded == [pytest.approx(0.07)]
    # with no free slot they wait behind the calls there and change nothing
    full = finish_offsets([decoding(3)], MODEL, max_num_seqs=1, arrivals=arriving)
    assert full == [pytest.approx(0.06)]


def test_traffic_expects_the_recent_rate_shared_by_the_replicas() -> None:
    traffic = Traffic(horizon_s=10.0)
    assert traffic.expected("m", 0.0, replicas=2) is None
    for i in range(20):  # 2 calls a second for 10 s
        traffic.sent("m", i * 0.5, prompt_tokens=100 + i % 2 * 100, expected_tokens=40)
    arrivals = traffic.expected("m", 10.0, replicas=2)
    assert arrivals is not None
    assert arrivals.interval_s == pytest.approx(1.0)  # 20 calls in 10 s over 2 replicas
    assert arrivals.call == CallProgress(prefill_tokens=150, decode_tokens=40, context_tokens=0)
    assert traffic.expected("m", 100.0, replicas=2) is None  # all older than the horizon


def test_the_correction_fades_back_to_one_without_new_calls() -> None:
    tracker = PredictionTracker()
    for i in range(50):
        tracker.record(PredictionError("a", 1.0, 2.0), now_s=float(i))
    assert tracker.correction("a", now_s=49.0) == pytest.approx(2.0, rel=0.01)
    assert tracker.correction("a", now_s=49.0 + CONFIDENCE_HORIZON_S) == pytest.approx(
        tracker.correction("a")
    )  # calls a minute apart keep it
    later = tracker.correction("a", now_s=49.0 + 5 * CONFIDENCE_HORIZON_S)
    assert 1.0 < later < 1.05


def test_the_level_rises_from_the_median_with_the_strain() -> None:
    tracker = PredictionTracker(quantile=0.9)
    assert tracker.level == 0.5  # slots to spare: admit at the median
    for _ in range(200):
        tracker.arrived(full=True)
    assert tracker.level == pytest.approx(0.9, abs=1e-3)
    for _ in range(200):
        tracker.arrived(full=False)
    assert tracker.level < 0.51
    for _ in range(14):  # half the recent requests found every replica full
        tracker.arrived(full=True)
    assert tracker.level == pytest.approx(0.5 + 0.4 * tracker.strain) and 0.6 < tracker.level < 0.8
    for ratio in [1.0] * 10 + [2.0] * 10:
        tracker.record(PredictionError("a", 1.0, ratio, given_length_s=ratio))
    assert tracker.confidence(level=0.5) == pytest.approx(1.5)
    assert tracker.confidence(level=0.9) == pytest.approx(2.0)


def test_output_length_quantiles_once_enough_calls_finished() -> None:
    lengths = OutputLengths()
    assert lengths.quantile("m", 64, 0.9) == 64
    for tokens in range(1, MIN_SAMPLES + 1):
        lengths.observe("m", 64, tokens)
    assert lengths.quantile("m", 64, 0.5) == pytest.approx((MIN_SAMPLES + 1) / 2)
    assert lengths.quantile("m", 64, 1.0) == MIN_SAMPLES


def test_output_lengths_are_learned_per_app_node_and_start_from_a_trace() -> None:
    lengths = OutputLengths()
    for _ in range(50):
        lengths.observe("m", 96, 10, kind="ask_email")
        lengths.observe("m", 96, 80, kind="ask_address")
    assert (
        lengths.expected("m", 96, "ask_email") < 20 < 70 < lengths.expected("m", 96, "ask_address")
    )
    assert lengths.expected("m", 96) == 96  # a call naming no node learns apart
    lengths.seed("m", 96, [20, 40, 0, 300], kind="ask_name")  # 0 ignored, 300 over the cap
    assert lengths.expected("m", 96, "ask_name") == 96  # the mean of 20, 40, 300 capped
    lengths.seed("m", 96, [20, 40] * MIN_SAMPLES, kind="ask_name")
    assert lengths.expected("m", 96, "ask_name") == pytest.approx(30)
    assert lengths.quantile("m", 96, 0.5, kind="ask_name") == pytest.approx(30)
    lengths.observe("m", 96, 40, kind="ask_name")  # as after 40 calls: weight alpha (0.1)
    assert lengths.expected("m", 96, "ask_name") == pytest.approx(31)


def test_the_confidence_pads_for_the_output_length_the_prediction_assumed() -> None:
    tracker = PredictionTracker(quantile=0.9, window=MIN_SAMPLES)
    for _ in range(MIN_SAMPLES):  # exact given the real length, twice as long as predicted
        tracker.record(PredictionError("a", 1.0, 2.0, given_length_s=2.0), now_s=0.0)
    assert tracker.correction("a") == 1.0  # the model is right: nothing to correct
    assert tracker.confidence(0.0, 0.5) == pytest.approx(2.0)  # admission's margin: the length
    assert tracker.model_error_quantiles() == (0.0, 0.0)


def test_the_margin_does_not_count_a_bias_the_correction_learned() -> None:
    tracker = PredictionTracker(quantile=0.9)
    for i in range(MIN_SAMPLES):  # a model twice too fast, its calls predicted uncorrected
        tracker.record(PredictionError("a", 1.0, 2.0, given_length_s=1.0), now_s=float(i))
    assert tracker.correction("a") == pytest.approx(2.0, rel=0.05)
    # measured over the predictions as the correction now makes them: the bias is gone
    # (measured / predicted as made was 2.0 for every call: a second x2 on top of the
    # correction)
    assert tracker.confidence(float(MIN_SAMPLES), level=0.9) == pytest.approx(1.0, abs=0.05)


def test_the_margin_follows_the_measured_quantile_below_one() -> None:
    tracker = PredictionTracker(quantile=0.9)
    for i in range(MIN_SAMPLES):  # answers shorter than expected: the model is exact given them
        tracker.record(PredictionError("a", 1.0, 0.6, given_length_s=0.6), now_s=float(i))
    assert tracker.correction("a") == 1.0
    assert tracker.confidence(float(MIN_SAMPLES), level=0.9) == pytest.approx(0.6)


def test_the_prior_gives_way_to_the_first_measurements() -> None:
    tracker = PredictionTracker(quantile=0.9)
    assert tracker.confidence(0.0) == PRIOR_CONFIDENCE
    for i in range(5):
        tracker.record(PredictionError("a", 1.0, 0.8, given_length_s=0.8), now_s=float(i))
    share = 5 / MIN_SAMPLES
    expected = 0.8**share * PRIOR_CONFIDENCE ** (1 - share)
    assert tracker.confidence(5.0) == pytest.approx(expected)
    assert 0.8 < expected < PRIOR_CONFIDENCE
