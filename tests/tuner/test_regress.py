"""`fmtune regress`: the pure comparison on synthetic numbers (including how often unchanged
noise raises a false alarm), the files and history of a night with the measurement injected,
and bad input ending with exit 2 before anything starts."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.engine.models import PREPARED_MARKER
from runtime.errors import ConfigError
from runtime.run import RunSpec, load_run_spec
from tuner.experiment import RegressSpec
from tuner.export import MEASURED_FILE
from tuner.pareto import Objective
from tuner.regress import (
    Comparison,
    Measurement,
    classify,
    compare_deployment,
    compare_objective,
    folder_checksum,
    load_baseline,
    load_bundle,
    load_export,
    run_regress,
    simulate_verdicts,
    stack_tags,
)

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
LATENCY = Objective(metric="e2e_p95_s", direction="minimize")
COST = Objective(metric="cost_per_1k_usd", direction="minimize")
QUALITY = Objective(metric="quality", direction="maximize")


# --- the rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "low", "high", "direction", "verdict"),
    [
        (1.25, 1.05, 1.5, "minimize", "regressed"),  # 25% slower, interval above 1
        (1.25, 0.95, 1.5, "minimize", "unchanged"),  # could be no change
        (1.05, 1.01, 1.09, "minimize", "unchanged"),  # real but under the 10% threshold
        (0.8, 0.7, 0.9, "minimize", "improved"),
        (0.8, 0.7, 0.9, "maximize", "regressed"),  # quality down 20%
        (1.2, 1.1, 1.3, "maximize", "improved"),
        (1.1, 1.02, 1.2, "minimize", "regressed"),  # exactly at the threshold counts
    ],
)
def test_classify(ratio: float, low: float, high: float, direction: Any, verdict: str) -> None:
    assert classify(ratio, low, high, direction, 0.10) == verdict


def test_classify_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\), got 1\.5"):
        classify(1.0, 0.9, 1.1, "minimize", 1.5)
    with pytest.raises(ValueError, match="ratio must lie in its interval"):
        classify(2.0, 0.9, 1.1, "minimize", 0.1)


def _measurement(values: Mapping[str, list[float]], quality: list[float] | None = None,
                 examples: list[int] | None = None) -> Measurement:  # fmt: skip
    if quality is not None and examples is None:
        examples = list(range(len(quality)))
    return Measurement(dict(values), examples, quality)


def test_a_slower_latency_is_named_with_its_ratio_and_interval() -> None:
    before = _measurement({"e2e_p95_s": [10.0, 10.4, 9.8]})
    after = _measurement({"e2e_p95_s": [13.1, 12.9, 13.4]})
    c = compare_objective("trial-0004", LATENCY, 0.10, before, after)
    assert c.verdict == "regressed" and c.method == "repeats"
    assert c.ratio == pytest.approx(13.1 / 10.0)
    assert c.ratio_low == pytest.approx(12.9 / 10.4) and c.ratio_high == pytest.approx(13.4 / 9.8)
    assert c.line() == "trial-0004 e2e_p95_s: regressed, ratio 1.31 [1.24, 1.37]"
    same = compare_objective("trial-0004", LATENCY, 0.10, before, before)
    assert same.verdict == "unchanged" and same.ratio == 1.0


def test_quality_is_compared_on_the_same_examples() -> None:
    """Examples differ far more from each other than the two runs do: a paired comparison
    sees a 0.1 drop on every example; an unpaired view of the same scores could not."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 1.0, 40)
    worse = base - 0.1
    c = compare_objective(
        "t", QUALITY, 0.10, _measurement({"quality": [0.65]}, base.tolist()),
        _measurement({"quality": [0.55]}, worse.tolist()),
    )  # fmt: skip
    assert c.method == "paired" and c.verdict == "regressed"
    assert c.ratio_high is not None and c.ratio_high < 1
    assert c.n_baseline == c.n_current == 40
    # other examples (a changed dataset): no pairing, the medians are compared instead
    moved = compare_objective(
        "t", QUALITY, 0.10, _measurement({"quality": [0.65]}, base.tolist()),
        _measurement({"quality": [0.55]}, worse.tolist(), examples=list(range(1, 41))),
    )  # fmt: skip
    assert moved.method == "repeats" and "examples differ" in moved.note


def test_undefined_today_is_a_regression_and_missing_baseline_is_not() -> None:
    before = _measurement({"e2e_p95_s": [10.0]})
    gone = compare_objective("t", LATENCY, 0.1, before, _measurement({}))
    assert gone.verdict == "regressed" and gone.ratio is None
    new = compare_objective("t", LATENCY, 0.1, _measurement({}), before)
    assert new.verdict == "unchanged" and "did not measure" in new.note


def test_a_deployment_that_cannot_run_regresses_on_every_objective() -> None:
    comparisons = compare_deployment(
        "t", [LATENCY, QUALITY], RegressSpec(), _measurement({}), None, "replica exited"
    )
    assert [c.verdict for c in comparisons] == ["regressed", "regressed"]
    assert all("replica exited" in c.note for c in comparisons)


def test_per_metric_thresholds_apply() -> None:
    spec = RegressSpec(thresholds={"e2e_p95_s": 0.5})
    before = _measurement({"e2e_p95_s": [10.0, 10.1, 9.9], "cost_per_1k_usd": [1.0, 1.0, 1.0]})
    after = _measurement({"e2e_p95_s": [13.0, 13.1, 12.9], "cost_per_1k_usd": [1.3, 1.3, 1.3]})
    latency, cost = compare_deployment("t", [LATENCY, COST], spec, before, after)
    assert (latency.verdict, latency.threshold) == ("unchanged", 0.5)
    assert (cost.verdict, cost.threshold) == ("regressed", 0.1)


# --- false alarms and detection ----------------------------------------------------------


def test_unchanged_noise_stays_unchanged_at_the_stated_rate() -> None:
    """The stated false-alarm behaviour, 3 baseline and 3 current repeats, 10% threshold:
    at 5% noise under 2% of unchanged nights are called regressed; at any noise the rate
    stays under the 1/20 of the rank argument (with sampling slack for 600 nights)."""
    quiet = simulate_verdicts(shift=1.0, noise_cv=0.05, n_baseline=3, n_current=3,
                              threshold=0.10, nights=600)  # fmt: skip
    assert quiet["regressed"] <= 0.02 and quiet["unchanged"] >= 0.96
    loud = simulate_verdicts(shift=1.0, noise_cv=0.5, n_baseline=3, n_current=3,
                             threshold=0.10, nights=600)  # fmt: skip
    assert loud["regressed"] <= 0.05 + 0.02


def test_a_real_slowdown_is_detected() -> None:
    big = simulate_verdicts(shift=1.25, noise_cv=0.05, n_baseline=3, n_current=3,
                            threshold=0.10, nights=300)  # fmt: skip
    assert big["regressed"] >= 0.95
    at_threshold = simulate_verdicts(shift=1.10, noise_cv=0.05, n_baseline=3, n_current=3,
                                     threshold=0.10, nights=300)  # fmt: skip
    assert 0.2 <= at_threshold["regressed"] <= 0.8  # a change of exactly 10%: a coin toss


def test_measurement_reads_repeats_and_examples_of_metrics_json() -> None:
    metrics = {
        "e2e_p95_s": 2.0, "quality": 0.5, "num_requests": 24, "quality_ci95": [0.4, 0.6],
        "repeat_values": {"e2e_p95_s": [1.0, 2.0, 3.0], "tpot_p50_s": []},
        "examples": {"index": [3, 1], "quality": [1.0, 0.0]}, "tpot_p50_s": None,
    }  # fmt: skip
    m = Measurement.from_metrics(metrics)
    assert m.values["e2e_p95_s"] == [1.0, 2.0, 3.0] and m.values["quality"] == [0.5]
    assert "tpot_p50_s" not in m.values and "quality_ci95" not in m.values
    assert (m.examples, m.example_quality) == ([3, 1], [1.0, 0.0])
    assert Measurement.from_metrics({"e2e_p95_s": 2.0}).examples is None


# --- a night with the measurement injected ------------------------------------------------


def _metrics(e2e: list[float], cost: list[float], quality: list[float]) -> dict[str, Any]:
    """A metrics.json mapping as execute_run writes it, from chosen numbers."""
    return {
        "e2e_p95_s": float(np.median(e2e)), "cost_per_1k_usd": float(np.median(cost)),
        "quality": float(np.mean(quality)), "repeats": len(e2e),
        "repeat_values": {"e2e_p95_s": e2e, "cost_per_1k_usd": cost},
        "examples": {"index": list(range(len(quality))), "quality": quality},
    }  # fmt: skip


BASELINE_METRICS = _metrics([10.0, 10.3, 9.9], [0.05, 0.051, 0.049], [1.0, 0.5, 0.0, 1.0])


def _write_bundle(folder: Path, spec: RunSpec, metrics: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    deployment = spec.deployment.model_copy(update={"apps": {"extraction": spec.app}})
    (folder / "DEPLOY.yaml").write_text(deployment.to_yaml())
    record = {
        "study": "quickstart", "trial": 4, "run_spec": spec.model_dump(mode="json"),
        "objectives": [o.model_dump() for o in (COST, LATENCY, QUALITY)],
        "regress": RegressSpec().model_dump(), "metrics": metrics,
    }  # fmt: skip
    (folder / MEASURED_FILE).write_text(json.dumps(record))
    return folder


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """An export folder with two bundles of the quickstart experiment."""
    spec = load_run_spec(QUICKSTART)
    out = tmp_path / "bundles"
    _write_bundle(out / "trial-0004", spec, BASELINE_METRICS)
    parallel = load_run_spec(QUICKSTART, {"app.architecture": "parallel"})
    _write_bundle(out / "trial-0006", parallel, BASELINE_METRICS)
    return out


def fake_measure(spec: RunSpec) -> dict[str, Any]:
    """Today's stack as a test double: the baseline's numbers again (a little noise), but
    three times slower with one sequence per batch."""
    assert spec.workload.repeats == 3
    slow = 3.0 if spec.deployment.models["llm"].engine.max_num_seqs == 1 else 1.0
    return _metrics(
        [10.1 * slow, 9.8 * slow, 10.2 * slow], [0.05 * slow, 0.0505 * slow, 0.0498 * slow],
        [1.0, 0.5, 0.0, 1.0],
    )  # fmt: skip


STACK = {"fmtune.vllm_version": "0.32.0", "fmtune.host": "test-host", "fmtune.models": "m"}


def test_an_unchanged_export_passes_and_a_slower_knob_regresses(
    export: Path, tmp_path: Path
) -> None:
    out = tmp_path / "regress"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = run_regress(
        load_export(export), fake_measure, out, source=str(export), stack=STACK,
        tracking_uri=uri, night=datetime(2026, 11, 28, 2, 0, tzinfo=UTC),
    )  # fmt: skip
    assert not first.regressed
    assert {c.verdict for c in first.comparisons()} == {"unchanged"}
    assert len(first.comparisons()) == 6  # 2 deployments x 3 objectives
    quality = [c for c in first.comparisons() if c.metric == "quality"]
    assert all(c.method == "paired" and c.ratio == 1.0 for c in quality)

    # someone edits an engine knob in the exported DEPLOY.yaml to a slower one
    deploy = export / "trial-0004" / "DEPLOY.yaml"
    deploy.write_text(deploy.read_text().replace("max_num_seqs: 16", "max_num_seqs: 1"))
    second = run_regress(
        load_export(export), fake_measure, out, source=str(export), stack=STACK,
        tracking_uri=uri, night=datetime(2026, 11, 29, 2, 0, tzinfo=UTC),
    )  # fmt: skip
    assert second.regressed
    regressed = {(c.deployment, c.metric) for c in second.regressions()}
    assert regressed == {("trial-0004", "e2e_p95_s"), ("trial-0004", "cost_per_1k_usd")}
    latency = next(c for c in second.regressions() if c.metric == "e2e_p95_s")
    assert latency.ratio == pytest.approx(30.3 / 10.0)
    assert latency.ratio_low is not None and latency.ratio_low > 2.5

    # the files name the deployment, the objective, the ratio and its interval
    markdown = (out / "regress.md").read_text()
    assert "REGRESSED" in markdown and f"| {latency.ratio_text()} |" in markdown
    assert "trial-0004 | e2e_p95_s (minimize) | **regressed**" in markdown
    suite = ET.parse(out / "regress.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures")) == ("6", "2")
    failures = [case for case in suite.iter("testcase") if case.find("failure") is not None]
    assert {(case.get("classname"), case.get("name")) for case in failures} == regressed
    messages = [case.find("failure").get("message") for case in failures]  # type: ignore[union-attr]
    assert latency.line() in messages
    page = (out / "regress.html").read_text()
    assert "<img src='trend-trial-0004.png'" in page and "regressed" in page
    assert (out / "trend-trial-0004.png").stat().st_size > 1000

    # the history holds both nights; the trend is drawn over them
    with sqlite3.connect(out / "history.db") as db:
        nights = db.execute("SELECT DISTINCT night FROM regress_history ORDER BY night").fetchall()
        count = db.execute("SELECT COUNT(*) FROM regress_history").fetchone()[0]
    assert [n[0] for n in nights] == ["2026-11-28T02:00:00+00:00", "2026-11-29T02:00:00+00:00"]
    assert count == 12

    # one MLflow run per night, tagged with the stack
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fmtune-regress")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2 and second.run_id == runs[1].info.run_id
    run = runs[1]
    assert run.data.tags["fmtune.vllm_version"] == "0.32.0"
    assert run.data.tags["fmtune.regress.verdict"] == "regressed"
    assert run.data.metrics["trial-0004.e2e_p95_s.ratio"] == pytest.approx(latency.ratio)
    assert run.data.metrics["regressed"] == 2.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"regress.md", "regress.html", "regress.xml", "history.db"} <= artifacts


def test_a_deployment_that_fails_today_is_reported_and_the_others_still_run(
    export: Path, tmp_path: Path
) -> None:
    from runtime.engine.pool import PoolCapacityError

    def measure(spec: RunSpec) -> dict[str, Any]:
        if spec.app.architecture == "parallel":
            raise PoolCapacityError("no room for another replica: 16 GiB in use")
        return fake_measure(spec)

    report = run_regress(
        load_export(export), measure, tmp_path / "out", source="x", stack=STACK
    )  # fmt: skip
    failed = [d for d in report.deployments if d.error]
    assert [d.baseline.name for d in failed] == ["trial-0006"]
    assert {c.deployment for c in report.regressions()} == {"trial-0006"}
    assert "no room for another replica" in (tmp_path / "out" / "regress.md").read_text()


def test_more_repeats_than_the_experiments_are_honoured(export: Path, tmp_path: Path) -> None:
    seen: list[int] = []

    def measure(spec: RunSpec) -> dict[str, Any]:
        seen.append(spec.workload.repeats)
        return _metrics([10.0] * 5, [0.05] * 5, [1.0, 0.5, 0.0, 1.0])

    run_regress(load_export(export), measure, tmp_path / "out", source="x", repeats=5)
    assert seen == [5, 5]


def _prepared(folder: Path, weights: bytes) -> Path:
    """A stand-in prepared model folder (config, weights, the finished marker)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}\n")
    (folder / "model.safetensors").write_bytes(weights)
    (folder / PREPARED_MARKER).write_text("done\n")
    return folder


def test_the_stack_checksums_the_folder_each_replica_serves(fmtune_home: Path) -> None:
    dense = _prepared(fmtune_home / "models" / "smollm2-135m", b"dense weights")
    bfloat16 = {"deployment.models.llm.engine.dtype": "bfloat16"}
    plain = load_run_spec(QUICKSTART, bfloat16)
    int8 = load_run_spec(
        QUICKSTART, {**bfloat16, "deployment.models.llm.engine.quantization": "int8"}
    )
    # not written yet: no checksum of the dense folder in its place, and none written here
    assert stack_tags([int8])["fmtune.model.smollm2-135m-int8"] == "unavailable"
    assert not (fmtune_home / "models" / "smollm2-135m-int8").exists()
    variant = _prepared(fmtune_home / "models" / "smollm2-135m-int8", b"int8 weights")
    tags = stack_tags([plain, int8])
    assert tags["fmtune.model.smollm2-135m"] == folder_checksum(dense)
    assert tags["fmtune.model.smollm2-135m-int8"] == folder_checksum(variant)
    assert folder_checksum(variant) != folder_checksum(dense)
    assert tags["fmtune.models"] == "smollm2-135m"


# --- bad input ----------------------------------------------------------------------------


def test_baselines_without_a_bundle_are_named(tmp_path: Path, export: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"empty: no DEPLOY\.yaml in it or its subfolders"):
        load_export(empty)
    (export / "trial-0004" / MEASURED_FILE).unlink()
    with pytest.raises(ConfigError, match=r"trial-0004/measured\.json: no such file"):
        load_export(export)
    with pytest.raises(ConfigError, match=r"baseline 'nostudy': no such folder, and no study"):
        load_baseline("nostudy", None)
    with pytest.raises(ConfigError, match=r"baseline '/no/such/export': no such folder$"):
        load_baseline("/no/such/export", None)
    # a baseline recorded with a field today's fmtune no longer has names the field
    measured = export / "trial-0006" / MEASURED_FILE
    record = json.loads(measured.read_text())
    record["run_spec"]["pricing"]["replica_hour_price"] = 0.08
    measured.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"trial-0006/measured\.json \(run_spec\): unknown "
                       r"field 'pricing\.replica_hour_price'"):  # fmt: skip
        load_bundle(export / "trial-0006")
    del record["run_spec"]["pricing"]["replica_hour_price"]
    measured.write_text(json.dumps(record))
    source, bundles = load_baseline(str(export / "trial-0006" / "DEPLOY.yaml"), None)
    assert source == str((export / "trial-0006").resolve()) and len(bundles) == 1


def test_cli_bad_baseline_exits_2_with_one_line_before_anything_starts(tmp_path: Path) -> None:
    empty = tmp_path / "not-an-export"
    empty.mkdir()
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "regress", str(empty), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0] == (
        f"error: {empty}: no DEPLOY.yaml in it or its subfolders (not an export of `fmtune export`)"
    )
    assert not out.exists()  # nothing started, nothing written


def test_comparison_text_without_a_ratio() -> None:
    c = Comparison("t", "quality", "maximize", 0.1, "regressed", "failed", note="not measured")
    assert c.ratio_text() == "not measured"


# --- from a study: its export, or the study itself -----------------------------------------


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_study_and_its_export_are_the_same_baseline(tmp_path: Path) -> None:
    """export writes measured.json beside DEPLOY.yaml; regress reads back the trial's own
    RunSpec from it, and from the study directly the same specs under the same names."""
    from tests.tuner.test_study import STUDY, Evaluation, enqueue, experiment, runner
    from tests.tuner.test_study import storage_url as study_storage
    from tuner.export import export_front, load_study, trial_run_spec

    evaluate = Evaluation()
    study_runner = runner(tmp_path, experiment(tmp_path, trials=3), evaluate)
    for architecture, fmt, seqs in [("single", "json", 16), ("parallel", "tag", 4),
                                    ("single", "json", 4)]:  # fmt: skip
        enqueue(study_runner.study, architecture, fmt, seqs)
    study_runner.run()
    study = load_study(STUDY, study_storage(tmp_path))
    bundles = export_front(study, tmp_path / "bundles")
    assert all((b.folder / MEASURED_FILE) in b.files for b in bundles)

    from_export = load_export(tmp_path / "bundles")
    source, from_study = load_baseline(STUDY, study_storage(tmp_path))
    assert source == f"study {STUDY}"
    assert [b.name for b in from_export] == [b.name for b in from_study]
    trials = {t.number: t for t in study.trials}
    for exported, stored in zip(from_export, from_study, strict=True):
        number = int(exported.name.removeprefix("trial-"))
        expected = trial_run_spec(study_runner.experiment, trials[number])
        assert exported.spec == stored.spec == expected
        assert exported.metrics == stored.metrics
        assert [o.metric for o in exported.objectives] == ["cost_per_1k_usd", "quality"]

    # the deterministic evaluation measured again: nothing changed
    def measure(spec: RunSpec) -> dict[str, Any]:
        return evaluate(spec).metrics_dict()

    report = run_regress(from_export, measure, tmp_path / "night", source="export")
    assert not report.regressed and {c.verdict for c in report.comparisons()} == {"unchanged"}
