"""`make run` runs `crystal-monitor demo`: within two minutes the windows show PG rising."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.daemon_process import wait_for
from tests.mosquitto import free_port


def _pg_fractions(state: Path) -> list[float]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monitor",
            "export",
            "--state-dir",
            str(state),
            "--what",
            "windows",
            "--format",
            "jsonl",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        return []
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return [
        r["fraction"]
        for r in rows
        if r["window_s"] == 60
        and r["class"] == "PG"
        and r["fraction"] is not None
        and r["n_total"] >= 30
    ]


@pytest.mark.slow
def test_demo_shows_a_rising_pg_fraction(tmp_path: Path) -> None:
    state = tmp_path / "state"
    http_port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "monitor",
            "demo",
            "--state-dir",
            str(state),
            "--profile",
            "ramp:0:0.3@0-45",
            "--mqtt-port",
            str(free_port()),  # no broker there: the daemon must run on regardless
            "--opcua-port",
            str(free_port()),
            "--http-port",
            str(http_port),
        ],
        # A file, not a pipe: nobody reads a pipe while the demo runs, and a full pipe
        # would block the daemon's logging.
        stdout=(tmp_path / "demo.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        started = time.monotonic()
        assert wait_for(
            lambda: (f := _pg_fractions(state)) != [] and f[-1] - f[0] >= 0.1,
            timeout=110,
            interval=5,
        ), _pg_fractions(state)
        assert time.monotonic() - started < 120
        assert process.poll() is None
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/state", timeout=10) as r:
            assert json.load(r)["probes"][0]["id"] == "demo"
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    output = (tmp_path / "demo.log").read_text()
    assert process.returncode == 0, output[-2000:]
    assert "crystal-monitor export --state-dir" in output
    assert f"dashboard: http://127.0.0.1:{http_port}/" in output
    assert (state / "probe-demo").is_dir()
