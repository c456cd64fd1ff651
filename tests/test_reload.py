"""SIGHUP reload: what changes live, what waits for a restart, and an invalid file that
leaves the daemon running on the configuration it had."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from monitor.alarms import AlarmEngine, AlarmState
from monitor.config.settings import Settings, load_settings
from monitor.runtime.reload import plan_reload
from monitor.simulator import CropSimulator
from tests.daemon_process import DaemonProcess, export, wait_for, write_like_probe
from tests.notify_listener import Listener
from tests.test_alarms import snapshot

PG_HIGH = {
    "id": "pg_high",
    "kind": "fraction_high",
    "priority": "high",
    "message": "PG share {value:.1%} above {limit:.0%}",
    "class_name": "PG",
    "window": "1m",
    "limit": 0.15,
    "deadband": 0.02,
    "on_delay": "0s",
    "off_delay": "0s",
    "min_count": 10,
}


def _settings(**changes: object) -> Settings:
    data: dict[str, object] = {
        "aggregation": {"publish_interval": "5s"},
        "alarms": {"definitions": [PG_HIGH]},
        "probes": [
            {
                "id": "R1",
                "sampling": "whole",
                "source": {"type": "folder", "path": "/srv/probe/R1"},
            }
        ],
    }
    data.update(changes)
    return load_settings(data=data)


# -- the plan (pure) ------------------------------------------------------------------


def test_nothing_changed_gives_an_empty_plan() -> None:
    plan = plan_reload(_settings(), _settings())
    assert not plan.changed
    assert plan.settings == _settings()


def test_alarm_limits_publish_interval_and_probe_thresholds_apply_live() -> None:
    new = _settings(
        aggregation={"publish_interval": "2s"},
        alarms={"definitions": [{**PG_HIGH, "limit": 0.3}]},
        probes=[
            {
                "id": "R1",
                "sampling": "whole",
                "quality": {"min_contrast": 7.5},
                "source": {"type": "folder", "path": "/srv/probe/R1"},
            }
        ],
    )
    plan = plan_reload(_settings(), new)
    assert set(plan.applied) == {
        "aggregation.publish_interval",
        "alarms.definitions",
        "probes[R1].quality.min_contrast",
    }
    assert plan.needs_restart == ()
    assert plan.settings.aggregation.publish_interval == 2.0
    assert plan.settings.alarms.definitions[0].limit == 0.3  # type: ignore[union-attr]
    assert plan.settings.probes[0].quality.min_contrast == 7.5


def test_restart_bound_changes_are_reported_and_keep_their_running_values() -> None:
    current = _settings()
    new = _settings(
        daemon={"shutdown_grace": "3s"},
        aggregation={"publish_interval": "5s", "windows": ["2m", "10m"]},
        alarms={"definitions": [{**PG_HIGH, "window": "2m"}]},
        probes=[
            {
                "id": "R1",
                "sampling": "tiles",
                "source": {"type": "folder", "path": "/srv/probe/elsewhere"},
            }
        ],
    )
    plan = plan_reload(current, new)
    assert set(plan.needs_restart) == {
        "daemon.shutdown_grace",
        "aggregation.windows",
        "probes[R1].sampling",
        "probes[R1].source.path",
    }
    assert plan.applied == ("alarms.definitions",)
    assert plan.settings.daemon.shutdown_grace == current.daemon.shutdown_grace
    assert plan.settings.aggregation.windows == current.aggregation.windows
    assert plan.settings.probes[0].source == current.probes[0].source
    assert plan.settings.probes[0].sampling == "whole"


def test_added_probe_needs_a_restart_and_is_not_started() -> None:
    second = {"id": "R2", "sampling": "whole", "source": {"type": "folder", "path": "/srv/R2"}}
    first = {"id": "R1", "sampling": "whole", "source": {"type": "folder", "path": "/srv/probe/R1"}}
    plan = plan_reload(_settings(), _settings(probes=[first, second]))
    assert plan.needs_restart == ("probes (added, removed or reordered)",)
    assert [probe.id for probe in plan.settings.probes] == ["R1"]


# -- the alarm engine carries on -------------------------------------------------------


def test_reconfigured_engine_keeps_acknowledged_state_and_applies_the_new_limit() -> None:
    engine = AlarmEngine(_settings().alarms.definitions)
    raised = engine.evaluate("R1", snapshot(0.25), 100.0, last_frame_ts=100.0)
    assert [t.to_state for t in raised] == [AlarmState.ACTIVE_UNACKNOWLEDGED]
    assert engine.acknowledge("R1", "pg_high", "olga", "seen", 101.0).accepted
    engine.drain_journal()

    definitions = _settings(alarms={"definitions": [{**PG_HIGH, "limit": 0.4}]}).alarms.definitions
    reloaded = engine.reconfigured(definitions, max_shelve_s=3600.0)
    (status,) = reloaded.alarm_states("R1")
    assert status.state == AlarmState.ACTIVE_ACKNOWLEDGED and status.limit == 0.4
    assert reloaded.drain_journal() == []  # no restore markers: a reload is no restart

    cleared = reloaded.evaluate("R1", snapshot(0.25), 110.0, last_frame_ts=110.0)
    assert [t.to_state for t in cleared] == [AlarmState.NORMAL]  # 25 % is now under 40 %


# -- the daemon under SIGHUP -------------------------------------------------------------


def _daemon_config(path: Path, state: Path, folder: Path, extra: str = "") -> Path:
    path.write_text(
        f"""
[daemon]
state_dir = "{state}"
log_format = "json"
shutdown_grace = "5s"
{extra}

[aggregation]
publish_interval = "1s"

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


def _log_events(daemon: DaemonProcess, event: str) -> list[dict[str, object]]:
    lines = [line for line in daemon.log_text().splitlines() if line.startswith("{")]
    return [record for line in lines if (record := json.loads(line)).get("event") == event]


def test_sighup_applies_thresholds_live_and_an_invalid_file_keeps_the_running_config(
    tmp_path: Path, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
    folder = tmp_path / "probe"
    folder.mkdir()
    state = tmp_path / "state"
    config = _daemon_config(tmp_path / "config.toml", state, folder)
    # `export` reads the store through a config of its own: the daemon's may be invalid.
    export_config = _daemon_config(tmp_path / "export.toml", state, folder)
    simulator = CropSimulator(seed=11)

    def write_crops(start: int, count: int) -> None:
        for index in range(start, start + count):
            write_like_probe(folder, f"crop_{index:04d}.png", simulator.render("CEX"))

    def statuses() -> dict[str, str]:
        return {row["key"]: row["status"] for row in export(export_config)}

    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        listener.wait_for("READY", timeout=120)
        write_crops(0, 5)
        assert wait_for(lambda: len(statuses()) == 5, timeout=60)
        assert set(statuses().values()) == {"ok"}

        # Every frame becomes "empty" under an absurd contrast floor; the grace time
        # can only change with a restart.
        config.write_text(
            config.read_text().replace('shutdown_grace = "5s"', 'shutdown_grace = "7s"')
            + "[probes.quality]\nmin_contrast = 1000.0\n"
        )
        daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        reloading, _ = listener.wait_for("RELOADING", timeout=30)
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        ready, _ = listener.wait_for("READY", timeout=30)
        assert ready["STATUS"].startswith("reloaded: 1 change(s) applied")
        assert "daemon.shutdown_grace" in ready["STATUS"]
        (reloaded,) = _log_events(daemon, "config_reloaded")
        assert reloaded["applied"] == ["probes[R1].quality.min_contrast"]
        assert reloaded["needs_restart"] == ["daemon.shutdown_grace"]

        write_crops(5, 5)
        assert wait_for(lambda: len(statuses()) == 10, timeout=60)
        assert [statuses()[f"crop_{i:04d}.png"] for i in range(5, 10)] == ["rejected"] * 5

        config.write_text(config.read_text() + "\n[mqtt]\ncolour = 'blue'\n")
        daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        listener.wait_for("RELOADING", timeout=30)
        ready, _ = listener.wait_for("READY", timeout=30)
        assert ready["STATUS"].startswith("reload failed, running on the old config")
        (failed,) = _log_events(daemon, "config_reload_failed")
        assert failed["problems"] == [
            "mqtt.colour: unknown key (check the spelling; `crystal-monitor "
            "print-default-config` lists every key)"
        ]

        write_crops(10, 3)  # still running, still on the reloaded thresholds
        assert wait_for(lambda: len(statuses()) == 13, timeout=60)
        assert [statuses()[f"crop_{i:04d}.png"] for i in range(10, 13)] == ["rejected"] * 3
        assert daemon.alive()
        assert daemon.terminate() == 0
