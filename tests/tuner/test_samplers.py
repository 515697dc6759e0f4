"""The sampler registry: one list of names read by the experiment schema, `make_sampler`, the
study loop (population drivers) and the CLI's `--sampler`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from runtime.errors import ConfigError, describe_validation_error
from tuner.experiment import TuneSpec
from tuner.samplers import SAMPLERS, make_driver, make_sampler, sampler_entry, sampler_help
from tuner.space import SearchSpace, load_space

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"

# optuna marks NSGA-III experimental; building it is what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

SPACE = """
description: tiny space for the sampler tests
app:
  architecture: [single, parallel]
engine:
  max_num_seqs: {type: int, low: 4, high: 16, step: 4}
"""

TWO_OBJECTIVES = [
    {"metric": "cost_per_1k_usd", "direction": "minimize"},
    {"metric": "quality", "direction": "maximize"},
]


@pytest.fixture
def space(tmp_path: Path) -> SearchSpace:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return load_space(path)


def tune_spec(**fields: Any) -> TuneSpec:
    return TuneSpec.model_validate(
        {"search_space": "space.yaml", "objectives": TWO_OBJECTIVES, "population_size": 2} | fields
    )


def test_the_registry_offers_every_documented_sampler() -> None:
    assert list(SAMPLERS) == ["nsga2", "tpe", "nsga3", "random", "grid", "pymoo-nsga2"]
    for name, entry in SAMPLERS.items():
        assert entry.name == name
        assert entry.description and "\n" not in entry.description


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_registry_name_is_accepted_and_builds_a_sampler(
    name: str, space: SearchSpace
) -> None:
    tune = tune_spec(sampler=name)
    assert tune.sampler_name() == name

    sampler = make_sampler(tune, space)

    assert isinstance(sampler, optuna.samplers.BaseSampler)
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=sampler)
    driver = make_driver(tune, space, study)
    assert (driver is not None) == (SAMPLERS[name].driver is not None)


def test_only_pymoo_drives_its_own_population(space: SearchSpace) -> None:
    assert [name for name, entry in SAMPLERS.items() if entry.driver is not None] == ["pymoo-nsga2"]
    tune = tune_spec(sampler="pymoo-nsga2")
    study = optuna.create_study(directions=["minimize", "maximize"])
    driver = make_driver(tune, space, study)
    assert driver is not None
    params = driver.next_params()
    assert set(params) == set(space.knobs)


def test_the_default_is_nsga2_with_several_objectives_and_tpe_with_one(
    space: SearchSpace,
) -> None:
    several = tune_spec()
    one = tune_spec(objectives=TWO_OBJECTIVES[:1])
    assert several.sampler_name() == "nsga2"
    assert one.sampler_name() == "tpe"
    assert isinstance(make_sampler(several, space), optuna.samplers.NSGAIISampler)
    assert isinstance(make_sampler(one, space), optuna.samplers.TPESampler)


def test_an_unknown_name_is_rejected_naming_the_closest() -> None:
    with pytest.raises(ValidationError) as caught:
        tune_spec(sampler="nsga-2")
    message = describe_validation_error(caught.value)
    assert message == "sampler: unknown sampler 'nsga-2' (did you mean 'nsga2'?)"

    with pytest.raises(ConfigError, match=r"unknown sampler 'pymoo' \(did you mean 'pymoo-nsga2'"):
        sampler_entry("pymoo")


def test_a_name_close_to_none_lists_the_valid_ones() -> None:
    with pytest.raises(ValidationError) as caught:
        tune_spec(sampler="bayes")
    message = describe_validation_error(caught.value)
    assert message.startswith("sampler: unknown sampler 'bayes'; valid: ")
    assert all(name in message for name in SAMPLERS)


def test_the_schema_lists_the_names_with_their_descriptions() -> None:
    field = TuneSpec.model_json_schema()["properties"]["sampler"]
    assert field["enum"] == [*SAMPLERS, None]
    assert sampler_help() in field["description"]
    for entry in SAMPLERS.values():
        assert f"{entry.name} ({entry.description})" in field["description"]


def test_cli_help_lists_every_sampler() -> None:
    from tuner.cli import app

    tune = typer.main.get_command(app).commands["tune"]  # type: ignore[attr-defined]
    help_text = next(param.help for param in tune.params if param.name == "sampler")
    for entry in SAMPLERS.values():
        assert f"{entry.name} ({entry.description})" in help_text
    result = CliRunner().invoke(app, ["tune", "--help"])
    assert result.exit_code == 0 and "--sampler" in result.output


def test_cli_rejects_an_unknown_sampler_with_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "tune", str(QUICKSTART), "--sampler", "tpee"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == ["error: --sampler: unknown sampler 'tpee' (did you mean 'tpe'?)"]
