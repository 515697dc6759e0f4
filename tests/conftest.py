"""Shared fixtures: the prepared bundled model and one real replica pool per session.

Tests marked `engine` start real vLLM CPU replicas (about a minute each on 2 cores), so the
session shares one hot replica of a small engine config among them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.engine.config import EngineConfig
from runtime.engine.models import is_prepared, model_dir, prepare_model
from runtime.engine.pool import PoolLimits, ReplicaPool
from runtime.engine.replica import Replica
from runtime.profiler import step_logging_factory

BUNDLED = "smollm2-135m"


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    """The bundled model's folder, prepared once (make test prepares it beforehand)."""
    if not is_prepared(BUNDLED):
        prepare_model(BUNDLED)
    return model_dir(BUNDLED)


@pytest.fixture(scope="session")
def small_engine(bundled_model: Path) -> EngineConfig:
    """A small CPU engine of the bundled model that starts fast (eager: no compilation)."""
    return EngineConfig(
        model=BUNDLED, dtype="float32", max_model_len=2048, max_num_seqs=16, block_size=128,
        enforce_eager=True,
    )  # fmt: skip


@pytest.fixture(scope="session")
def engine_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaPool]:
    """One replica pool for the whole session; every replica is stopped at the end. Its
    replicas log every engine step (as the profiler's do), so a test can profile the hot one."""
    log_dir = tmp_path_factory.mktemp("replica-logs")
    limits = PoolLimits(max_replicas=3, max_memory_gib=18)
    with ReplicaPool(limits, factory=step_logging_factory(log_dir)) as pool:
        yield pool


@pytest.fixture
def hot_replica(engine_pool: ReplicaPool, small_engine: EngineConfig) -> Replica:
    """A running replica of the small engine, shared by the session's engine tests (the pool
    keeps it hot between tests and restarts it if a test stopped it)."""
    return engine_pool.acquire(small_engine)[0]


@pytest.fixture
def fmtune_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty fmtune home for tests that must not see the prepared models."""
    home = tmp_path / "fmtune-home"
    monkeypatch.setenv("FMTUNE_HOME", str(home))
    return home


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fast tests first, then real-engine tests, and the one that stops the hot replica last,
    so a failure shows early and the shared replica is started once."""

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("stops_hot_replica"):
            return 2
        return 1 if item.get_closest_marker("engine") else 0

    items.sort(key=rank)
