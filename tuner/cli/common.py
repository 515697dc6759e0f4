"""What every command shares: bad input as one line and exit code 2, the `--set` option.

Bad input (a misspelled field, a value out of range, an unknown model, a replica that cannot
start) ends with one line naming the field and the value, and exit code 2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError

from runtime.errors import EngineFailure, FmtuneError, describe_validation_error
from tuner.cli.display import error_console

EXIT_BAD_INPUT = 2
T = TypeVar("T")


def fail(message: str, detail: str | None = None) -> NoReturn:
    """Print a one-line error (and optional detail below it) and exit with code 2."""
    error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if detail:
        error_console.print(detail, style="dim", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors users cause into one line and exit code 2 (an engine failure's log tail,
    after its first line, is printed dimmed below it)."""
    try:
        yield
    except ValidationError as error:
        fail(describe_validation_error(error))
    except EngineFailure as error:
        headline, _, log_tail = str(error).partition("\n")
        fail(headline, log_tail or None)
    except FmtuneError as error:
        fail(str(error))


def validated(build: Callable[[], T], source: str | None = None) -> T:
    """Build a config object, turning a ValidationError into a one-line error."""
    try:
        return build()
    except ValidationError as error:
        fail(describe_validation_error(error, source))


def set_option(help_text: str) -> Any:
    """The repeatable `--set field=value` option of the commands that read a config file."""
    return typer.Option("--set", help=help_text)
