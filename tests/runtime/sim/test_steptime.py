"""The step-time model: the fit recovers known coefficients, the profile file round-trips and
names its errors, and KV blocks are counted as vLLM's CPU worker counts them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from runtime.engine.config import EngineConfig
from runtime.engine.machine import MachineState
from runtime.errors import ConfigError
from runtime.sim.steptime import (
    GIB,
    SpeculationProfile,
    StepFeatures,
    StepSample,
    StepTimeCoefficients,
    StepTimeProfile,
    conditional_acceptance,
    fit,
    kv_cache_blocks,
    load_profile,
    prefill_pairs,
    save_profile,
)

TRUE = StepTimeCoefficients(
    base_s=0.012,
    prefill_token_s=0.00025,
    prefill_attention_s=2e-9,
    decode_seq_s=0.0015,
    context_token_s=3e-6,
    spec_token_s=0.0009,
)
#: SmolLM2-135M: 30 layers, 3 KV heads of 64 dims, K and V in bfloat16.
SMOLLM2_KV_BYTES_PER_TOKEN = 30 * 3 * (64 + 64) * 2


def profile(**changes: object) -> StepTimeProfile:
    base: dict[str, object] = {
        "model": "smollm2-135m",
        "dtype": "bfloat16",
        "hardware": "x86_64 2 cores",
        "vllm_version": "0.32.0",
        "coefficients": TRUE,
        "startup_s": 45.0,
        "kv_bytes_per_token": SMOLLM2_KV_BYTES_PER_TOKEN,
    }
    return StepTimeProfile.model_validate({**base, **changes})


def synthetic_steps(count: int, noise: float, seed: int = 0) -> list[StepSample]:
    """Steps like a profiler's: prefills of varied length, decode batches of varied size and
    context, some with drafts; durations from TRUE, times (1 + noise * N(0, 1))."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        prefill = int(rng.integers(0, 2)) * int(rng.integers(16, 1024))
        start = int(rng.integers(0, 512)) if prefill else 0
        seqs = int(rng.integers(0, 33))
        context = seqs * int(rng.integers(64, 1500)) if seqs else 0
        spec = seqs * int(rng.integers(0, 4)) if seqs else 0
        if not prefill and not seqs:
            seqs, context = 1, 100
        features = StepFeatures(
            prefill_tokens=prefill,
            prefill_pairs=prefill_pairs(start, prefill),
            decode_seqs=seqs,
            context_tokens=context,
            spec_tokens=spec,
        )
        duration = TRUE.step_s(features) * (1.0 + noise * float(rng.standard_normal()))
        samples.append(StepSample(features, duration))
    return samples


def test_the_fit_recovers_known_coefficients_from_exact_samples() -> None:
    coefficients, report = fit(synthetic_steps(200, noise=0.0))
    for name, value in TRUE.model_dump().items():
        assert getattr(coefficients, name) == pytest.approx(value, rel=1e-6), name
    assert report.r2 == pytest.approx(1.0)
    assert report.median_abs_pct_error < 1e-9


def test_the_fit_recovers_coefficients_within_noise() -> None:
    coefficients, report = fit(synthetic_steps(2000, noise=0.03, seed=1))
    assert coefficients.base_s == pytest.approx(TRUE.base_s, rel=0.05)
    assert coefficients.prefill_token_s == pytest.approx(TRUE.prefill_token_s, rel=0.05)
    assert coefficients.decode_seq_s == pytest.approx(TRUE.decode_seq_s, rel=0.1)
    assert coefficients.context_token_s == pytest.approx(TRUE.context_token_s, rel=0.1)
    assert report.samples == 2000
    assert report.median_abs_pct_error < 0.03


def test_the_fit_keeps_every_coefficient_non_negative() -> None:
    # durations that fall with the batch size would need a negative per-sequence cost
    samples = [
        StepSample(StepFeatures(decode_seqs=n, context_tokens=100 * n), 0.05 - 0.001 * n)
        for n in range(1, 20)
    ]
    coefficients, _ = fit(samples)
    assert all(value >= 0 for value in coefficients.model_dump().values())


def test_features_absent_from_every_sample_get_zero() -> None:
    samples = [
        StepSample(StepFeatures(prefill_tokens=n, prefill_pairs=0), 0.01 + 0.001 * n)
        for n in (10, 20, 40, 80)
    ]
    coefficients, _ = fit(samples)
    assert coefficients.base_s == pytest.approx(0.01)
    assert coefficients.prefill_token_s == pytest.approx(0.001)
    assert coefficients.decode_seq_s == 0.0
    assert coefficients.spec_token_s == 0.0


def test_a_relative_fit_keeps_short_steps_accurate_beside_long_noisy_ones() -> None:
    # decode steps of 10-25 ms follow the model exactly; prefill steps of seconds carry
    # +-0.2 s of noise that an absolute fit pays for with the short steps' accuracy
    decode = [StepSample(StepFeatures(decode_seqs=b), 0.01 + 0.001 * b) for b in range(1, 16)]
    prefill = [
        StepSample(StepFeatures(prefill_tokens=n), 0.002 * n + (0.2 if i % 2 else -0.2))
        for i, n in enumerate(range(500, 2000, 100))
    ]

    def decode_error(coefficients: StepTimeCoefficients) -> float:
        return max(abs(coefficients.step_s(s.features) / s.duration_s - 1) for s in decode)

    absolute, _ = fit(decode + prefill)
    relative, _ = fit(decode + prefill, relative=True)
    assert decode_error(relative) < 0.02 < decode_error(absolute)


def test_contention_slows_steps_by_the_replicas_computing_at_once() -> None:
    slowed = profile(contention=[1.0, 1.5])
    assert [slowed.slowdown(n) for n in (0, 1, 2, 4)] == [1.0, 1.0, 1.5, 3.0]
    with pytest.raises(ValueError, match=r"must start with 1\.0"):
        profile(contention=[0.9, 1.2])


def test_the_fit_needs_enough_steps() -> None:
    with pytest.raises(ValueError, match="at least 3 steps"):
        fit([StepSample(StepFeatures(prefill_tokens=10, decode_seqs=1), 0.02)])
    with pytest.raises(ValueError, match="finite and > 0"):
        fit([StepSample(StepFeatures(prefill_tokens=10), -1.0)] * 3)


def test_an_empty_step_takes_no_time() -> None:
    assert TRUE.step_s(StepFeatures()) == 0.0


def test_kv_blocks_on_cpu_are_the_cache_bytes_over_the_block_bytes_minus_the_null_block() -> None:
    engine = EngineConfig(model="smollm2-135m", block_size=128, kv_cache_space_gib=1)
    # 1 GiB // (128 tokens * 23040 bytes) = 364 blocks, block 0 is vLLM's null block
    assert kv_cache_blocks(engine, profile()) == 1 * GIB // (128 * 23040) - 1 == 363
    bigger = engine.with_knobs(kv_cache_space_gib=4, block_size=32)
    assert kv_cache_blocks(bigger, profile()) == 4 * GIB // (32 * 23040) - 1


def test_cpu_engines_default_to_vllms_block_size_of_128() -> None:
    engine = EngineConfig(model="smollm2-135m")
    assert kv_cache_blocks(engine, profile()) == 363


def test_a_cuda_engine_needs_the_measured_cache_size() -> None:
    engine = EngineConfig(model="smollm2-135m", device="cuda", block_size=16)
    with pytest.raises(ConfigError, match="gpu_kv_cache_bytes"):
        kv_cache_blocks(engine, profile())
    measured = profile(gpu_kv_cache_bytes=16 * 23040 * 1001)
    assert kv_cache_blocks(engine, measured) == 1000


def test_a_profile_round_trips_through_its_file(tmp_path: Path) -> None:
    original = profile(
        speculation=SpeculationProfile(proposal_rate=0.6, acceptance_rate=0.7),
        memory_gib_without_kv=0.8,
    )
    path = save_profile(original, tmp_path / "profiles" / f"{original.key()}.json")
    assert load_profile(path) == original
    assert "/" not in original.key() and "smollm2-135m" in original.key()


def test_a_profile_stored_before_the_machine_was_recorded_still_loads(tmp_path: Path) -> None:
    data = profile().model_dump(mode="json")
    for name in ("measured_at", "machine", "warnings"):  # what older profilers did not write
        del data[name]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    old = load_profile(path)
    assert old.machine is None and old.measured_at is None and old.warnings == ()
    assert old.schema_version == 1 and old == profile()
    recorded = profile(
        machine=MachineState(cores=2, load_1m_start=5.2, load_1m_end=6.1, foreign_vllm_servers=1,
                             allowed_busy=True),
        measured_at=datetime(2026, 11, 29, 7, 50, tzinfo=UTC),
        warnings=("measured on a busy machine (allowed): 1 other vLLM server running",),
    )  # fmt: skip
    assert load_profile(save_profile(recorded, tmp_path / "new.json")) == recorded


def test_a_bad_profile_file_names_the_file_the_field_and_the_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    data = profile().model_dump(mode="json")
    data["startup_s"] = -3
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as error:
        load_profile(path)
    message = str(error.value)
    assert str(path) in message and "startup_s" in message and "-3" in message
    with pytest.raises(ConfigError, match="no such profile file"):
        load_profile(tmp_path / "missing.json")
    data["startup_s"] = 1.0
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="schema_version"):
        load_profile(path)


@pytest.mark.parametrize("drafts", [1, 3, 5])
def test_conditional_acceptance_inverts_the_accepted_share(drafts: int) -> None:
    for a in (0.0, 0.3, 0.8, 1.0):
        share = sum(a**i for i in range(1, drafts + 1)) / drafts
        assert conditional_acceptance(share, drafts) == pytest.approx(a, abs=1e-6)
