"""Replicas by EngineConfig hash, kept hot across trials.

A cold start costs about a minute on CPU, so the pool hands out the running replicas of a
config whenever one is asked for again, and stops only the replicas no longer wanted. It
enforces a cap on the number of replicas and on their total memory; to make room it first
stops idle replicas of other configs, least recently used first.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from runtime.engine.config import EngineConfig
from runtime.engine.replica import GIB, Replica
from runtime.engine.sizing import RUNTIME_MEMORY_GIB, replica_resources, stored_weights
from runtime.errors import EngineFailure

logger = logging.getLogger(__name__)


class PoolCapacityError(EngineFailure):
    """The pool cannot start another replica within its caps."""


class PoolLimits(BaseModel):
    """Caps on what the pool may run at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_replicas: int = Field(default=4, ge=1, le=256, description="Most replicas running at once.")
    max_memory_gib: float = Field(
        default=20.0,
        gt=0,
        description="Most resident memory of all replicas together, in GiB (estimated for a "
        "replica before it starts, measured once it runs).",
    )
    runtime_memory_gib: float = Field(
        default=RUNTIME_MEMORY_GIB,
        gt=0,
        description="Memory of one replica besides its weights and KV cache, in GiB, in the "
        "estimate (runtime.engine.sizing) that decides whether a new replica fits before "
        "starting it.",
    )


def estimated_memory_gib(config: EngineConfig, runtime_memory_gib: float) -> float:
    """Memory a replica of this config is expected to take before it starts: the sizing rule
    of runtime.engine.sizing (weights as served, KV cache in host memory, runtime)."""
    stored = stored_weights(config.model)
    return replica_resources(config, stored, runtime_memory_gib).memory_gib


@dataclass
class _Entry:
    replica: Replica
    config_hash: str
    estimate_gib: float
    cpu_core: int | None = None


def choose_cpu_core(available: list[int], in_use: list[int]) -> int:
    """The core to pin a new CPU replica's compute to: the one fewest replicas use (lowest id
    on ties). vLLM's automatic binding pins every replica to the same first core, so two
    replicas on one machine would otherwise share one core while the others idle."""
    if not available:
        raise ValueError("available must list at least one CPU core")
    return min(available, key=lambda core: (in_use.count(core), core))


def available_cpu_cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


ReplicaFactory = Callable[[EngineConfig, str, dict[str, str]], Replica]


def default_factory(log_dir: Path | None, startup_timeout_s: float) -> ReplicaFactory:
    """Make real replicas logging under log_dir."""

    def make(config: EngineConfig, replica_id: str, env: dict[str, str]) -> Replica:
        return Replica(
            config,
            log_dir=log_dir,
            startup_timeout_s=startup_timeout_s,
            replica_id=replica_id,
            extra_env=env,
        )

    return make


class ReplicaPool:
    """Hands out running replicas by EngineConfig and keeps them hot until told otherwise."""

    def __init__(
        self,
        limits: PoolLimits | None = None,
        *,
        log_dir: Path | None = None,
        startup_timeout_s: float = 420.0,
        factory: ReplicaFactory | None = None,
    ) -> None:
        self.limits = limits or PoolLimits()
        self._factory = factory or default_factory(log_dir, startup_timeout_s)
        self._entries: list[_Entry] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._starting: set[Replica] = set()
        """Replicas whose start() is under way (their thread holds _lock meanwhile)."""
        self._starting_lock = threading.Lock()

    # --- queries -------------------------------------------------------------------------

    def replicas(self, config: EngineConfig | None = None) -> list[Replica]:
        """Running replicas, of one config or all."""
        with self._lock:
            wanted = None if config is None else config.config_hash()
            return [
                entry.replica
                for entry in self._entries
                if wanted is None or entry.config_hash == wanted
            ]

    def memory_gib(self) -> float:
        """Memory of all pool replicas: measured where running, estimated otherwise."""
        with self._lock:
            return sum(self._entry_memory_gib(entry) for entry in self._entries)

    def _entry_memory_gib(self, entry: _Entry) -> float:
        measured = entry.replica.rss_bytes() / GIB
        return max(measured, entry.estimate_gib)

    # --- acquisition ---------------------------------------------------------------------

    def acquire(self, config: EngineConfig, count: int = 1) -> list[Replica]:
        """`count` running replicas of this config: reused when hot, started otherwise.

        Dead replicas of the config are dropped and replaced. Replicas of other configs stay
        running unless room is needed, then the least recently used go first.
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        wanted = config.config_hash()
        with self._lock:
            self._drop_dead()
            entries = [entry for entry in self._entries if entry.config_hash == wanted]
            for entry in entries[count:]:
                self._stop_entry(entry)
            entries = entries[:count]
            while len(entries) < count:
                entries.append(self._start(config, keep={wanted}))
            now = time.monotonic()
            for entry in entries:
                entry.replica.last_used = now
            return [entry.replica for entry in entries]

    def _start(self, config: EngineConfig, keep: set[str]) -> _Entry:
        estimate = estimated_memory_gib(config, self.limits.runtime_memory_gib)
        self._make_room(estimate, keep)
        self._counter += 1
        replica_id = f"{config.config_hash()}-{self._counter}"
        env: dict[str, str] = {}
        core: int | None = None
        if config.device == "cpu" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            in_use = [e.cpu_core for e in self._entries if e.cpu_core is not None]
            core = choose_cpu_core(available_cpu_cores(), in_use)
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
        replica = self._factory(config, replica_id, env)
        entry = _Entry(
            replica=replica, config_hash=config.config_hash(), estimate_gib=estimate, cpu_core=core
        )
        with self._starting_lock:
            self._starting.add(replica)
        try:
            replica.start()
        finally:
            with self._starting_lock:
                self._starting.discard(replica)
        self._entries.append(entry)
        return entry

    def _make_room(self, needed_gib: float, keep: set[str]) -> None:
        """Stop least recently used replicas of other configs until the new one fits."""
        if needed_gib > self.limits.max_memory_gib:
            raise PoolCapacityError(
                f"a replica needs about {needed_gib:.1f} GiB, more than max_memory_gib="
                f"{self.limits.max_memory_gib}"
            )
        evictable = sorted(
            (entry for entry in self._entries if entry.config_hash not in keep),
            key=lambda entry: entry.replica.last_used,
        )
        while (
            len(self._entries) + 1 > self.limits.max_replicas
            or self.memory_gib() + needed_gib > self.limits.max_memory_gib
        ):
            if not evictable:
                raise PoolCapacityError(
                    f"no room for another replica: {len(self._entries)} running "
                    f"(max_replicas={self.limits.max_replicas}), "
                    f"{self.memory_gib():.1f} GiB used + {needed_gib:.1f} GiB needed "
                    f"(max_memory_gib={self.limits.max_memory_gib})"
                )
            self._stop_entry(evictable.pop(0))

    # --- release -------------------------------------------------------------------------

    def retain_only(self, configs: Iterable[EngineConfig]) -> None:
        """Stop every replica whose config is not among these."""
        keep = {config.config_hash() for config in configs}
        with self._lock:
            for entry in [entry for entry in self._entries if entry.config_hash not in keep]:
                self._stop_entry(entry)

    def release(self, replica: Replica) -> None:
        """Stop one replica and forget it (e.g. after it died or was scaled down)."""
        with self._lock:
            for entry in [entry for entry in self._entries if entry.replica is replica]:
                self._stop_entry(entry)

    def close(self) -> None:
        """Stop every replica of the pool. A start under way in another thread (e.g. a
        replacement for a dead replica) is aborted first: it holds the pool's lock until its
        replica is ready, which would otherwise delay closing by a whole cold start."""
        with self._starting_lock:
            starting = list(self._starting)
        for replica in starting:
            replica.stop()
        with self._lock:
            for entry in list(self._entries):
                self._stop_entry(entry)

    def __enter__(self) -> ReplicaPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _stop_entry(self, entry: _Entry) -> None:
        if entry in self._entries:
            self._entries.remove(entry)
        entry.replica.stop()

    def _drop_dead(self) -> None:
        for entry in [entry for entry in self._entries if not entry.replica.running()]:
            logger.warning("replica %s died; dropping it", entry.replica.replica_id)
            self._stop_entry(entry)
