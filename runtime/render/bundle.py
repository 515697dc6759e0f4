"""Render a Deployment into files people deploy: vLLM commands, docker compose, Kubernetes.

Every vLLM command line comes from `EngineConfig.server_argv` and every server environment
from `EngineConfig.environment`; the renderers add only what each form of deployment needs
around them (where the model is mounted, ports, health checks, device reservations). A bundle
(`write_bundle`) is:

- ``DEPLOY.yaml``: the deployment itself (``fmtune serve DEPLOY.yaml`` starts it locally),
- ``vllm-commands.sh``: one ``vllm`` server command per replica, for any machine
  (runtime.render.commands),
- ``docker-compose.yaml``: one service per replica plus the ``fmtune-router`` service
  (runtime.render.compose),
- ``kubernetes.yaml``: a Deployment and a Service per model key plus the router
  (runtime.render.kubernetes),
- ``README.md``: how to run each form, the engine knobs per model, the trial's metrics
  (runtime.render.readme).

Model folders are mounted under ``/models`` in containers (``/models/<catalog name>``, or the
basename of a local model folder); the compose file mounts ``./models`` there and Kubernetes
a PersistentVolumeClaim (``fmtune-models`` unless told). What the renderers share (ports,
mounts, images, names, labels, YAML) is in runtime.render.common.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.deployment import Deployment
from runtime.render.commands import vllm_script
from runtime.render.common import dump_yaml, dump_yaml_all
from runtime.render.compose import compose_file
from runtime.render.kubernetes import kubernetes_manifests
from runtime.render.readme import bundle_readme

BUNDLE_FILES = (
    "DEPLOY.yaml",
    "vllm-commands.sh",
    "docker-compose.yaml",
    "kubernetes.yaml",
    "README.md",
)


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
