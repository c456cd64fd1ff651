"""What became of a frame: the pipeline's output, the recorder's input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from monitor.sources.base import FrameItem


@dataclass(frozen=True)
class ParticleBox:
    """Where one classified crop sat in its frame, for the dashboard's overlay."""

    x: int
    y: int
    w: int
    h: int
    label: str
    confidence: float
    uncertain: bool
    out_of_distribution: bool = False


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
