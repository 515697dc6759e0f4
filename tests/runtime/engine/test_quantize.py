"""The W8A8 int8 checkpoint writer on a tiny random Llama: its compressed-tensors config, its
int8 weights (within the rounding bound of the originals) and what it copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runtime.engine.quantize import (
    COMPRESSED_TENSORS,
    INT8_MAX,
    dequantize,
    is_quantized_weight,
    quantize_rows,
    quantized_weight_bytes,
    write_w8a8_checkpoint,
)


def test_the_checkpoint_config_is_compressed_tensors_w8a8(tiny_llama: Path, tmp_path: Path) -> None:
    """The fields vLLM's CompressedTensorsConfig reads to pick its W8A8 int8 scheme (checked
    here as data: importing compressed_tensors to parse it costs ~9 s of the fast suite)."""
    written = write_w8a8_checkpoint(tiny_llama, tmp_path / "int8")
    config = json.loads((written.folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["hidden_size"] == 64
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == COMPRESSED_TENSORS
    assert quantization["format"] == "int-quantized"
    assert quantization["quantization_status"] == "compressed"
    assert quantization["ignore"] == ["lm_head"] and quantization["kv_cache_scheme"] is None
    (scheme,) = quantization["config_groups"].values()
    assert scheme["targets"] == ["Linear"] and scheme["format"] == "int-quantized"
    weights, activations = scheme["weights"], scheme["input_activations"]
    assert (weights["num_bits"], weights["type"], weights["symmetric"]) == (8, "int", True)
    assert (weights["strategy"], weights["dynamic"], weights["group_size"]) == (
        "channel",
        False,
        None,
    )
    assert (activations["num_bits"], activations["type"], activations["symmetric"]) == (
        8,
        "int",
        True,
    )
    assert (activations["strategy"], activations["dynamic"]) == ("token", True)
    assert scheme["output_activations"] is None


def test_int8_weights_dequantize_to_the_originals_within_half_a_scale(
    tiny_llama: Path, tmp_path: Path
) -> None:
    original = load_file(str(tiny_llama / "model.safetensors"))
    written = write_w8a8_checkpoint(tiny_llama, tmp_path / "int8")
    stored = load_file(str(written.folder / "model.safetensors"))
    linear = [name for name in original if is_quantized_weight(name)]
    assert len(linear) == written.layers == 14  # 7 projections x 2 layers
    assert written.quantized_params == sum(original[name].numel() for name in linear)
    for name in linear:
        weight, scale = stored[name], stored[name.removesuffix(".weight") + ".weight_scale"]
        assert weight.dtype == torch.int8 and weight.shape == original[name].shape
        assert scale.dtype == torch.bfloat16 and scale.shape == (weight.shape[0], 1)
        assert int(weight.abs().max()) <= INT8_MAX
        error = (dequantize(weight, scale) - original[name]).abs()
        assert bool((error <= scale.float() * 0.5 * (1 + 1e-5) + 1e-7).all()), name
        assert int(weight.abs().max()) >= INT8_MAX - 1  # the range is used, not wasted
    zero_row = stored["model.layers.0.self_attn.q_proj.weight"][0]
    assert not zero_row.any()  # an all-zero channel stays zero (no division by zero)
    for name in set(original) - set(linear):
        assert stored[name].dtype == torch.bfloat16
        assert torch.equal(stored[name], original[name].to(torch.bfloat16))
    assert set(stored) == set(original) | {
        name.removesuffix(".weight") + ".weight_scale" for name in linear
    }


def test_the_writer_copies_the_tokenizer_not_the_marker_and_never_overwrites(
    tiny_llama: Path, tmp_path: Path
) -> None:
    target = write_w8a8_checkpoint(tiny_llama, tmp_path / "int8").folder
    assert sorted(path.name for path in target.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    with pytest.raises(FileExistsError):
        write_w8a8_checkpoint(tiny_llama, target)


def test_quantize_rows_rounds_with_the_stored_scale() -> None:
    weight = torch.tensor([[0.5, -1.0, 0.25], [3.0, 0.0, -3.0]])
    quantized, scale = quantize_rows(weight)
    assert quantized.tolist() == [[64, -127, 32], [127, 0, -127]]
    assert torch.allclose(dequantize(quantized, scale), weight, atol=float(scale.max()) / 2)


def test_quantized_weight_bytes_reads_the_headers_only(tiny_llama: Path, tmp_path: Path) -> None:
    original = load_file(str(tiny_llama / "model.safetensors"))
    expected = sum(t.numel() * 4 for name, t in original.items() if is_quantized_weight(name))
    assert quantized_weight_bytes(tiny_llama) == expected
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"\0" * 64)  # not safetensors
    assert quantized_weight_bytes(fake) is None
    assert quantized_weight_bytes(tmp_path / "nowhere") is None
