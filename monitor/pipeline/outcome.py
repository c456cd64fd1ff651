"""What became of a frame: the pipeline's output, the recorder's input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import structlog

from monitor.imaging.particle_size import ParticleSize
from monitor.inference.decision import Decision
from monitor.manifest import ModelIdentity
from monitor.sources.base import FrameItem

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ParticleBox:
    """Where one classified crop sat in its frame (the dashboard's overlay), what the
    model made of it and the particle's size (stored per particle, counted in the
    windows' size distributions when the call is confident)."""

    x: int
    y: int
    w: int
    h: int
    label: str
    confidence: float
    uncertain: bool
    out_of_distribution: bool = False
    size: ParticleSize | None = None
    """Measured from the sampler's mask on the worker; None where the crop has no
    segmented object (tiles) or the sampler gave no mask."""

    @property
    def status(self) -> str:
        """ "ok" (counted in its class) or "uncertain" (low confidence or out of
        distribution)."""
        return "uncertain" if self.uncertain else "ok"

    @property
    def reason(self) -> str | None:
        """Why an uncertain call is uncertain: "out_of_distribution" or "low_confidence"."""
        if self.out_of_distribution:
            return "out_of_distribution"
        return "low_confidence" if self.uncertain else None


@dataclass(frozen=True)
class FrameOutcome:
    """What became of one frame: classified counts, or why it was not classified.

    `image` and `boxes` are kept only on classified frames so the daemon can show the
    latest one; they are references to arrays the worker decoded anyway, not copies.
    """

    item: FrameItem
    status: str  # "ok", "rejected" (quality gate) or "error" (unreadable, inference failed)
    reason: str | None
    class_counts: tuple[int, ...]
    n_uncertain: int
    n_ood: int = 0
    """Particles the model rejected as out of distribution (not counted as uncertain)."""
    image: np.ndarray | None = None
    boxes: tuple[ParticleBox, ...] = ()
    model: ModelIdentity | None = None
    """The model that classified the frame; None when no model saw it (rejected, unreadable)."""


@dataclass(frozen=True)
class ClassifiedCrop:
    """One crop as the model saw it, with what the model made of it."""

    image: np.ndarray
    """The 2-D uint8 crop cut out of the frame (before the model's preprocessing)."""
    bbox: tuple[int, int, int, int]
    row: np.ndarray
    """The model's output row: class probabilities, then the OOD score where it has one."""
    decision: Decision


@dataclass(frozen=True)
class ClassifiedFrame:
    """A frame's crops with the live model's decisions, for the stages that look beside
    the counting (the review queue, the shadow model). Built on a worker thread."""

    item: FrameItem
    crops: tuple[ClassifiedCrop, ...]
    classes: tuple[str, ...]
    model: ModelIdentity
    batch: str | None = None


class ClassifiedFrameObserver(Protocol):
    """Gets every classified frame from a pipeline worker. `observe` must return at once
    (queue the work, count what it cannot take): the counting never waits on it."""

    def observe(self, frame: ClassifiedFrame) -> None: ...


def observe_all(observers: Sequence[ClassifiedFrameObserver], frame: ClassifiedFrame) -> None:
    """Hand a frame to each observer; one failing observer cannot stop the others."""
    for observer in observers:
        try:
            observer.observe(frame)
        except Exception:  # an observer's fault must never cost a frame its count
            log.exception(
                "frame_observer_failed", observer=type(observer).__name__, key=frame.item.key
            )
