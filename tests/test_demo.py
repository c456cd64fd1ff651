"""`make run` runs `crystal-monitor demo`: within two minutes the windows show PG rising."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from monitor.store import Store
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


def _export_frames(state: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "export", "--state-dir", str(state), "--what",
         "frames", "--format", "jsonl"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )  # fmt: skip
    return [json.loads(line) for line in result.stdout.splitlines()]


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


def _frame_names(folder: Path) -> set[str]:
    try:
        return {path.name for path in folder.iterdir() if path.suffix == ".png"}
    except FileNotFoundError:
        return set()


@pytest.mark.slow
def test_demo_deletes_only_recorded_frames_and_keeps_its_folder_bounded(tmp_path: Path) -> None:
    """Before: the demo's probe folder grew by 1.1 GB in 10 minutes and was never pruned.
    With frames kept 4 s once recorded, the folder holds a few seconds of frames, and
    every frame that went was recorded first."""
    state = tmp_path / "state"
    folder = state / "probe-demo"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "monitor",
            "demo",
            "--state-dir",
            str(state),
            "--fps",
            "2",
            "--keep-frames",
            "4s",
            "--mqtt-port",
            str(free_port()),
            "--opcua-port",
            str(free_port()),
            "--http-port",
            str(free_port()),
        ],
        stdout=(tmp_path / "demo.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    seen: set[str] = set()
    counts: list[int] = []
    try:
        started = time.monotonic()
        while time.monotonic() - started < 40:
            names = _frame_names(folder)
            seen |= names
            counts.append(len(names))
            time.sleep(0.25)  # a frame stays at least 4 s: every one is seen
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    output = (tmp_path / "demo.log").read_text()
    assert process.returncode == 0, output[-2000:]
    assert "recorded frames are deleted from there after 4 s" in output
    deleted = seen - _frame_names(folder)
    assert len(deleted) >= 20, (len(seen), len(deleted))  # it did prune
    # Recorded: a frame row, or journaled as skipped (the backlog policy at start-up).
    store = Store(state, readonly=True)
    try:
        journaled = store.journaled("demo", sorted(deleted))
    finally:
        store.close()
    assert deleted == journaled, sorted(deleted - journaled)[:5]
    recorded = {row["key"] for row in _export_frames(state)}
    assert len(deleted & recorded) >= 20
    # 2 frames/s for 4 s of keeping plus a 2 s pass, the daemon's lag and a margin.
    assert max(counts[len(counts) // 2 :]) <= 30, counts
