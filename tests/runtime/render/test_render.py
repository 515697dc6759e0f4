"""Deploy files rendered from a Deployment: vLLM commands, compose, Kubernetes, bundles.

Kubernetes manifests are validated against the Kubernetes OpenAPI schemas shipped offline by
the kubernetes-validate package (strict mode: unknown fields are errors too).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from runtime.deployment import AppSpec, Deployment, ModelDeployment, load_deployment
from runtime.engine.config import VLLM_SERVER_MODULE, EngineConfig
from runtime.errors import ConfigError
from runtime.render.bundle import (
    CUDA_IMAGE,
    DEFAULT_CPU_IMAGE,
    as_endpoints_deployment,
    compose_file,
    dns_label,
    kubernetes_manifests,
    model_path_in_image,
    shell_command,
    vllm_command,
    vllm_script,
    write_bundle,
    write_kubernetes,
)

K8S_VERSION = "1.30"
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

CPU_ENGINE = EngineConfig(
    model="smollm2-135m",
    block_size=64,
    max_num_seqs=16,
    enable_prefix_caching=False,
    speculative_method="ngram",
    num_speculative_tokens=3,
    prompt_lookup_max=4,
    kv_cache_space_gib=2,
)
CUDA_ENGINE = EngineConfig(
    model="smollm2-135m", device="cuda", tensor_parallel_size=2, gpu_memory_utilization=0.8
)


def cpu_deployment() -> Deployment:
    return Deployment(
        models={
            "llm": ModelDeployment(engine=CPU_ENGINE, replicas=2),
            "Judge_Model": ModelDeployment(
                engine=EngineConfig(model="/data/models/my-model"), replicas="auto"
            ),
        },
        apps={"extract": AppSpec(architecture="judge", model_key="llm")},
    )


def cuda_deployment() -> Deployment:
    return Deployment(models={"llm": ModelDeployment(engine=CUDA_ENGINE, replicas=1)})


def validate_k8s(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


# --- commands ---------------------------------------------------------------------------------


def test_vllm_command_renders_exactly_the_engine_cli_args() -> None:
    argv = vllm_command(CPU_ENGINE, "/models/smollm2-135m", port=8123)
    assert argv[:3] == ["vllm", "serve", "/models/smollm2-135m"]
    assert argv[3:9] == [
        "--served-model-name", "smollm2-135m", "--host", "0.0.0.0", "--port", "8123",
    ]  # fmt: skip
    assert argv[9:] == CPU_ENGINE.cli_args()
    assert "--no-enable-prefix-caching" in argv
    assert argv[argv.index("--block-size") + 1] == "64"
    speculative = json.loads(argv[argv.index("--speculative-config") + 1])
    assert speculative == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}


def test_module_launcher_matches_the_engine_server_argv() -> None:
    argv = vllm_command(CPU_ENGINE, "/m", host="127.0.0.1", port=9000, launcher="module")
    assert argv[:5] == ["python3", "-m", VLLM_SERVER_MODULE, "--model", "/m"]
    assert argv == CPU_ENGINE.server_argv("python3", "/m", host="127.0.0.1", port=9000)


def test_environment_and_shell_command_round_trip() -> None:
    env = CPU_ENGINE.environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    argv = vllm_command(CPU_ENGINE, "/models/with space's", launcher="module")
    line = shell_command(argv, env)
    words = shlex.split(line)
    assert words == [f"{name}={value}" for name, value in env.items()] + argv
    assert shell_command(["echo", "a b"]) == "echo 'a b'"


def test_model_path_in_image() -> None:
    assert model_path_in_image(CPU_ENGINE) == "/models/smollm2-135m"
    assert model_path_in_image(EngineConfig(model="/data/x/my-model/")) == "/models/my-model"
    assert model_path_in_image(EngineConfig(model="rel/folder")) == "/models/folder"


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


# --- endpoints and compose ----------------------------------------------------------------


def test_as_endpoints_deployment() -> None:
    deployment = cpu_deployment()
    urls = {"llm": ["http://a:8000", "http://b:8000"], "Judge_Model": ["http://c:8000"]}
    routed = as_endpoints_deployment(deployment, urls)
    assert routed.cluster == "endpoints"
    assert routed.models["llm"].endpoints == ("http://a:8000", "http://b:8000")
    assert routed.models["llm"].engine == deployment.models["llm"].engine
    assert routed.apps == deployment.apps
    with pytest.raises(ConfigError, match="missing=\\['Judge_Model'\\]"):
        as_endpoints_deployment(deployment, {"llm": ["http://a:8000"]})


def test_compose_file_cpu() -> None:
    compose = yaml.safe_load(yaml.safe_dump(compose_file(cpu_deployment())))
    services = compose["services"]
    assert set(services) == {"vllm-llm-0", "vllm-llm-1", "vllm-judge-model-0", "fmtune-router"}
    llm = services["vllm-llm-0"]
    assert llm["image"] == f"${{FMTUNE_VLLM_CPU_IMAGE:-{DEFAULT_CPU_IMAGE}}}"
    assert llm["entrypoint"] == []
    assert llm["command"] == vllm_command(CPU_ENGINE, "/models/smollm2-135m", launcher="module")
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


# --- Kubernetes ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [cpu_deployment, cuda_deployment], ids=["cpu", "cuda"])
def test_kubernetes_manifests_validate_against_the_schema(make: Any) -> None:
    deployment = make()
    manifests = kubernetes_manifests(deployment, namespace="llm-apps")
    kinds = [(m["apiVersion"], m["kind"]) for m in manifests]
    assert kinds.count(("apps/v1", "Deployment")) == len(deployment.models) + 1
    assert kinds.count(("v1", "Service")) == len(deployment.models) + 1
    for manifest in manifests:
        validate_k8s(manifest)
        assert DNS_1123_LABEL.match(manifest["metadata"]["name"]), manifest["metadata"]["name"]
        assert manifest["metadata"]["namespace"] == "llm-apps"
        for value in manifest["metadata"]["labels"].values():
            assert re.match(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$", value)


def test_kubernetes_cpu_details() -> None:
    manifests = kubernetes_manifests(cpu_deployment())
    by_name = {(m["kind"], m["metadata"]["name"]): m for m in manifests}
    llm = by_name["Deployment", "vllm-llm"]
    labels = llm["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "fmtune"
    assert labels["fmtune.io/model-key"] == "llm"
    assert labels["fmtune.io/config-hash"] == CPU_ENGINE.config_hash()
    assert llm["spec"]["replicas"] == 2
    container = llm["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] + container["args"] == vllm_command(
        CPU_ENGINE, "/models/smollm2-135m", launcher="module"
    )
    assert {e["name"]: e["value"] for e in container["env"]} == CPU_ENGINE.environment()
    resources = container["resources"]
    assert resources["requests"]["memory"] == f"{math.ceil((3.6 + 2) * 1024)}Mi"
    assert set(resources["limits"]) == {"cpu", "memory"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["initialDelaySeconds"] >= 30
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    volumes = llm["spec"]["template"]["spec"]["volumes"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "fmtune-models",
                                                        "readOnly": True}} in volumes  # fmt: skip
    judge = by_name["Deployment", "vllm-judge-model"]
    assert judge["spec"]["replicas"] == 1
    assert judge["metadata"]["annotations"]["fmtune.io/replicas"] == "auto"
    assert judge["metadata"]["annotations"]["fmtune.io/model-key"] == "Judge_Model"
    service = by_name["Service", "vllm-llm"]
    assert service["spec"]["ports"][0]["port"] == 8000
    assert service["spec"]["selector"].items() <= labels.items()
    routed = Deployment.model_validate(
        yaml.safe_load(by_name["ConfigMap", "fmtune-router"]["data"]["DEPLOY.yaml"])
    )
    assert routed.models["llm"].endpoints == ("http://vllm-llm.default.svc:8000",)


def test_kubernetes_cuda_requests_gpus() -> None:
    workload = kubernetes_manifests(cuda_deployment(), with_router=False)[0]
    container = workload["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == CUDA_IMAGE
    assert container["command"] == ["vllm", "serve"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}


def test_broken_manifests_fail_validation() -> None:
    workload = kubernetes_manifests(cuda_deployment(), with_router=False)[0]
    broken = {**workload, "spec": {**workload["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(broken)
    misspelt = {**workload, "spec": {**workload["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(misspelt)


def test_names_are_dns_labels_and_unique() -> None:
    assert dns_label("Judge_Model") == "judge-model"
    assert dns_label("_x__y-") == "x-y"
    assert len(dns_label("a" * 100)) == 63
    engine = EngineConfig(model="smollm2-135m")
    deployment = Deployment(
        models={"a_b": ModelDeployment(engine=engine), "a-b": ModelDeployment(engine=engine)}
    )
    names = [m["metadata"]["name"] for m in kubernetes_manifests(deployment, with_router=False)]
    assert len(set(names)) == 2  # two keys, each a Deployment and Service of one name
    assert all(DNS_1123_LABEL.match(name) for name in names)
    with pytest.raises(ConfigError, match="namespace"):
        kubernetes_manifests(deployment, namespace="Bad_NS")


# --- bundle -------------------------------------------------------------------------------


def test_write_bundle(tmp_path: Path) -> None:
    deployment = cpu_deployment()
    metrics = {"p99_e2e_s": 3.14159, "sla_attainment": 0.97, "cost_per_1k_requests": 0.42}
    paths = write_bundle(deployment, tmp_path / "bundle", metrics=metrics, title="Trial 7")
    assert [p.name for p in paths] == [
        "DEPLOY.yaml", "vllm-commands.sh", "docker-compose.yaml", "kubernetes.yaml", "README.md",
    ]  # fmt: skip
    assert all(p.is_file() for p in paths)
    assert load_deployment(paths[0]) == deployment
    script = paths[1].read_text()
    assert script.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script
    assert os.access(paths[1], os.X_OK)
    compose = yaml.safe_load(paths[2].read_text())
    assert "fmtune-router" in compose["services"]
    documents = list(yaml.safe_load_all(paths[3].read_text()))
    assert documents == kubernetes_manifests(deployment)
    for document in documents:
        validate_k8s(document)
    readme = paths[4].read_text()
    assert readme.startswith("# Trial 7")
    for name in metrics:
        assert name in readme
    assert "| p99_e2e_s | 3.142 |" in readme
    assert "| block_size | 64 |" in readme
    assert CPU_ENGINE.config_hash() in readme
    assert "docker compose up" in readme and "kubectl apply" in readme


def test_write_kubernetes(tmp_path: Path) -> None:
    path = write_kubernetes(cuda_deployment(), tmp_path / "k8s.yaml")
    documents = list(yaml.safe_load_all(path.read_text()))
    assert [d["kind"] for d in documents] == [
        "Deployment", "Service", "ConfigMap", "Deployment", "Service",
    ]  # fmt: skip
