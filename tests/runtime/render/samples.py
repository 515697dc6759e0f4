"""Deployments and checks shared by the render tests.

Kubernetes manifests are validated against the Kubernetes OpenAPI schemas shipped offline by
the kubernetes-validate package (strict mode: unknown fields are errors too).
"""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate

from runtime.deployment import AppSpec, Deployment, ModelDeployment
from runtime.engine.config import EngineConfig

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
    """Two CPU model keys: one with 2 replicas, one local model folder with 'auto'."""
    return Deployment(
        models={
            "llm": ModelDeployment(engine=CPU_ENGINE, replicas=2),
            "Judge_Model": ModelDeployment(
                engine=EngineConfig(model="/data/models/my-model"), replicas="auto"
            ),
        },
        apps={"extract": AppSpec(source="extraction", architecture="judge", model_key="llm")},
    )


def cuda_deployment() -> Deployment:
    """One CUDA model key of one replica sharded over 2 GPUs."""
    return Deployment(models={"llm": ModelDeployment(engine=CUDA_ENGINE, replicas=1)})


def validate_k8s(manifest: dict[str, Any]) -> None:
    """Raise kubernetes_validate.ValidationError unless the manifest fits the schema."""
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
