"""`fmtune schedule`: a nightly `fmtune regress` as a cron line or a systemd service and timer,
installed for the user, and the shipped GitHub Actions and Kubernetes examples, all running
the same command at the same time of day."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import stat
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from tests.runtime.render.samples import validate_k8s
from tuner.cli import app
from tuner.schedule import (
    CRON_MARKER,
    Schedule,
    cron_line,
    cron_schedule,
    merged_crontab,
    regress_argv,
    systemd_units,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "schedule"
BASELINE, OUT = "deploy/baseline", "reports/regress"
"""What the shipped examples measure and where they write."""
EXECUTABLE = Path("/opt/fmtune/.venv/bin/fmtune")

_CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?(,\d+(-\d+)?)*)(/\d+)?$")
_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def plan(**changes: Any) -> Schedule:
    data: dict[str, Any] = {
        "baseline": BASELINE, "out": OUT, "workdir": Path("/srv/my app"),
        "executable": EXECUTABLE,
    }  # fmt: skip
    return Schedule(**(data | changes))


def parse_cron(line: str) -> tuple[list[str], list[str]]:
    """(the five time fields, the program's argv) of one of fmtune's crontab lines; fails
    unless every field is a valid cron field within its range."""
    fields, command = line.split()[:5], line.split(maxsplit=5)[5]
    for field, (low, high) in zip(fields, _CRON_RANGES, strict=True):
        assert _CRON_FIELD.match(field), field
        for number in map(int, re.findall(r"\d+", field.split("/")[0])):
            assert low <= number <= high, (field, low, high)
    words = shlex.split(command.replace(r"\%", "%"), comments=True)
    program = words[words.index("&&", words.index("&&") + 1) + 1 : words.index(">>")]
    return fields, program


def as_fmtune(argv: list[str]) -> list[str]:
    """A command line with its program named by file name (an absolute path in cron and
    systemd, .venv/bin/fmtune in the workflow)."""
    assert Path(argv[0]).name == "fmtune", argv
    return ["fmtune", *argv[1:]]


def unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    return parser


# --- the renderers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "minute", "hour"),
    [("02:30", "30", "2"), ("7:05", "5", "7"), ("23:59", "59", "23"), ("00:00", "0", "0")],
)
def test_the_cron_line_runs_the_command_daily_at_the_time(at: str, minute: str, hour: str) -> None:
    schedule = plan(at=at, extra_args=("--repeats", "5"))

    line = cron_line(schedule)

    fields, program = parse_cron(line)
    assert fields == [minute, hour, "*", "*", "*"]
    assert " ".join(fields) == cron_schedule(schedule)
    assert program == [str(EXECUTABLE), "regress", BASELINE, "--out", OUT, "--repeats", "5"]
    assert line.startswith(f"{minute} {hour} * * * cd '/srv/my app' && mkdir -p {OUT} && ")
    assert line.endswith(f">> {OUT}/cron.log 2>&1 {CRON_MARKER}fmtune-regress")
    assert "\n" not in line


def test_cron_escapes_percent_signs() -> None:
    line = cron_line(plan(out="reports/100%", extra_args=("--tag", "a%b")))
    assert "%" not in line.replace(r"\%", "")
    assert parse_cron(line)[1][-2:] == ["--tag", "a%b"]


def test_the_systemd_timer_fires_daily_and_the_service_runs_the_command() -> None:
    schedule = plan(at="7:05", extra_args=("--repeats", "5"))

    units = systemd_units(schedule)

    assert set(units) == {"fmtune-regress.service", "fmtune-regress.timer"}
    timer = unit(units["fmtune-regress.timer"])
    assert timer["Timer"]["OnCalendar"] == "*-*-* 07:05:00"
    assert timer["Timer"]["Unit"] == "fmtune-regress.service"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"
    service = unit(units["fmtune-regress.service"])
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["WorkingDirectory"] == "/srv/my app"
    exec_start = shlex.split(service["Service"]["ExecStart"])
    assert exec_start == [str(EXECUTABLE), *schedule.argv()[1:]]


def test_systemd_escapes_specifiers_and_variables() -> None:
    units = systemd_units(plan(workdir=Path("/srv/100%"), extra_args=("--tag", "$HOME%h")))
    service = unit(units["fmtune-regress.service"])
    assert service["Service"]["WorkingDirectory"] == "/srv/100%%"
    assert shlex.split(service["Service"]["ExecStart"])[-1] == "$$HOME%%h"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("at", "24:00", "at: must be HH:MM on a 24-hour clock, got '24:00'"),
        ("at", "2:5", "got '2:5'"),
        ("workdir", Path("relative"), "workdir: must be an absolute path, got 'relative'"),
        ("name", "two words", "name: must be letters, digits and _.@- only, got 'two words'"),
    ],
)
def test_bad_schedules_are_refused_naming_the_field_and_value(
    field: str, value: Any, message: str
) -> None:
    from runtime.errors import describe_validation_error

    with pytest.raises(ValidationError) as refused:
        plan(**{field: value})
    assert message in describe_validation_error(refused.value)


def test_merged_crontab_replaces_its_own_line_and_keeps_the_others() -> None:
    schedule = plan()
    mine = cron_line(schedule)
    other = "0 * * * * backup.sh"
    old = cron_line(plan(at="04:00"))
    someone_elses = cron_line(plan(name="other-regress"))

    merged = merged_crontab(f"MAILTO=me\n{other}\n{old}\n{someone_elses}\n", schedule)

    assert merged.splitlines() == ["MAILTO=me", other, someone_elses, mine]
    assert merged_crontab("", schedule) == mine + "\n"


# --- the command ------------------------------------------------------------------------


def fmtune(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_schedule_prints_the_cron_line_with_the_flags_after_double_dash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    result = fmtune("schedule", BASELINE, "--out", OUT, "--at", "03:15", "--", "--repeats", "5")

    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    fields, program = parse_cron(line)
    assert fields[:2] == ["15", "3"]
    assert as_fmtune(program) == regress_argv(BASELINE, OUT, ["--repeats", "5"])
    assert Path(program[0]).is_absolute() and Path(program[0]).is_file()
    assert f"cd {tmp_path} && " in line


def test_schedule_refuses_a_bad_time_in_one_line_with_exit_2() -> None:
    result = fmtune("schedule", BASELINE, "--out", OUT, "--at", "25:00")
    assert result.exit_code == 2
    assert "--at: must be HH:MM on a 24-hour clock, got '25:00'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_install_writes_the_systemd_units_for_the_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    work = tmp_path / "work"
    work.mkdir()

    result = fmtune(
        "schedule", BASELINE, "--out", OUT, "--format", "systemd", "--install",
        "--workdir", str(work), "--at", "01:45",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    folder = tmp_path / ".config" / "systemd" / "user"
    assert sorted(p.name for p in folder.iterdir()) == [
        "fmtune-regress.service", "fmtune-regress.timer",
    ]  # fmt: skip
    timer = unit((folder / "fmtune-regress.timer").read_text())
    assert timer["Timer"]["OnCalendar"] == "*-*-* 01:45:00"
    service = unit((folder / "fmtune-regress.service").read_text())
    assert service["Service"]["WorkingDirectory"] == str(work)
    assert as_fmtune(shlex.split(service["Service"]["ExecStart"])) == regress_argv(BASELINE, OUT)
    # What was printed is what was written; enabling is left to the user.
    for path in folder.iterdir():
        assert path.read_text() in result.stdout
    assert "systemctl --user enable --now fmtune-regress.timer" in result.stderr


FAKE_CRONTAB = """#!/bin/sh
# crontab -l prints the user's table (or fails like cron's when there is none); crontab -
# replaces it with standard input.
if [ "$1" = "-l" ]; then
  [ -f "$CRONTAB_FILE" ] || { echo "no crontab for $(id -un)" >&2; exit 1; }
  cat "$CRONTAB_FILE"
elif [ "$1" = "-" ]; then
  cat > "$CRONTAB_FILE"
else
  exit 2
fi
"""


def test_install_adds_the_line_to_the_users_crontab_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "crontab"
    script.write_text(FAKE_CRONTAB)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    table = tmp_path / "crontab.txt"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("CRONTAB_FILE", str(table))
    monkeypatch.chdir(tmp_path)

    first = fmtune("schedule", BASELINE, "--out", OUT, "--install")
    assert first.exit_code == 0, first.output
    assert table.read_text() == first.stdout  # the line, and only it: there was no crontab
    table.write_text("MAILTO=me\n" + table.read_text())
    again = fmtune("schedule", BASELINE, "--out", OUT, "--install", "--at", "04:10")

    assert again.exit_code == 0, again.output
    lines = table.read_text().splitlines()
    assert lines[0] == "MAILTO=me" and len(lines) == 2  # replaced, not added twice
    assert parse_cron(lines[1])[0][:2] == ["10", "4"]


def test_install_without_crontab_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no crontab here

    result = fmtune("schedule", BASELINE, "--out", OUT, "--install")

    assert result.exit_code == 2
    assert "crontab is not installed here" in result.output
    assert "--format systemd" in result.output


# --- the shipped examples ---------------------------------------------------------------


def workflow() -> dict[str, Any]:
    data = yaml.safe_load((EXAMPLES / "github-actions-nightly.yml").read_text())
    assert isinstance(data, dict)
    return data


def cronjob() -> dict[str, Any]:
    data = yaml.safe_load((EXAMPLES / "kubernetes-cronjob.yaml").read_text())
    assert isinstance(data, dict)
    return data


def workflow_command(data: dict[str, Any]) -> list[str]:
    """The workflow's regress step, as argv."""
    steps = data["jobs"]["regress"]["steps"]
    (run,) = [s["run"] for s in steps if "regress" in s.get("run", "")]
    return shlex.split(run)


def cronjob_command(data: dict[str, Any]) -> list[str]:
    (container,) = data["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return [*container["command"], *container["args"]]


def test_the_github_workflow_installs_then_regresses_nightly_and_uploads_the_report() -> None:
    data = workflow()
    assert data["on"]["schedule"][0]["cron"] == cron_schedule(plan())
    steps = data["jobs"]["regress"]["steps"]
    runs = [s.get("run", "") for s in steps]
    assert runs.index("make install") < runs.index(shlex.join(workflow_command(data)))
    (upload,) = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload["with"]["path"] == OUT
    assert upload["if"] == "always()"  # a regression (exit 1) still uploads its report


def test_the_kubernetes_cronjob_validates_and_runs_nightly() -> None:
    data = cronjob()
    validate_k8s(data)
    assert (data["apiVersion"], data["kind"]) == ("batch/v1", "CronJob")
    assert data["spec"]["schedule"] == cron_schedule(plan())
    assert data["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0  # exit 1 is a finding
    misspelt = {**data, "spec": {**data["spec"], "schedul": "30 2 * * *"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(misspelt)


def test_all_four_run_the_same_command_at_the_same_time() -> None:
    schedule = plan()
    expected = regress_argv(BASELINE, OUT)
    service = unit(systemd_units(schedule)["fmtune-regress.service"])
    commands = {
        "cron": as_fmtune(parse_cron(cron_line(schedule))[1]),
        "systemd": as_fmtune(shlex.split(service["Service"]["ExecStart"])),
        "github": as_fmtune(workflow_command(workflow())),
        "kubernetes": as_fmtune(cronjob_command(cronjob())),
    }
    assert commands == dict.fromkeys(commands, expected)
    timer = unit(systemd_units(schedule)["fmtune-regress.timer"])
    assert timer["Timer"]["OnCalendar"] == "*-*-* 02:30:00"
    times = {cron_schedule(schedule), workflow()["on"]["schedule"][0]["cron"],
             cronjob()["spec"]["schedule"]}  # fmt: skip
    assert times == {"30 2 * * *"}
