"""Training augmentations for microscope crops, on the 2-D uint8 image.

They run before `monitor.imaging.preprocess`, so the network still sees exactly the
resize and normalisation the daemon applies. Chosen for in-situ probe images:
particles have no preferred orientation (any rotation, both flips), their
apparent size varies with distance from the window (scale jitter), illumination
drifts and fouls (brightness/contrast), and some particles sit slightly out of
focus (blur) on a noisy sensor (noise). Rotation pads with a mirrored border,
which looks like more slurry rather than a black frame the probe never shows.

`augment_crop` is the supervised recipe; the steps are public so that other
recipes (SimCLR's two views, `model_zoo.simclr_views`) compose the same
operations with their own strengths.
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
    check_grey_uint8(grey, "augment_crop")
    image = rotate_scale_shift(
        grey,
        rng,
        rotation_degrees=config.rotation_degrees,
        scale_range=config.scale_range,
        shift_fraction=config.shift_fraction,
    )
    image = flip_randomly(image, rng, config.flip_probability)
    image = blur_randomly(image, rng, config.blur_probability, config.blur_sigma_range)
    return jitter_intensity(
        image,
        rng,
        contrast_range=config.contrast_range,
        brightness_shift=config.brightness_shift,
        noise_sigma_max=config.noise_sigma_max,
    )


def check_grey_uint8(grey: np.ndarray, caller: str) -> None:
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"{caller} needs a 2-D uint8 image, got {grey.dtype} {grey.shape}")


def rotate_scale_shift(
    grey: np.ndarray,
    rng: np.random.Generator,
    *,
    rotation_degrees: float,
    scale_range: tuple[float, float] = (1.0, 1.0),
    shift_fraction: float = 0.0,
) -> np.ndarray:
    """Rotation, scale and a small shift in one warp: one interpolation, not three.

    The border is mirrored: more slurry, not a black frame the probe never shows.
    """
    height, width = grey.shape
    angle = rng.uniform(-rotation_degrees, rotation_degrees)
    scale = rng.uniform(*scale_range)
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle, scale)
    matrix[0, 2] += rng.uniform(-1, 1) * shift_fraction * width
    matrix[1, 2] += rng.uniform(-1, 1) * shift_fraction * height
    return cv2.warpAffine(
        grey,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT_101,
    )


def flip_randomly(image: np.ndarray, rng: np.random.Generator, probability: float) -> np.ndarray:
    """Left-right, then up-down, each with `probability`."""
    if rng.random() < probability:
        image = cv2.flip(image, 1)
    if rng.random() < probability:
        image = cv2.flip(image, 0)
    return image


def blur_randomly(
    image: np.ndarray,
    rng: np.random.Generator,
    probability: float,
    sigma_range: tuple[float, float],
) -> np.ndarray:
    """A Gaussian blur of a random sigma (px), with `probability`: a particle out of focus."""
    if rng.random() < probability:
        sigma = rng.uniform(*sigma_range)
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101)
    return image


def jitter_intensity(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    contrast_range: tuple[float, float],
    brightness_shift: float,
    noise_sigma_max: float,
) -> np.ndarray:
    """Contrast about the image mean, a brightness shift and sensor noise; back to uint8."""
    pixels = image.astype(np.float32)
    contrast = rng.uniform(*contrast_range)
    brightness = rng.uniform(-brightness_shift, brightness_shift)
    mean = float(pixels.mean())
    pixels = (pixels - mean) * contrast + (mean + brightness)
    noise_sigma = rng.uniform(0.0, noise_sigma_max)
    if noise_sigma > 0:
        pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * noise_sigma
    np.clip(pixels, 0, 255, out=pixels)
    return np.rint(pixels).astype(np.uint8)
