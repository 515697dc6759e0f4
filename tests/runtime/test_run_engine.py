"""Real runs of the extraction app on the shared hot replica of the bundled model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from runtime.engine.pool import ReplicaPool
from runtime.engine.replica import Replica
from runtime.run import execute_run, load_run_spec, write_run

pytestmark = pytest.mark.engine
EXTRACT = Path(__file__).resolve().parents[2] / "experiments" / "extract-cpu.yaml"


def test_single_and_parallel_runs_measure_what_differs(
    engine_pool: ReplicaPool, hot_replica: Replica, tmp_path: Path
) -> None:
    common = {"workload.num_requests": 4, "workload.arrivals.users": 2}
    single = load_run_spec(EXTRACT, {**common, "app.architecture": "single"})
    assert single.deployment.models["llm"].engine == hot_replica.config  # reuses the hot one
    parallel = load_run_spec(EXTRACT, {**common, "app.architecture": "parallel"})
    one = execute_run(single, engine_pool)
    three = execute_run(parallel, engine_pool)
    assert engine_pool.replicas() == [hot_replica]

    for result in (one, three):
        m = result.metrics
        assert m.num_requests == 4 and m.error_rate == 0.0
        assert m.quality is not None and 0.0 <= m.quality <= 1.0
        assert m.e2e_p50_s is not None and m.e2e_p50_s > 0
        assert m.ttft_p50_s is not None and m.tpot_p50_s is not None
        assert m.sla_attainment is not None and m.cost_per_1k_usd is not None
        assert m.cost_per_1k_usd > 0 and m.peak_memory_gib is not None
        assert m.peak_memory_gib > 0.5
    assert one.metrics.llm_calls_per_request == 1.0
    assert three.metrics.llm_calls_per_request == 3.0

    # parallel sub-questions of one request overlap in time on the real engine
    trace = three.trace
    request = trace[(trace["request_id"] == 0) & (trace["kind"] == "llm")]
    assert len(request) == 3
    assert request["start_s"].max() < request["end_s"].min()

    paths = write_run(three, tmp_path)
    loaded = pd.read_parquet(tmp_path / "trace.parquet")
    assert len(loaded) == len(trace) and {"ttft_s", "request_quality"} <= set(loaded.columns)
    assert [p.name for p in paths] == ["metrics.json", "trace.parquet"]
