"""The frame pipeline: decode -> quality gate -> sampling -> batcher, then the recorder.

Workers take frames from one bounded queue shared by all probes. A worker hands a
frame's crops to the micro-batcher with a callback and goes on to the next frame;
the callback turns probabilities into counts and passes a FrameOutcome to the
recorder, which stores frames in small transactions and only then feeds the
aggregators, so what the windows show is always what the store holds.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from monitor.config.settings import ProbeConfig, QualityConfig
from monitor.imaging.decode import DecodeError
from monitor.imaging.particle_size import ParticleSize, measure_mask
from monitor.imaging.preprocess import prepare_batch
from monitor.pipeline.active_model import ActiveModel
from monitor.pipeline.batcher import MicroBatcher
from monitor.pipeline.frame_queue import FrameQueue
from monitor.pipeline.outcome import (
    ClassifiedCrop,
    ClassifiedFrame,
    ClassifiedFrameObserver,
    FrameOutcome,
    ParticleBox,
    observe_all,
)
from monitor.pipeline.quality_gate import assess_frame
from monitor.pipeline.sampling import Sampler, create_sampler
from monitor.sources.base import FrameItem

log = structlog.get_logger(__name__)


# Reading may fail and then succeed: a descriptor limit reached for a moment, a share
# that answers EACCES or EIO while it reconnects, a lock held by the vendor software.
TRANSIENT_READ_ERRNOS = frozenset(
    {
        errno.EMFILE,
        errno.ENFILE,
        errno.EACCES,
        errno.EPERM,
        errno.EIO,
        errno.EAGAIN,
        errno.EBUSY,
        errno.ENOMEM,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.EINTR,
    }
)


def transient_read_error(exc: DecodeError) -> bool:
    """Whether a read failed for a passing cause (an OSError behind the DecodeError)."""
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno in TRANSIENT_READ_ERRNOS


@dataclass(frozen=True)
class _ProbeStages:
    quality: QualityConfig
    sampler: Sampler
    pixel_size_um: float | None


def _stages(probe: ProbeConfig) -> _ProbeStages:
    return _ProbeStages(probe.quality, create_sampler(probe), probe.pixel_size_um)


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
        observers: Sequence[ClassifiedFrameObserver] = (),
        batch_of: Callable[[str], str | None] = lambda probe: None,
    ) -> None:
        self._active = active
        self._classes = active.manifest.classes
        self._observers = tuple(observers)
        self._batch_of = batch_of
        self._stages = {probe.id: _stages(probe) for probe in probes}
        self._batcher = batcher
        self._frames = frames
        self._on_outcome = on_outcome
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"worker-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.last_progress = time.monotonic()

    def update_probes(self, probes: Sequence[ProbeConfig]) -> None:
        """New quality and sampling thresholds (a config reload); frames already in a
        worker finish with the old ones. One dict swap, so no lock is needed."""
        self._stages = {probe.id: _stages(probe) for probe in probes}

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

    def _process(self, item: FrameItem) -> None:
        stages = self._stages[item.probe]
        try:
            grey = item.read()
        except DecodeError as exc:
            if item.retry is not None and transient_read_error(exc):
                if item.retry(exc.detail):
                    self._abandon()  # the source delivers it again after a backoff
                    return
                exc = DecodeError(exc.reason, f"{exc.detail} (after {item.attempt} tries)")
            log.warning(
                "frame_unreadable",
                probe=item.probe,
                key=item.key,
                reason=exc.reason,
                detail=exc.detail,
            )
            self._finish(FrameOutcome(item, "error", exc.reason, self._zeros(), 0))
            return
        verdict = assess_frame(grey, stages.quality)
        if not verdict.accepted:
            self._finish(FrameOutcome(item, "rejected", verdict.reason, self._zeros(), 0))
            return
        crops = stages.sampler.sample(grey)
        if not crops:
            self._finish(FrameOutcome(item, "ok", None, self._zeros(), 0))
            return
        active = self._active  # one model for the whole frame, whenever a swap lands
        manifest = active.manifest
        rule = active.rule
        model = active.identity
        tensors = prepare_batch([crop.image for crop in crops], manifest.input)
        # Measured here, on the worker, once per crop from the sampler's mask (a view of
        # the frame's pixels, nothing copied), while the batcher waits for more crops.
        sizes: list[ParticleSize | None] = [
            None if crop.mask is None else measure_mask(crop.mask, stages.pixel_size_um)
            for crop in crops
        ]

        def on_probabilities(rows: np.ndarray | None, error: str | None) -> None:
            if rows is None:
                # Not recorded, so not journaled: the frame is tried again after a restart.
                log.error("frame_not_classified", probe=item.probe, key=item.key, error=error)
                self._abandon()
                return
            counts = [0] * len(manifest.classes)
            uncertain = ood = 0
            boxes = []
            decisions = rule.decide(rows)
            for crop, decision, size in zip(crops, decisions, sizes, strict=True):
                if decision.status == "ok":
                    counts[manifest.classes.index(decision.label)] += 1
                elif decision.reason == "out_of_distribution":
                    ood += 1
                else:
                    uncertain += 1
                boxes.append(
                    ParticleBox(
                        *crop.bbox,
                        label=decision.label,
                        confidence=decision.confidence,
                        uncertain=decision.status != "ok",
                        out_of_distribution=decision.reason == "out_of_distribution",
                        size=size,
                    )
                )
            observers = self._observers  # one read: a reload may replace them meanwhile
            if observers:
                classified = ClassifiedFrame(
                    item,
                    tuple(
                        ClassifiedCrop(crop.image, crop.bbox, row, decision)
                        for crop, row, decision in zip(crops, rows, decisions, strict=True)
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

        if not self._batcher.submit(tensors, on_probabilities, backend=active.backend):
            self._abandon()  # shutting down: left for the next start

    def _abandon(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1
