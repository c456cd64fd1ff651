"""Operator actions from MQTT, OPC UA and the dashboard: acknowledge, shelve, start and
stop a batch. The publishers' and the web's `CommandHandler`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from monitor.alarms import ActionResult
from monitor.publishers.base import CommandResult
from monitor.runtime.alarm_keeper import AlarmKeeper
from monitor.runtime.events import EventAnnouncer
from monitor.runtime.probe_state import ProbeState
from monitor.store import Store

MAX_BATCH_ID = 128


class OperatorCommands:
    def __init__(
        self,
        probes: Mapping[str, ProbeState],
        alarms: AlarmKeeper,
        store: Store,
        events: EventAnnouncer,
        clock: Callable[[], float],
    ) -> None:
        self._probes = probes
        self._alarms = alarms
        self._store = store
        self._events = events
        self._clock = clock

    def acknowledge(self, probe: str, alarm_id: str, who: str, comment: str) -> CommandResult:
        refused = self._unknown(probe)
        if refused:
            return refused
        with self._alarms.announcing:
            result = self._alarms.acknowledge(probe, alarm_id, who, comment, self._clock())
            return self._after_action(probe, result)

    def shelve(
        self,
        probe: str,
        alarm_id: str,
        minutes: float,
        who: str,
        comment: str,
        *,
        one_shot: bool = False,
    ) -> CommandResult:
        refused = self._unknown(probe)
        if refused:
            return refused
        with self._alarms.announcing:
            result = self._alarms.shelve(
                probe, alarm_id, minutes * 60.0, who, comment, self._clock(), one_shot=one_shot
            )
            return self._after_action(probe, result)

    def unshelve(self, probe: str, alarm_id: str, who: str, comment: str) -> CommandResult:
        refused = self._unknown(probe)
        if refused:
            return refused
        with self._alarms.announcing:
            result = self._alarms.unshelve(probe, alarm_id, who, comment, self._clock())
            return self._after_action(probe, result)

    def add_comment(self, probe: str, alarm_id: str, who: str, comment: str) -> CommandResult:
        """A comment on an alarm, journalled with who wrote it and shown with the alarm's
        status (`comment`, `operator`); no state changes."""
        refused = self._unknown(probe)
        if refused:
            return refused
        with self._alarms.announcing:
            result = self._alarms.add_comment(probe, alarm_id, who, comment, self._clock())
            return self._after_action(probe, result)

    def start_batch(
        self, probe: str, batch_id: str, who: str = "local", *, end_running: bool = False
    ) -> CommandResult:
        """Reset the probe's windows and tag everything that follows with `batch_id`.

        Refused while a batch runs, so a second start cannot silently replace it; with
        `end_running` the running batch is stopped first (and announced as stopped)."""
        refused = self._unknown(probe)
        if refused:
            return refused
        if not batch_id or len(batch_id) > MAX_BATCH_ID:
            return CommandResult(False, f"batch_id must be 1 to {MAX_BATCH_ID} characters")
        state = self._probes[probe]
        running = state.aggregator.batch
        if running is not None:
            if not end_running:
                return CommandResult(
                    False,
                    f"batch {running!r} is running on probe {probe!r}: stop it first, or "
                    "start with end_running to end it",
                )
            stopped = self.stop_batch(probe, who)
            if not stopped.accepted:
                return stopped
        now = self._clock()
        with state.lock:
            self._store.start_batch(probe, batch_id, now)
            state.aggregator.start_batch(batch_id, now)
        self._alarms.reset_shift(probe, now)
        self._events.announce(
            probe, {"type": "batch", "action": "start", "batch": batch_id, "ts": now, "who": who}
        )
        return CommandResult(True)

    def stop_batch(self, probe: str, who: str = "local") -> CommandResult:
        refused = self._unknown(probe)
        if refused:
            return refused
        now = self._clock()
        state = self._probes[probe]
        with state.lock:
            batch = state.aggregator.batch
            if batch is None:
                return CommandResult(False, "no batch is running")
            self._store.stop_batch(probe, now)
            state.aggregator.stop_batch(now)
        self._events.announce(
            probe, {"type": "batch", "action": "stop", "batch": batch, "ts": now, "who": who}
        )
        return CommandResult(True)

    def _unknown(self, probe: str) -> CommandResult | None:
        if probe not in self._probes:
            return CommandResult(False, f"unknown probe {probe!r}")
        return None

    def _after_action(self, probe: str, result: ActionResult) -> CommandResult:
        # Journalled before it is announced: what MQTT, OPC UA or the dashboard are told
        # an operator did is already on disk, with who and when (announcing can take a
        # while: an OPC UA method returns only once its effect is written).
        self._alarms.persist()
        self._events.announce_transitions(probe, result.transitions)
        if result.accepted:
            self._events.announce_alarm_states(probe, self._alarms.states(probe))
        return CommandResult(result.accepted, result.reason)
