"""What the simulator knows about a replica: the step-time profile, its fit, its KV blocks.

vLLM runs a replica as a loop of steps, and each step's duration follows the affine step-time
model of runtime.engine.steptime (`StepTimeCoefficients` over the `StepFeatures` a step
computes: prefill tokens and their query-key pairs, decoding sequences and the KV tokens they
attend to, draft tokens). The model itself lives in the engine layer because the router
predicts with it too; this module fits its coefficients by least squares (:func:`fit`) from
measured steps, so a profiler fills a :class:`StepTimeProfile` once per model, dtype,
quantization, hardware and vLLM version and every simulation reuses it. The profile also
carries what the simulator needs beside step times: the bytes of KV cache per token (to turn
the KV cache size into blocks the way vLLM's CPU worker does, :func:`kv_cache_blocks`),
start-up time, per-call API overheads, the n-gram drafter's proposal and acceptance rates,
and the replica's memory.

Pure: numpy and pydantic only; the one I/O is reading and writing a profile file.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runtime.engine.config import EngineConfig
from runtime.engine.machine import MachineState
from runtime.engine.steptime import (
    FEATURES,
    StepFeatures,
    StepTimeCoefficients,
    prefill_pairs,
)
from runtime.errors import ConfigError, config_error

logger = logging.getLogger(__name__)

#: The coefficient model is runtime.engine.steptime's; it is part of this module's interface
#: because a profile holds it and the fit produces it.
__all__ = [
    "FEATURES",
    "GIB",
    "PROFILE_SCHEMA_VERSION",
    "FitReport",
    "SpeculationProfile",
    "StepFeatures",
    "StepSample",
    "StepTimeCoefficients",
    "StepTimeProfile",
    "conditional_acceptance",
    "fit",
    "kv_cache_blocks",
    "load_profile",
    "prefill_pairs",
    "resolved_block_size",
    "save_profile",
]

#: One GiB as vLLM counts it (``GiB_bytes``): VLLM_CPU_KVCACHE_SPACE is in these units.
GIB = 1 << 30
#: Version of the profile file format; bumped when a field changes meaning. A field added
#: with a default that means "not recorded" (machine, measured_at, warnings) keeps it:
#: files written before the field still load, and stay where the store looks for them.
PROFILE_SCHEMA_VERSION = 1

# --------------------------------------------------------------------------------------------
# The fit's report
# --------------------------------------------------------------------------------------------


class FitReport(BaseModel):
    """How well the fitted coefficients explain the samples they were fitted on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    samples: int = Field(ge=0, description="Steps the coefficients were fitted on.")
    r2: float | None = Field(
        None, description="Coefficient of determination of the fit; None if durations are equal."
    )
    rmse_s: float = Field(ge=0, description="Root mean squared error of the fitted step times.")
    median_abs_pct_error: float = Field(
        ge=0, description="Median of |predicted - measured| / measured over the samples."
    )


# --------------------------------------------------------------------------------------------
# The profile
# --------------------------------------------------------------------------------------------


class SpeculationProfile(BaseModel):
    """How the n-gram drafter behaves on this model and workload (measured, not derived)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    proposal_rate: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of a sequence's decode steps for which the drafter "
        "finds an n-gram match and proposes drafts (vllm:spec_decode_num_drafts over the steps "
        "that could draft).",
    )
    acceptance_rate: float = Field(
        ge=0,
        le=1,
        description="Probability that a draft token is accepted given that every "
        "draft before it was: draws stop at the first rejection. "
        "`conditional_acceptance` turns vLLM's accepted/draft token ratio into this.",
    )


class StepTimeProfile(BaseModel):
    """Everything the simulator knows about one replica configuration: the profiler's output.

    One profile per (model, dtype, quantization, hardware, vLLM version); the engine knobs a
    simulation varies (block_size, max_num_seqs, max_num_batched_tokens, prefix caching,
    speculation depth, KV cache size) are inputs of the simulation, not of the profile.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = Field(PROFILE_SCHEMA_VERSION, description="Version of this file format.")
    model: str = Field(min_length=1, description="Model name (catalog name or folder).")
    dtype: str = Field(min_length=1, description="Weights precision the profile was taken at.")
    quantization: str | None = Field(None, description="Weight quantization method, if any.")
    hardware: str = Field(
        min_length=1, description="The machine, e.g. 'x86_64 2 cores AVX2 24 GiB' or a GPU name."
    )
    vllm_version: str = Field(min_length=1, description="Version of the vLLM build measured.")
    coefficients: StepTimeCoefficients = Field(description="The fitted step-time model.")
    fit: FitReport | None = Field(None, description="Quality of the fit, when fitted.")
    startup_s: float = Field(
        ge=0, description="Seconds from starting a replica until it answers /v1/models."
    )
    kv_bytes_per_token: int = Field(
        gt=0,
        description="KV cache bytes one token occupies over all layers (K and V): "
        "layers * kv_heads * (head_size + head_size_v) * dtype bytes. A block of block_size "
        "tokens takes block_size times this (kv_bytes_per_block).",
    )
    gpu_kv_cache_bytes: int | None = Field(
        None,
        gt=0,
        description="CUDA only: the KV cache bytes vLLM allocated (it sizes the "
        "cache from gpu_memory_utilization and free memory, which the simulator cannot know).",
    )
    request_overhead_s: float = Field(
        0.0,
        ge=0,
        description="Seconds from a call leaving the client until the engine's "
        "scheduler sees it (HTTP, chat template, tokenization).",
    )
    response_overhead_s: float = Field(
        0.0,
        ge=0,
        description="Seconds from a step's end until the client holds its tokens "
        "(detokenization, streaming).",
    )
    speculation: SpeculationProfile | None = Field(
        None, description="The n-gram drafter's behaviour; needed to simulate speculation."
    )
    memory_gib_without_kv: float | None = Field(
        None, ge=0, description="Resident memory of an idle replica minus its KV cache, GiB."
    )
    contention: tuple[float, ...] = Field(
        (1.0,),
        min_length=1,
        description="Step-time factor by how many replicas of this machine compute at once: "
        "element i for i + 1 replicas (the first is 1.0), measured with that many replicas "
        "decoding together (replicas on one CPU share its cores and memory bandwidth). "
        "`slowdown` extends it past the last element.",
    )
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="The engine knobs of the measured replica (EngineConfig.knobs()): what the "
        "profile was taken with beside its key (e.g. enforce_eager, block_size).",
    )
    measured_at: datetime | None = Field(
        None,
        description="When the measurement ended (UTC); None: not recorded (profiles stored "
        "before it was).",
    )
    machine: MachineState | None = Field(
        None,
        description="The machine's state while it was measured: load average at start and "
        "end, cores, vLLM servers of others running; None: not recorded (profiles stored "
        "before it was).",
    )
    warnings: tuple[str, ...] = Field(
        (),
        description="Why the profile may not describe this machine's speed when quiet, as "
        "found when it was measured (a busy machine measured anyway, a fit whose r2 is below "
        "the profiler's floor). Empty: none found, or not checked (profiles stored before "
        "these checks; `machine` is None then).",
    )

    @field_validator("contention")
    @classmethod
    def _contention_starts_at_one(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if value[0] != 1.0 or any(factor <= 0 for factor in value):
            raise ValueError(
                f"contention must start with 1.0 and hold factors > 0, got {list(value)}"
            )
        return value

    def slowdown(self, busy: int) -> float:
        """Step-time factor with ``busy`` replicas computing at once on this machine: the
        measured `contention` factor, past the last measured count growing in proportion to
        the replicas (they share the cores the measured ones shared)."""
        if busy <= 1:
            return 1.0
        measured = len(self.contention)
        if busy <= measured:
            return self.contention[busy - 1]
        return self.contention[-1] * busy / measured

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes of one KV block of ``block_size`` tokens (vLLM's page size, all layers)."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        return self.kv_bytes_per_token * block_size

    def key(self) -> str:
        """A file-name-safe identity: model, dtype, quantization, hardware, vLLM version."""
        parts = [self.model, self.dtype, self.quantization or "none", self.hardware]
        parts.append(f"vllm{self.vllm_version}")
        text = "__".join(parts)
        return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)


def save_profile(profile: StepTimeProfile, path: Path) -> Path:
    """Write a profile as JSON (creating the folder); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.model_dump(mode="json"), indent=2) + "\n")
    return path


def load_profile(path: Path) -> StepTimeProfile:
    """Read a profile file; ConfigError naming the file, the field and the value otherwise."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such profile file") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if isinstance(data, dict) and data.get("schema_version", PROFILE_SCHEMA_VERSION) != (
        PROFILE_SCHEMA_VERSION
    ):
        raise ConfigError(
            f"{path}: schema_version must be {PROFILE_SCHEMA_VERSION}, got "
            f"{data.get('schema_version')!r} (re-run the profiler)"
        )
    try:
        return StepTimeProfile.model_validate(data)
    except ValidationError as error:
        raise config_error(error, str(path), StepTimeProfile) from None


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSample:
    """One measured step: what it computed and how long it took."""

    features: StepFeatures
    duration_s: float


def fit(
    samples: Sequence[StepSample], relative: bool = False
) -> tuple[StepTimeCoefficients, FitReport]:
    """Least-squares coefficients of the step-time model, all constrained to be >= 0.

    ``relative`` minimizes the squared *relative* errors (each step weighed by one over its
    duration) instead of the absolute ones, so a few long prefill steps do not outweigh the
    many short decode steps a request's TPOT is made of.

    Non-negative least squares by an active set: fit the base and every feature present in
    the samples; while a coefficient comes out negative, drop the most negative one (it
    becomes 0) and refit. Features absent from every sample get 0. Columns are scaled to unit
    norm before solving so token counts and token pairs (orders of magnitude apart) are
    weighed alike. Steps that computed nothing are ignored. ValueError with fewer usable
    samples than coefficients to fit.
    """
    rows = [s for s in samples if s.features.prefill_tokens or s.features.decode_seqs]
    if not rows:
        raise ValueError("fit needs at least one step that computed something, got none")
    bad = [s.duration_s for s in rows if not (math.isfinite(s.duration_s) and s.duration_s > 0)]
    if bad:
        raise ValueError(f"step durations must be finite and > 0, got {bad[0]}")
    x = np.array([[1.0, *s.features.vector()] for s in rows], dtype=float)
    y = np.array([s.duration_s for s in rows], dtype=float)
    active = [j for j in range(x.shape[1]) if np.any(x[:, j] != 0)]
    if len(rows) < len(active):
        raise ValueError(
            f"fit needs at least {len(active)} steps for {len(active)} coefficients "
            f"(the base and each varying feature), got {len(rows)}"
        )
    weight = 1.0 / y if relative else np.ones_like(y)
    coef = np.zeros(x.shape[1])
    while active:
        design = x[:, active] * weight[:, None]
        scale = np.linalg.norm(design, axis=0)
        solution, *_ = np.linalg.lstsq(design / scale, y * weight, rcond=None)
        values = solution / scale
        worst = int(np.argmin(values))
        if values[worst] >= 0:
            coef[active] = values
            break
        del active[worst]
    coefficients = StepTimeCoefficients(
        base_s=float(coef[0]),
        prefill_token_s=float(coef[1]),
        prefill_attention_s=float(coef[2]),
        decode_seq_s=float(coef[3]),
        context_token_s=float(coef[4]),
        spec_token_s=float(coef[5]),
    )
    predicted = np.array([coefficients.step_s(s.features) for s in rows])
    residual = predicted - y
    total = float(np.sum((y - y.mean()) ** 2))
    report = FitReport(
        samples=len(rows),
        r2=1.0 - float(np.sum(residual**2)) / total if total > 0 else None,
        rmse_s=float(np.sqrt(np.mean(residual**2))),
        median_abs_pct_error=float(np.median(np.abs(residual) / y)),
    )
    logger.debug("fitted step time %s (%s)", coefficients, report)
    return coefficients, report


def conditional_acceptance(overall_ratio: float, num_speculative_tokens: int) -> float:
    """The per-position acceptance probability a whose expected accepted share is the ratio.

    vLLM reports accepted draft tokens over proposed draft tokens. With k drafts per proposal
    and acceptance stopping at the first rejection, the expected share accepted is
    ``(a + a^2 + ... + a^k) / k``; this inverts it by bisection (it increases with a).
    """
    if not 0.0 <= overall_ratio <= 1.0:
        raise ValueError(f"overall_ratio must be in [0, 1], got {overall_ratio}")
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    k = num_speculative_tokens

    def share(a: float) -> float:
        return sum(a**i for i in range(1, k + 1)) / k

    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if share(mid) < overall_ratio:
            low = mid
        else:
            high = mid
    return (low + high) / 2


# --------------------------------------------------------------------------------------------
# KV cache size, as vLLM's CPU worker computes it
# --------------------------------------------------------------------------------------------


def resolved_block_size(engine: EngineConfig) -> int:
    """The block size vLLM uses: the knob, else 128 on CPU (vLLM's CPU platform default) or
    16 on CUDA."""
    if engine.block_size is not None:
        return engine.block_size
    return 128 if engine.device == "cpu" else 16


def kv_cache_blocks(engine: EngineConfig, profile: StepTimeProfile) -> int:
    """KV blocks the scheduler can hand out, as vLLM sizes them.

    On CPU vLLM reads ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB, ``kv_cache_space_gib`` here) as
    the KV cache's bytes (CpuPlatform.check_and_update_config sets
    ``cache_config.kv_cache_memory_bytes``; CPUWorker.determine_available_memory returns it),
    then ``num_blocks = bytes // bytes_per_block`` with ``bytes_per_block`` the page size of
    one block over all layers (kv_cache_utils.get_kv_cache_config_from_groups). The block
    pool keeps block 0 as the null block, so the scheduler has ``num_blocks - 1``. On CUDA
    the bytes are the profile's measured ``gpu_kv_cache_bytes``.
    """
    block_size = resolved_block_size(engine)
    if engine.device == "cpu":
        cache_bytes = (engine.kv_cache_space_gib or 1) * GIB
    elif profile.gpu_kv_cache_bytes is not None:
        cache_bytes = profile.gpu_kv_cache_bytes
    else:
        raise ConfigError(
            f"profile of '{profile.model}': gpu_kv_cache_bytes is needed to simulate a cuda "
            "engine, got None"
        )
    num_blocks = cache_bytes // profile.kv_bytes_per_block(block_size)
    if num_blocks < 2:
        raise ConfigError(
            f"KV cache of {cache_bytes} bytes holds {num_blocks} blocks of {block_size} tokens "
            f"for '{profile.model}'; vLLM needs at least 2"
        )
    return int(num_blocks) - 1
