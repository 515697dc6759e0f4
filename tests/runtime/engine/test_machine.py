"""The machine's state: which processes are vLLM servers, and the snapshot a measurement
records (the servers it owns left out). The process table is faked: no server starts here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from runtime.engine import machine
from runtime.engine.machine import is_vllm_server, machine_state, usable_cores, vllm_server_pids

SERVER = ["/work/main/.venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model"]


@pytest.mark.parametrize(
    ("argv", "server"),
    [
        (SERVER, True),
        (["python3.12", "-u", "-m", "vllm.entrypoints.cli.main", "serve", "m"], True),
        (["/usr/local/bin/vllm", "serve", "Qwen/Qwen2.5-0.5B"], True),
        (["vllm", "bench", "serve"], False),
        (["flock", "/tmp/fmtune-engine.lock", *SERVER], False),  # a wrapper, not the server
        (["bash", "-c", "python -m vllm.entrypoints.openai.api_server"], False),
        (["pgrep", "-f", "vllm.entrypoints"], False),
        (["VLLM::EngineCore", "", ""], False),  # a server's worker, renamed by vLLM
        (["python", "-m", "pytest", "tests/runtime"], False),
        ([], False),
    ],
)
def test_a_vllm_server_is_a_python_running_its_entrypoints_or_vllm_serve(
    argv: list[str], server: bool
) -> None:
    assert is_vllm_server(argv) is server


def test_the_process_table_is_read_and_hidden_command_lines_are_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = [
        SimpleNamespace(info={"pid": 30, "cmdline": SERVER}),
        SimpleNamespace(info={"pid": 31, "cmdline": None}),  # gone, or not ours to read
        SimpleNamespace(info={"pid": 12, "cmdline": ["vllm", "serve", "m"]}),
        SimpleNamespace(info={"pid": 13, "cmdline": ["VLLM::EngineCore"]}),
    ]
    monkeypatch.setattr("psutil.process_iter", lambda attrs: iter(table))
    assert vllm_server_pids() == [12, 30]


def test_a_snapshot_leaves_out_the_measurements_own_servers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(machine, "vllm_server_pids", lambda: [10, 11, 12])
    monkeypatch.setattr(machine, "load_1m", lambda: 0.75)
    snapshot = machine_state(own_pids=[11, 99])
    assert snapshot.foreign_vllm_servers == 2 and snapshot.load_1m_start == 0.75
    assert snapshot.cores == usable_cores() >= 1
    assert snapshot.load_1m_end is None and not snapshot.allowed_busy
