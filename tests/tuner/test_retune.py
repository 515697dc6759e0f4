"""`fmtune regress --retune`: domination on synthetic numbers, and a re-tuning study seeded with
an exported front, measured by the deterministic test double of the study tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.errors import ConfigError
from tests.tuner.test_study import STUDY, Evaluation, enqueue, experiment, runner, storage_url
from tuner.export import MEASURED_FILE, export_front, load_study
from tuner.pareto import Objective
from tuner.regress import load_export
from tuner.retune import dominates, dominations, retune

COST = Objective(metric="cost_per_1k_usd", direction="minimize")
QUALITY = Objective(metric="quality", direction="maximize")

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
]


def test_dominates_needs_no_worse_everywhere_and_better_somewhere() -> None:
    objectives = [COST, QUALITY]
    assert dominates([1.0, 0.8], [2.0, 0.8], objectives)  # cheaper, as good
    assert not dominates([1.0, 0.7], [2.0, 0.8], objectives)  # cheaper but worse
    assert not dominates([2.0, 0.8], [2.0, 0.8], objectives)  # equal is not better
    with pytest.raises(ValueError, match="expected 2 values each"):
        dominates([1.0], [2.0, 0.8], objectives)


def test_dominations_say_by_how_much() -> None:
    new = {7: ([0.5, 0.9], {"engine.max_num_seqs": 16}), 8: ([3.0, 0.95], {})}
    old = {"trial-0001": [1.0, 0.6], "trial-0002": [2.0, 0.95]}
    found = dominations(new, old, [COST, QUALITY])
    assert [(d.new_trial, d.old) for d in found] == [(7, "trial-0001")]
    assert found[0].ratios == pytest.approx({"cost_per_1k_usd": 0.5, "quality": 1.5})
    assert found[0].line() == "trial 7 dominates trial-0001: cost_per_1k_usd x0.5, quality x1.5"


def test_a_retune_study_measures_the_old_front_first_then_new_trials(tmp_path: Path) -> None:
    evaluate = Evaluation()
    old_runner = runner(tmp_path, experiment(tmp_path, trials=1), evaluate)
    enqueue(old_runner.study, "single", "json", 4)
    old_runner.run()
    export_front(load_study(STUDY, storage_url(tmp_path)), tmp_path / "bundles")
    baselines = load_export(tmp_path / "bundles")
    assert [b.params for b in baselines] == [
        {"app.architecture": "single", "app.format": "json", "engine.max_num_seqs": 4}
    ]

    night = Evaluation()
    report = retune(baselines, 3, tmp_path / "night", night, study_name="retune-test")

    assert night.knobs()[0] == ("single", "json", 4)  # the seed first
    assert len(night.specs) == 4  # and three new trials (twins of a knob set reuse its result)
    assert report.seeds == {0: "trial-0000"}
    study = load_study("retune-test", report.storage)
    values = {t.number: t.values for t in study.trials}
    for d in report.dominations:
        assert dominates(values[d.new_trial], values[0], [COST, QUALITY])
        assert d.old == "trial-0000" and d.new_trial != 0
    text = (tmp_path / "night" / "retune.md").read_text()
    assert "trial 0 = trial-0000" in text
    assert ("the front moved" in text) == report.moved


def test_bundles_without_knobs_cannot_seed_a_study(tmp_path: Path) -> None:
    import json

    evaluate = Evaluation()
    old_runner = runner(tmp_path, experiment(tmp_path, trials=1), evaluate)
    old_runner.run()
    (bundle,) = export_front(load_study(STUDY, storage_url(tmp_path)), tmp_path / "bundles")
    record = json.loads((bundle.folder / MEASURED_FILE).read_text())
    del record["params"]
    (bundle.folder / MEASURED_FILE).write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="--retune needs the trial's knobs and experiment"):
        retune(load_export(tmp_path / "bundles"), 2, tmp_path / "night", evaluate,
               study_name="x")  # fmt: skip
