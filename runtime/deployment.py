"""A deployment: models with their engine and replica counts, router, provisioner, apps.

This is the DEPLOY.yaml format: `fmtune run` and `fmtune serve` read it, and the tuner
exports it for each Pareto-optimal trial. Every engine knob is an EngineConfig field and
every router knob a RouterConfig field; there is no second list of names.

```yaml
models:
  llm:                      # a model key, as llm nodes of the apps name it
    engine: {model: smollm2-135m, max_num_seqs: 16, block_size: 128}
    replicas: 1             # or "auto": the provisioner sizes and scales it
router: {policy: sla_aware}
provisioner: {target_rps: 0.5, sla_p99_s: 20}
apps:
  extract: {source: extraction, architecture: single, format: json}
  calc: apps/arithmetic     # an app folder (relative to this file), with its default knobs
```
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from runtime.app.application import MODEL_KEY_PATTERN, AppKnobs, Application, llm_model_keys
from runtime.app.dag import App, LlmNode
from runtime.app.registry import application_names, get_application, is_app_path
from runtime.engine.config import EngineConfig
from runtime.errors import ConfigError, config_error, unknown_name_message
from runtime.routing.policies import RouterConfig
from runtime.scaling.provisioner import ReplicaCount, ScalingPolicy


class ModelDeployment(BaseModel):
    """One model key of a deployment: its engine knobs and how many replicas serve it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineConfig = Field(description="The vLLM engine of every replica of this model.")
    replicas: ReplicaCount = Field(
        default=1,
        description="Replicas serving this model: a number, or 'auto' for the provisioner to "
        "size from the target rate and scale while serving.",
    )
    endpoints: tuple[str, ...] = Field(
        default=(),
        description="With cluster 'endpoints': base URLs of existing OpenAI-compatible "
        "servers for this model (no process is started).",
    )


class ProvisionerConfig(BaseModel):
    """How replica counts marked 'auto' are chosen and adjusted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_rps: float = Field(
        default=1.0, gt=0, description="Application requests per second to size for."
    )
    sla_p99_s: float = Field(
        default=30.0, gt=0, description="End-to-end p99 latency the sizing must stay within."
    )
    epsilon: float = Field(
        default=0.01,
        gt=0,
        lt=1,
        description="Largest predicted share of requests allowed to miss the SLA.",
    )
    scaling: ScalingPolicy = Field(
        default_factory=ScalingPolicy,
        description="Scale-up/down thresholds, hysteresis and cooldown while serving.",
    )


def _exists(path: Path) -> bool:
    """Whether a path exists; False for names no file system accepts (too long, say)."""
    try:
        return path.exists()
    except OSError:
        return False


class AppSpec(AppKnobs):
    """One application (a shipped app's name, an app.yaml or an app folder) and its knobs.

    In a file, `app: apps/arithmetic` is short for `app: {source: apps/arithmetic}`. A
    relative path is relative to the file that names it (the experiment or DEPLOY.yaml), or
    else to the working folder; it is kept absolute once validated.
    """

    source: str = Field(
        min_length=1,
        description="The application: a shipped app's name (`fmtune apps list`), or the path "
        "of an app folder or its app.yaml (runtime/app/appfile.py documents the format).",
    )

    @model_validator(mode="before")
    @classmethod
    def _source_only(cls, data: Any) -> Any:
        """`app: NAME_OR_PATH` is `app: {source: NAME_OR_PATH}`."""
        return {"source": data} if isinstance(data, str) else data

    @field_validator("source")
    @classmethod
    def _found(cls, source: str, info: ValidationInfo) -> str:
        """A path (or a folder that is no registered name) resolved against the naming
        file's folder (validation context `base_dir`) when it exists there, else the working
        folder; the app loaded and checked."""
        base = (info.context or {}).get("base_dir")
        beside = Path(base) / source if base is not None else None
        here = beside if beside is not None and _exists(beside) else Path(source)
        folder = _exists(here) and here.is_dir() and source not in application_names()
        if (is_app_path(source) or folder) and not Path(source).is_absolute():
            source = str(here.resolve())
        get_application(source)
        return source

    @model_validator(mode="after")
    def _check_knobs(self) -> AppSpec:
        """The knobs name what the app has (architecture and prompt defaulting to its first),
        and together make a valid DAG."""
        for name, value in self.application().check_knobs(self).items():
            object.__setattr__(self, name, value)
        self.build()
        return self

    @property
    def name(self) -> str:
        """The application's own name (what a deployment serves it as by default)."""
        return self.application().name

    def application(self) -> Application:
        """The application this spec configures."""
        return get_application(self.source)

    def build(self) -> App:
        """The app's DAG with these knobs; its llm nodes name the deployment's model keys."""
        return self.application().build(self)

    def model_keys(self) -> dict[str, str]:
        """The deployment model keys the built DAG calls, each to itself (the executor's map
        from a node's model key to the name the router serves it under)."""
        return {key: key for key in llm_model_keys(self.build())}

    def check_models(self, models: Iterable[str], where: str, scorer: bool = False) -> None:
        """ValueError naming `where`, the node (or the scorer) and the model key when the app
        calls a key that is not among `models` (with scorer: the judge's key too)."""
        served = sorted(models)
        for node in self.build().nodes:
            if isinstance(node, LlmNode) and node.model not in served:
                raise ValueError(
                    f"{where}.nodes.{node.id}.model: "
                    + unknown_name_message("model key", node.model, served)
                    + " among the deployment's models"
                )
        if scorer:
            for key in self.application().scorer.model_keys:
                if key not in served:
                    raise ValueError(
                        f"{where}: the scorer's judge calls "
                        + unknown_name_message("model key", key, served)
                        + " among the deployment's models"
                    )


class Deployment(BaseModel):
    """Everything needed to serve applications: the DEPLOY.yaml document."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cluster: Literal["local", "endpoints"] = Field(
        default="local",
        description="'local': replicas are vLLM processes started here; 'endpoints': each "
        "model is served by existing URLs (a user's own vLLM fleet).",
    )
    models: dict[Annotated[str, Field(pattern=MODEL_KEY_PATTERN)], ModelDeployment] = Field(
        min_length=1, description="Model keys and how each is served."
    )
    router: RouterConfig = Field(
        default_factory=RouterConfig, description="Routing policy and its parameters."
    )
    provisioner: ProvisionerConfig = Field(
        default_factory=ProvisionerConfig, description="Sizing and scaling of 'auto' models."
    )
    apps: dict[Annotated[str, Field(pattern=MODEL_KEY_PATTERN)], AppSpec] = Field(
        default_factory=dict, description="Applications served at /v1/apps/{name}."
    )

    @model_validator(mode="after")
    def _check_references(self) -> Deployment:
        for name, app in self.apps.items():
            app.check_models(self.models, f"apps.{name}")
        for key, model in self.models.items():
            if self.cluster == "endpoints" and not model.endpoints:
                raise ValueError(f"models.{key}.endpoints must list URLs with cluster 'endpoints'")
            if self.cluster == "local" and model.endpoints:
                raise ValueError(
                    f"models.{key}.endpoints needs cluster 'endpoints', got cluster 'local'"
                )
        return self

    def to_yaml(self) -> str:
        """The DEPLOY.yaml text (defaults omitted where they add nothing)."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data["models"] = {
            key: {
                **model.model_dump(mode="json", exclude_defaults=True),
                "engine": model.engine.model_dump(mode="json", exclude_defaults=True)
                | {"model": model.engine.model},
                "replicas": model.replicas,
            }
            for key, model in self.models.items()
        }
        if self.apps:  # an app's knobs are what a bundle is about: spell them all out
            data["apps"] = {
                name: {"source": app.source, **app.model_dump(mode="json", exclude={"source"})}
                for name, app in self.apps.items()
            }
        return yaml.safe_dump(data, sort_keys=False)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping; errors name the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_deployment(path: Path) -> Deployment:
    """Read and validate a DEPLOY.yaml (app paths relative to it); errors name the file, the
    field and the value."""
    try:
        return Deployment.model_validate(read_yaml_mapping(path), context={"base_dir": path.parent})
    except ValidationError as error:
        raise config_error(error, str(path), Deployment) from None
