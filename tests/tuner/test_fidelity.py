"""Studies at fidelity 'sim' and 'multi', with a stored profile and a test double of real runs.

The real evaluation here only serves calibration runs (sim) and confirmations (multi): it
returns a trace whose token counts the simulator takes, and a quality that depends on the
app's architecture. The tokenizer is replaced by one id per character, so no model is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from runtime.engine.config import EngineConfig
from runtime.metrics import RunMetrics
from runtime.profiler import ProfileKey, profile_path
from runtime.routing.router import RouterStats
from runtime.run import RunResult, RunSpec
from runtime.sim.steptime import StepTimeCoefficients, save_profile
from runtime.simrun import workload_examples
from tests.runtime.sim.conftest import make_profile
from tests.tuner.test_study import QUALITY, experiment, runner, storage_url
from tuner.fidelity import calibration_dir
from tuner.pareto import ATTR_DUPLICATE_OF
from tuner.study import (
    ATTR_CONFIRMS,
    ATTR_FIDELITY,
    ATTR_METRICS,
    ATTR_PREDICTED,
    ATTR_PREDICTION_ERRORS,
    budget_used,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
]


def fake_chat_ids(_engine: EngineConfig, messages: Sequence[Mapping[str, str]]) -> list[int]:
    return [ord(char) for message in messages for char in message["content"]]


class RealRuns:
    """The double of execute_run: a trace of 300-token prompts and 24-token answers."""

    def __init__(self) -> None:
        self.specs: list[RunSpec] = []

    def __call__(self, spec: RunSpec) -> RunResult:
        self.specs.append(spec)
        nodes = [node.id for node in spec.app.build().nodes if node.kind == "llm"]
        count = spec.workload.num_requests
        rows = [
            {"request_id": r, "node_id": n, "kind": "llm", "round": 0, "skipped": False,
             "prompt_tokens": 300, "completion_tokens": 24, "repeat": 0}
            for r in range(count) for n in nodes
        ]  # fmt: skip
        quality = QUALITY[spec.app.architecture]
        metrics = RunMetrics(
            num_requests=count, num_failed=0, wall_s=10.0, sla_e2e_s=spec.sla.e2e_s,
            e2e_p50_s=3.0, e2e_p95_s=4.0, cost_per_1k_usd=0.2, quality=quality,
            quality_ci95=[quality - 0.1, quality + 0.1], error_rate=0.0,
        )  # fmt: skip
        return RunResult(
            metrics=metrics, trace=pd.DataFrame(rows), results=[], router_stats=RouterStats(),
            replica_start_s={}, examples=workload_examples(spec),
        )  # fmt: skip


@pytest.fixture
def stored_profile(fmtune_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A profile of the experiment's engine in an empty fmtune home; no tokenizer read."""
    monkeypatch.setattr("runtime.simrun.chat_token_ids", fake_chat_ids)
    engine = EngineConfig(model="smollm2-135m", dtype="float32", block_size=128)
    key = ProfileKey.for_engine(engine)
    profile = make_profile(
        dtype="float32", hardware=key.hardware, vllm_version=key.vllm_version,
        coefficients=StepTimeCoefficients(base_s=0.02, prefill_token_s=0.0005,
                                          decode_seq_s=0.004),
    )  # fmt: skip
    return save_profile(profile, profile_path(key))


def test_a_sim_study_calibrates_each_app_once_and_simulates_every_trial(
    tmp_path: Path, stored_profile: Path
) -> None:
    real = RealRuns()
    study = runner(tmp_path, experiment(tmp_path, fidelity="sim", trials=12), real)
    reports = study.run()
    assert len(reports) == 12 and all(r.state == "COMPLETE" for r in reports)
    apps = {(r.params["app.architecture"], r.params["app.format"]) for r in reports}
    # one calibration per app combination, on the experiment's own deployment
    assert sorted((s.app.architecture, s.app.format.value) for s in real.specs) == sorted(apps)
    assert all(s.deployment.models["llm"].engine.max_num_seqs == 16 for s in real.specs)
    for trial in study.study.get_trials(states=(TrialState.COMPLETE,)):
        metrics = trial.user_attrs[ATTR_METRICS]
        assert trial.user_attrs[ATTR_FIDELITY] == "sim"
        assert metrics["quality"] == QUALITY[trial.params["app.architecture"]]  # calibration's
        assert metrics["e2e_p50_s"] > 0 and metrics["e2e_p50_s"] != 3.0  # simulated
        if ATTR_DUPLICATE_OF not in trial.user_attrs:  # a duplicate reuses, writes nothing
            folder = tmp_path / "out" / "trials" / f"{trial.number:04d}"
            assert (folder / "metrics.json").is_file() and (folder / "DEPLOY.yaml").is_file()
    assert len(list(calibration_dir().iterdir())) == len(apps)
    # a second study of the same experiment reuses the stored calibrations
    again = RealRuns()
    exp = experiment(tmp_path, fidelity="sim", trials=4)
    other = type(study)(
        exp, storage_url=storage_url(tmp_path), study_name="another", out_dir=tmp_path / "o2",
        evaluate=again,
    )  # fmt: skip
    other.run()
    seen = {(s.app.architecture, s.app.format.value) for s in again.specs}
    assert not seen & apps


def test_simulated_trials_fail_cleanly_when_the_simulator_refuses_a_spec(
    tmp_path: Path, stored_profile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise ValueError("shapes must hold one shape per request")

    monkeypatch.setattr("tuner.fidelity.simulate_run", refuse)
    study = runner(tmp_path, experiment(tmp_path, fidelity="sim", trials=2), RealRuns())
    reports = study.run()
    assert [r.state for r in reports] == ["FAIL", "FAIL"]
    assert "simulator refused the trial" in str(reports[0].failure)


def test_a_multi_study_confirms_the_screened_front_and_logs_each_prediction_error(
    tmp_path: Path, stored_profile: Path
) -> None:
    real = RealRuns()
    exp = experiment(tmp_path, fidelity="multi", trials=3, screen_trials=8, confirm=2)
    study = runner(tmp_path, exp, real)
    reports = study.run()
    confirmed = study.study.get_trials(states=(TrialState.COMPLETE,))
    assert len(reports) == len(confirmed) == 3 and budget_used(study.study)[0] == 3
    screen = optuna.load_study(study_name=f"{study.study_name}.screen",
                               storage=storage_url(tmp_path))  # fmt: skip
    screened = screen.get_trials(states=(TrialState.COMPLETE,))
    simulated = [t for t in screened if t.user_attrs[ATTR_FIDELITY] == "sim"]
    fed_back = [t for t in screened if t.user_attrs[ATTR_FIDELITY] == "real"]
    assert len(simulated) == 16  # two rounds of 8: the budget of 3 needs a second round
    assert len(fed_back) == 3
    for trial in confirmed:
        assert trial.user_attrs[ATTR_FIDELITY] == "real"
        source = screen.trials[trial.user_attrs[ATTR_CONFIRMS]]
        assert source.params == trial.params and source.user_attrs[ATTR_FIDELITY] == "sim"
        predicted = trial.user_attrs[ATTR_PREDICTED]
        assert predicted["e2e_p50_s"] == source.user_attrs[ATTR_METRICS]["e2e_p50_s"]
        error = trial.user_attrs[ATTR_PREDICTION_ERRORS]["e2e_p50_s"]
        assert error == pytest.approx(100 * abs(predicted["e2e_p50_s"] - 3.0) / 3.0)
    # calibrations (one per app combination screened) plus the three confirmations
    confirmations = [s for s in real.specs if s.deployment.models["llm"].engine.max_num_seqs
                     in {t.params["engine.max_num_seqs"] for t in confirmed}]  # fmt: skip
    assert len(confirmations) >= 3
