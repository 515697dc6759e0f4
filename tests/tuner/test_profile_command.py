"""`fmtune profile`: a stored profile is reused and listed; bad input and a busy machine are
one line, exit 2.

No replica starts here: the profile is stored in an empty fmtune home first, or the measuring
is faked (tests.runtime.test_profiler.fake_machine; the measuring itself is
tests/runtime/test_profiler_engine.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runtime.engine.config import EngineConfig
from runtime.engine.machine import MachineState
from runtime.profiler import ProfileKey, profile_path, profiles_dir
from runtime.sim.steptime import save_profile
from tests.runtime.sim.conftest import make_profile
from tests.runtime.test_profiler import fake_machine, state
from tests.tuner.test_app_commands import invoke, one_error_line
from tuner.cli import app


def store(engine: EngineConfig) -> Path:
    key = ProfileKey.for_engine(engine)
    profile = make_profile(dtype=engine.dtype, hardware=key.hardware, vllm_version=key.vllm_version)
    return save_profile(profile, profile_path(key))


def test_a_stored_profile_is_reused_and_listed(fmtune_home: Path) -> None:
    path = store(EngineConfig(model="smollm2-135m", dtype="float32"))
    result = CliRunner().invoke(app, ["profile", "smollm2-135m", "--set", "dtype=float32"])
    assert result.exit_code == 0, result.output
    assert "reusing the stored profile" in result.output and "--force" in result.output
    assert "decode_seq_s" in result.output
    listed = CliRunner().invoke(app, ["profile", "--list"])
    assert listed.exit_code == 0, listed.output
    assert "smollm2-135m" in listed.output and "float32" in listed.output
    assert "profiles live in" in listed.output and path.is_file()


def test_bad_input_to_profile_is_one_line_and_exit_2(fmtune_home: Path) -> None:
    result = CliRunner().invoke(app, ["profile", "smollm2-135m", "--set", "dtyp=float32"])
    assert result.exit_code == 2
    assert "unknown engine knob 'dtyp' (did you mean 'dtype'?)" in result.output
    missing = CliRunner().invoke(app, ["profile"])
    assert missing.exit_code == 2 and "needs a MODEL" in missing.output


def test_a_busy_machine_is_refused_in_one_line_before_anything_starts(
    fmtune_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_machine(monkeypatch, state(3.0, servers=2))

    def no_replicas(*_: object) -> None:
        raise AssertionError("a replica pool was made on a busy machine")

    monkeypatch.setattr("runtime.profiler.profiler_pool", no_replicas)
    code, out, err = invoke("profile", "smollm2-135m", "--set", "dtype=float32")
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert "machine busy: 1-minute load average 3.00 on 2 cores (limit 1.00)" in line
    assert "2 other vLLM servers running" in line and "--allow-busy" in line
    assert not profiles_dir().exists()  # nothing stored


def test_allowed_on_a_busy_machine_the_load_is_stored_and_a_warning_printed(
    fmtune_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_machine(monkeypatch, state(3.0, servers=2), end_load=2.5)
    args = ["profile", "smollm2-135m", "--set", "dtype=float32", "--allow-busy"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "measured on a busy machine (allowed)" in warnings[0]
    [path] = profiles_dir().glob("*.json")
    stored = json.loads(path.read_text())
    assert stored["machine"] == {
        "cores": 2, "load_1m_start": 3.0, "load_1m_end": 2.5, "foreign_vllm_servers": 2,
        "allowed_busy": True,
    }  # fmt: skip
    assert stored["warnings"] == [warnings[0].removeprefix("warning: ")]


def test_the_list_is_readable_at_80_columns(fmtune_home: Path) -> None:
    old = store(EngineConfig(model="smollm2-135m", dtype="float32"))  # no machine recorded
    busy = MachineState(cores=2, load_1m_start=5.21, load_1m_end=6.0, foreign_vllm_servers=0)
    key = ProfileKey.for_engine(EngineConfig(model="smollm2-135m", dtype="bfloat16"))
    save_profile(
        make_profile(hardware=key.hardware, vllm_version=key.vllm_version, machine=busy),
        profile_path(key),
    )
    result = CliRunner().invoke(app, ["profile", "--list"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    folder = [line for line in lines if str(profiles_dir()) in line]
    assert folder == [f"profiles live in {profiles_dir()}"]  # once, whole (to copy)
    assert max(len(line) for line in lines if line not in folder) <= 80, result.stdout
    header = next(line for line in lines if line.startswith("model")).split()
    assert header == ["model", "dtype", "quant.", "machine", "vLLM", "created", "load", "r2"]
    rows = {line.split()[1]: line.split() for line in lines if line.startswith("smollm2-135m")}
    assert rows["float32"][-2:] == ["-", "-"]  # neither load nor fit recorded
    assert rows["bfloat16"][-2] == "5.21*" and key.vllm_version in rows["bfloat16"]
    assert old.name not in result.stdout and ".json" not in result.stdout
