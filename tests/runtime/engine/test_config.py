"""EngineConfig: validation messages, hashing and the rendered vLLM command line."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from runtime.engine.config import EngineConfig, engine_field_names, parse_assignments
from runtime.errors import ConfigError, describe_validation_error


def message(**knobs: object) -> str:
    with pytest.raises(ValidationError) as caught:
        EngineConfig(**{"model": "smollm2-135m", **knobs})
    return describe_validation_error(caught.value)


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        ({"block_size": 20}, "block_size must be a multiple of 16, got 20"),
        ({"block_size": 48}, "block_size must be a multiple of 32 on cpu, got 48"),
        (
            {"max_num_seqs": 64, "max_num_batched_tokens": 32},
            "max_num_batched_tokens must be >= max_num_seqs, got max_num_batched_tokens=32 "
            "max_num_seqs=64",
        ),
        ({"quantization": "awq"}, "quantization 'awq' needs device 'cuda', got device 'cpu'"),
        (
            {"quantization": "int8", "dtype": "float32"},
            "quantization 'int8' needs dtype bfloat16 on cpu (vLLM's CPU int8 kernel takes "
            "bfloat16 or half activations), got dtype 'float32'",
        ),
        ({"tensor_parallel_size": 2}, "tensor_parallel_size must be 1 on cpu, got 2"),
        (
            {"num_speculative_tokens": 3},
            "num_speculative_tokens needs speculative_method, got num_speculative_tokens=3",
        ),
        ({"speculative_method": "ngram"}, "needs num_speculative_tokens, got None"),
        ({"max_num_seqs": 0}, "max_num_seqs: Input should be greater than or equal to 1, got 0"),
        ({"dtype": "int3"}, "dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
        ({"blok_size": 64}, "unknown field 'blok_size'"),
        (
            {"device": "cuda", "kv_cache_space_gib": 2},
            "kv_cache_space_gib applies to device 'cpu' only, got 2",
        ),
    ],
)
def test_invalid_knobs_are_named_with_their_value(knobs: dict[str, object], expected: str) -> None:
    assert expected in message(**knobs)


def test_block_size_multiple_of_16_is_fine_on_gpu() -> None:
    assert EngineConfig(model="m", device="cuda", block_size=16).block_size == 16


def test_cpu_defaults_are_explicit_and_gpu_defaults_are_vllms() -> None:
    cpu = EngineConfig(model="m")
    assert (cpu.dtype, cpu.kv_cache_space_gib) == ("bfloat16", 1)
    gpu = EngineConfig(model="m", device="cuda")
    assert (gpu.dtype, gpu.kv_cache_space_gib) == ("auto", None)


def test_hash_is_stable_and_sensitive_to_every_knob() -> None:
    base = EngineConfig(model="smollm2-135m", block_size=64, max_num_seqs=8)
    same = EngineConfig(max_num_seqs=8, block_size=64, model="smollm2-135m")
    assert base.config_hash() == same.config_hash()
    assert len(base.config_hash()) == 16
    variants = [
        base.with_knobs(block_size=128),
        base.with_knobs(max_num_seqs=9),
        base.with_knobs(enable_prefix_caching=False),
        base.with_knobs(dtype="float32"),
        base.with_knobs(seed=1),
    ]
    hashes = {variant.config_hash() for variant in variants} | {base.config_hash()}
    assert len(hashes) == len(variants) + 1


def test_server_argv_renders_every_set_knob_in_vllm_names() -> None:
    config = EngineConfig(
        model="smollm2-135m",
        block_size=64,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        max_model_len=1024,
        enable_prefix_caching=False,
        speculative_method="ngram",
        num_speculative_tokens=3,
        prompt_lookup_max=4,
    )
    argv = config.server_argv("/py", "/models/smol", "127.0.0.1", 9000)
    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    pairs = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert pairs["--model"] == "/models/smol"
    assert pairs["--served-model-name"] == "smollm2-135m"
    assert pairs["--port"] == "9000"
    assert pairs["--block-size"] == "64"
    assert pairs["--max-num-seqs"] == "8"
    assert pairs["--max-num-batched-tokens"] == "512"
    assert pairs["--max-model-len"] == "1024"
    assert pairs["--dtype"] == "bfloat16"
    assert "--no-enable-prefix-caching" in argv
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}
    assert config.environment()["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert config.environment()["HF_HUB_OFFLINE"] == "1"


def test_unset_knobs_are_left_to_vllm() -> None:
    args = EngineConfig(model="m").cli_args()
    assert "--block-size" not in args and "--max-num-seqs" not in args
    assert "--speculative-config" not in args
    assert "--kv-cache-dtype" not in args and "--quantization" not in args


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"])
def test_kv_cache_dtype_renders_on_cpu_and_gpu(kv_cache_dtype: str) -> None:
    for device in ("cpu", "cuda"):
        args = EngineConfig(model="m", device=device, kv_cache_dtype=kv_cache_dtype).cli_args()
        assert args[args.index("--kv-cache-dtype") + 1] == kv_cache_dtype


def test_kv_cache_dtype_outside_its_choices_is_named() -> None:
    assert "kv_cache_dtype: Input should be 'auto', 'fp8', 'fp8_e4m3' or 'fp8_e5m2'" in message(
        kv_cache_dtype="int8"
    )


@pytest.mark.parametrize("method", ["fp8", "awq", "gptq"])
def test_gpu_quantization_renders_on_cuda_and_is_refused_on_cpu(method: str) -> None:
    args = EngineConfig(model="m", device="cuda", quantization=method).cli_args()
    assert args[args.index("--quantization") + 1] == method
    assert f"quantization '{method}' needs device 'cuda', got device 'cpu'" in message(
        quantization=method
    )


def test_int8_is_valid_on_cpu_and_renders_vllms_compressed_tensors_name() -> None:
    """int8 is served from a compressed-tensors checkpoint: vLLM's name for the method is
    rendered, so vLLM refuses a folder that is not such a checkpoint."""
    for device in ("cpu", "cuda"):
        config = EngineConfig(model="smollm2-135m", device=device, quantization="int8")
        args = config.cli_args()
        assert args[args.index("--quantization") + 1] == "compressed-tensors"
        assert config.knobs()["quantization"] == "int8"
    dense = EngineConfig(model="smollm2-135m")
    assert dense.with_knobs(quantization="int8").config_hash() != dense.config_hash()


def test_a_misspelled_quantization_gets_the_closest_method() -> None:
    assert message(quantization="int9") == (
        "quantization: unknown quantization 'int9' (did you mean 'int8'?)"
    )
    assert "did you mean 'gptq'" in message(device="cuda", quantization="gtpq")


def test_every_field_is_documented_and_says_how_it_reaches_vllm() -> None:
    for name, field in EngineConfig.model_fields.items():
        assert field.description, name
        extra = field.json_schema_extra
        assert isinstance(extra, dict) and {"flag", "env", "speculative", "fmtune"} & set(extra)
    assert {"block_size", "max_num_seqs", "kv_cache_space_gib"} <= engine_field_names()


def test_parse_assignments_reads_yaml_values() -> None:
    parsed = parse_assignments(["block_size=64", "enable_prefix_caching=false", "dtype=bfloat16"])
    assert parsed == {"block_size": 64, "enable_prefix_caching": False, "dtype": "bfloat16"}
    with pytest.raises(ConfigError, match="--set expects key=value, got 'block_size'"):
        parse_assignments(["block_size"])
