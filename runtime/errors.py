"""Errors fmtune reports to users, and one-line messages from pydantic validation errors.

Every user-facing error names the field and the value that is wrong; the CLI prints the
message on one line and exits with code 2 (bad input) without a traceback.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

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


_INPUT_SHOWN = 80
"""Longest repr of a rejected input shown in a message: a value, never a whole file."""


def _shown_input(value: Any) -> str:
    """The repr of a rejected input, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= _INPUT_SHOWN else text[: _INPUT_SHOWN - 3] + "..."


def _members(annotation: Any) -> list[Any]:
    """The types an annotation may hold: Annotated and unions unwrapped, None dropped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [] if annotation is type(None) else [annotation]


def _is_model(candidate: Any) -> bool:
    return isinstance(candidate, type) and issubclass(candidate, BaseModel)


def _model_keys(model: type[BaseModel]) -> dict[str, Any]:
    """The keys a model accepts in its input (field names and aliases) -> their annotations."""
    keys: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        keys[name] = info.annotation
        if isinstance(info.alias, str):
            keys[info.alias] = info.annotation
    return keys


def _tags(model: type[BaseModel]) -> set[str]:
    """The names pydantic may put in a location for this model as a union member: its class
    name and the values of its Literal fields (a discriminated union's tags)."""
    tags = {model.__name__}
    for info in model.model_fields.values():
        if get_origin(info.annotation) is Literal:
            tags.update(str(value) for value in get_args(info.annotation))
    return tags


def _step(annotation: Any, part: int | str) -> list[Any]:
    """The types found one location part below ``annotation`` (empty when none)."""
    found: list[Any] = []
    members = _members(annotation)
    for member in members:
        origin = get_origin(member)
        if _is_model(member):
            keys = _model_keys(member)
            if part in keys:
                found.append(keys[part])
            elif len(members) > 1 and part in _tags(member):
                found.append(member)  # a union's member named by class or tag
        elif origin in (dict, Mapping):
            found.extend(get_args(member)[1:2])  # a key: its value's type
        elif origin in (list, tuple, set, frozenset, Sequence) and isinstance(part, int):
            found.extend(arg for arg in get_args(member)[:1] if arg is not Ellipsis)
    return found


def valid_field_names(model: type[BaseModel], loc: Location) -> list[str]:
    """The field names valid at ``loc`` inside ``model`` (the keys of the mapping that holds
    the last part of ``loc``); empty when the location does not lead to a model."""
    current: list[Any] = [model]
    for part in loc:
        if str(part).startswith("function-"):
            continue
        current = [found for annotation in current for found in _step(annotation, part)]
        if not current:
            return []
    names: list[str] = []
    for annotation in current:
        for member in _members(annotation):
            if _is_model(member):
                names.extend(n for n in member.model_fields if n not in names)
    return names


_VALID_SHOWN = 12
"""An unknown field with no close match lists the valid names when there are at most this many."""


def _unknown_field(where: str, leaf: str, candidates: list[str], valid: list[str]) -> str:
    """ "unknown field 'a.worklaod' (did you mean 'workload'?)", matching the leaf name against
    ``candidates`` first (the required fields missing beside it), then every valid field."""
    guess = closest_name(leaf, candidates) or closest_name(leaf, valid)
    if guess is not None:
        return f"unknown field '{where}' (did you mean '{guess}'?)"
    if valid and len(valid) <= _VALID_SHOWN:
        return f"unknown field '{where}'; valid: {', '.join(sorted(valid))}"
    return f"unknown field '{where}'"


def _missing_beside(items: list[ErrorDetails]) -> dict[Location, list[str]]:
    """The required fields reported missing, by the location of the mapping that lacks them."""
    missing: dict[Location, list[str]] = {}
    for item in items:
        loc = tuple(item.get("loc", ()))
        if item.get("type") == "missing" and loc:
            missing.setdefault(loc[:-1], []).append(str(loc[-1]))
    return missing


def describe_validation_error(
    error: ValidationError,
    source: str | None = None,
    *,
    locate: Locate | None = None,
    model: type[BaseModel] | None = None,
) -> str:
    """One line: the source once, then each problem naming the field and the value pydantic
    rejected, separated by "; ".

    Messages raised from our own validators already name their fields ("block_size must be a
    multiple of 32 on cpu, got 20"); pydantic's built-in ones get the field and input added
    (the input cut short: a message never dumps a file). An unknown field gets the valid name
    it most likely meant ("unknown field 'worklaod' (did you mean 'workload'?)"), from the
    fields of ``model`` (the type validated) at that place, or else from the required fields
    missing beside it; a missing field whose misspelling is reported is not reported again.
    `locate` lets a caller whose users think in other names than the schema's (a search
    space's knob names) label each problem with what it belongs to.
    """
    items = error.errors(include_url=False)
    missing = _missing_beside(items)
    meant: set[Location] = set()  # missing fields that an unknown field beside them misspells
    for item in items:
        loc = tuple(item.get("loc", ()))
        if item.get("type") == "extra_forbidden" and loc:
            guess = closest_name(str(loc[-1]), missing.get(loc[:-1], []))
            if guess is not None:
                meant.add((*loc[:-1], guess))
    lines: list[str] = []
    for item in items:
        loc: Location = tuple(item.get("loc", ()))
        kind = item.get("type", "")
        if kind == "missing" and loc in meant:
            continue  # the misspelled field beside it says it all
        parent, leaf = loc[:-1], str(loc[-1]) if loc else ""
        owner = ""
        if locate is not None:
            owner, loc = locate(loc)
        where = _location(loc)
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            valid = valid_field_names(model, parent) if model is not None else []
            text = _unknown_field(where, leaf, missing.get(parent, []), valid)
        elif kind == "value_error" or kind.startswith("assertion"):
            text = f"{where}: {message}" if where and not message.startswith(where) else message
        elif kind == "missing":
            text = f"{where}: {message}" if where else message
        else:
            text = f"{where}: {message}" if where else message
            text = f"{text}, got {_shown_input(item.get('input'))}"
        if owner:
            text = f"{owner}: {text}"
        lines.append(text)
    text = "; ".join(lines)
    return f"{source}: {text}" if source else text


def config_error(
    error: ValidationError, source: str | None = None, model: type[BaseModel] | None = None
) -> ConfigError:
    """A ConfigError carrying the one-line description of a pydantic ValidationError
    (``model``, the type validated, lets a misspelled field name its closest valid name)."""
    return ConfigError(describe_validation_error(error, source, model=model))


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
