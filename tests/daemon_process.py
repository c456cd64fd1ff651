"""Helpers to run the real daemon as a subprocess, the way systemd runs it."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np


def write_config(path: Path, state_dir: Path, folder: Path, *, sampling: str = "whole") -> Path:
    path.write_text(
        f"""
[daemon]
state_dir = "{state_dir}"
log_format = "json"
shutdown_grace = "5s"

[aggregation]
publish_interval = "1s"

[[probes]]
id = "R1"
sampling = "{sampling}"
[probes.source]
type = "folder"
path = "{folder}"
settle_time = "300ms"
rescan_interval = "2s"
"""
    )
    return path


class DaemonProcess:
    """`crystal-monitor run --config FILE` in a subprocess, with its log lines kept."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "--config", str(self.config)],
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        """Never leave a daemon running after a test, passed or failed."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=30)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def export(config: Path, what: str = "frames") -> list[dict[str, str]]:
    """Rows from `crystal-monitor export`; none while the daemon has not made its store yet."""
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "export", "--config", str(config), "--what", what],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode == 66:  # EX_NOINPUT: no store yet
        return []
    assert result.returncode == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def write_like_probe(folder: Path, name: str, image: np.ndarray) -> None:
    """Vendor software writes under a temporary name, then renames."""
    ok, data = cv2.imencode(Path(name).suffix, image)
    assert ok
    temporary = folder / f".{name}.part"
    temporary.write_bytes(data.tobytes())
    os.replace(temporary, folder / name)
