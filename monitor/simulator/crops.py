"""Crop mode: single-particle images like the public OpenCrystalData crops.

A crop is what a segmenter cuts out of a frame: one particle centred on a patch
of probe background (the same lighting, haze and noise as frame mode), with bits
of neighbours cut by the edges and sometimes out of focus.

Crop height and aspect ratio come from one distribution for both classes, drawn
before the class is looked at. The public dataset has every CEX crop at 151 x
151 px and PG crops of varied size; copying that would let a model learn the
label from the shape alone.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from monitor.simulator.background import (
    IlluminationModel,
    NoiseBank,
    add_sensor_noise,
    draw_slurry_haze,
    to_uint8,
)
from monitor.simulator.labels import CEX, LABELS
from monitor.simulator.particles import draw_agglomerate, draw_needle_bundle

# Crop side (height) in pixels and width/height ratio, for both classes alike.
CROP_SIDE_RANGE = (130, 230)
CROP_ASPECT_RANGE = (0.85, 1.2)
# The frame a crop is imagined to come from, for its lighting.
VIRTUAL_FRAME = (1024, 1360)


class CropSimulator:
    """Renders single-particle crops of either class, deterministically under a seed.

    defocus_share is the share of crops whose main particle is out of focus;
    neighbour_rate the mean number of neighbouring particles cut by the edges.
    """

    def __init__(
        self,
        seed: int,
        *,
        defocus_share: float = 0.2,
        neighbour_rate: float = 4.0,
    ) -> None:
        if not 0.0 <= defocus_share <= 1.0:
            raise ValueError(f"defocus_share must be between 0 and 1, got {defocus_share}")
        if neighbour_rate < 0.0:
            raise ValueError(f"neighbour_rate must be >= 0, got {neighbour_rate}")
        self._rng = np.random.default_rng(seed)
        # One probe's lighting, computed once; each crop takes a window of it
        # with its own gain, as crops come from many frames and batches.
        self._lighting = IlluminationModel(self._rng, *VIRTUAL_FRAME)
        max_width = math.ceil(CROP_SIDE_RANGE[1] * CROP_ASPECT_RANGE[1]) + 1
        self._noise = NoiseBank(self._rng, CROP_SIDE_RANGE[1], max_width)
        self.defocus_share = defocus_share
        self.neighbour_rate = neighbour_rate

    def draw_size(self) -> tuple[int, int]:
        """(height, width) of the next crop, from the class-independent distribution."""
        side = int(self._rng.integers(CROP_SIDE_RANGE[0], CROP_SIDE_RANGE[1] + 1))
        aspect = float(self._rng.uniform(*CROP_ASPECT_RANGE))
        return side, max(8, round(side * aspect))

    def render(self, label: str) -> npt.NDArray[np.uint8]:
        """One crop (uint8, height x width) whose centred particle is of class `label`."""
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}")
        height, width = self.draw_size()
        rng = self._rng
        frame_h, frame_w = VIRTUAL_FRAME
        top = int(rng.integers(0, frame_h - height))
        left = int(rng.integers(0, frame_w - width))
        canvas = self._lighting.render(top, left, height, width)
        canvas *= np.float32(rng.uniform(0.8, 1.25))
        # Crops are cut where particles are, which is where the slurry is thick.
        draw_slurry_haze(canvas, rng, float(rng.uniform(0.6, 1.5)))

        side = min(height, width)
        # Some neighbours lie in front of the particle (needles across a PG
        # agglomerate are common in the real crops), the rest behind it.
        in_front = rng.random(int(rng.poisson(self.neighbour_rate))) < 0.35
        for _ in range(int(np.count_nonzero(~in_front))):
            self._draw_neighbour(canvas, side)

        centre = (
            width / 2.0 + float(rng.normal(0.0, 0.04 * width)),
            height / 2.0 + float(rng.normal(0.0, 0.04 * height)),
        )
        in_focus = rng.random() >= self.defocus_share
        defocus = float(rng.uniform(0.0, 0.6) if in_focus else rng.uniform(2.0, 4.5))
        angle = float(rng.uniform(0.0, 180.0))
        if label == CEX:
            # Needle bundles run across the whole crop, as in the real CEX crops.
            length = math.hypot(height, width) * float(rng.uniform(0.75, 1.15))
            draw_needle_bundle(canvas, rng, centre, length, angle, defocus=defocus)
        else:
            diameter = side * float(rng.uniform(0.6, 0.92))
            draw_agglomerate(canvas, rng, centre, diameter, angle, defocus=defocus)
        for _ in range(int(np.count_nonzero(in_front))):
            self._draw_neighbour(canvas, side)

        add_sensor_noise(canvas, self._noise.sample(rng, height, width))
        return to_uint8(canvas)

    def _draw_neighbour(self, canvas: npt.NDArray[np.float32], side: int) -> None:
        """A particle centred near or beyond an edge, so only part of it shows."""
        rng = self._rng
        height, width = canvas.shape
        edge = int(rng.integers(0, 4))
        along = float(rng.uniform(0.0, 1.0))
        depth = float(rng.uniform(-0.15, 0.1)) * side
        if edge == 0:
            centre = (along * width, depth)
        elif edge == 1:
            centre = (along * width, height - depth)
        elif edge == 2:
            centre = (depth, along * height)
        else:
            centre = (width - depth, along * height)
        defocus = float(rng.uniform(0.0, 4.0))
        angle = float(rng.uniform(0.0, 180.0))
        # Neighbours are mostly needles whatever the crop's class: the slurry is
        # cephalexin, and a neighbour's class must not hint at the crop's label.
        if rng.random() < 0.9:
            length = side * float(rng.uniform(0.6, 1.4))
            draw_needle_bundle(canvas, rng, centre, length, angle, defocus=defocus)
        else:
            diameter = side * float(rng.uniform(0.4, 0.8))
            draw_agglomerate(canvas, rng, centre, diameter, angle, defocus=defocus)
