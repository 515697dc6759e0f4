"""The parallel variant's aggregation step (a code node: no LLM call).

app.yaml's variants/parallel.yaml names `merge.py:merge_answers`: the three sub-answers
gathered into one record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FIELDS: tuple[str, ...] = ("name", "email", "address")


def merge_answers(inputs: Mapping[str, Any]) -> dict[str, str | None]:
    """One entry per field, trimmed, None if absent or empty."""
    merged: dict[str, str | None] = {}
    for name in FIELDS:
        value = inputs.get(name)
        text = str(value).strip() if value is not None else ""
        merged[name] = text or None
    return merged
