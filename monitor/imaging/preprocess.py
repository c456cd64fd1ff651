"""Turn greyscale images into the network's input tensor, exactly as the manifest says.

The one implementation shared by training (`model_zoo`), `classify` and the daemon,
so a model never sees different pixels in the plant than it saw in training.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from monitor.manifest import InputSpec


def median_grey(image: np.ndarray) -> int:
    """int(np.median(image)) for uint8 images, from a histogram: O(n), no sort.

    Same value as numpy (the mean of the two middle values for an even count, truncated),
    so models trained before this shortcut see identical pixels.
    """
    counts = np.cumsum(np.bincount(image.ravel(), minlength=256))
    n = int(counts[-1])
    upper = int(np.searchsorted(counts, n // 2 + 1))
    if n % 2:
        return upper
    lower = int(np.searchsorted(counts, n // 2))
    return int((lower + upper) / 2)


def resize_to_input(grey: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resize a 2-D uint8 image to spec.size x spec.size by the manifest's policy."""
    size = spec.size
    height, width = grey.shape
    if spec.resize == "stretch":
        interpolation = cv2.INTER_AREA if max(height, width) > size else cv2.INTER_LINEAR
        return cv2.resize(grey, (size, size), interpolation=interpolation)
    scale = size / max(height, width)
    new_w = max(1, round(width * scale))
    new_h = max(1, round(height * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(grey, (new_w, new_h), interpolation=interpolation)
    if new_w == size and new_h == size:
        return resized
    # Pad with the median grey so the border looks like probe background, not a frame.
    fill = median_grey(resized)
    top = (size - new_h) // 2
    left = (size - new_w) // 2
    return cv2.copyMakeBorder(
        resized,
        top,
        size - new_h - top,
        left,
        size - new_w - left,
        cv2.BORDER_CONSTANT,
        value=fill,
    )


def normalise(square: np.ndarray, spec: InputSpec, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (S, S) -> float32 (3, S, S), scaled and normalised per channel."""
    if out is None:
        out = np.empty((3, spec.size, spec.size), dtype=np.float32)
    # One fused scale-and-shift per channel: x * (1 / (255 std)) - mean / std.
    for channel in range(3):
        if channel and spec.mean[channel] == spec.mean[0] and spec.std[channel] == spec.std[0]:
            out[channel] = out[0]  # greyscale with equal statistics: copy, don't recompute
            continue
        scale = 1.0 / (255.0 * spec.std[channel])
        np.multiply(square, np.float32(scale), out=out[channel], casting="unsafe")
        out[channel] -= np.float32(spec.mean[channel] / spec.std[channel])
    return out


def prepare_image(grey: np.ndarray, spec: InputSpec) -> np.ndarray:
    """One decoded greyscale image -> (3, S, S) float32."""
    return normalise(resize_to_input(grey, spec), spec)


def prepare_batch(
    images: Sequence[np.ndarray], spec: InputSpec, out: np.ndarray | None = None
) -> np.ndarray:
    """Greyscale images -> (N, 3, S, S) float32, written into one contiguous array
    (`out` where given: a worker process writes straight into shared memory)."""
    shape = (len(images), 3, spec.size, spec.size)
    batch = np.empty(shape, dtype=np.float32) if out is None else out
    if batch.shape != shape or batch.dtype != np.float32:
        raise ValueError(f"out is {batch.dtype}{batch.shape}, needs float32{shape}")
    for index, grey in enumerate(images):
        normalise(resize_to_input(grey, spec), spec, out=batch[index])
    return batch
