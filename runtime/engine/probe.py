"""Probe one engine: fixed-length chat load at a given concurrency, measured end to end.

Used by `fmtune probe` and the engine benchmark. Every request generates exactly max_tokens
(vLLM's ignore_eos), so throughput numbers compare across knobs. While the load runs, the
replica's /metrics and resident memory are sampled to find the peaks.

`run_probe` loads a server that is already up; `probe_config` is the whole round trip for one
EngineConfig (start a replica, probe it, stop it), so callers never hold a replica themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from runtime.engine.client import CallRecord, EngineClient, SamplingParams
from runtime.engine.config import EngineConfig
from runtime.engine.replica import GIB, Replica, parse_metrics
from runtime.stats import percentiles

logger = logging.getLogger(__name__)

PROBE_PROMPTS: tuple[str, ...] = (
    "Explain in a few sentences why the sky is blue.",
    "Write a short poem about a lighthouse keeper.",
    "List three practical tips for learning a new language.",
    "Describe how a bicycle gear system works.",
    "Summarize the plot of a detective story you invent.",
    "What are the benefits of drinking water regularly?",
    "Give a recipe for a simple tomato soup.",
    "Explain what a database index is to a beginner.",
)


@dataclass(frozen=True)
class ProbeResult:
    """What a probe measured; `metrics()` is the flat dict written to metrics.json."""

    records: tuple[CallRecord, ...]
    wall_s: float
    kv_cache_usage_peak: float | None
    rss_peak_gib: float | None
    replica_start_s: float | None
    concurrency: int

    def metrics(self) -> dict[str, float | int | None]:
        """Percentiles and throughput over the successful calls."""
        ok = [record for record in self.records if record.ok]
        ttft = [record.ttft_s for record in ok if record.ttft_s is not None]
        tpot = [record.tpot_s for record in ok if record.tpot_s is not None]
        e2e = [record.e2e_s for record in ok]
        tokens = sum(record.completion_tokens for record in ok)
        latency = {
            f"{name}_{key}_s": value
            for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e))
            for key, value in percentiles(values, (50, 99)).items()
        }
        return {
            "requests": len(self.records),
            "errors": len(self.records) - len(ok),
            "concurrency": self.concurrency,
            "wall_s": self.wall_s,
            **latency,
            "output_tokens": tokens,
            "output_tokens_per_s": tokens / self.wall_s if self.wall_s > 0 else None,
            "kv_cache_usage_peak": self.kv_cache_usage_peak,
            "rss_peak_gib": self.rss_peak_gib,
            "replica_start_s": self.replica_start_s,
        }


async def _sample_peaks(
    base_url: str, replica: Replica | None, peaks: dict[str, float], interval_s: float
) -> None:
    """Record the highest KV-cache usage and resident memory until cancelled."""
    async with httpx.AsyncClient(timeout=5.0) as http:
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = await http.get(f"{base_url}/metrics")
                usage = parse_metrics(response.text).kv_cache_usage
                peaks["kv"] = max(peaks.get("kv", 0.0), usage)
            if replica is not None:
                peaks["rss"] = max(peaks.get("rss", 0.0), replica.rss_bytes() / GIB)
            await asyncio.sleep(interval_s)


async def run_probe(
    base_url: str,
    model: str,
    *,
    requests: int,
    concurrency: int,
    max_tokens: int,
    replica: Replica | None = None,
    on_done: Callable[[CallRecord], None] | None = None,
    sample_interval_s: float = 0.25,
) -> ProbeResult:
    """Send `requests` chat calls, `concurrency` at a time, and measure them."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    gate = asyncio.Semaphore(concurrency)
    peaks: dict[str, float] = {}
    async with EngineClient(base_url) as client:

        async def one(index: int) -> CallRecord:
            prompt = PROBE_PROMPTS[index % len(PROBE_PROMPTS)]
            async with gate:
                record = await client.chat(model, [{"role": "user", "content": prompt}], sampling)
            if on_done is not None:
                on_done(record)
            return record

        sampler = asyncio.create_task(_sample_peaks(base_url, replica, peaks, sample_interval_s))
        started = time.monotonic()
        try:
            records = await asyncio.gather(*(one(index) for index in range(requests)))
        finally:
            wall = time.monotonic() - started
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
    return ProbeResult(
        records=tuple(records),
        wall_s=wall,
        kv_cache_usage_peak=peaks.get("kv"),
        rss_peak_gib=peaks.get("rss"),
        replica_start_s=None if replica is None else replica.start_s,
        concurrency=concurrency,
    )


def probe_config(
    config: EngineConfig,
    *,
    requests: int,
    concurrency: int,
    max_tokens: int,
    startup_timeout_s: float = 420.0,
    on_ready: Callable[[float, str], None] | None = None,
    on_done: Callable[[CallRecord], None] | None = None,
) -> ProbeResult:
    """Start a replica of `config`, probe it, and stop it, also on errors and interrupts.

    `on_ready(start_s, base_url)` is called once the replica answers, before the load starts.
    A replica that cannot start raises ReplicaStartError (an EngineFailure).
    """
    replica = Replica(config, startup_timeout_s=startup_timeout_s)
    try:
        replica.start()
        logger.info("probing %s at %s", config.model, replica.base_url)
        if on_ready is not None:
            on_ready(replica.start_s or 0.0, replica.base_url)
        return asyncio.run(
            run_probe(
                replica.base_url,
                config.model,
                requests=requests,
                concurrency=concurrency,
                max_tokens=max_tokens,
                replica=replica,
                on_done=on_done,
            )
        )
    finally:
        replica.stop()
