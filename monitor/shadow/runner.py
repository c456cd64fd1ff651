"""The shadow runner: a pipeline observer that classifies a share of the live frames' crops
again with a candidate model and records how the two compare. It never publishes.

`observe` runs on a pipeline worker and returns at once: it draws whether this frame is
compared (model.shadow.share), and hands the frame (its crops and the live decisions,
already made) to a bounded queue. One thread runs the candidate on those same crops,
compares the calls frame by frame (monitor.shadow.comparison) and writes the rows to the
shadow record; every LABEL_SCORE_INTERVAL_S it also runs the candidate on review crops an
operator has labelled, so the report can score both models on them. A frame the
candidate cannot take (queue full, inference failed) is left out of the comparison and
counted, never held up: the live count does not wait for the shadow.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from monitor.config.shadow import ShadowConfig
from monitor.imaging.preprocess import prepare_batch
from monitor.inference.decision import Decision
from monitor.pipeline.active_model import ActiveModel
from monitor.pipeline.outcome import ClassifiedFrame
from monitor.review.sample_store import SampleStore
from monitor.shadow.comparison import FrameComparison
from monitor.shadow.store import CandidateCall, ShadowStore

log = structlog.get_logger(__name__)

LABEL_SCORE_INTERVAL_S = 30.0  # how often newly labelled review crops are scored
FLUSH_INTERVAL_S = 2.0  # compared frames are written to the record at least this often
FLUSH_FRAMES = 64  # or once this many wait
_STOP = object()


def same_call(live: Decision, candidate: Decision) -> bool:
    """Both models sure of the same class, or both saying "I don't know"."""
    if live.status == "ok" and candidate.status == "ok":
        return live.label == candidate.label
    return live.status != "ok" and candidate.status != "ok"


def compare_frame(
    frame: ClassifiedFrame, candidate_decisions: Sequence[Decision]
) -> FrameComparison:
    """One frame's crops under both models: certain calls per class and agreement."""
    classes = frame.classes
    live_counts = [0] * len(classes)
    candidate_counts = [0] * len(classes)
    agreed = 0
    for crop, theirs in zip(frame.crops, candidate_decisions, strict=True):
        ours = crop.decision
        if ours.status == "ok":
            live_counts[classes.index(ours.label)] += 1
        if theirs.status == "ok":
            candidate_counts[classes.index(theirs.label)] += 1
        agreed += same_call(ours, theirs)
    return FrameComparison(
        probe=frame.item.probe,
        ts=frame.item.ts,
        crops=len(frame.crops),
        agreed=agreed,
        live_counts=tuple(live_counts),
        candidate_counts=tuple(candidate_counts),
    )


@dataclass
class ShadowCounts:
    """What became of the frames offered to the shadow."""

    offered: int = 0
    """Classified frames the pipeline showed it."""
    compared: int = 0
    """Frames the candidate classified and the record holds (or will at the next flush)."""
    not_drawn: int = 0
    """Left out by the share."""
    skipped: int = 0
    """Drawn, but the queue was full (the candidate fell behind)."""
    failed: int = 0
    """Drawn, but the candidate's inference or the record's write failed."""
    same_model: int = 0
    """Classified by the candidate itself (after it was promoted): nothing to compare."""
    labelled_scored: int = 0
    """Labelled review crops the candidate has classified."""


class ShadowRunner:
    """Runs `candidate` beside the live model. `samples` (the review queue's store, or
    None) supplies the labelled crops; `rng` draws the share (seeded in tests)."""

    def __init__(
        self,
        config: ShadowConfig,
        candidate: ActiveModel,
        store: ShadowStore,
        samples: SampleStore | None,
        *,
        max_batch: int,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.candidate = candidate
        self.store = store
        self.samples = samples
        self._max_batch = max(1, max_batch)
        self._clock = clock
        self._rng = rng or random.Random()
        self._pending: queue.Queue[object] = queue.Queue(maxsize=config.queue_size)
        self._thread: threading.Thread | None = None
        self._counts_lock = threading.Lock()
        self.counts = ShadowCounts()
        self._rows: list[tuple[FrameComparison, str, str, str, tuple[str, ...]]] = []
        self._last_flush = time.monotonic()
        self._last_label_scoring = float("-inf")
        self._last_failure_log = 0.0

    @property
    def label(self) -> str:
        return self.candidate.identity.label

    # -- the worker's side: quick ------------------------------------------------------
    def observe(self, frame: ClassifiedFrame) -> None:
        with self._counts_lock:
            self.counts.offered += 1
            if frame.model == self.candidate.identity:
                self.counts.same_model += 1
                return
            if self._rng.random() >= self.config.share:
                self.counts.not_drawn += 1
                return
        try:
            self._pending.put_nowait(frame)
        except queue.Full:
            with self._counts_lock:
                self.counts.skipped += 1
                skipped = self.counts.skipped
            self._log_failure(
                "shadow_frames_skipped",
                skipped=skipped,
                queue_size=self.config.queue_size,
                action="the live count is unaffected; lower model.shadow.share or raise "
                "model.shadow.queue_size",
            )

    # -- the candidate's side ----------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()
        log.info(
            "shadow_started",
            candidate=self.label,
            path=str(self.config.path),
            share=self.config.share,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Compare what is queued (within `timeout`), write the record, stop. The
        candidate's backend is the caller's to close."""
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
            log.warning("shadow_not_stopped", pending=self._pending.qsize())
        self._thread = None
        self._flush()
        log.info("shadow_stopped", candidate=self.label, **self.status_counts())

    def _run(self) -> None:
        while True:
            try:
                item = self._pending.get(timeout=0.5)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if isinstance(item, ClassifiedFrame):
                self._compare(item)
            if self._rows and (
                len(self._rows) >= FLUSH_FRAMES
                or time.monotonic() - self._last_flush >= FLUSH_INTERVAL_S
            ):
                self._flush()
            if time.monotonic() - self._last_label_scoring >= LABEL_SCORE_INTERVAL_S:
                self.score_labelled()

    def classify(self, images: Sequence[np.ndarray]) -> list[Decision]:
        """The candidate's decisions on 2-D uint8 crops, in batches it can take."""
        decisions: list[Decision] = []
        spec = self.candidate.manifest.input
        for start in range(0, len(images), self._max_batch):
            chunk = images[start : start + self._max_batch]
            rows = self.candidate.backend.infer(prepare_batch(chunk, spec))
            decisions.extend(self.candidate.rule.decide(rows))
        return decisions

    def _compare(self, frame: ClassifiedFrame) -> None:
        try:
            decisions = self.classify([crop.image for crop in frame.crops])
        except Exception as exc:  # the candidate's fault costs its comparison only
            with self._counts_lock:
                self.counts.failed += 1
                failed = self.counts.failed
            self._log_failure(
                "shadow_inference_failed", key=frame.item.key, error=str(exc), failed=failed
            )
            return
        comparison = compare_frame(frame, decisions)
        self._rows.append(
            (comparison, frame.item.key, frame.model.label, self.label, frame.classes)
        )

    def _flush(self) -> None:
        rows, self._rows = self._rows, []
        self._last_flush = time.monotonic()
        if not rows:
            return
        try:
            self.store.add_frames(rows, recorded_at=self._clock())
        except Exception as exc:  # a full disk costs the comparison, never the daemon
            with self._counts_lock:
                self.counts.failed += len(rows)
            self._log_failure("shadow_record_not_written", frames=len(rows), error=str(exc))
            return
        with self._counts_lock:
            self.counts.compared += len(rows)

    def score_labelled(self) -> int:
        """Classify the labelled review crops the candidate has not seen yet; returns how
        many it scored. A crop labelled "not a particle" is scored too (the report leaves
        it out of the accuracy, which counts class labels only)."""
        self._last_label_scoring = time.monotonic()
        if self.samples is None:
            return 0
        try:
            seen = set(self.store.labelled(self.label))
            calls: list[CandidateCall] = []
            after = 0
            while True:
                page = self.samples.labelled(after_id=after, limit=500)
                if not page:
                    break
                after = page[-1].id
                todo = [sample for sample in page if sample.id not in seen]
                images = [(s.id, self.samples.image(s.id)) for s in todo]
                present = [(i, image) for i, image in images if image is not None]
                if not present:
                    continue
                decisions = self.classify([image for _, image in present])
                calls.extend(
                    CandidateCall(i, d.label, d.status)
                    for (i, _), d in zip(present, decisions, strict=True)
                )
            if calls:
                self.store.add_labelled(self.label, calls, at=self._clock())
        except Exception as exc:
            self._log_failure("shadow_labelled_not_scored", error=str(exc))
            return 0
        with self._counts_lock:
            self.counts.labelled_scored += len(calls)
        return len(calls)

    def _log_failure(self, event: str, **context: Any) -> None:
        """At most one line every 10 s: a candidate that fails on every frame must not
        flood the journal."""
        now = time.monotonic()
        if now - self._last_failure_log >= 10.0:
            self._last_failure_log = now
            log.warning(event, candidate=self.label, **context)

    # -- for the view and the tests ----------------------------------------------------
    def status_counts(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(vars(self.counts))

    def status(self) -> dict[str, Any]:
        """What runs now, for /api/shadow's "running" block."""
        return {
            "candidate": self.label,
            "path": str(self.config.path),
            "share": self.config.share,
            "window_s": float(self.config.window),
            **self.status_counts(),
        }

    def wait_compared(self, count: int, timeout: float) -> bool:
        """For tests and the bench: wait until `count` frames are in the record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.status_counts()
            if counts["compared"] + counts["failed"] >= count:
                return True
            time.sleep(0.02)
        return False
