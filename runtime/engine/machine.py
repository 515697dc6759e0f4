"""The machine's state while something measures on it: load average, cores, vLLM servers.

Step times on a CPU engine are only as good as the machine was quiet when they were taken:
another process computing on the same cores, or another vLLM server decoding beside the
measured one, slows every step. The profiler records a `MachineState` in every profile it
stores (and refuses a busy machine, runtime.profiler.judge_machine); every benchmark's report
header says how many vLLM servers of others were running (benchmarks/lane.py uses
`vllm_server_pids` here, so both count servers the same way).

`is_vllm_server` and `MachineState` are pure; `vllm_server_pids`, `usable_cores`, `load_1m`
and `machine_state` read the machine.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field

#: The module a replica runs (EngineConfig.server_program, launcher "module").
_SERVER_MODULE_PREFIX = "vllm.entrypoints"


def is_vllm_server(argv: Sequence[str]) -> bool:
    """Whether a process with this command line is a vLLM API server: a Python interpreter
    running a ``vllm.entrypoints`` module (``python -m vllm.entrypoints.openai.api_server``,
    what replicas run) or vLLM's console script ``vllm serve``. Wrappers that only name one
    in their arguments (a shell, ``flock LOCK python -m ...``, ``pgrep -f vllm.entrypoints``)
    are not servers, and neither are a server's worker processes (vLLM renames them, e.g.
    ``VLLM::EngineCore``), so each server counts once."""
    if not argv:
        return False
    program = os.path.basename(argv[0])
    if program == "vllm":
        return len(argv) > 1 and argv[1] == "serve"
    if not program.startswith("python"):
        return False
    return any(
        flag == "-m" and module.startswith(_SERVER_MODULE_PREFIX)
        for flag, module in itertools.pairwise(argv[1:])
    )


def vllm_server_pids() -> list[int]:
    """Pids of the vLLM API servers running now on this machine (`is_vllm_server`), sorted."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        argv = process.info.get("cmdline") or []  # None when the process is gone or hidden
        if is_vllm_server(argv):
            found.append(int(process.info["pid"]))
    return sorted(found)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; all the machine's elsewhere)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_1m() -> float:
    """The machine's 1-minute load average: processes running or waiting for a core,
    averaged over about the last minute."""
    return float(os.getloadavg()[0])


class MachineState(BaseModel):
    """What the machine was doing while a measurement ran: recorded in each stored profile so
    a reader can tell a quiet machine's step times from a loaded one's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cores: int = Field(ge=1, description="Cores the measuring process could use (usable_cores).")
    load_1m_start: float = Field(
        ge=0, description="1-minute load average when the measurement started (os.getloadavg)."
    )
    load_1m_end: float | None = Field(
        None,
        ge=0,
        description="1-minute load average when the measurement ended (it includes the "
        "measured replicas' own work); None while the measurement runs.",
    )
    foreign_vllm_servers: int = Field(
        ge=0,
        description="vLLM API servers running at the start that were not the measurement's "
        "own (another engineer's replica, one still stopping, a benchmark's).",
    )
    allowed_busy: bool = Field(
        False,
        description="Whether the measurement ran on a machine judged busy because it was told "
        "to (fmtune profile --allow-busy).",
    )


def machine_state(own_pids: Iterable[int] = ()) -> MachineState:
    """The machine now: cores, 1-minute load, and the vLLM servers running that are not in
    ``own_pids`` (the measurement's own replicas, when it measures ones already up)."""
    own = set(own_pids)
    return MachineState(
        cores=usable_cores(),
        load_1m_start=load_1m(),
        foreign_vllm_servers=sum(1 for pid in vllm_server_pids() if pid not in own),
    )
