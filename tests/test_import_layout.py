"""The import contracts in pyproject.toml hold for the code, and they do catch what they
are meant to: an import against the layers, a cycle, a pure module doing I/O, torch.

Each violation is planted in a copy of the package (the shipped model left out), and
`lint-imports` is run on the copy with the project's own contracts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layout")
    shutil.copy(REPO / "pyproject.toml", root)
    shutil.copytree(
        REPO / "monitor",
        root / "monitor",
        ignore=shutil.ignore_patterns("models", "static", "__pycache__"),
    )
    return root


def _planted(root: Path, module: str, line: str) -> Path:
    """`module` of the copy with `line` added after its `from __future__` import."""
    path = root / "monitor" / module
    original = path.read_text()
    planted = original.replace(
        "from __future__ import annotations\n", f"from __future__ import annotations\n{line}\n", 1
    )
    assert planted != original, module
    path.write_text(planted)
    return path


def test_the_code_keeps_every_contract(package_copy: Path) -> None:
    result = _lint(package_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # A stage importing a later one: the recorder reaching for the web server.
        (
            "pipeline/recorder.py",
            "import monitor.web.server",
            "monitor.pipeline is not allowed to import monitor.web",
        ),
        # A cycle inside one package, between two of its modules.
        (
            "pipeline/outcome.py",
            "import monitor.pipeline.workers",
            "No cycles are allowed in monitor.pipeline",
        ),
        # The statistics writing to SQLite.
        (
            "aggregate/statistics.py",
            "import sqlite3",
            "monitor.aggregate is not allowed to import sqlite3",
        ),
        (
            "alarms/engine.py",
            "import monitor.store",
            "monitor.alarms is not allowed to import monitor.store",
        ),
        # torch on a plant box.
        ("imaging/preprocess.py", "import torch", "monitor is not allowed to import torch"),
    ],
)
def test_a_planted_violation_breaks_its_contract(
    package_copy: Path, module: str, line: str, broken: str
) -> None:
    path = package_copy / "monitor" / module
    original = path.read_text()
    try:
        _planted(package_copy, module, line)
        result = _lint(package_copy)
    finally:
        path.write_text(original)
    assert result.returncode == 1, result.stdout
    assert broken in result.stdout, result.stdout
