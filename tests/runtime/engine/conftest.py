"""A tiny random Llama model folder, written for the tests that quantize one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

#: A Llama config small enough to write and quantize in milliseconds: hidden size 64, 2 layers.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "dtype": "float32",
}


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    """A dense float32 Llama folder (config.json, model.safetensors with random weights in
    the Hugging Face layout, a tokenizer file and a hidden marker) under tmp_path/tiny-llama."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    hidden, inner, heads, kv_heads, head_dim = 64, 128, 4, 2, 16
    shapes = {
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "mlp.gate_proj.weight": (inner, hidden),
        "mlp.up_proj.weight": (inner, hidden),
        "mlp.down_proj.weight": (hidden, inner),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    tensors = {
        "model.embed_tokens.weight": torch.randn(256, hidden, generator=generator),
        "model.norm.weight": torch.ones(hidden),
    }
    for layer in range(2):
        for name, shape in shapes.items():
            tensors[f"model.layers.{layer}.{name}"] = 0.05 * torch.randn(
                *shape, generator=generator
            )
    tensors["model.layers.0.self_attn.q_proj.weight"][0] = 0.0  # an all-zero output channel
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    (folder / "tokenizer.json").write_text("{}")
    (folder / ".fmtune-prepared").write_text("source\n")
    return folder
