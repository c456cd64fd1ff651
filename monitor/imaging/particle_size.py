"""Size and shape of one segmented particle: what a probe user reads (ISO 9276-6 names).

From the particle's binary mask: its area, the equivalent circle diameter (the circle of
the same area), the maximum and minimum Feret diameters (the longest and the narrowest
caliper widths over all directions, from the convex hull by rotating calipers) and the
aspect ratio Feret min / Feret max (1 for a disc, small for a needle). In micrometres
when the probe's pixel size is known, else in pixels, and the result says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

SizeUnit = Literal["um", "px"]


@dataclass(frozen=True)
class ParticleSize:
    area: float
    """um² (or px²)."""
    ecd: float
    """Equivalent circle diameter: sqrt(4 area / pi)."""
    feret_max: float
    feret_min: float
    aspect_ratio: float
    """feret_min / feret_max, in (0, 1]."""
    unit: SizeUnit
    """Of the lengths ("um" or "px"); the area is in that unit squared."""

    def to_json(self) -> dict[str, float | str]:
        return {
            "area": self.area,
            "ecd": self.ecd,
            "feret_max": self.feret_max,
            "feret_min": self.feret_min,
            "aspect_ratio": self.aspect_ratio,
            "unit": self.unit,
        }


def feret_diameters(points: np.ndarray) -> tuple[float, float]:
    """(max, min) caliper widths of a point set (N x 2), in its units. The maximum is the
    longest distance between two hull points; the minimum is the narrowest width over
    the hull's edge directions (a minimum-width strip always has a side on a hull edge).
    Both as one matrix product over the hull (tens of points), no Python loop: this runs
    once per particle on the pipeline's workers."""
    hull = cv2.convexHull(points.reshape(-1, 1, 2).astype(np.float32)).reshape(-1, 2)
    hull = hull.astype(np.float64)
    if len(hull) == 1:
        return 0.0, 0.0
    differences = hull[:, None, :] - hull[None, :, :]
    feret_max = float(np.sqrt((differences**2).sum(axis=2)).max())
    if len(hull) == 2:
        return feret_max, 0.0
    edges = np.roll(hull, -1, axis=0) - hull
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    keep = lengths > 0
    normals = np.stack([-edges[keep, 1], edges[keep, 0]], axis=1) / lengths[keep, None]
    projections = hull @ normals.T  # (hull points, edges)
    widths = projections.max(axis=0) - projections.min(axis=0)
    return feret_max, float(widths.min()) if len(widths) else 0.0


def measure_mask(mask: np.ndarray, pixel_size_um: float | None = None) -> ParticleSize | None:
    """The size of the particle a binary mask (non-zero = particle) holds; None for an
    empty mask. Pixels are squares of side `pixel_size_um` (None: sizes in pixels).

    Feret diameters are measured on the pixels' outer corners (each pixel is a unit
    square, not a point), so a one-pixel line of n pixels is n long and 1 wide, as a
    ruler laid on the image would read it."""
    area_px = float(np.count_nonzero(mask))
    if area_px == 0:
        return None
    # The outer corners of the boundary pixels suffice for the hull; all pixels' corners
    # are the simplest correct set and the hull keeps few of them.
    contours, _ = cv2.findContours(
        (mask != 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    boundary = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float32)
    # The hull of the pixels' corners is the hull of the corners of the hull's pixels:
    # take the (few) hull pixels first, then their four corners each.
    hull_pixels = cv2.convexHull(boundary.reshape(-1, 1, 2)).reshape(-1, 2)
    corners = np.concatenate([hull_pixels + offset for offset in _PIXEL_CORNERS])
    feret_max, feret_min = feret_diameters(corners)
    scale, unit = (pixel_size_um, "um") if pixel_size_um is not None else (1.0, "px")
    ecd_px = math.sqrt(4.0 * area_px / math.pi)
    return ParticleSize(
        area=area_px * scale * scale,
        ecd=ecd_px * scale,
        feret_max=feret_max * scale,
        feret_min=feret_min * scale,
        aspect_ratio=feret_min / feret_max if feret_max > 0 else 1.0,
        unit=unit,  # type: ignore[arg-type]
    )


_PIXEL_CORNERS = (
    np.array([0.0, 0.0], np.float32),
    np.array([1.0, 0.0], np.float32),
    np.array([0.0, 1.0], np.float32),
    np.array([1.0, 1.0], np.float32),
)
