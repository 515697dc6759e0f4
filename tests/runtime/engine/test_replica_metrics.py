"""Parsing vLLM's Prometheus exposition into typed replica metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.engine.replica import parse_metrics, tail

DATA = Path(__file__).parent / "data"


def test_parses_gauges_and_counters_by_vllm_name() -> None:
    metrics = parse_metrics((DATA / "vllm_metrics.txt").read_text())
    assert metrics.num_requests_running == 3.0
    assert metrics.num_requests_waiting == 2.0
    assert metrics.kv_cache_usage == pytest.approx(0.0442)
    assert metrics.num_preemptions == 1.0
    assert (metrics.prefix_cache_queries, metrics.prefix_cache_hits) == (640.0, 256.0)
    assert metrics.generation_tokens == 1024.0
    assert metrics.spec_decode_num_drafts == 10.0
    assert metrics.spec_decode_acceptance_rate == pytest.approx(0.4)


def test_sums_over_engines_and_reads_absent_families_as_zero() -> None:
    text = (
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 5.0\n'
    )
    metrics = parse_metrics(text)
    assert metrics.num_requests_running == 7.0
    assert metrics.kv_cache_usage == 0.0 and metrics.spec_decode_acceptance_rate is None


def test_tail_returns_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(log, 3).splitlines() == ["line 97", "line 98", "line 99"]
    assert tail(tmp_path / "missing.log") == ""
