"""The frame pipeline: decode -> quality gate -> sampling -> batcher, then the recorder.

Threads take frames from one bounded queue shared by all probes. Each hands a frame's
own work (decode, quality gate, sampling or segmentation, sizes, preprocessing: see
frame_work.py) to a worker process (process_pool.py; `batcher.processes = false` does
it on the thread itself), gives the prepared crops to the micro-batcher with a callback
and goes on to the next frame; the callback turns probabilities into counts and passes
FrameOutcomes to the recorder, which stores frames in small transactions and only then
feeds the aggregators, so what the windows show is always what the store holds.

When frames queue up (a folder of crop files), a thread takes several at once: one
message to a worker process, one request to the batcher, one callback deciding all
their crops and one hand-over to the recorder for the group, so the per-frame Python
is paid per group. An idle pipeline still takes frames one by one, never waiting for a
group to fill.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import structlog

from monitor.config.settings import ProbeConfig
from monitor.inference.decision import Decision
from monitor.manifest import InputSpec, ModelIdentity
from monitor.pipeline.active_model import ActiveModel
from monitor.pipeline.batcher import MicroBatcher
from monitor.pipeline.frame_queue import FrameQueue
from monitor.pipeline.frame_work import (
    FrameReadError,
    PreparedFrame,
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
from monitor.pipeline.process_pool import (
    FramePreparers,
    FrameRequest,
    FrameResult,
    PreparedGroup,
    WorkerLostError,
)
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
        on_outcomes: Callable[[Sequence[FrameOutcome]], None],
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
        self._on_outcomes = on_outcomes
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

    def _group_limit(self) -> int:
        """Frames a thread takes at once: a group per worker message with processes,
        one at a time on threads (their frames are not in slots, so nothing bounds a
        group's memory but its count)."""
        return 1 if self.pool is None else self.pool.group_limit()

    def _work(self) -> None:
        while not self._stop.is_set():
            items = self._frames.get_many(self._group_limit(), timeout=0.1)
            if not items:
                continue
            with self._in_flight_lock:
                self._in_flight += len(items)
            group = _Group(items)
            try:
                self._process(group, items)
            except Exception as exc:  # one bad frame must never stop a worker
                log.exception(
                    "frame_failed", probe=items[0].probe, keys=[i.key for i in group.waiting]
                )
                self._finish(
                    [
                        FrameOutcome(item, "error", f"internal: {exc}", self._zeros(), 0)
                        for item in group.take_all()
                    ]
                )

    def _zeros(self) -> tuple[int, ...]:
        return (0,) * len(self._classes)

    def _finish(self, outcomes: Sequence[FrameOutcome]) -> None:
        if not outcomes:
            return
        try:
            self._on_outcomes(outcomes)
        finally:
            self.last_progress = time.monotonic()
            with self._in_flight_lock:
                self._in_flight -= len(outcomes)

    def _abandon(self, count: int = 1) -> None:
        """Frames that leave without an outcome (read again later)."""
        with self._in_flight_lock:
            self._in_flight -= count

    def _prepare(
        self, items: Sequence[FrameItem], spec: InputSpec, with_crop_images: bool
    ) -> PreparedGroup:
        """The frames' own work, in a worker process (one message for the group) or here.
        Raises WorkerLostError."""
        if self.pool is None:
            return PreparedGroup(
                [self._prepare_here(item, spec, with_crop_images) for item in items],
                _release_nothing,
            )
        results: list[FrameResult | None] = []
        requests = []
        for item in items:
            if item.portable_read:
                requests.append(FrameRequest(item.probe, item.read))
                results.append(None)
                continue
            try:  # read here (a simulator, a camera), pixels shared
                grey = read_frame(item.read)
            except FrameReadError as failed:
                results.append(failed)
            else:
                requests.append(FrameRequest(item.probe, None, grey))
                results.append(None)
        if not requests:
            return PreparedGroup([r for r in results if r is not None], _release_nothing)
        group = self.pool.prepare_group(requests, spec, with_crop_images=with_crop_images)
        answers = iter(group.results)
        return PreparedGroup([next(answers) if r is None else r for r in results], group.release)

    def _prepare_here(
        self, item: FrameItem, spec: InputSpec, with_crop_images: bool
    ) -> FrameResult:
        try:
            grey = read_frame(item.read)
        except FrameReadError as failed:
            return failed
        return prepare_frame(
            grey, self._stages[item.probe], spec, with_crop_images=with_crop_images
        )

    def _worker_lost(
        self, group: _Group, items: list[FrameItem], exc: WorkerLostError, attempt: int
    ) -> bool:
        """Frames whose worker died on them: True when they are to be tried again; else
        they are left for the next start (stopping) or recorded as failed (last try)."""
        if self._stop.is_set() or (self.pool is not None and self.pool.stopping):
            group.leave(items)  # stopping: not recorded, so read again at the next start
            self._abandon(len(items))
            return False
        for item in items:
            log.error(
                "frame_worker_lost", probe=item.probe, key=item.key, attempt=attempt,
                error=str(exc),
            )  # fmt: skip
        if attempt < ATTEMPTS_PER_FRAME:
            return True
        group.leave(items)
        reason = f"worker_lost: {exc} ({attempt} tries)"
        self._finish([FrameOutcome(item, "error", reason, self._zeros(), 0) for item in items])
        return False

    def _unreadable(self, item: FrameItem, failed: FrameReadError) -> list[FrameOutcome]:
        """The frame's error outcome, or none when its source delivers it again."""
        detail = failed.detail
        if item.retry is not None and failed.transient:
            if item.retry(failed.detail):
                self._abandon()  # the source delivers it again after a backoff
                return []
            detail = f"{detail} (after {item.attempt} tries)"
        log.warning(
            "frame_unreadable", probe=item.probe, key=item.key, reason=failed.reason,
            detail=detail,
        )  # fmt: skip
        return [FrameOutcome(item, "error", failed.reason, self._zeros(), 0)]

    def _process(self, group: _Group, items: list[FrameItem], attempt: int = 1) -> None:
        """Prepare `items` together, record those with nothing to classify and hand the
        crops of the others to the batcher in one request. A group whose worker died is
        tried again frame by frame, so a frame that kills workers takes only itself down
        (and each frame holds a slot only while it is its own group's turn)."""
        active = self._active  # one model for the whole group, whenever a swap lands
        manifest = active.manifest
        try:
            prepared = self._prepare(items, manifest.input, bool(self._observers))
        except WorkerLostError as exc:
            if self._worker_lost(group, items, exc, attempt):
                for item in items:
                    self._process(group, [item], attempt + 1)
            return
        done: list[FrameOutcome] = []
        classify: list[tuple[FrameItem, PreparedFrame]] = []
        for item, result in zip(items, prepared.results, strict=True):
            if isinstance(result, FrameReadError):
                done += self._unreadable(item, result)
            elif isinstance(result, Exception):
                log.error("frame_failed", probe=item.probe, key=item.key, error=str(result))
                done.append(FrameOutcome(item, "error", f"internal: {result}", self._zeros(), 0))
            elif result.status == "rejected":
                done.append(FrameOutcome(item, "rejected", result.reason, self._zeros(), 0))
            elif not result.boxes:
                done.append(FrameOutcome(item, "ok", None, self._zeros(), 0))
            else:
                classify.append((item, result))
        handed_on = {id(item) for item, _ in classify}
        group.leave([item for item in items if id(item) not in handed_on])  # settled here
        self._finish(done)
        if not classify:
            prepared.release()
            return
        if len(classify) == 1:
            tensors = classify[0][1].tensors
            assert tensors is not None
        else:
            tensors = np.concatenate([frame.tensors for _, frame in classify])
            prepared.release()  # a copy: the slot can go back at once
        rule, model = active.rule, active.identity

        def on_probabilities(rows: np.ndarray | None, error: str | None) -> None:
            prepared.release()  # the batcher has read the tensors (a second call is a no-op)
            if rows is None:
                # Not recorded, so not journaled: the frames are tried again after a restart.
                for item, _ in classify:
                    log.error("frame_not_classified", probe=item.probe, key=item.key, error=error)
                self._abandon(len(classify))
                return
            decisions = rule.decide(rows)  # once for the group's crops
            outcomes = []
            start = 0
            for item, frame in classify:
                end = start + len(frame.boxes)
                outcomes.append(
                    self._classified(item, frame, rows[start:end], decisions[start:end], model)
                )
                start = end
            self._finish(outcomes)

        group.leave([item for item, _ in classify])
        if not self._batcher.submit(tensors, on_probabilities, backend=active.backend):
            prepared.release()
            self._abandon(len(classify))  # shutting down: left for the next start

    def _classified(
        self,
        item: FrameItem,
        frame: PreparedFrame,
        rows: np.ndarray,
        decisions: Sequence[Decision],
        model: ModelIdentity,
    ) -> FrameOutcome:
        """One frame's outcome from its crops' rows and decisions; its observers see it."""
        classes = self._classes
        counts = [0] * len(classes)
        uncertain = ood = 0
        boxes = []
        for bbox, decision, size in zip(frame.boxes, decisions, frame.sizes, strict=True):
            if decision.status == "ok":
                counts[classes.index(decision.label)] += 1
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
                classes,
                model,
                self._batch_of(item.probe),
            )
            observe_all(observers, classified)
        return FrameOutcome(
            item,
            "ok",
            None,
            tuple(counts),
            uncertain,
            n_ood=ood,
            image=frame.grey,
            boxes=tuple(boxes),
            model=model,
        )


class _Group:
    """The frames a thread took together. `waiting` holds those with no outcome yet
    that were not handed to the batcher: what a failure midway must still finish."""

    def __init__(self, items: Sequence[FrameItem]) -> None:
        self.waiting = list(items)

    def leave(self, items: Sequence[FrameItem]) -> None:
        gone = {id(item) for item in items}
        self.waiting = [item for item in self.waiting if id(item) not in gone]

    def take_all(self) -> list[FrameItem]:
        items, self.waiting = self.waiting, []
        return items
