"""Int8 W8A8 checkpoints in the compressed-tensors format, written from a dense model folder.

vLLM's CPU build serves such a checkpoint with its `CPUInt8ScaledMMLinearKernel` (tried on
this machine: docs/precision-cpu.md, row 3), so it is how the `int8` quantization knob of
`EngineConfig` reaches the engine: `runtime.engine.models` prepares the int8 variant of a model
once with `write_w8a8_checkpoint` and vLLM reads the scheme from the folder's config.json.

The checkpoint is written with torch and safetensors alone (llm-compressor, the usual writer,
is not installed), round to nearest, without calibration data:

- every linear weight of the decoder layers (`model.layers.*_proj.weight`: attention q/k/v/o
  and MLP gate/up/down projections) becomes int8, symmetric, one scale per output channel
  (the row's largest magnitude over 127, stored in bfloat16 and used as stored, so each
  dequantized weight is within half a scale of the original);
- everything else (embeddings, norms, biases, `lm_head`) stays dense, in bfloat16;
- activations are quantized by vLLM at run time, int8 per token (dynamic), which is what
  makes it W8A8 rather than weight-only;
- config.json gets the `quantization_config` compressed-tensors writes for this scheme
  (`quant_method: compressed-tensors`, format `int-quantized`), which is how vLLM detects it.

The quality of such a checkpoint against the dense model is not measured here.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Largest magnitude of a symmetric int8 weight (-127..127: the range is kept symmetric so
#: that a weight and its negation round alike).
INT8_MAX = 127
#: Name prefix of the decoder layers' tensors and suffix of the linear weights quantized.
LAYER_PREFIX = "model.layers."
QUANTIZED_SUFFIX = "_proj.weight"
#: The compressed-tensors format name of int8 weights stored as int8 tensors.
W8A8_FORMAT = "int-quantized"
#: The compressed-tensors method name, which is also vLLM's `--quantization` name for it.
COMPRESSED_TENSORS = "compressed-tensors"
#: Files of a dense folder that hold its weights (not copied: the checkpoint has its own).
WEIGHT_FILE_GLOBS = ("*.safetensors", "*.safetensors.index.json")


@dataclass(frozen=True)
class Int8Checkpoint:
    """What `write_w8a8_checkpoint` wrote."""

    folder: Path
    """The checkpoint folder."""
    layers: int
    """Linear weights quantized to int8."""
    quantized_params: int
    """Parameters stored as int8 (one byte each)."""
    dense_params: int
    """Parameters left dense (bfloat16)."""


def is_quantized_weight(name: str) -> bool:
    """Whether a tensor of a dense checkpoint is one the int8 writer quantizes (the one rule,
    also used to size an int8 replica before its checkpoint exists)."""
    return name.startswith(LAYER_PREFIX) and name.endswith(QUANTIZED_SUFFIX)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, bfloat16 scale of shape [rows, 1]): symmetric, one scale per output
    channel; the weight is rounded with the scale as stored, so dequantizing is exact to
    half a scale."""
    import torch

    values = weight.float()
    amax = values.abs().amax(dim=1, keepdim=True)
    scale = (amax / INT8_MAX).clamp(min=1e-8).to(torch.bfloat16)
    quantized = torch.round(values / scale.float()).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized, scale


def dequantize(quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight an int8 weight and its per-channel scale stand for."""
    return quantized.float() * scale.float()


def w8a8_quantization_config() -> dict[str, Any]:
    """config.json's `quantization_config` for int8 channel-wise weights and dynamic
    per-token int8 activations, as compressed-tensors writes it."""
    group = {
        "targets": ["Linear"],
        "weights": {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "channel",
            "dynamic": False,
            "group_size": None,
            "observer": "minmax",
        },
        "input_activations": {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
            "observer": None,
        },
        "output_activations": None,
        "format": W8A8_FORMAT,
    }
    return {
        "quant_method": COMPRESSED_TENSORS,
        "format": W8A8_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, in name order (one, or the shards)."""
    return sorted(folder.glob("*.safetensors"))


def write_w8a8_checkpoint(source: Path, target: Path) -> Int8Checkpoint:
    """Write the int8 W8A8 checkpoint of the dense folder `source` into the new folder
    `target` (which must not exist): weights as the module docstring says, in one
    model.safetensors; the tokenizer, chat template and other files copied."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = weight_files(source)
    if not files:
        raise FileNotFoundError(f"{source} has no *.safetensors weights")
    target.mkdir(parents=True)
    skipped = {path.name for pattern in WEIGHT_FILE_GLOBS for path in source.glob(pattern)}
    skipped.add("config.json")  # written below, with the quantization_config
    for item in source.iterdir():
        if item.is_file() and not item.name.startswith(".") and item.name not in skipped:
            shutil.copy(item, target / item.name)
    tensors: dict[str, torch.Tensor] = {}
    layers = quantized_params = dense_params = 0
    for path in files:
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = weights.get_tensor(name)
                if not is_quantized_weight(name):
                    dense = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
                    tensors[name] = dense
                    dense_params += tensor.numel()
                    continue
                quantized, scale = quantize_rows(tensor)
                tensors[name] = quantized
                tensors[name.removesuffix(".weight") + ".weight_scale"] = scale
                layers += 1
                quantized_params += quantized.numel()
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["dtype"] = "bfloat16"
    if "torch_dtype" in config:
        config["torch_dtype"] = "bfloat16"
    config["quantization_config"] = w8a8_quantization_config()
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Int8Checkpoint(target, layers, quantized_params, dense_params)


def quantized_weight_bytes(folder: Path) -> int | None:
    """Bytes, as stored, of the weights `is_quantized_weight` picks in a dense folder, read
    from the safetensors headers alone (no tensor is loaded); None when a file is not
    readable safetensors."""
    total = 0
    files = weight_files(folder)
    if not files:
        return None
    for path in files:
        try:
            with path.open("rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length)) if 0 < length < 1 << 28 else None
        except (OSError, ValueError):
            return None
        if not isinstance(header, dict):
            return None
        for name, entry in header.items():
            if is_quantized_weight(name) and isinstance(entry, dict):
                start, end = entry.get("data_offsets", (0, 0))
                total += int(end) - int(start)
    return total
