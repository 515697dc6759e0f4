"""Errors fmtune reports to users, and one-line messages from pydantic validation errors.

Every user-facing error names the field and the value that is wrong; the CLI prints the
message on one line and exits with code 2 (bad input) without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

from pydantic import ValidationError

Location = tuple[int | str, ...]
"""Where pydantic found a problem: the path of keys and indexes into the validated input."""

Locate = Callable[[Location], tuple[str, Location]]
"""Splits a Location into a label of what the problem belongs to, in the caller's own terms
(e.g. "knob 'engine.block_size'"; "" for nothing), and the field path left inside it."""


class FmtuneError(Exception):
    """Base of the errors fmtune reports to users as one line."""


class ConfigError(FmtuneError, ValueError):
    """A configuration value is invalid; the message names the field and the value."""


class EngineFailure(FmtuneError):
    """An engine could not serve: a replica failed to start or died, or the machine has no
    room for it. The one family the tuner catches to record a trial as an engine failure."""


def _location(loc: Location) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-"))


def describe_validation_error(
    error: ValidationError, source: str | None = None, *, locate: Locate | None = None
) -> str:
    """One line per problem, each naming the field and the value pydantic rejected.

    Messages raised from our own validators already name their fields ("block_size must be a
    multiple of 32 on cpu, got 20"); pydantic's built-in ones get the field and input added.
    `locate` lets a caller whose users think in other names than the schema's (a search
    space's knob names) label each problem with what it belongs to.
    """
    lines: list[str] = []
    for item in error.errors(include_url=False):
        loc: Location = tuple(item.get("loc", ()))
        owner = ""
        if locate is not None:
            owner, loc = locate(loc)
        where = _location(loc)
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        kind = item.get("type", "")
        if kind == "extra_forbidden":
            text = f"unknown field '{where}'"
        elif kind == "value_error" or kind.startswith("assertion"):
            text = f"{where}: {message}" if where and not message.startswith(where) else message
        else:
            text = f"{where}: {message}" if where else message
            text = f"{text}, got {item.get('input')!r}"
        if owner:
            text = f"{owner}: {text}"
        lines.append(f"{source}: {text}" if source else text)
    return "; ".join(lines)


def config_error(error: ValidationError, source: str | None = None) -> ConfigError:
    """A ConfigError carrying the one-line description of a pydantic ValidationError."""
    return ConfigError(describe_validation_error(error, source))


def closest_name(name: str, valid: Iterable[str]) -> str | None:
    """The valid name a misspelled one most likely meant, or None when none is close."""
    matches = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_name_message(what: str, name: str, valid: Iterable[str]) -> str:
    """ "unknown knob 'engine.blocksize' (did you mean 'engine.block_size'?)"."""
    valid = list(valid)
    guess = closest_name(name, valid)
    hint = f" (did you mean '{guess}'?)" if guess else f"; valid: {', '.join(sorted(valid))}"
    return f"unknown {what} '{name}'{hint}"
