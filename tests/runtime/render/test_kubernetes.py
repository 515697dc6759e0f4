"""Kubernetes manifests rendered from a Deployment, validated against the API schemas."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from runtime.deployment import Deployment, ModelDeployment
from runtime.engine.config import EngineConfig
from runtime.engine.sizing import engine_resources
from runtime.errors import ConfigError
from runtime.render.common import CUDA_IMAGE
from runtime.render.kubernetes import kubernetes_manifests, write_kubernetes
from tests.runtime.render.samples import (
    CPU_ENGINE,
    DNS_1123_LABEL,
    cpu_deployment,
    cuda_deployment,
    validate_k8s,
)


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
    assert container["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert container["command"] + container["args"] == CPU_ENGINE.server_argv(
        "python3", "/models/smollm2-135m", "0.0.0.0", 8000, launcher="module"
    )
    assert {e["name"]: e["value"] for e in container["env"]} == CPU_ENGINE.environment()
    resources = container["resources"]
    needed = engine_resources(CPU_ENGINE)
    assert resources["requests"]["memory"] == f"{math.ceil(needed.memory_gib * 1024)}Mi"
    assert resources["requests"] == resources["limits"]
    assert resources["requests"]["cpu"] == str(needed.cpu_cores)
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
    engine = EngineConfig(model="smollm2-135m")
    deployment = Deployment(
        models={"a_b": ModelDeployment(engine=engine), "a-b": ModelDeployment(engine=engine)}
    )
    names = [m["metadata"]["name"] for m in kubernetes_manifests(deployment, with_router=False)]
    assert len(set(names)) == 2  # two keys, each a Deployment and Service of one name
    assert all(DNS_1123_LABEL.match(name) for name in names)
    with pytest.raises(ConfigError, match="namespace"):
        kubernetes_manifests(deployment, namespace="Bad_NS")


def test_write_kubernetes(tmp_path: Path) -> None:
    path = write_kubernetes(cuda_deployment(), tmp_path / "k8s.yaml")
    documents = list(yaml.safe_load_all(path.read_text()))
    assert [d["kind"] for d in documents] == [
        "Deployment", "Service", "ConfigMap", "Deployment", "Service",
    ]  # fmt: skip
