"""The study commands: `tune`, `worker`, `export`, `ui`, `dashboard`.

`tune` and `worker` share one loop (`_run_study`): the tuner owns a replica pool for the whole
study, so engines stay hot across trials, and shows the study live (`display.StudyDisplay`).
At the end the report is written (pareto.csv, pareto.png, parallel.png, hypervolume.png,
report.html: `tuner.report`) and the front printed. Ctrl-C or SIGTERM stops the study with the
interrupted trial named and the exact command that continues it (`_Interruption`).
"""

from __future__ import annotations

import logging
import shlex
import signal
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from runtime.engine.processes import stop_process
from runtime.errors import unknown_name_message
from tuner.cli.common import fail, set_option, user_errors
from tuner.cli.display import StudyDisplay, console, error_console, front_table
from tuner.samplers import SAMPLERS, sampler_help
from tuner.schedule import DEFAULT_AT, DEFAULT_NAME, ScheduleFormat

if TYPE_CHECKING:
    import subprocess
    from typing import IO

    import optuna

    from tuner.experiment import Experiment
    from tuner.pareto import Objective
    from tuner.report import StudyReport
    from tuner.study import TrialReport
    from tuner.tracking import StudyTracker

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the study commands to the app."""
    app.command()(tune)
    app.command()(worker)
    app.command()(export)
    app.command()(regress)
    app.command()(ui)
    app.command()(dashboard)
    # Everything after `--` is passed through to the scheduled `fmtune regress`.
    app.command(context_settings={"allow_extra_args": True})(schedule)


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
    again: list[str],
) -> None:
    """The study loop with a live display; shared by `tune` and `worker`. `again` is the
    command that continues the study, shown when Ctrl-C or SIGTERM stops it."""
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
    interruption = _Interruption(again)

    def phase(number: int, text: str) -> None:
        interruption.phase(number, text)
        display.phase(number, text)

    def trial_done(report: TrialReport) -> None:
        interruption.trial_done()
        display.trial_done(report)
        display.completed(budget_used(runner.study)[0])

    pool_limits = PoolLimits(max_replicas=3, max_memory_gib=16)
    # The MLflow parent run ends with the loop, before the replicas stop: FINISHED once the
    # budget is used, KILLED on Ctrl-C or SIGTERM, FAILED on an error (tracker.study_run).
    with (
        interruption,
        ReplicaPool(pool_limits, log_dir=out / "logs") as pool,
        tracker.study_run(),
    ):

        def evaluate(spec: Any) -> Any:
            return execute_run(spec, pool, on_phase=interruption.run_phase(phase))

        runner = StudyRunner(
            experiment, storage_url=storage, study_name=study_name, out_dir=out,
            evaluate=evaluate, tracker=tracker, sampler_name=sampler,
            events=StudyEvents(on_phase=phase, on_trial_done=trial_done),
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


class _Interruption:
    """Which trial runs, and when Ctrl-C or SIGTERM ends the study (once its replicas are
    stopped): one line naming the interrupted trial and one with the exact command that
    continues the study. The exit code stays 130 (SIGINT) or 143 (SIGTERM); the trial stays
    RUNNING in the storage, and --resume closes it as interrupted and runs its knobs again."""

    def __init__(self, again: list[str]) -> None:
        self.again = again
        self.trial: int | None = None
        self.doing: str | None = None

    def phase(self, number: int, text: str) -> None:
        """Trial `number` is now doing `text`."""
        self.trial, self.doing = number, text

    def run_phase(self, phase: Callable[[int, str], None]) -> Callable[[str], None]:
        """A run's phase callback that reports through `phase` for the running trial."""

        def report(text: str) -> None:
            if self.trial is not None:
                phase(self.trial, text)

        return report

    def trial_done(self) -> None:
        """No trial runs until the next phase."""
        self.trial = self.doing = None

    def __enter__(self) -> _Interruption:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(error, KeyboardInterrupt):
            code = 128 + signal.SIGINT
        elif isinstance(error, SystemExit) and error.code in (
            128 + signal.SIGINT,
            128 + signal.SIGTERM,
        ):
            code = int(error.code)
        else:
            return
        name = "Ctrl-C" if code == 128 + signal.SIGINT else "SIGTERM"
        if self.trial is None:
            what = f"study interrupted by {name} between trials"
        else:
            what = (
                f"study interrupted by {name} during trial {self.trial} ({self.doing}); "
                "--resume runs it again"
            )
        resume = f"continue with: {shlex.join(self.again)}"
        for line, style in ((what, "bold yellow"), (resume, "")):
            error_console.print(line, style=style, markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(code) from None


def _finish_study(study: optuna.Study, out: Path, tracker: StudyTracker | None) -> None:
    """pareto.csv, pareto.png and report.html; the front as a table."""
    from tuner.export import front_frame, study_objectives
    from tuner.pareto import hypervolume, reference_point
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
        report = _write_report(study, objectives, out, facts, tracker)  # failures, reasons
        if tracker is not None:
            _track_report(tracker, facts, [], report)
        console.print("[yellow]no feasible complete trial: no Pareto front yet[/]")
        console.print(f"wrote {report.html}")
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
    report = _write_report(study, objectives, out, facts, tracker)
    if tracker is not None:
        _track_report(tracker, facts, [int(n) for n in front["trial"]], report)
    console.print(front_table(study.study_name, table, metrics, directions, width=console.width))
    console.print(f"wrote {', '.join(str(path) for path in report.files().values())}")


def _track_report(
    tracker: StudyTracker, facts: dict[str, Any], front: list[int], report: StudyReport
) -> None:
    """The study's end in MLflow: its numbers as metrics and its report files (report.html,
    pareto.csv, pareto.png, ...) as artifacts of the parent run, and the front's trial runs
    tagged (`tracker.mark_pareto_front`, which also untags trials a resume pushed off it).
    MLflow failing here costs a warning, not the report already written."""
    numeric = {k: float(v) for k, v in facts.items() if isinstance(v, int | float)}
    numeric["front_size"] = float(len(front))
    files = {name: path for name, path in report.files().items() if path.is_file()}
    try:
        tracker.log_study_summary(numeric, files)
        tracker.mark_pareto_front(front)
    except Exception as error:
        logger.warning("MLflow: the study's report and front were not logged: %s", error)


def _write_report(
    study: optuna.Study,
    objectives: list[Objective],
    out: Path,
    facts: dict[str, Any],
    tracker: StudyTracker | None,
) -> StudyReport:
    """The study's report files in `out`: links to the bundles `fmtune export` writes to
    out/bundles (as `make quickstart` does) and to each trial's run in `fmtune ui`."""
    from tuner.report import DEFAULT_MLFLOW_UI, MlflowLinks, write_study_report

    experiment_id = None
    if tracker is not None:
        try:
            experiment_id = tracker.experiment_id
        except Exception as error:  # the report must not fail because MLflow does
            logger.warning("no MLflow experiment id for the report's links: %s", error)
    return write_study_report(
        study, objectives, out, summary=facts, bundles_dir=out / "bundles",
        mlflow=MlflowLinks(experiment_id=experiment_id, ui_url=DEFAULT_MLFLOW_UI),
    )  # fmt: skip


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
        url, name = storage or default_storage_url(folder), study or loaded.name
        again = ["fmtune", "tune", str(experiment)]
        for option, value in (("--trials", trials), ("--sampler", sampler),
                              ("--tracking-uri", tracking_uri)):  # fmt: skip
            again += [option, str(value)] if value is not None else []
        for assignment in set_ or []:
            again += ["--set", assignment]
        again += ["--out", str(folder), "--storage", url, "--study", name, "--resume"]
        _run_study(
            loaded, storage=url, study_name=name, out=folder,
            trials=trials or loaded.tune.trials, sampler=sampler, resume=resume, worker=False,
            tracking_uri=tracking_uri, again=again,
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
        again = ["fmtune", "worker", "--storage", storage, "--study", study, "--out", str(out)]
        again += ["--tracking-uri", tracking_uri] if tracking_uri is not None else []
        _run_study(
            existing, storage=storage, study_name=study, out=out, trials=existing.tune.trials,
            sampler=None, resume=False, worker=True, tracking_uri=tracking_uri, again=again,
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


def regress(
    baseline: Annotated[
        str,
        typer.Argument(
            help="An export folder (`fmtune export --out`) or one of its bundles, or a study "
            "name (its Pareto front; with --storage)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for regress.md, regress.html, regress.xml, the trend plots and the "
            "history store (history.db); run nightly into the same folder to build the trend."
        ),
    ],
    storage: Annotated[
        str | None,
        typer.Option(help="optuna storage URL of a study (default: out/<study>/study.db)."),
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(
            min=3,
            help="Measurements of each deployment (default: the experiment's "
            "tune.regress.repeats, 3).",
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: SQLite in --out).")
    ] = None,
    retune: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Then run a study of N new trials seeded with the previous front and say "
            "which new deployment dominates which old one (study in --out/retune.db).",
        ),
    ] = None,
) -> None:
    """Measure exported deployments again on today's stack and compare them with their own
    baseline measurements: exit 1 when a deployment regressed on an objective, 0 otherwise,
    2 on bad input."""
    from runtime.engine.pool import PoolLimits, ReplicaPool
    from runtime.run import execute_run
    from tuner.regress import load_baseline, run_regress, stack_tags
    from tuner.tracking import default_tracking_uri

    with user_errors():
        source, baselines = load_baseline(baseline, storage)
        if retune is not None:
            from tuner.retune import check_retune

            check_retune(baselines)
    console.print(f"measuring {len(baselines)} deployment(s) of {source} again")
    with (
        user_errors(),
        ReplicaPool(PoolLimits(max_replicas=3, max_memory_gib=16), log_dir=out / "logs") as pool,
        console.status("starting") as status,
    ):

        def evaluate(spec: Any) -> Any:
            return execute_run(spec, pool, on_phase=status.update)

        def measure(spec: Any) -> dict[str, Any]:
            return evaluate(spec).metrics_dict()

        def announce(item: Any, count: int) -> None:
            console.print(f"{item.name}: {count} repeats")

        report = run_regress(
            baselines, measure, out, source=source, repeats=repeats,
            stack=stack_tags([b.spec for b in baselines]),
            tracking_uri=tracking_uri or default_tracking_uri(out), on_deployment=announce,
        )  # fmt: skip
        retuned = None
        if retune is not None:
            from tuner.retune import retune as run_retune

            night = report.night.replace(":", "").replace("-", "").split("+")[0]
            retuned = run_retune(baselines, retune, out, evaluate, study_name=f"retune-{night}")
    for comparison in report.comparisons():
        style = {"regressed": "bold red", "improved": "green"}.get(comparison.verdict, "")
        console.print(comparison.line(), style=style, highlight=False)
    console.print(f"wrote {', '.join(str(path) for path in report.files.values())}")
    for line in retuned.lines() if retuned is not None else []:
        console.print(line, highlight=False)
    if report.regressed:
        raise typer.Exit(1)


def ui(
    out: Annotated[
        Path | None, typer.Option(help="A study's output folder (its mlflow.db).")
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="Any MLflow tracking URI.")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the UI.")] = 5000,
) -> None:
    """Start the MLflow UI on a study's tracking store (Ctrl-C stops it).

    One web worker and no job runner (`tracking.ui_command`, `ui_environment`): a small
    machine answers in seconds. The URL is printed once the UI answers, and opens the study's
    runs table.
    """

    from tuner.tracking import default_tracking_uri, ui_command, ui_environment, ui_url

    if tracking_uri is None:
        if out is None:
            fail("give --out (a study's output folder) or --tracking-uri")
        if not (out / "mlflow.db").exists():
            fail(f"--out: no mlflow.db in {out}")
        tracking_uri = default_tracking_uri(out)
    _check_port_free(host, port)
    command = ui_command(tracking_uri, host=host, port=port)
    _serve_web_app(
        "MLflow UI", command, host, port, UI_START_TIMEOUT_S,
        store=("tracking", tracking_uri),
        url=lambda: ui_url(f"http://{host}:{port}", _only_fmtune_experiment(host, port)),
        env=ui_environment(),
    )  # fmt: skip


UI_START_TIMEOUT_S = 120.0
"""How long `fmtune ui` waits for the MLflow UI to answer HTTP (seconds on an idle 2-core
machine; much longer when the CPUs are busy with a study)."""


def _only_fmtune_experiment(host: str, port: int) -> str | None:
    """The id of the store's one fmtune experiment (``fmtune-<study>``), asked of the UI's
    REST API; None when there are none or several (the URL then opens the list)."""
    import json
    import urllib.request

    connect = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    base = f"http://{connect if ':' not in connect else f'[{connect}]'}:{port}"
    body = json.dumps({"max_results": 2, "filter": "name LIKE 'fmtune-%'"}).encode()
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/experiments/search", data=body, method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10.0) as response:
            experiments = json.load(response).get("experiments", [])
    except (OSError, ValueError) as error:
        logger.info("MLflow UI: no experiment list (%s); linking the list page", error)
        return None
    return str(experiments[0]["experiment_id"]) if len(experiments) == 1 else None


DASHBOARD_START_TIMEOUT_S = 60.0
"""How long `fmtune dashboard` waits for optuna-dashboard to answer HTTP."""


def dashboard(
    out: Annotated[
        Path | None, typer.Option(help="A study's output folder (its study.db).")
    ] = None,
    storage: Annotated[str | None, typer.Option(help="Any optuna storage URL.")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the dashboard.")] = 8080,
) -> None:
    """Start optuna-dashboard on a study's optuna storage: objectives by name, Pareto front,
    every trial's knobs and fmtune.* attributes (Ctrl-C stops it).

    optuna-dashboard 0.21 does not read optuna 5's named constraints (`trial.set_constraint`):
    it draws and lists trials that break an SLA bound like feasible ones. Each trial's
    fmtune.feasible and fmtune.violations attributes say it on its page; the study's front
    is in its pareto.csv and report.html, and `fmtune export` writes it.
    """

    from tuner.study import default_storage_url

    if storage is None:
        if out is None:
            fail("give --out (a study's output folder) or --storage")
        if not (out / "study.db").is_file():
            fail(f"--out: no study.db in {out}")
        storage = default_storage_url(out)
    elif storage.startswith("sqlite:///") and not _sqlite_file(storage).is_file():
        fail(f"--storage: no database at {_sqlite_file(storage)}")
    _check_port_free(host, port)
    command = [_dashboard_executable(), storage, "--host", host, "--port", str(port), "--quiet"]
    url = f"http://{host}:{port}/dashboard"
    _serve_web_app(
        "optuna-dashboard", command, host, port, DASHBOARD_START_TIMEOUT_S,
        store=("storage", storage), url=lambda: url,
    )  # fmt: skip


def _serve_web_app(
    name: str,
    command: list[str],
    host: str,
    port: int,
    timeout_s: float,
    *,
    store: tuple[str, str],
    url: Callable[[], str],
    env: dict[str, str] | None = None,
) -> NoReturn:
    """Run a web UI (MLflow's, optuna-dashboard) until Ctrl-C: print its URL once it answers
    HTTP, exit 2 with its output's tail if it dies or never answers, exit 1 if it stops on
    its own later. It runs in its own process group, so Ctrl-C in the terminal reaches fmtune
    alone, and stopping the group stops its workers too, on every exit path. `store` is what
    it shows: (kind, location), e.g. ("tracking", the MLflow tracking URI)."""
    import subprocess
    import tempfile

    kind, location = store
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )  # fmt: skip
        try:
            problem = _wait_until_answers(process, host, port, timeout_s)
            if problem is not None:
                stop_process(process, grace_s=5.0, group=True)
                fail(f"{name} on {location} {problem}", _tail(log))
            console.print(f"{name} on {url()} ({kind} {location}); Ctrl-C stops it", soft_wrap=True)
            code = process.wait()
            error_console.print(f"[bold red]error:[/] {name} exited with code {code}")
            detail = _tail(log)
            if detail:
                error_console.print(detail, style="dim", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        finally:
            stop_process(process, grace_s=10.0, group=True)


def _sqlite_file(url: str) -> Path:
    """The database file of a `sqlite:///PATH` URL (query string left out)."""
    return Path(url.removeprefix("sqlite:///").split("?", 1)[0])


def _dashboard_executable() -> str:
    """optuna-dashboard's console script: beside this Python first (the venv), then PATH."""
    import shutil
    import sys

    beside = Path(sys.executable).with_name("optuna-dashboard")
    found = str(beside) if beside.is_file() else shutil.which("optuna-dashboard")
    if found is None:
        fail("optuna-dashboard is not installed: pip install optuna-dashboard")
    return found


def _check_port_free(host: str, port: int) -> None:
    """Exit 2 when `host:port` is taken: a server already there would answer in its place."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        fail(f"--port: cannot listen on {host}:{port}: {error.strerror or error}")


def _wait_until_answers(
    process: subprocess.Popen[bytes], host: str, port: int, timeout_s: float
) -> str | None:
    """None once the server answers HTTP; else why not (it exited, or it kept silent)."""
    import time
    import urllib.error
    import urllib.request

    connect = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    probe = f"http://{connect if ':' not in connect else f'[{connect}]'}:{port}/api/meta"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            return f"exited with code {code} before answering"
        try:
            with urllib.request.urlopen(probe, timeout=2.0):
                return None
        except urllib.error.HTTPError:
            return None  # it answers, if not happily: the page will tell
        except OSError:
            time.sleep(0.2)
    return f"did not answer on {host}:{port} within {timeout_s:.0f} s"


def _tail(log: IO[bytes], lines: int = 12) -> str:
    """The last lines of a child's captured output."""
    log.flush()
    log.seek(0)
    text = log.read().decode(errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:])


# --- schedule ---------------------------------------------------------------------------


def schedule(
    ctx: typer.Context,
    baseline: Annotated[
        str,
        typer.Argument(
            help="What the nightly `fmtune regress` measures again: an export folder or a study."
        ),
    ],
    out: Annotated[str, typer.Option(help="The regress --out folder, where its history grows.")],
    at: Annotated[
        str, typer.Option(help="Time of day, HH:MM on a 24-hour clock, local time.")
    ] = DEFAULT_AT,
    format_: Annotated[
        ScheduleFormat,
        typer.Option("--format", help="cron: a crontab line; systemd: a .service and .timer."),
    ] = "cron",
    install: Annotated[
        bool,
        typer.Option(
            help="Add the line to your crontab, or write the units to ~/.config/systemd/user."
        ),
    ] = False,
    workdir: Annotated[
        Path | None, typer.Option(help="Folder the command runs in (default: this one).")
    ] = None,
    name: Annotated[
        str, typer.Option(help="systemd unit name, and the crontab line's marker.")
    ] = DEFAULT_NAME,
) -> None:
    """Print (or --install) a nightly `fmtune regress BASELINE --out DIR` as a cron line or a
    systemd service and timer; regress flags go after `--` (e.g. `-- --repeats 5`).

    The command runs in --workdir through this installation's fmtune (cron and systemd do not
    see a virtual environment's PATH). The units are written, never enabled: the lines that
    enable them are printed. examples/schedule/ has the same job for GitHub Actions and a
    Kubernetes CronJob.
    """
    from pydantic import ValidationError

    from runtime.errors import describe_validation_error
    from tuner.schedule import (
        Schedule,
        cron_line,
        enable_commands,
        install_cron,
        install_systemd_units,
        systemd_units,
        systemd_user_dir,
    )

    try:
        plan = Schedule(
            baseline=baseline, out=out, at=at, extra_args=tuple(ctx.args),
            workdir=(workdir or Path.cwd()).absolute(), executable=_fmtune_executable(),
            name=name,
        )  # fmt: skip
    except ValidationError as error:
        fail(describe_validation_error(error, locate=lambda loc: ("", (f"--{loc[0]}",))))
    verbatim = {"markup": False, "highlight": False, "emoji": False, "soft_wrap": True}
    with user_errors():
        if format_ == "cron":
            console.print(cron_line(plan), **verbatim)  # stdout: the line alone
            if install:
                install_cron(plan)
                error_console.print(f"added to your crontab as {plan.name} (crontab -l shows it)")
            return
        folder = systemd_user_dir()
        for file_name, text in systemd_units(plan).items():
            console.print(f"# {folder / file_name}\n{text}", **verbatim)
        if install:
            written = install_systemd_units(plan, folder)
            error_console.print(f"wrote {', '.join(str(path) for path in written)}", **verbatim)
        else:
            error_console.print(f"--install writes these files into {folder}", **verbatim)
        enable = " && ".join(shlex.join(command) for command in enable_commands(plan))
        error_console.print(f"then enable the timer with: {enable}", **verbatim)


def _fmtune_executable() -> Path:
    """This installation's fmtune console script: beside this Python (the virtual
    environment), else the one on PATH."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "fmtune"
    if beside.is_file():
        return beside.absolute()
    found = shutil.which("fmtune")
    if found is None:
        fail("the fmtune console script is neither beside this Python nor on PATH")
    return Path(found).absolute()
