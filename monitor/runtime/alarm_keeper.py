"""The alarm engine as the running daemon shares it: one lock around it, and its
journal and state written to the store after every change."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from monitor.alarms import ActionResult, AlarmEngine, Quality, Transition
from monitor.config.settings import Settings
from monitor.store import Store

ALARM_STATE = "alarm_engine"


class AlarmKeeper:
    """Observed by the recorder's thread, evaluated by the publish cycle, acted on by
    operators (MQTT, OPC UA, HTTP threads) and swapped by a reload."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self.announcing = threading.Lock()
        """Held from reading alarm states to handing them to the publishers, by the
        publish cycle and by operator actions: an update evaluated before an acknowledge
        cannot reach a publisher after it and show the alarm unacknowledged again."""
        self._engine = AlarmEngine(
            settings.alarms.definitions,
            state=store.load_state(ALARM_STATE),
            max_shelve_s=settings.alarms.max_shelve,
        )

    def observe_counts(self, probe: str, ts: float, counts: Mapping[str, int]) -> None:
        with self._lock:
            self._engine.observe_counts(probe, ts, counts)

    def evaluate(
        self, probe: str, snapshot: Mapping[str, Any], now: float, last_frame_ts: float | None
    ) -> tuple[list[Transition], Quality | None, list[dict[str, Any]]]:
        """(transitions to announce, the input quality it rated, every alarm's status)."""
        with self._lock:
            transitions = self._engine.evaluate(probe, snapshot, now, last_frame_ts=last_frame_ts)
            quality = self._engine.input_quality(probe)
            statuses = [status.to_json() for status in self._engine.alarm_states(probe)]
        return transitions, quality, statuses

    def states(self, probe: str) -> list[dict[str, Any]]:
        """Every alarm of `probe` as AlarmStatus.to_json()."""
        with self._lock:
            return [status.to_json() for status in self._engine.alarm_states(probe)]

    def acknowledge(
        self, probe: str, alarm_id: str, who: str, comment: str, now: float
    ) -> ActionResult:
        with self._lock:
            return self._engine.acknowledge(probe, alarm_id, who, comment, now)

    def shelve(  # noqa: PLR0917 - the engine's order
        self,
        probe: str,
        alarm_id: str,
        seconds: float,
        who: str,
        comment: str,
        now: float,
        *,
        one_shot: bool = False,
    ) -> ActionResult:
        with self._lock:
            return self._engine.shelve(
                probe, alarm_id, seconds, who, comment, now, one_shot=one_shot
            )

    def unshelve(
        self, probe: str, alarm_id: str, who: str, comment: str, now: float
    ) -> ActionResult:
        with self._lock:
            return self._engine.unshelve(probe, alarm_id, who, comment, now)

    def add_comment(
        self, probe: str, alarm_id: str, who: str, comment: str, now: float
    ) -> ActionResult:
        with self._lock:
            return self._engine.add_comment(probe, alarm_id, who, comment, now)

    def reset_shift(self, probe: str, now: float) -> None:
        with self._lock:
            self._engine.reset_shift(probe, now)

    def reconfigure(self, settings: Settings) -> None:
        """New definitions and limits; states, acknowledgements and shelving carry over.
        The old engine's journal is written first."""
        self.persist()
        with self._lock:
            self._engine = self._engine.reconfigured(
                settings.alarms.definitions, max_shelve_s=settings.alarms.max_shelve
            )

    def persist(self) -> None:
        """Write the journal entries since the last call and the engine's state."""
        with self._lock:
            journal = [entry.to_json() for entry in self._engine.drain_journal()]
            state = self._engine.export_state()
        self._store.record_alarm_journal(journal)
        self._store.save_state(ALARM_STATE, state)
