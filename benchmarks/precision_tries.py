"""Precision tries on vLLM's CPU build: does a server start with this option, and how fast is it.

`try NAME MODEL [vLLM options...]` starts one OpenAI-compatible server (eager, 2048-token
context, 32 sequences, VLLM_CPU_KVCACHE_SPACE=1, offline) on MODEL with the options, and
records: the outcome (works | failed | timeout), seconds until /v1/models answered, one chat
answer (temperature 0), output tokens/s of 8 concurrent 64-token streams, resident memory
of the server and its workers, vLLM's "CPU KV cache size" line, or vLLM's last error lines
when it did not start. The server is stopped (its whole process group) before the script
exits, on SIGTERM too. One JSON line per try is appended to --out (docs/precision-cpu.md
holds the table made of them).

`int8-checkpoint SRC DST` writes the W8A8 int8 compressed-tensors checkpoint of a dense model
folder (replacing DST) with runtime.engine.quantize, the writer behind the `int8` quantization
knob (per-output-channel symmetric round-to-nearest int8 weights of every `*_proj` layer,
dynamic per-token int8 activations). The 8-bit weight-only (W8A16, pack-quantized) writer of
the try that failed (docs/precision-cpu.md, row 6) was dropped; it is in git history
(commit ff376dc).

Run tries under the engine lane, e.g.
  flock /tmp/fmtune-engine.lock timeout 300 .venv/bin/python benchmarks/precision_tries.py \
      try kv_fp8 ~/.cache/fmtune/models/smollm2-135m --dtype bfloat16 --kv-cache-dtype fp8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from runtime.engine.probe import run_probe
from runtime.engine.quantize import write_w8a8_checkpoint

PORT = 8790
START_LIMIT_S = 150.0
SERVER = "vllm.entrypoints.openai.api_server"
QUESTION = "What is the capital of France? Answer in one sentence."


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server's whole process group (the engine core and workers too)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with contextlib.suppress(ProcessLookupError):  # stragglers of the group
        os.killpg(process.pid, signal.SIGKILL)


def _wait_ready(process: subprocess.Popen[bytes], started: float) -> bool:
    """Whether /v1/models answered before the server exited or START_LIMIT_S passed."""
    while time.monotonic() - started < START_LIMIT_S and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/v1/models", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def _measure(process: subprocess.Popen[bytes]) -> dict[str, Any]:
    """One chat answer, tokens/s of 8 streams of 64 tokens, and resident memory."""
    reply = httpx.post(
        f"http://127.0.0.1:{PORT}/v1/chat/completions",
        timeout=120,
        json={
            "model": "m",
            "temperature": 0,
            "max_tokens": 40,
            "messages": [{"role": "user", "content": QUESTION}],
        },
    )
    ok = reply.status_code == 200
    answer = reply.json()["choices"][0]["message"]["content"] if ok else reply.text[:300]
    base_url = f"http://127.0.0.1:{PORT}"
    result = asyncio.run(run_probe(base_url, "m", requests=8, concurrency=8, max_tokens=64))
    server = psutil.Process(process.pid)
    rss = sum(p.memory_info().rss for p in [server, *server.children(recursive=True)])
    return {
        "answer": answer,
        "tok_s_c8": round(float(result.metrics()["output_tokens_per_s"] or 0.0), 1),
        "rss_gib": round(rss / 2**30, 2),
    }


def try_option(name: str, model: str, options: list[str], logs: Path) -> dict[str, Any]:
    """Start, measure and stop one server; the record of what happened."""
    argv = [
        sys.executable, "-m", SERVER, "--model", model, "--served-model-name", "m",
        "--host", "127.0.0.1", "--port", str(PORT), "--enforce-eager",
        "--max-model-len", "2048", "--max-num-seqs", "32", *options,
    ]  # fmt: skip
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    record: dict[str, Any] = {"name": name, "command": " ".join(["python -m", SERVER, *argv[3:]])}
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        up = _wait_ready(process, started)
        record["start_s"] = round(time.monotonic() - started, 1)
        text = log_path.read_text()
        if not up:
            errors = [
                line
                for line in text.splitlines()
                if re.search(r"Error|Exception|error:|NotImplemented", line)
                and "Traceback" not in line
            ]
            record["outcome"] = "failed" if process.poll() is not None else "timeout"
            record["error"] = errors[-3:] or text.splitlines()[-5:]
            return record
        record.update(_measure(process))
        record["outcome"] = "works"
        sizes = re.findall(r"CPU KV cache size: ([\d,]+) tokens", log_path.read_text())
        record["kv_cache_tokens"] = sizes[-1] if sizes else None
        return record
    finally:
        _stop(process)


def main() -> None:
    """Run one try, or write one int8 checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("try", help="Start, measure and stop one server.")
    one.add_argument("name")
    one.add_argument("model")
    one.add_argument("--out", type=Path, default=Path("reports/precision_tries.jsonl"))
    one.add_argument("--logs", type=Path, default=Path("/tmp/precision_tries"))
    checkpoint = commands.add_parser("int8-checkpoint", help="Write a W8A8 int8 checkpoint.")
    checkpoint.add_argument("source", type=Path)
    checkpoint.add_argument("target", type=Path)
    args, options = parser.parse_known_args()
    if args.command == "int8-checkpoint":
        if args.target.exists():
            shutil.rmtree(args.target)
        written = write_w8a8_checkpoint(args.source, args.target)
        print(f"{written.folder}: {written.layers} linear layers in int8 (W8A8, int-quantized)")
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run `finally`: stop the server
    record = try_option(args.name, args.model, options, args.logs)
    print(json.dumps(record), flush=True)
    with args.out.open("a") as sink:
        sink.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
