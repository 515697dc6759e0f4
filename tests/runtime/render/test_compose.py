"""docker compose files rendered from a Deployment."""

from __future__ import annotations

import yaml

from runtime.deployment import Deployment, ModelDeployment
from runtime.engine.config import EngineConfig
from runtime.render.common import CUDA_IMAGE, DEFAULT_CPU_IMAGE
from runtime.render.compose import compose_file
from tests.runtime.render.samples import CPU_ENGINE, cpu_deployment, cuda_deployment


def test_compose_file_cpu() -> None:
    compose = yaml.safe_load(yaml.safe_dump(compose_file(cpu_deployment())))
    services = compose["services"]
    assert set(services) == {"vllm-llm-0", "vllm-llm-1", "vllm-judge-model-0", "fmtune-router"}
    llm = services["vllm-llm-0"]
    assert llm["image"] == f"${{FMTUNE_VLLM_CPU_IMAGE:-{DEFAULT_CPU_IMAGE}}}"
    assert llm["entrypoint"] == []
    assert llm["command"] == CPU_ENGINE.server_argv(
        "python3", "/models/smollm2-135m", "0.0.0.0", 8000, launcher="module"
    )
    assert llm["environment"] == CPU_ENGINE.environment()
    assert llm["volumes"] == ["./models:/models:ro"]
    assert "/health" in " ".join(llm["healthcheck"]["test"])
    assert "deploy" not in llm
    assert services["vllm-judge-model-0"]["labels"]["fmtune.io/replicas"] == "auto"
    router = services["fmtune-router"]
    assert router["command"][:2] == ["fmtune", "serve"]
    assert router["command"][-4:] == ["--host", "0.0.0.0", "--port", "8000"]
    assert set(router["depends_on"]) == set(services) - {"fmtune-router"}
    routed = Deployment.model_validate(
        yaml.safe_load(compose["configs"]["fmtune-deploy"]["content"])
    )
    assert routed.cluster == "endpoints"
    assert routed.models["llm"].endpoints == ("http://vllm-llm-0:8000", "http://vllm-llm-1:8000")
    assert routed.models["Judge_Model"].endpoints == ("http://vllm-judge-model-0:8000",)


def test_compose_file_cuda_reserves_gpus() -> None:
    services = compose_file(cuda_deployment())["services"]
    llm = services["vllm-llm-0"]
    assert llm["image"] == CUDA_IMAGE
    assert llm["command"][:3] == ["vllm", "serve", "/models/smollm2-135m"]
    assert llm["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 2, "capabilities": ["gpu"]}
    ]
    assert "VLLM_CPU_KVCACHE_SPACE" not in llm["environment"]


def test_compose_escapes_dollars() -> None:
    deployment = Deployment(models={"llm": ModelDeployment(engine=EngineConfig(model="/m/$weird"))})
    command = compose_file(deployment)["services"]["vllm-llm-0"]["command"]
    assert "--served-model-name" in command
    assert command[command.index("--served-model-name") + 1] == "/m/$$weird"
