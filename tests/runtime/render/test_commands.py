"""vLLM server command lines rendered for containers and for the shell script."""

from __future__ import annotations

import json
import shlex

import pytest

from runtime.deployment import Deployment, ModelDeployment
from runtime.engine.config import VLLM_SERVER_MODULE, EngineConfig
from runtime.errors import ConfigError
from runtime.render.commands import (
    container_argv,
    container_command,
    shell_command,
    vllm_script,
)
from tests.runtime.render.samples import CPU_ENGINE, CUDA_ENGINE, cpu_deployment


def test_vllm_launcher_renders_exactly_the_engine_cli_args() -> None:
    argv = CPU_ENGINE.server_argv(
        "python3", "/models/smollm2-135m", "0.0.0.0", 8123, launcher="vllm"
    )
    assert argv[:3] == ["vllm", "serve", "/models/smollm2-135m"]
    assert argv[3:9] == [
        "--served-model-name", "smollm2-135m", "--host", "0.0.0.0", "--port", "8123",
    ]  # fmt: skip
    assert argv[9:] == CPU_ENGINE.cli_args()
    assert "--no-enable-prefix-caching" in argv
    assert argv[argv.index("--block-size") + 1] == "64"
    speculative = json.loads(argv[argv.index("--speculative-config") + 1])
    assert speculative == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}


def test_launchers_differ_only_in_the_program_and_how_the_model_is_passed() -> None:
    module = CPU_ENGINE.server_argv("python3", "/m", "127.0.0.1", 9000)
    assert module[:5] == ["python3", "-m", VLLM_SERVER_MODULE, "--model", "/m"]
    console = CPU_ENGINE.server_argv("python3", "/m", "127.0.0.1", 9000, launcher="vllm")
    assert module[5:] == console[3:]
    with pytest.raises(ConfigError, match="launcher must be 'module' or 'vllm'"):
        CPU_ENGINE.server_argv("python3", "/m", launcher="docker")  # type: ignore[arg-type]


def test_container_command_uses_the_image_launcher_mount_and_all_interfaces() -> None:
    program, arguments = container_command(CPU_ENGINE)
    assert program == ["python3", "-m", VLLM_SERVER_MODULE]  # the CPU build needs the module
    assert container_argv(CPU_ENGINE) == [*program, *arguments]
    assert container_argv(CPU_ENGINE) == CPU_ENGINE.server_argv(
        "python3", "/models/smollm2-135m", "0.0.0.0", 8000
    )
    program, arguments = container_command(CUDA_ENGINE)
    assert program == ["vllm", "serve"]
    assert arguments[0] == "/models/smollm2-135m"
    assert container_argv(CUDA_ENGINE) == CUDA_ENGINE.server_argv(
        "python3", "/models/smollm2-135m", "0.0.0.0", 8000, launcher="vllm"
    )


def test_environment_and_shell_command_round_trip() -> None:
    env = CPU_ENGINE.environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    argv = CPU_ENGINE.server_argv("python3", "/models/with space's", "0.0.0.0", 8000)
    line = shell_command(argv, env)
    words = shlex.split(line)
    assert words == [f"{name}={value}" for name, value in env.items()] + argv
    assert shell_command(["echo", "a b"]) == "echo 'a b'"


def test_script_has_one_command_per_replica_and_gpus_per_replica() -> None:
    script = vllm_script(cpu_deployment())
    commands = [line for line in script.splitlines() if line.endswith(" &")]
    assert len(commands) == 3  # llm x2 + auto rendered as 1
    assert [shlex.split(c)[shlex.split(c).index("--port") + 1] for c in commands] == [
        "8000", "8001", "8002",
    ]  # fmt: skip
    assert CPU_ENGINE.config_hash() in script
    gpu = Deployment(models={"llm": ModelDeployment(engine=CUDA_ENGINE, replicas=2)})
    cuda_lines = [line for line in vllm_script(gpu).splitlines() if line.endswith(" &")]
    assert "CUDA_VISIBLE_DEVICES=0,1 " in cuda_lines[0]
    assert "CUDA_VISIBLE_DEVICES=2,3 " in cuda_lines[1]
    assert all(line.split("vllm serve")[0].count("=") == 3 for line in cuda_lines)


def test_script_reads_model_folders_from_the_models_dir() -> None:
    engine = EngineConfig(model="/data/models/my model")
    script = vllm_script(Deployment(models={"llm": ModelDeployment(engine=engine)}))
    (command,) = [line for line in script.splitlines() if line.endswith(" &")]
    assert "--model \"$FMTUNE_MODELS_DIR\"/'my model' " in command
    words = shlex.split(command.replace('"$FMTUNE_MODELS_DIR"', "/opt/models"))
    assert words[words.index("--model") + 1] == "/opt/models/my model"
