"""The composition root's order: stages start downstream first and stop in reverse, and
a start that fails half-way stops what had started (nothing left running, the store
closed), so a failed start neither leaks threads nor leaves a publisher connected."""

from __future__ import annotations

import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from monitor.config.settings import load_settings
from monitor.daemon import Daemon
from monitor.publishers.base import CommandHandler, ProbeUpdate
from monitor.runtime.systemd_notify import SystemdNotifier
from monitor.sources.base import FrameSink
from monitor.store import DB_FILE
from monitor.web.server import WebStartError


class Journal:
    def __init__(self) -> None:
        self.steps: list[str] = []


class RecordingPublisher:
    name = "recording"

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.updates: list[ProbeUpdate] = []

    def start(self, commands: CommandHandler) -> None:
        self.journal.steps.append("publisher start")

    def publish_update(self, update: ProbeUpdate) -> None:
        self.updates.append(update)
        self.journal.steps.append("publisher update")

    def publish_alarms(self, probe: str, alarms: list[dict[str, Any]]) -> None: ...

    def publish_event(self, probe: str, event: dict[str, Any]) -> None: ...

    def publish_result(self, probe: str, result: dict[str, Any]) -> None: ...

    def health(self) -> tuple[bool, str]:
        return True, "recording"

    def stop(self) -> None:
        self.journal.steps.append("publisher stop")


class RecordingSource:
    probe_id = "R1"

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def start(self, sink: FrameSink) -> None:
        self.journal.steps.append("source start")

    def stop(self) -> None:
        self.journal.steps.append("source stop")

    def health(self) -> tuple[bool, str]:
        return True, "recording"


def _settings(tmp_path: Path, http: dict[str, Any] | None = None) -> Any:
    return load_settings(
        data={
            "daemon": {"state_dir": str(tmp_path / "state"), "shutdown_grace": "1s"},
            "http": http or {"enabled": False},
            "aggregation": {"publish_interval": "60s"},  # only the last publish, at stop
            "probes": [{"id": "R1", "source": {"type": "folder", "path": str(tmp_path)}}],
        }
    )


def _worker_threads() -> set[str]:
    names = ("worker-", "recorder", "batcher", "publisher", "http")
    return {t.name for t in threading.enumerate() if t.name.startswith(names)}


def test_stages_start_downstream_first_and_stop_in_reverse(tmp_path: Path) -> None:
    journal = Journal()
    daemon = Daemon(
        _settings(tmp_path),
        publishers=[RecordingPublisher(journal)],
        sources=[RecordingSource(journal)],
        notifier=SystemdNotifier(None),
    )
    daemon.start()
    assert journal.steps == ["publisher start", "source start"]
    daemon.stop()
    # The source stops first, the last publish still reaches the publisher, which stops
    # after it; then the store is closed.
    assert journal.steps[2:] == ["source stop", "publisher update", "publisher stop"]
    with pytest.raises(sqlite3.ProgrammingError):
        daemon.store.frames_since("R1", 0.0)
    assert daemon.drained is True


def test_a_web_server_that_cannot_listen_stops_the_publishers_that_started(
    tmp_path: Path,
) -> None:
    before = _worker_threads()
    journal = Journal()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        daemon = Daemon(
            _settings(tmp_path, {"enabled": True, "port": port}),
            publishers=[RecordingPublisher(journal)],
            sources=[RecordingSource(journal)],
            notifier=SystemdNotifier(None),
        )
        with pytest.raises(WebStartError, match=r"http\.port"):
            daemon.start()
    assert journal.steps == ["publisher start", "publisher stop"]  # no source ever started
    assert _worker_threads() <= before
    # The store was closed, so the next start opens it afresh (no lock held, file intact).
    assert (tmp_path / "state" / DB_FILE).exists()
    again = Daemon(_settings(tmp_path), sources=[], notifier=SystemdNotifier(None))
    again.start()
    again.stop()


def test_stop_without_start_does_nothing_and_says_so(tmp_path: Path) -> None:
    daemon = Daemon(_settings(tmp_path), notifier=SystemdNotifier(None))
    daemon.stop()  # attributes of a started daemon are not assumed
    assert (daemon.drained, daemon.frames_recorded) == (None, 0)
