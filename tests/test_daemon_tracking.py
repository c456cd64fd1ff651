"""The daemon follows a PG ramp: the 5-minute window against the simulator's ground truth.

The daemon runs in-process on a fast clock (40 simulated seconds per real second), so
a 30-minute batch takes 45 s. The truth for a window is the share of PG among the
particles the simulator drew in that same window, so the comparison measures the
pipeline (segmentation, classification, windowing), not sampling noise.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from monitor.config.settings import load_settings
from monitor.daemon import Daemon
from monitor.sources.simulated import SimulatedSource
from monitor.store import Store

TIME_SCALE = 40.0
BATCH_S = 1800.0
WINDOW_S = 300


class FastClock:
    def __init__(self, scale: float) -> None:
        self.origin = 1_800_000_000.0
        self.started = time.monotonic()
        self.scale = scale

    def __call__(self) -> float:
        return self.origin + (time.monotonic() - self.started) * self.scale


def _run_ramp(tmp_path: Path, mode: str, fps: float) -> tuple[list[float], list[float]]:
    settings = load_settings(
        data={
            "daemon": {"state_dir": str(tmp_path / "state")},
            "aggregation": {"publish_interval": "0.25s"},
            "probes": [
                {
                    "id": "sim",
                    "sampling": "whole" if mode == "crop" else "particles",
                    "source": {
                        "type": "simulated",
                        "mode": mode,
                        "fps": fps,
                        "profile": f"ramp:0:0.3@0-{BATCH_S:.0f}",
                        "seed": 11,
                    },
                }
            ],
        }
    )
    clock = FastClock(TIME_SCALE)
    daemon = Daemon(settings, clock=clock)
    daemon.start()
    try:
        source = daemon.sources[0]
        assert isinstance(source, SimulatedSource)
        while clock() < clock.origin + BATCH_S:
            time.sleep(0.2)
    finally:
        daemon.stop()
    truth = list(source.truth)
    truth_ts = np.array([t.ts for t in truth])
    truth_pg = np.cumsum([0] + [t.n_pg for t in truth])
    truth_all = np.cumsum([0] + [t.n_total for t in truth])
    measured, expected = [], []
    store = Store(settings.daemon.state_dir, readonly=True)
    for _, ts, _, snapshot in store.iter_snapshots():
        if ts < clock.origin + WINDOW_S or ts > truth_ts[-1]:
            continue
        window = snapshot["windows"][str(WINDOW_S)]
        if window["n"] < 50:
            continue
        lo = np.searchsorted(truth_ts, ts - WINDOW_S, side="right")
        hi = np.searchsorted(truth_ts, ts, side="right")
        if truth_all[hi] - truth_all[lo] == 0:
            continue
        expected.append((truth_pg[hi] - truth_pg[lo]) / (truth_all[hi] - truth_all[lo]))
        measured.append(window["classes"]["PG"]["fraction"])
    store.close()
    return measured, expected


@pytest.mark.slow
def test_crop_mode_tracks_the_ramp_within_2_points(tmp_path: Path) -> None:
    measured, expected = _run_ramp(tmp_path, "crop", fps=40.0)
    assert len(measured) > 50
    error = np.abs(np.array(measured) - np.array(expected))
    print(f"mean absolute error {np.mean(error):.4f} over {len(error)} snapshots")
    assert float(np.mean(error)) <= 0.02, (np.mean(error), measured[-5:], expected[-5:])
    assert expected[-1] > 0.2 and measured[-1] > 0.2  # the ramp really was followed up


@pytest.mark.slow
def test_frame_mode_tracks_the_ramp_within_5_points(tmp_path: Path) -> None:
    measured, expected = _run_ramp(tmp_path, "frame", fps=4.0)
    assert len(measured) > 50
    error = np.abs(np.array(measured) - np.array(expected))
    print(f"mean absolute error {np.mean(error):.4f} over {len(error)} snapshots")
    assert float(np.mean(error)) <= 0.05, (np.mean(error), measured[-5:], expected[-5:])
    assert expected[-1] > 0.2 and measured[-1] > 0.15
