"""Report files from front tables of small optuna studies with known fronts."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import create_trial

from tuner.pareto import Objective, front_table
from tuner.report import axis_label, pareto_plot, write_pareto_csv, write_report_html

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
