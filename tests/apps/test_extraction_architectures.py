"""Tests of the four extraction architectures, run against a backend that knows the truth."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

import pytest

from apps.extraction.architectures import ARCHITECTURES, MODEL_KEY, build_app, merge_answers
from apps.extraction.task import FIELDS, ExtractionExample, generate_dataset, score
from runtime.app.dag import App, LlmNode
from runtime.app.executor import run_request, run_requests, to_outcome
from runtime.app.formats import OutputFormat, format_instructions
from runtime.deployment import AppSpec
from runtime.engine.client import SamplingParams
from tests.runtime.app.test_executor import FakeBackend

MODELS = {MODEL_KEY: "smollm2-135m"}
EXAMPLES = generate_dataset(6, seed=11)
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
    app = build_app("judge", "xml", judge_rounds=rounds)
    backend = FakeBackend(TruthOracle(EXAMPLES, OutputFormat.XML, verdicts), delay_s=0.0)
    result = await run_request(app, {"article": example.article}, backend, MODELS)
    assert result.ok
    assert to_outcome(result, None).llm_calls == calls
    assert score(result.outputs, example.truth).accuracy == 1.0
    judge_prompt = backend.calls[2][1]
    assert f"Answer A: name: {example.truth['name']}" in judge_prompt


async def test_structured_output_asks_for_json_whatever_the_format() -> None:
    example = EXAMPLES[3]
    app = build_app("parallel", "tag", structured_output=True)
    backend = FakeBackend(TruthOracle(EXAMPLES, OutputFormat.TAG, ["accept"]), delay_s=0.0)
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
    app: App = build_app("judge", "json", judge_rounds=4)
    (loop,) = app.loops
    assert loop.max_rounds == 4 and loop.until == "judge.verdict == 'accept'"
    temperatures = {n.id: n.sampling.temperature for n in app.nodes if isinstance(n, LlmNode)}
    assert temperatures["agent_a"] != temperatures["agent_b"]


def test_build_app_rejects_unknown_choices() -> None:
    with pytest.raises(ValueError, match="architecture must be one of"):
        build_app("swarm", "json")
    with pytest.raises(ValueError, match="judge_rounds must be >= 1, got 0"):
        build_app("judge", "json", judge_rounds=0)
    with pytest.raises(ValueError, match="'csv' is not a valid OutputFormat"):
        build_app("single", "csv")


def test_merge_answers_trims_and_fills_missing() -> None:
    merged = merge_answers({"name": " Ann Lee ", "email": "", "extra": "x"})
    assert merged == {"name": "Ann Lee", "email": None, "address": None}


def test_an_app_spec_builds_the_app_with_its_knobs() -> None:
    spec = AppSpec(
        source="extraction", architecture="judge", format="json", max_rounds=3,
        structured_output=True,
    )  # fmt: skip
    app = spec.build()
    assert app == build_app("judge", "json", judge_rounds=3, structured_output=True)
    assert [loop.max_rounds for loop in app.loops] == [3]
    assert all(n.structured_output for n in app.nodes if isinstance(n, LlmNode))
