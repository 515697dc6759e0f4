"""What `fmtune` shows on the terminal: the consoles, progress bars, metric tables, and the live
display of a study (a progress bar, one line per trial, the Pareto front as a table).

Only the CLI prints; this module holds the rich rendering so the command modules stay about
what they run. It imports rich alone, so `fmtune --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    import pandas as pd

    from runtime.engine.models import PrepareProgress
    from tuner.study import TrialReport

console = Console()
"""Results: tables, paths written, progress."""
error_console = Console(stderr=True)
"""Errors and log records."""


def progress_bar() -> Progress:
    """A progress bar with spinner, description, count and elapsed time."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


class PrepareDisplay:
    """The progress of `fmtune models prepare`: one line per step (download in bytes, then
    convert and check), fed by the catalog's progress callback. Use it as a context manager
    and pass it as `on_progress`."""

    def __init__(self) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[amount]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> PrepareDisplay:
        self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def __call__(self, report: PrepareProgress) -> None:
        """Show one progress report (a step's first report adds its line)."""
        if report.stage == "download" and report.total:
            amount = f"{report.completed / 1e6:,.0f}/{report.total / 1e6:,.0f} MB"
        else:
            amount = ""
        fields = {
            "description": f"{report.stage}: {report.detail}",
            "completed": report.completed,
            "total": report.total,
            "amount": amount,
        }
        if report.stage not in self.tasks:
            self.tasks[report.stage] = self.progress.add_task(**fields)
        else:
            self.progress.update(self.tasks[report.stage], **fields)


def format_value(value: Any) -> str:
    """A metric or knob value as shown in tables: 4 significant digits, '-' for None."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    return "-" if value is None else str(value)


def metrics_table(title: str, metrics: dict[str, Any]) -> Table:
    """A two-column table of metric names and values."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, format_value(value))
    return table


def narrow_table(
    title: str,
    flexible: str,
    fixed: Mapping[str, int],
    *,
    right: Collection[str] = (),
    min_width: int = 12,
) -> Table:
    """An empty table that stays readable at 80 columns, for listings (`fmtune profile
    --list`, `fmtune models list`): no side borders and one space between columns, each
    column of ``fixed`` at its width (a longer value wraps, then folds, inside it; those named
    in ``right`` right-aligned), and the ``flexible`` column first, at least ``min_width``
    wide, taking what is left. Without fixed widths rich shrinks every column of a wide table
    alike on a narrow terminal or a pipe, down to a few letters and an ellipsis. Notes too long
    for a column belong on a line below the table."""
    table = Table(
        title=title, box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True, pad_edge=False
    )
    table.add_column(flexible, overflow="fold", min_width=min_width, ratio=1)
    for column, width in fixed.items():
        justify = "right" if column in right else "left"
        table.add_column(column, overflow="fold", width=width, justify=justify)
    return table


# --- a study ----------------------------------------------------------------------------


class StudyDisplay:
    """The live display of a study: a bar of counted trials, the phase of the running trial,
    and after each trial a line with its outcome and the best value of each objective so far
    among feasible trials. Use it as a context manager around the study loop."""

    def __init__(self, total: int, directions: dict[str, str]) -> None:
        self.progress = progress_bar()
        self.task: TaskID = self.progress.add_task("trials", total=total)
        self.directions = directions
        """Objective metric -> 'minimize' or 'maximize', in the study's order."""
        self.best: dict[str, float] = {}

    def __enter__(self) -> StudyDisplay:
        self.progress.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.progress.__exit__(kind, error, traceback)

    def phase(self, number: int, text: str) -> None:
        """What the running trial is doing now."""
        self.progress.update(self.task, description=f"trial {number}: {text}")

    def trial_done(self, report: TrialReport) -> None:
        """Print the trial's outcome and the best value of each objective so far."""
        if report.state == "COMPLETE" and report.values is not None and report.feasible:
            for (metric, direction), value in zip(
                self.directions.items(), report.values, strict=True
            ):
                old = self.best.get(metric)
                better = old is None or (value < old if direction == "minimize" else value > old)
                self.best[metric] = value if better else old  # type: ignore[assignment]
        shown = "  ".join(f"{k}={v:.4g}" for k, v in self.best.items()) or "no feasible trial yet"
        outcome = "ok" if report.state == "COMPLETE" else f"FAILED ({report.failure})"
        if report.duplicate_of is not None:
            outcome = f"has the knobs of trial {report.duplicate_of}: its result reused, not run"
        self.progress.console.print(
            f"trial {report.number} {outcome} in {report.seconds:.0f}s; "
            f"best of each objective so far: {shown}",
            highlight=False,
            soft_wrap=True,
        )

    def completed(self, count: int) -> None:
        """Set the bar to the number of counted trials (all workers')."""
        self.progress.update(self.task, completed=count)

    def finished(self) -> None:
        """Mark the end of the loop on the bar."""
        self.progress.update(self.task, description="trials done")


def short_knob(column: str) -> str:
    """A knob's name without its section: params.engine.block_size -> block_size."""
    name = column.removeprefix("params.")
    for section in ("app.", "engine.", "deployment."):
        name = name.removeprefix(section)
    return name


def _front_fits(metrics: list[str], knob_width: int, width: int | None) -> bool:
    """Whether one column per objective fits in ``width`` beside the knobs column (each
    column at least as wide as its longest name, plus rich's borders and padding)."""
    if width is None:
        return True
    columns = [5, *(max(len(m), 7) for m in metrics), knob_width]
    return sum(columns) + 3 * len(columns) + 1 <= width


def front_table(
    study_name: str,
    table: pd.DataFrame,
    metrics: list[str],
    directions: list[str],
    width: int | None = None,
) -> Table:
    """The Pareto-optimal rows of a study's trial table: objectives, then the active knobs.

    Each knob is one ``name: value`` line in a column at least as wide as the longest knob
    name, so a narrow terminal wraps between name and value and every name stays whole.
    When one column per objective would not fit in ``width`` (the console's; e.g. four
    objectives in 80 columns), the objectives share one column, one ``metric: value`` line
    each. Anything still too long for its column is folded, never cut with an ellipsis.
    """
    front = table[table["on_front"]]
    knob_columns = [c for c in table.columns if c.startswith("params.")]
    knob_width = max((len(short_knob(c)) + 1 for c in knob_columns), default=5)  # "name:"
    arrows = ["min" if d == "minimize" else "max" for d in directions]
    shown = Table(title=f"Pareto front of {study_name} ({len(front)} of {len(table)} trials)")
    shown.add_column("trial", justify="right", overflow="fold")
    wide = _front_fits(metrics, knob_width, width)
    if wide:
        for metric, arrow in zip(metrics, arrows, strict=True):
            shown.add_column(f"{metric}\n({arrow})", justify="right", overflow="fold")
    else:
        shown.add_column("objectives", overflow="fold")
    shown.add_column("knobs", overflow="fold", min_width=knob_width)
    for _, row in front.iterrows():
        knobs = "\n".join(
            f"{short_knob(column)}: {format_value(row[column])}"
            for column in knob_columns
            if not (isinstance(row[column], float) and row[column] != row[column])  # NaN: inactive
        )
        values = [format_value(float(row[m])) for m in metrics]
        if not wide:
            values = [
                "\n".join(
                    f"{m} ({a}): {v}" for m, a, v in zip(metrics, arrows, values, strict=True)
                )
            ]
        shown.add_row(str(row["trial"]), *values, knobs)
    return shown
