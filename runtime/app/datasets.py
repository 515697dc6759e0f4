"""Datasets of applications: rows of a JSONL, CSV or Parquet file in the app's folder.

An app folder names its dataset in app.yaml (`DatasetFile`): the file, which of its columns
are the request inputs and which make the reference answer the scorer compares with, and an
optional train/test split by a seed. The test rows are what runs evaluate; the train rows are
where few-shot examples come from, so no example is ever scored on itself.

Every problem with a file is one line naming the file, the row and the column
("apps/calc/data.jsonl: row 7: no column 'question' (columns: id, answer)"), raised as a
ConfigError before anything runs. Rows are numbered from 1 in file order (a JSONL file's line
number, a CSV file's data row after the header, a Parquet file's row).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runtime.errors import ConfigError

logger = logging.getLogger(__name__)

#: The file types a dataset may be, by suffix.
DATASET_SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class Example:
    """One dataset item: the request inputs the app's DAG reads, and the reference answer."""

    inputs: Mapping[str, str]
    reference: Any
    row: int | None = None
    """Where the item came from: its row in the dataset file (None for generated items)."""


class SplitSpec(BaseModel):
    """A seeded train/test split of a dataset's rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    test_fraction: float = Field(
        gt=0, lt=1, description="Share of the rows kept for evaluation (the test rows)."
    )
    seed: int = Field(default=0, ge=0, description="Seed of the shuffle that picks the rows.")


class DatasetFile(BaseModel):
    """The `dataset:` section of app.yaml: a file of rows and the role of its columns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(
        min_length=1,
        description="The file, relative to the app folder: .jsonl (one JSON object per line), "
        ".csv (a header row) or .parquet.",
    )
    inputs: tuple[str, ...] | None = Field(
        default=None,
        description="Columns that are the request inputs, each under its own name; default: "
        "the app's `inputs`.",
    )
    reference: tuple[str, ...] | None = Field(
        default=None,
        description="Columns that make the reference answer (a dict of column -> value) the "
        "scorer compares with; default: the app's `answer` fields.",
    )
    split: SplitSpec | None = Field(
        default=None,
        description="Split the rows into train (few-shot examples) and test (what runs "
        "evaluate) by a seed; none: every row is evaluated and there are no train rows.",
    )

    @field_validator("path")
    @classmethod
    def _known_suffix(cls, path: str) -> str:
        if Path(path).suffix.lower() not in DATASET_SUFFIXES:
            raise ValueError(f"path must end in one of {', '.join(DATASET_SUFFIXES)}, got '{path}'")
        return path


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: its test rows (evaluated) and train rows (few-shot examples)."""

    source: str
    """The file, as messages name it."""
    test: tuple[Example, ...]
    train: tuple[Example, ...] = ()

    def first(self, size: int) -> list[Example]:
        """The first `size` test rows in file order (all of them when there are fewer)."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        return list(self.test[:size])


def shown_path(path: Path) -> str:
    """A path as people most likely wrote it: relative to the working folder when inside."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def split_indices(count: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) row indices of a seeded split, each in file order.

    The test part is round(count * test_fraction) rows, at least one and, with two rows or
    more, leaving at least one for training; the same (count, fraction, seed) always gives
    the same split.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    wanted = round(count * test_fraction)
    size = min(max(wanted, 1), max(count - 1, 1))
    order = list(range(count))
    random.Random(seed).shuffle(order)
    test = sorted(order[:size])
    chosen = set(test)
    return [index for index in range(count) if index not in chosen], test


def _missing(value: Any) -> bool:
    """An absent cell: None, NaN (pandas' empty cell) or text with nothing in it."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


Row = tuple[int, dict[str, Any]]
"""A row of a dataset file: its number (from 1, in file order) and its cells by column."""


def _read_jsonl(path: Path, shown: str) -> list[Row]:
    rows: list[Row] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{shown}: row {number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(
                    f"{shown}: row {number}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append((number, row))
    return rows


def _read_csv(path: Path, shown: str) -> list[Row]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        rows: list[Row] = []
        for number, row in enumerate(reader, start=1):
            if None in row:  # more cells than the header has names
                raise ConfigError(f"{shown}: row {number}: more cells than the header's columns")
            rows.append((number, {k: v for k, v in row.items() if v is not None}))
    return rows


def _read_parquet(path: Path, shown: str) -> list[Row]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{shown}: not a readable Parquet file ({error})") from None
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return [(number, dict(row)) for number, row in enumerate(records, start=1)]


def read_rows(path: Path) -> list[Row]:
    """The rows of a dataset file with their numbers; ConfigError naming the file (and the
    row) when it is missing, empty or malformed."""
    shown = shown_path(path)
    suffix = path.suffix.lower()
    if suffix not in DATASET_SUFFIXES:
        raise ConfigError(f"{shown}: a dataset must be one of {', '.join(DATASET_SUFFIXES)}")
    if not path.is_file():
        raise ConfigError(f"{shown}: no such dataset file")
    try:
        if suffix == ".jsonl":
            rows = _read_jsonl(path, shown)
        elif suffix == ".csv":
            rows = _read_csv(path, shown)
        else:
            rows = _read_parquet(path, shown)
    except UnicodeDecodeError:
        raise ConfigError(f"{shown}: not UTF-8 text") from None
    if not rows:
        raise ConfigError(f"{shown}: the dataset has no rows")
    return rows


def _example(row: Row, shown: str, inputs: Sequence[str], reference: Sequence[str]) -> Example:
    number, cells = row
    for column in (*inputs, *reference):
        if column not in cells:
            raise ConfigError(
                f"{shown}: row {number}: no column '{column}' (columns: {', '.join(cells)})"
            )
    for column in inputs:
        if _missing(cells[column]):
            raise ConfigError(
                f"{shown}: row {number}: input column '{column}' is empty, got {cells[column]!r}"
            )
    return Example(
        inputs={column: str(cells[column]) for column in inputs},
        reference={column: cells[column] for column in reference},
        row=number,
    )


def load_dataset(
    spec: DatasetFile, base_dir: Path, inputs: Sequence[str], reference: Sequence[str]
) -> Dataset:
    """Read a dataset file (its path relative to base_dir) into test and train examples.

    inputs and reference are the columns to use (the spec's own, or the app's defaults); every
    row must have them all and a non-empty value for every input, else a ConfigError naming
    the file, the row and the column.
    """
    if not inputs:
        raise ValueError("inputs must name at least one column, got []")
    path = base_dir / spec.path
    shown = shown_path(path)
    rows = read_rows(path)
    examples = [_example(row, shown, inputs, reference) for row in rows]
    if spec.split is None:
        dataset = Dataset(source=shown, test=tuple(examples))
    else:
        if len(examples) < 2:
            raise ConfigError(
                f"{shown}: split needs at least 2 rows to keep one for training, got "
                f"{len(examples)}"
            )
        train, test = split_indices(len(examples), spec.split.test_fraction, spec.split.seed)
        dataset = Dataset(
            source=shown,
            test=tuple(examples[i] for i in test),
            train=tuple(examples[i] for i in train),
        )
    logger.debug(
        "dataset %s: %d test rows, %d train rows", shown, len(dataset.test), len(dataset.train)
    )
    return dataset
