"""One vLLM OpenAI-compatible server process: start, readiness, metrics, memory, stop.

A replica runs in its own process group (vLLM spawns an engine-core and a worker process), so
stopping it stops all of them. No replica outlives the fmtune process that started it:
- normal exit and exceptions: `stop()` in the caller's `finally`/context manager, and an
  atexit hook that stops every live replica;
- Ctrl-C and SIGTERM: the CLI turns them into exceptions, so the paths above run;
- SIGKILL of fmtune: a tiny watchdog (runtime.engine.reaper), started in its own session beside
  each replica, notices the owner is gone and stops the group.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from runtime.engine.config import EngineConfig
from runtime.engine.models import served_model
from runtime.engine.reaper import group_alive
from runtime.errors import EngineFailure

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 25
GIB = 1024**3
STARTING_STOP_GRACE_S = 2.0
"""Longest wait between SIGTERM and SIGKILL for a replica stopped before it served."""
DEV_MODE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
"""What a replica's server needs to expose POST /reset_prefix_cache: vLLM's own benchmark
sweep (vllm.benchmarks.sweep.server) starts its servers so, to measure each run from the same
cache state. Replicas listen on the loopback interface only."""
PREFIX_RESET_TRIES = 5
"""How often a prefix-cache reset is asked for before giving up: vLLM refuses it while
blocks are held (a request still finishing, e.g. one the client already gave up on)."""


class ReplicaStartError(EngineFailure):
    """A replica did not become ready; the message ends with the tail of its log."""


@dataclass(frozen=True)
class ReplicaMetrics:
    """Typed values scraped from a replica's Prometheus /metrics (counters are totals)."""

    kv_cache_usage: float
    num_requests_running: float
    num_requests_waiting: float
    num_preemptions: float
    prefix_cache_queries: float
    prefix_cache_hits: float
    generation_tokens: float
    prompt_tokens: float
    spec_decode_num_drafts: float
    spec_decode_num_draft_tokens: float
    spec_decode_num_accepted_tokens: float

    @property
    def spec_decode_acceptance_rate(self) -> float | None:
        """Accepted over proposed draft tokens; None without speculation."""
        if self.spec_decode_num_draft_tokens <= 0:
            return None
        return self.spec_decode_num_accepted_tokens / self.spec_decode_num_draft_tokens


#: ReplicaMetrics field -> vLLM metric family name (counters without their _total suffix).
_METRIC_FAMILIES: dict[str, str] = {
    "kv_cache_usage": "vllm:kv_cache_usage_perc",
    "num_requests_running": "vllm:num_requests_running",
    "num_requests_waiting": "vllm:num_requests_waiting",
    "num_preemptions": "vllm:num_preemptions",
    "prefix_cache_queries": "vllm:prefix_cache_queries",
    "prefix_cache_hits": "vllm:prefix_cache_hits",
    "generation_tokens": "vllm:generation_tokens",
    "prompt_tokens": "vllm:prompt_tokens",
    "spec_decode_num_drafts": "vllm:spec_decode_num_drafts",
    "spec_decode_num_draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "spec_decode_num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
}


def parse_metrics(text: str) -> ReplicaMetrics:
    """ReplicaMetrics from Prometheus exposition text; absent families read as 0.

    Samples are summed over label sets (several engines or models behind one server).
    """
    wanted = {family: field for field, family in _METRIC_FAMILIES.items()}
    values = dict.fromkeys(_METRIC_FAMILIES, 0.0)
    for family in text_string_to_metric_families(text):
        field = wanted.get(family.name)
        if field is None:
            continue
        for sample in family.samples:
            if sample.name in (family.name, family.name + "_total"):
                values[field] += float(sample.value)
    return ReplicaMetrics(**values)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file (empty when it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


class Replica:
    """A real vLLM server for one EngineConfig, on a free loopback port."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        startup_timeout_s: float = 420.0,
        stop_grace_s: float = 10.0,
        host: str = "127.0.0.1",
        log_dir: Path | None = None,
        replica_id: str | None = None,
        extra_env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.extra_env = dict(extra_env or {})
        """Placement settings beside the config's own (e.g. the CPU core to compute on)."""
        self.extra_args = tuple(extra_args)
        """Server flags beside the config's own that change what it reports, not what it
        computes (the profiler's per-step log); not part of the config or its hash."""
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.host = host
        self.replica_id = replica_id or f"{config.config_hash()}-{os.getpid()}-{id(self):x}"
        self.log_dir = log_dir or Path(tempfile.gettempdir()) / "fmtune-replicas"
        self.log_path = self.log_dir / f"{self.replica_id}.log"
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._reaper: subprocess.Popen[bytes] | None = None
        self.start_s: float | None = None
        """Seconds from launch until the server answered (cold-start time)."""
        self.last_used: float = time.monotonic()

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The server's URL (valid once started)."""
        if self.port is None:
            raise RuntimeError(f"replica {self.replica_id} is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's pid, which is also its process-group id."""
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> Replica:
        """Launch the server and block until it answers /v1/models (or raise). A quantization
        served from a checkpoint is served from the model's variant, written first if missing."""
        if self.process is not None:
            raise RuntimeError(f"replica {self.replica_id} was already started")
        model_path = str(served_model(self.config.model, self.config.quantization))
        self.port = free_port(self.host)
        self.start_s = None  # not serving until _wait_ready returns
        argv = self.config.server_argv(sys.executable, model_path, self.host, self.port)
        argv.extend(self.extra_args)
        env = {
            **os.environ, **self.config.environment(), **DEV_MODE_ENV, **self.extra_env,
            "PYTHONUNBUFFERED": "1",
        }  # fmt: skip
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logger.info("starting replica %s on port %d: %s", self.replica_id, self.port, argv)
        launched = time.monotonic()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        _LIVE.add(self)
        self._start_reaper()
        try:
            self._wait_ready(launched)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - launched
        self.last_used = time.monotonic()
        logger.info("replica %s ready in %.1fs", self.replica_id, self.start_s)
        return self

    def _start_reaper(self) -> None:
        assert self.process is not None
        self._reaper = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runtime.engine.reaper",
                str(os.getpid()),
                str(self.process.pid),
                str(self.stop_grace_s),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait_ready(self, launched: float) -> None:
        """Poll /v1/models until the server answers, its process exits or the timeout passes.

        One client for the whole wait: a new httpx client per poll builds a new SSL context
        each time (~0.1 s of CPU), which over a cold start took cycles from the engine loading
        beside it on these 2 cores.
        """
        deadline = launched + self.startup_timeout_s
        url = f"{self.base_url}/v1/models"
        with httpx.Client(timeout=2.0) as client:
            self._poll_until_ready(client, url, deadline)

    def _poll_until_ready(self, client: httpx.Client, url: str, deadline: float) -> None:
        while True:
            process = self.process  # None once stop() ran in another thread (pool closing)
            if process is None:
                raise ReplicaStartError(
                    f"replica of '{self.config.model}' was stopped before it was ready"
                )
            code = process.poll()
            if code is not None:
                raise ReplicaStartError(
                    f"replica of '{self.config.model}' exited with code {code} before it was "
                    f"ready; log {self.log_path}, last lines:\n{tail(self.log_path)}"
                )
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ReplicaStartError(
                    f"replica of '{self.config.model}' not ready after "
                    f"{self.startup_timeout_s:.0f}s (startup_timeout_s); log {self.log_path}, "
                    f"last lines:\n{tail(self.log_path)}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL once the grace period is over.

        One grace period in all, for the server and every process of its group. A replica
        that is not serving yet (stopped during its start, e.g. by Ctrl-C) gets at most
        STARTING_STOP_GRACE_S: it has no request to finish, and vLLM often does not act on
        SIGTERM while it loads weights or compiles, so a longer wait would only delay exit.
        """
        process, self.process = self.process, None
        _LIVE.discard(self)
        if process is not None:
            pgid = process.pid
            serving = self.start_s is not None
            grace = self.stop_grace_s if serving else min(self.stop_grace_s, STARTING_STOP_GRACE_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            # poll() reaps the leader, which group_alive would otherwise see as a zombie
            while (process.poll() is None or group_alive(pgid)) and time.monotonic() < deadline:
                time.sleep(0.05)
            if process.poll() is None or group_alive(pgid):
                if serving:
                    logger.warning("replica %s ignored SIGTERM; killing it", self.replica_id)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            logger.info("replica %s stopped", self.replica_id)
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            with contextlib.suppress(ProcessLookupError):
                reaper.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                reaper.wait(timeout=5)

    def __enter__(self) -> Replica:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def reset_prefix_cache(self, timeout_s: float = 10.0, wait_s: float = 0.5) -> bool:
        """Empty the server's prefix cache (vLLM's POST /reset_prefix_cache), so that what
        is measured next does not hit the blocks of prompts sent before: a hot replica that
        served the same dataset items in an earlier trial would otherwise answer their
        prefills from the cache. Returns whether the server reported success; refused resets
        (blocks still held) are retried PREFIX_RESET_TRIES times ``wait_s`` apart."""
        url = f"{self.base_url}/reset_prefix_cache"
        for attempt in range(PREFIX_RESET_TRIES):
            try:
                response = httpx.post(url, timeout=timeout_s)
            except httpx.HTTPError as error:
                logger.warning("replica %s: prefix cache not reset: %s", self.replica_id, error)
                return False
            if response.status_code != 200:
                logger.warning(
                    "replica %s: prefix cache not reset: HTTP %d from %s",
                    self.replica_id, response.status_code, url,
                )  # fmt: skip
                return False
            if bool(response.json().get("success")):
                return True
            if attempt + 1 < PREFIX_RESET_TRIES:
                time.sleep(wait_s)
        logger.warning(
            "replica %s: prefix cache not reset: the server refused %d times (blocks held)",
            self.replica_id, PREFIX_RESET_TRIES,
        )  # fmt: skip
        return False

    # --- observation ---------------------------------------------------------------------

    def healthy(self, timeout_s: float = 2.0) -> bool:
        """Whether the server is alive and its /health answers 200."""
        if not self.running():
            return False
        try:
            return httpx.get(f"{self.base_url}/health", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics_text(self, timeout_s: float = 5.0) -> str:
        """The raw Prometheus exposition text of /metrics."""
        response = httpx.get(f"{self.base_url}/metrics", timeout=timeout_s)
        response.raise_for_status()
        return response.text

    def metrics(self, timeout_s: float = 5.0) -> ReplicaMetrics:
        """Typed engine metrics scraped now."""
        return parse_metrics(self.metrics_text(timeout_s))

    async def ametrics(self, client: httpx.AsyncClient) -> ReplicaMetrics:
        """Typed engine metrics scraped without blocking the event loop."""
        response = await client.get(f"{self.base_url}/metrics", timeout=5.0)
        response.raise_for_status()
        return parse_metrics(response.text)

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its children, in bytes."""
        if self.process is None:
            return 0
        return process_tree_rss(self.process.pid)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The end of the server's log, for error reports and artifacts."""
        return tail(self.log_path, lines)


def process_tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += process.memory_info().rss
    return total


class _LiveReplicas:
    """Every started, not yet stopped replica of this process (for the atexit hook)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replicas: set[Replica] = set()

    def add(self, replica: Replica) -> None:
        with self._lock:
            self._replicas.add(replica)

    def discard(self, replica: Replica) -> None:
        with self._lock:
            self._replicas.discard(replica)

    def snapshot(self) -> list[Replica]:
        with self._lock:
            return list(self._replicas)


_LIVE = _LiveReplicas()


def live_replicas() -> list[Replica]:
    """Replicas this process started and has not stopped."""
    return _LIVE.snapshot()


def stop_all_replicas() -> None:
    """Stop every live replica of this process (atexit, signal handlers)."""
    for replica in _LIVE.snapshot():
        with contextlib.suppress(Exception):
            replica.stop()


atexit.register(stop_all_replicas)
