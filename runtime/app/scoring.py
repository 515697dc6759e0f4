"""Scorers: how good one answer of an application is, as a number in [0, 1].

An app.yaml's `scorer:` is one of

- a built-in comparing one answer field with one reference column: `exact` (the same text,
  surrounding whitespace aside), `normalized` (the same after Unicode normalization, case
  folding, single spaces and no punctuation at the ends), `contains` (the normalized
  reference inside the normalized answer), `token_f1` (F1 of the normalized words),
  `numeric` (the answer's last number within a tolerance of the reference), `regex` (the
  answer matches a pattern) or `json_valid` (the answer parses as JSON);
- `fields`: the mean of one built-in per answer field, for structured answers;
- `python`: a function `(prediction: dict, reference: dict) -> float` in a file of the app
  folder, named `file.py:function`;
- `llm_judge`: a model key of the deployment reads a prompt (the answer, the reference and the
  request inputs filled in) and replies with a score; its call goes through the same
  ChatBackend as the app's own calls (the run's router).

The comparisons are pure functions of their arguments. A scorer that raises, or returns
something that is not a number in [0, 1], makes that request's score an error (`Score.error`)
that the run counts; it never stops a run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runtime.app.dag import Ref, render, resolve_callable, template_refs
from runtime.app.datasets import Example
from runtime.engine.client import ChatBackend, SamplingParams
from runtime.errors import ConfigError, unknown_name_message

logger = logging.getLogger(__name__)

_EDGE_PUNCTUATION = " \t\n.,;:!?\"'`()[]{}<>“”‘’«»"
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
#: What a judge's prompt may read besides the request inputs: `{prediction.F}`, `{reference.C}`.
PREDICTION, REFERENCE = "prediction", "reference"


# --------------------------------------------------------------------------------------------
# Comparisons (pure)
# --------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """A value as the text compared: None is empty, anything else its str()."""
    return "" if value is None else str(value)


def normalize_text(value: Any) -> str:
    """The form `normalized` compares: NFKC, case folded, single spaces, no punctuation at the
    ends ('  The Answer: 42. ' -> 'the answer: 42')."""
    text = unicodedata.normalize("NFKC", _text(value)).casefold()
    return re.sub(r"\s+", " ", text).strip(_EDGE_PUNCTUATION)


def exact(prediction: Any, reference: Any) -> float:
    """1.0 when the texts are the same, surrounding whitespace aside; a missing answer is 0."""
    if prediction is None:
        return 0.0
    return float(_text(prediction).strip() == _text(reference).strip())


def normalized_exact(prediction: Any, reference: Any) -> float:
    """1.0 when the normalized texts are the same (see normalize_text)."""
    if prediction is None:
        return 0.0
    return float(normalize_text(prediction) == normalize_text(reference))


def contains(prediction: Any, reference: Any) -> float:
    """1.0 when the normalized reference occurs in the normalized answer."""
    if prediction is None:
        return 0.0
    return float(normalize_text(reference) in normalize_text(prediction))


def _tokens(value: Any) -> list[str]:
    return [word.strip(_EDGE_PUNCTUATION) for word in normalize_text(value).split()]


def token_f1(prediction: Any, reference: Any) -> float:
    """F1 of the answer's words against the reference's (normalized words, with repeats, as
    in SQuAD); two empty texts agree fully, one empty text scores 0."""
    predicted = [word for word in _tokens(prediction) if word]
    expected = [word for word in _tokens(reference) if word]
    if not predicted or not expected:
        return float(predicted == expected)
    remaining = list(expected)
    common = 0
    for word in predicted:
        if word in remaining:
            remaining.remove(word)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def parse_number(value: Any) -> float | None:
    """The number an answer gives: the value itself for numbers, else the last number written
    in the text ('so 3 + 4 = 7 apples' -> 7.0; thousands commas allowed); None if there is none.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    found = _NUMBER.findall(_text(value))
    if not found:
        return None
    try:
        number = float(found[-1].replace(",", ""))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def numeric(
    prediction: Any, reference: Any, tolerance: float = 1e-6, relative_tolerance: float = 0.0
) -> float:
    """1.0 when the answer's number is within tolerance + relative_tolerance * |reference| of
    the reference's; 0 when the answer has no number. A reference without a number is an
    error (the dataset is wrong, not the answer)."""
    expected = parse_number(reference)
    if expected is None:
        raise ValueError(f"reference {reference!r} is not a number")
    predicted = parse_number(prediction)
    if predicted is None:
        return 0.0
    return float(abs(predicted - expected) <= tolerance + relative_tolerance * abs(expected))


def regex_match(prediction: Any, pattern: str, full_match: bool = False) -> float:
    """1.0 when the answer matches the pattern (anywhere, or as a whole with full_match)."""
    if prediction is None:
        return 0.0
    text = _text(prediction).strip()
    found = re.fullmatch(pattern, text) if full_match else re.search(pattern, text)
    return float(found is not None)


def json_valid(prediction: Any) -> float:
    """1.0 when the answer is JSON (a parsed dict or list, or text that parses)."""
    if isinstance(prediction, dict | list):
        return 1.0
    if prediction is None:
        return 0.0
    try:
        json.loads(_text(prediction))
    except ValueError:
        return 0.0
    return 1.0


def check_score(value: Any) -> float:
    """A scorer's return value as a float in [0, 1]; ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"scorer returned {value!r} ({type(value).__name__}), not a number")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"scorer returned {value!r}, outside [0, 1]")
    return float(value)


# --------------------------------------------------------------------------------------------
# Scorer specs (the `scorer:` section of app.yaml)
# --------------------------------------------------------------------------------------------


class _FieldSpec(BaseModel):
    """A built-in that compares one answer field with one reference column."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: str | None = Field(
        default=None,
        description="The answer field scored; default: the app's only answer field (required "
        "when it has several).",
    )
    reference: str | None = Field(
        default=None,
        description="The reference column compared with; default: the column named like the field.",
    )


class ExactSpec(_FieldSpec):
    """The same text, surrounding whitespace aside."""

    kind: Literal["exact"] = Field(description="Scorer kind.")


class NormalizedSpec(_FieldSpec):
    """The same text after normalization (case, spaces, punctuation at the ends)."""

    kind: Literal["normalized"] = Field(description="Scorer kind.")


class ContainsSpec(_FieldSpec):
    """The normalized reference occurs in the normalized answer."""

    kind: Literal["contains"] = Field(description="Scorer kind.")


class TokenF1Spec(_FieldSpec):
    """F1 of the normalized words of answer and reference."""

    kind: Literal["token_f1"] = Field(description="Scorer kind.")


class NumericSpec(_FieldSpec):
    """The answer's (last) number within a tolerance of the reference's."""

    kind: Literal["numeric"] = Field(description="Scorer kind.")
    tolerance: float = Field(default=1e-6, ge=0, description="Absolute tolerance.")
    relative_tolerance: float = Field(
        default=0.0, ge=0, description="Tolerance as a share of |reference|, added to it."
    )


class RegexSpec(_FieldSpec):
    """The answer matches a regular expression."""

    kind: Literal["regex"] = Field(description="Scorer kind.")
    pattern: str | None = Field(
        default=None,
        description="The pattern (Python syntax); none: the reference column holds each row's "
        "pattern.",
    )
    full_match: bool = Field(
        default=False, description="Match the whole answer rather than any part of it."
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(
                    f"pattern {pattern!r} is not a regular expression ({error})"
                ) from None
        return pattern


class JsonValidSpec(_FieldSpec):
    """The answer parses as JSON (no reference needed)."""

    kind: Literal["json_valid"] = Field(description="Scorer kind.")


BuiltinSpec = Annotated[
    ExactSpec
    | NormalizedSpec
    | ContainsSpec
    | TokenF1Spec
    | NumericSpec
    | RegexSpec
    | JsonValidSpec,
    Field(discriminator="kind"),
]
"""A built-in comparison of one field."""

BUILTIN_KINDS = ("exact", "normalized", "contains", "token_f1", "numeric", "regex", "json_valid")


class FieldsSpec(BaseModel):
    """The mean over answer fields of one built-in each: for structured answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["fields"] = Field(description="Scorer kind.")
    fields: dict[str, BuiltinSpec] = Field(
        min_length=1,
        description="Answer field -> its built-in (a kind name such as 'normalized', or a "
        "mapping with its options); each compares with the reference column of the same name "
        "unless it names another.",
    )

    @field_validator("fields", mode="before")
    @classmethod
    def _kind_names(cls, fields: Any) -> Any:
        """`name: normalized` is short for `name: {kind: normalized}`."""
        if isinstance(fields, Mapping):
            return {
                name: {"kind": spec} if isinstance(spec, str) else spec
                for name, spec in fields.items()
            }
        return fields


class PythonSpec(BaseModel):
    """A Python function in the app folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["python"] = Field(description="Scorer kind.")
    function: str = Field(
        pattern=r"^[^:]+\.py:[A-Za-z_][A-Za-z0-9_]*$",
        description="'file.py:function', the file relative to the app folder; called as "
        "function(prediction: dict, reference: dict) -> float in [0, 1].",
    )


class JudgeSpec(BaseModel):
    """An LLM of the deployment judges each answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["llm_judge"] = Field(description="Scorer kind.")
    model: str = Field(
        min_length=1, description="The deployment's model key that serves the judge."
    )
    prompt: str = Field(
        min_length=1,
        description="User message template: {prediction.<answer field>}, {reference.<column>} "
        "and the request inputs ({question}); it must ask for a score from 0 to `scale`.",
    )
    system: str | None = Field(default=None, description="System message template, if any.")
    scale: float = Field(
        default=10.0,
        gt=0,
        description="The top of the judge's scale: its score / scale is the quality.",
    )
    max_tokens: int = Field(default=16, ge=1, le=4096, description="Most tokens of the reply.")


ScorerSpec = Annotated[
    ExactSpec
    | NormalizedSpec
    | ContainsSpec
    | TokenF1Spec
    | NumericSpec
    | RegexSpec
    | JsonValidSpec
    | FieldsSpec
    | PythonSpec
    | JudgeSpec,
    Field(discriminator="kind"),
]
"""The `scorer:` section of app.yaml: one of the kinds above, by `kind`."""


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judge:
    """How an LLM-judge scorer reaches its model: the run's backend and its model names."""

    backend: ChatBackend
    models: Mapping[str, str]
    """Model key -> the name the backend serves it under (the router: the key itself)."""


@dataclass(frozen=True)
class Score:
    """One request's score: a value in [0, 1], or why the scorer could not give one."""

    value: float | None
    error: str | None = None


class Scorer(ABC):
    """Scores one answer of an app against its example."""

    description: str = ""

    @property
    def model_keys(self) -> tuple[str, ...]:
        """The deployment model keys the scorer calls (an LLM judge's); none for the others."""
        return ()

    @abstractmethod
    def compare(self, prediction: Mapping[str, Any], example: Example) -> float:
        """The answer's quality, computed here without any model call; raises when it cannot
        be scored (and for scorers that need a model)."""

    async def score(
        self, prediction: Mapping[str, Any], example: Example, judge: Judge | None = None
    ) -> float:
        """The answer's quality in [0, 1]; raises when it cannot be scored. Scorers that call
        no model compare here; an LLM judge calls its model through `judge`."""
        return self.compare(prediction, example)


def _reference_value(example: Example, column: str) -> Any:
    reference = example.reference
    if not isinstance(reference, Mapping):
        raise ValueError(f"reference must be a dict of columns, got {type(reference).__name__}")
    if column not in reference:
        raise ValueError(f"reference has no column '{column}' (columns: {sorted(reference)})")
    return reference[column]


class FieldScorer(Scorer):
    """A built-in comparison of one answer field with one reference column."""

    def __init__(self, spec: _FieldSpec, field: str, column: str) -> None:
        self.spec = spec
        self.field = field
        self.column = column
        self.description = f"{getattr(spec, 'kind', '')} on '{field}'"

    def compare(self, prediction: Mapping[str, Any], example: Example) -> float:
        """The comparison itself (sync: built-ins call no model)."""
        predicted = prediction.get(self.field)
        spec = self.spec
        if isinstance(spec, JsonValidSpec):
            return json_valid(predicted)
        if isinstance(spec, RegexSpec) and spec.pattern is not None:
            return regex_match(predicted, spec.pattern, spec.full_match)
        expected = _reference_value(example, self.column)
        if isinstance(spec, ExactSpec):
            return exact(predicted, expected)
        if isinstance(spec, NormalizedSpec):
            return normalized_exact(predicted, expected)
        if isinstance(spec, ContainsSpec):
            return contains(predicted, expected)
        if isinstance(spec, TokenF1Spec):
            return token_f1(predicted, expected)
        if isinstance(spec, NumericSpec):
            return numeric(predicted, expected, spec.tolerance, spec.relative_tolerance)
        if isinstance(spec, RegexSpec):
            return regex_match(predicted, _text(expected), spec.full_match)
        raise TypeError(f"not a built-in scorer spec: {type(spec).__name__}")


class MeanScorer(Scorer):
    """The mean of several field scorers."""

    def __init__(self, parts: Sequence[FieldScorer]) -> None:
        self.parts = tuple(parts)
        self.description = "mean of " + ", ".join(part.description for part in parts)

    def compare(self, prediction: Mapping[str, Any], example: Example) -> float:
        """Each part's comparison, averaged."""
        values = [part.compare(prediction, example) for part in self.parts]
        return sum(values) / len(values)


class FunctionScorer(Scorer):
    """A Python function `(prediction: dict, reference: dict) -> float`."""

    def __init__(self, function: Callable[[Mapping[str, Any], Any], Any], name: str) -> None:
        self.function = function
        self.description = name

    def compare(self, prediction: Mapping[str, Any], example: Example) -> float:
        """The function's value, checked to be a number in [0, 1]."""
        return check_score(self.function(dict(prediction), example.reference))


class JudgeScorer(Scorer):
    """An LLM of the deployment reads the answer and the reference and gives a score."""

    def __init__(self, spec: JudgeSpec) -> None:
        self.spec = spec
        self.description = f"llm_judge on model '{spec.model}'"

    @property
    def model_keys(self) -> tuple[str, ...]:
        """The judge's model key."""
        return (self.spec.model,)

    def messages(self, prediction: Mapping[str, Any], example: Example) -> list[dict[str, str]]:
        """The judge's chat messages for one answer."""

        def lookup(ref: Ref) -> Any:
            if ref.node == PREDICTION:
                return prediction.get(ref.field)
            if ref.node == REFERENCE:
                return _reference_value(example, ref.field)
            return example.inputs.get(ref.field)

        messages = []
        if self.spec.system:
            messages.append({"role": "system", "content": render(self.spec.system, lookup)})
        messages.append({"role": "user", "content": render(self.spec.prompt, lookup)})
        return messages

    def compare(self, prediction: Mapping[str, Any], example: Example) -> float:
        """A judge cannot score without its model: use `score`."""
        raise TypeError("an llm_judge scorer calls its model: use score() with the run's backend")

    async def score(
        self, prediction: Mapping[str, Any], example: Example, judge: Judge | None = None
    ) -> float:
        """The judge's first number over its scale; raises when it fails or gives none."""
        if judge is None:
            raise ValueError("an llm_judge scorer needs the run's backend")
        model = judge.models.get(self.spec.model)
        if model is None:
            raise ValueError(f"the judge's model key '{self.spec.model}' is not served")
        record = await judge.backend.chat(
            model,
            self.messages(prediction, example),
            SamplingParams(max_tokens=self.spec.max_tokens, temperature=0.0),
        )
        if record.error is not None:
            raise ValueError(f"judge call failed: {record.error}")
        found = _NUMBER.search(record.text)
        if found is None:
            raise ValueError(f"judge reply has no score: {record.text[:80]!r}")
        value = float(found.group().replace(",", "")) / self.spec.scale
        return check_score(value)


# --------------------------------------------------------------------------------------------
# Building a scorer from its spec
# --------------------------------------------------------------------------------------------


def _field_scorer(
    spec: _FieldSpec, where: str, answer_fields: Sequence[str], columns: Sequence[str]
) -> FieldScorer:
    field = spec.field
    if field is None:
        if len(answer_fields) != 1:
            raise ConfigError(
                f"{where}.field: required with several answer fields ({', '.join(answer_fields)})"
            )
        field = answer_fields[0]
    elif field not in answer_fields:
        raise ConfigError(
            f"{where}.field: {unknown_name_message('answer field', field, answer_fields)}"
        )
    needs_reference = not isinstance(spec, JsonValidSpec) and not (
        isinstance(spec, RegexSpec) and spec.pattern is not None
    )
    column = spec.reference or field
    if needs_reference and column not in columns:
        raise ConfigError(
            f"{where}.reference: {unknown_name_message('reference column', column, columns)}"
        )
    return FieldScorer(spec, field, column)


def build_scorer(
    spec: ScorerSpec,
    *,
    base_dir: Path,
    answer_fields: Sequence[str],
    reference_columns: Sequence[str],
    inputs: Sequence[str],
    where: str = "scorer",
) -> Scorer:
    """The scorer a spec describes, checked against the app: its fields exist, its reference
    columns are in the dataset, a Python scorer's file and function exist (the file relative
    to base_dir), a judge's prompt reads only answer fields, reference columns and inputs.
    ConfigError naming `where` (the field), and the value, otherwise."""
    if isinstance(spec, FieldsSpec):
        parts = []
        for name, part in spec.fields.items():
            if part.field is not None and part.field != name:
                raise ConfigError(
                    f"{where}.fields.{name}.field: must be '{name}' or left out, got '{part.field}'"
                )
            named = part.model_copy(update={"field": name})
            parts.append(
                _field_scorer(named, f"{where}.fields.{name}", answer_fields, reference_columns)
            )
        return MeanScorer(parts)
    if isinstance(spec, PythonSpec):
        file, _, name = spec.function.rpartition(":")
        path = (base_dir / file).resolve()
        if not path.is_file():
            raise ConfigError(
                f"{where}.function: no file '{file}' in {base_dir}, got '{spec.function}'"
            )
        try:
            function = resolve_callable(f"{path}:{name}")
        except ValueError as error:
            raise ConfigError(f"{where}.function: {error}") from None
        return FunctionScorer(function, spec.function)
    if isinstance(spec, JudgeSpec):
        readable = {PREDICTION: answer_fields, REFERENCE: reference_columns}
        for label, template in (("prompt", spec.prompt), ("system", spec.system)):
            if template is None:
                continue
            try:
                refs = template_refs(template)
            except ValueError as error:
                raise ConfigError(f"{where}.{label}: {error}") from None
            for ref in refs:
                if ref.node is None and ref.field not in inputs:
                    raise ConfigError(
                        f"{where}.{label}: {unknown_name_message('input', ref.field, inputs)} "
                        f"(answer fields are {{prediction.F}}, reference columns {{reference.C}})"
                    )
                if ref.node is not None and ref.node not in readable:
                    raise ConfigError(
                        f"{where}.{label}: '{{{ref}}}' reads neither 'prediction' nor 'reference'"
                    )
                if ref.node is not None and ref.field not in readable[ref.node]:
                    what = "answer field" if ref.node == PREDICTION else "reference column"
                    raise ConfigError(
                        f"{where}.{label}: '{{{ref}}}': "
                        + unknown_name_message(what, ref.field, readable[ref.node])
                    )
        return JudgeScorer(spec)
    return _field_scorer(spec, where, answer_fields, reference_columns)


# --------------------------------------------------------------------------------------------
# Scoring a run's answers
# --------------------------------------------------------------------------------------------


async def score_one(
    scorer: Scorer,
    prediction: Mapping[str, Any] | None,
    example: Example,
    judge: Judge | None = None,
) -> Score:
    """One answer's Score: no value for a request that gave no answer (None), an error when
    the scorer raises or returns anything but a number in [0, 1]; never raises."""
    if prediction is None:
        return Score(None)
    try:
        return Score(check_score(await scorer.score(prediction, example, judge)))
    except Exception as error:  # a user's scorer may raise anything; it is counted, not raised
        message = (
            f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)
        )
        logger.debug("scoring row %s failed: %s", example.row, message)
        return Score(None, message)


async def score_all(
    scorer: Scorer,
    predictions: Sequence[Mapping[str, Any] | None],
    examples: Sequence[Example],
    judge: Judge | None = None,
) -> list[Score]:
    """Every answer's Score, in order (judge calls run concurrently)."""
    if len(predictions) != len(examples):
        raise ValueError(
            f"predictions and examples must pair up, got {len(predictions)} and {len(examples)}"
        )
    return list(
        await asyncio.gather(
            *(score_one(scorer, p, e, judge) for p, e in zip(predictions, examples, strict=True))
        )
    )
