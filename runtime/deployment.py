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
  extract: {task: extraction, architecture: single, format: json}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.app.dag import App
from runtime.app.formats import OutputFormat
from runtime.app.registry import Application, get_application
from runtime.engine.config import EngineConfig
from runtime.errors import ConfigError, config_error
from runtime.routing.policies import RouterConfig
from runtime.scaling.provisioner import ReplicaCount, ScalingPolicy

MODEL_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"


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


class AppSpec(BaseModel):
    """One application, found by name in the registry, with its app-layer knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(
        default="extraction",
        description="The application's registry name (`fmtune` ships 'extraction'): its "
        "dataset, scorer and DAG variants.",
    )
    architecture: str = Field(
        default="",
        description="Cognitive architecture, one of the app's DAG variants (for extraction: "
        "single, one call for all fields; parallel sub-questions then aggregation; sequential "
        "sub-questions easy to hard; judge, two agents and a judge). Empty: the app's first.",
    )
    format: OutputFormat = Field(
        default=OutputFormat.JSON, description="Output format between the LLM steps."
    )
    structured_output: bool = Field(
        default=False,
        description="Constrain llm outputs with vLLM's structured outputs (JSON schema); "
        "forces the json format.",
    )
    judge_rounds: int = Field(
        default=2, ge=1, le=10, description="Most rounds of the judge architecture's loop."
    )
    model_key: str = Field(
        default="llm", description="The deployment's model key the app's llm nodes call."
    )

    @field_validator("task")
    @classmethod
    def _registered(cls, task: str) -> str:
        get_application(task)
        return task

    @model_validator(mode="after")
    def _check_knobs(self) -> AppSpec:
        """The architecture is one of its variants (the first when
        empty), and structured output goes with json."""
        application = get_application(self.task)
        if not self.architecture:
            object.__setattr__(self, "architecture", application.architectures[0])
        elif self.architecture not in application.architectures:
            raise ValueError(
                f"architecture must be one of {list(application.architectures)} for app "
                f"'{self.task}', got '{self.architecture}'"
            )
        if self.structured_output and self.format != OutputFormat.JSON:
            raise ValueError(
                f"structured_output needs format 'json', got format '{self.format.value}'"
            )
        return self

    def application(self) -> Application:
        """The registered application this spec configures."""
        return get_application(self.task)

    def build(self) -> App:
        """The app's DAG with these knobs (its llm nodes call the app's own model key, which
        runs route to `model_key`)."""
        return self.application().build(
            self.architecture,
            self.format,
            judge_rounds=self.judge_rounds,
            structured_output=self.structured_output,
        )

    def model_keys(self) -> dict[str, str]:
        """The app's own model key -> the deployment's model key its calls go to."""
        return {self.application().model_key: self.model_key}


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
            if app.model_key not in self.models:
                raise ValueError(
                    f"apps.{name}.model_key must be one of {sorted(self.models)}, "
                    f"got '{app.model_key}'"
                )
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
            data["apps"] = {name: app.model_dump(mode="json") for name, app in self.apps.items()}
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
    """Read and validate a DEPLOY.yaml; errors name the file, the field and the value."""
    try:
        return Deployment.model_validate(read_yaml_mapping(path))
    except ValidationError as error:
        raise config_error(error, str(path), Deployment) from None
