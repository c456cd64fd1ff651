"""Through the real daemon: images that are not crystals never count in a fraction, are
stored and published as out of distribution, and once they dominate, the
`out_of_distribution` alarm stands while the process alarms are suppressed."""

from __future__ import annotations

from pathlib import Path

from monitor.config.settings import load_settings
from monitor.daemon import Daemon
from monitor.imaging.decode import to_grey_uint8
from monitor.simulator import CropSimulator
from tests.daemon_process import write_like_probe
from tests.ood_images import build_ood_set
from tests.test_daemon_alarms import RecordingPublisher, _state_of, _wait

NOT_CRYSTAL_KINDS = {"text", "noise", "checkerboard", "screenshot", "photo crop"}


def _settings(state: Path, folder: Path):  # type: ignore[no-untyped-def]
    return load_settings(
        data={
            "daemon": {"state_dir": str(state)},
            "aggregation": {"windows": ["30s", "60s"], "publish_interval": "0.2s"},
            "alarms": {
                "definitions": [
                    {
                        "id": "pg_high",
                        "kind": "fraction_high",
                        "priority": "high",
                        "message": "PG {value:.0%}",
                        "class_name": "PG",
                        "window": "60s",
                        "limit": 0.3,
                        "min_count": 20,
                    },
                    {
                        "id": "not_crystals",
                        "kind": "out_of_distribution",
                        "priority": "medium",
                        "message": "{value:.0%} not crystals",
                        "window": "60s",
                        "limit": 0.2,
                        "min_count": 50,
                    },
                ]
            },
            "probes": [
                {
                    "id": "R1",
                    "sampling": "whole",
                    "source": {
                        "type": "folder",
                        "path": str(folder),
                        "settle_time": "200ms",
                        "rescan_interval": "1s",
                    },
                }
            ],
        }
    )


def test_non_crystals_are_counted_apart_and_raise_the_one_diagnostic_alarm(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "probe"
    folder.mkdir()
    publisher = RecordingPublisher()
    daemon = Daemon(_settings(tmp_path / "state", folder), publishers=[publisher])
    daemon.start()
    try:
        simulator = CropSimulator(99, look_mix="slurry")
        for index in range(40):
            label = "PG" if index % 2 else "CEX"
            crop = to_grey_uint8(simulator.render(label))
            write_like_probe(folder, f"crystal_{index:03d}.png", crop)
        assert _wait(lambda: _state_of(publisher, "pg_high") == "active_unacknowledged", 60)

        others = [item for item in build_ood_set() if item.kind in NOT_CRYSTAL_KINDS][:160]
        for index, item in enumerate(others):
            write_like_probe(folder, f"other_{index:03d}.png", item.image)
        assert _wait(lambda: daemon.recorder.recorded >= 200, 120)
        assert _wait(lambda: _state_of(publisher, "not_crystals") == "active_unacknowledged", 30)
        snapshot = daemon.view.probe("R1").snapshot
        stored = daemon.store.frames_since("R1", 0.0)
        counted = daemon.recorder.counts()
    finally:
        daemon.stop()

    window = snapshot["windows"]["60"]
    stored_ood = sum(row.n_ood for row in stored)
    # At least 95 % of the others are out of distribution, stored and counted as such.
    assert stored_ood >= 0.95 * len(others)
    assert counted.out_of_distribution["R1"] == stored_ood
    assert all(row.n_ood == 0 for row in stored if row.key.startswith("crystal_"))
    # They are in no class count: the crystals' fraction is what the crystals say.
    classified = sum(sum(row.counts.values()) for row in stored)
    assert classified <= 40 + 0.05 * len(others)
    assert window["n_ood"] == stored_ood and window["ood_share"] > 0.2
    last = publisher.updates[-1]
    states = {alarm["alarm_id"]: alarm for alarm in last.alarms}
    assert states["pg_high"]["suppressed"] is True
    assert states["not_crystals"]["suppressed"] is False
    assert last.quality == "BAD"
