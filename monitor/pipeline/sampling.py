"""Sampling: cut the crops the classifier sees out of a decoded frame.

`whole`: the file is already one particle crop (as in the public dataset).
`particles`: segment the frame (background correction, threshold, connected
components, size and per-object focus filters) and crop each particle with a margin.
`tiles`: fixed tiles on a grid, for slurries too dense to segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from monitor.config.settings import ParticlesConfig, ProbeConfig, TilesConfig

_WORK_SCALE = 4  # background and mask are computed on a 4x smaller copy: ~16x less work


@dataclass(frozen=True)
class Crop:
    image: np.ndarray  # 2-D uint8
    bbox: tuple[int, int, int, int]  # x, y, w, h in frame pixels
    mask: np.ndarray | None = None
    """The particle's own pixels within `bbox` (h x w, non-zero = particle, at frame
    resolution), from which its size is measured; None where the sampler has no object
    (tiles)."""


class Sampler(Protocol):
    def sample(self, grey: np.ndarray) -> list[Crop]: ...


class WholeImageSampler:
    def sample(self, grey: np.ndarray) -> list[Crop]:
        return [Crop(grey, (0, 0, grey.shape[1], grey.shape[0]))]


class TileSampler:
    def __init__(self, config: TilesConfig) -> None:
        self._size = config.size
        self._stride = config.stride

    def sample(self, grey: np.ndarray) -> list[Crop]:
        height, width = grey.shape
        size = min(self._size, height, width)
        crops = []
        for y in range(0, height - size + 1, self._stride):
            for x in range(0, width - size + 1, self._stride):
                crops.append(Crop(grey[y : y + size, x : x + size], (x, y, size, size)))
        return crops


class ParticleSampler:
    """Finds bright particles on a dark, unevenly lit background."""

    def __init__(self, config: ParticlesConfig) -> None:
        self._config = config
        self._close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))

    def find_particles(self, grey: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Boxes (x, y, w, h) of in-focus particles, largest first."""
        config = self._config
        height, width = grey.shape
        small = cv2.resize(
            grey, (width // _WORK_SCALE, height // _WORK_SCALE), interpolation=cv2.INTER_AREA
        )
        # Illumination and out-of-focus haze vary slowly: a median over ~240 px follows
        # them but not the particles, which are smaller.
        tiny = cv2.resize(small, (width // 16, height // 16), interpolation=cv2.INTER_AREA)
        background = cv2.resize(
            cv2.medianBlur(tiny, 9),
            (small.shape[1], small.shape[0]),
            interpolation=cv2.INTER_LINEAR,
        )
        raw_mask = (cv2.subtract(small, background) > config.threshold).astype(np.uint8)
        # Closing joins the needles of a bundle and the grains of an agglomerate.
        mask = cv2.morphologyEx(raw_mask, cv2.MORPH_CLOSE, self._close)
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        scale2 = _WORK_SCALE * _WORK_SCALE
        boxes = []
        for index in range(1, count):
            x, y, w, h, area = (int(v) for v in stats[index])
            if not config.min_area <= area * scale2 <= config.max_area:
                continue
            box = (x * _WORK_SCALE, y * _WORK_SCALE, w * _WORK_SCALE, h * _WORK_SCALE)
            if config.min_focus > 0 and _object_focus(grey, box) < config.min_focus:
                continue
            boxes.append((area, box))
        boxes.sort(reverse=True)
        return [box for _, box in boxes[: config.max_per_frame]]

    def sample(self, grey: np.ndarray) -> list[Crop]:
        return [
            Crop(_square_crop(grey, box, self._config.margin), box)
            for box in self.find_particles(grey)
        ]


def _object_focus(grey: np.ndarray, box: tuple[int, int, int, int]) -> float:
    x, y, w, h = box
    _, std = cv2.meanStdDev(cv2.Laplacian(grey[y : y + h, x : x + w], cv2.CV_32F))
    return float(std[0, 0]) ** 2


def _square_crop(grey: np.ndarray, box: tuple[int, int, int, int], margin: float) -> np.ndarray:
    """A square crop centred on the particle, like the single-particle crops models train on."""
    x, y, w, h = box
    side = int(max(w, h) * (1 + 2 * margin))
    cx, cy = x + w // 2, y + h // 2
    height, width = grey.shape
    side = min(side, height, width)
    left = min(max(0, cx - side // 2), width - side)
    top = min(max(0, cy - side // 2), height - side)
    return grey[top : top + side, left : left + side]


def create_sampler(probe: ProbeConfig) -> Sampler:
    if probe.sampling == "particles":
        return ParticleSampler(probe.particles)
    if probe.sampling == "tiles":
        return TileSampler(probe.tiles)
    return WholeImageSampler()
