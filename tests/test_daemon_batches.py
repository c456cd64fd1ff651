"""Batches and restarts: windows reset on a batch start, data is tagged, state survives."""

from __future__ import annotations

import time
from pathlib import Path

from monitor.config.settings import load_settings
from monitor.daemon import Daemon
from monitor.store import Store


def _settings(state: Path):  # type: ignore[no-untyped-def]
    return load_settings(
        data={
            "daemon": {"state_dir": str(state)},
            "aggregation": {"publish_interval": "0.2s"},
            "probes": [
                {
                    "id": "sim",
                    "sampling": "whole",
                    "source": {
                        "type": "simulated",
                        "mode": "crop",
                        "fps": 30,
                        "profile": "constant:0.5",
                    },
                }
            ],
        }
    )


def _wait_for_particles(daemon: Daemon, minimum: int, timeout: float = 20) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = daemon.view.probe("sim").snapshot
        if snapshot["windows"]["60"]["n"] >= minimum:
            return snapshot
        time.sleep(0.1)
    raise AssertionError(f"fewer than {minimum} particles in 60 s window")


def test_batch_start_resets_windows_tags_frames_and_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    daemon = Daemon(_settings(state))
    daemon.start()
    try:
        before = _wait_for_particles(daemon, 20)
        assert before["batch"] is None
        daemon.commands.start_batch("sim", "B-042")
        fresh = daemon.view.probe("sim").snapshot
        assert (
            fresh["batch"] == "B-042" and fresh["windows"]["60"]["n"] < before["windows"]["60"]["n"]
        )
        _wait_for_particles(daemon, 30)
    finally:
        daemon.stop()
    store = Store(state, readonly=True)
    batches = {row.batch for row in store.iter_frames()}
    store.close()
    assert batches == {None, "B-042"}

    restarted = Daemon(_settings(state))
    restarted.start()
    try:
        restored = restarted.view.probe("sim").snapshot
        assert restored["batch"] == "B-042"
        assert restored["windows"]["60"]["n"] >= 30  # refilled from the store, not blank
        restarted.commands.stop_batch("sim")
        assert restarted.view.probe("sim").snapshot["batch"] is None
    finally:
        restarted.stop()
