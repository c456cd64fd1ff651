"""Size and shape distributions per class in a window: what a probe user reads beside the
fractions (D10/D50/D90, counts per size class, aspect ratio).

Over the confidently classified particles of one probe, class and window:

- `count`;
- D10, D50 and D90 of the equivalent circle diameter (ECD), number-weighted (each
  particle counts once) and square-weighted (each particle weighs ECD²: the
  distribution that compares with FBRM chord-length distributions, which see large
  particles more often);
- the mean aspect ratio (Feret min / Feret max);
- a histogram of the ECD on fixed log-spaced bins (`SIZE_BIN_EDGES`: 1 to 10,000, four
  bins per decade), the same edges in every window and for every probe, so windows and
  probes compare bin by bin. Bins are [e_i, e_i+1), the last one closed; a particle
  below the first edge is counted in the first bin and one above the last edge in the
  last bin (the histogram's total is always `count`).

Lengths are in the unit the sizes were measured in: micrometres ("um") with the probe's
pixel size, else pixels ("px", the same bin edges read as pixels).

Quantiles: linear interpolation of the weighted empirical distribution at the midpoints
of each particle's weight (Hazen's rule with weights): with the diameters sorted
ascending and cumulative weights C_i of a total W, particle i sits at probability
P_i = (C_i - w_i / 2) / W; the quantile at p interpolates linearly between the
neighbouring P_i, and is the smallest (largest) diameter below P_1 (above P_n). With
equal weights this is numpy's `quantile(..., method="hazen")`. A class without particles
has null quantiles and mean aspect ratio.

Pure logic over arrays passed in by the caller: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

SizeUnit = Literal["um", "px"]

BINS_PER_DECADE = 4
SIZE_BIN_EDGES: tuple[float, ...] = tuple(
    float(10.0 ** (k / BINS_PER_DECADE)) for k in range(4 * BINS_PER_DECADE + 1)
)
"""1 to 10,000 (um: 1 um to 10 mm), four log-spaced bins per decade: 16 bins."""

QUANTILES = (0.1, 0.5, 0.9)


def weighted_quantiles(
    values: np.ndarray, weights: np.ndarray | None, probabilities: Sequence[float]
) -> list[float | None]:
    """Quantiles of `values` (any order) at `probabilities` by the weighted Hazen rule
    (module docstring); None for each when there are no values or no weight."""
    if values.size == 0:
        return [None] * len(probabilities)
    order = np.argsort(values, kind="stable")
    return _sorted_quantiles(
        values[order], None if weights is None else np.asarray(weights)[order], probabilities
    )


def _sorted_quantiles(
    ordered: np.ndarray, weights: np.ndarray | None, probabilities: Sequence[float]
) -> list[float | None]:
    """`weighted_quantiles` of values already sorted ascending (weights in that order)."""
    if ordered.size == 0:
        return [None] * len(probabilities)
    if weights is None:
        w = np.ones(ordered.size, dtype=np.float64)
    else:
        w = np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    if not total > 0:
        return [None] * len(probabilities)
    positions = (np.cumsum(w) - w / 2.0) / total
    found = np.interp(np.asarray(probabilities, dtype=np.float64), positions, ordered)
    return [float(value) for value in found]


def size_histogram(ecd: np.ndarray, edges: Sequence[float] = SIZE_BIN_EDGES) -> list[int]:
    """Counts per bin [e_i, e_i+1) (the last closed); outside values go to the end bins."""
    return _sorted_histogram(np.sort(ecd), edges)


def _sorted_histogram(ordered: np.ndarray, edges: Sequence[float]) -> list[int]:
    """`size_histogram` of values sorted ascending: one binary search per inner edge."""
    inner = np.searchsorted(ordered, np.asarray(edges[1:-1], dtype=np.float64), side="left")
    bounds = np.concatenate(([0], inner, [ordered.size]))
    return [int(c) for c in np.diff(bounds)]


@dataclass(frozen=True)
class ClassSizes:
    """The size distribution of one class in one window."""

    count: int
    d10: float | None
    d50: float | None
    d90: float | None
    d10_sq: float | None
    """Of the square-weighted (ECD²) distribution."""
    d50_sq: float | None
    d90_sq: float | None
    mean_aspect_ratio: float | None
    histogram: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "d10": self.d10,
            "d50": self.d50,
            "d90": self.d90,
            "d10_sq": self.d10_sq,
            "d50_sq": self.d50_sq,
            "d90_sq": self.d90_sq,
            "mean_aspect_ratio": self.mean_aspect_ratio,
            "histogram": list(self.histogram),
        }


def class_sizes(
    ecd: np.ndarray, aspect_ratio: np.ndarray, edges: Sequence[float] = SIZE_BIN_EDGES
) -> ClassSizes:
    """The distribution of one class's particles (their ECDs and aspect ratios). One sort
    serves both weightings (ECD² grows with the ECD) and the histogram."""
    ordered = np.sort(ecd)
    d10, d50, d90 = _sorted_quantiles(ordered, None, QUANTILES)
    d10_sq, d50_sq, d90_sq = _sorted_quantiles(ordered, ordered * ordered, QUANTILES)
    return ClassSizes(
        count=int(ecd.size),
        d10=d10,
        d50=d50,
        d90=d90,
        d10_sq=d10_sq,
        d50_sq=d50_sq,
        d90_sq=d90_sq,
        mean_aspect_ratio=float(aspect_ratio.mean()) if aspect_ratio.size else None,
        histogram=tuple(_sorted_histogram(ordered, edges)),
    )


@dataclass(frozen=True)
class SizeStats:
    """Every class's size distribution in one window."""

    unit: SizeUnit
    bin_edges: tuple[float, ...]
    classes: dict[str, ClassSizes]

    def to_json(self) -> dict[str, Any]:
        """The window's `sizes` document (see the README's MQTT section)."""
        return {
            "unit": self.unit,
            "measure": "ecd",
            "bin_edges": list(self.bin_edges),
            "classes": {name: sizes.to_json() for name, sizes in self.classes.items()},
        }
