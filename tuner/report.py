"""A study's report: the Pareto front as CSV, pairwise objective plots, one HTML page.

Everything is drawn from the table :func:`tuner.pareto.front_table` returns (``trial``,
``params.<knob>``..., one column per objective metric, ``feasible``, ``on_front``) and the
study's objectives, so the report shows exactly what the front computation saw. The HTML page
is self-contained (plot embedded as base64, CSS inline) so it can be mailed or attached to an
MLflow run and opened anywhere; every value in it is HTML-escaped, since knob values and
failure reasons are free text.
"""

from __future__ import annotations

import base64
import html
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from runtime.errors import ConfigError
from tuner.pareto import Objective

logger = logging.getLogger(__name__)

PARAM_PREFIX = "params."
_STATUS_COLUMNS = ("trial", "feasible", "on_front")

_COLORS = {"trial": "#b0b0b0", "infeasible": "#d62728", "front": "#1f77b4"}


def _objective_columns(table: pd.DataFrame) -> list[str]:
    """The metric columns of a front table: neither ``trial``, a param, nor a status flag."""
    return [
        c for c in table.columns if c not in _STATUS_COLUMNS and not str(c).startswith(PARAM_PREFIX)
    ]


def _check_objectives(table: pd.DataFrame, objectives: Sequence[Objective]) -> None:
    """Every objective has a column in ``table``."""
    if not objectives:
        raise ConfigError("objectives must not be empty, got []")
    missing = [o.metric for o in objectives if o.metric not in table.columns]
    if missing:
        raise ConfigError(
            f"objectives {missing} have no column in the table; columns: {list(table.columns)}"
        )


def axis_label(objective: Objective) -> str:
    """``"<metric> ↓ minimize"`` or ``"<metric> ↑ maximize"``."""
    arrow = "↓" if objective.direction == "minimize" else "↑"
    return f"{objective.metric} {arrow} {objective.direction}"


def front_rows(table: pd.DataFrame, objectives: Sequence[Objective] | None = None) -> pd.DataFrame:
    """The rows on the front, sorted by the first objective (best first when it is given)."""
    front = table[table["on_front"].astype(bool)] if "on_front" in table else table.iloc[0:0]
    if objectives:
        first, ascending = objectives[0].metric, objectives[0].direction == "minimize"
    else:
        metrics = _objective_columns(table)
        first, ascending = (metrics[0], True) if metrics else ("trial", True)
    return front.sort_values([first, "trial"], ascending=[ascending, True], kind="stable")


def write_pareto_csv(
    table: pd.DataFrame, path: Path, objectives: Sequence[Objective] | None = None
) -> Path:
    """pareto.csv: the front rows only, sorted by the first objective; returns ``path``.

    Without ``objectives`` the first metric column is sorted ascending; with them, best first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    front_rows(table, objectives).to_csv(path, index=False)
    return path


def _numeric(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)


def _draw_pair(ax: Any, table: pd.DataFrame, x: Objective, y: Objective) -> None:
    """One scatter of objective ``y`` against ``x``: trials, infeasible, front connected."""
    xs, ys = _numeric(table[x.metric]), _numeric(table[y.metric])
    feasible = table["feasible"].astype(bool).to_numpy()
    front = table["on_front"].astype(bool).to_numpy()
    ok = ~(np.isnan(xs) | np.isnan(ys))
    rest = ok & feasible & ~front
    ax.scatter(xs[rest], ys[rest], s=18, c=_COLORS["trial"], label="feasible trial")
    bad = ok & ~feasible
    if bad.any():
        ax.scatter(xs[bad], ys[bad], s=22, marker="x", c=_COLORS["infeasible"], label="infeasible")
    on = ok & front
    if on.any():
        order = np.argsort(xs[on], kind="stable")
        ax.plot(
            xs[on][order],
            ys[on][order],
            "-o",
            c=_COLORS["front"],
            ms=6,
            lw=1.2,
            label="Pareto front",
        )
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    ax.grid(True, alpha=0.3)


def _draw_single(ax: Any, table: pd.DataFrame, objective: Objective) -> None:
    """One objective against trial number, with the best feasible value so far as a step."""
    from matplotlib.ticker import MaxNLocator

    trials = _numeric(table["trial"])
    values = _numeric(table[objective.metric])
    feasible = table["feasible"].astype(bool).to_numpy()
    front = table["on_front"].astype(bool).to_numpy()
    ok = ~np.isnan(values)
    rest = ok & feasible & ~front
    ax.scatter(trials[rest], values[rest], s=18, c=_COLORS["trial"], label="feasible trial")
    bad = ok & ~feasible
    if bad.any():
        ax.scatter(
            trials[bad], values[bad], s=22, marker="x", c=_COLORS["infeasible"], label="infeasible"
        )
    good = ok & feasible
    if good.any():
        order = np.argsort(trials[good], kind="stable")
        running = np.minimum if objective.direction == "minimize" else np.maximum
        best = running.accumulate(values[good][order])
        ax.step(
            trials[good][order],
            best,
            where="post",
            c=_COLORS["front"],
            lw=1.2,
            label="best so far",
        )
    on = ok & front
    if on.any():
        ax.scatter(trials[on], values[on], s=40, c=_COLORS["front"], label="best", zorder=3)
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(axis_label(objective))
    ax.grid(True, alpha=0.3)


def pareto_plot(table: pd.DataFrame, objectives: Sequence[Objective], path: Path) -> Path:
    """A PNG of every pair of objectives (one objective: value per trial); returns ``path``.

    Feasible trials are grey dots, infeasible ones crosses, the front is highlighted and
    connected. Drawn with the Agg canvas on a standalone Figure, so it needs no display and
    leaves pyplot's global state alone (safe from threads).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_objectives(table, objectives)
    pairs = list(itertools.combinations(objectives, 2))
    panels = max(len(pairs), 1)
    ncols = min(panels, 3)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(5.0 * ncols, 4.2 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    if table.empty:
        axes[0].text(0.5, 0.5, "no complete trials", ha="center", va="center")
        axes[0].set_axis_off()
    elif len(objectives) == 1:
        _draw_single(axes[0], table, objectives[0])
    else:
        for ax, (x, y) in zip(axes, pairs, strict=False):
            _draw_pair(ax, table, x, y)
    if not table.empty:
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            axes[0].legend(handles, labels, fontsize="small", loc="best")
    fig.suptitle(f"{len(table)} complete trials, {int(table['on_front'].sum())} on the front")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _cell(value: Any) -> str:
    """A table cell's text: floats to 6 significant digits, None and NaN empty."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else f"{float(value):.6g}"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    return str(value)


def _html_table(table: pd.DataFrame, objectives: Sequence[Objective]) -> str:
    """An escaped HTML table; params shown by knob name, objectives with their arrows."""
    labels = {o.metric: axis_label(o) for o in objectives}
    headers = [labels.get(str(c), str(c).removeprefix(PARAM_PREFIX)) for c in table.columns]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    front_at = list(table.columns).index("on_front") if "on_front" in table else None
    body = []
    for row in table.itertuples(index=False, name=None):
        cells = "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row)
        on_front = front_at is not None and bool(row[front_at])
        attrs = ' class="front"' if on_front else ""
        body.append(f"<tr{attrs}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
tr.front td { background: #eaf2fb; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: bold; }
dd { margin: 0; }
img { max-width: 100%; }
"""


def write_report_html(
    path: Path,
    *,
    title: str,
    summary: Mapping[str, Any],
    table: pd.DataFrame,
    objectives: Sequence[Objective],
    plot_path: Path | None,
) -> Path:
    """report.html: summary, plot (embedded), front table and all trials; returns ``path``.

    Self-contained: no external scripts, styles or images. Every text is escaped.
    """
    _check_objectives(table, objectives)
    summary_items = "".join(
        f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(_cell(v))}</dd>"
        for k, v in summary.items()
    )
    plot = ""
    if plot_path is not None:
        encoded = base64.b64encode(Path(plot_path).read_bytes()).decode("ascii")
        plot = f'<img alt="Pareto plot" src="data:image/png;base64,{encoded}">'
    front = front_rows(table, objectives)
    all_trials = table.sort_values("trial", kind="stable") if "trial" in table else table
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Summary</h2>
<dl>{summary_items}</dl>
<h2>Objectives</h2>
<p>{html.escape(", ".join(axis_label(o) for o in objectives))}</p>
{plot}
<h2>Pareto front ({len(front)} trials)</h2>
{_html_table(front, objectives)}
<h2>All complete trials ({len(all_trials)})</h2>
{_html_table(all_trials, objectives)}
</body>
</html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
