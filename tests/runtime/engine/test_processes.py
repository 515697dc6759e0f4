"""stop_process: polite first, forceful after the grace period, the whole group when asked."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from runtime.engine.processes import stop_process
from runtime.engine.reaper import group_alive, pid_alive

IGNORES_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)
PARENT_OF_A_SLEEPER = (
    "import subprocess, sys\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(child.pid, flush=True)\n"
    "child.wait()\n"
)


def started(code: str, **kwargs: object) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, **kwargs
    )  # type: ignore[call-overload]
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def test_a_process_that_obeys_sigterm_stops_within_the_grace_period() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    took = stop_process(process, grace_s=30.0)
    assert process.returncode == -15
    assert took < 30.0


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period() -> None:
    process, line = started(IGNORES_SIGTERM)
    assert line == "ready"
    took = stop_process(process, grace_s=0.5)
    assert process.returncode == -9
    assert took >= 0.5


def test_group_stops_the_children_too_and_plain_stop_does_not() -> None:
    grouped, child = started(PARENT_OF_A_SLEEPER, start_new_session=True)
    stop_process(grouped, grace_s=10.0, group=True)
    deadline = time.monotonic() + 10
    while group_alive(grouped.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_alive(grouped.pid)
    assert not pid_alive(int(child))

    alone, orphan = started(PARENT_OF_A_SLEEPER, start_new_session=True)
    try:
        stop_process(alone, grace_s=10.0)
        assert alone.returncode == -15
        assert pid_alive(int(orphan))  # only the parent was signalled
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(alone.pid, signal.SIGKILL)  # the orphan still has the group's id


def test_an_exited_process_is_only_reaped() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert stop_process(process, grace_s=5.0) < 5.0
    assert process.returncode == 0
