"""The recorder: commits frame outcomes to the store, then hands each on (`on_recorded`:
the windows, the alarms' counts).

Writes are grouped into short transactions (up to `max_rows` or `max_delay`), which
keeps SQLite far from being the bottleneck while adding only milliseconds of latency.
One transaction holds a frame's row, its particles' rows (the model's call, box and
size of each), its journal entry and its result messages for the durable publishers
(`stage_results`), so a crash at any point leaves all of them or none. Only after the
commit are windows updated and files moved: a crash in between leaves the file
un-journaled, so it is counted once, on the next start.

Failures. A write that fails for a passing cause (a full disk, a locked database, an
I/O error) is retried with backoff, for as long as it takes: nothing is dropped, the
bounded queue in front holds the pipeline back (a folder's files wait on disk), and
`problem` tells /readyz why. Any other failure is isolated: the group is written
frame by frame, and a frame that still cannot be stored is recorded as an error with
the reason, or, if even that fails, counted as unstorable. Repeating failures are
logged once per reason per interval, with a count.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import structlog

from monitor.log_limit import RepeatLimiter
from monitor.pipeline.outcome import FrameOutcome, ParticleBox
from monitor.store import (
    FrameRow,
    ParticleRow,
    ParticleSizeRow,
    Store,
    StoreTransaction,
    is_transient,
)

# Outcomes waiting for the store. Beyond this, workers wait: frames are held back
# upstream (a folder's files on disk), never dropped here. Each may reference its
# decoded image (for the dashboard's strip), so the bound is also a memory bound.
QUEUE_OUTCOMES = 1024
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0
FAILURE_LOG_INTERVAL_S = 60.0

StageResults = Callable[[StoreTransaction, Sequence[tuple[str, dict[str, Any]]]], None]

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
    store_failures: dict[str, int]
    """reason -> failed store writes (each retried, or isolated), since start."""
    unstorable: int
    """Frames that could not be stored even as an error row (logged with their reason)."""


def result_document(outcome: FrameOutcome, classes: tuple[str, ...]) -> dict[str, Any]:
    """One frame's result message, as the durable publishers send it."""
    return {
        "ts": outcome.item.ts,
        "key": outcome.item.key,
        "status": outcome.status,
        "reason": outcome.reason,
        "counts": dict(zip(classes, outcome.class_counts, strict=True)),
        "n_uncertain": outcome.n_uncertain,
        "n_ood": outcome.n_ood,
        "model": None if outcome.model is None else outcome.model.to_json(),
    }


def particle_row(box: ParticleBox) -> ParticleRow:
    """One particle as the store keeps it."""
    size = box.size
    return ParticleRow(
        label=box.label,
        status=box.status,
        reason=box.reason,
        confidence=box.confidence,
        box=(box.x, box.y, box.w, box.h),
        size=None
        if size is None
        else ParticleSizeRow(
            size.area, size.ecd, size.feret_max, size.feret_min, size.aspect_ratio, size.unit
        ),
    )


def failure_reason(exc: BaseException) -> str:
    """A short, bounded label for a store failure ('database is locked', 'disk full')."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:80]


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
        on_recorded: Callable[[FrameOutcome], None],
        stage_results: StageResults | None = None,
        clock: Callable[[], float] = time.time,
        max_rows: int = 256,
        max_delay_s: float = 0.02,
        queue_outcomes: int = QUEUE_OUTCOMES,
    ) -> None:
        self._store = store
        self._classes = classes
        self._batch_of = batch_of
        self._on_recorded = on_recorded
        self._stage_results = stage_results
        self._clock = clock
        self._max_rows = max_rows
        self._max_delay = max_delay_s
        self._queue = _OutcomeQueue(queue_outcomes)
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._stopping = threading.Event()
        self._give_up_at: float | None = None  # monotonic; set by stop()
        self.recorded = 0
        self.last_attempt = time.monotonic()  # the last store write tried (the watchdog)
        self._counts_lock = threading.Lock()
        self._frames: Counter[tuple[str, str]] = Counter()
        self._problems: Counter[tuple[str, str, str]] = Counter()
        self._particles: Counter[tuple[str, str]] = Counter()
        self._uncertain: Counter[str] = Counter()
        self._ood: Counter[str] = Counter()
        self._store_failures: Counter[str] = Counter()
        self._unstorable = 0
        self._problem: str | None = None
        self._failure_log = RepeatLimiter(FAILURE_LOG_INTERVAL_S)

    def start(self) -> None:
        self._thread.start()

    def submit(self, outcome: FrameOutcome) -> None:
        """Hand on one outcome; waits while the queue is full (the store is behind)."""
        self._queue.put([outcome])

    def submit_many(self, outcomes: Sequence[FrameOutcome]) -> None:
        """Hand on a group of outcomes in one step (a group of frames classified by one
        callback); waits while the queue has no room for them."""
        self._queue.put(list(outcomes))

    def stop(self, timeout: float = 10.0) -> None:
        """Commit everything submitted so far, then stop. A store that keeps failing is
        given `timeout`; what is still unwritten then is logged (files stay un-journaled
        and are processed at the next start)."""
        self._give_up_at = time.monotonic() + timeout
        self._stopping.set()
        self._queue.close()
        self._thread.join(timeout=timeout + 1.0)

    @property
    def problem(self) -> str | None:
        """Why the store cannot be written right now (for /readyz); None when it can."""
        return self._problem

    def _run(self) -> None:
        while True:
            pending = self._queue.take(self._max_rows, self._max_delay)
            if not pending:
                break  # closed and empty
            self._record(pending)

    # -- writing, with retries and isolation -------------------------------------------

    def _record(self, outcomes: list[FrameOutcome]) -> None:
        pending = outcomes
        delay = RETRY_FIRST_S
        while pending:
            self.last_attempt = time.monotonic()
            try:
                self._commit(pending)
            except Exception as exc:  # a store failure must not kill the thread
                if not is_transient(exc):
                    self._failed(exc, transient=False)
                    pending = self._record_one_by_one(pending)
                    if not pending:
                        break
                    continue  # _record_one_by_one met a passing failure: retry the rest
                self._failed(exc, transient=True)
                if not self._wait(delay):
                    log.error(
                        "store_gave_up_at_stop",
                        frames=len(pending),
                        reason=failure_reason(exc),
                        action="files stay un-journaled and are processed at the next start",
                    )
                    return
                delay = min(delay * 2, RETRY_MAX_S)
            else:
                break
        self._recovered()

    def _record_one_by_one(self, outcomes: list[FrameOutcome]) -> list[FrameOutcome]:
        """Commit each frame alone so one bad frame cannot sink its group. Returns the
        frames not yet written if a passing failure interrupts (to be retried)."""
        for index, outcome in enumerate(outcomes):
            try:
                self._commit([outcome])
            except Exception as exc:
                if is_transient(exc):
                    self._failed(exc, transient=True)
                    return outcomes[index:]
                self._store_as_error(outcome, exc)
        return []

    def _store_as_error(self, outcome: FrameOutcome, exc: Exception) -> None:
        reason = f"store: {failure_reason(exc)}"
        log.error(
            "frame_not_storable",
            probe=outcome.item.probe,
            key=outcome.item.key[:200],
            reason=reason,
            action="recorded as an error",
        )
        failed = replace(
            outcome,
            status="error",
            reason=reason,
            class_counts=(0,) * len(self._classes),
            n_uncertain=0,
            n_ood=0,
            image=None,
            boxes=(),
        )
        try:
            self._commit([failed], stage=False)
        except Exception as second:
            with self._counts_lock:
                self._unstorable += 1
            log.exception(
                "frame_lost_unstorable",
                probe=outcome.item.probe,
                key=outcome.item.key[:200],
                reason=reason,
                second_reason=failure_reason(second),
            )

    def _wait(self, delay: float) -> bool:
        """Sleep before a retry; False once a stop's grace time has run out."""
        if self._stopping.is_set():
            give_up_at = self._give_up_at or 0.0
            if time.monotonic() >= give_up_at:
                return False
            delay = min(delay, max(0.0, give_up_at - time.monotonic()))
        time.sleep(delay)
        return True

    def _failed(self, exc: BaseException, *, transient: bool) -> None:
        reason = failure_reason(exc)
        with self._counts_lock:
            self._store_failures[reason] += 1
        if transient:
            self._problem = f"store {self._store.path.name} cannot be written: {reason} (retrying)"
        count = self._failure_log.due(reason)
        if count:
            log.error(
                "store_write_failed",
                reason=reason,
                failures=count,
                transient=transient,
                action="retrying with backoff" if transient else "writing frame by frame",
                interval_s=FAILURE_LOG_INTERVAL_S,
                exc_info=not transient,
            )

    def _recovered(self) -> None:
        if self._problem is not None:
            log.info("store_write_recovered", was=self._problem)
            self._problem = None
            self._failure_log.reset()

    def _commit(self, outcomes: list[FrameOutcome], *, stage: bool = True) -> None:
        now = self._clock()
        rows = []
        for outcome in outcomes:
            rows.append(
                FrameRow(
                    probe=outcome.item.probe,
                    key=outcome.item.key,
                    ts=outcome.item.ts,
                    batch=self._batch_of(outcome.item.probe),
                    status=outcome.status,
                    reason=outcome.reason,
                    counts=dict(zip(self._classes, outcome.class_counts, strict=True)),
                    n_uncertain=outcome.n_uncertain,
                    n_ood=outcome.n_ood,
                    model=None if outcome.model is None else outcome.model.to_json(),
                    stored_at=now,
                    journal=outcome.item.journal,
                    particles=tuple(particle_row(box) for box in outcome.boxes),
                )
            )
        with self._store.transaction() as tx:
            added = self._store.record_frames(rows, tx)
            fresh = [o for o, new in zip(outcomes, added, strict=True) if new]
            if stage and self._stage_results is not None and fresh:
                self._stage_results(
                    tx, [(o.item.probe, result_document(o, self._classes)) for o in fresh]
                )
        for outcome in fresh:  # committed: the rest may fail per frame, never undo that
            self.recorded += 1
            self._count(outcome)
            try:
                self._after_commit(outcome)
            except Exception:
                log.exception(
                    "frame_after_store_failed", probe=outcome.item.probe, key=outcome.item.key
                )

    def _after_commit(self, outcome: FrameOutcome) -> None:
        try:
            self._on_recorded(outcome)
        finally:
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
                store_failures=dict(self._store_failures),
                unstorable=self._unstorable,
            )


class _OutcomeQueue:
    """Outcomes waiting for the store, bounded in frames; groups go in whole.

    A group is let in while the queue holds fewer than `capacity` frames, so one larger
    than the room left waits only for the queue to go below its bound, never forever.
    """

    def __init__(self, capacity: int) -> None:
        self._groups: deque[list[FrameOutcome]] = deque()
        self._frames = 0
        self._capacity = max(1, capacity)
        self._closed = False
        self._cond = threading.Condition()

    def put(self, outcomes: list[FrameOutcome]) -> None:
        if not outcomes:
            return
        with self._cond:
            while self._frames >= self._capacity:
                self._cond.wait()
            self._groups.append(outcomes)
            self._frames += len(outcomes)
            self._cond.notify_all()

    def close(self) -> None:
        """No more outcomes: `take` returns what is queued, then an empty list."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, max_rows: int, max_delay_s: float) -> list[FrameOutcome]:
        """The next outcomes to commit: waits for the first, then gathers more for up to
        `max_delay_s` or until `max_rows` (whole groups, so it may go past). Empty once
        closed and drained."""
        with self._cond:
            while not self._groups and not self._closed:
                self._cond.wait()
            deadline = time.monotonic() + max_delay_s
            while self._frames < max_rows and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            taken: list[FrameOutcome] = []
            while self._groups and len(taken) < max_rows:
                taken += self._groups.popleft()
            self._frames -= len(taken)
            self._cond.notify_all()
            return taken
