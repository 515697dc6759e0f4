"""The layering is enforced, not drawn: import-linter's contracts hold on the tree, a
deliberate violation breaks them, and importing the tuner loads no engine."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the packages under `root`, with root first on the import path."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        capture_output=True, text=True, cwd=root, env={"PYTHONPATH": str(root), "PATH": ""},
        timeout=300, check=False,
    )  # fmt: skip


def test_contracts_hold_on_the_tree() -> None:
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout


@pytest.mark.parametrize(
    ("module", "violation", "contract"),
    [
        ("runtime/engine/config.py", "import runtime.serving.server", "runtime layers"),
        ("runtime/run.py", "import apps.extraction", "shipped application"),
        ("tuner/report.py", "import runtime.routing.router", "public entry points"),
        ("runtime/routing/policies.py", "import runtime.sim.cluster", "runtime layers"),
        ("runtime/sim/cluster.py", "import runtime.routing.router", "no live part"),
        ("runtime/sim/steptime.py", "import runtime.profiler", "above the simulator"),
        ("runtime/engine/pool.py", "import runtime.simrun", "above the simulator"),
    ],
)
def test_a_deliberate_violation_breaks_its_contract(
    tmp_path: Path, module: str, violation: str, contract: str
) -> None:
    for package in ("runtime", "tuner", "apps"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{violation}  # noqa\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    broken = [line for line in done.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken), done.stdout[-3000:]


def test_importing_the_tuner_loads_no_engine() -> None:
    code = (
        "import sys, pkgutil, importlib, tuner\n"
        "for m in pkgutil.walk_packages(tuner.__path__, 'tuner.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in ('vllm', 'torch', 'apps') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
