"""An app folder in the public format, written fresh for each test that asks for it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

APP_YAML: dict[str, Any] = {
    "name": "calc",
    "description": "Small sums.",
    "inputs": ["question"],
    "answer": ["answer"],
    "models": ["llm", "big"],
    "variants": {
        "direct": {
            "description": "One call.",
            "nodes": [
                {
                    "id": "solve",
                    "kind": "llm",
                    "model": "llm",
                    "system": "{prompt.persona}",
                    "prompt": "{few_shot}Q: {question}\n{format_instructions}",
                    "output_fields": ["answer"],
                    "sampling": {"max_tokens": 32},
                }
            ],
            "outputs": {"answer": "solve.answer"},
        },
        "expression": {"file": "variants/expression.yaml"},
    },
    "prompts": {"persona": {"plain": "Solve it.", "teacher": "You teach {{maths}}."}},
    "few_shot": {"count": 2, "template": "Q: {question} A: {answer}\n"},
    "dataset": {"path": "data.jsonl", "split": {"test_fraction": 0.5, "seed": 1}},
    "scorer": {"kind": "numeric"},
}

EXPRESSION = {
    "nodes": [
        {
            "id": "write",
            "kind": "llm",
            "model": "big",
            "prompt": "Write an expression for: {question}",
            "sampling": {"max_tokens": 16, "temperature": 0.3},
        },
        {
            "id": "evaluate",
            "kind": "code",
            "callable": "calc.py:evaluate",
            "inputs": {"expression": "write.text"},
            "output_fields": ["value"],
            "depends_on": ["write"],
        },
    ],
    "outputs": {"answer": "evaluate.value"},
}

CALC_PY = (
    "def evaluate(inputs):\n"
    "    left, _, right = inputs['expression'].partition('+')\n"
    "    return {'value': float(left) + float(right)}\n"
)

ROWS = [{"question": f"{i} + {i}? {{x}}", "answer": 2 * i} for i in range(1, 9)]

WriteApp = Callable[..., Path]


@pytest.fixture
def write_app(tmp_path: Path) -> WriteApp:
    """write_app(**changes) -> the folder of the calc app, with app.yaml keys replaced by
    `changes` (None removes a key) and `rows` replacing the dataset's rows."""

    def write(rows: list[dict[str, Any]] | None = None, **changes: Any) -> Path:
        folder = tmp_path / "calc"
        (folder / "variants").mkdir(parents=True, exist_ok=True)
        data = {**APP_YAML, **changes}
        data = {key: value for key, value in data.items() if value is not None}
        (folder / "app.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        (folder / "variants" / "expression.yaml").write_text(yaml.safe_dump(EXPRESSION))
        (folder / "calc.py").write_text(CALC_PY)
        lines = [json.dumps(row) for row in (ROWS if rows is None else rows)]
        (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
        return folder

    return write


MakeModelFolder = Callable[..., Path]


@pytest.fixture
def make_model_folder(tmp_path: Path) -> MakeModelFolder:
    """make_model_folder(name, weight_bytes, dtype, **config) -> a model folder whose weight
    file has that size (sparse: no disk used) and whose config.json has that dtype."""

    def make(name: str, weight_bytes: int, dtype: str, **config: Any) -> Path:
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"dtype": dtype, **config}))
        with (folder / "model.safetensors").open("wb") as weights:
            weights.truncate(weight_bytes)
        (folder / "tokenizer.json").write_text("{}")
        return folder

    return make
