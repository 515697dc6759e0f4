"""What several bundle renderers share: the container layout, resource names and YAML.

The vLLM servers of every container form (docker compose, Kubernetes) listen on the same
port, read model folders from the same mount and run the same images; their names and labels
follow one scheme, and the router in front of them gets the same deployment rewritten to
point at them. Keeping these here means the forms cannot drift apart.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

import yaml

from runtime.deployment import Deployment
from runtime.engine.config import EngineConfig
from runtime.engine.models import served_folder_name
from runtime.engine.sizing import ReplicaResources
from runtime.errors import ConfigError

#: Port every vLLM server and the router listen on inside their container.
SERVER_PORT = 8000
#: Host every server in a container binds: all interfaces, so other containers reach it.
ALL_INTERFACES = "0.0.0.0"
#: Where model folders are mounted in containers.
MODELS_MOUNT = "/models"
#: Image of the CUDA build of vLLM (its console script `vllm` works).
CUDA_IMAGE = "vllm/vllm-openai:latest"
#: Compose variable naming the CPU build's image, and its default.
CPU_IMAGE_VARIABLE = "FMTUNE_VLLM_CPU_IMAGE"
DEFAULT_CPU_IMAGE = "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:latest"
#: Compose variable naming an image with fmtune installed (runs the router), and its default.
ROUTER_IMAGE_VARIABLE = "FMTUNE_IMAGE"
DEFAULT_ROUTER_IMAGE = "fmtune:latest"
#: PersistentVolumeClaim holding the model folders in Kubernetes.
DEFAULT_MODELS_CLAIM = "fmtune-models"
#: Where the router's deployment file is placed in its container.
ROUTER_DEPLOY_PATH = "/etc/fmtune/DEPLOY.yaml"
#: Label and annotation keys.
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
MODEL_KEY_LABEL = "fmtune.io/model-key"
CONFIG_HASH_LABEL = "fmtune.io/config-hash"
REPLICAS_ANNOTATION = "fmtune.io/replicas"
#: Longest DNS-1123 label (Kubernetes names, label values).
DNS_LABEL_MAX = 63


# --------------------------------------------------------------------------------------------
# Model folders and the router in containers
# --------------------------------------------------------------------------------------------


def model_path_in_image(engine: EngineConfig) -> str:
    """Where the engine's model folder is mounted in containers: ``/models/<name>``, the
    folder its replicas serve (``<name>-int8`` for the int8 variant, see
    runtime.engine.models `served_folder_name`)."""
    return f"{MODELS_MOUNT}/{served_folder_name(engine.model, engine.quantization)}"


def model_folder_name(engine: EngineConfig) -> str:
    """The name of the engine's model folder under the models mount (or ./models)."""
    return PurePosixPath(model_path_in_image(engine)).name


def container_memory_mib(needed: ReplicaResources) -> int:
    """Memory of one replica's container in MiB, rounded up: the limit in docker compose, the
    request and limit in Kubernetes (from `runtime.engine.sizing.engine_resources`)."""
    return math.ceil(needed.memory_gib * 1024)


def router_command(deploy_path: str) -> list[str]:
    """The argv of the router: ``fmtune serve DEPLOY.yaml`` on all interfaces, port 8000."""
    return ["fmtune", "serve", deploy_path, "--host", ALL_INTERFACES, "--port", str(SERVER_PORT)]


# --------------------------------------------------------------------------------------------
# Names and endpoints
# --------------------------------------------------------------------------------------------


def dns_label(text: str, max_length: int = DNS_LABEL_MAX) -> str:
    """A DNS-1123 label made from any text: lowercase alphanumerics and '-', <= 63 chars."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    label = re.sub(r"-{2,}", "-", label).strip("-")[:max_length].rstrip("-")
    return label or "x"


def resource_names(deployment: Deployment, prefix: str = "vllm") -> dict[str, str]:
    """A unique DNS-1123 name per model key (``vllm-<key>``); keys that sanitize to the same
    name get a short hash of the key appended."""
    base = {key: dns_label(f"{prefix}-{key}") for key in deployment.models}
    names: dict[str, str] = {}
    for key, name in base.items():
        if list(base.values()).count(name) > 1:
            suffix = hashlib.sha256(key.encode()).hexdigest()[:6]
            name = f"{dns_label(name, DNS_LABEL_MAX - 7)}-{suffix}"
        names[key] = name
    return names


def replica_count(deployment: Deployment, key: str) -> int:
    """Replicas rendered for a model key: its count, or 1 for 'auto' (marked on the output)."""
    replicas = deployment.models[key].replicas
    return 1 if replicas == "auto" else int(replicas)


def as_endpoints_deployment(
    deployment: Deployment, urls_by_key: Mapping[str, Sequence[str]]
) -> Deployment:
    """The same deployment served by existing servers: cluster 'endpoints' with these URLs."""
    missing = sorted(set(deployment.models) - set(urls_by_key))
    unknown = sorted(set(urls_by_key) - set(deployment.models))
    if missing or unknown:
        raise ConfigError(
            f"urls_by_key must name exactly the model keys {sorted(deployment.models)}, "
            f"got missing={missing} unknown={unknown}"
        )
    data = deployment.model_dump(mode="json")
    data["cluster"] = "endpoints"
    for key, urls in urls_by_key.items():
        data["models"][key]["endpoints"] = list(urls)
    return Deployment.model_validate(data)


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings as literal blocks and no anchors or aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(data: Any) -> str:
    """YAML text of plain data, keys in insertion order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=100)


def dump_yaml_all(documents: Sequence[Any]) -> str:
    """A multi-document YAML text."""
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, width=100)
