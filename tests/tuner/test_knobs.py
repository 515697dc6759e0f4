"""Knob names: their translation to experiment paths, the schema check before a study starts,
and the one RunSpec builder the study and export share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runtime.deployment import AppSpec
from runtime.engine.config import EngineConfig
from runtime.errors import ConfigError
from runtime.run import load_run_spec
from tuner.experiment import load_experiment
from tuner.knobs import (
    InvalidTrial,
    check_knob_names,
    experiment_overrides,
    trial_spec,
    valid_knob_names,
)
from tuner.space import CategoricalKnob, IntKnob, SearchSpace, SpaceError, load_space

ROOT = Path(__file__).resolve().parents[2]
EXTRACT = ROOT / "experiments" / "extract-cpu.yaml"

SPACE = """
app:
  architecture: [single, parallel]
engine:
  max_num_seqs: {type: int, low: 4, high: 16, step: 4}
"""
MISSPELLED = SPACE + "  blocksize: [64, 128]\n"
MESSAGE = "unknown knob 'engine.blocksize' (did you mean 'engine.block_size'?)"


def write_experiment(tmp_path: Path, space_text: str) -> Path:
    """experiments/extract-cpu.yaml with a tune section over a space file in tmp_path."""
    (tmp_path / "space.yaml").write_text(space_text)
    data = yaml.safe_load(EXTRACT.read_text())
    data["tune"] = {
        "search_space": "space.yaml",
        "objectives": [{"metric": "quality", "direction": "maximize"}],
        "trials": 2,
        "sampler": "random",
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- translation ------------------------------------------------------------------------


def test_every_knob_form_lands_on_its_experiment_path() -> None:
    params = {
        "app.format": "json",
        "engine.block_size": 32,
        "engine.speculative_method": "none",
        "models.judge.engine.block_size": 16,
        "models.llm.model": "m",
        "deployment.replicas": 2,
        "models.judge.replicas": 3,
        "deployment.router.policy": "round_robin",
    }
    assert experiment_overrides(params, ["llm", "judge"]) == {
        "app.format": "json",
        "deployment.models.llm.engine.block_size": 32,  # judge's own knob wins for judge
        "deployment.models.llm.engine.speculative_method": None,  # 'none' means None
        "deployment.models.judge.engine.speculative_method": None,
        "deployment.models.judge.engine.block_size": 16,
        "deployment.models.llm.engine.model": "m",
        "deployment.models.llm.replicas": 2,  # judge's own replica knob wins for judge
        "deployment.models.judge.replicas": 3,
        "deployment.router.policy": "round_robin",
    }


def test_a_knob_for_a_model_key_the_deployment_lacks_is_refused() -> None:
    with pytest.raises(SpaceError, match=r"model key 'llm' is not one of"):
        experiment_overrides({"models.llm.model": "m"}, ["judge"])
    with pytest.raises(SpaceError, match=r"unknown knob 'replicas'"):
        experiment_overrides({"replicas": 2}, ["llm"])


# --- valid names ------------------------------------------------------------------------


def test_valid_names_come_from_the_schemas() -> None:
    names = set(valid_knob_names(["llm", "judge"]))
    for field in EngineConfig.model_fields:
        assert {f"engine.{field}", f"models.llm.engine.{field}"} <= names
        assert f"models.judge.engine.{field}" in names
    assert {f"app.{field}" for field in AppSpec.model_fields} - names == {"app.source", "app.nodes"}
    assert not any(name.startswith("app.nodes.") for name in names)  # no app given: no nodes
    extraction = AppSpec(source="extraction")
    with_app = set(valid_knob_names(["llm"], extraction))
    assert {"app.nodes.extract.model", "app.nodes.judge.model"} <= with_app
    assert {"models.llm.model", "models.llm.replicas", "deployment.replicas"} <= names
    assert {"deployment.router.policy", "deployment.cluster"} <= names
    # Dict fields are data, not schema: model keys are reached through models.<k>.*
    assert not any(name.startswith("deployment.models.") for name in names)
    assert "models.other.model" not in names


def test_a_misspelled_knob_names_the_file_the_knob_and_the_closest_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "search_spaces"
    folder.mkdir()
    (folder / "x.yaml").write_text(MISSPELLED)
    monkeypatch.chdir(tmp_path)
    path = Path("search_spaces/x.yaml")
    space = load_space(path)

    with pytest.raises(ConfigError) as info:
        check_knob_names(space, ["llm"], path)

    assert str(info.value) == f"search_spaces/x.yaml: {MESSAGE}"
    # Given absolute, a path inside the working folder is still shown as written.
    with pytest.raises(ConfigError, match=r"^search_spaces/x\.yaml: unknown knob"):
        check_knob_names(space, ["llm"], path.resolve())


@pytest.mark.parametrize(
    ("knob", "expected"),
    [
        ("deployment.router.polcy", "(did you mean 'deployment.router.policy'?)"),
        ("models.judge.model", "(did you mean 'models.llm.model'?)"),
        ("app.architectur", "(did you mean 'app.architecture'?)"),
        ("models.llm.engine.max_num_seq", "(did you mean 'models.llm.engine.max_num_seqs'?)"),
    ],
)
def test_every_section_is_checked(knob: str, expected: str) -> None:
    space = SearchSpace(knobs={knob: CategoricalKnob(choices=["x"])})
    with pytest.raises(SpaceError) as info:
        check_knob_names(space, ["llm"], Path("/spaces/s.yaml"))
    assert str(info.value) == f"/spaces/s.yaml: unknown knob '{knob}' {expected}"


def test_per_node_models_are_knobs_of_the_experiments_app(tmp_path: Path) -> None:
    """`app.nodes.<id>.model` is valid for the app's llm nodes only, and lands on the node."""
    extraction = AppSpec(source="extraction")
    space = load_space_text(tmp_path, "app:\n  nodes.judge.model: [llm, big]\n")
    check_knob_names(space, ["llm", "big"], tmp_path / "s.yaml", extraction)
    typo = load_space_text(tmp_path, "app:\n  nodes.jduge.model: [llm]\n")
    with pytest.raises(SpaceError, match=r"unknown knob 'app\.nodes\.jduge\.model' \(did you"):
        check_knob_names(typo, ["llm"], tmp_path / "s.yaml", extraction)
    params = {"app.nodes.judge.model": "big", "app.architecture": "judge"}
    assert experiment_overrides(params, ["llm", "big"]) == params
    base = load_run_spec(EXTRACT).model_dump(mode="json")
    base["deployment"]["models"]["big"] = base["deployment"]["models"]["llm"]
    spec = trial_spec(base, space, {"app.nodes.judge.model": "big", "app.architecture": "judge"})
    models = {node.id: node.model for node in spec.app.build().nodes}
    assert models == {"agent_a": "llm", "agent_b": "llm", "judge": "big"}


def load_space_text(tmp_path: Path, text: str) -> SearchSpace:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return load_space(path)


def test_the_shipped_spaces_name_only_valid_knobs() -> None:
    keys = load_run_spec(EXTRACT).deployment.models
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        check_knob_names(load_space(path), keys, path)


def test_the_study_refuses_a_misspelled_knob_before_it_creates_the_study(tmp_path: Path) -> None:
    from tuner.study import StudyRunner

    experiment = load_experiment(write_experiment(tmp_path, MISSPELLED), need_tune=True)
    evaluated: list[object] = []

    with pytest.raises(ConfigError) as info:
        StudyRunner(
            experiment,
            storage_url=f"sqlite:///{tmp_path / 'study.db'}",
            study_name="misspelled",
            out_dir=tmp_path / "out",
            evaluate=evaluated.append,  # type: ignore[arg-type]
        )

    assert str(info.value) == f"{tmp_path / 'space.yaml'}: {MESSAGE}"
    assert evaluated == []
    assert not (tmp_path / "study.db").exists()


def test_fmtune_tune_exits_2_with_one_line_and_starts_no_replica(tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path, MISSPELLED)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "tune", str(experiment), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"error: {tmp_path / 'space.yaml'}: {MESSAGE}"]
    assert "trial" not in done.stdout
    assert not (out / "study.db").exists()
    assert not (out / "trials").exists()
    assert [p for p in (out / "logs").rglob("*") if p.is_file()] == []


# --- one RunSpec builder ----------------------------------------------------------------


def test_trial_spec_is_the_same_from_the_experiment_or_its_dump(tmp_path: Path) -> None:
    experiment = load_experiment(write_experiment(tmp_path, SPACE), need_tune=True)
    space = load_space(tmp_path / "space.yaml")
    params = {"app.architecture": "parallel", "engine.max_num_seqs": 8}

    spec = trial_spec(experiment, space, params)

    assert spec == trial_spec(experiment.model_dump(mode="json", exclude={"tune"}), space, params)
    assert spec.app.architecture == "parallel"
    assert spec.deployment.models["llm"].engine.max_num_seqs == 8
    assert spec.deployment.models["llm"].engine.block_size == 128  # the experiment's own


def test_trial_spec_refuses_knobs_the_constraints_or_the_configs_reject(tmp_path: Path) -> None:
    experiment = load_experiment(write_experiment(tmp_path, SPACE), need_tune=True)
    space = SearchSpace(
        knobs={"engine.max_num_seqs": IntKnob(type="int", low=0, high=16)},
        constraints=["engine.max_num_seqs <= 8"],
    )
    with pytest.raises(InvalidTrial, match=r"^violates engine\.max_num_seqs <= 8 \(got 16 <= 8\)"):
        trial_spec(experiment, space, {"engine.max_num_seqs": 16})
    with pytest.raises(InvalidTrial, match=r"max_num_seqs"):
        trial_spec(experiment, space, {"engine.max_num_seqs": 0})
