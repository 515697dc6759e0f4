"""The extraction app: name, email and address of a news article's contact person.

Registered as `extraction` (entry point group `fmtune.apps`); the core finds it by that name
through runtime.app.registry and never imports this package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from apps.extraction.architectures import ARCHITECTURES, MODEL_KEY, build_app
from apps.extraction.task import generate_dataset, score
from runtime.app.registry import Application, Example


def _examples(size: int, seed: int) -> list[Example]:
    return [
        Example(inputs={"article": item.article}, reference=item.truth)
        for item in generate_dataset(size, seed)
    ]


def _score(outputs: Mapping[str, Any], reference: Any) -> float:
    return score(outputs, reference).accuracy


APP = Application(
    name="extraction",
    description="Contact person's name, email and address from a news article.",
    architectures=ARCHITECTURES,
    model_key=MODEL_KEY,
    build=build_app,
    examples=_examples,
    score=_score,
)
