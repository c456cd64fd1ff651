"""deploy/install.sh end to end, staged under a temporary root: a fresh venv with the
core package only (no torch, as on a plant box), the units, the configuration folder,
and a second run that keeps what the plant has edited."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _install(root: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CRYSTAL_MONITOR_PREFIX": str(root / "opt"),
        "CRYSTAL_MONITOR_CONF_DIR": str(root / "etc"),
        "CRYSTAL_MONITOR_UNIT_DIR": str(root / "units"),
        "PYTHON": sys.executable,
    }
    return subprocess.run(
        ["bash", str(REPO / "deploy" / "install.sh"), str(REPO)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="install.sh installs as root")
def test_install_script_builds_a_torch_free_venv_that_classifies(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = _install(root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "wrote the example config" in first.stdout

    for unit in ("crystal-monitor.service", "crystal-monitor@.service"):
        assert (root / "units" / unit).read_text() == (REPO / "systemd" / unit).read_text()
    config = root / "etc" / "crystal-monitor.toml"
    assert f"{config}: valid (1 probe(s))" in first.stdout
    credentials = root / "etc" / "credentials"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o700

    venv = root / "opt" / "venv" / "bin"
    no_torch = subprocess.run(
        [str(venv / "python"), "-c", "import torch"], capture_output=True, check=False
    )
    assert no_torch.returncode != 0  # the plant box runs without torch

    crops = tmp_path / "crops"
    subprocess.run(
        [str(venv / "crystal-monitor"), "simulate", "--mode", "crop", "--count", "20", str(crops)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    classified = subprocess.run(
        [str(venv / "crystal-monitor"), "classify", "--json", str(crops)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = [json.loads(line) for line in classified.stdout.splitlines()]
    assert len(rows) == 20
    truth = {row["path"]: Path(row["path"]).parent.name for row in rows}
    correct = sum(row["label"] == truth[row["path"]] for row in rows)
    assert correct >= 18, rows

    config.write_text(config.read_text() + "\n# edited by the plant\n")
    second = _install(root)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"keeping the existing {config}" in second.stdout
    assert config.read_text().endswith("# edited by the plant\n")
