"""What the daemon keeps per probe between stages: its windows, its newest frames and
its input quality as of the last publish tick."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from monitor.aggregate import FrameRecord, SizeUnit, WindowAggregator
from monitor.alarms import Quality
from monitor.config.settings import ProbeConfig, Settings
from monitor.manifest import ModelIdentity, ModelManifest
from monitor.pipeline.outcome import FrameOutcome, ParticleBox
from monitor.store import Store

log = structlog.get_logger(__name__)

# Classified frames kept per probe for the dashboard's strip of recent frames. Each is a
# reference to the array the worker already decoded (nothing is copied or encoded on the
# hot path), so a probe holds up to RECENT_FRAMES x one frame in memory: 8 x 1.4 MB for
# 1360 x 1024 8-bit frames. JPEGs are encoded only when the dashboard asks for them.
RECENT_FRAMES = 8


@dataclass(frozen=True)
class LatestFrame:
    """One of the probe's recent classified frames, for the dashboard."""

    ts: float
    key: str
    image: np.ndarray  # 2-D uint8, as decoded
    boxes: tuple[ParticleBox, ...]


def frame_record(
    outcome: FrameOutcome, classes: Sequence[str] = (), size_unit: SizeUnit | None = None
) -> FrameRecord:
    """What the windows count of one stored frame. Its confident particles' sizes go into
    the size distributions when they are in `size_unit` (the probe's, fixed for a run)."""
    sizes = tuple(
        (classes.index(box.label), box.size.ecd, box.size.aspect_ratio)
        for box in outcome.boxes
        if not box.uncertain and box.size is not None and box.size.unit == size_unit
    )
    return FrameRecord(
        ts=outcome.item.ts,
        class_counts=outcome.class_counts,
        n_uncertain=outcome.n_uncertain,
        n_ood=outcome.n_ood,
        rejected_reason=None if outcome.status == "ok" else outcome.reason or outcome.status,
        sizes=sizes,
    )


def size_unit_of(probe: ProbeConfig) -> SizeUnit:
    """The unit a probe's sizes are measured in: micrometres with its calibration."""
    return "px" if probe.pixel_size_um is None else "um"


@dataclass
class ModelSpan:
    """Frames of one model in a row, by frame time: a swap starts a new span."""

    model: ModelIdentity
    first_ts: float
    last_ts: float


def models_in_window(spans: Sequence[ModelSpan], start: float) -> list[ModelIdentity]:
    """The models whose frames fall at or after `start` (a window's beginning), oldest
    first, each once."""
    models: list[ModelIdentity] = []
    for span in spans:
        if span.last_ts >= start and span.model not in models:
            models.append(span.model)
    return models


# Spans kept per probe: a swap a minute for an hour is far more than any plant does.
MAX_MODEL_SPANS = 64


@dataclass
class ProbeState:
    """One probe's live state. Every field but `config` is read and written under `lock`."""

    config: ProbeConfig
    aggregator: WindowAggregator
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_frame_ts: float | None = None
    quality: Quality | None = None
    """As the alarm engine rated the input at the last publish tick (None before it)."""
    # The last RECENT_FRAMES classified frames, oldest first (see RECENT_FRAMES for memory).
    recent_frames: deque[LatestFrame] = field(default_factory=lambda: deque(maxlen=RECENT_FRAMES))
    # Which model classified the counted frames, by frame time (a window spanning a
    # model swap says so), oldest first.
    model_spans: deque[ModelSpan] = field(default_factory=lambda: deque(maxlen=MAX_MODEL_SPANS))

    def add(self, outcome: FrameOutcome) -> FrameRecord:
        """Count a stored frame in the windows; keep it for the dashboard if classified."""
        aggregator = self.aggregator
        record = frame_record(outcome, aggregator.classes, aggregator.size_unit)
        with self.lock:
            self.aggregator.add(record)
            self.last_frame_ts = max(self.last_frame_ts or record.ts, record.ts)
            if outcome.model is not None:
                self._note_model(outcome.model, record.ts)
            if outcome.image is not None:  # a reference; the deque drops the oldest
                self.recent_frames.append(
                    LatestFrame(record.ts, outcome.item.key, outcome.image, outcome.boxes)
                )
        return record

    def _note_model(self, model: ModelIdentity, ts: float) -> None:
        """Extend the newest span, or start one when the model changed (under `lock`)."""
        newest = self.model_spans[-1] if self.model_spans else None
        if newest is not None and newest.model == model:
            newest.first_ts = min(newest.first_ts, ts)
            newest.last_ts = max(newest.last_ts, ts)
        else:
            self.model_spans.append(ModelSpan(model, ts, ts))

    def snapshot(self, now: float) -> tuple[dict[str, Any], float | None]:
        """(window snapshot as JSON, newest frame time), read together. Each window names
        the models whose frames it counts (`models`, `spans_model_swap`)."""
        with self.lock:
            snapshot = self.aggregator.snapshot(now).to_json()
            spans = list(self.model_spans)
            last_frame_ts = self.last_frame_ts
        for seconds, window in snapshot["windows"].items():
            models = models_in_window(spans, now - float(seconds))
            window["models"] = [model.to_json() for model in models]
            window["spans_model_swap"] = len(models) > 1
        snapshot["model"] = spans[-1].model.to_json() if spans else None
        return snapshot, last_frame_ts

    def newest_first(self) -> list[LatestFrame]:
        """The recent frames, newest first by frame time (a copy of the references)."""
        with self.lock:
            frames = list(self.recent_frames)
        frames.reverse()  # the newest recorded first; the stable sort keeps that among equal times
        frames.sort(key=lambda frame: frame.ts, reverse=True)
        return frames


def create_probe_states(
    settings: Settings, manifest: ModelManifest, store: Store, now: float
) -> dict[str, ProbeState]:
    """A state per configured probe, its windows refilled from the store so a restart
    does not blank the trend."""
    states = {}
    for probe in settings.probes:
        aggregator = WindowAggregator(
            manifest.classes,
            windows_s=settings.aggregation.windows,
            confusion_matrix=manifest.validation.confusion_matrix,
            ewma_halflife_s=settings.aggregation.ewma_halflife,
            size_unit=size_unit_of(probe),
        )
        state = ProbeState(probe, aggregator)
        _restore_windows(state, store, manifest.classes, now - max(settings.aggregation.windows))
        states[probe.id] = state
    return states


def _restore_windows(state: ProbeState, store: Store, classes: Sequence[str], since: float) -> None:
    probe = state.config.id
    current = store.current_batch(probe)
    if current is not None:
        state.aggregator.start_batch(current[0], current[1])
        since = max(since, current[1])
    restored = 0
    unit = state.aggregator.size_unit
    for row in store.frames_since(probe, since, particles=True):
        if current is not None and row.batch != current[0]:
            continue
        ok = row.status == "ok"
        state.aggregator.add(
            FrameRecord(
                ts=row.ts,
                class_counts=tuple(row.counts.get(name, 0) for name in classes),
                n_uncertain=row.n_uncertain,
                n_ood=row.n_ood,
                rejected_reason=None if ok else row.reason or row.status,
                # Sizes in another unit (a pixel size set or removed since) are left out.
                sizes=tuple(
                    (classes.index(p.label), p.size.ecd, p.size.aspect_ratio)
                    for p in row.particles
                    if ok
                    and p.status == "ok"
                    and p.size is not None
                    and p.size.unit == unit
                    and p.label in classes
                ),
            )
        )
        if row.model is not None:
            state._note_model(ModelIdentity(**row.model), row.ts)
        restored += 1
    if restored:
        log.info("windows_restored", probe=probe, frames=restored)
