"""An out-of-distribution set: images that are not probe crops of crystals.

No training run sees these. Kinds: natural photos shipped inside scikit-image (whole
and cropped to probe-crop sizes), rendered text, screenshots of our own dashboard and
replay report, noise, flat fields, checkerboards and bubble-only crops drawn by the
simulator's bubble renderer on a particle-free probe background. Every image is 2-D
uint8 greyscale, as the daemon's decoder delivers it. Deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from monitor.simulator.background import (
    IlluminationModel,
    NoiseBank,
    add_sensor_noise,
    draw_bubble,
    to_uint8,
)

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = ("docs/dashboard.png", "docs/dashboard-acknowledged.png", "docs/replay-report.png")
# scikit-image sample images shipped inside its wheel (the rest need a download).
PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
CROPS_PER_PHOTO = 8
CROP_SIDES = (130, 230)


@dataclass(frozen=True)
class OodImage:
    kind: str
    name: str
    image: np.ndarray


def _grey(image: np.ndarray) -> np.ndarray:
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 3:
        code = cv2.COLOR_RGBA2GRAY if image.shape[2] == 4 else cv2.COLOR_RGB2GRAY
        image = cv2.cvtColor(image, code)
    return np.ascontiguousarray(image)


def _random_crops(rng: np.random.Generator, image: np.ndarray, count: int) -> list[np.ndarray]:
    height, width = image.shape
    crops = []
    for _ in range(count):
        side = int(rng.integers(*CROP_SIDES))
        side_h, side_w = min(side, height), min(int(side * rng.uniform(0.85, 1.2)), width)
        top = int(rng.integers(0, height - side_h + 1))
        left = int(rng.integers(0, width - side_w + 1))
        crops.append(image[top : top + side_h, left : left + side_w].copy())
    return crops


def photos(rng: np.random.Generator) -> list[OodImage]:
    import skimage.data

    images = []
    for name in PHOTOS:
        grey = _grey(getattr(skimage.data, name)())
        images.append(OodImage("photo", name, grey))
        for index, crop in enumerate(_random_crops(rng, grey, CROPS_PER_PHOTO)):
            images.append(OodImage("photo crop", f"{name}#{index}", crop))
    return images


def rendered_text(rng: np.random.Generator, count: int = 20) -> list[OodImage]:
    fonts = (
        cv2.FONT_HERSHEY_SIMPLEX,
        cv2.FONT_HERSHEY_DUPLEX,
        cv2.FONT_HERSHEY_COMPLEX,
        cv2.FONT_HERSHEY_TRIPLEX,
        cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
    )
    words = ("batch R101", "PG 4.2 %", "CEX", "ALARM", "crystal", "0123456789", "lot 7 ok")
    images = []
    for index in range(count):
        side = int(rng.integers(*CROP_SIDES))
        dark_on_light = index % 2 == 0
        image = np.full((side, side), 235 if dark_on_light else 20, np.uint8)
        ink = 15 if dark_on_light else 240
        for line in range(int(rng.integers(2, 6))):
            text = words[int(rng.integers(len(words)))]
            y = 25 + line * int(side / 5)
            scale = float(rng.uniform(0.5, 1.1))
            font = fonts[index % len(fonts)]
            cv2.putText(image, text, (5, y), font, scale, ink, 1 + index % 2, cv2.LINE_AA)
        images.append(OodImage("text", f"text#{index}", image))
    return images


def screenshots(rng: np.random.Generator, per_file: int = 7) -> list[OodImage]:
    images = []
    for relative in SCREENSHOTS:
        grey = cv2.imread(str(REPO / relative), cv2.IMREAD_GRAYSCALE)
        if grey is None:
            raise FileNotFoundError(f"screenshot missing: {REPO / relative}")
        for index, crop in enumerate(_random_crops(rng, grey, per_file)):
            images.append(OodImage("screenshot", f"{Path(relative).name}#{index}", crop))
    return images


def noise(rng: np.random.Generator, count: int = 21) -> list[OodImage]:
    images = []
    for index in range(count):
        side = int(rng.integers(*CROP_SIDES))
        form = index % 3
        if form == 0:
            mean, sigma = float(rng.uniform(60, 190)), float(rng.uniform(10, 60))
            field = rng.normal(mean, sigma, (side, side))
        elif form == 1:
            field = rng.uniform(0, 255, (side, side))
        else:
            field = np.full((side, side), float(rng.uniform(40, 200)))
            mask = rng.random((side, side))
            field[mask < 0.05] = 0
            field[mask > 0.95] = 255
        images.append(OodImage("noise", f"noise#{index}", np.clip(field, 0, 255).astype(np.uint8)))
    return images


def flat_fields(rng: np.random.Generator, count: int = 12) -> list[OodImage]:
    images = []
    for index, level in enumerate(np.linspace(0, 255, count)):
        side = int(rng.integers(*CROP_SIDES))
        flat = np.full((side, side), int(level), np.uint8)
        images.append(OodImage("flat", f"flat#{index}", flat))
    return images


def checkerboards(rng: np.random.Generator, count: int = 12) -> list[OodImage]:
    images = []
    for index in range(count):
        side = int(rng.integers(*CROP_SIDES))
        square = int(rng.integers(4, 40))
        ys, xs = np.mgrid[0:side, 0:side]
        board = (((ys // square) + (xs // square)) % 2).astype(np.uint8)
        low, high = sorted(int(v) for v in rng.integers(0, 256, 2))
        pattern = np.where(board, high, low).astype(np.uint8)
        images.append(OodImage("checkerboard", f"checker#{index}", pattern))
    return images


def bubbles(rng: np.random.Generator, count: int = 20) -> list[OodImage]:
    """Gas bubbles on a particle-free probe background: the probe's own non-crystals."""
    images = []
    for index in range(count):
        side = int(rng.integers(*CROP_SIDES))
        canvas = IlluminationModel(rng, side, side).render()
        for _ in range(int(rng.integers(1, 3))):
            radius = float(rng.uniform(0.2, 0.45)) * side
            centre = (float(rng.uniform(0.3, 0.7)) * side, float(rng.uniform(0.3, 0.7)) * side)
            draw_bubble(canvas, rng, centre, radius)
        add_sensor_noise(canvas, NoiseBank(rng, side, side).sample(rng))
        images.append(OodImage("bubble", f"bubble#{index}", to_uint8(canvas)))
    return images


def build_ood_set(seed: int = 2026) -> list[OodImage]:
    """Every kind above, in a fixed order; about 240 images."""
    rng = np.random.default_rng(seed)
    return [
        *photos(rng),
        *rendered_text(rng),
        *screenshots(rng),
        *noise(rng),
        *flat_fields(rng),
        *checkerboards(rng),
        *bubbles(rng),
    ]
