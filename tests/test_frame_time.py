"""Frame times at the daemon level: archived frames dropped into a live folder.

Before: their names' times (a year ago) made the newest frame a year old, so the probe
showed `probe_stale: no frame from the probe for 28954101 s` and BAD while it
classified every frame.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from monitor.replay.runner import find_recorded_frames
from monitor.simulator import CropSimulator
from monitor.sources.folder import frame_time_from_name
from tests.daemon_process import DaemonProcess, export, wait_for, write_like_probe
from tests.mosquitto import free_port

YEAR_S = 365 * 86400.0


def _old_name(index: int) -> str:
    """A frame name as vendor software writes it, dated a year ago."""
    stamp = datetime.fromtimestamp(time.time() - YEAR_S + index, UTC)
    return f"frame_{stamp.strftime('%Y%m%dT%H%M%S.%f')[:-3]}Z_{index:05d}.png"


def _write_config(tmp_path: Path, folder: Path, http_port: int) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
log_format = "json"
shutdown_grace = "5s"

[aggregation]
publish_interval = "1s"

[http]
enabled = true
port = {http_port}

[[alarms.definitions]]
id = "probe_stale"
kind = "probe_stale"
priority = "high"
message = "no frame from the probe for {{value:.0f}} s"
max_age = "5s"

[[probes]]
id = "R1"
sampling = "whole"
[probes.source]
type = "folder"
path = "{folder}"
settle_time = "300ms"
rescan_interval = "2s"
"""
    )
    return path


def _probe_state(http_port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/state", timeout=5) as r:
            state: dict[str, Any] = json.load(r)["probes"][0]
            return state
    except OSError:
        return None


def _frames_ok(http_port: int) -> int:
    state = _probe_state(http_port)
    return 0 if state is None else int(state["counts"]["frames"]["ok"])


def test_archived_frames_in_a_live_folder_leave_the_probe_fresh_not_stale(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "probe"
    folder.mkdir()
    http_port = free_port()
    config = _write_config(tmp_path, folder, http_port)
    crops = [CropSimulator(seed=4).render("CEX") for _ in range(5)]
    stop = threading.Event()
    written: list[str] = []

    def write_archive() -> None:
        """Old-named frames, 5 a second, for as long as the daemon is watched."""
        while not stop.is_set():
            name = _old_name(len(written))
            write_like_probe(folder, name, crops[len(written) % len(crops)])
            written.append(name)
            stop.wait(0.2)

    states: list[dict[str, Any]] = []
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        assert wait_for(lambda: _probe_state(http_port) is not None, timeout=90)
        started = time.time()
        writer = threading.Thread(target=write_archive)
        writer.start()
        try:
            assert wait_for(lambda: _frames_ok(http_port) >= 10, timeout=60)
            # Longer than the alarm's max_age: a year-old newest frame would trip it.
            for _ in range(8):
                time.sleep(1)
                state = _probe_state(http_port)
                assert state is not None
                states.append(state)
        finally:
            stop.set()
            writer.join()
        assert daemon.terminate() == 0
        log_lines = daemon.log_text().splitlines()
    for state in states:
        active = [alarm["alarm_id"] for alarm in state["active_alarms"]]
        assert "probe_stale" not in active, state["active_alarms"]
        assert state["quality"] != "BAD", state
        assert state["last_frame_age_s"] is not None and state["last_frame_age_s"] < 5, state
    rows = export(config)
    assert len(rows) >= 10
    for row in rows:  # stored with the time they arrived, not a year ago
        ts = datetime.fromisoformat(row["ts"].replace("Z", "+00:00")).timestamp()
        assert started - 5 <= ts <= time.time(), row
    events = [json.loads(line) for line in log_lines if line.startswith("{")]
    retimed = [e for e in events if e.get("event") == "probe_file_time_too_old"]
    assert len(retimed) == 1, retimed  # once per run, with the reason
    assert retimed[0]["example"] in written and "before the file arrived" in retimed[0]["reason"]


def test_replay_keeps_the_names_times_of_an_archive(tmp_path: Path) -> None:
    """The live folder's policy is no concern of a replay: a recorded batch is replayed
    on its own clock, the times in its names."""
    crop = CropSimulator(seed=5).render("PG")
    names = [_old_name(index) for index in range(3)]
    for name in names:
        write_like_probe(tmp_path, name, crop)
    frames = find_recorded_frames(tmp_path, ("*.png",), recursive=False)
    assert [frame.key for frame in frames] == names
    for frame, name in zip(frames, names, strict=True):
        assert frame.ts == frame_time_from_name(name)
        assert frame.ts < time.time() - YEAR_S + 60
