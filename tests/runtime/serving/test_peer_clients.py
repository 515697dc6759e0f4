"""Real peer clients drive `fmtune serve` unchanged: GuideLLM and vLLM's `vllm bench serve`.

A real `fmtune serve` subprocess (`python -m tuner.cli serve DEPLOY.yaml --port P`) fronts one
upstream through a DEPLOY.yaml with `cluster: endpoints` (model key `llm`, served model name
`smollm2-135m`, the engine's), and each client runs a short benchmark against it exactly as
it would against `vllm serve`: its own command line, the bundled model's folder as tokenizer,
a handful of synthetic ~32-token prompts with 16-token answers, one request at a time. Each
test checks the client's own output file (every request completed, none failed) and that
fmtune's /metrics counted the requests (and, for GuideLLM, the /health check it makes first).

The upstream is the session's hot vLLM replica of the small engine (tests/conftest.py), one
`fmtune serve` for the module. Each client run takes 15-60 s on 2 cores, most of it importing
vLLM, torch and transformers. (To tell a client-side problem from an engine one, point the
same fixture at a FakeEngine from tests/runtime/fake_openai.py: the clients need nothing else.)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from runtime.engine.config import EngineConfig
from runtime.engine.models import model_dir
from runtime.engine.pool import ReplicaPool
from runtime.engine.processes import stop_process
from runtime.engine.replica import free_port
from runtime.serving.vllm_cli import vllm_cli_argv

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[3]
SERVED = "smollm2-135m"
PROMPTS = 5
INPUT_TOKENS = 32
OUTPUT_TOKENS = 16
CHAT = "/v1/chat/completions"
STARTUP_TIMEOUT_S = 180.0
CLIENT_TIMEOUT_S = 420.0
#: The clients read the tokenizer from the local folder; nothing may reach the Hub.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass
class FrontDoor:
    """A running `fmtune serve` subprocess and where it listens."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def counts(self) -> dict[tuple[str, str, str], float]:
        """fmtune_requests_total by (route, code, model_key), and the TTFT count under
        ('ttft', '', model_key) for OpenAI calls, from /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        found: dict[tuple[str, str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "fmtune_requests_total":
                    key = (labels["route"], labels["code"], labels["model_key"])
                    found[key] = found.get(key, 0.0) + sample.value
                elif (
                    sample.name == "fmtune_time_to_first_token_seconds_count" and not labels["app"]
                ):
                    found[("ttft", "", labels["model_key"])] = sample.value
        return found


def _wait_healthy(door: FrontDoor) -> None:
    """Block until the front door's /healthz answers 200 (not /health: the tests count the
    /health checks the clients make)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if door.process.poll() is not None:
            log = door.log_path.read_text(errors="replace")
            raise AssertionError(f"fmtune serve exited with {door.process.returncode}:\n{log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{door.url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"fmtune serve not healthy within {STARTUP_TIMEOUT_S:.0f}s")


@contextlib.contextmanager
def fmtune_serve(upstream_url: str, folder: Path) -> Iterator[FrontDoor]:
    """`fmtune serve` over one OpenAI-compatible upstream, stopped (SIGTERM, then SIGKILL)
    whatever happens."""
    deploy = folder / "DEPLOY.yaml"
    deploy.write_text(
        yaml.safe_dump(
            {
                "cluster": "endpoints",
                "models": {"llm": {"engine": {"model": SERVED}, "endpoints": [upstream_url]}},
            }
        )
    )
    port = free_port()
    log_path = folder / "serve.log"
    command = [sys.executable, "-m", "tuner.cli", "serve", str(deploy), "--port", str(port)]
    command += ["--sla", "300"]  # no shedding: these tests are about the clients, not admission
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **OFFLINE}, stdout=log, stderr=subprocess.STDOUT
        )
    door = FrontDoor(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_healthy(door)
        yield door
    finally:
        stop_process(process, grace_s=30.0)


@pytest.fixture(scope="module")
def front_door(
    engine_pool: ReplicaPool, small_engine: EngineConfig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FrontDoor]:
    """`fmtune serve` over the session's hot replica, shared by the module's tests."""
    upstream = engine_pool.acquire(small_engine)[0].base_url
    with fmtune_serve(upstream, tmp_path_factory.mktemp("peer")) as door:
        yield door


@pytest.fixture(scope="module")
def tokenizer(bundled_model: Path) -> Path:
    """The bundled model's folder: the clients load its tokenizer from there."""
    assert bundled_model == model_dir(SERVED)
    return bundled_model


def _run(command: list[str], folder: Path, label: str) -> str:
    """Run a client to completion in `folder`; its output, or a failure showing its tail."""
    done = subprocess.run(
        command,
        cwd=folder,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    (folder / f"{label}.log").write_text(output)
    assert done.returncode == 0, f"{label} exited with {done.returncode}:\n{output[-4000:]}"
    return output


def _delta(
    before: dict[tuple[str, str, str], float],
    after: dict[tuple[str, str, str], float],
    key: tuple[str, str, str],
) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def _chat_errors(
    before: dict[tuple[str, str, str], float], after: dict[tuple[str, str, str], float]
) -> dict[str, float]:
    """Chat answers other than 200 the front door gave during the run, by status code."""
    return {
        code: _delta(before, after, (route, code, model_key))
        for (route, code, model_key) in after
        if route == CHAT and code != "200" and _delta(before, after, (route, code, model_key))
    }


def test_guidellm_benchmarks_fmtune_serve_unchanged(
    front_door: FrontDoor, tokenizer: Path, tmp_path: Path
) -> None:
    result = tmp_path / "guidellm.json"
    guidellm = Path(sys.executable).with_name("guidellm")
    before = front_door.counts()

    _run(
        [
            str(guidellm), "run",
            "--backend", f"kind=openai_http,target={front_door.url},model={SERVED}",
            "--profile", "kind=synchronous",
            "--constraint", f"kind=max_requests,count={PROMPTS}",
            "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
            "--data",
            f"kind=synthetic_text,prompt_tokens={INPUT_TOKENS},output_tokens={OUTPUT_TOKENS}",
            "--output", f"kind=json,path={result}",
            "--disable-console-interactive",
        ],
        tmp_path,
        "guidellm",
    )  # fmt: skip

    after = front_door.counts()
    (benchmark,) = json.loads(result.read_text())["benchmarks"]
    totals = benchmark["metrics"]["request_totals"]
    assert totals == {"successful": PROMPTS, "errored": 0, "incomplete": 0, "total": PROMPTS}
    assert benchmark["scheduler_state"]["errored_requests"] == 0
    assert _delta(before, after, (CHAT, "200", "llm")) == PROMPTS  # streamed chat calls
    assert _delta(before, after, ("ttft", "", "llm")) == PROMPTS
    assert _delta(before, after, ("/health", "200", "")) >= 1  # its backend check, vLLM's route
    assert _chat_errors(before, after) == {}


def test_vllm_bench_serve_benchmarks_fmtune_serve_unchanged(
    front_door: FrontDoor, tokenizer: Path, tmp_path: Path
) -> None:
    before = front_door.counts()

    _run(
        vllm_cli_argv(
            "bench", "serve",
            "--backend", "openai-chat",
            "--endpoint", CHAT,
            "--base-url", front_door.url,
            "--model", SERVED,
            "--tokenizer", str(tokenizer),
            "--dataset-name", "random",
            "--random-input-len", str(INPUT_TOKENS),
            "--random-output-len", str(OUTPUT_TOKENS),
            "--ignore-eos",
            "--num-prompts", str(PROMPTS),
            "--max-concurrency", "1",
            "--seed", "0",
            "--ready-check-timeout-sec", "120",
            "--disable-tqdm",
            "--save-result",
            "--result-dir", str(tmp_path),
            "--result-filename", "vllm-bench.json",
        ),
        tmp_path,
        "vllm-bench",
    )  # fmt: skip

    after = front_door.counts()
    result = json.loads((tmp_path / "vllm-bench.json").read_text())
    assert (result["completed"], result["failed"]) == (PROMPTS, 0)
    assert result["total_output_tokens"] >= PROMPTS  # answers came back through the front door
    # its prompts, plus the one request of its ready check
    assert _delta(before, after, (CHAT, "200", "llm")) >= PROMPTS
    assert _delta(before, after, ("ttft", "", "llm")) >= PROMPTS
    assert _chat_errors(before, after) == {}
