"""The study commands: `tune`, `worker`, `export`, `ui`.

`tune` and `worker` share one loop (`_run_study`): the tuner owns a replica pool for the whole
study, so engines stay hot across trials, and shows the study live (`display.StudyDisplay`).
At the end the Pareto front is written (pareto.csv, pareto.png, report.html) and printed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from runtime.engine.processes import stop_process
from runtime.errors import unknown_name_message
from tuner.cli.common import fail, set_option, user_errors
from tuner.cli.display import StudyDisplay, console, front_table
from tuner.samplers import SAMPLERS, sampler_help

if TYPE_CHECKING:
    import optuna

    from tuner.experiment import Experiment
    from tuner.study import TrialReport
    from tuner.tracking import StudyTracker

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the study commands to the app."""
    app.command()(tune)
    app.command()(worker)
    app.command()(export)
    app.command()(ui)


# --- the study loop ---------------------------------------------------------------------


def _run_study(
    experiment: Experiment,
    *,
    storage: str,
    study_name: str,
    out: Path,
    trials: int,
    sampler: str | None,
    resume: bool,
    worker: bool,
    tracking_uri: str | None,
) -> None:
    """The study loop with a live display; shared by `tune` and `worker`."""
    import optuna

    from runtime.engine.pool import PoolLimits, ReplicaPool
    from runtime.run import execute_run
    from tuner.study import StudyEvents, StudyRunner, budget_used
    from tuner.tracking import StudyTracker, default_tracking_uri

    assert experiment.tune is not None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or default_tracking_uri(out)
    tracker = StudyTracker(uri, experiment_name=f"fmtune-{study_name}", study_name=study_name)
    display = StudyDisplay(trials, {o.metric: o.direction for o in experiment.tune.objectives})

    def trial_done(report: TrialReport) -> None:
        display.trial_done(report)
        display.completed(budget_used(runner.study)[0])

    with ReplicaPool(PoolLimits(max_replicas=3, max_memory_gib=16), log_dir=out / "logs") as pool:

        def evaluate(spec: Any) -> Any:
            return execute_run(spec, pool)

        runner = StudyRunner(
            experiment, storage_url=storage, study_name=study_name, out_dir=out,
            evaluate=evaluate, tracker=tracker, sampler_name=sampler,
            events=StudyEvents(on_phase=display.phase, on_trial_done=trial_done),
        )  # fmt: skip
        done, running = budget_used(runner.study)
        if (done or running) and not (resume or worker):
            fail(
                f"study '{study_name}' already has {done} trials in {storage}; pass --resume "
                "to continue it or --study NAME to start another"
            )
        tracker.log_study(
            {"sampler": runner.tune.sampler_name(), "trials": trials, "storage": storage},
            {"fmtune.experiment_file": experiment.name},
        )
        if resume:
            runner.recover_interrupted()
        with display:
            display.completed(budget_used(runner.study)[0])
            runner.run(trials)
            display.finished()
    _finish_study(runner.study, out, tracker)


def _finish_study(study: optuna.Study, out: Path, tracker: StudyTracker | None) -> None:
    """pareto.csv, pareto.png and report.html; the front as a table."""
    from tuner.export import front_frame, study_objectives
    from tuner.pareto import hypervolume, reference_point
    from tuner.report import pareto_plot, write_pareto_csv, write_report_html
    from tuner.study import summarize_study

    objectives = study_objectives(study)
    table = front_frame(study)
    summary = summarize_study(study)
    facts: dict[str, Any] = {
        "study": study.study_name,
        "complete_trials": summary.complete,
        "failed_trials": summary.failed,
        "not_counted_trials": summary.not_counted,
    }
    if table.empty or not table["on_front"].any():
        console.print("[yellow]no feasible complete trial: no Pareto front yet[/]")
        return
    front = table[table["on_front"]]
    metrics = [o.metric for o in objectives]
    directions = [o.direction for o in objectives]
    feasible = table[table["feasible"]][metrics].to_numpy().tolist()
    if len(objectives) > 1 and feasible:
        reference = reference_point(feasible, directions)
        facts["hypervolume"] = hypervolume(
            front[metrics].to_numpy().tolist(), reference, directions
        )
    csv_path, png_path, html_path = out / "pareto.csv", out / "pareto.png", out / "report.html"
    write_pareto_csv(table, csv_path)
    pareto_plot(table, objectives, png_path)
    write_report_html(
        html_path, title=f"fmtune study {study.study_name}", summary=facts, table=table,
        objectives=objectives, plot_path=png_path,
    )  # fmt: skip
    if tracker is not None:
        numeric = {k: float(v) for k, v in facts.items() if isinstance(v, int | float)}
        numeric["front_size"] = float(len(front))
        tracker.log_study_summary(
            numeric, {"pareto.csv": csv_path, "pareto.png": png_path, "report.html": html_path}
        )
    console.print(front_table(study.study_name, table, metrics, directions))
    console.print(f"wrote {csv_path}, {png_path}, {html_path}")


# --- commands ---------------------------------------------------------------------------


def tune(
    experiment: Annotated[Path, typer.Argument(help="Experiment file with a tune section.")],
    trials: Annotated[
        int | None, typer.Option(min=1, help="Trials in the budget (default: the file's).")
    ] = None,
    sampler: Annotated[
        str | None,
        typer.Option(help=f"Search algorithm (default: the file's): {sampler_help()}."),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(help="optuna storage URL (default: SQLite in the output folder)."),
    ] = None,
    study: Annotated[
        str | None, typer.Option(help="Study name (default: the file's name).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: out/<experiment name>).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue an existing study after a crash or Ctrl-C.")
    ] = False,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: SQLite in the output folder).")
    ] = None,
    set_: Annotated[
        list[str] | None, set_option("Override an experiment field by dotted path.")
    ] = None,
) -> None:
    """Search every layer's knobs jointly on real replicas; keep every trial; print the front."""
    from runtime.engine.config import parse_assignments
    from tuner.experiment import load_experiment
    from tuner.study import default_storage_url

    with user_errors():
        loaded = load_experiment(experiment, parse_assignments(set_ or []), need_tune=True)
        assert loaded.tune is not None
        if trials is not None:  # stored with the study, so `fmtune worker` keeps this budget
            tune_spec = loaded.tune.model_copy(update={"trials": trials})
            loaded = loaded.model_copy(update={"tune": tune_spec})
        if sampler is not None and sampler not in SAMPLERS:
            fail(f"--sampler: {unknown_name_message('sampler', sampler, SAMPLERS)}")
        folder = out or Path("out") / loaded.name
        folder.mkdir(parents=True, exist_ok=True)
        _run_study(
            loaded, storage=storage or default_storage_url(folder), study_name=study or loaded.name,
            out=folder, trials=trials or loaded.tune.trials, sampler=sampler, resume=resume,
            worker=False, tracking_uri=tracking_uri,
        )  # fmt: skip


def worker(
    storage: Annotated[str, typer.Option(help="Shared optuna storage, e.g. postgresql://...")],
    study: Annotated[str, typer.Option(help="Name of the study to join.")],
    out: Annotated[Path, typer.Option(help="Folder for this worker's trial outputs.")] = Path(
        "out/worker"
    ),
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI shared by the workers.")
    ] = None,
) -> None:
    """Add this machine as a worker to an existing study (created by `fmtune tune`)."""
    from tuner.export import load_study, study_experiment

    with user_errors():
        existing = study_experiment(load_study(study, storage), wait_s=30.0)
        assert existing.tune is not None
        _run_study(
            existing, storage=storage, study_name=study, out=out, trials=existing.tune.trials,
            sampler=None, resume=False, worker=True, tracking_uri=tracking_uri,
        )  # fmt: skip


def export(
    study: Annotated[str, typer.Option(help="Study name.")],
    out: Annotated[Path, typer.Option(help="Folder for the bundles.")],
    storage: Annotated[
        str | None,
        typer.Option(help="optuna storage URL (default: SQLite of out/<study>/study.db)."),
    ] = None,
) -> None:
    """Write a deploy bundle for each Pareto-optimal trial: DEPLOY.yaml, vLLM commands,
    docker-compose, Kubernetes manifests and a README with its metrics."""
    from rich.table import Table

    from tuner.export import export_front, load_study
    from tuner.study import default_storage_url

    with user_errors():
        url = storage or default_storage_url(Path("out") / study)
        if storage is None and not (Path("out") / study / "study.db").exists():
            fail(f"--storage is needed: no study database at out/{study}/study.db")
        bundles = export_front(load_study(study, url), out)
    table = Table(title=f"bundles of the Pareto front of {study}")
    table.add_column("trial", justify="right")
    table.add_column("folder")
    table.add_column("files")
    for bundle in bundles:
        table.add_row(
            str(bundle.trial), str(bundle.folder), ", ".join(f.name for f in bundle.files)
        )
    console.print(table)


def ui(
    out: Annotated[
        Path | None, typer.Option(help="A study's output folder (its mlflow.db).")
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="Any MLflow tracking URI.")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the UI.")] = 5000,
) -> None:
    """Start the MLflow UI on a study's tracking store (Ctrl-C stops it)."""
    import subprocess

    from tuner.tracking import default_tracking_uri, ui_command

    if tracking_uri is None:
        if out is None:
            fail("give --out (a study's output folder) or --tracking-uri")
        if not (out / "mlflow.db").exists():
            fail(f"--out: no mlflow.db in {out}")
        tracking_uri = default_tracking_uri(out)
    command = ui_command(tracking_uri, host=host, port=port)
    console.print(f"MLflow UI on http://{host}:{port} (tracking {tracking_uri}); Ctrl-C stops it")
    process = subprocess.Popen(command)
    try:
        process.wait()
    finally:
        stop_process(process, grace_s=10.0)
