"""The free_text variant's code node: the label a sentence about a review implies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NEGATIVE = ("not", "no", "didn't", "did not", "negative", "dislike", "hate", "bad", "poor")


def label(inputs: Mapping[str, Any]) -> dict[str, str]:
    """'negative' when the text has a word of refusal or dislike, else 'positive'."""
    words = " ".join(str(inputs["text"]).casefold().replace(".", " ").split())
    padded = f" {words} "
    return {"label": "negative" if any(f" {w} " in padded for w in NEGATIVE) else "positive"}
