"""`fmtune`: the command line. It owns the terminal (rich); the libraries only log.

Bad input (a misspelled field, a value out of range, an unknown model, a replica that cannot
start) ends with one line naming the field and the value, and exit code 2.

This module holds the typer app, logging, `--verbose`, the entry point and the registration
of the commands, which live in `runtime_commands` (models, probe, run, serve: the runtime
alone) and `tuning_commands` (tune, worker, export, ui: the studies); what they share is in
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

from tuner.cli import runtime_commands, tuning_commands
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


# --- entry point ------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM/SIGINT into SystemExit(128 + signal), the shell's convention."""
    raise SystemExit(128 + signum)


def main() -> None:
    """Console-script entry: SIGTERM and Ctrl-C both unwind as SystemExit, so every replica is
    stopped by the same finally blocks and atexit hook."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    signal.signal(signal.SIGINT, _raise_on_sigterm)
    try:
        app()
    except KeyboardInterrupt:
        error_console.print("interrupted")
        sys.exit(130)
