"""`fmtune`: the command line. It owns the terminal (rich); the libraries only log.

Bad input (a misspelled field, a value out of range, an unknown model, a replica that cannot
start) ends with one line naming the field and the value, and exit code 2.

This module holds the typer app, logging, `--verbose`, the entry point and the registration
of the commands, which live in `app_commands` (apps list/check/schema, init: applications),
`runtime_commands` (models, probe, run, serve: the runtime alone) and `tuning_commands`
(tune, worker, export, ui: the studies); what they share is in
`common` (bad input as one line and exit 2) and `display` (the terminal). Commands import
what they need inside their functions, so `fmtune --help` stays fast and `import tuner`
never loads vLLM or torch.
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType
from typing import Annotated

import typer
from rich.logging import RichHandler

from tuner.cli import app_commands, runtime_commands, tuning_commands
from tuner.cli.display import error_console

app = typer.Typer(
    name="fmtune",
    help="Find the cheapest deployment of an LLM application that meets its SLA at the quality "
    "it needs: real vLLM replicas, real measurements, multi-objective search.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _configure_logging(verbose: bool) -> None:
    import os

    # MLflow sets its own logger's level when imported; it reads this variable for it.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    for noisy in ("mlflow", "alembic", "optuna"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=error_console, show_path=False, rich_tracebacks=False)],
    )


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
) -> None:
    _configure_logging(verbose)


runtime_commands.register(app)
tuning_commands.register(app)
app_commands.register(app)


# --- entry point ------------------------------------------------------------------------


def _raise_on_signal(signum: int, _frame: FrameType | None) -> None:
    """Turn the first SIGTERM/SIGINT into SystemExit(128 + signal), the shell's convention.

    Later ones are ignored while the first unwinds: a second Ctrl-C would otherwise cut
    short the finally blocks that stop the replicas (which take a few seconds at most).
    """
    for other in (signal.SIGTERM, signal.SIGINT):
        signal.signal(other, _already_stopping)
    raise SystemExit(128 + signum)


def _already_stopping(_signum: int, _frame: FrameType | None) -> None:
    """A signal while the first one unwinds: nothing to add (a Python handler, not SIG_IGN,
    so the processes started meanwhile do not inherit an ignored signal)."""


def main() -> None:
    """Console-script entry: SIGTERM and Ctrl-C both unwind as SystemExit (exit code 143 and
    130), so every replica is stopped by the same finally blocks and atexit hook, and `tune`
    says which trial was interrupted and how to continue."""
    signal.signal(signal.SIGTERM, _raise_on_signal)
    signal.signal(signal.SIGINT, _raise_on_signal)
    try:
        app()
    except KeyboardInterrupt:
        error_console.print("interrupted")
        sys.exit(130)
