"""The application registry: applications are found by name or path, never imported by the
core.

An application is named in experiment and DEPLOY files (`app.source`) in one of three ways:

- a path to an app folder or to its app.yaml (runtime.app.appfile): a user's own app;
- the name of an installed application: packages declare theirs as entry points in the group
  ``fmtune.apps`` (fmtune's pyproject.toml declares the shipped ones), the way pytest finds
  plug-ins. An entry point names either a package whose folder holds an app.yaml (the
  shipped apps: ``arithmetic = "apps.arithmetic"``) or an `Application` object built in
  Python.

`get_application` loads one lazily, so importing the runtime imports no application.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from runtime.app.appfile import APP_FILE, cached_app_folder
from runtime.app.application import Application
from runtime.errors import ConfigError, unknown_name_message

logger = logging.getLogger(__name__)

#: The entry-point group applications are registered under.
ENTRY_POINT_GROUP = "fmtune.apps"
_NAME_SHOWN = 60
"""Longest unknown app name a message repeats: a value, never a whole paragraph."""


@functools.cache
def _registered() -> dict[str, EntryPoint]:
    return {entry.name: entry for entry in entry_points(group=ENTRY_POINT_GROUP)}


def application_names() -> list[str]:
    """The names of every registered application, sorted."""
    return sorted(_registered())


def is_app_path(source: str) -> bool:
    """Whether an app source is a path (to a folder or an app.yaml) rather than a name."""
    return "/" in source or source.endswith((".yaml", ".yml")) or source in (".", "..")


def registered_folder(name: str) -> Path | None:
    """The app folder of a registered application, or None when it is defined in Python."""
    loaded = _load_entry(name)
    return loaded if isinstance(loaded, Path) else None


@functools.cache
def _load_entry(name: str) -> Path | Application:
    entry = _registered().get(name)
    if entry is None:
        shown = name if len(name) <= _NAME_SHOWN else name[: _NAME_SHOWN - 3] + "..."
        raise ConfigError(
            unknown_name_message("app", shown, application_names())
            + " (or give the path of an app folder)"
        )
    target: Any = entry.load()
    if isinstance(target, Application):
        logger.debug("app %s is defined in Python by %s", name, entry.value)
        return target
    if isinstance(target, ModuleType) and target.__file__:
        folder = Path(target.__file__).parent
        if (folder / APP_FILE).is_file():
            return folder
    raise ConfigError(
        f"app '{name}': entry point {entry.value} must be a package whose folder holds "
        f"{APP_FILE}, or a runtime.app.application.Application, got {type(target).__name__}"
    )


def get_application(source: str) -> Application:
    """The application a source names: a path (relative to the working folder) to an app
    folder or app.yaml, or a registered name. A ConfigError, one line, for an unknown name
    (naming the closest registered one) or an app folder with a problem."""
    if is_app_path(source) or Path(source).is_absolute():
        return cached_app_folder(Path(source))
    loaded = _load_entry(source)
    if isinstance(loaded, Application):
        return loaded
    return cached_app_folder(loaded)
