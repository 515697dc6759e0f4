"""App folders: app.yaml loaded into an Application, its knobs, and one-line errors."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
import yaml

from runtime.app import registry
from runtime.app.appfile import AppFile, app_file_schema, fill_template, load_app_folder
from runtime.app.application import AppKnobs, Application, NodeKnobs
from runtime.app.dag import App, CodeNode, LlmNode
from runtime.app.datasets import Example
from runtime.app.executor import run_request
from runtime.app.registry import application_names, get_application, is_app_path
from runtime.app.scoring import FunctionScorer
from runtime.engine.client import CallRecord, SamplingParams
from runtime.errors import ConfigError
from tests.runtime.conftest import APP_YAML, EXPRESSION, WriteApp

REPO = Path(__file__).resolve().parents[3]
DATASET = APP_YAML["dataset"]


def llm_node(app: Any, node_id: str) -> LlmNode:
    node = app.node_map[node_id]
    assert isinstance(node, LlmNode)
    return node


def test_a_folder_becomes_an_application_with_its_knobs(write_app: WriteApp) -> None:
    application = load_app_folder(write_app())
    assert application.name == "calc" and application.inputs == ("question",)
    assert application.architectures == ("direct", "expression")
    assert application.prompts == ("plain", "teacher") and application.few_shot
    assert application.llm_nodes == ("solve", "write")
    examples = application.examples(40, 0)
    assert len(examples) == 4  # the test half of 8 rows
    assert all(e.reference["answer"] == 2 * int(e.inputs["question"][0]) for e in examples)

    plain = application.build(AppKnobs())
    solve = llm_node(plain, "solve")
    assert plain.name == "calc-direct" and solve.system == "Solve it."
    assert solve.prompt.startswith("Q: {question}")  # few-shot off: empty
    teacher = llm_node(application.build(AppKnobs(prompt="teacher", few_shot=True)), "solve")
    assert teacher.system == "You teach {{maths}}."  # a template fragment, kept as written
    shots = teacher.prompt.split("Q: {question}")[0]
    assert shots.count("A: ") == 2 and "{{x}}" in shots  # data braces escaped


def test_node_knobs_reach_models_sampling_loops_and_format(write_app: WriteApp) -> None:
    application = load_app_folder(write_app())
    knobs = AppKnobs(
        architecture="expression", format="yaml", max_tokens=7, temperature=0.9,
        nodes={"write": NodeKnobs(model="llm")},
    )  # fmt: skip
    app = application.build(knobs)
    write = llm_node(app, "write")
    assert (write.model, write.sampling.max_tokens, write.sampling.temperature) == ("llm", 7, 0.9)
    assert app.format.value == "yaml"
    assert isinstance(app.node_map["evaluate"], CodeNode)
    everyone = application.build(AppKnobs(architecture="expression", model_key="big"))
    assert llm_node(everyone, "write").model == "big"
    own = application.build(AppKnobs(architecture="expression"))
    assert (
        llm_node(own, "write").model == "big" and llm_node(own, "write").sampling.temperature == 0.3
    )


class Backend:
    """Answers every chat call with fixed text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.models: list[str] = []

    async def chat(
        self, model: str, messages: list[dict[str, str]], sampling: SamplingParams
    ) -> CallRecord:
        self.models.append(model)
        return CallRecord(
            start_s=0.0, ttft_s=0.01, itl_s=(), e2e_s=0.02, prompt_tokens=3,
            completion_tokens=2, finish_reason="stop", text=self.text,
        )  # fmt: skip


async def test_a_code_node_of_the_folder_runs_in_the_executor(write_app: WriteApp) -> None:
    application = load_app_folder(write_app())
    app = application.build(AppKnobs(architecture="expression"))
    backend = Backend("3 + 4")
    result = await run_request(app, {"question": "3 + 4?"}, backend, {"big": "served-big"})
    assert result.ok, result.error
    assert result.outputs == {"answer": 7.0} and backend.models == ["served-big"]
    example = application.examples(1, 0)[0]
    assert await application.scorer.score({"answer": example.reference["answer"]}, example) == 1.0


def test_fill_template_replaces_only_its_own_placeholders() -> None:
    texts = {"persona": "You are {name}."}
    filled = fill_template("{prompt.persona} {{lit}} {few_shot}{q}", texts, "a{b}")
    assert filled == "You are {name}. {{lit}} a{{b}}{q}"
    with pytest.raises(ValueError, match=r"unknown prompt text 'persna' \(did you mean 'persona'"):
        fill_template("{prompt.persna}", texts, None)
    with pytest.raises(ValueError, match="declares no few_shot"):
        fill_template("{few_shot}", texts, None)


def test_the_registry_finds_a_folder_by_path_and_apps_by_name(
    write_app: WriteApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_app()
    monkeypatch.chdir(folder.parent)
    assert get_application("calc/app.yaml").name == "calc"
    assert get_application("./calc").folder == folder.resolve()
    assert is_app_path("calc/app.yaml") and is_app_path("x.yaml") and not is_app_path("calc")
    assert {"extraction", "arithmetic"} <= set(application_names())
    with pytest.raises(ConfigError, match=r"unknown app 'extractoin' \(did you mean 'extraction'"):
        get_application("extractoin")


# ---- bad input: one line naming the file, the place and the value --------------------------


def bad_variant(**node: Any) -> dict[str, Any]:
    direct = json.loads(json.dumps(APP_YAML["variants"]["direct"]))
    direct["nodes"][0].update(node)
    return {**APP_YAML["variants"], "direct": direct}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"variatns": {}}, "calc/app.yaml: unknown field 'variatns' (did you mean 'variants'?)"),
        ({"variants": bad_variant(prompt="{sovle.answer} {question}")},
         "calc/app.yaml: variants.direct: node 'solve': prompt references unknown node 'sovle'"),
        ({"variants": bad_variant(prompt="{question} {answr}")},
         "calc/app.yaml: variants.direct: node 'solve': prompt uses unbound variable 'answr'"),
        ({"variants": bad_variant(model="lm")},
         "calc/app.yaml: variants.direct: node 'solve': model: unknown model key 'lm' (did you "
         "mean 'llm'?)"),
        ({"variants": bad_variant(system="{prompt.personna}")},
         "calc/app.yaml: variants.direct: node 'solve': system uses {prompt.personna}: unknown "
         "prompt text 'personna' (did you mean 'persona'?)"),
        ({"answer": ["answer", "unit"], "dataset": {**DATASET, "reference": ["answer"]},
          "scorer": {"kind": "numeric", "field": "answer"}},
         "calc/app.yaml: variants.direct.outputs: no answer field 'unit'"),
        ({"few_shot": None},
         "node 'solve': prompt uses {few_shot} but the app declares no few_shot"),
        ({"dataset": {"path": "data.jsonl"}},
         "calc/app.yaml: few_shot: needs train rows: give the dataset a split"),
        ({"dataset": {"path": "data.jsonl", "reference": ["solution"]}},
         "calc/data.jsonl: row 1: no column 'solution' (columns: question, answer)"),
        ({"scorer": {"kind": "python", "function": "score.py:score"}},
         "calc/app.yaml: scorer.function: no file 'score.py'"),
        ({"scorer": {"kind": "numeric", "field": "answr"}},
         "calc/app.yaml: scorer.field: unknown answer field 'answr' (did you mean 'answer'?)"),
        ({"variants": {"direct": {"file": "variants/nope.yaml"}}},
         "calc/app.yaml: variants.direct.file: no such file 'variants/nope.yaml'"),
        ({"prompts": {"persona": {"plain": "a"}, "other": {"teacher": "b"}}},
         "calc/app.yaml: prompts.other: has prompt variants ['teacher'], but every text needs "
         "the same as the first: ['plain']"),
        ({"inputs": ["few_shot"]}, "calc/app.yaml: inputs: 'few_shot' is a reserved template"),
    ],
)  # fmt: skip
def test_a_bad_app_folder_is_one_line(
    write_app: WriteApp, monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any], expected: str
) -> None:
    folder = write_app(**changes)
    monkeypatch.chdir(folder.parent)
    with pytest.raises(ConfigError) as caught:
        load_app_folder(Path("calc"))
    message = str(caught.value)
    assert expected in message and "\n" not in message, message


def test_a_missing_input_in_a_row_names_file_row_and_column(
    write_app: WriteApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_app(rows=[{"question": "1 + 1?", "answer": 2}, {"answer": 4}])
    monkeypatch.chdir(folder.parent)
    with pytest.raises(ConfigError, match=r"^calc/data\.jsonl: row 2: no column 'question'"):
        load_app_folder(folder)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("def score(prediction, reference):\n    raise KeyError('answer')\n",
         "scoring row 2's own reference as the answer failed: KeyError: 'answer'"),
        ("def score(prediction, reference):\n    return 3\n",
         "failed: ValueError: scorer returned 3, outside [0, 1]"),
        ("def scor(prediction, reference):\n    return 1\n",
         "has no attribute 'score' (did you mean 'scor'?)"),
    ],
)  # fmt: skip
def test_a_python_scorer_that_raises_or_leaves_0_1_is_refused_before_any_run(
    write_app: WriteApp, monkeypatch: pytest.MonkeyPatch, body: str, expected: str
) -> None:
    folder = write_app(scorer={"kind": "python", "function": "score.py:score"})
    (folder / "score.py").write_text(body)
    monkeypatch.chdir(folder.parent)
    with pytest.raises(ConfigError) as caught:
        load_app_folder(folder)
    assert str(caught.value).startswith("calc/app.yaml: scorer") and expected in str(caught.value)


def test_a_bad_variant_file_names_that_file(
    write_app: WriteApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_app()
    broken = {**EXPRESSION, "outputs": {"answer": "evaluate.valeu"}}
    (folder / "variants" / "expression.yaml").write_text(yaml.safe_dump(broken))
    monkeypatch.chdir(folder.parent)
    with pytest.raises(ConfigError) as caught:
        load_app_folder(folder)
    assert str(caught.value).startswith("calc/variants/expression.yaml: output 'answer'")
    assert "node 'evaluate' has no field 'valeu'" in str(caught.value)


def test_the_checked_in_schema_is_the_models_schema() -> None:
    """apps/app.schema.json is what editors validate app.yaml with: regenerate it with
    `fmtune apps schema > apps/app.schema.json` when AppFile changes."""
    checked_in = json.loads((REPO / "apps" / "app.schema.json").read_text())
    assert checked_in == app_file_schema()
    assert set(checked_in["properties"]) == set(AppFile.model_fields)
    assert checked_in["properties"]["variants"]["description"].startswith("The DAG variants")


PYTHON_APP = Application(
    name="echo",
    description="An application defined in Python, registered as an entry point.",
    inputs=("text",),
    answer=("text",),
    architectures=("one",),
    variant=lambda knobs: App(
        name="echo", inputs=("text",),
        nodes=(LlmNode(id="say", model="llm", prompt="{text}"),),
        outputs={"text": "say.text"}, format=knobs.format,
    ),
    examples=lambda size, seed: [Example({"text": "hi"}, {"text": "hi"})][:size],
    scorer=FunctionScorer(lambda prediction, reference: 1.0, "always"),
    llm_nodes=("say",),
)  # fmt: skip


def test_an_entry_point_may_name_an_application_built_in_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    point = EntryPoint("echo", f"{__name__}:PYTHON_APP", "fmtune.apps")
    monkeypatch.setattr(registry, "_registered", lambda: {"echo": point})
    registry._load_entry.cache_clear()
    try:
        assert get_application("echo") is PYTHON_APP
        assert registry.registered_folder("echo") is None
        app = get_application("echo").build(AppKnobs(nodes={"say": NodeKnobs(model="big")}))
        assert llm_node(app, "say").model == "big"
        wrong = EntryPoint("echo", "json", "fmtune.apps")  # a module without app.yaml
        monkeypatch.setattr(registry, "_registered", lambda: {"echo": wrong})
        registry._load_entry.cache_clear()
        with pytest.raises(ConfigError, match=r"entry point json must be a package whose folder"):
            get_application("echo")
    finally:
        registry._load_entry.cache_clear()
