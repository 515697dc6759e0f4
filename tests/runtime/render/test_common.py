"""What the renderers share: model folders in containers, names and endpoint deployments."""

from __future__ import annotations

import pytest

from runtime.engine.config import EngineConfig
from runtime.errors import ConfigError
from runtime.render.common import as_endpoints_deployment, dns_label, model_path_in_image
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
