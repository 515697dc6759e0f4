"""How long one engine step of a vLLM replica takes: the step-time model.

vLLM runs a replica as a loop of steps: each step the scheduler picks tokens to compute (the
prefill chunks of new requests, one token per decoding sequence, draft tokens to verify) and
the model runs them in one forward pass. A step's duration is modelled as an affine function
of what it computes:

    step_s = base_s
             + prefill_token_s * prefill_tokens       (tokens of prompt chunks)
             + prefill_attention_s * prefill_pairs     (query-key pairs of those chunks)
             + decode_seq_s * decode_seqs              (sequences decoding one token)
             + context_token_s * context_tokens        (KV tokens the decoders attend to)
             + spec_token_s * spec_tokens              (draft tokens verified)

The model lives here, in the engine layer, because two layers read it: the simulator
(runtime.sim.steptime fits the coefficients from measured steps and keeps them in a
`StepTimeProfile`; runtime.sim.scheduler times its steps with them) and the router
(runtime.routing.prediction predicts a call's completion, and the slowdown it causes to the
calls already running, from them).

Pure: pydantic only.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

#: The step-time features, in the order of :meth:`StepFeatures.vector` and of the fit.
FEATURES: tuple[str, ...] = (
    "prefill_tokens",
    "prefill_pairs",
    "decode_seqs",
    "context_tokens",
    "spec_tokens",
)


# --------------------------------------------------------------------------------------------
# Step features and coefficients
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepFeatures:
    """What one engine step computes: the inputs of the step-time model.

    Attributes:
        prefill_tokens: Tokens of prefill chunks (new prompts, chunk continuations and
            recomputation after preemption) computed in the step.
        prefill_pairs: Query-key pairs of those chunks: a chunk of ``n`` tokens starting at
            position ``s`` attends ``n * s + n * (n + 1) / 2`` pairs (the quadratic part of
            prefill attention).
        decode_seqs: Sequences that decode in the step (one sampled token each, plus drafts).
        context_tokens: KV tokens the decoding sequences attend to (their lengths, summed).
        spec_tokens: Draft tokens verified in the step (0 without speculative decoding).
    """

    prefill_tokens: int = 0
    prefill_pairs: int = 0
    decode_seqs: int = 0
    context_tokens: int = 0
    spec_tokens: int = 0

    def vector(self) -> list[float]:
        """The features in FEATURES order."""
        return [
            float(self.prefill_tokens),
            float(self.prefill_pairs),
            float(self.decode_seqs),
            float(self.context_tokens),
            float(self.spec_tokens),
        ]


def prefill_pairs(start: int, tokens: int) -> int:
    """Query-key pairs of a prefill chunk of ``tokens`` tokens after ``start`` computed ones."""
    return tokens * start + tokens * (tokens + 1) // 2


class StepTimeCoefficients(BaseModel):
    """Seconds per unit of each step feature, plus a fixed cost per step (all >= 0)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_s: float = Field(
        ge=0,
        description="Fixed seconds of every step that computes anything (scheduling, "
        "the forward pass's launch, sampling set-up).",
    )
    prefill_token_s: float = Field(0.0, ge=0, description="Seconds per prefill token.")
    prefill_attention_s: float = Field(
        0.0, ge=0, description="Seconds per query-key pair of prefill attention."
    )
    decode_seq_s: float = Field(
        0.0, ge=0, description="Seconds per decoding sequence (its token's forward and sampling)."
    )
    context_token_s: float = Field(
        0.0, ge=0, description="Seconds per KV token a decoding sequence attends to."
    )
    spec_token_s: float = Field(0.0, ge=0, description="Seconds per draft token verified.")

    def step_s(self, features: StepFeatures) -> float:
        """Predicted duration of a step with these features (0 when it computes nothing)."""
        if not (features.prefill_tokens or features.decode_seqs):
            return 0.0
        return (
            self.base_s
            + self.prefill_token_s * features.prefill_tokens
            + self.prefill_attention_s * features.prefill_pairs
            + self.decode_seq_s * features.decode_seqs
            + self.context_token_s * features.context_tokens
            + self.spec_token_s * features.spec_tokens
        )

    def as_vector(self) -> list[float]:
        """The per-feature coefficients in FEATURES order (base_s excluded)."""
        return [
            self.prefill_token_s,
            self.prefill_attention_s,
            self.decode_seq_s,
            self.context_token_s,
            self.spec_token_s,
        ]
