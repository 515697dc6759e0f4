"""Knob names and the experiment fields they set: the one translation, and a trial's RunSpec.

A search space (:mod:`tuner.space`) names knobs in its own short terms; this module is the only
place that knows which field of an experiment file each name sets, which names exist, and how a
trial's RunSpec is built from an experiment and a trial's sampled knobs (the study builds it to
measure a trial, export rebuilds it to write the trial's bundle, so both get the same one).

Knob name (``k`` a model key of the experiment's deployment) -> experiment path:

- ``app.X`` -> ``app.X``
- ``app.nodes.<id>.model`` -> ``app.nodes.<id>.model`` (the model key llm node ``<id>`` calls)
- ``engine.X`` -> ``deployment.models.<k>.engine.X`` for every ``k``, unless
  ``models.<k>.engine.X`` is sampled too (the per-model knob wins)
- ``models.<k>.engine.X`` -> ``deployment.models.<k>.engine.X``
- ``models.<k>.model`` -> ``deployment.models.<k>.engine.model``
- ``models.<k>.replicas`` -> ``deployment.models.<k>.replicas``
- ``deployment.replicas`` -> ``deployment.models.<k>.replicas`` for every ``k``, unless
  ``models.<k>.replicas`` is sampled too
- ``deployment.P`` -> ``deployment.P`` (e.g. ``deployment.router.policy``)

The value ``"none"`` (how a space file writes "no speculative method") becomes None.

Valid names come from the schemas, never from a list kept by hand: X ranges over the fields of
``EngineConfig`` (engine knobs) or ``AppSpec`` (app knobs, but ``source``: a study tunes one
app), ``<id>`` over the llm nodes of the experiment's app, and P over the dotted paths to a
field of ``Deployment`` through its nested models (``router.policy``, ``provisioner.target_rps``).
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from runtime.deployment import AppSpec, Deployment
from runtime.engine.config import EngineConfig
from runtime.errors import ConfigError, describe_validation_error, unknown_name_message
from runtime.run import RunSpec, apply_overrides
from tuner.space import SearchSpace, SpaceError

NONE_VALUE = "none"
"""How a space file writes None as a categorical choice (YAML's null is not a choice)."""


class InvalidTrial(ConfigError):
    """A trial's knobs break a constraint of the space or are values the experiment's schema
    rejects; the study records the trial as failed 'invalid' without running it."""


# --------------------------------------------------------------------------- valid names


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds directly (``X`` or ``X | None``), else None; fields
    holding dicts or lists of models are leaves (their keys are data, not schema)."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        inner = [arg for arg in get_args(annotation) if arg is not type(None)]
        annotation = inner[0] if len(inner) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _field_paths(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every dotted path to a field of ``model``, through nested models."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path
        nested = _nested_model(info.annotation)
        if nested is not None:
            yield from _field_paths(nested, f"{path}.")


#: AppSpec fields that are no knobs of their own: the app itself, and the per-node table.
_NOT_APP_KNOBS = ("source", "nodes")


def valid_knob_names(model_keys: Iterable[str], app: AppSpec | None = None) -> list[str]:
    """Every knob name a space may use with a deployment of these model keys (and, given
    the experiment's app, its llm nodes' `app.nodes.<id>.model`)."""
    engine = list(EngineConfig.model_fields)
    names = [f"app.{field}" for field in AppSpec.model_fields if field not in _NOT_APP_KNOBS]
    if app is not None:
        names += [f"app.nodes.{node}.model" for node in app.application().llm_nodes]
    names += [f"engine.{field}" for field in engine]
    for key in model_keys:
        names += [f"models.{key}.model", f"models.{key}.replicas"]
        names += [f"models.{key}.engine.{field}" for field in engine]
    names.append("deployment.replicas")
    names += [f"deployment.{path}" for path in _field_paths(Deployment)]
    return names


def _shown(path: Path) -> str:
    """A path as the user most likely wrote it: relative to the working folder when inside."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def check_knob_names(
    space: SearchSpace, model_keys: Iterable[str], source: Path, app: AppSpec | None = None
) -> None:
    """Refuse a space naming a knob the experiment (its model keys, its app's llm nodes)
    does not have, before any trial runs.

    The SpaceError (a ConfigError: `fmtune tune` exits 2) is one line naming the space file,
    each unknown knob and the closest valid name, e.g. ``search_spaces/x.yaml: unknown knob
    'engine.blocksize' (did you mean 'engine.block_size'?)``.
    """
    valid = valid_knob_names(model_keys, app)
    known = set(valid)
    unknown = [name for name in space.knob_names() if name not in known]
    if unknown:
        problems = "; ".join(unknown_name_message("knob", name, valid) for name in unknown)
        raise SpaceError(f"{_shown(source)}: {problems}")


# --------------------------------------------------------------------------- translation


def _value(value: Any) -> Any:
    return None if value == NONE_VALUE else value


def experiment_overrides(params: Mapping[str, Any], model_keys: Iterable[str]) -> dict[str, Any]:
    """Sampled knobs as dotted-path overrides of an experiment mapping (see the module
    docstring); a name of no known form, or a model key the deployment lacks, is a SpaceError."""
    keys = list(model_keys)
    out: dict[str, Any] = {}
    for name, value in params.items():
        value = _value(value)
        parts = name.split(".")
        if parts[0] == "app" and (
            len(parts) == 2 or (len(parts) == 4 and parts[1] == "nodes" and parts[3] == "model")
        ):
            out[name] = value
        elif parts[0] == "engine" and len(parts) == 2:
            for key in keys:
                if f"models.{key}.{name}" not in params:
                    out[f"deployment.models.{key}.{name}"] = value
        elif parts[0] == "models" and len(parts) in (3, 4):
            if parts[1] not in keys:
                raise SpaceError(
                    f"knob '{name}': model key '{parts[1]}' is not one of the deployment's "
                    f"models {keys}"
                )
            if parts[2:] == ["model"]:
                out[f"deployment.models.{parts[1]}.engine.model"] = value
            elif parts[2:] == ["replicas"] or (parts[2] == "engine" and len(parts) == 4):
                out[f"deployment.{name}"] = value
            else:
                raise SpaceError(unknown_name_message("knob", name, valid_knob_names(keys)))
        elif name == "deployment.replicas":
            for key in keys:
                if f"models.{key}.replicas" not in params:
                    out[f"deployment.models.{key}.replicas"] = value
        elif parts[0] == "deployment" and len(parts) >= 2:
            out[name] = value
        else:
            raise SpaceError(unknown_name_message("knob", name, valid_knob_names(keys)))
    return out


def trial_spec(
    experiment_or_base: RunSpec | Mapping[str, Any], space: SearchSpace, params: Mapping[str, Any]
) -> RunSpec:
    """The RunSpec a trial measures: the experiment (a RunSpec, e.g. an Experiment, or its
    JSON dump) with the trial's sampled knobs applied.

    InvalidTrial when the knobs break one of the space's constraints, or set a value the
    experiment's schema rejects (a knob combination the configs refuse).
    """
    violations = space.violations(params)
    if violations:
        raise InvalidTrial("violates " + "; ".join(violations))
    if isinstance(experiment_or_base, RunSpec):
        base = experiment_or_base.model_dump(mode="json", exclude={"tune"})
    else:
        base = dict(experiment_or_base)
    overrides = experiment_overrides(params, sorted(base["deployment"]["models"]))
    try:
        return RunSpec.model_validate(apply_overrides(base, overrides))
    except ValidationError as error:
        raise InvalidTrial(describe_validation_error(error)) from None
    except (ValueError, TypeError) as error:  # e.g. a path through a value that is no mapping
        raise InvalidTrial(str(error)) from None
