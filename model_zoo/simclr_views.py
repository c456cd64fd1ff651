"""SimCLR's two views of one crop: strong random augmentations of the 2-D uint8 image.

SimCLR (Chen et al. 2020) learns by making two random views of the same image agree
and views of different images disagree, so the augmentations decide what the encoder
learns to ignore. Chen et al. found random resized cropping and colour distortion
the pair that matters most; on greyscale probe crops colour distortion becomes
brightness/contrast (illumination drift and fouling) and sensor noise, and the
probe's own nuisances add any rotation, both flips and defocus blur. What must
survive every view is what tells CEX needles from PG agglomerates: edges, texture,
elongation.

The steps are `model_zoo.augment`'s operations with SimCLR's strengths, in this
order: random resized crop (of the original pixels, so no detail is lost before the
network's resize), rotation with a mirrored border, flips, blur, brightness and
contrast, noise. Each view then goes through `monitor.imaging.preprocess.prepare_image`,
the daemon's resize and normalisation, so pretraining and fine-tuning see inputs
prepared alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from model_zoo.augment import (
    blur_randomly,
    check_grey_uint8,
    flip_randomly,
    jitter_intensity,
    rotate_scale_shift,
)
from monitor.imaging.preprocess import prepare_image
from monitor.manifest import InputSpec

# Random resized crop gives up after this many draws that do not fit, and takes the
# whole crop (torchvision's RandomResizedCrop does the same after 10).
CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class SimCLRViewConfig:
    """Strength of each step of a SimCLR view.

    crop_area: share of the crop's area a view keeps. SimCLR's ImageNet range starts
    at 0.08; a particle crop is mostly one particle, and below about a quarter of it
    a view of a needle bundle's end and one of a PG agglomerate's edge look alike, so
    the range starts at 0.25.
    crop_aspect: width/height of the kept region (SimCLR's 3/4 to 4/3).
    jitter_probability: share of views whose brightness and contrast change
    (SimCLR's colour jitter: 0.8). Brightness moves by up to brightness_shift grey
    levels, contrast scales by contrast_range.
    blur_probability, blur_sigma_range: SimCLR blurs half the views with sigma
    0.1-2.0 px at 224 px; these sigmas are in the crop's own pixels (130-230 px).
    """

    crop_area: tuple[float, float] = (0.25, 1.0)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    rotation_degrees: float = 180.0
    flip_probability: float = 0.5
    jitter_probability: float = 0.8
    brightness_shift: float = 40.0
    contrast_range: tuple[float, float] = (0.6, 1.5)
    blur_probability: float = 0.5
    blur_sigma_range: tuple[float, float] = (0.1, 2.0)
    noise_sigma_max: float = 6.0


def random_resized_crop(
    grey: np.ndarray,
    rng: np.random.Generator,
    area: tuple[float, float],
    aspect: tuple[float, float],
) -> np.ndarray:
    """A random region of `grey` covering a share of its area in `area`, width/height
    ratio in `aspect` (log-uniform), at its own resolution; the network's resize later
    scales it up, which is the "resized" of the name."""
    height, width = grey.shape
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(CROP_ATTEMPTS):
        target = height * width * rng.uniform(*area)
        ratio = math.exp(rng.uniform(log_low, log_high))
        crop_w = round(math.sqrt(target * ratio))
        crop_h = round(math.sqrt(target / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return grey[top : top + crop_h, left : left + crop_w]
    return grey


def simclr_view(
    grey: np.ndarray, rng: np.random.Generator, config: SimCLRViewConfig = SimCLRViewConfig()
) -> np.ndarray:
    """One random view of a 2-D uint8 crop, as a 2-D uint8 image (not yet resized)."""
    check_grey_uint8(grey, "simclr_view")
    image = np.ascontiguousarray(
        random_resized_crop(grey, rng, config.crop_area, config.crop_aspect)
    )
    image = rotate_scale_shift(image, rng, rotation_degrees=config.rotation_degrees)
    image = flip_randomly(image, rng, config.flip_probability)
    image = blur_randomly(image, rng, config.blur_probability, config.blur_sigma_range)
    jitter = rng.random() < config.jitter_probability
    return jitter_intensity(
        image,
        rng,
        contrast_range=config.contrast_range if jitter else (1.0, 1.0),
        brightness_shift=config.brightness_shift if jitter else 0.0,
        noise_sigma_max=config.noise_sigma_max,
    )


class ViewPairs(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """In-memory crops -> two (3, S, S) views of each, prepared as the daemon does.

    Each crop's views draw from a generator seeded by (seed, epoch, index), so an
    epoch's views are the same whatever the loader workers, and a resumed run sees
    the views the interrupted one would have.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        spec: InputSpec,
        *,
        seed: int,
        config: SimCLRViewConfig = SimCLRViewConfig(),
    ) -> None:
        self.images = images
        self.spec = spec
        self.seed = seed
        self.config = config
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        grey = self.images[index]
        first, second = (
            torch.from_numpy(prepare_image(simclr_view(grey, rng, self.config), self.spec))
            for _ in range(2)
        )
        return first, second
