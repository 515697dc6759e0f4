"""Pool policy with a test double for replicas: reuse by hash, counts, caps, eviction."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from runtime.engine import replica as replica_module
from runtime.engine.config import EngineConfig
from runtime.engine.pool import PoolCapacityError, PoolLimits, ReplicaPool, choose_cpu_core
from runtime.engine.reaper import group_alive
from runtime.engine.replica import ReplicaStartError
from runtime.engine.sizing import GIB
from tests.runtime.conftest import MakeModelFolder


class FakeReplica:
    """Stands in for a vLLM server: records start/stop, reports a fixed memory."""

    def __init__(self, config: EngineConfig, replica_id: str, rss_gib: float) -> None:
        self.config = config
        self.replica_id = replica_id
        self.rss_gib = rss_gib
        self.started = 0
        self.stopped = 0
        self.alive = False
        self.last_used = 0.0
        self.env: dict[str, str] = {}

    def start(self) -> FakeReplica:
        self.started += 1
        self.alive = True
        return self

    def stop(self) -> None:
        self.stopped += 1
        self.alive = False

    def running(self) -> bool:
        return self.alive

    def rss_bytes(self) -> int:
        return int(self.rss_gib * 1024**3) if self.alive else 0


def make_pool(limits: PoolLimits, rss_gib: float = 1.0) -> tuple[ReplicaPool, list[FakeReplica]]:
    made: list[FakeReplica] = []

    def factory(config: EngineConfig, replica_id: str, env: dict[str, str]) -> FakeReplica:
        made.append(FakeReplica(config, replica_id, rss_gib))
        made[-1].env = env
        return made[-1]

    return ReplicaPool(limits, factory=factory), made  # type: ignore[arg-type]


# a model that is not on this machine: its weights count 0 GiB in the pool's estimate
A = EngineConfig(model="org/not-here", max_num_seqs=8)
B = EngineConfig(model="org/not-here", max_num_seqs=16)
C = EngineConfig(model="org/not-here", max_num_seqs=32)
ROOMY = PoolLimits(max_replicas=8, max_memory_gib=100, runtime_memory_gib=1.0)


def test_same_config_reuses_the_running_replica() -> None:
    pool, made = make_pool(ROOMY)
    first = pool.acquire(A)
    again = pool.acquire(EngineConfig(max_num_seqs=8, model="org/not-here"))
    assert first == again and len(made) == 1 and made[0].started == 1


def test_other_config_starts_another_and_keeps_the_first_hot() -> None:
    pool, made = make_pool(ROOMY)
    pool.acquire(A)
    pool.acquire(B)
    assert len(made) == 2 and all(replica.alive for replica in made)


def test_count_grows_and_shrinks() -> None:
    pool, made = make_pool(ROOMY)
    assert len(pool.acquire(A, count=3)) == 3
    assert len(pool.acquire(A, count=1)) == 1
    assert sum(replica.alive for replica in made) == 1 and len(made) == 3


def test_dead_replica_is_replaced() -> None:
    pool, made = make_pool(ROOMY)
    pool.acquire(A)
    made[0].alive = False
    (replacement,) = pool.acquire(A)
    assert replacement is made[1] and made[1].alive


def test_replica_cap_evicts_least_recently_used_other_config() -> None:
    pool, made = make_pool(PoolLimits(max_replicas=2, max_memory_gib=100, runtime_memory_gib=1.0))
    pool.acquire(A)
    pool.acquire(B)
    pool.acquire(A)  # A is now the most recently used
    pool.acquire(C)
    alive = {replica.config.max_num_seqs for replica in made if replica.alive}
    assert alive == {8, 32}


def test_memory_cap_counts_measured_memory() -> None:
    # each replica is estimated at 1 + 1 GiB KV = 2 GiB but measured at 5 GiB
    pool, made = make_pool(PoolLimits(max_replicas=8, max_memory_gib=12, runtime_memory_gib=1.0), 5)
    pool.acquire(A)
    pool.acquire(B)
    pool.acquire(C)  # 10 GiB measured + 2 GiB estimated = 12: fits
    assert sum(replica.alive for replica in made) == 3
    pool.acquire(A.with_knobs(max_num_seqs=64))
    assert sum(replica.alive for replica in made) == 3  # one evicted to make room


def test_cap_that_cannot_be_met_names_the_limit() -> None:
    pool, _ = make_pool(PoolLimits(max_replicas=1, max_memory_gib=100, runtime_memory_gib=1.0))
    with pytest.raises(PoolCapacityError, match="max_replicas=1"):
        pool.acquire(A, count=2)
    pool2, _ = make_pool(PoolLimits(max_replicas=4, max_memory_gib=1.5, runtime_memory_gib=1.0))
    with pytest.raises(PoolCapacityError, match=r"max_memory_gib=1\.5"):
        pool2.acquire(A)


def test_the_estimate_counts_the_model_weights(make_model_folder: MakeModelFolder) -> None:
    """runtime 1 + KV 1 + weights: a 1 GiB model fits under 4 GiB, a 4 GiB one does not."""
    small = make_model_folder("small", GIB, "float32")
    large = make_model_folder("large", 4 * GIB, "float32")
    pool, made = make_pool(PoolLimits(max_replicas=4, max_memory_gib=4, runtime_memory_gib=1.0))
    pool.acquire(EngineConfig(model=str(small), dtype="float32"))
    assert len(made) == 1
    with pytest.raises(PoolCapacityError, match=r"needs about 6\.0 GiB"):
        pool.acquire(EngineConfig(model=str(large), dtype="float32"))


def test_retain_only_and_close_stop_replicas() -> None:
    pool, made = make_pool(ROOMY)
    pool.acquire(A)
    pool.acquire(B)
    pool.retain_only([B])
    assert [replica.alive for replica in made] == [False, True]
    pool.close()
    assert not any(replica.alive for replica in made) and pool.replicas() == []


def test_cpu_core_choice_spreads_replicas() -> None:
    assert choose_cpu_core([0, 1], []) == 0
    assert choose_cpu_core([0, 1], [0]) == 1
    assert choose_cpu_core([0, 1], [0, 1]) == 0
    assert choose_cpu_core([2, 3], [2, 2, 3]) == 3


def test_replicas_of_a_pool_are_pinned_to_different_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("runtime.engine.pool.available_cpu_cores", lambda: [0, 1])
    pool, made = make_pool(ROOMY)
    pool.acquire(A, count=2)
    binds = [replica.env["VLLM_CPU_OMP_THREADS_BIND"] for replica in made]
    assert binds == ["0", "1"]


def test_close_aborts_a_start_under_way_in_another_thread(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A replacement still starting (its thread holds the pool's lock) must not hold up
    close() for a whole cold start: close stops it, the starting thread fails fast."""
    never_ready = [sys.executable, "-c", "import time; time.sleep(120)"]
    monkeypatch.setattr(EngineConfig, "server_argv", lambda self, *args, **kwargs: never_ready)
    monkeypatch.setattr(replica_module, "served_model", lambda name, quantization: tmp_path)
    pool = ReplicaPool(ROOMY, log_dir=tmp_path, startup_timeout_s=300)
    failure: list[BaseException] = []

    def acquire() -> None:
        try:
            pool.acquire(A)
        except BaseException as error:
            failure.append(error)

    starter = threading.Thread(target=acquire, daemon=True)
    starter.start()
    deadline = time.monotonic() + 10
    while not replica_module.live_replicas() and time.monotonic() < deadline:
        time.sleep(0.05)
    (starting,) = replica_module.live_replicas()  # launched, not ready: it never will be
    pgid = starting.pid
    assert pgid is not None

    began = time.monotonic()
    pool.close()
    assert time.monotonic() - began < 15  # the grace of one stop, not the startup timeout
    starter.join(timeout=5)
    assert not starter.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], ReplicaStartError)
    assert "stopped before it was ready" in str(failure[0])
    assert not group_alive(pgid) and pool.replicas() == []
