"""The recorder: commits frame outcomes to the store, then feeds the aggregators.

Writes are grouped into short transactions (up to `max_rows` or `max_delay`), which
keeps SQLite far from being the bottleneck while adding only milliseconds of latency.
Only after the commit are windows updated and files moved: a crash in between
leaves the file un-journaled, so it is counted once, on the next start.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from monitor.aggregate import FrameRecord
from monitor.pipeline import FrameOutcome
from monitor.store import FrameRow, Store

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RecordedCounts:
    """Everything recorded since start, for /metrics and the dashboard (copies)."""

    frames: dict[tuple[str, str], int]
    """(probe, status) -> frames; status ok, rejected or error."""
    problems: dict[tuple[str, str, str], int]
    """(probe, status, reason) -> rejected and failed frames."""
    particles: dict[tuple[str, str], int]
    """(probe, class) -> confidently classified particles."""
    uncertain: dict[str, int]
    """probe -> particles below the model's confidence threshold."""
    out_of_distribution: dict[str, int]
    """probe -> particles the model rejected as not like anything it was trained on."""


def reason_label(reason: str | None) -> str:
    """A bounded label for a rejection or error reason: 'internal: <message>' -> 'internal'."""
    return (reason or "unknown").split(":", 1)[0].strip() or "unknown"


class Recorder:
    def __init__(
        self,
        store: Store,
        classes: tuple[str, ...],
        *,
        batch_of: Callable[[str], str | None],
        on_recorded: Callable[[str, FrameRecord, FrameOutcome], None],
        clock: Callable[[], float] = time.time,
        max_rows: int = 256,
        max_delay_s: float = 0.02,
    ) -> None:
        self._store = store
        self._classes = classes
        self._batch_of = batch_of
        self._on_recorded = on_recorded
        self._clock = clock
        self._max_rows = max_rows
        self._max_delay = max_delay_s
        self._queue: queue.SimpleQueue[FrameOutcome | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self.recorded = 0
        self._counts_lock = threading.Lock()
        self._frames: Counter[tuple[str, str]] = Counter()
        self._problems: Counter[tuple[str, str, str]] = Counter()
        self._particles: Counter[tuple[str, str]] = Counter()
        self._uncertain: Counter[str] = Counter()
        self._ood: Counter[str] = Counter()

    def start(self) -> None:
        self._thread.start()

    def submit(self, outcome: FrameOutcome) -> None:
        self._queue.put(outcome)

    def stop(self, timeout: float = 10.0) -> None:
        """Commit everything submitted so far, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            pending = [first]
            deadline = time.monotonic() + self._max_delay
            while len(pending) < self._max_rows:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                pending.append(item)
            try:
                self._commit(pending)
            except Exception:  # a store failure must be loud but must not kill the thread
                log.exception("store_write_failed", frames=len(pending))

    def _commit(self, outcomes: list[FrameOutcome]) -> None:
        now = self._clock()
        rows = []
        batches = []
        for outcome in outcomes:
            batch = self._batch_of(outcome.item.probe)
            batches.append(batch)
            rows.append(
                FrameRow(
                    probe=outcome.item.probe,
                    key=outcome.item.key,
                    ts=outcome.item.ts,
                    batch=batch,
                    status=outcome.status,
                    reason=outcome.reason,
                    counts=dict(zip(self._classes, outcome.class_counts, strict=True)),
                    n_uncertain=outcome.n_uncertain,
                    n_ood=outcome.n_ood,
                    stored_at=now,
                    journal=outcome.item.journal,
                )
            )
        added = self._store.record_frames(rows)
        for outcome, row in zip(outcomes, rows, strict=True):
            if not added.get((row.probe, row.key), False):
                continue  # already journaled: seen twice, counted once
            self.recorded += 1
            self._count(outcome)
            record = FrameRecord(
                ts=outcome.item.ts,
                class_counts=outcome.class_counts,
                n_uncertain=outcome.n_uncertain,
                n_ood=outcome.n_ood,
                rejected_reason=None
                if outcome.status == "ok"
                else outcome.reason or outcome.status,
            )
            self._on_recorded(outcome.item.probe, record, outcome)
            if outcome.item.after_store is not None:
                outcome.item.after_store()

    def _count(self, outcome: FrameOutcome) -> None:
        probe = outcome.item.probe
        with self._counts_lock:
            self._frames[(probe, outcome.status)] += 1
            if outcome.status != "ok":
                self._problems[(probe, outcome.status, reason_label(outcome.reason))] += 1
            for name, count in zip(self._classes, outcome.class_counts, strict=True):
                self._particles[(probe, name)] += count
            self._uncertain[probe] += outcome.n_uncertain
            self._ood[probe] += outcome.n_ood

    def counts(self) -> RecordedCounts:
        """Frames by status and reason, particles by class, since this recorder started."""
        with self._counts_lock:
            return RecordedCounts(
                frames=dict(self._frames),
                problems=dict(self._problems),
                particles=dict(self._particles),
                uncertain=dict(self._uncertain),
                out_of_distribution=dict(self._ood),
            )
