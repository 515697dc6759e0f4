"""Two tuning workers on one optuna study in a real PostgreSQL server.

The session starts its own PostgreSQL (the OS packages' server, installed with apt-get when
missing) on a free loopback port, as the `postgres` system user since the server refuses to
run as root, and stops it at the end. `fmtune tune` creates the study there, `fmtune worker`
joins it, and both evaluate trials against the session's hot vLLM replica through cluster
'endpoints' (no worker starts a replica of its own).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from runtime.engine.processes import stop_process
from runtime.engine.replica import Replica, free_port
from tests.tuner.study_peek import peek_study
from tuner.pareto import duplicate_of
from tuner.study import ATTR_WORKER, counted

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
STUDY = "two-workers"
DATABASE = "fmtune"
#: The requirement that provides the PostgreSQL driver SQLAlchemy uses.
DRIVER_REQUIREMENT = "psycopg[binary]>=3.1"
#: The whole test, both workers included, must end within this.
DEADLINE_S = 330


def _run(argv: list[str], *, user: str | None = None, timeout: float = 120) -> str:
    """Run a command (as `user` when given and we are root); fail the test with its output."""
    if user is not None and os.geteuid() == 0:
        argv = ["runuser", "-u", user, "--", *argv]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.fail(f"{' '.join(argv)}: {error}")
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout[-3000:]}"
            f"\n{done.stderr[-3000:]}"
        )
    return done.stdout


def postgres_bin_dir() -> Path | None:
    """The folder with initdb and pg_ctl: Debian's /usr/lib/postgresql/<version>/bin (newest
    version first), else wherever PATH finds them."""
    versions = glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")
    versions.sort(key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    return None


def install_postgres() -> Path:
    """The server binaries, installed with apt-get when missing (the test machines run as
    root); the test fails, never skips, when that is impossible."""
    found = postgres_bin_dir()
    if found is not None:
        return found
    if os.geteuid() != 0:
        pytest.fail("PostgreSQL is not installed and installing it needs root (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "postgresql"]
    done = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:  # an old or missing package list: update once and try again
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, check=False)
        done = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        pytest.fail(f"apt-get install postgresql failed:\n{done.stdout[-2000:]}\n{done.stderr}")
    found = postgres_bin_dir()
    if found is None:
        pytest.fail("apt-get installed postgresql but no pg_ctl/initdb were found")
    return found


def server_user() -> str | None:
    """The user the server runs as: `postgres` when we are root (created if missing)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        _run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", "postgres"])
    return "postgres"


def sqlalchemy_scheme() -> str:
    """The SQLAlchemy URL scheme of the installed PostgreSQL driver."""
    if importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg"
    if importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2"
    pytest.fail(f"no PostgreSQL driver for SQLAlchemy: install '{DRIVER_REQUIREMENT}'")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database on a PostgreSQL server of its own, on a free loopback port."""
    scheme = sqlalchemy_scheme()
    bin_dir = install_postgres()
    user = server_user()
    # Not under pytest's tmp_path: its parents are private to root, so the server's user
    # could not reach a data folder there.
    home = Path(tempfile.mkdtemp(prefix="fmtune-pg-"))
    data, sockets, log = home / "data", home / "sockets", home / "server.log"
    sockets.mkdir()
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (home, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    port = free_port()
    pg_ctl = str(bin_dir / "pg_ctl")
    started = False
    try:
        _run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            user=user,
        )  # fmt: skip
        options = f"-p {port} -h 127.0.0.1 -k {sockets} -c fsync=off -c max_connections=60"
        _run([pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start"],
             user=user)  # fmt: skip
        started = True
        _run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
              DATABASE], user=user)  # fmt: skip
        yield f"{scheme}://postgres@127.0.0.1:{port}/{DATABASE}"
    finally:
        if started:
            subprocess.run(
                [*(["runuser", "-u", user, "--"] if user else []), pg_ctl, "-D", str(data),
                 "-m", "fast", "-w", "-t", "60", "stop"],
                capture_output=True, timeout=90, check=False,
            )  # fmt: skip
        shutil.rmtree(home, ignore_errors=True)


def test_postgres_server_answers(postgres_url: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            version = connection.execute(sqlalchemy.text("select version()")).scalar_one()
    finally:
        engine.dispose()
    assert version.startswith("PostgreSQL")


# --- two workers ------------------------------------------------------------------------


def write_experiment(tmp_path: Path, base_url: str, trials: int, requests: int) -> Path:
    """extract-cpu.yaml served by the hot replica's URL, tuning the app knobs only."""
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump({"app": {"architecture": ["single", "parallel"], "format": ["json", "tag"]}})
    )
    data = yaml.safe_load((ROOT / "experiments" / "extract-cpu.yaml").read_text())
    data["workload"] = {
        "arrivals": {"kind": "closed", "users": 2, "think_time_s": 0},
        "num_requests": requests,
        "seed": 0,
    }
    data["sla"] = {"e2e_s": 120}
    data["deployment"]["cluster"] = "endpoints"
    data["deployment"]["models"]["llm"]["endpoints"] = [base_url]
    data["tune"] = {
        "search_space": str(space),
        "objectives": [
            {"metric": "cost_per_1k_usd", "direction": "minimize"},
            {"metric": "quality", "direction": "maximize"},
        ],
        "trials": trials,
        "sampler": "random",
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tuner.cli", *argv],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def wait_for_study(url: str, deadline: float, tune: subprocess.Popen[bytes], log: Path) -> None:
    """Until `fmtune tune` has created the study and stored its experiment in it."""
    while time.monotonic() < deadline:
        if tune.poll() is not None:
            pytest.fail(f"fmtune tune exited with {tune.returncode}:\n{log.read_text()[-4000:]}")
        study = peek_study(STUDY, url)
        with contextlib.suppress(SQLAlchemyError):
            if study is not None and "fmtune.experiment" in study.user_attrs:
                return
        time.sleep(0.5)
    pytest.fail(f"the study did not appear in time:\n{log.read_text()[-4000:]}")


def wait(process: subprocess.Popen[bytes], name: str, deadline: float, log: Path) -> None:
    try:
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop_process(process, grace_s=20.0, group=True)
        pytest.fail(f"{name} did not finish in time:\n{log.read_text()[-4000:]}")
    if process.returncode != 0:
        pytest.fail(f"{name} exited with {process.returncode}:\n{log.read_text()[-4000:]}")


@pytest.mark.engine
def test_two_workers_share_one_study(
    postgres_url: str, hot_replica: Replica, tmp_path: Path
) -> None:
    deadline = time.monotonic() + DEADLINE_S
    trials = 4
    experiment = write_experiment(tmp_path, hot_replica.base_url, trials=trials, requests=4)
    tune_log, worker_log = tmp_path / "tune.log", tmp_path / "worker.log"
    common = ["--storage", postgres_url, "--study", STUDY]
    tune = start(["tune", str(experiment), *common, "--out", str(tmp_path / "tune")], tune_log)
    worker: subprocess.Popen[bytes] | None = None
    try:
        wait_for_study(postgres_url, deadline, tune, tune_log)
        worker = start(["worker", *common, "--out", str(tmp_path / "worker")], worker_log)
        wait(tune, "fmtune tune", deadline, tune_log)
        wait(worker, "fmtune worker", deadline, worker_log)
    finally:
        for process in (tune, worker):
            if process is not None:
                stop_process(process, grace_s=20.0, group=True)

    study = optuna.load_study(study_name=STUDY, storage=postgres_url)
    every = study.get_trials()
    assert [t for t in every if t.state == TrialState.RUNNING] == []
    done = [t for t in every if counted(t)]
    assert len(done) == trials, [(t.number, t.state, t.user_attrs) for t in every]
    assert all(t.state == TrialState.COMPLETE for t in done), [t.user_attrs for t in done]
    workers = {t.user_attrs[ATTR_WORKER] for t in done}
    assert len(workers) >= 2, (workers, tune_log.read_text()[-2000:])
    # Each worker wrote the trials it evaluated into its own output folder (a trial that
    # reused an earlier trial's result, its knobs being the same, evaluated nothing).
    written = {
        int(p.name) for out in ("tune", "worker") for p in (tmp_path / out / "trials").glob("*")
    }
    assert written == {t.number for t in done if duplicate_of(t) is None}
