"""Screenshots of what a person sees of a study: the MLflow UI and optuna-dashboard.

Starts `fmtune ui --out STUDY` and `fmtune dashboard --out STUDY` on free ports, opens the
study's pages in headless Chromium and writes a PNG of each to --dest:

- mlflow-experiment: the experiment's page in MLflow's "Model training" view (the parent run
  of the study, its trial runs nested under it);
- mlflow-trials: the same runs sorted by the first objective, so every trial run is a row;
- optuna-study: optuna-dashboard's study page (Pareto front by objective name, history,
  best trials, the study's fmtune.* attributes);
- optuna-trial: one trial in the dashboard's trial list (the first failed one if any), with
  its fmtune.* attributes (metrics, failure reason).

The screens test (tests/tuner/test_screens.py) runs the same `capture` on a small fake study
and asserts on the rendered DOMs, so these pictures are checked, not only taken. Chromium is
Debian's (/usr/bin/chromium); `ensure_chromium` installs it with apt-get when it is missing
(the machines run as root).

Usage: .venv/bin/python benchmarks/screens.py [--study out/quickstart] [--dest reports/screens]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
INSTALL_TIMEOUT_S = 900.0
SERVER_TIMEOUT_S = 120.0
PAGE_TIMEOUT_S = 90.0
WINDOW = (1400, 900)
VIRTUAL_TIME_MS = 15_000
"""Chromium's virtual-time budget: how long a page may run its scripts (fetches, rendering)
before the DOM is dumped and the screenshot taken. Virtual time runs ahead of the clock while
the page waits on nothing, so this costs real seconds only while the page is busy."""

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--hide-scrollbars",
)

logger = logging.getLogger(__name__)


# --- chromium ---------------------------------------------------------------------------


def ensure_chromium(timeout_s: float = INSTALL_TIMEOUT_S) -> Path:
    """Debian's Chromium, installed with apt-get when missing; RuntimeError says why not."""
    if CHROMIUM.is_file():
        return CHROMIUM
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError(f"no {CHROMIUM} and no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in ([apt, "update", "-q"], [apt, "install", "-y", "-q", "chromium"]):
        logger.info("installing chromium: %s", " ".join(argv))
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, env=env, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(argv)} took over {timeout_s:.0f} s") from None
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}:\n{tail}")
    if not CHROMIUM.is_file():
        raise RuntimeError(f"apt-get installed chromium but {CHROMIUM} is missing")
    return CHROMIUM


def render(url: str, png: Path, budget_ms: int = VIRTUAL_TIME_MS) -> str:
    """Open `url` in a 1400x900 headless window with a fresh profile, let its scripts run for
    `budget_ms` of virtual time, write a screenshot to `png` and return the rendered DOM."""
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="fmtune-chromium-") as profile:
        argv = [
            str(ensure_chromium()),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={png.resolve()}",
            "--dump-dom",
            url,
        ]
        # Its own session: a Chromium that hangs is killed with all its helper processes.
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            dom, errors = process.communicate(timeout=PAGE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise RuntimeError(f"chromium took over {PAGE_TIMEOUT_S:.0f} s on {url}") from None
    if process.returncode != 0:
        raise RuntimeError(f"chromium exited with {process.returncode} on {url}: {errors[-2000:]}")
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot of {url} to {png}")
    return dom


# --- servers ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers(url: str) -> bool:
    """Whether an HTTP server answers at `url` (any status counts)."""
    try:
        with urllib.request.urlopen(url, timeout=2.0):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def fmtune(*args: str) -> list[str]:
    """The argv of an `fmtune` command run by this Python."""
    return [sys.executable, "-m", "tuner.cli", *args]


@contextlib.contextmanager
def serving(
    servers: dict[str, tuple[list[str], str]], timeout_s: float = SERVER_TIMEOUT_S
) -> Iterator[None]:
    """Start every server (name -> (argv, URL to poll)) at once, each in its own process
    group, and wait until all answer; stop every group (SIGTERM, then SIGKILL) on the way
    out, whatever happens in between. A server that exits or stays silent is a RuntimeError
    with the tail of its output."""
    from runtime.engine.processes import stop_process

    with tempfile.TemporaryDirectory(prefix="fmtune-screens-") as logs:
        processes: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name, (argv, _) in servers.items():
                with Path(logs, f"{name}.log").open("wb") as out:
                    processes[name] = subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=REPO,
                        start_new_session=True,
                    )
            deadline = time.monotonic() + timeout_s
            waiting = dict(servers)
            while waiting:
                for name, (argv, url) in list(waiting.items()):
                    if answers(url):
                        del waiting[name]
                        continue
                    code = processes[name].poll()
                    if code is not None or time.monotonic() > deadline:
                        log = Path(logs, f"{name}.log").read_text(errors="replace")
                        tail = "\n".join(log.splitlines()[-20:])
                        state = f"exited with {code}" if code is not None else "did not answer"
                        raise RuntimeError(
                            f"{name} ({' '.join(argv)}) {state} at {url} within "
                            f"{timeout_s:.0f} s:\n{tail}"
                        )
                time.sleep(0.25)
            yield
        finally:
            for process in processes.values():
                stop_process(process, grace_s=15.0, group=True)


# --- the study's pages ------------------------------------------------------------------


@dataclass(frozen=True)
class StudyFacts:
    """What the page URLs need: ids in both stores, the first objective, a trial to show."""

    study_name: str
    optuna_study_id: int
    mlflow_experiment_id: str
    first_objective: str
    first_direction: str
    shown_trial: int


def study_facts(study_dir: Path) -> StudyFacts:
    """The first study of the folder's study.db and the MLflow experiment holding its runs."""
    import optuna
    from mlflow import MlflowClient

    from tuner.study import default_storage_url
    from tuner.tracking import default_tracking_uri

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(default_storage_url(study_dir))
    try:
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
        if not summaries:
            raise RuntimeError(f"no optuna study in {study_dir / 'study.db'}")
        ids = {s.study_name: storage.get_study_id_from_name(s.study_name) for s in summaries}
        name = min(ids, key=ids.__getitem__)
        study = optuna.load_study(study_name=name, storage=storage)
        objectives = study.user_attrs.get("fmtune.objectives") or [
            {"metric": metric, "direction": direction.name.lower()}
            for metric, direction in zip(
                study.metric_names or ["value"], study.directions, strict=False
            )
        ]
        trials = study.get_trials(deepcopy=False)
        failed = [t.number for t in trials if t.state == optuna.trial.TrialState.FAIL]
        shown = failed[0] if failed else (trials[0].number if trials else 0)
    finally:
        storage.remove_session()
    client = MlflowClient(tracking_uri=default_tracking_uri(study_dir))
    experiment_id = None
    for experiment in client.search_experiments():
        runs = client.search_runs(
            [experiment.experiment_id],
            f"tags.`fmtune.kind` = 'study' and tags.`fmtune.study` = '{name}'",
            max_results=1,
        )
        if runs:
            experiment_id = str(experiment.experiment_id)
            break
    if experiment_id is None:
        raise RuntimeError(f"no MLflow run of study {name!r} in {study_dir / 'mlflow.db'}")
    return StudyFacts(
        study_name=name,
        optuna_study_id=ids[name],
        mlflow_experiment_id=experiment_id,
        first_objective=objectives[0]["metric"],
        first_direction=objectives[0]["direction"],
        shown_trial=shown,
    )


def page_urls(facts: StudyFacts, mlflow_ui: str, dashboard: str) -> dict[str, str]:
    """The pages by screen name. MLflow 3 opens an experiment in its GenAI view unless the
    URL (or the browser's saved choice) says `workflowType=machine_learning`, the link its
    "Model training" switch follows; sorting by a metric lists nested runs as rows."""
    experiment = f"{mlflow_ui}/#/experiments/{facts.mlflow_experiment_id}"
    order = urllib.parse.urlencode(
        {
            "workflowType": "machine_learning",
            "orderByKey": f"metrics.`{facts.first_objective}`",
            "orderByAsc": "true" if facts.first_direction == "minimize" else "false",
        },
        quote_via=urllib.parse.quote,
    )
    study = f"{dashboard}/dashboard/studies/{facts.optuna_study_id}"
    return {
        "mlflow-experiment": f"{experiment}?workflowType=machine_learning",
        "mlflow-trials": f"{experiment}/runs?{order}",
        "optuna-study": study,
        "optuna-trial": f"{study}/trials?numbers={facts.shown_trial}",
    }


@dataclass(frozen=True)
class Screen:
    """One page of the study: where it is, what it showed (DOM), its picture and how long
    it took to render."""

    name: str
    url: str
    dom: str
    png: Path
    seconds: float


def capture(study_dir: Path, dest: Path) -> tuple[StudyFacts, list[Screen]]:
    """Start both UIs on the study (`fmtune ui`, `fmtune dashboard`), render and photograph
    its pages into `dest/<name>.png`; the facts the URLs came from and the screens.

    The study's facts are read while the servers start, and the two apps' pages are rendered
    side by side (one Chromium per app at a time), since most of the time is spent waiting
    on imports, servers and pages' scripts."""
    study_dir = study_dir.resolve()
    ensure_chromium()
    ui_port, dashboard_port = free_port(), free_port()
    ui, board = f"http://127.0.0.1:{ui_port}", f"http://127.0.0.1:{dashboard_port}"
    servers = {
        "fmtune ui": (fmtune("ui", "--out", str(study_dir), "--port", str(ui_port)), ui),
        "fmtune dashboard": (
            fmtune("dashboard", "--out", str(study_dir), "--port", str(dashboard_port)),
            f"{board}/api/meta",
        ),
    }

    def shoot(pages: dict[str, str]) -> list[Screen]:
        shots = []
        for name, url in pages.items():
            started = time.monotonic()
            dom = render(url, dest / f"{name}.png")
            seconds = time.monotonic() - started
            logger.info("%s rendered in %.1f s: %s", name, seconds, url)
            shots.append(Screen(name, url, dom, dest / f"{name}.png", seconds))
        return shots

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        reading = pool.submit(study_facts, study_dir)
        with serving(servers):
            logger.info("both UIs answer after %.1f s", time.monotonic() - started)
            facts = reading.result()
            urls = page_urls(facts, ui, board)
            by_app = [
                {name: url for name, url in urls.items() if name.startswith(app)}
                for app in ("mlflow-", "optuna-")
            ]
            rendering = [pool.submit(shoot, pages) for pages in by_app]
            screens = [screen for job in rendering for screen in job.result()]
    return facts, screens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--study",
        type=Path,
        default=REPO / "out" / "quickstart",
        help="a study's output folder, with study.db and mlflow.db (default: out/quickstart)",
    )
    parser.add_argument(
        "--dest",
        type=Path,
        default=REPO / "reports" / "screens",
        help="folder for the PNGs (default: reports/screens)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for needed in ("study.db", "mlflow.db"):
        if not (args.study / needed).is_file():
            parser.error(f"--study: no {needed} in {args.study}")
    started = time.monotonic()
    facts, screens = capture(args.study, args.dest)
    print(f"study {facts.study_name}:")
    for screen in screens:
        print(f"  {screen.png}  {screen.seconds:5.1f} s  {screen.url}")
    print(f"{time.monotonic() - started:.1f} s in all")


if __name__ == "__main__":
    main()
