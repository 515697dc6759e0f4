"""Render a Deployment into files people deploy: vLLM commands, docker compose, Kubernetes.

Every vLLM flag and environment variable comes from `EngineConfig.cli_args()` and
`EngineConfig.environment()`; this module adds only what each form of deployment needs around
them (where the model is mounted, ports, health checks, device reservations). A bundle is:

- ``DEPLOY.yaml``: the deployment itself (``fmtune serve DEPLOY.yaml`` starts it locally),
- ``vllm-commands.sh``: one ``vllm`` server command per replica, for any machine,
- ``docker-compose.yaml``: one service per replica plus the ``fmtune-router`` service,
- ``kubernetes.yaml``: a Deployment and a Service per model key plus the router,
- ``README.md``: how to run each form, the engine knobs per model, the trial's metrics.

Model folders are mounted under ``/models`` in containers (``/models/<catalog name>``, or the
basename of a local model folder); the compose file mounts ``./models`` there and Kubernetes
a PersistentVolumeClaim (``fmtune-models`` unless told).
"""

from __future__ import annotations

import hashlib
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml

from runtime.deployment import Deployment
from runtime.engine.config import VLLM_SERVER_MODULE, EngineConfig
from runtime.engine.models import CATALOG
from runtime.engine.pool import DEFAULT_BASE_MEMORY_GIB, estimated_memory_gib
from runtime.errors import ConfigError

Launcher = Literal["module", "vllm"]

#: Port every vLLM server and the router listen on inside their container.
SERVER_PORT = 8000
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
#: Seconds a vLLM server may take to load its model and warm up before probes count.
STARTUP_GRACE_S = {"cpu": 60, "cuda": 120}
#: CPU cores requested (and limited to) per CPU replica in Kubernetes.
DEFAULT_CPU_CORES = 2
#: Label and annotation keys.
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
MODEL_KEY_LABEL = "fmtune.io/model-key"
CONFIG_HASH_LABEL = "fmtune.io/config-hash"
REPLICAS_ANNOTATION = "fmtune.io/replicas"

_HEALTH_PROBE = (
    f"import urllib.request; urllib.request.urlopen('http://localhost:{SERVER_PORT}/health')"
)
_DNS_LABEL_MAX = 63
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")

BUNDLE_FILES = (
    "DEPLOY.yaml",
    "vllm-commands.sh",
    "docker-compose.yaml",
    "kubernetes.yaml",
    "README.md",
)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def default_launcher(engine: EngineConfig) -> Launcher:
    """The launcher each build needs: the CPU build's `vllm` console script is unusable."""
    return "vllm" if engine.device == "cuda" else "module"


#: Words of each launcher's argv that form the executable part (Kubernetes `command`).
_COMMAND_WORDS: dict[str, int] = {"vllm": 2, "module": 3}


def _launcher_prefix(launcher: Launcher, python: str) -> list[str]:
    if launcher == "vllm":
        return ["vllm", "serve"]
    if launcher == "module":
        return [python, "-m", VLLM_SERVER_MODULE, "--model"]
    raise ConfigError(f"launcher must be 'module' or 'vllm', got '{launcher}'")


def vllm_command(
    engine: EngineConfig,
    model_path: str,
    host: str = "0.0.0.0",
    port: int = SERVER_PORT,
    launcher: Launcher = "vllm",
    *,
    python: str = "python3",
) -> list[str]:
    """The argv that starts this engine's OpenAI-compatible server.

    ``launcher="vllm"`` gives ``vllm serve MODEL_PATH ...`` (the CUDA build's console script);
    ``"module"`` gives ``python3 -m vllm.entrypoints.openai.api_server --model MODEL_PATH ...``
    (what the CPU build needs). The flags are exactly ``engine.cli_args()``.
    """
    return [
        *_launcher_prefix(launcher, python),
        model_path,
        "--served-model-name",
        engine.model,
        "--host",
        host,
        "--port",
        str(port),
        *engine.cli_args(),
    ]


def shell_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """One shell line: ``VAR=value ... argv`` with every word quoted for POSIX shells."""
    assignments = [f"{name}={shlex.quote(value)}" for name, value in (env or {}).items()]
    return " ".join([*assignments, shlex.join(argv)])


def model_path_in_image(engine: EngineConfig) -> str:
    """Where the engine's model folder is mounted in containers: ``/models/<name>``."""
    if engine.model in CATALOG:
        name = engine.model
    else:
        name = PurePosixPath(Path(engine.model).expanduser().as_posix()).name or "model"
    return f"{MODELS_MOUNT}/{name}"


def _model_folder_name(engine: EngineConfig) -> str:
    return PurePosixPath(model_path_in_image(engine)).name


# --------------------------------------------------------------------------------------------
# Names and endpoints
# --------------------------------------------------------------------------------------------


def dns_label(text: str, max_length: int = _DNS_LABEL_MAX) -> str:
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
            name = f"{dns_label(name, _DNS_LABEL_MAX - 7)}-{suffix}"
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


# --------------------------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------------------------


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
    argv = vllm_command(engine, model_path_in_image(engine), launcher=default_launcher(engine))
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
        "command": [_compose_escape(word) for word in argv],
        "environment": {
            name: _compose_escape(value) for name, value in engine.environment().items()
        },
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


def router_command(deploy_path: str) -> list[str]:
    """The argv of the router: ``fmtune serve DEPLOY.yaml`` on all interfaces, port 8000."""
    return ["fmtune", "serve", deploy_path, "--host", "0.0.0.0", "--port", str(SERVER_PORT)]


# --------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------


def _label_value(text: str) -> str:
    """A valid label value for text (itself when valid, else its DNS label)."""
    return text if _LABEL_VALUE.match(text) and len(text) <= _DNS_LABEL_MAX else dns_label(text)


def _memory_quantity(gib: float) -> str:
    return f"{math.ceil(gib * 1024)}Mi"


def _probe(path: str, **timing: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, **timing}


def _vllm_resources(engine: EngineConfig, cpu_cores: int) -> dict[str, Any]:
    memory = _memory_quantity(estimated_memory_gib(engine, DEFAULT_BASE_MEMORY_GIB))
    if engine.device == "cuda":
        gpus = str(engine.tensor_parallel_size)
        return {
            "requests": {"memory": memory, "nvidia.com/gpu": gpus},
            "limits": {"nvidia.com/gpu": gpus},
        }
    cores = str(cpu_cores)
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
    cpu_cores: int,
) -> list[dict[str, Any]]:
    model = deployment.models[key]
    engine = model.engine
    launcher = default_launcher(engine)
    argv = vllm_command(engine, model_path_in_image(engine), launcher=launcher)
    split = _COMMAND_WORDS[launcher]  # `vllm serve` / `python3 -m MODULE`; the rest are args
    selector = {NAME_LABEL: "fmtune", MODEL_KEY_LABEL: _label_value(key)}
    labels = {**selector, COMPONENT_LABEL: "vllm", CONFIG_HASH_LABEL: engine.config_hash()}
    annotations = {MODEL_KEY_LABEL: key}
    if model.replicas == "auto":
        annotations[REPLICAS_ANNOTATION] = "auto"
    grace = STARTUP_GRACE_S[engine.device]
    container = {
        "name": "vllm",
        "image": CUDA_IMAGE if engine.device == "cuda" else DEFAULT_CPU_IMAGE,
        "command": argv[:split],
        "args": argv[split:],
        "env": [{"name": var, "value": value} for var, value in engine.environment().items()],
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "resources": _vllm_resources(engine, cpu_cores),
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
    cpu_cores: int = DEFAULT_CPU_CORES,
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
        manifests.extend(
            _vllm_manifests(deployment, key, names[key], namespace, models_claim, cpu_cores)
        )
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


# --------------------------------------------------------------------------------------------
# Shell script
# --------------------------------------------------------------------------------------------


_MODEL_PATH_SENTINEL = "FMTUNE_MODEL_PATH_SENTINEL"


def vllm_script(deployment: Deployment) -> str:
    """A bash script starting every replica on this machine (ports 8000, 8001, ...)."""
    lines = [
        "#!/usr/bin/env bash",
        "# vLLM servers of an fmtune deployment: one command per replica, each on its own port.",
        "# Model folders are read from $FMTUNE_MODELS_DIR (default ./models). CUDA replicas get",
        "# consecutive GPUs through CUDA_VISIBLE_DEVICES. Stop them all with Ctrl-C.",
        "set -euo pipefail",
        'FMTUNE_MODELS_DIR="${FMTUNE_MODELS_DIR:-./models}"',
        "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT INT TERM",
        "",
    ]
    port, gpu = SERVER_PORT, 0
    for key, model in deployment.models.items():
        engine = model.engine
        count = replica_count(deployment, key)
        auto = " (replicas: auto, rendered as 1)" if model.replicas == "auto" else ""
        for index in range(count):
            env = engine.environment()
            if engine.device == "cuda":
                devices = range(gpu, gpu + engine.tensor_parallel_size)
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
                gpu += engine.tensor_parallel_size
            argv = vllm_command(
                engine, _MODEL_PATH_SENTINEL, port=port, launcher=default_launcher(engine)
            )
            command = shell_command(argv, env).replace(
                _MODEL_PATH_SENTINEL,
                f'"$FMTUNE_MODELS_DIR"/{shlex.quote(_model_folder_name(engine))}',
            )
            lines += [
                f"# model key {key}, replica {index + 1} of {count}{auto}, "
                f"{engine.device}, config hash {engine.config_hash()}",
                f"{command} &",
                "",
            ]
            port += 1
    lines.append("wait")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# README and bundle
# --------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(_cell(value) for value in row) + " |" for row in rows),
    ]


def bundle_readme(
    deployment: Deployment, *, metrics: Mapping[str, Any] | None = None, title: str = ""
) -> str:
    """The bundle's README: what it is, how to run each form, knobs and metrics."""
    folders = sorted({_model_folder_name(model.engine) for model in deployment.models.values()})
    catalog = sorted(
        {m.engine.model for m in deployment.models.values() if m.engine.model in CATALOG}
    )
    lines = [
        f"# {title or 'fmtune deployment bundle'}",
        "",
        "A deployment found by fmtune, in four equivalent forms. Every vLLM flag below is "
        "rendered from the same engine configuration, so the forms serve the same engines.",
        "",
        "| file | what it is |",
        "|---|---|",
        "| `DEPLOY.yaml` | the deployment: models, engine knobs, replicas, router, apps |",
        "| `vllm-commands.sh` | one vLLM server command per replica, for one machine |",
        "| `docker-compose.yaml` | one service per replica and the `fmtune-router` service |",
        "| `kubernetes.yaml` | a Deployment and Service per model, and the router |",
        "",
        "## Models",
        "",
        f"Containers read model folders from `{MODELS_MOUNT}/<name>` "
        f"({', '.join(f'`{name}`' for name in folders)}). Put them under `./models` next to "
        "this file (the compose file mounts it; `vllm-commands.sh` reads `$FMTUNE_MODELS_DIR`, "
        "default `./models`).",
    ]
    if catalog:
        lines += [
            "",
            "Catalog models are prepared once with fmtune and copied:",
            "",
            "```bash",
            *(f"fmtune models prepare {name}" for name in catalog),
            *(
                f'cp -r "${{FMTUNE_HOME:-$HOME/.cache/fmtune}}/models/{name}" models/'
                for name in catalog
            ),
            "```",
        ]
    lines += [
        "",
        "## Run it",
        "",
        "With fmtune installed, on this machine (starts the replicas and the router):",
        "",
        "```bash",
        "fmtune serve DEPLOY.yaml",
        "```",
        "",
        "The vLLM servers alone (ports 8000, 8001, ... in the order of the script):",
        "",
        "```bash",
        "./vllm-commands.sh",
        "```",
        "",
        "docker compose (v2.23 or later: the router's deployment is an inline config). CPU "
        f"replicas use `${CPU_IMAGE_VARIABLE}` (default `{DEFAULT_CPU_IMAGE}`), CUDA replicas "
        f"`{CUDA_IMAGE}` with GPUs reserved through the NVIDIA runtime; the router needs an "
        f"image with fmtune installed, `${ROUTER_IMAGE_VARIABLE}` (default "
        f"`{DEFAULT_ROUTER_IMAGE}`). The router answers on http://localhost:{SERVER_PORT}.",
        "",
        "```bash",
        "docker compose up -d",
        "```",
        "",
        f"Kubernetes: the model folders go in the PersistentVolumeClaim `{DEFAULT_MODELS_CLAIM}`"
        " and the router image must exist in your registry (edit `kubernetes.yaml`). CUDA pods "
        "request `nvidia.com/gpu` (the NVIDIA device plugin). The router sees one endpoint per "
        "model (its Service, which spreads calls over the pods); compose gives it every replica.",
        "",
        "```bash",
        "kubectl apply -f kubernetes.yaml",
        f"kubectl port-forward service/fmtune-router {SERVER_PORT}:{SERVER_PORT}",
        "```",
        "",
        "Replica counts marked `auto` are sized and scaled by fmtune's provisioner under "
        "`fmtune serve`; the other forms start one replica of them (labelled "
        f"`{REPLICAS_ANNOTATION}: auto`).",
        "",
        "## Engines",
        "",
    ]
    for key, model in deployment.models.items():
        engine = model.engine
        rows: list[list[Any]] = [
            ["model", engine.model],
            ["device", engine.device],
            ["replicas", model.replicas],
            ["config hash", engine.config_hash()],
        ]
        rows += [[name, value] for name, value in engine.knobs().items() if name != "model"]
        lines += [
            f"### `{key}`",
            "",
            *_table(["knob", "value"], rows),
            "",
            "```bash",
            shell_command(
                vllm_command(
                    engine, model_path_in_image(engine), launcher=default_launcher(engine)
                ),
                engine.environment(),
            ),
            "```",
            "",
        ]
    if metrics:
        lines += ["## Metrics", "", *_table(["metric", "value"], list(metrics.items())), ""]
    return "\n".join(lines)


def write_bundle(
    deployment: Deployment,
    out_dir: Path,
    *,
    metrics: dict[str, Any] | None = None,
    title: str = "",
) -> list[Path]:
    """Write DEPLOY.yaml, vllm-commands.sh, docker-compose.yaml, kubernetes.yaml, README.md
    into out_dir (created if needed); returns the written paths in that order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    contents = {
        "DEPLOY.yaml": deployment.to_yaml(),
        "vllm-commands.sh": vllm_script(deployment),
        "docker-compose.yaml": dump_yaml(compose_file(deployment)),
        "kubernetes.yaml": dump_yaml_all(kubernetes_manifests(deployment)),
        "README.md": bundle_readme(deployment, metrics=metrics, title=title),
    }
    paths: list[Path] = []
    for name in BUNDLE_FILES:
        path = out_dir / name
        path.write_text(contents[name])
        paths.append(path)
    (out_dir / "vllm-commands.sh").chmod(0o755)
    return paths
