"""What the renderers share: model folders in containers, names and endpoint deployments."""

from __future__ import annotations

import math

import pytest

from runtime.deployment import Deployment, ModelDeployment
from runtime.engine.config import EngineConfig
from runtime.engine.sizing import GIB, RUNTIME_MEMORY_GIB
from runtime.errors import ConfigError
from runtime.render.common import as_endpoints_deployment, dns_label, model_path_in_image
from runtime.render.compose import compose_file
from runtime.render.kubernetes import kubernetes_manifests
from tests.runtime.conftest import MakeModelFolder
from tests.runtime.render.samples import CPU_ENGINE, cpu_deployment


def test_model_path_in_image() -> None:
    assert model_path_in_image(CPU_ENGINE) == "/models/smollm2-135m"
    assert model_path_in_image(EngineConfig(model="/data/x/my-model/")) == "/models/my-model"
    assert model_path_in_image(EngineConfig(model="rel/folder")) == "/models/folder"


def test_dns_label() -> None:
    assert dns_label("Judge_Model") == "judge-model"
    assert dns_label("_x__y-") == "x-y"
    assert len(dns_label("a" * 100)) == 63


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


def test_compose_and_kubernetes_size_memory_from_the_model_and_kv_cache(
    make_model_folder: MakeModelFolder,
) -> None:
    """Both container forms get the sizing rule's memory: weights as served (4 GiB of
    float32 served in bfloat16: 2 GiB) + KV cache + runtime, the same MiB in each form."""
    folders = {"small": make_model_folder("small", 4 * GIB, "float32"),
               "large": make_model_folder("large", 12 * GIB, "float32")}  # fmt: skip
    limits: dict[str, tuple[str, str]] = {}
    for name, folder in folders.items():
        engine = EngineConfig(model=str(folder), dtype="bfloat16", kv_cache_space_gib=2)
        deployment = Deployment(models={"llm": ModelDeployment(engine=engine)})
        service = compose_file(deployment)["services"]["vllm-llm-0"]
        pod = kubernetes_manifests(deployment, with_router=False)[0]["spec"]["template"]["spec"]
        limits[name] = (service["mem_limit"], pod["containers"][0]["resources"]["limits"]["memory"])
    small_mib = math.ceil((2 + 2 + RUNTIME_MEMORY_GIB) * 1024)
    assert limits["small"] == (f"{small_mib}m", f"{small_mib}Mi")
    assert limits["large"] == (f"{small_mib + 4 * 1024}m", f"{small_mib + 4 * 1024}Mi")
