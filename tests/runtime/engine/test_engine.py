"""Real vLLM CPU replicas of the bundled model: start, stream, metrics, reuse, stop, reap.

These start real servers (a minute or two each on 2 cores); the session shares one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from runtime.engine.client import EngineClient, SamplingParams
from runtime.engine.config import EngineConfig
from runtime.engine.pool import ReplicaPool
from runtime.engine.reaper import pid_alive
from runtime.engine.replica import Replica, ReplicaStartError

pytestmark = pytest.mark.engine
REPO = Path(__file__).resolve().parents[3]
FMTUNE = [sys.executable, "-m", "tuner.cli"]


def group_pids(pgid: int) -> list[int]:
    pids = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.info["pid"]) == pgid:
                pids.append(process.info["pid"])
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return pids


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    alive = pids
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if pid_alive(pid)]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


async def test_streams_chat_and_completion_and_reports_metrics(hot_replica: Replica) -> None:
    assert hot_replica.healthy()
    assert hot_replica.start_s is not None and hot_replica.start_s > 0
    async with EngineClient(hot_replica.base_url) as client:
        assert await client.models() == ["smollm2-135m"]
        chat = await client.chat(
            "smollm2-135m",
            [{"role": "user", "content": "Name three colors."}],
            SamplingParams(max_tokens=16, ignore_eos=True),
        )
        completion = await client.complete(
            "smollm2-135m", "The capital of France is", SamplingParams(max_tokens=8)
        )
    assert chat.ok, chat.error
    assert chat.completion_tokens == 16 and chat.prompt_tokens > 5
    assert chat.ttft_s is not None and 0 < chat.ttft_s < chat.e2e_s
    assert len(chat.itl_s) >= 10 and all(gap >= 0 for gap in chat.itl_s)
    assert chat.finish_reason == "length" and chat.text
    assert completion.ok and completion.completion_tokens >= 1
    metrics = hot_replica.metrics()
    assert metrics.generation_tokens >= 17
    assert 0.0 <= metrics.kv_cache_usage <= 1.0
    assert hot_replica.rss_bytes() > 500 * 1024**2


async def test_a_bad_request_is_recorded_not_raised(hot_replica: Replica) -> None:
    async with EngineClient(hot_replica.base_url) as client:
        record = await client.chat(
            "no-such-model", [{"role": "user", "content": "x"}], SamplingParams()
        )
    assert not record.ok and record.error is not None and "404" in record.error


async def test_a_reset_prefix_cache_forgets_the_prompts_sent_before(hot_replica: Replica) -> None:
    # A prompt of several full blocks (block_size 128), sent twice: the second prefill hits
    # the cache. After the reset, the same prompt hits nothing: what a run measures on a hot
    # replica is its own prefills, not what an earlier trial left behind.
    prompt = " ".join(f"item {index} of a long list;" for index in range(120))
    params = SamplingParams(max_tokens=1)

    async def hits_of_one_call() -> float:
        before = hot_replica.metrics().prefix_cache_hits
        async with EngineClient(hot_replica.base_url) as client:
            record = await client.complete("smollm2-135m", prompt, params)
        assert record.ok, record.error
        return hot_replica.metrics().prefix_cache_hits - before

    await hits_of_one_call()
    assert await hits_of_one_call() >= 256  # two full blocks at least came from the cache
    assert hot_replica.reset_prefix_cache()
    assert await hits_of_one_call() == 0


def test_pool_reuses_the_hot_replica(
    engine_pool: ReplicaPool, hot_replica: Replica, small_engine: EngineConfig
) -> None:
    same = EngineConfig(**small_engine.model_dump())  # equal by value, another object
    started = time.monotonic()
    (again,) = engine_pool.acquire(same)
    assert again is hot_replica
    assert time.monotonic() - started < 5  # a health check, not a ~minute cold start


def test_probe_cli_in_endpoint_mode(hot_replica: Replica, tmp_path: Path) -> None:
    done = subprocess.run(
        [*FMTUNE, "probe", "--endpoint", hot_replica.base_url, "--requests", "4",
         "--concurrency", "2", "--max-tokens", "8", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    required = {
        "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "e2e_p50_s", "e2e_p99_s",
        "output_tokens_per_s", "kv_cache_usage_peak", "rss_peak_gib", "replica_start_s",
    }  # fmt: skip
    assert required <= set(metrics)
    assert metrics["requests"] == 4 and metrics["errors"] == 0
    assert metrics["output_tokens"] == 32 and metrics["output_tokens_per_s"] > 0


def test_start_timeout_stops_the_half_started_server(
    small_engine: EngineConfig, tmp_path: Path
) -> None:
    replica = Replica(small_engine.with_knobs(seed=7), log_dir=tmp_path, startup_timeout_s=5)
    with pytest.raises(ReplicaStartError, match=r"not ready after 5s \(startup_timeout_s\)"):
        replica.start()
    assert replica.process is None and replica.log_path.exists()
    marker = f"--port {replica.port}"
    leftovers = [
        process.pid
        for process in psutil.process_iter(["cmdline"])
        if marker in " ".join(process.info["cmdline"] or [])
    ]
    assert wait_gone(leftovers, 15) == []


@pytest.mark.stops_hot_replica
def test_hot_replica_stops_completely(engine_pool: ReplicaPool, hot_replica: Replica) -> None:
    pgid = hot_replica.pid
    assert pgid is not None
    pids = group_pids(pgid)
    assert len(pids) >= 2  # the API server and vLLM's engine processes
    engine_pool.release(hot_replica)
    assert wait_gone(pids, 15) == []


def test_failing_start_shows_the_log_tail_and_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [*FMTUNE, "probe", "--set", "max_model_len=100000", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=400, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    first = done.stderr.strip().splitlines()[0]
    assert first.startswith("error: replica of 'smollm2-135m' exited with code")
    assert "max_model_len" in done.stderr  # vLLM's own complaint, from the log tail


CHILD = """
import sys, time
from runtime.engine.config import EngineConfig
from runtime.engine.replica import Replica
replica = Replica(
    EngineConfig(model="smollm2-135m", max_model_len=1024, seed=11, enforce_eager=True)
)
replica.start()
print(replica.pid, flush=True)
time.sleep(600)
"""


def test_replica_dies_with_its_sigkilled_parent() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), "the child did not start its replica"
        pgid = int(line)
        pids = group_pids(pgid)
        assert pids, "no replica process found"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_gone(pids, 10) == [], "replica outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_interrupted_during_startup_leaves_no_replica(sig: int, tmp_path: Path) -> None:
    # output to a file, not a pipe nobody reads: a full pipe would block the CLI's exit
    output = (tmp_path / "cli.log").open("w")
    probe = subprocess.Popen(
        [*FMTUNE, "-v", "probe", "--set", f"seed={20 + sig}", "--out", str(tmp_path)],
        stdout=output, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        pgid = None
        deadline = time.monotonic() + 60
        while pgid is None and time.monotonic() < deadline:
            for process in psutil.Process(probe.pid).children(recursive=False):
                if "api_server" in " ".join(process.cmdline()):
                    pgid = process.pid
            time.sleep(0.2)
        assert pgid is not None, "the CLI never started a replica"
        time.sleep(3)
        pids = group_pids(pgid)
        probe.send_signal(sig)
        try:
            probe.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the CLI did not exit; it printed:\n{(tmp_path / 'cli.log').read_text()}")
        assert probe.returncode != 0
        assert wait_gone(pids, 15) == []
    finally:
        if probe.poll() is None:
            probe.kill()
        output.close()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_tune_interrupted_during_a_replica_start_exits_within_10s(
    sig: int, code: int, tmp_path: Path
) -> None:
    """`fmtune tune` stopped while its first replica is still starting: it exits with 128 +
    signal within 10 s of the signal (a replica not serving yet is killed after a short
    grace), names the interrupted trial and the --resume command, and leaves no replica."""
    import yaml

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"app": {"architecture": ["single", "parallel"]}}))
    data = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())
    data["name"] = "interrupted-start"
    data["deployment"]["models"]["llm"]["engine"]["seed"] = 30 + sig  # a cold start
    data["tune"].update(search_space=str(space), trials=1, sampler="random")
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(data))
    output = (tmp_path / "cli.log").open("w")
    tune = subprocess.Popen(
        [*FMTUNE, "tune", str(experiment), "--out", str(tmp_path / "out")],
        stdout=output, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        pgid = None
        deadline = time.monotonic() + 180
        while pgid is None and tune.poll() is None and time.monotonic() < deadline:
            for process in psutil.Process(tune.pid).children(recursive=False):
                if "api_server" in " ".join(process.cmdline()):
                    pgid = process.pid
            time.sleep(0.2)
        assert pgid is not None, "the CLI never started a replica"
        time.sleep(3)  # loading, not serving yet
        pids = group_pids(pgid)
        signalled = time.monotonic()
        tune.send_signal(sig)
        try:
            tune.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the CLI did not exit; it printed:\n{(tmp_path / 'cli.log').read_text()}")
        seconds = time.monotonic() - signalled
        printed = (tmp_path / "cli.log").read_text()
        assert tune.returncode == code, printed
        assert seconds < 10, f"exit took {seconds:.1f}s after the signal:\n{printed}"
        assert "during trial 0 (starting replicas)" in printed, printed
        assert "--study interrupted-start --resume" in printed, printed
        assert wait_gone(pids, 5) == []
    finally:
        if tune.poll() is None:
            tune.kill()
        output.close()
