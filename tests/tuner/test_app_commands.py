"""`fmtune apps list/check/schema` and `fmtune init`: no engine, bad input as one line and
exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from runtime.app.appfile import app_file_schema, load_app_folder
from runtime.app.registry import get_application
from tuner.cli import app
from tuner.experiment import load_experiment
from tuner.knobs import check_knob_names, trial_spec
from tuner.space import load_space

REPO = Path(__file__).resolve().parents[2]


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_apps_list_shows_the_shipped_apps() -> None:
    code, out, _ = invoke("apps", "list")
    assert code == 0
    assert "arithmetic" in out and "extraction" in out and "step_by_step" in out


def test_apps_check_renders_one_request_of_every_variant() -> None:
    question = get_application("arithmetic").examples(1, 0)[0].inputs["question"]
    code, out, _ = invoke("apps", "check", str(REPO / "apps" / "arithmetic"))
    assert code == 0, out
    for variant, calls in (("direct", 1), ("step_by_step", 1), ("expression", 1)):
        assert f"variant {variant}: {calls} llm call(s)" in out
    assert out.count(question) == 3 and "[system] You solve arithmetic word problems." in out
    assert "Expression: " not in out  # few-shot off by default
    assert out.rstrip().endswith("is a valid app")
    code, out, _ = invoke("apps", "check", "arithmetic", "--prompt", "teacher", "--few-shot")
    assert code == 0 and "primary-school maths teacher" in out
    assert out.count("Expression: ") == 3 * 3  # three worked examples in each variant


def test_apps_check_of_the_extraction_app_shows_its_four_architectures() -> None:
    code, out, _ = invoke("apps", "check", "extraction", "--format", "tag")
    assert code == 0
    assert "variant judge: 3 llm call(s)" in out and "variant parallel: 3 llm call(s)" in out
    assert "<agent_a.name>" in out and '<NAME="...">' in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--prompt", "techer"], "prompt must be one of ['plain', 'teacher'] for app "
         "'arithmetic', got 'techer' (did you mean 'teacher'?)"),
        (["--format", "csv"], "options: format: Input should be 'json', 'yaml'"),
    ],
)  # fmt: skip
def test_apps_check_refuses_bad_options_in_one_line(args: list[str], expected: str) -> None:
    code, _, err = invoke("apps", "check", "arithmetic", *args)
    assert code == 2 and expected in one_error_line(err)


def test_apps_check_of_a_broken_folder_is_one_line_naming_file_node_and_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert invoke("init", "mine")[0] == 0
    text = (tmp_path / "mine" / "app.yaml").read_text()
    (tmp_path / "mine" / "app.yaml").write_text(text.replace("{recall.text}", "{recal.text}"))
    code, _, err = invoke("apps", "check", "mine")
    assert code == 2
    assert one_error_line(err) == (
        "error: mine/app.yaml: variants.recall_then_answer: node 'answer': prompt references "
        "unknown node 'recal' in 'recal.text'"
    )
    code, _, err = invoke("apps", "check", "nope")
    assert code == 2 and "unknown app 'nope'" in one_error_line(err)


def test_apps_schema_prints_the_app_yaml_schema() -> None:
    code, out, _ = invoke("apps", "schema")
    assert code == 0 and json.loads(out) == app_file_schema()


def test_init_writes_a_working_app_an_experiment_and_a_space(tmp_path: Path) -> None:
    folder = tmp_path / "new"
    code, out, _ = invoke("init", str(folder))
    assert code == 0 and "fmtune run" in out
    application = load_app_folder(folder)
    assert application.architectures == ("direct", "recall_then_answer")
    assert len(application.examples(100, 0)) == 20
    experiment = load_experiment(folder / "experiment.yaml", need_tune=True)
    assert experiment.app.source == str((folder / "app.yaml").resolve())
    assert experiment.tune is not None
    space = load_space(experiment.tune.search_space)
    check_knob_names(space, experiment.deployment.models, experiment.tune.search_space)
    spec = trial_spec(experiment, space, {"app.architecture": "recall_then_answer"})
    assert spec.app.build().name == "my_app-recall_then_answer"
    assert "change:" in (folder / "app.yaml").read_text()  # it says what to change


def test_init_never_overwrites_without_force(tmp_path: Path) -> None:
    folder = tmp_path / "new"
    assert invoke("init", str(folder))[0] == 0
    (folder / "data.jsonl").write_text('{"country": "Chile", "capital": "Santiago"}\n')
    code, _, err = invoke("init", str(folder))
    assert code == 2
    assert (
        one_error_line(err)
        == f"error: {folder / 'app.yaml'} already exists; use --force to overwrite it"
    )
    assert "Chile" in (folder / "data.jsonl").read_text()
    assert invoke("init", str(folder), "--force")[0] == 0
    assert "Chile" not in (folder / "data.jsonl").read_text()


def test_a_bad_knob_of_an_init_experiment_is_one_line_before_any_replica(tmp_path: Path) -> None:
    folder = tmp_path / "new"
    assert invoke("init", str(folder))[0] == 0
    experiment = str(folder / "experiment.yaml")
    code, _, err = invoke("run", experiment, "--set", "app.architecture=direkt")
    assert code == 2
    assert (
        "app: architecture must be one of ['direct', 'recall_then_answer'] for app 'my_app', "
        "got 'direkt' (did you mean 'direct'?)" in one_error_line(err)
    )
    data = yaml.safe_load((folder / "experiment.yaml").read_text())
    data["deployment"]["models"] = {"big": data["deployment"]["models"]["llm"]}
    (folder / "experiment.yaml").write_text(yaml.safe_dump(data))
    code, _, err = invoke("run", experiment)
    assert code == 2
    assert (
        "app.nodes.answer.model: unknown model key 'llm'; valid: big among the deployment's"
        in one_error_line(err)
    )
