"""The extraction app: name, email and address of a news article's contact person.

Registered as `extraction` (entry point group `fmtune.apps`); the core finds it by that name
through runtime.app.registry and never imports this package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from apps.extraction.architectures import ARCHITECTURES, build_app
from apps.extraction.task import FIELDS, generate_dataset, score
from runtime.app.application import AppKnobs, Application
from runtime.app.dag import App, LlmNode
from runtime.app.datasets import Example
from runtime.app.scoring import FunctionScorer


def _examples(size: int, seed: int) -> list[Example]:
    return [
        Example(inputs={"article": item.article}, reference=item.truth)
        for item in generate_dataset(size, seed)
    ]


def _score(outputs: Mapping[str, Any], reference: Any) -> float:
    return score(outputs, reference).accuracy


def _variant(knobs: AppKnobs) -> App:
    return build_app(knobs.architecture or ARCHITECTURES[0], knobs.format)


APP = Application(
    name="extraction",
    description="Contact person's name, email and address from a news article.",
    inputs=("article",),
    answer=FIELDS,
    architectures=ARCHITECTURES,
    variant=_variant,
    examples=_examples,
    scorer=FunctionScorer(_score, "apps.extraction.task:score"),
    llm_nodes=tuple(
        dict.fromkeys(
            node.id
            for architecture in ARCHITECTURES
            for node in build_app(architecture, "json").nodes
            if isinstance(node, LlmNode)
        )
    ),
)
