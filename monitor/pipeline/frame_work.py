"""A frame's own work: quality gate, sampling, sizes and the model's input tensors.

Everything a frame needs before inference and nothing that needs the daemon: no queue,
no clock, no model. It runs in a worker process (monitor/pipeline/process_pool.py) or,
with `batcher.processes = false`, on a thread of the daemon. Where its arrays go is
the caller's: `Allocate` hands out memory for each (a slot of shared memory in a worker
process, plain numpy memory on a thread).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from monitor.config.settings import ProbeConfig, QualityConfig
from monitor.imaging.decode import DecodeError
from monitor.imaging.particle_size import ParticleSize, measure_mask
from monitor.imaging.preprocess import prepare_batch
from monitor.manifest import InputSpec
from monitor.pipeline.quality_gate import assess_frame
from monitor.pipeline.sampling import Sampler, create_sampler

Box = tuple[int, int, int, int]
Allocate = Callable[[tuple[int, ...], "np.dtype[np.generic] | type"], np.ndarray]


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


class FrameReadError(Exception):
    """A frame could not be read: the DecodeError's reason and detail, and whether an
    OSError of a passing kind lay behind it (the source may deliver it again)."""

    def __init__(self, reason: str, detail: str, transient: bool) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.transient = transient

    @classmethod
    def of(cls, exc: DecodeError) -> FrameReadError:
        cause = exc.__cause__
        transient = isinstance(cause, OSError) and cause.errno in TRANSIENT_READ_ERRNOS
        return cls(exc.reason, exc.detail, transient)


def read_frame(read: Callable[[], np.ndarray]) -> np.ndarray:
    """`read()`, its DecodeError as FrameReadError (which crosses a process boundary)."""
    try:
        return read()
    except DecodeError as exc:
        raise FrameReadError.of(exc) from exc


def allocate_in_process(shape: tuple[int, ...], dtype: np.dtype[np.generic] | type) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


@dataclass(frozen=True)
class ProbeStages:
    """A probe's thresholds, as the last config (re)load set them."""

    quality: QualityConfig
    sampler: Sampler
    pixel_size_um: float | None


def probe_stages(probes: Sequence[ProbeConfig]) -> dict[str, ProbeStages]:
    return {
        probe.id: ProbeStages(probe.quality, create_sampler(probe), probe.pixel_size_um)
        for probe in probes
    }


@dataclass(frozen=True)
class PreparedFrame:
    """A frame ready for the batcher, or why it is not.

    `status` "rejected" carries the quality gate's reason; "ok" carries the crops'
    tensors (N, 3, S, S), boxes and sizes, and their images when asked for (the review
    queue and the shadow keep them). `grey` is the decoded frame (the dashboard's latest
    frame) on both.
    """

    status: Literal["rejected", "ok"]
    reason: str | None
    grey: np.ndarray
    tensors: np.ndarray | None = None
    boxes: tuple[Box, ...] = ()
    sizes: tuple[ParticleSize | None, ...] = ()
    crop_images: tuple[np.ndarray, ...] | None = None


def prepare_frame(
    grey: np.ndarray,
    stages: ProbeStages,
    spec: InputSpec,
    *,
    with_crop_images: bool,
    allocate: Allocate = allocate_in_process,
) -> PreparedFrame:
    verdict = assess_frame(grey, stages.quality)
    if not verdict.accepted:
        return PreparedFrame("rejected", verdict.reason, grey)
    crops = stages.sampler.sample(grey)
    tensors = prepare_batch(
        [crop.image for crop in crops],
        spec,
        out=allocate((len(crops), 3, spec.size, spec.size), np.float32),
    )
    # Measured from the sampler's mask (a view of the frame's pixels, nothing copied).
    sizes = tuple(
        None if crop.mask is None else measure_mask(crop.mask, stages.pixel_size_um)
        for crop in crops
    )
    images = None
    if with_crop_images:
        images = tuple(
            crop.image if allocate is allocate_in_process else _placed(crop.image, allocate)
            for crop in crops
        )
    return PreparedFrame(
        "ok", None, grey, tensors, tuple(crop.bbox for crop in crops), sizes, images
    )


def _placed(image: np.ndarray, allocate: Allocate) -> np.ndarray:
    placed = allocate(image.shape, image.dtype)
    if placed is not image:
        placed[...] = image
    return placed
