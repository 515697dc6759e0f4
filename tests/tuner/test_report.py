"""Report files from front tables of small optuna studies with known fronts."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import create_trial

from tuner.pareto import Objective, front_table, hypervolume, reference_point
from tuner.report import (
    MlflowLinks,
    axis_label,
    hypervolume_history,
    pareto_figure,
    pareto_plot,
    predictions_table,
    trials_table,
    write_pareto_csv,
    write_report_html,
    write_study_report,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

EVIL = "<script>alert('x')</script>"
DIST = {"arch": CategoricalDistribution(["dag", EVIL]), "block": IntDistribution(16, 64)}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

LATENCY = Objective(metric="p95_latency_s", direction="minimize")
QUALITY = Objective(metric="quality", direction="maximize")
COST = Objective(metric="cost_per_1k_usd", direction="minimize")


def study_table(
    objectives: list[Objective], points: list[tuple[list[float], float]]
) -> pd.DataFrame:
    """front_table of a study with one complete trial per (values, constraint) point."""
    study = optuna.create_study(directions=[o.direction for o in objectives])
    for i, (values, constraint) in enumerate(points):
        study.add_trial(
            create_trial(
                values=values,
                params={"arch": EVIL if i == 1 else "dag", "block": 16 + i},
                distributions=DIST,
                constraints={"sla": constraint},
            )
        )
    return front_table(study, objectives)


@pytest.fixture
def two() -> pd.DataFrame:
    """Latency (min) vs quality (max): trials 0, 1, 3 on the front, 2 dominated, 4 infeasible."""
    return study_table(
        [LATENCY, QUALITY],
        [
            ([2.0, 0.9], 0.0),  # 0 front
            ([0.5, 0.4], 0.0),  # 1 front, the <script> knob
            ([3.0, 0.5], 0.0),  # 2 dominated by 0
            ([1.0, 0.7], -1.0),  # 3 front
            ([0.1, 1.0], 2.0),  # 4 infeasible: would dominate everything
        ],
    )


@pytest.fixture
def three() -> pd.DataFrame:
    return study_table(
        [LATENCY, QUALITY, COST],
        [
            ([2.0, 0.9, 5.0], 0.0),
            ([0.5, 0.4, 1.0], 0.0),
            ([3.0, 0.3, 6.0], 0.0),
            ([1.0, 0.7, 0.5], 0.0),
            ([0.1, 1.0, 0.1], 1.0),
        ],
    )


@pytest.fixture
def single() -> pd.DataFrame:
    return study_table([QUALITY], [([0.2], 0.0), ([0.6], 0.0), ([0.9], 1.0), ([0.4], 0.0)])


def test_csv_has_only_front_rows_sorted_by_first_objective(two: pd.DataFrame, tmp_path) -> None:
    path = write_pareto_csv(two, tmp_path / "out" / "pareto.csv")
    csv = pd.read_csv(path)
    assert csv["trial"].tolist() == [1, 3, 0]  # by p95_latency_s ascending
    assert csv["on_front"].all()
    assert set(csv["trial"]) == set(two.loc[two["on_front"], "trial"])
    assert list(csv.columns) == list(two.columns)
    assert csv.loc[csv["trial"] == 1, "params.arch"].item() == EVIL


def test_csv_best_first_with_objectives(two: pd.DataFrame, tmp_path: Path) -> None:
    table = two[["trial", "params.arch", "quality", "p95_latency_s", "feasible", "on_front"]]
    path = write_pareto_csv(table, tmp_path / "pareto.csv", objectives=[QUALITY, LATENCY])
    assert pd.read_csv(path)["trial"].tolist() == [0, 3, 1]  # quality descending


def test_csv_of_a_study_without_front(tmp_path: Path) -> None:
    table = study_table([LATENCY, QUALITY], [([1.0, 0.5], 1.0)])
    csv = pd.read_csv(write_pareto_csv(table, tmp_path / "pareto.csv"))
    assert csv.empty
    assert list(csv.columns) == list(table.columns)


@pytest.mark.parametrize(
    ("fixture", "objectives"),
    [("single", [QUALITY]), ("two", [LATENCY, QUALITY]), ("three", [LATENCY, QUALITY, COST])],
)
def test_plot_is_a_png(request, fixture: str, objectives: list[Objective], tmp_path) -> None:
    table = request.getfixturevalue(fixture)
    path = pareto_plot(table, objectives, tmp_path / "plots" / "pareto.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 5000


def test_plot_of_an_empty_table(tmp_path: Path) -> None:
    empty = pd.DataFrame(columns=["trial", "p95_latency_s", "quality", "feasible", "on_front"])
    path = pareto_plot(empty, [LATENCY, QUALITY], tmp_path / "pareto.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_plot_names_missing_objective(two: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"objectives \['cost_per_1k_usd'\] have no column"):
        pareto_plot(two, [LATENCY, COST], tmp_path / "pareto.png")


def test_axis_labels_say_direction() -> None:
    assert axis_label(LATENCY) == "p95_latency_s ↓ minimize"
    assert axis_label(QUALITY) == "quality ↑ maximize"


def test_html_is_self_contained_and_escaped(two: pd.DataFrame, tmp_path: Path) -> None:
    plot = pareto_plot(two, [LATENCY, QUALITY], tmp_path / "pareto.png")
    path = write_report_html(
        tmp_path / "report.html",
        title="Study <demo> & co",
        summary={"study": "demo", "front size": 3, "hypervolume": 0.123456789, "note": EVIL},
        table=two,
        objectives=[LATENCY, QUALITY],
        plot_path=plot,
    )
    page = path.read_text(encoding="utf-8")
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<title>Study &lt;demo&gt; &amp; co</title>" in page
    assert "0.123457" in page  # summary value, 6 significant digits
    for value in ("2", "0.9", "0.5", "0.4", "3", "0.7", "0.1", "1"):
        assert f"<td>{value}</td>" in page
    assert "p95_latency_s ↓ minimize" in page
    assert "quality ↑ maximize" in page
    assert "<th>arch</th>" in page
    assert "Pareto front (3 trials)" in page
    assert "All complete trials (5)" in page
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded is not None
    assert base64.b64decode(embedded.group(1)) == plot.read_bytes()
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # no external assets
    front_section = page.split("Pareto front (3 trials)")[1].split("All complete trials")[0]
    assert front_section.count('<tr class="front">') == 3
    assert "<td>4</td>" not in front_section  # the infeasible trial is not on the front


def test_html_without_plot(single: pd.DataFrame, tmp_path: Path) -> None:
    path = write_report_html(
        tmp_path / "r.html",
        title="single",
        summary={},
        table=single,
        objectives=[QUALITY],
        plot_path=None,
    )
    page = path.read_text(encoding="utf-8")
    assert "<img" not in page
    assert "Pareto front (1 trials)" in page


# --- the whole report: every trial, failures, SLA attainment, links, more plots ----------


def full_study() -> tuple[optuna.Study, list[Objective]]:
    """Three objectives; trial 2 failed (engine), trial 3 infeasible, trial 5 skipped the
    conditional knob; metrics, failure reasons and MLflow run ids as the tuner stores them."""
    objectives = [LATENCY, QUALITY, COST]
    study = optuna.create_study(directions=[o.direction for o in objectives], study_name="full")
    dist = {**DIST, "spec": CategoricalDistribution(["none", "ngram"])}
    points = [
        ([2.0, 0.9, 5.0], 0.0),
        ([0.5, 0.4, 1.0], 0.0),
        None,
        ([0.1, 1.0, 0.1], 1.0),
        ([3.0, 0.3, 6.0], 0.0),
        ([1.0, 0.7, 0.5], 0.0),
    ]
    for i, point in enumerate(points):
        params: dict[str, object] = {"arch": EVIL if i == 1 else "dag", "block": 16 + i}
        if i != 5:
            params["spec"] = "ngram" if i % 2 else "none"
        used = {k: dist[k] for k in params}
        run = {"fmtune.mlflow_run_id": f"run{i}" + "0" * 28}
        if point is None:
            study.add_trial(create_trial(
                state=optuna.trial.TrialState.FAIL, params=params, distributions=used,
                user_attrs={**run, "fmtune.failure_kind": "engine",
                            "fmtune.failure_reason": f"replica exited with code 1; {EVIL}"},
            ))  # fmt: skip
            continue
        values, constraint = point
        study.add_trial(create_trial(
            values=values, params=params, distributions=used, constraints={"sla": constraint},
            user_attrs={**run, "fmtune.metrics": {"sla_attainment": 0.5 + i / 20}},
        ))  # fmt: skip
    return study, objectives


def test_trials_table_has_every_trial_with_its_outcome() -> None:
    study, objectives = full_study()
    trials = trials_table(study, objectives)
    assert trials["trial"].tolist() == [0, 1, 2, 3, 4, 5]
    assert trials["state"].tolist() == ["COMPLETE"] * 2 + ["FAIL"] + ["COMPLETE"] * 3
    assert trials.loc[trials["on_front"], "trial"].tolist() == [0, 1, 5]
    failed = trials.iloc[2]
    assert failed["failure_kind"] == "engine" and EVIL in failed["failure_reason"]
    assert not failed["feasible"] and not failed["on_front"]
    assert all(pd.isna(failed[o.metric]) for o in objectives)
    assert pd.isna(failed["sla_attainment"]) and failed["params.arch"] == "dag"
    assert trials.iloc[5]["sla_attainment"] == pytest.approx(0.75)
    assert pd.isna(trials.iloc[5]["params.spec"])  # the conditional knob was inactive
    assert not trials.iloc[3]["feasible"]
    assert trials["mlflow_run_id"].str.startswith("run").all()


def test_three_objectives_are_not_joined_by_lines_in_2d(three: pd.DataFrame) -> None:
    fig = pareto_figure(three, [LATENCY, QUALITY, COST])
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 3
    assert all(not ax.lines for ax in panels)  # markers only: a projected 3-D front is no curve
    marked = [c for ax in panels for c in ax.collections if "Pareto" in str(c.get_label())]
    assert len(marked) == 3 and all(len(c.get_offsets()) == 3 for c in marked)


def test_two_objectives_draw_the_front_as_a_line(two: pd.DataFrame) -> None:
    fig = pareto_figure(two, [LATENCY, QUALITY])
    (line,) = fig.axes[0].lines
    assert len(line.get_xdata()) == 3


def test_hypervolume_history_grows_to_the_study_hypervolume() -> None:
    study, objectives = full_study()
    trials = trials_table(study, objectives)
    history = hypervolume_history(trials, objectives)
    assert history["trial"].tolist() == [0, 1, 2, 3, 4, 5]
    values = history["hypervolume"].to_numpy()
    assert (np.diff(values) >= -1e-12).all()
    assert values[2] == values[1] and values[3] == values[2]  # failed, infeasible: no change
    directions = [o.direction for o in objectives]
    feasible = trials[trials["feasible"]][[o.metric for o in objectives]].to_numpy()
    front = trials[trials["on_front"]][[o.metric for o in objectives]].to_numpy()
    expected = hypervolume(front, reference_point(feasible, directions), directions)
    assert values[-1] == pytest.approx(expected)


def test_study_report_links_bundles_and_runs_and_lists_failures(tmp_path: Path) -> None:
    study, objectives = full_study()
    out = tmp_path / "out"
    (out / "bundles" / "trial-0001").mkdir(parents=True)  # exported; 0 and 5 are not
    report = write_study_report(
        study, objectives, out, summary={"study": "full"}, bundles_dir=out / "bundles",
        mlflow=MlflowLinks(experiment_id="7"),
    )  # fmt: skip
    assert set(report.files()) == {
        "pareto.csv", "pareto.png", "parallel.png", "hypervolume.png", "report.html",
    }  # fmt: skip
    for name in ("pareto.png", "parallel.png", "hypervolume.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    csv = pd.read_csv(report.csv)
    assert csv["trial"].tolist() == [1, 5, 0]  # best first: latency ascending
    assert {"sla_attainment", "mlflow_run_id"} <= set(csv.columns)
    page = report.html.read_text(encoding="utf-8")
    assert "<script" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(i) for i in images] == [
        (out / name).read_bytes() for name in ("pareto.png", "parallel.png", "hypervolume.png")
    ]
    assert not re.search(r"""src=["'](?!data:)""", page)  # nothing to fetch
    assert '<a href="bundles/trial-0001/"' in page  # relative to the page
    assert "trial-0000/" not in page and page.count("not exported") == 2
    run = "http://127.0.0.1:5000/#/experiments/7/runs/run1" + "0" * 28
    assert f'href="{run}"' in page
    assert "<th>sla_attainment</th>" in page and "<td>0.75</td>" in page
    assert "All trials (6, 1 failed)" in page
    assert "replica exited with code 1; &lt;script&gt;" in page
    assert '<tr class="failed"><td>2</td><td>FAIL</td>' in page
    assert '<tr class="infeasible"><td>3</td>' in page


def test_a_multi_study_report_shows_predicted_against_measured(tmp_path: Path) -> None:
    study, objectives = full_study()
    confirmed = create_trial(
        values=[1.5, 0.8, 2.0], params={"arch": "dag", "block": 30},
        distributions={"arch": DIST["arch"], "block": DIST["block"]}, constraints={"sla": 0.0},
        user_attrs={
            "fmtune.metrics": {"e2e_p50_s": 8.0, "ttft_p50_s": 0.0},
            "fmtune.predicted": {"e2e_p50_s": 10.0, "ttft_p50_s": 0.5},
            "fmtune.prediction_errors": {"e2e_p50_s": 25.0, "ttft_p50_s": None},
        },
    )  # fmt: skip
    study.add_trial(confirmed)
    table = predictions_table(study)
    assert table[["trial", "metric", "predicted", "measured"]].to_dict("records") == [
        {"trial": 6, "metric": "e2e_p50_s", "predicted": 10.0, "measured": 8.0},
        {"trial": 6, "metric": "ttft_p50_s", "predicted": 0.5, "measured": 0.0},
    ]
    assert table["error_pct"].iloc[0] == 25.0 and np.isnan(table["error_pct"].iloc[1])
    page = write_study_report(study, objectives, tmp_path, summary={}).html.read_text()
    assert "Predicted vs measured (1 confirmed trials)" in page
    assert "<td>e2e_p50_s</td><td>25</td><td>25</td><td>1</td>" in page  # median, worst, n
    assert "<td>6</td><td>e2e_p50_s</td><td>10</td><td>8</td><td>25</td>" in page
    plain, _ = full_study()
    assert predictions_table(plain).empty
    assert (
        "Predicted vs measured"
        not in write_study_report(
            plain, objectives, tmp_path / "plain", summary={}
        ).html.read_text()
    )


def test_study_report_without_mlflow_shows_run_ids_and_says_how_to_export(
    tmp_path: Path,
) -> None:
    study, objectives = full_study()
    report = write_study_report(
        study, objectives, tmp_path, summary={}, bundles_dir=tmp_path / "bundles", mlflow=None
    )
    page = report.html.read_text(encoding="utf-8")
    assert "127.0.0.1:5000" not in page
    assert "<td>run1" + "0" * 28 + "</td>" in page
    assert f"fmtune export --study full --out {tmp_path / 'bundles'} writes them" in page


def test_report_of_a_study_without_any_complete_trial(tmp_path: Path) -> None:
    study = optuna.create_study(directions=["minimize", "maximize"], study_name="failing")
    study.add_trial(create_trial(
        state=optuna.trial.TrialState.FAIL, params={"block": 16},
        distributions={"block": IntDistribution(16, 64)},
        user_attrs={"fmtune.failure_kind": "engine", "fmtune.failure_reason": "out of memory"},
    ))  # fmt: skip
    report = write_study_report(study, [LATENCY, QUALITY], tmp_path, summary={})
    page = report.html.read_text(encoding="utf-8")
    assert "out of memory" in page and "Pareto front (0 trials)" in page
    for path in report.files().values():
        assert path.stat().st_size > 0


def test_a_running_trial_is_listed_but_neither_failed_nor_drawn(tmp_path: Path) -> None:
    study, objectives = full_study()
    study.add_trial(create_trial(
        state=optuna.trial.TrialState.RUNNING, params={"block": 40},
        distributions={"block": DIST["block"]},
    ))  # fmt: skip
    report = write_study_report(study, objectives, tmp_path, summary={})
    assert report.trials["state"].tolist()[-1] == "RUNNING"
    page = report.html.read_text(encoding="utf-8")
    assert "All trials (7, 1 failed)" in page
    assert "<tr><td>6</td><td>RUNNING</td>" in page  # no failed or infeasible class
    history = hypervolume_history(report.trials, objectives)
    assert history["hypervolume"].iloc[-1] == history["hypervolume"].iloc[-2]


def test_report_marks_indistinguishable_front_points_and_lists_duplicates(
    tmp_path: Path,
) -> None:
    """Trials 0 and 1 overlap on both objectives' intervals, 2 is apart; 3 reused trial 0's
    result (same knobs): listed with it among all trials, never on the front."""
    objectives = [COST, QUALITY]
    study = optuna.create_study(directions=[o.direction for o in objectives])
    points = [  # cost, its interval, quality, its interval
        (1.0, [0.8, 1.2], 0.5, [0.3, 0.7]),
        (1.1, [0.9, 1.3], 0.6, [0.4, 0.8]),
        (3.0, [2.9, 3.1], 0.9, [0.85, 0.95]),
        (1.0, [0.8, 1.2], 0.5, [0.3, 0.7]),
    ]
    for i, (cost, cost_ci, quality, quality_ci) in enumerate(points):
        metrics = {"cost_per_1k_usd_ci95": cost_ci, "quality_ci95": quality_ci}
        attrs: dict[str, object] = {"fmtune.metrics": metrics}
        if i == 3:
            attrs["fmtune.duplicate_of"] = 0
        study.add_trial(create_trial(
            values=[cost, quality], params={"arch": "dag", "block": 16 + (i % 3)},
            distributions=DIST, user_attrs=attrs,
        ))  # fmt: skip

    report = write_study_report(study, objectives, tmp_path, summary={"study": "x"})

    csv = pd.read_csv(report.csv, dtype={"indistinguishable_from": str})
    assert csv["trial"].tolist() == [0, 1, 2]
    assert csv["indistinguishable_from"].fillna("").tolist() == ["1", "0", ""]
    assert report.trials["duplicate_of"].tolist() == [None, None, None, 0]
    assert report.trials["on_front"].tolist() == [True, True, True, False]
    page = report.html.read_text(encoding="utf-8")
    assert "95% bootstrap intervals overlap" in page
    assert "&lt;metric&gt;_ci95" in page  # the rule, escaped
    assert "Objectives with an interval here: cost_per_1k_usd, quality." in page
    assert "Indistinguishable pairs: 0 and 1." in page
    assert "Pareto front (3 trials)" in page
    assert "<th>duplicate_of</th>" in page and "<th>indistinguishable_from</th>" in page


def test_report_says_when_no_front_points_are_alike(tmp_path: Path) -> None:
    """Quality intervals alone (cost measured without one): two front points that differ in
    cost are told apart, and the page says so and on what evidence."""
    objectives = [COST, QUALITY]
    study = optuna.create_study(directions=[o.direction for o in objectives])
    for i, (cost, quality) in enumerate([(1.0, 0.5), (1.1, 0.6)]):
        study.add_trial(create_trial(
            values=[cost, quality], params={"arch": "dag", "block": 16 + i}, distributions=DIST,
            user_attrs={"fmtune.metrics": {"quality_ci95": [quality - 0.2, quality + 0.2]}},
        ))  # fmt: skip

    report = write_study_report(study, objectives, tmp_path, summary={})

    page = report.html.read_text(encoding="utf-8")
    assert "Objectives with an interval here: quality." in page
    assert "No two front points are indistinguishable." in page
    assert pd.read_csv(report.csv)["indistinguishable_from"].isna().all()
