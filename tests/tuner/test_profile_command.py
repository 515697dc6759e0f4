"""`fmtune profile`: a stored profile is reused and listed; bad input is one line, exit 2.

No replica starts here: the profile is stored in an empty fmtune home first (the measuring
itself is tests/runtime/test_profiler_engine.py)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from runtime.engine.config import EngineConfig
from runtime.profiler import ProfileKey, profile_path
from runtime.sim.steptime import save_profile
from tests.runtime.sim.conftest import make_profile
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
