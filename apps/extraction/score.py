"""The extraction app's scorer: the share of the three fields an answer gets right.

app.yaml names `score.py:accuracy`, called as accuracy(prediction, reference) with the
answer's fields and the row's reference columns (name, email, address). Fields are compared
after a normalization that forgives case, spacing and edge punctuation but not a wrong person
or a truncated address.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

FIELDS: tuple[str, ...] = ("name", "email", "address")
"""The answer fields, each a reference column of data.jsonl."""


class ExtractionScore(BaseModel):
    """How one prediction compares with the truth."""

    model_config = ConfigDict(frozen=True)

    matches: dict[str, bool] = Field(
        description="Per field: does the normalized prediction equal the normalized truth."
    )
    accuracy: float = Field(ge=0.0, le=1.0, description="Share of FIELDS that match.")


_EDGE_PUNCTUATION = " \t\n.,;:!?\"'`()[]{}<>“”‘’«»"


def normalize(field: str, value: str) -> str:
    """The form compared when scoring: Unicode-normalized, casefolded, single spaces, no
    punctuation at the ends; emails also lose 'mailto:' and inner spaces; addresses write
    every separator as ', ' (so line breaks and stray spaces around commas do not count)."""
    if field not in FIELDS:
        raise ValueError(f"field must be one of {list(FIELDS)}, got {field!r}")
    text = unicodedata.normalize("NFKC", value).casefold()
    if field == "address":
        text = re.sub(r"\s*[\r\n]+\s*", ", ", text.strip())  # a line break separates parts
    text = re.sub(r"\s+", " ", text).strip(_EDGE_PUNCTUATION)
    if field == "email":
        text = re.sub(r"^mailto:", "", text.replace(" ", "")).strip(_EDGE_PUNCTUATION)
    elif field == "address":
        text = re.sub(r"\s*[,;]\s*", ", ", text)
        text = re.sub(r"(?:, ){2,}", ", ", text).strip(_EDGE_PUNCTUATION)
    return text


def score(pred: Mapping[str, str | None], truth: Mapping[str, str]) -> ExtractionScore:
    """Per-field exact match after normalization; accuracy is the share of FIELDS matched.

    A missing or None prediction is a miss.
    """
    matches: dict[str, bool] = {}
    for field in FIELDS:
        if field not in truth:
            raise ValueError(f"truth is missing field {field!r}, got keys {sorted(truth)}")
        predicted = pred.get(field)
        matches[field] = predicted is not None and normalize(field, predicted) == normalize(
            field, truth[field]
        )
    return ExtractionScore(matches=matches, accuracy=sum(matches.values()) / len(FIELDS))


def accuracy(prediction: Mapping[str, str | None], reference: Mapping[str, str]) -> float:
    """The app's scorer: score(prediction, reference).accuracy."""
    return score(prediction, reference).accuracy
