"""A nightly `fmtune regress`, scheduled the way people schedule jobs: cron or a systemd timer.

One command runs every night wherever it is scheduled: :func:`regress_argv`, ``fmtune regress
BASELINE --out DIR`` with the user's extra regress flags. `fmtune schedule` renders it as a
crontab line (:func:`cron_line`) or a systemd service and timer pair (:func:`systemd_units`),
and with ``--install`` adds the line to the user's crontab (:func:`install_cron`, through
``crontab -l`` / ``crontab -``) or writes the units to ``~/.config/systemd/user``
(:func:`install_systemd_units`; enabling them is left to the user's ``systemctl --user``). The
shipped examples in examples/schedule/ (a GitHub Actions scheduled workflow and a Kubernetes
CronJob) run the same command at the same time of day.

The renderers are pure functions of a validated :class:`Schedule`; only the two install
functions touch the machine. The time is the machine's local time for cron and systemd (both
read it so); the GitHub and Kubernetes examples say UTC.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runtime.errors import FmtuneError

logger = logging.getLogger(__name__)

ScheduleFormat = Literal["cron", "systemd"]
"""How `fmtune schedule` renders the nightly job."""
DEFAULT_AT = "02:30"
"""When the nightly regress runs unless told otherwise (local time)."""
DEFAULT_NAME = "fmtune-regress"
"""The systemd unit name and the crontab entry's marker unless told otherwise."""
CRON_MARKER = "# fmtune-schedule:"
"""Ends fmtune's crontab lines (a shell comment, which cron passes to /bin/sh with the
command), followed by the schedule's name: `--install` replaces the line bearing its name."""
CRON_LOG = "cron.log"
"""The file in --out the cron job appends the command's output to."""

_TIME = re.compile(r"^(?P<hour>[01]?\d|2[0-3]):(?P<minute>[0-5]\d)$")
_UNIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,200}$")


class Schedule(BaseModel):
    """A nightly `fmtune regress`: what it measures, where it writes, when and from where."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    baseline: str = Field(
        min_length=1,
        description="The regress BASELINE: an export folder or a study name, as regress reads "
        "it (a relative path is relative to workdir).",
    )
    out: str = Field(
        min_length=1, description="The regress --out folder (relative paths: to workdir)."
    )
    at: str = Field(
        DEFAULT_AT, description="Time of day, HH:MM on a 24-hour clock, the machine's local time."
    )
    extra_args: tuple[str, ...] = Field(
        (), description="Further `fmtune regress` flags, passed through unchanged."
    )
    workdir: Path = Field(description="Absolute folder the command runs in.")
    executable: Path = Field(
        description="Absolute path of the fmtune console script to run (cron's and systemd's "
        "PATH do not hold a virtual environment)."
    )
    name: str = Field(
        DEFAULT_NAME,
        description="systemd unit name (<name>.service, <name>.timer) and crontab marker.",
    )

    @field_validator("at")
    @classmethod
    def _check_at(cls, value: str) -> str:
        """HH:MM on a 24-hour clock."""
        if _TIME.match(value) is None:
            raise ValueError(f"must be HH:MM on a 24-hour clock, got '{value}'")
        return value

    @field_validator("workdir", "executable")
    @classmethod
    def _check_absolute(cls, value: Path) -> Path:
        """cron and systemd start in another folder: only an absolute path means one thing."""
        if not value.is_absolute():
            raise ValueError(f"must be an absolute path, got '{value}'")
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        """Letters, digits and _.@- (a systemd unit name, one word in a crontab comment)."""
        if _UNIT_NAME.match(value) is None:
            raise ValueError(f"must be letters, digits and _.@- only, got '{value}'")
        return value

    def hour_minute(self) -> tuple[int, int]:
        """The time of day as numbers."""
        match = _TIME.match(self.at)
        assert match is not None  # validated
        return int(match["hour"]), int(match["minute"])

    def argv(self) -> list[str]:
        """The nightly command, program name first (``fmtune``): :func:`regress_argv`."""
        return regress_argv(self.baseline, self.out, self.extra_args)


def regress_argv(baseline: str, out: str, extra_args: Sequence[str] = ()) -> list[str]:
    """``fmtune regress BASELINE --out DIR [flags]``: the one command every schedule runs."""
    return ["fmtune", "regress", baseline, "--out", out, *extra_args]


def cron_schedule(schedule: Schedule) -> str:
    """The five time fields of a daily job at the schedule's time: ``MM HH * * *``."""
    hour, minute = schedule.hour_minute()
    return f"{minute} {hour} * * *"


def _cron_escaped(text: str) -> str:
    """cron turns an unescaped % in the command into a newline."""
    return text.replace("%", r"\%")


def cron_line(schedule: Schedule) -> str:
    """The crontab line: the time fields, then, in the work folder, the command with its output
    appended to <out>/cron.log, then fmtune's marker with the schedule's name."""
    program = [str(schedule.executable), *schedule.argv()[1:]]
    log = str(PurePosixPath(schedule.out) / CRON_LOG)
    command = (
        f"cd {shlex.quote(str(schedule.workdir))} && mkdir -p {shlex.quote(schedule.out)} && "
        f"{shlex.join(program)} >> {shlex.quote(log)} 2>&1"
    )
    return f"{cron_schedule(schedule)} {_cron_escaped(command)} {CRON_MARKER}{schedule.name}"


def on_calendar(schedule: Schedule) -> str:
    """systemd's calendar event for every day at the schedule's time."""
    hour, minute = schedule.hour_minute()
    return f"*-*-* {hour:02d}:{minute:02d}:00"


def _systemd_word(word: str) -> str:
    """One ExecStart word: % and $ doubled (systemd's specifier and variable escapes), quoted
    like a shell word when it holds a space or a quote (systemd reads such quotes)."""
    escaped = word.replace("%", "%%").replace("$", "$$")
    return shlex.quote(escaped)


def systemd_units(schedule: Schedule) -> dict[str, str]:
    """``<name>.service`` (a oneshot running the command in the work folder) and
    ``<name>.timer`` (every day at the time; a run missed while the machine was off runs at
    the next boot), by file name."""
    command = " ".join(
        _systemd_word(word) for word in [str(schedule.executable), *schedule.argv()[1:]]
    )
    workdir = str(schedule.workdir).replace("%", "%%")
    shown = shlex.join(schedule.argv()).replace("%", "%%")
    service = f"""[Unit]
Description=fmtune nightly regression: {shown}

[Service]
Type=oneshot
WorkingDirectory={workdir}
ExecStart={command}
"""
    hour, minute = schedule.hour_minute()
    timer = f"""[Unit]
Description=Run {schedule.name}.service every day at {hour:02d}:{minute:02d}

[Timer]
OnCalendar={on_calendar(schedule)}
Persistent=true
Unit={schedule.name}.service

[Install]
WantedBy=timers.target
"""
    return {f"{schedule.name}.service": service, f"{schedule.name}.timer": timer}


def systemd_user_dir(home: Path | None = None) -> Path:
    """Where a user's own systemd units live: ~/.config/systemd/user."""
    return (home or Path.home()) / ".config" / "systemd" / "user"


def enable_commands(schedule: Schedule) -> list[list[str]]:
    """What the user runs after the units are written (fmtune never runs systemctl itself)."""
    return [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", f"{schedule.name}.timer"],
    ]


# --- installing: the only functions that touch the machine ----------------------------------


def install_systemd_units(schedule: Schedule, directory: Path | None = None) -> list[Path]:
    """Write the service and timer into ``directory`` (default ~/.config/systemd/user),
    replacing earlier ones of the same name; returns the files written."""
    folder = directory or systemd_user_dir()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in systemd_units(schedule).items():
        path = folder / file_name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def _crontab(
    args: list[str], runner: Runner, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return runner(["crontab", *args], input=stdin, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise FmtuneError(
            "crontab is not installed here: add the printed line by hand, or use --format systemd"
        ) from None


def merged_crontab(current: str, schedule: Schedule) -> str:
    """The crontab ``current`` with the schedule's line in place of any earlier line of the
    same name (other lines kept as they are)."""
    marker = f"{CRON_MARKER}{schedule.name}"
    kept = [line for line in current.splitlines() if not line.rstrip().endswith(marker)]
    return "\n".join([*kept, cron_line(schedule)]) + "\n"


def install_cron(schedule: Schedule, runner: Runner = subprocess.run) -> str:
    """Add the schedule's line to the user's crontab (``crontab -l``, then ``crontab -``),
    replacing an earlier line of the same name; returns the crontab installed.

    A user without a crontab yet starts from an empty one; any other failure of crontab is a
    FmtuneError with crontab's own message.
    """
    listed = _crontab(["-l"], runner)
    if listed.returncode == 0:
        current = listed.stdout
    elif "no crontab" in (listed.stderr or "").lower():
        current = ""
    else:
        raise FmtuneError(f"crontab -l failed: {(listed.stderr or '').strip()}")
    merged = merged_crontab(current, schedule)
    written = _crontab(["-"], runner, stdin=merged)
    if written.returncode != 0:
        raise FmtuneError(f"crontab - failed: {(written.stderr or '').strip()}")
    logger.info("installed the crontab line of %s", schedule.name)
    return merged
