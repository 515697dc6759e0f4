"""The four extraction architectures (app.yaml's variants), run against a backend that knows
the truth."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

import pytest

from apps.extraction.generate import ExtractionExample, generate_dataset
from apps.extraction.merge import merge_answers
from apps.extraction.score import FIELDS, score
from runtime.app.application import AppKnobs
from runtime.app.dag import App, LlmNode
from runtime.app.executor import run_request, run_requests, to_outcome
from runtime.app.formats import OutputFormat, format_instructions
from runtime.app.registry import get_application
from runtime.deployment import AppSpec
from runtime.engine.client import SamplingParams
from tests.runtime.app.test_executor import FakeBackend

MODEL_KEY = "llm"
MODELS = {MODEL_KEY: "smollm2-135m"}
EXAMPLES = generate_dataset(6, seed=11)
APPLICATION = get_application("extraction")
ARCHITECTURES = APPLICATION.architectures


def build_app(
    architecture: str, fmt: str, max_rounds: int = 2, structured_output: bool = False
) -> App:
    """The extraction app's DAG of one architecture, as app.yaml and these knobs make it."""
    knobs = AppKnobs(
        architecture=architecture, format=fmt, max_rounds=max_rounds,
        structured_output=structured_output,
    )  # fmt: skip
    return APPLICATION.build(knobs)


_CANDIDATE_FIELDS: tuple[tuple[str, ...], ...] = (
    (*FIELDS, "verdict"),
    FIELDS,
    ("name",),
    ("email",),
    ("address",),
)


def write(fmt: OutputFormat, values: dict[str, str]) -> str:
    """A well-formed answer in fmt, as the format instruction asks for it."""
    if fmt is OutputFormat.JSON:
        return json.dumps(values, ensure_ascii=False)
    if fmt is OutputFormat.YAML:
        return "\n".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in values.items())
    if fmt is OutputFormat.XML:
        body = "".join(f"<{k}>{html.escape(v, quote=False)}</{k}>" for k, v in values.items())
        return f"<answer>{body}</answer>"
    if fmt is OutputFormat.TEXT:
        return "\n".join(f"{k}: {v}" for k, v in values.items())
    return "\n".join(f'<{k.upper()}="{v}">' for k, v in values.items())


class TruthOracle:
    """Answers every prompt correctly: finds the article, the fields asked for (from the
    format instruction or the JSON schema) and writes the truth in the asked format."""

    def __init__(
        self, examples: Sequence[ExtractionExample], fmt: OutputFormat, verdicts: Sequence[str]
    ) -> None:
        self.examples = examples
        self.fmt = fmt
        self.verdicts = list(verdicts)
        self.judged = 0

    def __call__(self, prompt: str, sampling: SamplingParams) -> str:
        (example,) = [e for e in self.examples if e.article in prompt]
        if sampling.json_schema is not None:
            fmt, fields = OutputFormat.JSON, tuple(sampling.json_schema["required"])
        else:
            fmt = self.fmt
            fields = next(f for f in _CANDIDATE_FIELDS if format_instructions(fmt, f) in prompt)
        values = {name: example.truth.get(name, "") for name in fields}
        if "verdict" in fields:
            values["verdict"] = self.verdicts[min(self.judged, len(self.verdicts) - 1)]
            self.judged += 1
        return write(fmt, values)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_apps_validate_and_use_the_format(architecture: str, fmt: OutputFormat) -> None:
    app = build_app(architecture, fmt)
    app.validate_against({MODEL_KEY})
    assert app.format is fmt and app.inputs == ("article",)
    assert set(app.outputs) == set(FIELDS)
    for node in app.nodes:
        if isinstance(node, LlmNode):
            assert node.model == MODEL_KEY
            assert "{article}" in node.prompt and "{format_instructions}" in node.prompt


@pytest.mark.parametrize(
    ("architecture", "calls"), [("single", 1), ("parallel", 3), ("sequential", 3), ("judge", 3)]
)
@pytest.mark.parametrize("fmt", list(OutputFormat))
async def test_every_architecture_extracts_the_truth(
    architecture: str, calls: int, fmt: OutputFormat
) -> None:
    app = build_app(architecture, fmt)
    backend = FakeBackend(TruthOracle(EXAMPLES, fmt, ["accept"]), delay_s=0.0)
    results = await run_requests(
        app, [{"article": e.article} for e in EXAMPLES], backend, MODELS, users=3
    )
    for example, result in zip(EXAMPLES, results, strict=True):
        assert result.ok, result.error
        assert score(result.outputs, example.truth).accuracy == 1.0, result.outputs
        outcome = to_outcome(result, quality=1.0)
        assert outcome.llm_calls == calls
        assert set(outcome.format_statuses) == {"clean"}
    assert len(backend.calls) == calls * len(EXAMPLES)


async def test_sequential_prompts_see_earlier_answers() -> None:
    example = EXAMPLES[0]
    backend = FakeBackend(TruthOracle(EXAMPLES, OutputFormat.YAML, ["accept"]), delay_s=0.0)
    await run_request(
        build_app("sequential", "yaml"), {"article": example.article}, backend, MODELS
    )
    email_prompt, name_prompt, address_prompt = (prompt for _, prompt, _ in backend.calls)
    assert example.truth["email"] not in email_prompt.split("Article:")[0]
    assert f"email address is {example.truth['email']}" in name_prompt
    assert f"contact person is {example.truth['name']}" in address_prompt


async def test_parallel_sub_questions_overlap() -> None:
    backend = FakeBackend(TruthOracle(EXAMPLES, OutputFormat.TEXT, ["accept"]), delay_s=0.03)
    result = await run_request(
        build_app("parallel", "text"), {"article": EXAMPLES[1].article}, backend, MODELS
    )
    asks = [s for s in result.spans if s.node_id.startswith("ask_")]
    assert len(asks) == 3 and backend.max_in_flight == 3
    assert max(s.start_s for s in asks) < min(s.end_s for s in asks)
    (merge,) = [s for s in result.spans if s.node_id == "merge"]
    assert merge.kind == "code" and merge.start_s >= max(s.end_s for s in asks)


@pytest.mark.parametrize(
    ("rounds", "verdicts", "calls"),
    [(2, ["retry", "accept"], 6), (2, ["retry"], 6), (3, ["retry"], 9), (1, ["retry"], 3)],
)
async def test_judge_retries_until_accept_or_rounds(
    rounds: int, verdicts: list[str], calls: int
) -> None:
    example = EXAMPLES[2]
    app = build_app("judge", "xml", max_rounds=rounds)
    backend = FakeBackend(TruthOracle(EXAMPLES, OutputFormat.XML, verdicts), delay_s=0.0)
    result = await run_request(app, {"article": example.article}, backend, MODELS)
    assert result.ok
    assert to_outcome(result, None).llm_calls == calls
    assert score(result.outputs, example.truth).accuracy == 1.0
    judge_prompt = backend.calls[2][1]
    assert f"Answer A: name: {example.truth['name']}" in judge_prompt


async def test_structured_output_constrains_every_call_to_a_json_schema() -> None:
    example = EXAMPLES[3]
    app = build_app("parallel", "json", structured_output=True)
    backend = FakeBackend(TruthOracle(EXAMPLES, OutputFormat.JSON, ["accept"]), delay_s=0.0)
    result = await run_request(app, {"article": example.article}, backend, MODELS)
    assert score(result.outputs, example.truth).accuracy == 1.0
    for _, prompt, sampling in backend.calls:
        assert sampling.json_schema is not None and len(sampling.json_schema["required"]) == 1
        assert "Answer with a single JSON object" in prompt


def test_critical_paths() -> None:
    paths = {arch: build_app(arch, "json").critical_path() for arch in ARCHITECTURES}
    assert paths == {
        "single": ["extract"],
        "parallel": ["ask_name", "merge"],
        "sequential": ["ask_email", "ask_name", "ask_address"],
        "judge": ["agent_a", "judge"],
    }


def test_judge_app_declares_its_loop() -> None:
    app: App = build_app("judge", "json", max_rounds=4)
    (loop,) = app.loops
    assert loop.max_rounds == 4 and loop.until == "judge.verdict == 'accept'"
    temperatures = {n.id: n.sampling.temperature for n in app.nodes if isinstance(n, LlmNode)}
    assert temperatures["agent_a"] != temperatures["agent_b"]


def test_unknown_choices_are_refused() -> None:
    with pytest.raises(ValueError, match=r"architecture must be one of .* got 'swarm'"):
        AppSpec(source="extraction", architecture="swarm")
    with pytest.raises(ValueError, match="max_rounds"):
        AppSpec(source="extraction", architecture="judge", max_rounds=0)
    with pytest.raises(ValueError, match="format"):
        AppSpec(source="extraction", format="csv")


def test_the_variants_keep_the_prompts_of_the_four_architectures() -> None:
    """Quality numbers stay comparable with runs before app.yaml: the same system message,
    questions, token limits and temperatures."""
    system = (
        "You are a careful assistant. You copy contact details exactly as they are written in "
        "a news article, and you never invent anything."
    )
    limits = {
        node.id: (node.sampling.max_tokens, node.sampling.temperature)
        for architecture in ARCHITECTURES
        for node in build_app(architecture, "json").nodes
        if isinstance(node, LlmNode) and node.system == system
    }
    assert limits == {
        "extract": (192, 0.0), "ask_name": (96, 0.0), "ask_email": (96, 0.0),
        "ask_address": (96, 0.0), "agent_a": (192, 0.2), "agent_b": (192, 0.8),
        "judge": (224, 0.0),
    }  # fmt: skip
    sequential = build_app("sequential", "json").node_map["ask_name"]
    assert isinstance(sequential, LlmNode)
    assert "The contact person's email address is {ask_email.email}." in sequential.prompt


def test_the_dataset_is_the_seeded_generators() -> None:
    examples = APPLICATION.examples(40, 0)
    assert [e.inputs["article"] for e in examples] == [
        e.article for e in generate_dataset(40, seed=0)
    ]
    assert [e.reference for e in examples[:5]] == [e.truth for e in generate_dataset(5, seed=0)]


def test_merge_answers_trims_and_fills_missing() -> None:
    merged = merge_answers({"name": " Ann Lee ", "email": "", "extra": "x"})
    assert merged == {"name": "Ann Lee", "email": None, "address": None}


def test_an_app_spec_builds_the_app_with_its_knobs() -> None:
    spec = AppSpec(
        source="extraction", architecture="judge", format="json", max_rounds=3,
        structured_output=True,
    )  # fmt: skip
    app = spec.build()
    assert app == build_app("judge", "json", max_rounds=3, structured_output=True)
    assert [loop.max_rounds for loop in app.loops] == [3]
    assert all(n.structured_output for n in app.nodes if isinstance(n, LlmNode))
