"""Kubernetes rendering of a deployment: a Deployment and a Service per model key, the router.

Each model key's pods run `container_command` (the image's program as ``command``, the rest
as ``args``) with the engine's environment, request (and are limited to) the memory and cores
of `runtime.engine.sizing.engine_resources` (the rule that also prices replicas), and mount
the model folders from a PersistentVolumeClaim. The router sees one
endpoint per model key: its Service, which spreads calls over the pods.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

from runtime.deployment import Deployment
from runtime.engine.config import EngineConfig
from runtime.engine.sizing import engine_resources
from runtime.errors import ConfigError
from runtime.render.commands import container_command
from runtime.render.common import (
    COMPONENT_LABEL,
    CONFIG_HASH_LABEL,
    CUDA_IMAGE,
    DEFAULT_CPU_IMAGE,
    DEFAULT_MODELS_CLAIM,
    DEFAULT_ROUTER_IMAGE,
    DNS_LABEL_MAX,
    MODEL_KEY_LABEL,
    MODELS_MOUNT,
    NAME_LABEL,
    REPLICAS_ANNOTATION,
    ROUTER_DEPLOY_PATH,
    SERVER_PORT,
    as_endpoints_deployment,
    container_memory_mib,
    dns_label,
    dump_yaml_all,
    replica_count,
    resource_names,
    router_command,
)

#: Seconds a vLLM server may take to load its model and warm up before probes count.
STARTUP_GRACE_S = {"cpu": 60, "cuda": 120}

_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")


def _label_value(text: str) -> str:
    """A valid label value for text (itself when valid, else its DNS label)."""
    return text if _LABEL_VALUE.match(text) and len(text) <= DNS_LABEL_MAX else dns_label(text)


def _probe(path: str, **timing: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, **timing}


def _vllm_resources(engine: EngineConfig) -> dict[str, Any]:
    needed = engine_resources(engine)
    memory = f"{container_memory_mib(needed)}Mi"
    if engine.device == "cuda":
        gpus = str(needed.gpus)
        return {
            "requests": {"memory": memory, "nvidia.com/gpu": gpus},
            "limits": {"nvidia.com/gpu": gpus},
        }
    cores = str(needed.cpu_cores)
    return {
        "requests": {"cpu": cores, "memory": memory},
        "limits": {"cpu": cores, "memory": memory},
    }


def _vllm_manifests(
    deployment: Deployment,
    key: str,
    name: str,
    namespace: str,
    models_claim: str,
) -> list[dict[str, Any]]:
    model = deployment.models[key]
    engine = model.engine
    program, arguments = container_command(engine)
    selector = {NAME_LABEL: "fmtune", MODEL_KEY_LABEL: _label_value(key)}
    labels = {**selector, COMPONENT_LABEL: "vllm", CONFIG_HASH_LABEL: engine.config_hash()}
    annotations = {MODEL_KEY_LABEL: key}
    if model.replicas == "auto":
        annotations[REPLICAS_ANNOTATION] = "auto"
    grace = STARTUP_GRACE_S[engine.device]
    container = {
        "name": "vllm",
        "image": CUDA_IMAGE if engine.device == "cuda" else DEFAULT_CPU_IMAGE,
        "command": program,
        "args": arguments,
        "env": [{"name": var, "value": value} for var, value in engine.environment().items()],
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "resources": _vllm_resources(engine),
        "startupProbe": _probe("/health", periodSeconds=10, failureThreshold=90),
        "readinessProbe": _probe(
            "/health", initialDelaySeconds=grace, periodSeconds=10, failureThreshold=3
        ),
        "livenessProbe": _probe(
            "/health", initialDelaySeconds=grace, periodSeconds=30, failureThreshold=3
        ),
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    metadata = {"name": name, "namespace": namespace, "labels": labels}
    workload = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {**metadata, "annotations": annotations},
        "spec": {
            "replicas": replica_count(deployment, key),
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "models",
                            "persistentVolumeClaim": {"claimName": models_claim, "readOnly": True},
                        },
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {**metadata, "annotations": {MODEL_KEY_LABEL: key}},
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": SERVER_PORT, "targetPort": "http"}],
        },
    }
    return [workload, service]


def _router_manifests(
    routed: Deployment, namespace: str, router_image: str
) -> list[dict[str, Any]]:
    labels = {NAME_LABEL: "fmtune", COMPONENT_LABEL: "router"}
    metadata = {"name": "fmtune-router", "namespace": namespace, "labels": labels}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {"DEPLOY.yaml": routed.to_yaml()},
    }
    container = {
        "name": "router",
        "image": router_image,
        "command": router_command(ROUTER_DEPLOY_PATH),
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 10},
        "volumeMounts": [
            {"name": "deploy", "mountPath": str(PurePosixPath(ROUTER_DEPLOY_PATH).parent)}
        ],
    }
    workload = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    "volumes": [{"name": "deploy", "configMap": {"name": "fmtune-router"}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "selector": labels,
            "ports": [{"name": "http", "port": SERVER_PORT, "targetPort": "http"}],
        },
    }
    return [config_map, workload, service]


def kubernetes_manifests(
    deployment: Deployment,
    namespace: str = "default",
    *,
    models_claim: str = DEFAULT_MODELS_CLAIM,
    router_image: str = DEFAULT_ROUTER_IMAGE,
    with_router: bool = True,
) -> list[dict[str, Any]]:
    """Kubernetes objects: per model key an apps/v1 Deployment and a v1 Service (port 8000),
    then (with_router) the router's ConfigMap, Deployment and Service.

    The router sees one endpoint per model key (its Service, which spreads calls over the
    pods); replica counts 'auto' render as 1 with the annotation ``fmtune.io/replicas: auto``.
    """
    if dns_label(namespace) != namespace:
        raise ConfigError(f"namespace must be a DNS-1123 label, got '{namespace}'")
    names = resource_names(deployment)
    manifests: list[dict[str, Any]] = []
    for key in deployment.models:
        manifests.extend(_vllm_manifests(deployment, key, names[key], namespace, models_claim))
    if with_router:
        routed = as_endpoints_deployment(
            deployment,
            {key: [f"http://{name}.{namespace}.svc:{SERVER_PORT}"] for key, name in names.items()},
        )
        manifests.extend(_router_manifests(routed, namespace, router_image))
    return manifests


def write_kubernetes(deployment: Deployment, path: Path, namespace: str = "default") -> Path:
    """Write the manifests as one multi-document YAML file."""
    path.write_text(dump_yaml_all(kubernetes_manifests(deployment, namespace)))
    return path
