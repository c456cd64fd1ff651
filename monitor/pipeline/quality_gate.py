"""The per-frame quality gate: reject frames no count should be taken from.

Out-of-focus, empty and saturated frames are counted by reason and not classified:
a blind probe must never report "0 % PG".
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from monitor.config.settings import QualityConfig


@dataclass(frozen=True)
class QualityVerdict:
    reason: str | None  # None when accepted
    focus: float
    contrast: float
    saturated_share: float

    @property
    def accepted(self) -> bool:
        return self.reason is None


def focus_measure(grey: np.ndarray, measure: str) -> float:
    """Variance of the Laplacian, or Tenengrad (mean squared Sobel gradient)."""
    if measure == "tenengrad":
        gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
        return float(cv2.mean(gx * gx + gy * gy)[0])
    _, std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    return float(std[0, 0]) ** 2


def local_contrast(grey: np.ndarray) -> float:
    """Std of the image after removing its illumination (a heavy blur), on a 4x smaller copy.

    Uneven illumination alone gives a large plain std; objects give local contrast.
    """
    small = grey
    if min(grey.shape) >= 128:
        small = cv2.resize(
            grey, (grey.shape[1] // 4, grey.shape[0] // 4), interpolation=cv2.INTER_AREA
        )
    flat = small.astype(np.float32) - cv2.blur(small, (15, 15)).astype(np.float32)
    _, std = cv2.meanStdDev(flat)
    return float(std[0, 0])


def assess_frame(grey: np.ndarray, config: QualityConfig) -> QualityVerdict:
    saturated = float(np.count_nonzero(grey >= 250)) / grey.size
    contrast = local_contrast(grey)
    focus = focus_measure(grey, config.focus_measure)
    reason = None
    if saturated > config.max_saturated_share:
        reason = "saturated"
    elif contrast < config.min_contrast:
        reason = "empty"
    elif focus < config.min_focus:
        reason = "out_of_focus"
    return QualityVerdict(reason, focus, contrast, saturated)
