"""Dataset files of apps: JSONL, CSV and Parquet rows, their columns, splits and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from runtime.app.datasets import DatasetFile, Example, load_dataset, split_indices
from runtime.errors import ConfigError

ROWS = [
    {"question": "1 + 1?", "answer": 2, "note": "easy"},
    {"question": "2 * 3?", "answer": 6, "note": "easy"},
    {"question": "10 / 4?", "answer": 2.5, "note": "hard"},
    {"question": "7 - 9?", "answer": -2, "note": "hard"},
]


def write(folder: Path, name: str, rows: list[dict[str, object]]) -> Path:
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("name", ["data.jsonl", "data.csv", "data.parquet"])
def test_every_format_gives_the_same_inputs_and_references(tmp_path: Path, name: str) -> None:
    write(tmp_path, name, ROWS)
    dataset = load_dataset(DatasetFile(path=name), tmp_path, ["question"], ["answer"])
    assert [e.inputs for e in dataset.test] == [{"question": row["question"]} for row in ROWS]
    answers = [float(e.reference["answer"]) for e in dataset.test]  # CSV cells are text
    assert answers == [2.0, 6.0, 2.5, -2.0]
    assert [e.row for e in dataset.test] == [1, 2, 3, 4]
    assert dataset.train == ()
    assert dataset.first(2) == list(dataset.test[:2])
    assert dataset.first(99) == list(dataset.test)


def test_jsonl_keeps_native_reference_values_and_skips_blank_lines(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[2]) + "\n")
    dataset = load_dataset(DatasetFile(path="d.jsonl"), tmp_path, ["question"], ["answer", "note"])
    assert dataset.test[1] == Example({"question": "10 / 4?"}, {"answer": 2.5, "note": "hard"}, 3)


def test_a_split_is_seeded_disjoint_and_in_file_order(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": i} for i in range(20)]
    write(tmp_path, "d.jsonl", rows)
    spec = DatasetFile.model_validate(
        {"path": "d.jsonl", "split": {"test_fraction": 0.25, "seed": 3}}
    )
    one = load_dataset(spec, tmp_path, ["question"], ["answer"])
    again = load_dataset(spec, tmp_path, ["question"], ["answer"])
    assert one == again and len(one.test) == 5 and len(one.train) == 15
    test_rows = [e.row for e in one.test]
    train_rows = [e.row for e in one.train]
    assert test_rows == sorted(test_rows) and not set(test_rows) & set(train_rows)
    other = load_dataset(
        spec.model_copy(update={"split": spec.split.model_copy(update={"seed": 4})}),  # type: ignore[union-attr]
        tmp_path,
        ["question"],
        ["answer"],
    )
    assert [e.row for e in other.test] != test_rows


@pytest.mark.parametrize(
    ("count", "fraction", "test_size"), [(2, 0.01, 1), (2, 0.99, 1), (10, 0.5, 5), (3, 0.9, 2)]
)
def test_split_keeps_at_least_one_row_on_each_side(
    count: int, fraction: float, test_size: int
) -> None:
    train, test = split_indices(count, fraction, seed=0)
    assert len(test) == test_size and len(train) == count - test_size
    assert sorted(train + test) == list(range(count))


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            [ROWS[0], {"answer": 3}],
            "d.jsonl: row 2: no column 'question' (columns: answer)",
        ),
        (
            [ROWS[0], {"question": "x?"}],
            "d.jsonl: row 2: no column 'answer' (columns: question)",
        ),
        (
            [ROWS[0], ROWS[1], {"question": None, "answer": 1}],
            "d.jsonl: row 3: input column 'question' is empty, got None",
        ),
        (
            [{"question": "  ", "answer": 1}],
            "d.jsonl: row 1: input column 'question' is empty, got '  '",
        ),
    ],
)
def test_a_bad_row_is_one_line_naming_file_row_and_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: list[dict[str, object]], expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "d.jsonl", rows)
    with pytest.raises(ConfigError) as caught:
        load_dataset(DatasetFile(path="d.jsonl"), tmp_path, ["question"], ["answer"])
    assert str(caught.value) == expected


def test_an_empty_csv_cell_of_an_input_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("question,answer\n1 + 1?,2\n,3\n")
    with pytest.raises(ConfigError, match=r"^d\.csv: row 2: input column 'question' is empty"):
        load_dataset(DatasetFile(path="d.csv"), tmp_path, ["question"], ["answer"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"question": "a", "answer": 1}\n{"question": \n', "row 2: not valid JSON"),
        ("[1, 2]\n", "row 1: expected a JSON object, got list"),
        ("", "the dataset has no rows"),
    ],
)
def test_malformed_jsonl_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_dataset(DatasetFile(path="d.jsonl"), tmp_path, ["question"], ["answer"])


def test_a_missing_file_and_a_split_of_one_row_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^nope\.jsonl: no such dataset file$"):
        load_dataset(DatasetFile(path="nope.jsonl"), tmp_path, ["question"], ["answer"])
    write(tmp_path, "one.jsonl", ROWS[:1])
    spec = DatasetFile.model_validate({"path": "one.jsonl", "split": {"test_fraction": 0.5}})
    with pytest.raises(ConfigError, match="split needs at least 2 rows"):
        load_dataset(spec, tmp_path, ["question"], ["answer"])


def test_the_spec_refuses_unknown_suffixes_and_fractions_outside_0_1() -> None:
    with pytest.raises(ValidationError, match=r"path must end in one of \.jsonl, \.csv"):
        DatasetFile(path="data.xlsx")
    with pytest.raises(ValidationError, match="test_fraction"):
        DatasetFile.model_validate({"path": "d.csv", "split": {"test_fraction": 1.0}})
