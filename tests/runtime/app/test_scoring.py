"""Scorers: the built-in comparisons, per-field means, Python files and the LLM judge."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from runtime.app.datasets import Example
from runtime.app.scoring import (
    Judge,
    Score,
    ScorerSpec,
    build_scorer,
    contains,
    exact,
    json_valid,
    normalize_text,
    normalized_exact,
    numeric,
    parse_number,
    regex_match,
    score_all,
    token_f1,
)
from runtime.engine.client import CallFailure, CallRecord, SamplingParams
from runtime.errors import ConfigError

SPEC = TypeAdapter(ScorerSpec)


def scorer(data: dict[str, Any], base_dir: Path = Path("."), **app: Any) -> Any:
    shape = {"answer_fields": ["answer"], "reference_columns": ["answer"], "inputs": ["question"]}
    return build_scorer(SPEC.validate_python(data), base_dir=base_dir, **(shape | app))


def example(answer: Any = "42", **more: Any) -> Example:
    return Example({"question": "six times seven?"}, {"answer": answer, **more}, row=1)


# ---- the comparisons -----------------------------------------------------------------------


def test_exact_and_normalized_differ_on_case_space_and_edge_punctuation() -> None:
    assert exact(" Paris ", "Paris") == 1.0
    assert exact("paris.", "Paris") == 0.0
    assert normalize_text("  The  ANSWER: Paris. ") == "the answer: paris"
    assert normalized_exact("paris.", "Paris") == 1.0
    assert normalized_exact("Lyon", "Paris") == 0.0
    assert exact(None, "") == 0.0 and normalized_exact(None, "x") == 0.0


def test_contains_and_token_f1() -> None:
    assert contains("It is Paris, France.", "paris") == 1.0
    assert contains("Lyon", "Paris") == 0.0
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("the cat", "the cat sat down") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1(None, "cat") == 0.0


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("42", 42.0),
        ("So 3 + 4 = 7 apples.", 7.0),
        ("The total is 1,250.", 1250.0),
        ("-3.5", -3.5),
        ("answer: .5", 0.5),
        (12, 12.0),
        ("no digits", None),
        (None, None),
        (True, None),
    ],
)
def test_parse_number_takes_the_last_number(text: Any, number: float | None) -> None:
    assert parse_number(text) == number


def test_numeric_tolerances() -> None:
    assert numeric("The answer is 7.", 7) == 1.0
    assert numeric("7.001", 7, tolerance=0.01) == 1.0
    assert numeric("7.1", 7, tolerance=0.01) == 0.0
    assert numeric("105", 100, tolerance=0, relative_tolerance=0.05) == 1.0
    assert numeric("seven", 7) == 0.0
    with pytest.raises(ValueError, match="reference 'n/a' is not a number"):
        numeric("7", "n/a")


def test_regex_and_json_valid() -> None:
    assert regex_match("call 555-1234 now", r"\d{3}-\d{4}") == 1.0
    assert regex_match("call 555-1234 now", r"\d{3}-\d{4}", full_match=True) == 0.0
    assert json_valid('{"a": 1}') == 1.0 and json_valid({"a": 1}) == 1.0
    assert json_valid("{a: 1}") == 0.0 and json_valid(None) == 0.0


# ---- scorers built from specs --------------------------------------------------------------


async def test_builtins_read_the_answer_field_and_reference_column() -> None:
    numeric_scorer = scorer({"kind": "numeric", "tolerance": 0.5})
    assert await numeric_scorer.score({"answer": "about 42.3"}, example(42)) == 1.0
    named = scorer(
        {"kind": "normalized", "field": "city", "reference": "capital"},
        answer_fields=["city", "country"],
        reference_columns=["capital"],
    )
    assert await named.score({"city": "PARIS."}, example(capital="Paris")) == 1.0
    pattern = scorer({"kind": "regex"})  # the reference column holds each row's pattern
    assert await pattern.score({"answer": "x42y"}, example(r"4\d")) == 1.0


async def test_fields_is_the_mean_of_one_builtin_per_field() -> None:
    fields = scorer(
        {"kind": "fields", "fields": {"name": "normalized", "email": {"kind": "exact"}}},
        answer_fields=["name", "email"],
        reference_columns=["name", "email"],
    )
    reference = Example({"question": "q"}, {"name": "Ada Lovelace", "email": "ada@x.org"})
    assert await fields.score({"name": "ada lovelace.", "email": "ADA@x.org"}, reference) == 0.5
    assert await fields.score({"name": "Ada Lovelace", "email": "ada@x.org"}, reference) == 1.0


async def test_a_python_scorer_is_loaded_from_the_app_folder(tmp_path: Path) -> None:
    (tmp_path / "score.py").write_text(
        "def close(prediction, reference):\n"
        "    return 1.0 if prediction['answer'] == str(reference['answer']) else 0.25\n"
    )
    python = scorer({"kind": "python", "function": "score.py:close"}, base_dir=tmp_path)
    assert await python.score({"answer": "42"}, example(42)) == 1.0
    assert await python.score({"answer": "41"}, example(42)) == 0.25


@pytest.mark.parametrize(
    ("data", "app", "expected"),
    [
        ({"kind": "exact", "field": "answr"}, {}, "scorer.field: unknown answer field 'answr' "
         "(did you mean 'answer'?)"),
        ({"kind": "exact"}, {"answer_fields": ["a", "b"]}, "scorer.field: required with several "
         "answer fields (a, b)"),
        ({"kind": "numeric", "reference": "solution"}, {}, "scorer.reference: unknown reference "
         "column 'solution'"),
        ({"kind": "fields", "fields": {"answer": "exact", "nme": "exact"}}, {},
         "scorer.fields.nme.field: unknown answer field 'nme'"),
        ({"kind": "python", "function": "missing.py:score"}, {}, "scorer.function: no file "
         "'missing.py'"),
        ({"kind": "python", "function": "score.py:scor"}, {}, "scorer.function: callable "),
        ({"kind": "llm_judge", "model": "judge", "prompt": "Rate {prediction.answr}"}, {},
         "scorer.prompt: '{prediction.answr}': unknown answer field 'answr'"),
        ({"kind": "llm_judge", "model": "judge", "prompt": "Rate {questoin}"}, {},
         "scorer.prompt: unknown input 'questoin' (did you mean 'question'?)"),
    ],
)  # fmt: skip
def test_a_bad_spec_names_the_field_and_the_value(
    tmp_path: Path, data: dict[str, Any], app: dict[str, Any], expected: str
) -> None:
    (tmp_path / "score.py").write_text("def score(prediction, reference):\n    return 1.0\n")
    with pytest.raises(ConfigError) as caught:
        scorer(data, base_dir=tmp_path, **app)
    assert str(caught.value).startswith(expected)
    assert "\n" not in str(caught.value)


def test_an_unknown_kind_is_refused_by_the_schema() -> None:
    with pytest.raises(ValidationError, match="exact"):
        SPEC.validate_python({"kind": "fuzzy"})
    with pytest.raises(ValidationError, match="pattern"):
        SPEC.validate_python({"kind": "python", "function": "score:fn"})


async def test_scorer_failures_are_counted_never_raised(tmp_path: Path) -> None:
    (tmp_path / "score.py").write_text(
        "def odd(prediction, reference):\n"
        "    if prediction['answer'] == 'boom':\n"
        "        raise RuntimeError('boom')\n"
        "    return {'2': 2.0, 'nan': float('nan'), 'text': 'high'}.get(prediction['answer'], 1)\n"
    )
    python = scorer({"kind": "python", "function": "score.py:odd"}, base_dir=tmp_path)
    answers = [{"answer": a} for a in ("ok", "boom", "2", "nan", "text")] + [None]
    scores = await score_all(python, answers, [example()] * 6)
    assert scores[0] == Score(1.0)
    assert scores[1] == Score(None, "RuntimeError: boom")
    assert scores[2] == Score(None, "scorer returned 2.0, outside [0, 1]")
    assert scores[3].error == "scorer returned nan, outside [0, 1]"
    assert scores[4].error == "scorer returned 'high' (str), not a number"
    assert scores[5] == Score(None)  # a failed request has no answer to score: no error


class JudgeBackend:
    """A ChatBackend double that replies with fixed text and keeps the calls."""

    def __init__(self, reply: str, error: str | None = None) -> None:
        self.reply = reply
        self.error = error
        self.calls: list[tuple[str, list[dict[str, str]], SamplingParams]] = []

    async def chat(
        self, model: str, messages: list[dict[str, str]], sampling: SamplingParams
    ) -> CallRecord:
        self.calls.append((model, messages, sampling))
        failure = CallFailure.UPSTREAM_ERROR if self.error else None
        return CallRecord(
            start_s=time.monotonic(), ttft_s=0.01, itl_s=(), e2e_s=0.02, prompt_tokens=5,
            completion_tokens=2, finish_reason="stop", text=self.reply, error=self.error,
            failure=failure,
        )  # fmt: skip


async def test_the_llm_judge_calls_its_model_key_through_the_backend() -> None:
    judge = scorer(
        {
            "kind": "llm_judge",
            "model": "judge",
            "system": "You grade answers.",
            "prompt": "Q: {question}\nA: {prediction.answer}\nRef: {reference.answer}\nScore 0-10:",
        }
    )
    assert judge.model_keys == ("judge",)
    backend = JudgeBackend("Score: 8/10")
    access = Judge(backend, {"judge": "served-judge"})
    assert await judge.score({"answer": "41"}, example(42), access) == pytest.approx(0.8)
    model, messages, sampling = backend.calls[0]
    assert model == "served-judge" and sampling.temperature == 0.0
    assert messages[0] == {"role": "system", "content": "You grade answers."}
    assert messages[1]["content"] == "Q: six times seven?\nA: 41\nRef: 42\nScore 0-10:"

    failing = await score_all(judge, [{"answer": "41"}], [example()], Judge(JudgeBackend(""), {}))
    assert failing[0].error is not None and "not served" in failing[0].error
    no_number = await score_all(
        judge, [{"answer": "41"}], [example()], Judge(JudgeBackend("great!"), {"judge": "j"})
    )
    assert no_number[0].error == "judge reply has no score: 'great!'"
    broken = JudgeBackend("", error="HTTP 500")
    down = await score_all(judge, [{"answer": "41"}], [example()], Judge(broken, {"judge": "j"}))
    assert down[0].error == "judge call failed: HTTP 500"
    too_high = await score_all(
        judge, [{"answer": "4"}], [example()], Judge(JudgeBackend("11"), {"judge": "j"})
    )
    assert too_high[0].error == "scorer returned 1.1, outside [0, 1]"


def test_score_errors_are_counted_by_the_run_metrics_and_score_0() -> None:
    from runtime.app.executor import RequestResult, to_outcome
    from runtime.metrics import CostModel, summarize

    results = [
        RequestResult(request_id=i, outputs={"answer": "1"}, spans=(), start_s=0.0, end_s=1.0,
                      ok=True)
        for i in range(3)
    ]  # fmt: skip
    outcomes = [
        to_outcome(results[0], 1.0),
        to_outcome(results[1], None, "RuntimeError: boom"),
        to_outcome(results[2], 0.5),
    ]
    assert outcomes[1].score_error == "RuntimeError: boom" and outcomes[1].quality is None
    metrics = summarize(
        outcomes, wall_s=1.0, sla_e2e_s=5.0, replica_seconds={}, prices=CostModel(),
        peak_memory_gib=None,
    )  # fmt: skip
    assert metrics.score_errors == 1 and metrics.quality == pytest.approx(0.5)
