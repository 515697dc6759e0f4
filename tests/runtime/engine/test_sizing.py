"""The sizing rule: weights as served, KV cache and runtime; the cheapest machine that fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.engine.config import EngineConfig
from runtime.engine.models import CATALOG
from runtime.engine.quantize import quantized_weight_bytes
from runtime.engine.sizing import (
    DEFAULT_MACHINES,
    GIB,
    REPLICA_CPU_CORES,
    RUNTIME_MEMORY_GIB,
    MachineType,
    ReplicaResources,
    StoredWeights,
    cheapest_machine,
    engine_resources,
    replica_resources,
    served_weights_bytes,
    stored_weights,
)
from runtime.errors import ConfigError
from tests.runtime.conftest import MakeModelFolder


def needs(memory_gib: float, gpus: int = 0) -> ReplicaResources:
    return ReplicaResources(
        weights_gib=0.0,
        kv_cache_gib=0.0,
        runtime_gib=memory_gib,
        cpu_cores=REPLICA_CPU_CORES,
        gpus=gpus,
    )


@pytest.mark.parametrize(
    ("stored", "dtype", "expected"),
    [
        (StoredWeights(4 * GIB, "float32"), "bfloat16", 2 * GIB),
        (StoredWeights(4 * GIB, "float32"), "float16", 2 * GIB),
        (StoredWeights(2 * GIB, "bfloat16"), "float32", 4 * GIB),
        (StoredWeights(2 * GIB, "bfloat16"), "auto", 2 * GIB),
        (StoredWeights(2 * GIB, "bfloat16", quantized=True), "float32", 2 * GIB),
        (StoredWeights(2 * GIB, None), "float32", 2 * GIB),
    ],
)
def test_weights_are_counted_in_the_dtype_they_are_served_in(
    stored: StoredWeights, dtype: str, expected: int
) -> None:
    assert served_weights_bytes(stored, dtype) == expected


def test_a_cpu_replica_needs_weights_kv_cache_and_runtime() -> None:
    engine = EngineConfig(model="m", dtype="bfloat16", kv_cache_space_gib=3)
    needed = replica_resources(engine, StoredWeights(4 * GIB, "float32"))
    assert (needed.weights_gib, needed.kv_cache_gib) == (2.0, 3.0)
    assert needed.memory_gib == pytest.approx(5.0 + RUNTIME_MEMORY_GIB)
    assert (needed.cpu_cores, needed.gpus) == (REPLICA_CPU_CORES, 0)


def test_a_cuda_replica_keeps_its_kv_cache_on_the_gpus() -> None:
    engine = EngineConfig(model="m", device="cuda", dtype="bfloat16", tensor_parallel_size=2)
    needed = replica_resources(engine, StoredWeights(2 * GIB, "bfloat16"), runtime_gib=1.0)
    assert (needed.kv_cache_gib, needed.gpus, needed.memory_gib) == (0.0, 2, 3.0)


def test_stored_weights_are_read_from_a_model_folder(
    tmp_path: Path, make_model_folder: MakeModelFolder
) -> None:
    folder = make_model_folder("plain", 3 * GIB, "float32")
    assert stored_weights(str(folder)) == StoredWeights(3 * GIB, "float32", quantized=False)
    quantized = make_model_folder(
        "w8a8", GIB, "bfloat16", quantization_config={"quant_method": "x"}
    )
    assert stored_weights(str(quantized)) == StoredWeights(GIB, "bfloat16", quantized=True)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    (legacy / "pytorch_model.bin").write_bytes(b"x" * 1000)
    assert stored_weights(str(legacy)) == StoredWeights(1000, "float16")


def test_an_unprepared_catalog_model_counts_its_measured_size(fmtune_home: Path) -> None:
    entry = CATALOG["qwen2.5-coder-1.5b-instruct"]
    assert entry.quantizable_params is not None
    assert stored_weights(entry.name) == StoredWeights(
        entry.prepared_bytes, entry.save_dtype, quantizable_bytes=entry.quantizable_params * 2
    )


@pytest.mark.parametrize(
    ("stored", "dtype", "expected"),
    [
        # 3 GiB of float32 linear weights -> 0.75 GiB int8; 1 GiB of the rest -> 0.5 GiB bf16
        (StoredWeights(4 * GIB, "float32", quantizable_bytes=3 * GIB), "bfloat16", 5 * GIB // 4),
        (StoredWeights(4 * GIB, "float32", quantizable_bytes=3 * GIB), "float32", 7 * GIB // 4),
        (StoredWeights(2 * GIB, "bfloat16", quantizable_bytes=GIB), "bfloat16", 3 * GIB // 2),
        (StoredWeights(2 * GIB, "bfloat16"), "bfloat16", GIB),  # split unknown: all int8
        (StoredWeights(GIB, "bfloat16", quantized=True), "bfloat16", GIB),  # the variant itself
    ],
)
def test_int8_counts_one_byte_per_quantized_weight(
    stored: StoredWeights, dtype: str, expected: int
) -> None:
    assert served_weights_bytes(stored, dtype, "int8") == expected
    assert served_weights_bytes(stored, dtype, "awq") == served_weights_bytes(stored, dtype)


def test_an_int8_replica_is_sized_from_its_variant_once_prepared(
    fmtune_home: Path, tiny_llama: Path
) -> None:
    from runtime.engine.models import served_model

    engine = EngineConfig(model=str(tiny_llama), quantization="int8")
    folder_bytes = (tiny_llama / "model.safetensors").stat().st_size
    linear = quantized_weight_bytes(tiny_llama)
    assert linear is not None
    before = engine_resources(engine).weights_gib * GIB
    assert before == (folder_bytes - linear) // 2 + linear // 4  # float32: rest bf16, int8
    assert before < engine_resources(engine.with_knobs(quantization=None)).weights_gib * GIB
    variant = served_model(engine.model, "int8")
    after = engine_resources(engine).weights_gib * GIB
    assert after == (variant / "model.safetensors").stat().st_size  # as stored
    assert after == pytest.approx(before, rel=0.05)  # the rule matched what was written


def test_an_unprepared_catalog_model_in_int8_counts_its_linear_weights(
    fmtune_home: Path,
) -> None:
    entry = CATALOG["smollm2-135m"]
    assert entry.quantizable_params is not None
    dense = stored_weights(entry.name).bytes - entry.quantizable_params * 4
    expected = dense // 2 + entry.quantizable_params
    engine = EngineConfig(model=entry.name, quantization="int8")
    assert engine_resources(engine).weights_gib * GIB == expected


def test_a_model_that_is_not_here_counts_no_weights() -> None:
    assert stored_weights("Qwen/Qwen2.5-1.5B-Instruct") == StoredWeights(0, None)


def test_engine_resources_follow_the_model_folder(make_model_folder: MakeModelFolder) -> None:
    small = make_model_folder("small", GIB // 2, "float32")
    large = make_model_folder("large", 8 * GIB, "float32")
    engine = EngineConfig(model=str(small), dtype="float32", kv_cache_space_gib=1)
    assert engine_resources(engine).memory_gib == pytest.approx(1.5 + RUNTIME_MEMORY_GIB)
    bigger = engine_resources(engine.with_knobs(model=str(large)))
    assert bigger.memory_gib == pytest.approx(9.0 + RUNTIME_MEMORY_GIB)


def test_the_cheapest_machine_that_fits_is_chosen() -> None:
    machines = (
        MachineType(name="big", vcpus=8, memory_gib=64, usd_per_hour=0.5),
        MachineType(name="small", vcpus=2, memory_gib=8, usd_per_hour=0.08),
        MachineType(name="mid", vcpus=2, memory_gib=16, usd_per_hour=0.12),
        MachineType(name="one-core", vcpus=1, memory_gib=32, usd_per_hour=0.01),
        MachineType(name="gpu", vcpus=4, memory_gib=16, gpus=1, usd_per_hour=1.0),
    )
    assert cheapest_machine(needs(5.0), machines).name == "small"
    assert cheapest_machine(needs(8.0), machines).name == "small"
    assert cheapest_machine(needs(8.1), machines).name == "mid"
    assert cheapest_machine(needs(20.0), machines).name == "big"
    assert cheapest_machine(needs(5.0, gpus=1), machines).name == "gpu"


def test_a_tie_in_price_goes_to_the_smaller_machine() -> None:
    machines = (
        MachineType(name="roomy", vcpus=2, memory_gib=32, usd_per_hour=0.1),
        MachineType(name="snug", vcpus=2, memory_gib=16, usd_per_hour=0.1),
    )
    assert cheapest_machine(needs(4.0), machines).name == "snug"


def test_no_machine_that_fits_names_the_need_and_the_table() -> None:
    machines = (MachineType(name="small", vcpus=2, memory_gib=8, usd_per_hour=0.08),)
    with pytest.raises(ConfigError) as caught:
        cheapest_machine(needs(9.5), machines, what="model key 'llm'")
    message = str(caught.value)
    assert message.startswith("pricing.machines has no machine for model key 'llm'")
    assert "9.5 GiB" in message and "small (2 vCPU, 8 GiB, 0 GPU)" in message


def test_the_default_table_prices_each_catalog_model_by_its_memory(fmtune_home: Path) -> None:
    """Unprepared catalog models use their measured folder sizes: the 1.5B in float32 needs a
    bigger machine than the 135M in bfloat16."""
    small = EngineConfig(model="smollm2-135m", dtype="bfloat16")
    large = EngineConfig(model="qwen2.5-coder-1.5b-instruct", dtype="float32")
    small_machine = cheapest_machine(engine_resources(small), DEFAULT_MACHINES)
    large_machine = cheapest_machine(engine_resources(large), DEFAULT_MACHINES)
    assert small_machine.name == "t3.large"
    assert large_machine.usd_per_hour > small_machine.usd_per_hour
    assert large_machine.memory_gib >= engine_resources(large).memory_gib
