"""The README of a deployment bundle: its files, how to run each form, engines and metrics.

Each engine's section shows its knobs and its server command exactly as the container forms
run it (`container_argv` with the engine's environment), so the README cannot disagree with
the files it describes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from runtime.capacity import CAPACITY_DETAIL, capacity_line
from runtime.deployment import Deployment
from runtime.engine.config import CHECKPOINT_QUANTIZATION
from runtime.engine.models import CATALOG, served_folder_name
from runtime.render.commands import container_argv, shell_command
from runtime.render.common import (
    CPU_IMAGE_VARIABLE,
    CUDA_IMAGE,
    DEFAULT_CPU_IMAGE,
    DEFAULT_MODELS_CLAIM,
    DEFAULT_ROUTER_IMAGE,
    MODELS_MOUNT,
    REPLICAS_ANNOTATION,
    ROUTER_IMAGE_VARIABLE,
    SERVER_PORT,
    model_folder_name,
)


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
    """The bundle's README: what it is, how to run each form, knobs and metrics (and the
    capacity in a sentence, when the metrics have runtime.capacity's)."""
    folders = sorted({model_folder_name(model.engine) for model in deployment.models.values()})
    # (catalog name, the checkpoint quantization of its served variant or "")
    catalog = sorted(
        {
            (m.engine.model, m.engine.quantization or "")
            if m.engine.quantization in CHECKPOINT_QUANTIZATION
            else (m.engine.model, "")
            for m in deployment.models.values()
            if m.engine.model in CATALOG
        }
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
            *(
                f"fmtune models prepare {name}" + (f" --quantization {method}" if method else "")
                for name, method in catalog
            ),
            *(
                f'cp -r "${{FMTUNE_HOME:-$HOME/.cache/fmtune}}/models/'
                f'{served_folder_name(name, method or None)}" models/'
                for name, method in catalog
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
            shell_command(container_argv(engine), engine.environment()),
            "```",
            "",
        ]
    capacity = capacity_line(metrics) if metrics else None
    if capacity is not None:
        lines += ["## Capacity", "", capacity, ""]
    if metrics:
        rows = [[name, value] for name, value in metrics.items() if name != CAPACITY_DETAIL]
        lines += ["## Metrics", "", *_table(["metric", "value"], rows), ""]
    return "\n".join(lines)
