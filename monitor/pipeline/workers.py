"""The frame pipeline: decode -> quality gate -> sampling -> batcher, then the recorder.

Threads take frames from one bounded queue shared by all probes. Each hands a frame's
own work (decode, quality gate, sampling or segmentation, sizes, preprocessing: see
frame_work.py) to a worker process (process_pool.py; `batcher.processes = false` does
it on the thread itself), gives the prepared crops to the micro-batcher with a callback
and goes on to the next frame; the callback turns probabilities into counts and passes a
FrameOutcome to the recorder, which stores frames in small transactions and only then
feeds the aggregators, so what the windows show is always what the store holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import structlog

from monitor.config.settings import ProbeConfig
from monitor.manifest import InputSpec
from monitor.pipeline.active_model import ActiveModel
from monitor.pipeline.batcher import MicroBatcher
from monitor.pipeline.frame_queue import FrameQueue
from monitor.pipeline.frame_work import (
    FrameReadError,
    prepare_frame,
    probe_stages,
    read_frame,
)
from monitor.pipeline.outcome import (
    ClassifiedCrop,
    ClassifiedFrame,
    ClassifiedFrameObserver,
    FrameOutcome,
    ParticleBox,
    observe_all,
)
from monitor.pipeline.process_pool import FramePreparers, PreparedHandle, WorkerLostError
from monitor.sources.base import FrameItem

log = structlog.get_logger(__name__)

# A frame whose worker process died is tried once more; dying again, it is recorded as
# failed (it may be what kills them).
ATTEMPTS_PER_FRAME = 2
THREADS_PER_PROCESS = 2  # one frame in the worker, the next waiting behind it


def _release_nothing() -> None:
    pass


class Pipeline:
    def __init__(
        self,
        active: ActiveModel,
        probes: Sequence[ProbeConfig],
        batcher: MicroBatcher,
        frames: FrameQueue,
        on_outcome: Callable[[FrameOutcome], None],
        *,
        workers: int,
        processes: bool = False,
        slot_bytes: int = 16 << 20,
        observers: Sequence[ClassifiedFrameObserver] = (),
        batch_of: Callable[[str], str | None] = lambda probe: None,
    ) -> None:
        self._active = active
        self._classes = active.manifest.classes
        self._observers = tuple(observers)
        self._batch_of = batch_of
        self._stages = probe_stages(probes)
        self._batcher = batcher
        self._frames = frames
        self._on_outcome = on_outcome
        self._stop = threading.Event()
        self.pool = FramePreparers(workers, probes, slot_bytes=slot_bytes) if processes else None
        threads = max(1, workers) * (THREADS_PER_PROCESS if processes else 1)
        self._threads = [
            threading.Thread(target=self._work, name=f"frames-{i}", daemon=True)
            for i in range(threads)
        ]
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.last_progress = time.monotonic()

    def update_probes(self, probes: Sequence[ProbeConfig]) -> None:
        """New quality and sampling thresholds (a config reload); frames already in a
        worker finish with the old ones. One dict swap, so no lock is needed."""
        self._stages = probe_stages(probes)
        if self.pool is not None:
            self.pool.update_probes(probes)

    def set_observers(self, observers: Sequence[ClassifiedFrameObserver]) -> None:
        """Who sees the classified frames from now on (a reload starts or stops the
        shadow); a frame already in a worker may still reach the ones it replaces. One
        tuple swap, so no lock is needed."""
        self._observers = tuple(observers)

    @property
    def active(self) -> ActiveModel:
        return self._active

    def swap_model(self, active: ActiveModel) -> ActiveModel:
        """Classify frames taken from now on with `active`; returns the model it replaces.
        Frames already in a worker finish with the model they started with. The class
        list must not change: windows, alarms and published tags are built on it."""
        if active.manifest.classes != self._classes:
            raise ValueError(
                f"model classes {list(active.manifest.classes)} differ from the running "
                f"{list(self._classes)}"
            )
        previous, self._active = self._active, active
        return previous

    def start(self) -> None:
        if self.pool is not None:
            self.pool.start()
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float) -> bool:
        """Let workers finish the queued frames within `timeout`; True when all finished."""
        deadline = time.monotonic() + timeout
        while (self._frames.qsize() or self.in_flight) and time.monotonic() < deadline:
            time.sleep(0.02)
        drained = not (self._frames.qsize() or self.in_flight)
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if self.pool is not None:
            self.pool.stop(timeout=max(1.0, deadline - time.monotonic()))
        return drained

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _work(self) -> None:
        while not self._stop.is_set():
            item = self._frames.get(timeout=0.1)
            if item is None:
                continue
            with self._in_flight_lock:
                self._in_flight += 1
            try:
                self._process(item)
            except Exception as exc:  # one bad frame must never stop a worker
                log.exception("frame_failed", probe=item.probe, key=item.key)
                self._finish(FrameOutcome(item, "error", f"internal: {exc}", self._zeros(), 0))

    def _zeros(self) -> tuple[int, ...]:
        return (0,) * len(self._classes)

    def _finish(self, outcome: FrameOutcome) -> None:
        try:
            self._on_outcome(outcome)
        finally:
            self.last_progress = time.monotonic()
            with self._in_flight_lock:
                self._in_flight -= 1

    def _prepare(self, item: FrameItem, spec: InputSpec, with_crop_images: bool) -> PreparedHandle:
        """The frame's own work, in a worker process or here. Raises FrameReadError."""
        if self.pool is None:
            grey = read_frame(item.read)
            frame = prepare_frame(
                grey, self._stages[item.probe], spec, with_crop_images=with_crop_images
            )
            return PreparedHandle(frame, _release_nothing)
        if item.portable_read:
            return self.pool.prepare(
                item.probe, item.read, None, spec, with_crop_images=with_crop_images
            )
        grey = read_frame(item.read)  # read here (a simulator, a camera), pixels shared
        return self.pool.prepare(item.probe, None, grey, spec, with_crop_images=with_crop_images)

    def _prepared(
        self, item: FrameItem, spec: InputSpec, with_crop_images: bool
    ) -> PreparedHandle | None:
        """_prepare, with a lost worker's frame tried again; None once the frame has its
        outcome (unreadable, or the worker died on it each time) or is left to a retry."""
        for attempt in range(1, ATTEMPTS_PER_FRAME + 1):
            try:
                return self._prepare(item, spec, with_crop_images)
            except WorkerLostError as exc:
                if self._stop.is_set() or (self.pool is not None and self.pool.stopping):
                    self._abandon()  # stopping: not recorded, so read again at the next start
                    return None
                log.error(
                    "frame_worker_lost", probe=item.probe, key=item.key, attempt=attempt,
                    error=str(exc),
                )  # fmt: skip
                if attempt == ATTEMPTS_PER_FRAME:
                    reason = f"worker_lost: {exc} ({attempt} tries)"
                    self._finish(FrameOutcome(item, "error", reason, self._zeros(), 0))
            except FrameReadError as failed:
                self._unreadable(item, failed)
                return None
        return None

    def _unreadable(self, item: FrameItem, failed: FrameReadError) -> None:
        detail = failed.detail
        if item.retry is not None and failed.transient:
            if item.retry(failed.detail):
                self._abandon()  # the source delivers it again after a backoff
                return
            detail = f"{detail} (after {item.attempt} tries)"
        log.warning(
            "frame_unreadable", probe=item.probe, key=item.key, reason=failed.reason,
            detail=detail,
        )  # fmt: skip
        self._finish(FrameOutcome(item, "error", failed.reason, self._zeros(), 0))

    def _process(self, item: FrameItem) -> None:
        active = self._active  # one model for the whole frame, whenever a swap lands
        manifest = active.manifest
        rule = active.rule
        model = active.identity
        handle = self._prepared(item, manifest.input, with_crop_images=bool(self._observers))
        if handle is None:
            return
        frame = handle.frame
        if frame.status == "rejected" or not frame.boxes:
            handle.release()
            if frame.status == "rejected":
                outcome = FrameOutcome(item, "rejected", frame.reason, self._zeros(), 0)
            else:
                outcome = FrameOutcome(item, "ok", None, self._zeros(), 0)
            self._finish(outcome)
            return
        assert frame.tensors is not None
        grey = frame.grey

        def on_probabilities(rows: np.ndarray | None, error: str | None) -> None:
            handle.release()  # the batcher has read the tensors
            if rows is None:
                # Not recorded, so not journaled: the frame is tried again after a restart.
                log.error("frame_not_classified", probe=item.probe, key=item.key, error=error)
                self._abandon()
                return
            counts = [0] * len(manifest.classes)
            uncertain = ood = 0
            boxes = []
            decisions = rule.decide(rows)
            for bbox, decision, size in zip(frame.boxes, decisions, frame.sizes, strict=True):
                if decision.status == "ok":
                    counts[manifest.classes.index(decision.label)] += 1
                elif decision.reason == "out_of_distribution":
                    ood += 1
                else:
                    uncertain += 1
                boxes.append(
                    ParticleBox(
                        *bbox,
                        label=decision.label,
                        confidence=decision.confidence,
                        uncertain=decision.status != "ok",
                        out_of_distribution=decision.reason == "out_of_distribution",
                        size=size,
                    )
                )
            observers = self._observers  # one read: a reload may replace them meanwhile
            if observers and frame.crop_images is not None:
                classified = ClassifiedFrame(
                    item,
                    tuple(
                        ClassifiedCrop(image, bbox, row, decision)
                        for image, bbox, row, decision in zip(
                            frame.crop_images, frame.boxes, rows, decisions, strict=True
                        )
                    ),
                    manifest.classes,
                    model,
                    self._batch_of(item.probe),
                )
                observe_all(observers, classified)
            self._finish(
                FrameOutcome(
                    item,
                    "ok",
                    None,
                    tuple(counts),
                    uncertain,
                    n_ood=ood,
                    image=grey,
                    boxes=tuple(boxes),
                    model=model,
                )
            )

        if not self._batcher.submit(frame.tensors, on_probabilities, backend=active.backend):
            handle.release()
            self._abandon()  # shutting down: left for the next start

    def _abandon(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1
