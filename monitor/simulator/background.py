"""Everything in a probe image that is not a crystal: light, haze, window, bubbles, noise.

The probe looks through a sapphire window into the slurry with its own light
source, so the empty image is dark and unevenly lit (vignetting, a gradient, a
faint mottle). Out-of-focus crystals further from the window form a soft haze of
streaks; the window fouls over a batch; gas bubbles show as round bright rings;
and the sensor adds read and shot noise. Frames and crops share these functions
so a crop looks like a piece of a frame.

All images here are float32 grey levels on the 0-255 scale; values may leave that
range until the final conversion to uint8.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import numpy.typing as npt

FloatImage = npt.NDArray[np.float32]
BBox = tuple[int, int, int, int]

# Grey level of an empty, well-lit window centre (0-255 scale). The real crops'
# border pixels, mostly slurry background, average about 65-105 with the haze.
BACKGROUND_LEVEL_RANGE = (40.0, 62.0)
# Downscale factor for the slowly varying layers: computing them small and
# resizing costs a fraction of a millisecond on a full frame.
LOW_RES_FACTOR = 8


class IlluminationModel:
    """One probe's lighting: level, vignetting, gradient and mottle, drawn once.

    The field is defined over a whole (virtual) frame; `render` returns any window
    of it, so a crop gets the lighting of the place it was "cut" from.
    """

    def __init__(self, rng: np.random.Generator, frame_height: int, frame_width: int) -> None:
        self.frame_height = frame_height
        self.frame_width = frame_width
        self.level = float(rng.uniform(*BACKGROUND_LEVEL_RANGE))
        self.vignetting = float(rng.uniform(0.25, 0.45))
        self.centre_x = float(rng.uniform(0.4, 0.6))
        self.centre_y = float(rng.uniform(0.4, 0.6))
        self.gradient_x = float(rng.uniform(-0.2, 0.2))
        self.gradient_y = float(rng.uniform(-0.2, 0.2))
        low_h = max(2, math.ceil(frame_height / LOW_RES_FACTOR))
        low_w = max(2, math.ceil(frame_width / LOW_RES_FACTOR))
        ys = (np.arange(low_h, dtype=np.float32) + 0.5) / low_h
        xs = (np.arange(low_w, dtype=np.float32) + 0.5) / low_w
        grid_x, grid_y = np.meshgrid(xs, ys)
        radius_sq = ((grid_x - self.centre_x) ** 2 + (grid_y - self.centre_y) ** 2) / 0.5
        shape = 1.0 - self.vignetting * radius_sq
        shape += self.gradient_x * (grid_x - 0.5) + self.gradient_y * (grid_y - 0.5)
        # A faint mottle: a coarse random grid smoothed into blotches a few
        # hundred pixels across, like uneven LED output through the window.
        mottle = rng.standard_normal((4, 5)).astype(np.float32)
        mottle = np.asarray(
            cv2.resize(mottle, (low_w, low_h), interpolation=cv2.INTER_CUBIC), dtype=np.float32
        )
        shape += 0.05 * mottle
        low_res = (self.level * np.clip(shape, 0.2, None)).astype(np.float32)
        self._full = np.asarray(
            cv2.resize(low_res, (frame_width, frame_height), interpolation=cv2.INTER_LINEAR),
            dtype=np.float32,
        )

    def render(self, top: int = 0, left: int = 0, height: int = -1, width: int = -1) -> FloatImage:
        """The illumination of a window of the frame (the whole frame by default).

        Windows reaching past the frame edge are padded by replicating the edge.
        """
        height = self.frame_height if height < 0 else height
        width = self.frame_width if width < 0 else width
        fits = top >= 0 and left >= 0
        fits = fits and top + height <= self.frame_height and left + width <= self.frame_width
        if fits:
            return self._full[top : top + height, left : left + width].copy()
        ys = np.clip(np.arange(top, top + height), 0, self.frame_height - 1)
        xs = np.clip(np.arange(left, left + width), 0, self.frame_width - 1)
        return self._full[np.ix_(ys, xs)].copy()


def draw_slurry_haze(canvas: FloatImage, rng: np.random.Generator, density: float) -> None:
    """Add faint, blurred streaks: needles out of the focal plane, behind the sharp ones.

    Drawn at a quarter of the size in 8 bits and upscaled, which both blurs them
    and keeps a full frame at a few milliseconds. density 0 draws nothing; 1 is a
    thick slurry.
    """
    if density <= 0.0:
        return
    height, width = canvas.shape
    scale = 4
    low_h, low_w = max(8, height // scale), max(8, width // scale)
    layer = np.zeros((low_h, low_w), dtype=np.uint8)
    count = int(density * low_h * low_w / 75.0) + 1
    starts = rng.uniform((0.0, 0.0), (low_w, low_h), size=(count, 2))
    angles = rng.uniform(0.0, math.pi, size=count)
    lengths = rng.uniform(10.0, 60.0, size=count)
    ends = starts + lengths[:, None] * np.stack((np.cos(angles), np.sin(angles)), axis=1)
    starts_fixed = np.round(starts * 16).astype(np.int32).tolist()
    ends_fixed = np.round(ends * 16).astype(np.int32).tolist()
    values = rng.integers(10, 40, size=count).tolist()
    thicknesses = rng.choice((1, 1, 2), size=count).tolist()
    for start, end, value, thickness in zip(
        starts_fixed, ends_fixed, values, thicknesses, strict=True
    ):
        cv2.line(layer, start, end, value, thickness, cv2.LINE_AA, 4)
    layer = cv2.GaussianBlur(layer, (0, 0), 1.4)
    cv2.accumulate(cv2.resize(layer, (width, height), interpolation=cv2.INTER_LINEAR), canvas)


def draw_bubble(
    canvas: FloatImage, rng: np.random.Generator, centre: tuple[float, float], radius: float
) -> BBox | None:
    """A gas bubble: darker interior, bright thin ring, a small highlight.

    Returns the bubble's box clipped to the canvas, or None when it falls outside.
    """
    height, width = canvas.shape
    margin = 4
    half = math.ceil(radius) + margin
    cx, cy = centre
    x0, y0 = round(cx) - half, round(cy) - half
    size = 2 * half + 1
    local = (cx - x0, cy - y0)
    fixed = (round(local[0] * 16), round(local[1] * 16))
    interior = np.zeros((size, size), dtype=np.uint8)
    cv2.circle(interior, fixed, round(radius * 16), 255, -1, cv2.LINE_AA, 4)
    ring = np.zeros((size, size), dtype=np.uint8)
    ring_width = max(1, round(radius * rng.uniform(0.05, 0.1)))
    cv2.circle(ring, fixed, round(radius * 16), 255, ring_width, cv2.LINE_AA, 4)
    spot = (
        round((local[0] - 0.35 * radius) * 16),
        round((local[1] - 0.35 * radius) * 16),
    )
    cv2.circle(ring, spot, max(16, round(radius * 0.12 * 16)), 200, -1, cv2.LINE_AA, 4)
    inside = np.asarray(cv2.GaussianBlur(interior, (0, 0), 1.0), dtype=np.float32) / 255.0
    light = np.asarray(cv2.GaussianBlur(ring, (0, 0), 0.8), dtype=np.float32) / 255.0
    amplitude = float(rng.uniform(110.0, 170.0))
    darkening = float(rng.uniform(0.35, 0.55))

    clip = _intersect((x0, y0, size, size), width, height)
    if clip is None:
        return None
    cx0, cy0, cx1, cy1 = clip
    region = canvas[cy0:cy1, cx0:cx1]
    sub = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    region *= 1.0 - darkening * inside[sub]
    region += amplitude * light[sub]
    return cx0, cy0, cx1 - cx0, cy1 - cy0


def _intersect(box: BBox, width: int, height: int) -> BBox | None:
    """The part of box (x, y, w, h) inside the canvas as (x0, y0, x1, y1), or None."""
    x0, y0, w, h = box
    cx0, cy0 = max(0, x0), max(0, y0)
    cx1, cy1 = min(width, x0 + w), min(height, y0 + h)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    return cx0, cy0, cx1, cy1


class FoulingSmudge:
    """A deposit on the probe window that spreads from a few seeds as a batch goes on.

    Its shape is fixed when the probe is "installed"; `apply` darkens and flattens
    the image where the deposit has reached, for a coverage between 0 and 1.
    """

    def __init__(self, rng: np.random.Generator, height: int, width: int) -> None:
        self.height = height
        self.width = width
        low_h, low_w = max(4, height // LOW_RES_FACTOR), max(4, width // LOW_RES_FACTOR)
        ys, xs = np.mgrid[0:low_h, 0:low_w].astype(np.float32)
        thickness = np.zeros((low_h, low_w), dtype=np.float32)
        for _ in range(int(rng.integers(2, 5))):
            cx, cy = rng.uniform(0, low_w), rng.uniform(0, low_h)
            spread = rng.uniform(0.15, 0.35) * max(low_h, low_w)
            thickness += np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2.0 * spread**2))
        texture = rng.standard_normal((low_h, low_w)).astype(np.float32)
        texture = np.asarray(cv2.GaussianBlur(texture, (0, 0), 2.0), dtype=np.float32)
        texture /= float(texture.std()) + 1e-6
        thickness = thickness / float(thickness.max()) + 0.12 * texture
        self._thickness = thickness.astype(np.float32)
        self.deposit_level = float(rng.uniform(25.0, 45.0))

    def apply(self, canvas: FloatImage, coverage: float) -> None:
        """Darken and flatten where the deposit reaches at this coverage (0..1)."""
        coverage = min(1.0, max(0.0, coverage))
        if coverage <= 0.0:
            return
        # The deposit covers points whose thickness exceeds a falling threshold,
        # with a soft edge, and it gets denser as it grows.
        alpha_low = np.clip((self._thickness - (1.0 - coverage)) * 3.0, 0.0, 1.0)
        alpha_low *= 0.4 + 0.45 * coverage
        alpha = np.asarray(
            cv2.resize(alpha_low, (self.width, self.height), interpolation=cv2.INTER_LINEAR),
            dtype=np.float32,
        )
        # Only the part the deposit has reached needs work.
        x, y, w, h = cv2.boundingRect((alpha > 0.0).astype(np.uint8))
        if w == 0 or h == 0:
            return
        region = canvas[y : y + h, x : x + w]
        shift = region - np.float32(self.deposit_level)
        shift *= alpha[y : y + h, x : x + w]
        region -= shift


class NoiseBank:
    """A store of sensor-like noise to slice per image.

    Drawing 1.4 million normal samples costs about 25 ms here, more than the whole
    rest of a frame; a window at a random offset of a bank drawn once is free and
    looks just as random to a segmenter or a classifier. The offset is taken in
    the flattened bank so a full-width window stays one contiguous block (OpenCV
    copies strided input). The bank is slightly smoothed, as a camera's noise is
    after demosaicing and compression: the real crops show almost no
    pixel-to-pixel noise.
    """

    PAD_ROWS = 256
    CORRELATION_SIGMA = 0.7

    def __init__(self, rng: np.random.Generator, height: int, width: int) -> None:
        bank = rng.standard_normal((height + self.PAD_ROWS, width), dtype=np.float32)
        bank = np.asarray(cv2.GaussianBlur(bank, (0, 0), self.CORRELATION_SIGMA), dtype=np.float32)
        bank *= np.float32(1.0 / max(1e-6, float(bank.std())))
        self._flat = bank.reshape(-1)
        self.height = height
        self.width = width

    def sample(
        self, rng: np.random.Generator, height: int | None = None, width: int | None = None
    ) -> FloatImage:
        """A unit-variance noise field, bank-sized by default (a view: do not modify)."""
        height = self.height if height is None else height
        width = self.width if width is None else width
        if height > self.height or width > self.width:
            raise ValueError(
                f"noise bank is {self.height}x{self.width}, asked for {height}x{width}"
            )
        span = height * self.width
        offset = int(rng.integers(0, self._flat.size - span + 1))
        window = self._flat[offset : offset + span].reshape(height, self.width)
        return window[:, :width]


def add_sensor_noise(
    canvas: FloatImage,
    noise: FloatImage,
    read_sigma: float = 0.8,
    shot_gain: float = 0.04,
) -> None:
    """Read noise plus signal-dependent shot noise, from a unit-variance noise field.

    Shot noise is Poisson in photo-electrons; a Gaussian with variance growing
    linearly with the grey level is the usual, much cheaper approximation.
    """
    floor = np.float32(read_sigma**2)
    variance = np.asarray(cv2.addWeighted(canvas, shot_gain, canvas, 0.0, float(floor)), np.float32)
    np.maximum(variance, floor, out=variance)
    np.sqrt(variance, out=variance)
    cv2.accumulateProduct(variance, noise, canvas)


def to_uint8(canvas: FloatImage) -> npt.NDArray[np.uint8]:
    """Round and saturate to 8 bits, as the camera does. Overwrites canvas."""
    np.maximum(canvas, 0.0, out=canvas)
    # Saturating, rounding conversion; values are non-negative now, so the
    # absolute value it also takes changes nothing.
    return np.asarray(cv2.convertScaleAbs(canvas), dtype=np.uint8)
