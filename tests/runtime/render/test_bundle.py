"""A whole deployment bundle: the five files, the README with knobs and metrics."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from runtime.deployment import Deployment, ModelDeployment, load_deployment
from runtime.engine.config import EngineConfig
from runtime.engine.sizing import engine_resources
from runtime.render.bundle import write_bundle
from runtime.render.commands import container_argv
from runtime.render.common import container_memory_mib
from runtime.render.kubernetes import kubernetes_manifests
from tests.runtime.render.samples import CPU_ENGINE, cpu_deployment, validate_k8s


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


def test_an_int8_engine_serves_its_variant_in_every_form(tmp_path: Path, fmtune_home: Path) -> None:
    dense = EngineConfig(model="smollm2-135m", kv_cache_space_gib=1)
    int8 = dense.with_knobs(quantization="int8")
    deployment = Deployment(
        models={
            "llm": ModelDeployment(engine=int8, replicas=1),
            "judge": ModelDeployment(engine=dense, replicas=1),
        }
    )
    paths = write_bundle(deployment, tmp_path / "bundle")
    served = ["--model", "/models/smollm2-135m-int8"]
    quantization = ["--quantization", "compressed-tensors"]
    command = container_argv(int8)
    assert command[3:5] == served and " ".join(quantization) in " ".join(command)
    assert '"$FMTUNE_MODELS_DIR"/smollm2-135m-int8 ' in paths[1].read_text()
    services = yaml.safe_load(paths[2].read_text())["services"]
    assert services["vllm-llm-0"]["command"] == command
    assert services["vllm-judge-0"]["command"][3:5] == ["--model", "/models/smollm2-135m"]
    # sized with int8 linear weights: less memory than the same model dense
    int8_memory = container_memory_mib(engine_resources(int8))
    assert int8_memory < container_memory_mib(engine_resources(dense))
    assert services["vllm-llm-0"]["mem_limit"] == f"{int8_memory}m"
    readme = paths[4].read_text()
    assert "fmtune models prepare smollm2-135m --quantization int8" in readme
    assert "fmtune models prepare smollm2-135m\n" in readme  # the judge's dense folder
    assert 'fmtune}/models/smollm2-135m-int8" models/' in readme
