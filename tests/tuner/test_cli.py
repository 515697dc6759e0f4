"""The `fmtune` command line without vLLM: its help, `probe` against a fake engine, and the
one-line errors with exit code 2."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import runtime.engine.models
import runtime.engine.probe
from runtime.engine.config import EngineConfig
from runtime.engine.replica import ReplicaStartError
from tests.runtime.fake_openai import FakeEngine, FakeReplica, LoopbackServer
from tuner.cli import app

REPO = Path(__file__).resolve().parents[2]
MODEL = "fake-model"


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLI configures logging for its process; undo that after each in-process run."""
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in ("mlflow", "alembic", "optuna")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in noisy.items():
        logging.getLogger(name).setLevel(old)


def test_import_does_not_load_the_engine() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, tuner.cli; "
         "print(sorted({'vllm', 'torch', 'optuna', 'mlflow'} & set(sys.modules)))"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "command",
    [[], ["models"], ["probe"], ["run"], ["serve"], ["tune"], ["worker"], ["export"], ["ui"]],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: fmtune" in result.output


def test_probe_an_endpoint_writes_metrics(tmp_path: Path) -> None:
    engine = FakeEngine(served_model=MODEL)
    with LoopbackServer(engine.app) as server:
        result = CliRunner().invoke(
            app,
            ["probe", "--endpoint", server.url, "--model", MODEL, "--requests", "5",
             "--concurrency", "2", "--max-tokens", "4", "--out", str(tmp_path)],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["requests"] == 5 and metrics["errors"] == 0
    assert metrics["config_hash"] == EngineConfig(model=MODEL).config_hash()
    assert engine.calls == 5


class CliReplica(FakeReplica):
    """A fake replica built the way `probe_config` builds a real one."""

    def __init__(self, config: EngineConfig, *, startup_timeout_s: float) -> None:
        super().__init__(config, replica_id="cli-probe")
        self.startup_timeout_s = startup_timeout_s

    def start(self) -> CliReplica:
        super().start()
        self.start_s = 1.25
        return self


class BrokenReplica(CliReplica):
    """A replica whose server exits during start-up."""

    def start(self) -> CliReplica:
        raise ReplicaStartError("replica cli-probe exited with code 1\nlast lines:\nout of memory")


@pytest.fixture
def no_model_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.engine.models, "resolve_model", lambda name: name)


@pytest.mark.usefixtures("no_model_check")
def test_probe_starts_a_replica_probes_it_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime.engine.probe, "Replica", CliReplica)

    result = CliRunner().invoke(
        app,
        ["probe", "--model", MODEL, "--requests", "3", "--max-tokens", "4",
         "--out", str(tmp_path)],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert f"starting a vLLM replica of {MODEL}" in result.output
    assert "replica ready in 1.2s at http://127.0.0.1:" in result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["requests"] == 3 and metrics["replica_start_s"] == 1.25


@pytest.mark.usefixtures("no_model_check")
def test_a_replica_that_cannot_start_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime.engine.probe, "Replica", BrokenReplica)

    result = CliRunner().invoke(app, ["probe", "--model", MODEL, "--out", str(tmp_path)])

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: replica cli-probe exited with code 1"
    assert "out of memory" in result.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_a_bad_engine_knob_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["probe", "--set", "block_size=48", "--out", str(tmp_path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --set: ")
    assert "block_size must be a multiple of 32 on cpu, got 48" in lines[0]
