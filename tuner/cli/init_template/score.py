"""The scorer of this app: how good one answer is, from 0 to 1.

app.yaml names it `score.py:score`. fmtune calls it once per answer with the answer's fields
(`prediction`) and the row's reference columns (`reference`); it must return a number in
[0, 1]. Change it to your own idea of a good answer, or use a built-in scorer in app.yaml
instead (exact, normalized, contains, token_f1, numeric, regex, json_valid, fields, or an
LLM judge).
"""

from __future__ import annotations

import unicodedata
from typing import Any


def _normal(value: Any) -> str:
    text = unicodedata.normalize("NFKC", "" if value is None else str(value)).casefold()
    return " ".join(text.split()).strip(" .,;:!?\"'")


def score(prediction: dict[str, Any], reference: dict[str, Any]) -> float:
    """1.0 for exactly the capital, 0.5 when the answer only contains it, else 0.0."""
    answer, capital = _normal(prediction.get("capital")), _normal(reference["capital"])
    if answer == capital:
        return 1.0
    return 0.5 if capital and capital in answer else 0.0
