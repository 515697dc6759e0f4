"""Stopping a child process the polite way first: one helper for every place that starts one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import Any

KILL_WAIT_S = 10.0


def stop_process(process: subprocess.Popen[Any], grace_s: float, *, group: bool = False) -> float:
    """SIGTERM the process (its whole process group when `group`), SIGKILL it if it is still
    running after `grace_s`, and reap it. Returns the seconds it took; a process that already
    exited is only reaped."""
    started = time.monotonic()
    if process.poll() is None:
        _signal(process, signal.SIGTERM, group)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal(process, signal.SIGKILL, group)
            process.wait(timeout=KILL_WAIT_S)
    return time.monotonic() - started


def _signal(process: subprocess.Popen[Any], signum: signal.Signals, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
