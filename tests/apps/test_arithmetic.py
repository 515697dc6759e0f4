"""The arithmetic app: its safe evaluator, its seeded dataset, and its three variants run
through the executor against a fake backend."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from apps.arithmetic.calc import ExpressionError, evaluate, evaluate_expression, find_expression
from apps.arithmetic.generate import DEFAULT_ROWS, generate
from runtime.app.application import AppKnobs
from runtime.app.executor import run_request
from runtime.app.registry import get_application
from runtime.engine.client import CallRecord, SamplingParams

FOLDER = Path(__file__).resolve().parents[2] / "apps" / "arithmetic"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 / 2 * 2", 7),
        ("10 - 4 - 3", 3),
        ("-3 + +4", 1),
        ("2 * -(3 - 5)", 4),
        ("0.5 * 8", 4),
        ("1 / 3", Fraction(1, 3)),
    ],
)
def test_evaluate_expression_is_exact_arithmetic(text: str, value: Fraction | int) -> None:
    assert evaluate_expression(text) == value


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("__import__('os').system('true')", "unexpected character '_'"),
        ("2 ** 3", "unexpected '*'"),
        ("(1 + 2", "ends too early"),
        ("1 + 2)", "unexpected ')' after the expression"),
        ("4 / (2 - 2)", "division by zero"),
        ("2 3", "unexpected '3' after the expression"),
        ("(" * 30 + "1" + ")" * 30, "nested deeper than 20"),
        ("1 + " * 60 + "1", "longer than 200 characters"),
        ("", "no expression"),
    ],
)
def test_anything_but_arithmetic_is_refused(text: str, reason: str) -> None:
    with pytest.raises(ExpressionError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        evaluate_expression(text)


@pytest.mark.parametrize(
    ("reply", "expression"),
    [
        ("Expression: (12 + 7) - 5 = 14", "(12 + 7) - 5"),
        ("```\n3 x 6\n```", "3 * 6"),
        ("The expression is 1,200 / 4.", "1200 / 4"),
        ("= 5 + 5", "5 + 5"),
    ],
)
def test_the_expression_is_found_in_a_reply(reply: str, expression: str) -> None:
    assert find_expression(reply) == expression


def test_the_code_node_answers_or_says_why_not() -> None:
    assert evaluate({"expression": "6 * 7"}) == {"answer": 42, "error": None}
    assert evaluate({"expression": "7 / 2"}) == {"answer": 3.5, "error": None}
    assert evaluate({"expression": "no idea"}) == {
        "answer": None,
        "error": "no arithmetic in the reply",
    }
    assert evaluate({}) == {"answer": None, "error": "no arithmetic in the reply"}


def test_the_dataset_is_the_seeded_generators_and_every_answer_is_exact() -> None:
    rows = generate(DEFAULT_ROWS, 0)
    assert rows == generate(DEFAULT_ROWS, 0) and rows != generate(DEFAULT_ROWS, 1)
    shipped = [json.loads(line) for line in (FOLDER / "data.jsonl").read_text().splitlines()]
    assert shipped == rows  # regenerate with: python apps/arithmetic/generate.py
    for row in rows:
        assert evaluate({"expression": row["expression"]})["answer"] == row["answer"]
        assert isinstance(row["answer"], int) and row["answer"] >= 0
    assert {row["steps"] for row in rows} == {1, 2, 3}
    assert len({row["question"] for row in rows}) == len(rows)


class Backend:
    """Answers every chat call with the reply for its variant's node."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.prompts: list[str] = []

    async def chat(
        self, model: str, messages: list[dict[str, str]], sampling: SamplingParams
    ) -> CallRecord:
        self.prompts.append(messages[-1]["content"])
        return CallRecord(
            start_s=0.0, ttft_s=0.01, itl_s=(), e2e_s=0.02, prompt_tokens=10,
            completion_tokens=3, finish_reason="stop", text=self.reply,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("architecture", "reply", "quality"),
    [
        ("direct", '{{"answer": "{answer}"}}', 1.0),
        ("direct", '{{"answer": "{wrong}"}}', 0.0),
        ("step_by_step", "First, {expression} = {answer}.\nAnswer: {answer}", 1.0),
        ("expression", "{expression}", 1.0),
        ("expression", "{expression} + 1", 0.0),
    ],
)
async def test_each_variant_answers_the_first_problem(
    architecture: str, reply: str, quality: float
) -> None:
    application = get_application("arithmetic")
    example = application.examples(1, 0)[0]
    reference = example.reference
    text = reply.format(wrong=reference["answer"] + 1, **reference)
    app = application.build(AppKnobs(architecture=architecture, few_shot=True))
    backend = Backend(text)
    result = await run_request(app, example.inputs, backend, {"llm": "served"})
    assert result.ok, result.error
    assert await application.scorer.score(result.outputs, example) == quality
    assert backend.prompts[0].count("Expression: ") == 3  # the few-shot examples
    assert example.inputs["question"] in backend.prompts[0]


def test_the_app_declares_three_variants_two_prompts_and_few_shot() -> None:
    application = get_application("arithmetic")
    assert application.architectures == ("direct", "step_by_step", "expression")
    assert application.prompts == ("plain", "teacher") and application.few_shot
    assert len(application.examples(1000, 0)) == DEFAULT_ROWS // 2
    assert application.folder == FOLDER
