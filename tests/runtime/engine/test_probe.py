"""`probe_config`: start a replica for a config, probe it, stop it (a fake engine, no vLLM)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

import runtime.engine.probe
from runtime.engine.config import EngineConfig
from runtime.engine.probe import probe_config
from runtime.engine.replica import ReplicaStartError
from runtime.errors import EngineFailure
from tests.runtime.fake_openai import FakeReplica

MODEL = "fake-model"


class ProbedReplica(FakeReplica):
    """A fake replica built the way probe_config builds a real one; records its life."""

    made: ClassVar[list[ProbedReplica]] = []
    fail_start: ClassVar[bool] = False

    def __init__(self, config: EngineConfig, *, startup_timeout_s: float) -> None:
        super().__init__(config, replica_id=f"probe-{len(self.made)}")
        self.startup_timeout_s = startup_timeout_s
        self.stopped = False
        self.made.append(self)

    def start(self) -> ProbedReplica:
        if self.fail_start:
            raise ReplicaStartError("replica probe-0 exited with code 1\nlast lines:\nOOM")
        super().start()
        self.start_s = 0.5
        return self

    def stop(self) -> None:
        self.stopped = True
        super().stop()


@pytest.fixture
def replicas(monkeypatch: pytest.MonkeyPatch) -> type[ProbedReplica]:
    monkeypatch.setattr(ProbedReplica, "made", [])
    monkeypatch.setattr(runtime.engine.probe, "Replica", ProbedReplica)
    return ProbedReplica


def test_probe_config_starts_probes_and_stops_the_replica(
    replicas: type[ProbedReplica],
) -> None:
    ready: list[tuple[float, str]] = []
    done: list[Any] = []

    result = probe_config(
        EngineConfig(model=MODEL), requests=6, concurrency=2, max_tokens=4,
        startup_timeout_s=30.0, on_ready=lambda s, url: ready.append((s, url)),
        on_done=done.append,
    )  # fmt: skip

    (replica,) = replicas.made
    assert replica.startup_timeout_s == 30.0
    assert replica.stopped
    assert ready == [(0.5, f"http://127.0.0.1:{replica.port}")]
    assert len(done) == 6 and replica.engine.calls == 6
    metrics = result.metrics()
    assert metrics["requests"] == 6 and metrics["errors"] == 0
    assert metrics["replica_start_s"] == 0.5 and metrics["concurrency"] == 2


def test_a_replica_that_cannot_start_is_an_engine_failure_and_still_stopped(
    replicas: type[ProbedReplica], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ProbedReplica, "fail_start", True)
    ready: list[tuple[float, str]] = []

    with pytest.raises(EngineFailure, match="exited with code 1"):
        probe_config(
            EngineConfig(model=MODEL), requests=2, concurrency=1, max_tokens=4,
            on_ready=lambda s, url: ready.append((s, url)),
        )  # fmt: skip

    (replica,) = replicas.made
    assert replica.stopped and not ready
