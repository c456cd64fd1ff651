"""Alarms through the daemon: operator actions are journaled with who and why, and an
acknowledged alarm is restored after a restart without being announced again."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from monitor.config.settings import load_settings
from monitor.daemon import Daemon
from monitor.publishers.base import CommandHandler, ProbeUpdate
from monitor.store import Store


class RecordingPublisher:
    """An in-memory Publisher for logic tests (the real ones have their own tests)."""

    name = "recording"

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.updates: list[ProbeUpdate] = []
        self.alarm_states: list[tuple[str, list[dict[str, Any]]]] = []

    def start(self, commands: CommandHandler) -> None:
        self.commands = commands

    def publish_update(self, update: ProbeUpdate) -> None:
        self.updates.append(update)

    def publish_alarms(self, probe: str, alarms: list[dict[str, Any]]) -> None:
        self.alarm_states.append((probe, alarms))

    def publish_event(self, probe: str, event: dict[str, Any]) -> None:
        self.events.append(event)

    def publish_result(self, probe: str, result: dict[str, Any]) -> None:
        pass

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    def stop(self) -> None:
        pass


def _settings(state: Path):  # type: ignore[no-untyped-def]
    return load_settings(
        data={
            "daemon": {"state_dir": str(state)},
            "aggregation": {"windows": ["10s", "30s"], "publish_interval": "0.2s"},
            "alarms": {
                "definitions": [
                    {
                        "id": "pg_high",
                        "kind": "fraction_high",
                        "priority": "high",
                        "message": "PG {value:.0%}",
                        "class_name": "PG",
                        "window": "10s",
                        "limit": 0.3,
                        "min_count": 20,
                    }
                ]
            },
            "probes": [
                {
                    "id": "R1",
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


def _state_of(publisher: RecordingPublisher, alarm_id: str) -> str | None:
    for update in reversed(publisher.updates):
        for alarm in update.alarms:
            if alarm.get("alarm_id", alarm.get("id")) == alarm_id:
                return str(alarm["state"])
    return None


def _wait(condition, timeout: float = 20) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_acknowledged_alarm_is_journaled_and_not_announced_again_after_restart(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    first = RecordingPublisher()
    daemon = Daemon(_settings(state), publishers=[first])
    daemon.start()
    try:
        assert _wait(lambda: _state_of(first, "pg_high") == "active_unacknowledged")
        refused = daemon.commands.acknowledge("R1", "no_such_alarm", "op-anna", "typo")
        assert not refused.accepted and refused.reason
        accepted = daemon.commands.acknowledge("R1", "pg_high", "op-anna", "sample sent to the lab")
        assert accepted.accepted, accepted.reason
        assert _wait(lambda: _state_of(first, "pg_high") == "active_acknowledged")
    finally:
        daemon.stop()
    raised = [e for e in first.events if e.get("to_state") == "active_unacknowledged"]
    assert len(raised) == 1

    second = RecordingPublisher()
    restarted = Daemon(_settings(state), publishers=[second])
    restarted.start()
    try:
        assert _wait(lambda: len(second.updates) >= 10)
        assert _state_of(second, "pg_high") == "active_acknowledged"
    finally:
        restarted.stop()
    assert not [e for e in second.events if e.get("alarm_id") == "pg_high"]

    store = Store(state, readonly=True)
    journal = list(store.iter_alarm_journal())
    store.close()
    actions = [
        (e["event"], e["accepted"], e["who"], e["comment"]) for e in journal if e["who"] is not None
    ]
    assert ("acknowledge", True, "op-anna", "sample sent to the lab") in actions
    assert any(a[1] is False and a[2] == "op-anna" for a in actions)


def test_mqtt_outbox_overflow_raises_the_publish_overflow_alarm(tmp_path: Path) -> None:
    """With no broker and a tiny outbox, per-frame results overflow it: the dropped
    messages raise a system alarm on the other publishers, even while nothing else is wrong."""
    from monitor import __version__
    from monitor.config.mqtt import MqttConfig
    from monitor.publishers.mqtt import MqttPublisher
    from tests.mosquitto import free_port

    settings = _settings(tmp_path / "state")
    overflow = {
        "id": "mqtt_overflow",
        "kind": "publish_overflow",
        "priority": "high",
        "message": "{value:.0f} MQTT messages dropped",
        "publisher": "mqtt",
    }
    definitions = [d.model_dump() for d in settings.alarms.definitions] + [overflow]
    settings = settings.model_copy(
        update={"alarms": settings.alarms.model_validate({"definitions": definitions})}
    )
    mqtt = MqttPublisher(
        MqttConfig(enabled=True, port=free_port(), results=True, outbox_max_events=20),
        tmp_path / "state",
        version=__version__,
    )
    recorder = RecordingPublisher()
    daemon = Daemon(settings, publishers=[mqtt, recorder])
    daemon.start()
    try:
        assert _wait(lambda: _state_of(recorder, "mqtt_overflow") == "active_unacknowledged")
    finally:
        daemon.stop()
    raised = next(e for e in recorder.events if e.get("alarm_id") == "mqtt_overflow")
    assert raised["to_state"] == "active_unacknowledged" and raised["severity"] == 750
    assert "MQTT messages dropped" in raised["message"]
