"""docker compose rendering of a deployment: one vLLM service per replica and the router.

The vLLM services run `container_argv` with the engine's environment and a memory limit
from `runtime.engine.sizing.engine_resources` (the rule that also prices replicas); the
``fmtune-router`` service runs ``fmtune serve`` over them with the deployment rewritten to
their URLs (an inline compose config, so compose v2.23 or later).
"""

from __future__ import annotations

from typing import Any

from runtime.deployment import Deployment
from runtime.engine.config import EngineConfig
from runtime.engine.sizing import engine_resources
from runtime.render.commands import container_argv
from runtime.render.common import (
    COMPONENT_LABEL,
    CONFIG_HASH_LABEL,
    CPU_IMAGE_VARIABLE,
    CUDA_IMAGE,
    DEFAULT_CPU_IMAGE,
    DEFAULT_ROUTER_IMAGE,
    MODEL_KEY_LABEL,
    MODELS_MOUNT,
    NAME_LABEL,
    REPLICAS_ANNOTATION,
    ROUTER_DEPLOY_PATH,
    ROUTER_IMAGE_VARIABLE,
    SERVER_PORT,
    as_endpoints_deployment,
    container_memory_mib,
    replica_count,
    resource_names,
    router_command,
)

_HEALTH_PROBE = (
    f"import urllib.request; urllib.request.urlopen('http://localhost:{SERVER_PORT}/health')"
)


def _compose_escape(value: str) -> str:
    """Compose interpolates ``$``; a literal dollar is written ``$$``."""
    return value.replace("$", "$$")


def compose_service_names(deployment: Deployment) -> dict[str, list[str]]:
    """The compose service of each replica, by model key (``vllm-<key>-<index>``)."""
    names = resource_names(deployment)
    return {
        key: [f"{names[key]}-{index}" for index in range(replica_count(deployment, key))]
        for key in deployment.models
    }


def _compose_vllm_service(engine: EngineConfig, key: str, auto: bool) -> dict[str, Any]:
    labels = {
        NAME_LABEL: "fmtune",
        MODEL_KEY_LABEL: key,
        CONFIG_HASH_LABEL: engine.config_hash(),
    }
    if auto:
        labels[REPLICAS_ANNOTATION] = "auto"
    service: dict[str, Any] = {
        "image": CUDA_IMAGE
        if engine.device == "cuda"
        else f"${{{CPU_IMAGE_VARIABLE}:-{DEFAULT_CPU_IMAGE}}}",
        "entrypoint": [],
        "command": [_compose_escape(word) for word in container_argv(engine)],
        "environment": {
            name: _compose_escape(value) for name, value in engine.environment().items()
        },
        "mem_limit": f"{container_memory_mib(engine_resources(engine))}m",
        "volumes": [f"./models:{MODELS_MOUNT}:ro"],
        "expose": [str(SERVER_PORT)],
        "labels": labels,
        "healthcheck": {
            "test": ["CMD", "python3", "-c", _HEALTH_PROBE],
            "interval": "10s",
            "timeout": "5s",
            "retries": 5,
            "start_period": "15m",
        },
        "restart": "unless-stopped",
    }
    if engine.device == "cuda":
        service["ipc"] = "host"
        service["deploy"] = {
            "resources": {
                "reservations": {
                    "devices": [
                        {
                            "driver": "nvidia",
                            "count": engine.tensor_parallel_size,
                            "capabilities": ["gpu"],
                        }
                    ]
                }
            }
        }
    else:
        service["shm_size"] = "4gb"
    return service


def compose_file(deployment: Deployment) -> dict[str, Any]:
    """A docker compose file: one vLLM service per replica of each model key, and the
    ``fmtune-router`` service serving the deployment over them on host port 8000."""
    services: dict[str, Any] = {}
    replicas = compose_service_names(deployment)
    for key, model in deployment.models.items():
        for name in replicas[key]:
            services[name] = _compose_vllm_service(model.engine, key, model.replicas == "auto")
    routed = as_endpoints_deployment(
        deployment,
        {
            key: [f"http://{name}:{SERVER_PORT}" for name in names]
            for key, names in replicas.items()
        },
    )
    services["fmtune-router"] = {
        "image": f"${{{ROUTER_IMAGE_VARIABLE}:-{DEFAULT_ROUTER_IMAGE}}}",
        "entrypoint": [],
        "command": router_command(ROUTER_DEPLOY_PATH),
        "configs": [{"source": "fmtune-deploy", "target": ROUTER_DEPLOY_PATH}],
        "ports": [f"{SERVER_PORT}:{SERVER_PORT}"],
        "labels": {NAME_LABEL: "fmtune", COMPONENT_LABEL: "router"},
        "depends_on": {
            name: {"condition": "service_healthy"} for names in replicas.values() for name in names
        },
        "restart": "unless-stopped",
    }
    return {
        "name": "fmtune",
        "services": services,
        "configs": {"fmtune-deploy": {"content": _compose_escape(routed.to_yaml())}},
    }
