"""AppSpec: apps named by path or name in experiment and DEPLOY files, and the model keys
their nodes call checked against the deployment before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from runtime.deployment import AppSpec, Deployment, load_deployment
from runtime.errors import ConfigError
from runtime.run import load_run_spec
from tests.runtime.conftest import WriteApp

ENGINE = {"engine": {"model": "smollm2-135m"}}


def experiment(app: Any, models: tuple[str, ...] = ("llm", "big")) -> dict[str, Any]:
    return {
        "name": "t",
        "app": app,
        "workload": {"arrivals": {"kind": "closed", "users": 1}, "num_requests": 2},
        "sla": {"e2e_s": 10},
        "deployment": {"models": dict.fromkeys(models, ENGINE)},
    }


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_an_app_path_is_relative_to_the_file_that_names_it(
    write_app: WriteApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_app()
    (tmp_path / "exp").mkdir()
    path = write(tmp_path / "exp" / "e.yaml", experiment("../calc"))  # the string form
    monkeypatch.chdir("/")
    spec = load_run_spec(path)
    assert spec.app.source == str(folder.resolve())
    assert (spec.app.name, spec.app.architecture, spec.app.prompt) == ("calc", "direct", "plain")
    again = load_run_spec(path, {"app": {"source": "../calc/app.yaml", "prompt": "teacher"}})
    assert again.app.source == str((folder / "app.yaml").resolve())
    assert again.app.prompt == "teacher"
    assert AppSpec.model_validate(spec.app.model_dump()) == spec.app  # stays valid as dumped


def test_a_node_calling_a_key_the_deployment_lacks_is_named(
    write_app: WriteApp, tmp_path: Path
) -> None:
    write_app()
    app = {"source": "../calc", "architecture": "expression"}
    path = write(tmp_path / "calc" / "e.yaml", experiment(app, models=("llm",)))
    with pytest.raises(ConfigError) as caught:
        load_run_spec(path, {"app.source": str(tmp_path / "calc")})
    assert str(caught.value) == (
        f"{path}: app.nodes.write.model: unknown model key 'big'; valid: llm among the "
        "deployment's models"
    )
    mapped = load_run_spec(
        path, {"app.source": str(tmp_path / "calc"), "app.nodes": {"write": {"model": "llm"}}}
    )
    assert mapped.app.model_keys() == {"llm": "llm"}
    with pytest.raises(ConfigError, match=r"app: nodes\.wirte: app 'calc' has no llm node 'wirte'"):
        load_run_spec(
            path, {"app.source": str(tmp_path / "calc"), "app.nodes": {"wirte": {"model": "llm"}}}
        )


def test_a_judge_key_the_deployment_lacks_is_named(write_app: WriteApp, tmp_path: Path) -> None:
    judge = {"kind": "llm_judge", "model": "judge", "prompt": "{prediction.answer} 0-10?"}
    folder = write_app(scorer=judge)
    path = write(tmp_path / "e.yaml", experiment(str(folder)))
    with pytest.raises(
        ConfigError, match=r"app: the scorer's judge calls unknown model key 'judge'"
    ):
        load_run_spec(path)


def test_deploy_files_serve_apps_by_path_with_per_node_models(
    write_app: WriteApp, tmp_path: Path
) -> None:
    write_app()
    document = {
        "models": {"llm": ENGINE, "big": ENGINE},
        "apps": {
            "sums": {"source": "calc", "architecture": "expression"},
            "small": {"source": "calc", "architecture": "expression", "model_key": "llm"},
        },
    }
    deployment = load_deployment(write(tmp_path / "DEPLOY.yaml", document))
    assert deployment.apps["sums"].model_keys() == {"big": "big"}
    assert deployment.apps["small"].model_keys() == {"llm": "llm"}
    dumped = yaml.safe_load(deployment.to_yaml())["apps"]["sums"]
    assert next(iter(dumped)) == "source" and dumped["source"] == str(tmp_path / "calc")
    del document["models"]["big"]
    with pytest.raises(ConfigError, match=r"apps\.sums\.nodes\.write\.model: unknown model key"):
        load_deployment(write(tmp_path / "DEPLOY.yaml", document))


def test_a_bad_source_names_the_field() -> None:
    with pytest.raises(Exception, match=r"source\n  Value error, unknown app 'arithmatic'"):
        Deployment.model_validate({"models": {"llm": ENGINE}, "apps": {"a": "arithmatic"}})
