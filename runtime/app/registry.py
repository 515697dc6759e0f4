"""The application registry: applications are found by name, never imported by the core.

An application (the extraction task shipped with fmtune, or a user's own) is an
`Application`: how to build its DAG from its knobs, its dataset and its scorer. Installed
packages declare theirs as entry points in the group ``fmtune.apps`` (fmtune's own
pyproject.toml declares the shipped ones), the way pytest finds plug-ins; `get_application`
loads one lazily by name, so importing the runtime imports no application.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from runtime.app.dag import App
from runtime.errors import ConfigError, unknown_name_message

logger = logging.getLogger(__name__)

#: The entry-point group applications are registered under.
ENTRY_POINT_GROUP = "fmtune.apps"


@dataclass(frozen=True)
class Example:
    """One dataset item: the request inputs the app's DAG reads, and the reference answer."""

    inputs: Mapping[str, str]
    reference: Any


@dataclass(frozen=True)
class Application:
    """What the runtime needs of an application, whatever its shape."""

    name: str
    """Registry name, as experiment and DEPLOY files write it (`app.task`)."""
    description: str
    """One line on what the app does."""
    architectures: tuple[str, ...]
    """The DAG variants the app offers (its `architecture` knob); the first is the default."""
    model_key: str
    """The model key the app's llm nodes call."""
    build: Callable[..., App]
    """(architecture, fmt, *, judge_rounds, structured_output) -> the DAG with those knobs."""
    examples: Callable[[int, int], list[Example]]
    """(size, seed) -> the first `size` items of the seeded dataset."""
    score: Callable[[Mapping[str, Any], Any], float]
    """(outputs, reference) -> quality of one answer in [0, 1]."""


@functools.cache
def _registered() -> dict[str, Any]:
    return {entry.name: entry for entry in entry_points(group=ENTRY_POINT_GROUP)}


def application_names() -> list[str]:
    """The names of every registered application, sorted."""
    return sorted(_registered())


@functools.cache
def get_application(name: str) -> Application:
    """The application registered as `name`; an unknown name is a ConfigError naming the
    closest registered one."""
    entry = _registered().get(name)
    if entry is None:
        raise ConfigError(unknown_name_message("app", name, application_names()))
    application = entry.load()
    if not isinstance(application, Application):
        raise ConfigError(
            f"app '{name}': entry point {entry.value} must be a runtime.app.registry.Application, "
            f"got {type(application).__name__}"
        )
    logger.debug("loaded app %s from %s", name, entry.value)
    return application
