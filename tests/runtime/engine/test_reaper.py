"""The watchdog stops a process group once its owner dies, and only then."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from runtime.engine.reaper import group_alive, pid_alive

OWNER = """
import subprocess, sys, time
group = subprocess.Popen(["sleep", "600"], start_new_session=True)
subprocess.Popen([sys.executable, "-m", "runtime.engine.reaper", "{owner}", str(group.pid), "2"],
                 start_new_session=True)
print(group.pid, flush=True)
time.sleep(600)
"""


def wait_until(predicate: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_group_outlives_nothing_when_owner_is_sigkilled() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER.replace('"{owner}"', "str(__import__('os').getpid())")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    pgid = int(owner.stdout.readline())
    try:
        time.sleep(1.0)
        assert group_alive(pgid), "the watchdog must leave the group alone while the owner lives"
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert wait_until(lambda: not group_alive(pgid), 10), "group survived its owner"
    finally:
        if group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)


def test_pid_alive_tells_live_from_gone() -> None:
    assert pid_alive(os.getpid())
    child = subprocess.Popen(["true"])
    child.wait()
    assert not pid_alive(child.pid)
