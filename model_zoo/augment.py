"""Training augmentations for microscope crops, on the 2-D uint8 image.

They run before `monitor.imaging.preprocess`, so the network still sees exactly the
resize and normalisation the daemon applies. Chosen for in-situ probe images:
particles have no preferred orientation (any rotation, both flips), their
apparent size varies with distance from the window (scale jitter), illumination
drifts and fouls (brightness/contrast), and some particles sit slightly out of
focus (blur) on a noisy sensor (noise). Rotation pads with a mirrored border,
which looks like more slurry rather than a black frame the probe never shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of each augmentation; the defaults suit 150-px probe crops."""

    rotation_degrees: float = 180.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    shift_fraction: float = 0.05
    flip_probability: float = 0.5
    brightness_shift: float = 20.0  # grey levels, either way
    contrast_range: tuple[float, float] = (0.8, 1.25)
    blur_probability: float = 0.2
    blur_sigma_range: tuple[float, float] = (0.5, 1.5)
    noise_sigma_max: float = 4.0  # grey levels


def augment_crop(
    grey: np.ndarray, rng: np.random.Generator, config: AugmentConfig = AugmentConfig()
) -> np.ndarray:
    """A randomly transformed copy of a 2-D uint8 image, same shape and dtype."""
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"augment_crop needs a 2-D uint8 image, got {grey.dtype} {grey.shape}")
    height, width = grey.shape

    # Rotation, scale and a small shift in one warp: one interpolation, not three.
    angle = rng.uniform(-config.rotation_degrees, config.rotation_degrees)
    scale = rng.uniform(*config.scale_range)
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle, scale)
    matrix[0, 2] += rng.uniform(-1, 1) * config.shift_fraction * width
    matrix[1, 2] += rng.uniform(-1, 1) * config.shift_fraction * height
    image = cv2.warpAffine(
        grey,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT_101,
    )

    if rng.random() < config.flip_probability:
        image = cv2.flip(image, 1)
    if rng.random() < config.flip_probability:
        image = cv2.flip(image, 0)
    if rng.random() < config.blur_probability:
        sigma = rng.uniform(*config.blur_sigma_range)
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101)

    pixels = image.astype(np.float32)
    contrast = rng.uniform(*config.contrast_range)
    brightness = rng.uniform(-config.brightness_shift, config.brightness_shift)
    mean = float(pixels.mean())
    pixels = (pixels - mean) * contrast + (mean + brightness)
    noise_sigma = rng.uniform(0.0, config.noise_sigma_max)
    if noise_sigma > 0:
        pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * noise_sigma
    np.clip(pixels, 0, 255, out=pixels)
    return np.rint(pixels).astype(np.uint8)
