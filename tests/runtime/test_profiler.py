"""The profiler's pure parts: vLLM's per-step log, the features of a probe's steps, the KV
size, the profile built from measurements, the store under the fmtune home, and the verdict on
a busy machine (refused before any replica starts: the live parts are faked here)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime.deployment import Deployment
from runtime.engine.config import EngineConfig
from runtime.engine.machine import MachineState
from runtime.errors import ConfigError
from runtime.profiler import (
    FIT_R2_FLOOR,
    Iteration,
    MachineBusy,
    ProbeMismatch,
    ProbeRequest,
    ProfileKey,
    ProfileMeasurements,
    build_profile,
    find_profile,
    fit_warning,
    judge_machine,
    kv_bytes_per_token,
    list_profiles,
    logged_kv_cache_tokens,
    measure_profile,
    parse_iterations,
    profile_engine,
    profile_path,
    profiling_config,
    require_profile,
    router_step_models,
    step_samples,
)
from runtime.sim.steptime import (
    FitReport,
    SpeculationProfile,
    StepFeatures,
    StepSample,
    prefill_pairs,
    save_profile,
)
from tests.runtime.sim.conftest import make_profile

LOG = """\
(APIServer pid=1) INFO 11-29 01:38:24 [kv_cache_utils.py:2327] CPU KV cache size: 23,296 tokens, Maximum concurrency for 2,048 tokens per request: 11.38x
(APIServer pid=1) INFO 11-29 01:38:28 [loggers.py:199] Engine 000: Iteration(7): 1 context requests, 40 context tokens, 0 generation requests, 0 generation tokens, iteration elapsed time: 175.84 ms, CPU KV cache usage: 0.6%
(APIServer pid=1) INFO 11-29 01:38:29 [loggers.py:122] Avg prompt throughput: 4.0 tokens/s
(APIServer pid=1) INFO 11-29 01:38:28 [loggers.py:199] Engine 000: Iteration(8): 0 context requests, 0 context tokens, 1 generation requests, 1 generation tokens, iteration elapsed time: 96.80 ms, CPU KV cache usage: 0.6%
"""  # noqa: E501

SMOLLM2_CONFIG = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_size": 576,
    "torch_dtype": "bfloat16",
}


def steps(*rows: tuple[int, int, int, int]) -> list[Iteration]:
    """Iterations numbered from 0: (ctx requests, ctx tokens, gen requests, gen tokens),
    each lasting 10 ms."""
    return [Iteration(i, *row, elapsed_s=0.01) for i, row in enumerate(rows)]


def features(samples: list[StepSample]) -> list[StepFeatures]:
    return [sample.features for sample in samples]


def test_iteration_lines_are_read_and_other_lines_ignored() -> None:
    found = parse_iterations(LOG)
    assert [it.index for it in found] == [7, 8]
    assert found[0] == Iteration(7, 1, 40, 0, 0, pytest.approx(0.17584))
    assert (found[1].gen_requests, found[1].gen_tokens) == (1, 1)
    assert logged_kv_cache_tokens(LOG) == 23296
    assert logged_kv_cache_tokens("no such line") is None


def test_one_request_prefills_then_decodes_attending_to_its_growing_sequence() -> None:
    samples = step_samples([ProbeRequest(40, 3)], steps((1, 40, 0, 0), (0, 0, 1, 1), (0, 0, 1, 1)))
    assert features(samples) == [
        StepFeatures(prefill_tokens=40, prefill_pairs=prefill_pairs(0, 40)),
        StepFeatures(decode_seqs=1, context_tokens=41),
        StepFeatures(decode_seqs=1, context_tokens=42),
    ]
    assert all(sample.duration_s == 0.01 for sample in samples)


def test_a_prompt_cut_by_the_token_budget_is_prefilled_in_chunks_that_start_later() -> None:
    requests = [ProbeRequest(300, 2), ProbeRequest(100, 2)]
    log = steps((1, 256, 0, 0), (2, 100, 0, 0), (1, 44, 1, 1), (0, 0, 1, 1))
    samples = features(step_samples(requests, log))
    # step 1: the rest of the first prompt (44 tokens from 256) and 56 of the second
    assert samples[1] == StepFeatures(
        prefill_tokens=100, prefill_pairs=prefill_pairs(256, 44) + prefill_pairs(0, 56)
    )
    assert samples[2] == StepFeatures(
        prefill_tokens=44, prefill_pairs=prefill_pairs(56, 44), decode_seqs=1, context_tokens=301
    )
    assert samples[3] == StepFeatures(decode_seqs=1, context_tokens=101)


def test_a_prefix_hit_makes_the_prefill_start_after_the_cached_tokens() -> None:
    samples = step_samples(
        [ProbeRequest(1024, 2, cached_tokens=512)], steps((1, 512, 0, 0), (0, 0, 1, 1))
    )
    assert samples[0].features.prefill_pairs == prefill_pairs(512, 512)
    assert samples[1].features.context_tokens == 1025


def test_prompts_arriving_during_decoding_make_mixed_steps() -> None:
    requests = [ProbeRequest(10, 4), ProbeRequest(10, 4), ProbeRequest(50, 2)]
    log = steps((2, 20, 0, 0), (0, 0, 2, 2), (1, 50, 2, 2), (0, 0, 3, 3))
    samples = features(step_samples(requests, log))
    assert samples[2] == StepFeatures(
        prefill_tokens=50, prefill_pairs=prefill_pairs(0, 50), decode_seqs=2, context_tokens=24
    )
    assert samples[3] == StepFeatures(decode_seqs=3, context_tokens=13 + 13 + 51)


def test_draft_tokens_count_as_spec_tokens_and_early_finishers_leave_the_batch() -> None:
    requests = [ProbeRequest(10, 8), ProbeRequest(10, 3)]
    log = steps((2, 20, 0, 0), (0, 0, 2, 8), (0, 0, 1, 4))
    samples = features(step_samples(requests, log))
    assert samples[1].spec_tokens == 6
    # the request with fewer tokens left is the one that finished
    assert samples[2] == StepFeatures(decode_seqs=1, context_tokens=12, spec_tokens=3)


@pytest.mark.parametrize(
    ("requests", "log", "problem"),
    [
        ([ProbeRequest(40, 2)], steps((1, 41, 0, 0), (0, 0, 1, 1)), "do not fit"),
        ([ProbeRequest(40, 2)], steps((1, 40, 0, 0), (0, 0, 2, 2)), "only 1 can be"),
        ([ProbeRequest(40, 3)], steps((1, 40, 0, 0), (0, 0, 1, 1)), "still decoding"),
        ([ProbeRequest(40, 2)], [Iteration(0, 1, 40, 0, 0, 0.1), Iteration(2, 0, 0, 1, 1, 0.1)],
         "missing"),
    ],
)  # fmt: skip
def test_a_log_that_cannot_come_from_the_probe_is_refused(
    requests: list[ProbeRequest], log: list[Iteration], problem: str
) -> None:
    with pytest.raises(ProbeMismatch, match=problem):
        step_samples(requests, log)


def test_kv_bytes_per_token_follow_the_model_config_and_the_dtype() -> None:
    assert kv_bytes_per_token(SMOLLM2_CONFIG, "float32") == 30 * 3 * 128 * 4
    assert kv_bytes_per_token(SMOLLM2_CONFIG, "auto") == 30 * 3 * 128 * 2
    without_head_dim = {k: v for k, v in SMOLLM2_CONFIG.items() if k != "head_dim"}
    assert kv_bytes_per_token(without_head_dim, "bfloat16") == 30 * 3 * 2 * 64 * 2
    with pytest.raises(ConfigError, match="got 'int8'"):
        kv_bytes_per_token(SMOLLM2_CONFIG, "int8")


def measurements(**changes: object) -> ProfileMeasurements:
    """Exact steps of 5 ms + 1 ms per decoding sequence + 0.1 ms per prefill token."""
    samples = [
        StepSample(StepFeatures(prefill_tokens=n), 0.005 + 0.0001 * n) for n in (16, 64, 256, 512)
    ] + [StepSample(StepFeatures(decode_seqs=b, context_tokens=0), 0.005 + 0.001 * b)
         for b in (1, 2, 4, 8)]  # fmt: skip
    data = ProfileMeasurements(
        samples=samples,
        ttft_overheads_s=[0.030, 0.032, 0.028],
        tails_s=[0.002, 0.002, 0.002],
        step_gaps_s=[0.001, 0.001, 0.001],
        contention=[1.0, 1.6],
        startup_s=40.0,
        memory_gib_without_kv=0.9,
        logged_kv_tokens=23296,
    )
    for name, value in changes.items():
        setattr(data, name, value)
    return data


ENGINE = EngineConfig(model="smollm2-135m", dtype="float32", block_size=128)


def test_the_profile_adds_the_unlogged_step_gap_and_splits_the_api_overheads() -> None:
    profile = build_profile(ENGINE, measurements(), SMOLLM2_CONFIG)
    assert profile.coefficients.base_s == pytest.approx(0.006, abs=1e-6)
    assert profile.coefficients.prefill_token_s == pytest.approx(0.0001, rel=1e-3)
    assert profile.coefficients.decode_seq_s == pytest.approx(0.001, rel=1e-3)
    assert profile.response_overhead_s == pytest.approx(0.002)
    assert profile.request_overhead_s == pytest.approx(0.030 - 0.001 - 0.002)
    assert profile.kv_bytes_per_token == 46080  # the logged 23,296 tokens agree
    assert profile.contention == (1.0, 1.6) and profile.slowdown(4) == pytest.approx(3.2)
    assert profile.engine["block_size"] == 128 and profile.startup_s == 40.0


def test_the_engines_logged_kv_size_wins_over_the_configs_arithmetic() -> None:
    profile = build_profile(ENGINE, measurements(logged_kv_tokens=11648), SMOLLM2_CONFIG)
    assert profile.kv_bytes_per_token == (1 << 30) // 91 // 128


def test_a_profile_needs_at_least_one_usable_step() -> None:
    data = measurements(samples=[], dropped_probes=["decode 1x32: steps 3..4 are missing"])
    with pytest.raises(ConfigError, match="no usable step: decode 1x32"):
        build_profile(ENGINE, data, SMOLLM2_CONFIG)


def test_a_stored_profile_is_found_by_its_key_and_reused(fmtune_home: Path) -> None:
    key = ProfileKey.for_engine(ENGINE)
    assert find_profile(ENGINE) is None
    with pytest.raises(ConfigError, match="run `fmtune profile smollm2-135m --set dtype=float32`"):
        require_profile(ENGINE)
    stored = make_profile(dtype="float32", hardware=key.hardware, vllm_version=key.vllm_version)
    path = save_profile(stored, profile_path(key))
    assert path.name == stored.key() + ".json"
    assert path.parent == fmtune_home / "profiles" / "v1"
    assert find_profile(ENGINE) == stored
    assert find_profile(ENGINE.with_knobs(dtype="bfloat16")) is None
    outcome = profile_engine(ENGINE)  # no replica starts: the stored one is reused
    assert outcome.reused and outcome.profile == stored and outcome.path == path
    assert list_profiles() == [(path, stored)]


def test_the_router_predicts_with_the_stored_profile_slowed_by_the_replicas_sharing_the_cpu(
    fmtune_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = ProfileKey.for_engine(ENGINE)
    stored = make_profile(
        dtype="float32", hardware=key.hardware, vllm_version=key.vllm_version,
        contention=(1.0, 1.5), request_overhead_s=0.03, response_overhead_s=0.01,
    )  # fmt: skip
    save_profile(stored, profile_path(key))
    engines = {"a": ENGINE, "b": ENGINE.with_knobs(dtype="bfloat16")}  # b: none stored
    local = Deployment.model_validate(
        {"models": {k: {"engine": e.model_dump(exclude_defaults=True)} for k, e in engines.items()}}
    )
    with caplog.at_level("INFO", logger="runtime.profiler"):
        models = router_step_models(local, replicas=2)
    assert set(models) == {"a"}
    assert models["a"].coefficients.base_s == pytest.approx(1.5 * stored.coefficients.base_s)
    assert models["a"].overhead_s == pytest.approx(0.04)
    assert router_step_models(local, replicas=1)["a"].coefficients == stored.coefficients
    missing = [r.getMessage() for r in caplog.records if "'b'" in r.getMessage()]
    assert len(missing) == 1 and "no stored step-time profile" in missing[0]
    remote = Deployment.model_validate(
        {"cluster": "endpoints", "models": {"a": {"engine": {"model": "smollm2-135m"},
                                                "endpoints": ["http://x"]}}}
    )  # fmt: skip
    assert router_step_models(remote, replicas=2) == {}  # its engines run elsewhere


def test_profiles_are_measured_on_vllms_defaults_for_the_knobs_a_simulation_varies() -> None:
    engine = EngineConfig(
        model="smollm2-135m", dtype="float32", max_num_seqs=2, block_size=32,
        max_num_batched_tokens=256, enforce_eager=True, speculative_method="ngram",
        num_speculative_tokens=3,
    )  # fmt: skip
    measured = profiling_config(engine)
    assert (measured.max_num_seqs, measured.block_size, measured.max_num_batched_tokens) == (
        None, None, None,
    )  # fmt: skip
    assert measured.enforce_eager and measured.num_speculative_tokens == 3
    assert ProfileKey.for_engine(measured) == ProfileKey.for_engine(engine)


def test_a_speculating_engine_completes_a_stored_profile_with_the_drafters_cost_and_rates(
    fmtune_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = ProfileKey.for_engine(ENGINE)
    stored = make_profile(dtype="float32", hardware=key.hardware, vllm_version=key.vllm_version)
    path = save_profile(stored, profile_path(key))
    # steps of 4 decoding sequences (10 ms each in SIMPLE) and 6 draft tokens at 2 ms each
    spec_steps = [StepSample(StepFeatures(decode_seqs=4, spec_tokens=6), 0.04 + 0.012)] * 5
    rates = SpeculationProfile(proposal_rate=0.5, acceptance_rate=0.7)
    data = measurements(spec_samples=spec_steps, speculation=rates)
    asked: list[EngineConfig] = []

    def fake_measure(engine: EngineConfig, plan: object, **_: object) -> tuple[None, object]:
        asked.append(engine)
        return None, data

    monkeypatch.setattr("runtime.profiler.measure_profile", fake_measure)
    speculating = ENGINE.with_knobs(speculative_method="ngram", num_speculative_tokens=3)
    assert profile_engine(ENGINE).reused  # no speculation asked for: nothing measured
    outcome = profile_engine(speculating)
    assert not outcome.reused and asked == [speculating]
    assert outcome.profile.coefficients.spec_token_s == pytest.approx(0.002)
    assert outcome.profile.speculation == data.speculation
    assert find_profile(ENGINE) == outcome.profile  # stored under the same key
    assert profile_engine(speculating).reused and len(asked) == 1
    assert path.is_file()


# --- a busy machine ---------------------------------------------------------------------------


def state(load: float, cores: int = 2, servers: int = 0) -> MachineState:
    return MachineState(cores=cores, load_1m_start=load, foreign_vllm_servers=servers)


@pytest.mark.parametrize(
    ("snapshot", "reasons"),
    [
        (state(0.3), []),
        (state(1.0), []),  # exactly half the cores: not above the limit
        (state(1.01), ["1-minute load average 1.01 on 2 cores (above 1.00)"]),
        (state(0.2, servers=1), ["1 other vLLM server running"]),
        (state(7.9, cores=16), []),
        (state(8.5, cores=16), ["1-minute load average 8.50 on 16 cores (above 8.00)"]),
        (
            state(5.2, servers=2),
            ["1-minute load average 5.20 on 2 cores (above 1.00)", "2 other vLLM servers running"],
        ),
    ],
)
def test_a_machine_is_busy_above_half_its_cores_or_with_another_vllm_server(
    snapshot: MachineState, reasons: list[str]
) -> None:
    verdict = judge_machine(snapshot)
    assert list(verdict.reasons) == reasons and verdict.busy == bool(reasons)
    assert f"{snapshot.load_1m_start:.2f} on {snapshot.cores} cores" in verdict.seen
    assert f"{snapshot.foreign_vllm_servers} other vLLM server" in verdict.seen


def test_a_fit_below_the_r2_floor_gets_a_warning() -> None:
    def report(r2: float | None) -> FitReport:
        return FitReport(samples=100, r2=r2, rmse_s=0.1, median_abs_pct_error=0.2)

    assert FIT_R2_FLOOR == 0.8
    warning = fit_warning(report(0.449))
    assert warning is not None and "fit r2 0.449 is below the floor 0.80" in warning
    assert fit_warning(report(0.8)) is None and fit_warning(report(0.95)) is None
    assert fit_warning(report(None)) is None and fit_warning(None) is None


def test_the_profile_records_the_machine_and_warns_of_a_poor_fit() -> None:
    quiet = state(0.4).model_copy(update={"load_1m_end": 1.3})
    profile = build_profile(ENGINE, measurements(machine=quiet), SMOLLM2_CONFIG)
    assert profile.machine == quiet and profile.warnings == ()
    assert profile.measured_at is not None and profile.measured_at.tzinfo is not None
    good = measurements().samples
    noisy = [
        StepSample(s.features, d.duration_s) for s, d in zip(good, reversed(good), strict=True)
    ]
    busy = state(3.0, servers=1).model_copy(update={"load_1m_end": 3.5, "allowed_busy": True})
    doubtful = build_profile(ENGINE, measurements(samples=noisy, machine=busy), SMOLLM2_CONFIG)
    assert doubtful.fit is not None and doubtful.fit.r2 is not None and doubtful.fit.r2 < 0.8
    assert [line.split(":")[0] for line in doubtful.warnings] == [
        "measured on a busy machine (allowed)",
        f"fit r2 {doubtful.fit.r2:.3f} is below the floor 0.80",
    ]


class _FakeProfiler:
    """Stands for the live profiling session: measures nothing, returns `measurements()`."""

    def __init__(self, engine: EngineConfig, plan: object, pool: object, progress: object) -> None:
        self.model_config = SMOLLM2_CONFIG

    def run(self) -> ProfileMeasurements:
        return measurements()


def fake_machine(
    monkeypatch: pytest.MonkeyPatch, snapshot: MachineState, end_load: float = 2.5
) -> list[list[int]]:
    """The profiler sees ``snapshot`` at its start and ``end_load`` at its end, measures with
    `_FakeProfiler` on a pool that starts nothing, and takes every model as prepared. Returns
    the own pids it was asked to leave out of each snapshot."""
    asked: list[list[int]] = []

    def snapshot_of(own_pids: list[int]) -> MachineState:
        asked.append(list(own_pids))
        return snapshot

    @contextlib.contextmanager
    def no_pool(*_: object) -> Iterator[object]:
        yield SimpleNamespace(replicas=list)

    monkeypatch.setattr("runtime.profiler.machine_state", snapshot_of)
    monkeypatch.setattr("runtime.profiler.load_1m", lambda: end_load)
    monkeypatch.setattr("runtime.profiler.profiler_pool", no_pool)
    monkeypatch.setattr("runtime.profiler._Profiler", _FakeProfiler)
    monkeypatch.setattr("runtime.profiler.resolve_model", lambda name: Path(name))
    return asked


def test_a_busy_machine_is_refused_before_any_replica_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_machine(monkeypatch, state(3.0, servers=1))

    def no_replicas(*_: object) -> None:
        raise AssertionError("a replica pool was made on a busy machine")

    monkeypatch.setattr("runtime.profiler.profiler_pool", no_replicas)
    with pytest.raises(MachineBusy) as refused:
        measure_profile(ENGINE)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("machine busy: 1-minute load average 3.00")
    assert "1 other vLLM server running" in message
    assert "`fmtune profile smollm2-135m --set dtype=float32 --allow-busy`" in message


def test_allowed_on_a_busy_machine_the_profile_stores_the_load_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked = fake_machine(monkeypatch, state(3.0), end_load=2.5)
    profile, data = measure_profile(ENGINE, allow_busy=True)
    expected = state(3.0).model_copy(update={"load_1m_end": 2.5, "allowed_busy": True})
    assert profile.machine == data.machine == expected
    assert profile.warnings[0].startswith("measured on a busy machine (allowed): 1-minute load")
    # a pool given by the caller: its running replicas are the profiler's own, not others'
    pool = SimpleNamespace(replicas=lambda: [SimpleNamespace(pid=41), SimpleNamespace(pid=None)])
    measure_profile(ENGINE, pool=pool, allow_busy=True)  # type: ignore[arg-type]
    assert asked == [[], [41]]
