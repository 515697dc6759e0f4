"""Engine configuration: one validated object per vLLM server, in vLLM's own knob names.

`EngineConfig` is the single source of truth for an engine's knobs. The server command line,
the exported deploy files and the MLflow params are all derived from its fields (see
`EngineConfig.server_argv`, `EngineConfig.cli_args` and `EngineConfig.environment`), never
from a second hand-written list.
Each field records how it reaches vLLM in its ``json_schema_extra``:

- ``{"flag": "--block-size"}``: rendered as a command-line flag (booleans as
  ``--flag`` / ``--no-flag``), omitted when the value is ``None`` (vLLM's own default);
  ``"values"`` maps a knob value to vLLM's name for it where the two differ.
- ``{"env": "VLLM_CPU_KVCACHE_SPACE"}``: rendered as an environment variable of the server.
- ``{"speculative": "method"}``: folded into vLLM's ``--speculative-config`` JSON.
- ``{"fmtune": True}``: fmtune's own field, not passed to vLLM.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runtime.engine.quantize import COMPRESSED_TENSORS
from runtime.errors import ConfigError, unknown_name_message

Device = Literal["cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
#: Weight quantization: 'int8' is fmtune's W8A8 int8 checkpoint (see the quantization field),
#: the others are vLLM's GPU methods under vLLM's names.
Quantization = Literal["int8", "fp8", "awq", "gptq", "bitsandbytes"]
#: Precision of the KV cache; the fp8 ones store a key or value in one byte (see kv_cache_dtype).
KVCacheDType = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
SpeculativeMethod = Literal["ngram"]
#: How a server command starts vLLM: ``python -m MODULE`` or the ``vllm serve`` console script.
Launcher = Literal["module", "vllm"]

#: KV-cache blocks are laid out in multiples of this many tokens by vLLM's attention kernels.
BLOCK_SIZE_MULTIPLE = 16
#: On the CPU build vLLM warns (and runs slower) unless block_size is a multiple of this.
CPU_BLOCK_SIZE_MULTIPLE = 32
#: KV-cache GiB of a CPU engine unless set.
DEFAULT_CPU_KV_CACHE_GIB = 1
#: Quantization methods whose kernels exist only in the CUDA build.
GPU_ONLY_QUANTIZATION: frozenset[str] = frozenset({"fp8", "awq", "gptq", "bitsandbytes"})
#: Quantization served from a checkpoint fmtune writes once, the quantized variant of the
#: model folder (runtime.engine.models `served_model`), with vLLM's name for its method.
CHECKPOINT_QUANTIZATION: dict[str, str] = {"int8": COMPRESSED_TENSORS}

#: The module that starts vLLM's OpenAI-compatible server (the `vllm` console script is
#: unusable with the vllm-cpu distribution, see shared/ENVIRONMENT.md).
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class EngineConfig(BaseModel):
    """The knobs of one vLLM server, named and bounded as vLLM names and bounds them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Annotated[
        str,
        Field(
            min_length=1,
            description="Catalog name (see `fmtune models list`) or path of a local Hugging Face "
            "model folder. Served under this name.",
            json_schema_extra={"fmtune": True},
        ),
    ]
    device: Annotated[
        Device,
        Field(
            description="Where the engine runs: 'cpu' (vllm-cpu build) or 'cuda' (vllm build).",
            json_schema_extra={"fmtune": True},
        ),
    ] = "cpu"
    dtype: Annotated[
        DType,
        Field(
            description="Weights and activations precision; 'auto' takes the checkpoint's dtype. "
            "Defaults to bfloat16 on cpu: on the 2-core AVX2 machines here it gave 1.6-1.9x the "
            "tokens/s of float32 (benchmarks/engine_bench.py).",
            json_schema_extra={"flag": "--dtype"},
        ),
    ] = "auto"
    quantization: Annotated[
        Quantization | None,
        Field(
            description="Weight quantization method; None serves the weights as they are. "
            "'int8': W8A8, the decoder's linear weights in int8 (symmetric, one scale per "
            "output channel, round to nearest) and their input activations quantized to int8 "
            "per token at run time; the model is served from its int8 variant, a "
            "compressed-tensors checkpoint prepared once beside it (`fmtune models prepare "
            "NAME --quantization int8`, or when a replica first needs it) and rendered as "
            "`--quantization compressed-tensors`; runs on this CPU (vLLM's "
            "CPUInt8ScaledMMLinearKernel, docs/precision-cpu.md) with dtype bfloat16, not "
            "float32 (its kernel refuses float32 activations). 'fp8', 'awq', 'gptq' and "
            "'bitsandbytes' are vLLM's GPU methods and need device 'cuda'.",
            json_schema_extra={"flag": "--quantization", "values": CHECKPOINT_QUANTIZATION},
        ),
    ] = None
    kv_cache_dtype: Annotated[
        KVCacheDType | None,
        Field(
            description="Precision the KV cache is stored in. 'fp8' (vLLM's name for "
            "fp8_e4m3), 'fp8_e4m3' and 'fp8_e5m2' store one byte per value, half of bfloat16, "
            "so a cache of the same kv_cache_space_gib holds twice the tokens; 'auto' is the "
            "dtype's precision. vLLM's CPU build lists all three for CPUs with AVX-512 or AMX "
            "and head sizes that are multiples of 32, and refuses to start otherwise; 'fp8' ran "
            "here, the explicit formats are not tried yet (docs/precision-cpu.md). "
            "None: vLLM's default ('auto').",
            json_schema_extra={"flag": "--kv-cache-dtype"},
        ),
    ] = None
    block_size: Annotated[
        int | None,
        Field(
            ge=BLOCK_SIZE_MULTIPLE,
            le=1024,
            description=f"Tokens per KV-cache block: a multiple of {BLOCK_SIZE_MULTIPLE}, and of "
            f"{CPU_BLOCK_SIZE_MULTIPLE} on CPU (vLLM's CPU backend is slow otherwise). "
            "None: vLLM's default.",
            json_schema_extra={"flag": "--block-size"},
        ),
    ] = None
    max_num_seqs: Annotated[
        int | None,
        Field(
            ge=1,
            le=4096,
            description="Most sequences scheduled in one engine step (the running batch). "
            "None: vLLM's default.",
            json_schema_extra={"flag": "--max-num-seqs"},
        ),
    ] = None
    max_num_batched_tokens: Annotated[
        int | None,
        Field(
            ge=1,
            le=1_048_576,
            description="Most tokens (prefill and decode) processed in one engine step. "
            "Must be at least max_num_seqs. None: vLLM's default.",
            json_schema_extra={"flag": "--max-num-batched-tokens"},
        ),
    ] = None
    max_model_len: Annotated[
        int | None,
        Field(
            ge=16,
            le=1_048_576,
            description="Longest prompt plus output, in tokens. None: the model's own limit.",
            json_schema_extra={"flag": "--max-model-len"},
        ),
    ] = None
    enable_prefix_caching: Annotated[
        bool | None,
        Field(
            description="Reuse KV blocks of shared prompt prefixes across requests. "
            "None: vLLM's default.",
            json_schema_extra={"flag": "--enable-prefix-caching"},
        ),
    ] = None
    enforce_eager: Annotated[
        bool | None,
        Field(
            description="Run the model eagerly instead of compiling it: on this CPU a replica "
            "starts in about 34 s instead of 87 s for about 10% fewer tokens/s. None: vLLM's "
            "default (compiled).",
            json_schema_extra={"flag": "--enforce-eager"},
        ),
    ] = None
    speculative_method: Annotated[
        SpeculativeMethod | None,
        Field(
            description="Speculative decoding method; 'ngram' drafts from the prompt and works "
            "on CPU. None: no speculation.",
            json_schema_extra={"speculative": "method"},
        ),
    ] = None
    num_speculative_tokens: Annotated[
        int | None,
        Field(
            ge=1,
            le=16,
            description="Draft tokens proposed per step (speculation depth). Only with "
            "speculative_method.",
            json_schema_extra={"speculative": "num_speculative_tokens"},
        ),
    ] = None
    prompt_lookup_max: Annotated[
        int | None,
        Field(
            ge=1,
            le=16,
            description="Longest n-gram the 'ngram' drafter matches in the prompt. Only with "
            "speculative_method 'ngram'.",
            json_schema_extra={"speculative": "prompt_lookup_max"},
        ),
    ] = None
    kv_cache_space_gib: Annotated[
        int | None,
        Field(
            ge=1,
            le=1024,
            description="KV-cache size in GiB on CPU (vLLM reads VLLM_CPU_KVCACHE_SPACE, whole "
            f"GiB). Defaults to {DEFAULT_CPU_KV_CACHE_GIB} on cpu, where vLLM would otherwise "
            "size it from system memory. CPU only.",
            json_schema_extra={"env": "VLLM_CPU_KVCACHE_SPACE"},
        ),
    ] = None
    gpu_memory_utilization: Annotated[
        float | None,
        Field(
            gt=0.0,
            le=1.0,
            description="Share of GPU memory vLLM may take for weights and KV cache. "
            "None: vLLM's default. CUDA only.",
            json_schema_extra={"flag": "--gpu-memory-utilization"},
        ),
    ] = None
    tensor_parallel_size: Annotated[
        int,
        Field(
            ge=1,
            le=64,
            description="GPUs one replica is sharded over. CPU replicas use 1.",
            json_schema_extra={"flag": "--tensor-parallel-size"},
        ),
    ] = 1
    seed: Annotated[
        int,
        Field(
            ge=0, description="Sampling seed of the engine.", json_schema_extra={"flag": "--seed"}
        ),
    ] = 0

    @field_validator("quantization", mode="before")
    @classmethod
    def _known_quantization(cls, value: Any) -> Any:
        """A misspelled method gets the closest valid name ('int9' -> 'int8')."""
        methods = get_args(Quantization)
        if isinstance(value, str) and value not in methods:
            raise ValueError(unknown_name_message("quantization", value, methods))
        return value

    @model_validator(mode="before")
    @classmethod
    def _cpu_defaults(cls, data: Any) -> Any:
        """Explicit CPU defaults: a KV-cache size (so several engines fit in one machine) and
        bfloat16 (measured faster than float32 here; see the dtype field)."""
        if isinstance(data, dict) and data.get("device", "cpu") == "cpu":
            defaults = {"kv_cache_space_gib": DEFAULT_CPU_KV_CACHE_GIB, "dtype": "bfloat16"}
            data = {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}
        return data

    @model_validator(mode="after")
    def _check_cross_field_rules(self) -> EngineConfig:
        """Every rule that involves more than one field, in one place."""
        if self.block_size is not None:
            if self.block_size % BLOCK_SIZE_MULTIPLE:
                raise ValueError(
                    f"block_size must be a multiple of {BLOCK_SIZE_MULTIPLE}, got {self.block_size}"
                )
            if self.device == "cpu" and self.block_size % CPU_BLOCK_SIZE_MULTIPLE:
                raise ValueError(
                    f"block_size must be a multiple of {CPU_BLOCK_SIZE_MULTIPLE} on cpu, "
                    f"got {self.block_size}"
                )
        if (
            self.max_num_seqs is not None
            and self.max_num_batched_tokens is not None
            and self.max_num_batched_tokens < self.max_num_seqs
        ):
            raise ValueError(
                "max_num_batched_tokens must be >= max_num_seqs, got "
                f"max_num_batched_tokens={self.max_num_batched_tokens} "
                f"max_num_seqs={self.max_num_seqs}"
            )
        if self.device == "cpu":
            if self.quantization in GPU_ONLY_QUANTIZATION:
                raise ValueError(
                    f"quantization '{self.quantization}' needs device 'cuda', got device 'cpu'"
                )
            if self.quantization == "int8" and self.dtype == "float32":
                raise ValueError(
                    "quantization 'int8' needs dtype bfloat16 on cpu (vLLM's CPU int8 kernel "
                    "takes bfloat16 or half activations), got dtype 'float32'"
                )
            if self.gpu_memory_utilization is not None:
                raise ValueError(
                    "gpu_memory_utilization applies to device 'cuda' only, got "
                    f"{self.gpu_memory_utilization} with device 'cpu' (use kv_cache_space_gib)"
                )
            if self.tensor_parallel_size != 1:
                raise ValueError(
                    f"tensor_parallel_size must be 1 on cpu, got {self.tensor_parallel_size}"
                )
        if self.device == "cuda" and self.kv_cache_space_gib is not None:
            raise ValueError(
                f"kv_cache_space_gib applies to device 'cpu' only, got {self.kv_cache_space_gib} "
                "with device 'cuda' (use gpu_memory_utilization)"
            )
        if self.speculative_method is None:
            for name in ("num_speculative_tokens", "prompt_lookup_max"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} needs speculative_method, got {name}={getattr(self, name)} "
                        "with speculative_method=None"
                    )
        elif self.num_speculative_tokens is None:
            raise ValueError(
                f"speculative_method '{self.speculative_method}' needs num_speculative_tokens, "
                "got None"
            )
        return self

    # --- identity ------------------------------------------------------------------------

    def config_hash(self) -> str:
        """A stable 16-hex-digit hash of every field; equal configs share running replicas."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def knobs(self) -> dict[str, Any]:
        """The fields that differ from their defaults, by name (for params and tables)."""
        return self.model_dump(mode="json", exclude_unset=False, exclude_defaults=True)

    # --- rendering -----------------------------------------------------------------------

    def cli_args(self) -> list[str]:
        """vLLM server flags for every set knob (without --model, host and port)."""
        args: list[str] = []
        speculative: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra or {}
            assert isinstance(extra, dict)
            value = getattr(self, name)
            if value is None:
                continue
            if "flag" in extra:
                flag = str(extra["flag"])
                if isinstance(value, bool):
                    args.append(flag if value else "--no-" + flag.removeprefix("--"))
                else:
                    vllm_names = extra.get("values") or {}
                    assert isinstance(vllm_names, dict)
                    args.extend([flag, str(vllm_names.get(value, value))])
            elif "speculative" in extra:
                speculative[str(extra["speculative"])] = value
        if speculative:
            args.extend(["--speculative-config", json.dumps(speculative, sort_keys=True)])
        return args

    def environment(self) -> dict[str, str]:
        """Environment variables the server needs for these knobs (always offline)."""
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra or {}
            assert isinstance(extra, dict)
            value = getattr(self, name)
            if value is not None and "env" in extra:
                env[str(extra["env"])] = str(value)
        return env

    def server_program(self, python: str, launcher: Launcher = "module") -> list[str]:
        """The leading words of `server_argv` that name the program, before its arguments.

        ``"module"`` gives ``python -m vllm.entrypoints.openai.api_server`` (what replicas run,
        and what the vllm-cpu build needs); ``"vllm"`` gives ``vllm serve``, the console
        script of the CUDA build (python is unused then).
        """
        if launcher == "module":
            return [python, "-m", VLLM_SERVER_MODULE]
        if launcher == "vllm":
            return ["vllm", "serve"]
        raise ConfigError(f"launcher must be 'module' or 'vllm', got '{launcher}'")

    def server_args(
        self,
        model_path: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        launcher: Launcher = "module",
    ) -> list[str]:
        """The words of `server_argv` after the program: the model (``--model MODEL_PATH`` for
        the module, positional for ``vllm serve``), served name, host, port and `cli_args`."""
        model = ["--model", model_path] if launcher == "module" else [model_path]
        return [
            *model,
            "--served-model-name",
            self.model,
            "--host",
            host,
            "--port",
            str(port),
            *self.cli_args(),
        ]

    def server_argv(
        self,
        python: str,
        model_path: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        launcher: Launcher = "module",
    ) -> list[str]:
        """The exact command line that starts this engine's OpenAI-compatible server.

        Every form of deployment renders its command from here: replicas run it with the
        module launcher and this interpreter; the exported bundle with the launcher of its
        image, the model folder as mounted there and all interfaces as host.
        """
        return [
            *self.server_program(python, launcher),
            *self.server_args(model_path, host, port, launcher),
        ]

    def with_knobs(self, **changes: Any) -> EngineConfig:
        """A validated copy with some knobs changed (configs are immutable)."""
        return type(self).model_validate({**self.model_dump(), **changes})


def engine_field_names() -> set[str]:
    """The knob names an EngineConfig accepts (used to check search spaces and --set)."""
    return set(EngineConfig.model_fields)


def coerce_knob_value(text: str) -> Any:
    """Read a `--set knob=value` right-hand side as YAML (ints, floats, bools, null, lists)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """Turn ['block_size=64', ...] into {'block_size': 64, ...}; errors name the bad item."""
    parsed: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        parsed[key] = coerce_knob_value(value.strip())
    return parsed
