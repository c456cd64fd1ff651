"""The review queue: a pipeline observer that keeps crops for an operator to label.

`observe` runs on a pipeline worker and must return at once: it picks the crops worth
keeping (monitor.review.selection), copies them and hands them to a bounded queue; a
writer thread encodes them and writes them to the sample store. When the writer falls
behind, further crops are dropped and counted (per hour and reason in the store's
record, and in the log), never the frame: the counting does not wait on the review.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import structlog

from monitor.config.review import ReviewConfig
from monitor.pipeline.outcome import ClassifiedFrame
from monitor.review.sample_store import NewSample, SampleStore
from monitor.review.selection import HourlyCaps, reason_to_keep

log = structlog.get_logger(__name__)

TALLY_FLUSH_S = 10.0  # how often the writer adds the selection's counts to the store


@dataclass(frozen=True)
class _Pending:
    sample: NewSample
    image: np.ndarray


_STOP = object()


class ReviewQueue:
    """Keeps crops of classified frames in `store`. `rng` draws the random share
    (seeded in tests); `clock` stamps when a crop was kept."""

    def __init__(
        self,
        config: ReviewConfig,
        store: SampleStore,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self._clock = clock
        self._rng = rng or random.Random()
        self._caps = HourlyCaps(config, store.classes)
        self._caps_lock = threading.Lock()
        self._pending: queue.Queue[object] = queue.Queue(maxsize=config.queue_size)
        self._thread: threading.Thread | None = None
        self.kept = 0
        self.dropped = 0
        self.written = 0
        self.failed = 0
        self._last_drop_log = 0.0

    # -- the worker's side: quick -------------------------------------------------
    def observe(self, frame: ClassifiedFrame) -> None:
        chosen: list[_Pending] = []
        now = self._clock()
        with self._caps_lock:
            for crop in frame.crops:
                probabilities = [float(p) for p in crop.row[: len(frame.classes)]]
                reason = reason_to_keep(
                    crop.decision, probabilities, self.config, self._rng.random()
                )
                if reason is None or not self._caps.admit(
                    reason, crop.decision.label, frame.item.ts
                ):
                    continue
                decision = crop.decision
                chosen.append(
                    _Pending(
                        NewSample(
                            probe=frame.item.probe,
                            frame_key=frame.item.key,
                            ts=frame.item.ts,
                            batch=frame.batch,
                            bbox=tuple(int(v) for v in crop.bbox),  # type: ignore[arg-type]
                            model=frame.model.label,
                            guess=decision.label,
                            confidence=float(decision.confidence),
                            probabilities=dict(zip(frame.classes, probabilities, strict=True)),
                            status=decision.status,
                            decision_reason=decision.reason,
                            ood_score=decision.ood_score,
                            kept_because=reason,
                            kept_at=now,
                        ),
                        # A copy: the crop may be a view into the frame the worker reuses.
                        np.ascontiguousarray(crop.image).copy(),
                    )
                )
        for pending in chosen:
            try:
                self._pending.put_nowait(pending)
            except queue.Full:
                self._drop(pending)
            else:
                self.kept += 1

    def _drop(self, pending: _Pending) -> None:
        with self._caps_lock:
            self._caps.dropped(pending.sample.kept_because, pending.sample.ts)
            self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 10.0:
            self._last_drop_log = now
            log.warning(
                "review_samples_dropped",
                dropped=self.dropped,
                queue_size=self.config.queue_size,
                action="frames are counted as usual; raise review.queue_size or check the "
                "disk under daemon.state_dir",
            )

    # -- the writer's side --------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._write_loop, name="review-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (within `timeout`), record the counts, stop."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._pending.put(_STOP, timeout=max(0.01, deadline - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        if self._thread.is_alive():
            log.warning("review_writer_not_stopped", pending=self._pending.qsize())
        self._thread = None
        self._flush_tallies()
        log.info(
            "review_queue_stopped",
            kept=self.kept,
            written=self.written,
            dropped=self.dropped,
            failed=self.failed,
        )

    def _write_loop(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                item = self._pending.get(timeout=1.0)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if isinstance(item, _Pending):
                try:
                    self.store.add(item.sample, item.image)
                except Exception as exc:  # a full disk costs the sample, never the daemon
                    self.failed += 1
                    log.error(
                        "review_sample_not_written",
                        key=item.sample.frame_key,
                        error=str(exc),
                        failed=self.failed,
                    )
                else:
                    self.written += 1
            if time.monotonic() - last_flush >= TALLY_FLUSH_S:
                last_flush = time.monotonic()
                self._flush_tallies()

    def _flush_tallies(self) -> None:
        with self._caps_lock:
            tallies = self._caps.take_tallies()
        try:
            self.store.add_tallies(tallies)
        except Exception as exc:
            log.error("review_tallies_not_written", error=str(exc))

    def wait_written(self, count: int, timeout: float) -> bool:
        """For tests and the demo: wait until `count` crops are written."""
        deadline = time.monotonic() + timeout
        while self.written + self.failed < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.written + self.failed >= count
