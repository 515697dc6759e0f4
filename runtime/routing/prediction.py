"""Completion-time predictions from the step-time model, and how far to trust them.

The router decides on predictions: which replica finishes a call soonest, whether the call
can still meet its deadline, whether admitting it pushes calls already running past theirs.
They come from the engine's step-time model (runtime.engine.steptime: a step's duration is
affine in the prefill tokens it computes, the sequences it decodes and the KV tokens they
attend to), run forward over what the router knows of a replica: the calls it sent there, in
order, each with its prompt, its expected output and whether its first token has arrived.

- :func:`finish_offsets` plays the replica's batch forward: the first ``max_num_seqs`` calls
  run, the rest wait for a slot (vLLM admits first come, first served); a step prefills
  prompt chunks within the ``max_num_batched_tokens`` budget beside one token per decoding
  call; runs of decode-only steps are taken in closed form up to the next call that
  finishes, whose slot the next waiting call takes. Decode steps get longer as the batch
  grows and as contexts grow, so a new call delays every call running beside it.
- :func:`forecast` predicts a new call's completion on a replica and the finish of every call
  already there with and without it (the slowdown it causes).
- :class:`PredictionTracker` compares each prediction the router acted on with the measured
  completion: a per-replica correction factor (a mean of measured / predicted in log space,
  so the model's bias is learned online, in either direction), the median and p90 of the
  relative error, and the confidence ratio admission pads predictions with (a quantile of
  measured over the prediction as the current correction would make it: the spread left
  around the corrected model, below 1 where the corrected model is still too slow).
- :class:`OutputLengths` learns how many tokens calls really generate (the mean per model key,
  ``max_tokens`` and app node, optionally started from a trace's lengths): ``max_tokens`` is
  only a cap.

What the model leaves out, stated once: prefix-cache hits (a prompt counts in full until its
first token arrives), KV-cache exhaustion and preemption, speculative decoding, and calls
that arrive after the prediction. The correction factor and the confidence ratio absorb what
these cost on average. Pure: no clock (``now`` is passed in), no I/O.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.engine.steptime import StepFeatures, StepTimeCoefficients, prefill_pairs

#: vLLM's default token budget of one step (``max_num_batched_tokens``) for the OpenAI server
#: on CPU and smaller GPUs.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
#: Upper bounds of the buckets of the relative prediction error |predicted - measured| /
#: measured (the Prometheus histogram of the front door's /metrics).
ERROR_BUCKETS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
#: Weight of the newest call in a replica's correction factor (EWMA of log measured /
#: predicted) once it has learned from enough calls. Lower than the speed EWMA's: single
#: calls scatter widely around the model (their output lengths are unknown in advance), the
#: bias they share moves slowly.
CORRECTION_ALPHA = 0.1
#: Calls at ratio 1 a replica's correction starts from (pseudo-counts): until the weight
#: ``1 / (calls + CORRECTION_PRIOR_CALLS)`` falls to CORRECTION_ALPHA the correction is a
#: plain mean, so a bias is learned within a few calls rather than the ~20 an EWMA from 1
#: takes (on real replicas a run's first minute was spent predicting with half the bias).
CORRECTION_PRIOR_CALLS = 1
#: The correction factor stays within [1 / CORRECTION_LIMIT, CORRECTION_LIMIT].
CORRECTION_LIMIT = 4.0
#: Confidence ratio used before any prediction was measured; with fewer than MIN_SAMPLES
#: measured, the measured quantile is blended in by their share of MIN_SAMPLES.
PRIOR_CONFIDENCE = 1.25
#: The confidence ratio stays within [1 / CONFIDENCE_LIMIT, CONFIDENCE_LIMIT].
CONFIDENCE_LIMIT = 4.0
#: Seconds a measured ratio counts towards the confidence. Shed calls are never measured, so
#: without an age limit a window of pessimistic ratios (a transient slowdown, the first calls
#: before output lengths were learned) would shed every call for good; once they age out the
#: prior confidence admits calls again and fresh measurements follow.
CONFIDENCE_HORIZON_S = 60.0
#: Seconds of recent dispatches the rate of expected arrivals is measured over.
TRAFFIC_HORIZON_S = 30.0
#: Calls of max_tokens tokens an output length starts from (pseudo-counts): the first calls to
#: finish are the short ones, and alone they would make every expectation too short.
LENGTH_PRIOR_CALLS = 5
#: Weight of the newest arrival in the strain (the share of calls that found every replica
#: full).
STRAIN_ALPHA = 0.05
#: Strain at and above which admission pads at the full quantile: the level rises in
#: proportion to the share of arrivals that found no free slot.
STRAIN_FULL = 1.0
#: Measured predictions needed before the observed quantile replaces PRIOR_CONFIDENCE
#: entirely (below, the two are blended geometrically by the share of MIN_SAMPLES measured:
#: a run's first 20 calls take a third of a 40 s run on real replicas, and a fixed prior
#: over them shed calls the first measurements already showed would make it).
MIN_SAMPLES = 20
#: Weight of the newest call in the mean output length of a (model key, max_tokens).
LENGTH_ALPHA = 0.1
#: Output lengths of the last calls of a (model key, max_tokens) kept for their quantiles.
LENGTH_WINDOW = 256


# --------------------------------------------------------------------------------------------
# What the router knows of one replica's calls
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InFlightCall:
    """A call the router sent to a replica that has not ended, as the router knows it.

    Attributes:
        prompt_tokens: The call's prompt tokens (estimated before the server counts them).
        expected_tokens: Output tokens it is expected to generate in all (learned, see
            :class:`OutputLengths`; at most its ``max_tokens``).
        sent_s: When the router sent it (the router's clock).
        first_token_s: When its first token arrived; None while it is still before it.
        deadline_s: Its absolute deadline on the same clock.
    """

    prompt_tokens: int
    expected_tokens: float
    sent_s: float
    first_token_s: float | None
    deadline_s: float


@dataclass(frozen=True)
class CallProgress:
    """Work a call has left on its replica: the input of :func:`finish_offsets`.

    Attributes:
        prefill_tokens: Prompt tokens still to prefill.
        decode_tokens: Output tokens still to generate, its first one included while its
            prefill remains (the first token comes out of the step that ends the prefill).
            May be fractional: it is an expectation.
        context_tokens: Tokens in its KV cache now (prompt computed plus tokens generated).
    """

    prefill_tokens: int
    decode_tokens: float
    context_tokens: int


@dataclass(frozen=True)
class StepModel:
    """One replica's step-time model as the router uses it.

    Attributes:
        coefficients: Seconds per unit of each step feature (a stored profile's, or fitted
            online from measured calls, :meth:`SpeedEstimate.step_model`).
        overhead_s: Seconds a call spends outside engine steps (HTTP, tokenisation,
            streaming back): added once to a new call's prediction.
        correction: Measured / predicted ratio learned online for this replica
            (:meth:`PredictionTracker.correction`); multiplies every predicted duration.
    """

    coefficients: StepTimeCoefficients
    overhead_s: float = 0.0
    correction: float = 1.0

    def decode_step_s(self, sequences: int, context_tokens: int) -> float:
        """Seconds of one decode-only step of ``sequences`` sequences attending to
        ``context_tokens`` KV tokens in all (uncorrected)."""
        return self.coefficients.step_s(
            StepFeatures(decode_seqs=sequences, context_tokens=context_tokens)
        )


def progress(
    calls: Sequence[InFlightCall], model: StepModel, now_s: float
) -> tuple[CallProgress, ...]:
    """What each in-flight call has left, estimated from what the router saw.

    A call before its first token has its whole prompt to prefill and all its expected
    tokens to generate. A call past it has generated one token, then one more per decode step
    since: the steps are timed by the model at the replica's current batch (the calls past
    their first token, attending to their prompts plus what they generated), corrected. At
    least one token is left to a call that has not ended, however long it has run.
    """
    decoding = [c for c in calls if c.first_token_s is not None]
    context = sum(c.prompt_tokens for c in decoding)
    step = model.decode_step_s(len(decoding), context) * model.correction if decoding else 0.0
    if decoding and step > 0:
        generated = sum((now_s - (c.first_token_s or now_s)) / step for c in decoding)
        step = model.decode_step_s(len(decoding), context + int(generated)) * model.correction
    result: list[CallProgress] = []
    for call in calls:
        if call.first_token_s is None or step <= 0:
            done = 0 if call.first_token_s is None else 1
            result.append(
                CallProgress(
                    prefill_tokens=call.prompt_tokens if call.first_token_s is None else 0,
                    decode_tokens=max(call.expected_tokens - done, 1.0),
                    context_tokens=0 if call.first_token_s is None else call.prompt_tokens,
                )
            )
            continue
        generated = 1 + max(now_s - call.first_token_s, 0.0) / step
        result.append(
            CallProgress(
                prefill_tokens=0,
                decode_tokens=max(call.expected_tokens - generated, 1.0),
                context_tokens=call.prompt_tokens + round(generated),
            )
        )
    return tuple(result)


# --------------------------------------------------------------------------------------------
# Playing the batch forward
# --------------------------------------------------------------------------------------------


def finish_offsets(
    calls: Sequence[CallProgress],
    model: StepModel,
    max_num_seqs: int,
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
    arrivals: ExpectedArrivals | None = None,
) -> list[float]:
    """Seconds from now until each call finishes on the replica (engine steps only, times
    ``model.correction``), calls in the order the engine admits them (:func:`play`)."""
    return play(calls, model, max_num_seqs, max_num_batched_tokens, arrivals)[0]


@dataclass(frozen=True)
class ExpectedArrivals:
    """Calls expected to reach a replica while a prediction plays out: one every
    ``interval_s`` seconds (the replica's share of the rate calls were recently sent at),
    each of the size of a typical recent call. Their prefill steps stall the calls decoding
    there, and while slots are free they join the batch: what makes a prediction made under
    load optimistic if left out."""

    interval_s: float
    call: CallProgress


def play(
    calls: Sequence[CallProgress],
    model: StepModel,
    max_num_seqs: int,
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
    arrivals: ExpectedArrivals | None = None,
) -> tuple[list[float], list[float]]:
    """Seconds from now until each call finishes, and until each gets its first token (0 for
    a call past it), on the replica (engine steps only, times ``model.correction``).

    The first ``max_num_seqs`` calls run; each later one takes the slot of the first to
    finish, in order. A step with prefill left schedules one token per decoding call, then
    prompt chunks in order within the budget; a call whose prefill ends in a step gets its
    first token from it. Without prefill, ``k`` identical decode steps up to the next finish
    (or the next expected arrival) last ``k * step_0 + context_token_s * n * k * (k - 1) / 2``
    (each of the ``n`` contexts grows by one token a step). ``arrivals`` join behind the
    given calls, first come first served, until every given call has finished.
    """
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    if max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
    coef = model.coefficients
    scale = model.correction
    count = len(calls)
    prefill = [c.prefill_tokens for c in calls]
    decode = [max(c.decode_tokens, 1e-9) for c in calls]
    context = [c.context_tokens for c in calls]
    finish = [0.0] * count
    first_token = [0.0] * count
    active: list[int] = list(range(min(count, max_num_seqs)))
    waiting: deque[int] = deque(range(len(active), count))
    unfinished = count
    next_arrival = arrivals.interval_s if arrivals is not None else math.inf
    elapsed = 0.0
    while unfinished:
        while next_arrival <= elapsed * scale and arrivals is not None:
            prefill.append(arrivals.call.prefill_tokens)
            decode.append(max(arrivals.call.decode_tokens, 1e-9))
            context.append(arrivals.call.context_tokens)
            if len(active) < max_num_seqs and not waiting:
                active.append(len(prefill) - 1)
            else:
                waiting.append(len(prefill) - 1)
            next_arrival += arrivals.interval_s
        prefilling = [i for i in active if prefill[i] > 0]
        decoding = [i for i in active if prefill[i] == 0]
        ended: list[int] = []
        if prefilling:
            budget = max(max_num_batched_tokens - len(decoding), 1)
            chunks: list[tuple[int, int]] = []
            for i in prefilling:
                if budget <= 0:
                    break
                take = min(prefill[i], budget)
                chunks.append((i, take))
                budget -= take
            features = StepFeatures(
                prefill_tokens=sum(take for _, take in chunks),
                prefill_pairs=sum(prefill_pairs(context[i], take) for i, take in chunks),
                decode_seqs=len(decoding),
                context_tokens=sum(context[i] for i in decoding),
            )
            elapsed += coef.step_s(features)
            for i in decoding:
                decode[i] -= 1
                context[i] += 1
                if decode[i] <= 1e-9:
                    ended.append(i)
            for i, take in chunks:
                prefill[i] -= take
                context[i] += take
                if prefill[i] == 0:
                    if i < count:
                        first_token[i] = elapsed * scale
                    decode[i] -= 1
                    if decode[i] <= 1e-9:
                        ended.append(i)
        elif active:
            steps = max(math.ceil(min(decode[i] for i in active) - 1e-9), 1)
            n = len(active)
            first = model.decode_step_s(n, sum(context[i] for i in active))
            if math.isfinite(next_arrival) and first > 0:
                steps = min(steps, max(math.ceil((next_arrival / scale - elapsed) / first), 1))
            elapsed += steps * first + coef.context_token_s * n * steps * (steps - 1) / 2
            for i in active:
                decode[i] -= steps
                context[i] += steps
                if decode[i] <= 1e-9:
                    ended.append(i)
        else:  # nothing runs (only when nothing was given): wait for the next arrival
            elapsed = next_arrival / scale
        for i in ended:
            if i < count:
                finish[i] = elapsed * scale
                unfinished -= 1
            active.remove(i)
            if waiting:
                active.append(waiting.popleft())
    return finish, first_token


@dataclass(frozen=True)
class Forecast:
    """A new call's predicted completion on one replica and its effect on the calls there.

    Attributes:
        completion_s: Seconds from now until the new call's last token reaches the client
            (corrected, its overhead included).
        first_token_s: Seconds from now until its first token (corrected, no overhead).
        finish_with_s: Seconds from now until each call already on the replica finishes if the
            new call joins (in the order of the calls given).
        finish_without_s: The same if it does not.
    """

    completion_s: float
    first_token_s: float
    finish_with_s: tuple[float, ...]
    finish_without_s: tuple[float, ...]

    @property
    def delay_s(self) -> float:
        """The most seconds the new call delays any call already there (0 with none)."""
        return max(
            (w - wo for w, wo in zip(self.finish_with_s, self.finish_without_s, strict=True)),
            default=0.0,
        )


def forecast(
    calls: Sequence[CallProgress],
    new: CallProgress,
    model: StepModel,
    max_num_seqs: int,
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
    queued_ahead: int = 0,
    protect: bool = True,
    arrivals: ExpectedArrivals | None = None,
) -> Forecast:
    """Predict ``new`` joining a replica that holds ``calls`` (:func:`play`).

    ``queued_ahead`` calls of the new call's size join before it (calls waiting ahead of it
    in the router's queue that will land on this replica); ``arrivals`` join after it. With
    ``protect`` False the calls already there are not played without the new call
    (``finish_without_s`` equals ``finish_with_s``): enough when only the new call's
    completion matters.
    """
    ahead = [new] * max(queued_ahead, 0)
    with_new, first = play(
        [*calls, *ahead, new], model, max_num_seqs, max_num_batched_tokens, arrivals
    )
    existing = tuple(with_new[: len(calls)])
    without = (
        tuple(play(calls, model, max_num_seqs, max_num_batched_tokens, arrivals)[0])
        if protect and calls
        else existing
    )
    return Forecast(
        completion_s=with_new[-1] + model.overhead_s * model.correction,
        first_token_s=first[-1],
        finish_with_s=existing,
        finish_without_s=without,
    )


# --------------------------------------------------------------------------------------------
# Learning from measured calls
# --------------------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by linear interpolation; ValueError if empty."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class PredictionError:
    """One measured prediction: what was predicted, what was measured, the relative error.

    ``predicted_s`` is what the router decided on, with the output length it expected;
    ``given_length_s`` is the same prediction redone for the length the call really had
    (:func:`given_length`): the step-time model's own error, without the error of the
    expected length. The correction factor learns from that one.
    """

    replica_id: str
    predicted_s: float
    measured_s: float
    given_length_s: float | None = None

    @property
    def relative(self) -> float:
        """|predicted - measured| / measured."""
        return abs(self.predicted_s - self.measured_s) / max(self.measured_s, 1e-9)

    @property
    def model_relative(self) -> float | None:
        """|given_length - measured| / measured (None without the length-adjusted value)."""
        if self.given_length_s is None:
            return None
        return abs(self.given_length_s - self.measured_s) / max(self.measured_s, 1e-9)


def given_length(
    predicted_s: float,
    first_token_s: float,
    expected_tokens: float,
    completion_tokens: int,
) -> float:
    """A prediction redone for the real output length: the part after the first token
    scales with the decode tokens (real ``completion_tokens - 1`` over expected
    ``expected_tokens - 1``); unchanged when one token was expected."""
    if expected_tokens <= 1.0:
        return predicted_s
    decode = max(predicted_s - first_token_s, 0.0)
    return first_token_s + decode * max(completion_tokens - 1, 0) / (expected_tokens - 1.0)


class PredictionTracker:
    """Compares each prediction the router acted on with the measured completion.

    - ``correction(replica, now)``: exp of a running mean of log(measured / uncorrected
      prediction given the real length) on that replica (weight ``1 / (calls +
      CORRECTION_PRIOR_CALLS)``, at least CORRECTION_ALPHA: a plain mean over the first
      calls, an EWMA after), clipped to [1/CORRECTION_LIMIT, CORRECTION_LIMIT]; 1 before
      any call. Given the real length, so that an answer shorter than expected does not
      teach the replica to be fast. After CONFIDENCE_HORIZON_S without a measured call on
      the replica it fades back towards 1 (e-folding over the same time): a bias learned in
      an overload must not shed calls for good.
    - ``confidence(now, level)``: the ``level`` quantile (default :attr:`level`) of the
      *residuals* of the last ``window`` calls measured within CONFIDENCE_HORIZON_S of
      ``now``: each call's measured completion over its prediction (at the expected output
      length) made uncorrected and multiplied by its replica's correction *now*. Within
      [1/CONFIDENCE_LIMIT, CONFIDENCE_LIMIT]; PRIOR_CONFIDENCE with no such call, and with
      ``n`` < MIN_SAMPLES of them ``quantile ** w * PRIOR_CONFIDENCE ** (1 - w)``, ``w = n /
      MIN_SAMPLES``. Admission multiplies a corrected prediction by it: at level 0.9, nine
      predictions in ten padded so turned out long enough. The output length's uncertainty
      and the model's are in this one margin: padding a quantile of the length with a
      quantile of the error given the length stacked two p90s (about a p99), and shed calls
      that would have made it. Two earlier choices shed calls that would have made it on
      real replicas, and are gone: the ratios were taken against the predictions as made,
      so while the correction was learning a bias the same bias was counted again in the
      margin (a model 2x too fast padded by its old ratios on top of a correction already
      near 2: a median pad of 1.7 with the level at the median); and the pad was never
      below 1, so a corrected model still too slow (its correction lagging, or the real
      lengths shorter than expected) could only shed. Shed calls are never measured, so a
      margin that errs on the late side is never shown wrong; one that follows the
      measured quantile both ways is.
    - :attr:`level`: between the median and ``quantile``, by the *strain*: an EWMA (weight
      STRAIN_ALPHA) over the arrivals of new requests of whether every replica of the model
      was full (:meth:`arrived`: the call would wait for a slot), full ``quantile`` from
      STRAIN_FULL on. A call admitted at the median pad has even odds at worst; with
      capacity to spare that costs no one else anything, while when slots are short its
      slot is better given to a call sure to make it. The strain measures the shortage of
      capacity, not how many calls are out of reach: with a deadline tight for the spread
      of output lengths, most calls are out of reach at any load, and a level driven by
      them shed 84 % of the calls at 0.95 load with an SLA of 1.5x the idle e2e (below
      round_robin, which sheds none).
    - ``error_quantiles()``: median and p90 of the relative error over the window (and
      ``model_error_quantiles()`` of the error given the real length); ``bucket_counts`` and
      ``error_sum`` make the cumulative histogram of every error.
    """

    def __init__(self, quantile: float = 0.9, window: int = 256) -> None:
        """A tracker whose confidence is the ``quantile`` over the last ``window`` calls."""
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"admission_quantile must be in (0, 1), got {quantile}")
        if window < 1:
            raise ValueError(f"prediction_window must be >= 1, got {window}")
        self.quantile = quantile
        self.strain = 0.0
        self._log_ratio: dict[str, float] = {}
        self._updated: dict[str, float] = {}
        self._calls: dict[str, int] = {}
        # (when, replica, measured / the uncorrected prediction at the expected length)
        self._ratios: deque[tuple[float, str, float]] = deque(maxlen=window)
        self._errors: deque[float] = deque(maxlen=window)
        self._model_errors: deque[float] = deque(maxlen=window)
        self.bucket_counts = [0] * (len(ERROR_BUCKETS) + 1)
        self.error_sum = 0.0
        self.measured = 0

    def correction(self, replica_id: str, now_s: float | None = None) -> float:
        """The factor this replica's predictions are multiplied by at ``now_s`` (1 before any
        call; None: without fading)."""
        return math.exp(self._faded(replica_id, now_s))

    def _faded(self, replica_id: str, now_s: float | None) -> float:
        value = self._log_ratio.get(replica_id, 0.0)
        if now_s is None or replica_id not in self._updated:
            return value
        quiet = now_s - self._updated[replica_id] - CONFIDENCE_HORIZON_S
        return value * math.exp(-max(quiet, 0.0) / CONFIDENCE_HORIZON_S)

    def record(self, error: PredictionError, correction: float = 1.0, now_s: float = 0.0) -> None:
        """Fold in one call measured at ``now_s`` whose prediction was made with
        ``correction``."""
        if error.predicted_s <= 0 or error.measured_s <= 0:
            return
        basis = error.given_length_s if error.given_length_s else error.predicted_s
        raw = math.log(error.measured_s / basis * correction)
        limit = math.log(CORRECTION_LIMIT)
        previous = self._faded(error.replica_id, now_s)
        calls = self._calls.get(error.replica_id, 0) + 1
        self._calls[error.replica_id] = calls
        weight = max(CORRECTION_ALPHA, 1.0 / (calls + CORRECTION_PRIOR_CALLS))
        updated = previous + weight * (raw - previous)
        self._log_ratio[error.replica_id] = min(max(updated, -limit), limit)
        self._updated[error.replica_id] = now_s
        uncorrected = error.predicted_s / correction
        self._ratios.append((now_s, error.replica_id, error.measured_s / uncorrected))
        model_relative = error.model_relative
        if model_relative is not None:
            self._model_errors.append(model_relative)
        relative = error.relative
        self._errors.append(relative)
        self.bucket_counts[bisect.bisect_left(ERROR_BUCKETS, relative)] += 1
        self.error_sum += relative
        self.measured += 1

    def confidence(self, now_s: float | None = None, level: float | None = None) -> float:
        """Ratio admission pads predictions with at ``now_s``, at quantile ``level`` (default
        ``quantile``; see the class docstring; ``now_s`` None: every ratio in the window
        counts, however old)."""
        return self._padding(self._residuals(now_s), self.level if level is None else level)

    def confidences(self, now_s: float | None, *levels: float | None) -> tuple[float, ...]:
        """:meth:`confidence` at each of ``levels`` (None: the current level), from one pass
        over the recent calls (a routing decision needs two)."""
        residuals = self._residuals(now_s)
        return tuple(
            self._padding(residuals, self.level if level is None else level) for level in levels
        )

    def _residuals(self, now_s: float | None) -> list[float]:
        """Measured over the prediction as the replica's correction now makes it, of each
        call measured within CONFIDENCE_HORIZON_S of ``now_s`` (every one in the window:
        None)."""
        recent = [
            (replica, ratio)
            for t, replica, ratio in self._ratios
            if now_s is None or t >= now_s - CONFIDENCE_HORIZON_S
        ]
        # once per replica, not per call: this runs on every routing decision
        corrections = {
            replica: self.correction(replica, now_s) for replica in {r for r, _ in recent}
        }
        return [ratio / corrections[replica] for replica, ratio in recent]

    @staticmethod
    def _padding(residuals: Sequence[float], level: float) -> float:
        """The ``level`` quantile of ``residuals``, clipped, blended with the prior while
        fewer than MIN_SAMPLES (see the class docstring)."""
        if not residuals:
            return PRIOR_CONFIDENCE
        measured = quantile(residuals, level)
        measured = min(max(measured, 1.0 / CONFIDENCE_LIMIT), CONFIDENCE_LIMIT)
        if len(residuals) >= MIN_SAMPLES:
            return measured
        weight = len(residuals) / MIN_SAMPLES
        return measured**weight * PRIOR_CONFIDENCE ** (1.0 - weight)

    @property
    def level(self) -> float:
        """The quantile level admission pads at now (see the class docstring)."""
        return 0.5 + (self.quantile - 0.5) * min(self.strain / STRAIN_FULL, 1.0)

    def arrived(self, full: bool) -> None:
        """The first call of a request asked for admission; ``full``: every replica of its
        model was full (it would wait for a slot)."""
        self.strain += STRAIN_ALPHA * (float(full) - self.strain)

    def error_quantiles(self) -> tuple[float | None, float | None]:
        """Median and p90 of the relative error over the window (None before any call)."""
        if not self._errors:
            return None, None
        errors = list(self._errors)
        return quantile(errors, 0.5), quantile(errors, 0.9)

    def model_error_quantiles(self) -> tuple[float | None, float | None]:
        """Median and p90 of the relative error given the real output lengths."""
        if not self._model_errors:
            return None, None
        errors = list(self._model_errors)
        return quantile(errors, 0.5), quantile(errors, 0.9)


class OutputLengths:
    """Mean tokens generated per kind of call, learned from finished calls.

    A kind is a model key, a ``max_tokens`` and the app node the call comes from (``kind``;
    "" when the caller names none): one node's answers (an e-mail address) can be much
    shorter than another's under the same cap. ``max_tokens`` is a cap; most answers stop
    earlier. Until a call of that kind has finished, ``expected`` is ``max_tokens`` (the
    pessimistic side), unless lengths from a trace were given (:meth:`seed`). The mean
    starts as LENGTH_PRIOR_CALLS calls of ``max_tokens`` tokens (the first answers to finish
    are the short ones: alone they would make every expectation too short); each call then
    weighs ``1 / calls so far`` (a plain mean) until that falls to ``alpha``, then ``alpha``
    (an EWMA: lengths may drift with the traffic). ``quantile`` reads the last LENGTH_WINDOW
    lengths (``max_tokens`` until MIN_SAMPLES calls finished).
    """

    def __init__(self, alpha: float = LENGTH_ALPHA) -> None:
        """Lengths learned with EWMA weight ``alpha`` on the newest call."""
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._means: dict[tuple[str, int, str], float] = {}
        self._counts: dict[tuple[str, int, str], int] = {}
        self._recent: dict[tuple[str, int, str], deque[int]] = {}

    def expected(self, model: str, max_tokens: int, kind: str = "") -> float:
        """Tokens a call of this model key, max_tokens and kind is expected to generate."""
        mean = self._means.get((model, max_tokens, kind), float(max_tokens))
        return min(mean, float(max_tokens))

    def quantile(self, model: str, max_tokens: int, level: float, kind: str = "") -> float:
        """The ``level`` quantile of the recent lengths of this kind of call (``max_tokens``
        while fewer than MIN_SAMPLES have finished)."""
        recent = self._recent.get((model, max_tokens, kind))
        if recent is None or len(recent) < MIN_SAMPLES:
            return float(max_tokens)
        return min(quantile(list(recent), level), float(max_tokens))

    def observe(self, model: str, max_tokens: int, completion_tokens: int, kind: str = "") -> None:
        """A call of this kind generated ``completion_tokens`` tokens."""
        if completion_tokens < 1:
            return
        key = (model, max_tokens, kind)
        self._recent.setdefault(key, deque(maxlen=LENGTH_WINDOW)).append(completion_tokens)
        count = self._counts.get(key, LENGTH_PRIOR_CALLS) + 1
        self._counts[key] = count
        previous = self._means.get(key, float(max_tokens))
        weight = max(self.alpha, 1.0 / count)
        self._means[key] = previous + weight * (float(completion_tokens) - previous)

    def seed(self, model: str, max_tokens: int, lengths: Sequence[int], kind: str = "") -> None:
        """Start this kind from the lengths of a trace (a calibration run, an earlier run of
        the app) instead of from ``max_tokens``: as if those calls had finished, so the first
        calls after a start are not judged at the cap. Lengths below 1 are ignored."""
        usable = [int(n) for n in lengths if n >= 1][-LENGTH_WINDOW:]
        if not usable:
            return
        key = (model, max_tokens, kind)
        self._recent[key] = deque(usable, maxlen=LENGTH_WINDOW)
        self._counts[key] = len(usable)
        self._means[key] = min(statistics.fmean(usable), float(max_tokens))


@dataclass(frozen=True)
class _Sent:
    when_s: float
    prompt_tokens: int
    expected_tokens: float


class Traffic:
    """Calls sent to each model key's replicas in the last ``horizon_s`` seconds: the rate
    further calls are expected at and their typical size (:class:`ExpectedArrivals`)."""

    def __init__(self, horizon_s: float = TRAFFIC_HORIZON_S, limit: int = 4096) -> None:
        """Remember at most ``limit`` calls per model key, none older than ``horizon_s``."""
        self.horizon_s = horizon_s
        self._sent: dict[str, deque[_Sent]] = {}
        self._limit = limit

    def sent(self, model: str, now_s: float, prompt_tokens: int, expected_tokens: float) -> None:
        """A call of ``model`` was sent to a replica at ``now_s``."""
        recent = self._sent.setdefault(model, deque(maxlen=self._limit))
        recent.append(_Sent(now_s, prompt_tokens, expected_tokens))

    def expected(self, model: str, now_s: float, replicas: int) -> ExpectedArrivals | None:
        """Arrivals each of ``replicas`` replicas of ``model`` should expect: the recent
        rate shared evenly, calls of the recent mean size; None with fewer than two recent
        calls."""
        recent = self._sent.get(model)
        if not recent:
            return None
        while recent and recent[0].when_s < now_s - self.horizon_s:
            recent.popleft()
        if len(recent) < 2:
            return None
        span = max(now_s - recent[0].when_s, 1.0)
        rate = len(recent) / span
        prompt = round(statistics.fmean(c.prompt_tokens for c in recent))
        tokens = statistics.fmean(c.expected_tokens for c in recent)
        return ExpectedArrivals(
            interval_s=max(replicas, 1) / rate,
            call=CallProgress(prefill_tokens=prompt, decode_tokens=tokens, context_tokens=0),
        )
