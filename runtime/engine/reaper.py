"""A watchdog that stops a replica's process group when the fmtune process that owns it dies.

`python -m runtime.engine.reaper OWNER_PID PGID GRACE_S` runs in its own session, so neither
Ctrl-C in the terminal nor a SIGKILL of the owner reaches it. It polls; once the owner is gone
(its parent changes or the pid disappears) it sends SIGTERM to the replica's whole process
group, then SIGKILL after the grace period, and exits. It also exits as soon as the group is
gone, so a replica stopped normally leaves no watchdog behind. This covers the one exit path
that no handler inside the owner can: being killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

POLL_S = 0.25


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM the group, wait up to grace_s, then SIGKILL what is left."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return
        time.sleep(POLL_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def watch(owner_pid: int, pgid: int, grace_s: float) -> None:
    """Block until the group ends by itself, or stop it once the owner is gone."""
    while group_alive(pgid):
        if not pid_alive(owner_pid):
            stop_group(pgid, grace_s)
            return
        time.sleep(POLL_S)


def main(argv: list[str]) -> int:
    """Entry point: OWNER_PID PGID GRACE_S."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    owner_pid, pgid, grace_s = int(argv[0]), int(argv[1]), float(argv[2])
    watch(owner_pid, pgid, grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
