"""What follows a frame's store commit: inside the transaction, the durable publishers'
result messages; after it, the windows, the alarms' counts and the live results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from monitor.pipeline.outcome import FrameOutcome
from monitor.pipeline.recorder import result_document
from monitor.publishers.base import DurableResults, Publisher
from monitor.runtime.alarm_keeper import AlarmKeeper
from monitor.runtime.probe_state import ProbeState
from monitor.store import StoreTransaction


class FrameResults:
    def __init__(
        self,
        classes: tuple[str, ...],
        probes: Mapping[str, ProbeState],
        alarms: AlarmKeeper,
        publishers: Sequence[Publisher],
    ) -> None:
        self._classes = classes
        self._probes = probes
        self._alarms = alarms
        self.durable = [p for p in publishers if isinstance(p, DurableResults)]
        self._live = [p for p in publishers if not isinstance(p, DurableResults)]

    def stage(self, tx: StoreTransaction, results: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Inside the recorder's transaction: the messages commit with their frames, or not
        at all."""
        for publisher in self.durable:
            for probe, result in results:
                publisher.stage_result(tx, probe, result)

    def recorded(self, outcome: FrameOutcome) -> None:
        """After the commit (the recorder's thread)."""
        probe = outcome.item.probe
        record = self._probes[probe].add(outcome)
        if record.accepted and any(record.class_counts):
            counts = dict(zip(self._classes, record.class_counts, strict=True))
            self._alarms.observe_counts(probe, record.ts, counts)
        if self._live:
            result = result_document(outcome, self._classes)
            for publisher in self._live:
                publisher.publish_result(probe, result)
