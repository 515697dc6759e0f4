"""vLLM server command lines of a deployment: in container images, and as a shell script.

Every command is `EngineConfig.server_argv` (its flags `EngineConfig.cli_args`, its
environment `EngineConfig.environment`); this module only chooses the launcher, model path,
host and port of each form and quotes the result for POSIX shells.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence

from runtime.deployment import Deployment
from runtime.engine.config import EngineConfig, Launcher
from runtime.render.common import (
    ALL_INTERFACES,
    SERVER_PORT,
    model_folder_name,
    model_path_in_image,
    replica_count,
)

#: The interpreter of the vLLM images (what the module launcher runs).
IMAGE_PYTHON = "python3"

_MODEL_PATH_SENTINEL = "FMTUNE_MODEL_PATH_SENTINEL"


def default_launcher(engine: EngineConfig) -> Launcher:
    """The launcher each build needs: the CPU build's `vllm` console script is unusable."""
    return "vllm" if engine.device == "cuda" else "module"


def container_command(engine: EngineConfig) -> tuple[list[str], list[str]]:
    """(program, arguments) of this engine's server in its image: the image's launcher, the
    model folder under the models mount, all interfaces, port 8000."""
    launcher = default_launcher(engine)
    return (
        engine.server_program(IMAGE_PYTHON, launcher),
        engine.server_args(model_path_in_image(engine), ALL_INTERFACES, SERVER_PORT, launcher),
    )


def container_argv(engine: EngineConfig) -> list[str]:
    """The whole argv of this engine's server in its image (see container_command)."""
    program, arguments = container_command(engine)
    return [*program, *arguments]


def shell_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """One shell line: ``VAR=value ... argv`` with every word quoted for POSIX shells."""
    assignments = [f"{name}={shlex.quote(value)}" for name, value in (env or {}).items()]
    return " ".join([*assignments, shlex.join(argv)])


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
            argv = engine.server_argv(
                IMAGE_PYTHON,
                _MODEL_PATH_SENTINEL,
                ALL_INTERFACES,
                port,
                launcher=default_launcher(engine),
            )
            command = shell_command(argv, env).replace(
                _MODEL_PATH_SENTINEL,
                f'"$FMTUNE_MODELS_DIR"/{shlex.quote(model_folder_name(engine))}',
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
