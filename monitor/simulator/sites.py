"""Sites: one probe installation's optics and its slurry's look mix (domain randomisation).

A model trained on one site's images loses accuracy at another's. Training on
crops drawn from many simulated sites, each with its own camera and optics, keeps
any one of them from dominating. `draw_site(seed)` makes a site from a seed (the
same seed, the same site); `get_site_style(name)` gives a named one for tests and
demos. A site's optics act on the rendered scene in the order light takes:

1. the scene: background level, slurry haze and particles (0-255 scale, values
   above 255 are light the camera cannot record);
2. window fouling darkens and flattens parts of the field;
3. contrast (how far particles stand out of the background) and exposure (gain);
4. vignetting and an illumination gradient;
5. optical defocus and motion blur;
6. the sensor: shot and read noise, clipping at full scale;
7. the camera's gamma, quantisation to 8 bits, or to 10-16 significant bits in a
   16-bit container, and JPEG compression (8-bit only) at the site's quality.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from monitor.simulator.background import FloatImage, FoulingSmudge, add_sensor_noise
from monitor.simulator.looks import SLURRY_MIX, LookMix, perturb_look_mix

# The training default: each crop from one of these many sites.
DEFAULT_TRAINING_SITES = range(200)
# Mixed into every site seed so site N's stream differs from simulator seed N's.
_SITE_SALT = 0x5173


@dataclass(frozen=True)
class SiteOptics:
    """One probe's camera and optics. Grey levels are on the 0-255 scale.

    background_level: grey level of the empty slurry at the field centre.
    haze: density of out-of-focus needle haze (0 none, 1 thick slurry).
    contrast: scales the scene's deviation from the background (1 = as rendered).
    exposure: gain on all light; > 1 saturates bright particles sooner.
    gamma: camera gamma; output = input ** (1 / gamma) on 0..1, > 1 brightens darks.
    vignetting: fall of light to the corners (0 none, 0.6 strong).
    gradient_x, gradient_y: linear illumination slope across the field.
    read_noise: read noise sigma in grey levels.
    shot_gain: shot-noise variance per grey level.
    defocus_sigma: extra Gaussian blur of the whole image, px.
    motion_blur_px, motion_angle_deg: length and direction of a motion smear, px.
    bit_depth: 8 (uint8) or 16 (uint16 container).
    sensor_bits: significant bits in the 16-bit container (10-16); 8 for 8-bit.
    jpeg_quality: JPEG round-trip at this quality (1-100), or None for none.
    fouling: share of the window covered by a deposit (0 clean .. 1).
    """

    background_level: float = 50.0
    haze: float = 1.0
    contrast: float = 1.0
    exposure: float = 1.0
    gamma: float = 1.0
    vignetting: float = 0.3
    gradient_x: float = 0.0
    gradient_y: float = 0.0
    read_noise: float = 0.8
    shot_gain: float = 0.04
    defocus_sigma: float = 0.0
    motion_blur_px: float = 0.0
    motion_angle_deg: float = 0.0
    bit_depth: int = 8
    sensor_bits: int = 8
    jpeg_quality: int | None = None
    fouling: float = 0.0

    def __post_init__(self) -> None:
        positive = ("background_level", "contrast", "exposure", "gamma")
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"{name} must be > 0, got {value}")
        at_least_zero = ("haze", "vignetting", "read_noise", "shot_gain", "defocus_sigma")
        for name in (*at_least_zero, "motion_blur_px"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {self.bit_depth}")
        if self.bit_depth == 8 and self.sensor_bits != 8:
            raise ValueError(f"an 8-bit site has sensor_bits 8, got {self.sensor_bits}")
        if self.bit_depth == 16 and not 10 <= self.sensor_bits <= 16:
            raise ValueError(f"sensor_bits must be 10-16 for 16-bit, got {self.sensor_bits}")
        if self.jpeg_quality is not None:
            if self.bit_depth != 8:
                raise ValueError("jpeg_quality needs bit_depth 8 (JPEG here is 8-bit)")
            if not 1 <= self.jpeg_quality <= 100:
                raise ValueError(f"jpeg_quality must be 1-100, got {self.jpeg_quality}")
        if not 0.0 <= self.fouling <= 1.0:
            raise ValueError(f"fouling must be between 0 and 1, got {self.fouling}")


@dataclass(frozen=True)
class Site:
    """A simulated probe installation: its name (the id in the ground truth), optics
    and the mix of particle looks its slurry shows."""

    name: str
    optics: SiteOptics
    look_mix: LookMix


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def draw_site(seed: int) -> Site:
    """The site of this seed, named "site-SEED": optics and a look mix drawn from
    ranges that span what real probes deliver."""
    rng = np.random.default_rng(np.random.SeedSequence([_SITE_SALT, seed]))
    sixteen = rng.random() < 0.3
    optics = SiteOptics(
        background_level=float(rng.uniform(25.0, 100.0)),
        haze=float(rng.uniform(0.3, 1.8)),
        contrast=_log_uniform(rng, 0.6, 1.4),
        exposure=_log_uniform(rng, 0.6, 1.7),
        gamma=float(rng.uniform(0.7, 1.4)),
        vignetting=float(rng.uniform(0.0, 0.6)),
        gradient_x=float(rng.uniform(-0.35, 0.35)),
        gradient_y=float(rng.uniform(-0.35, 0.35)),
        read_noise=_log_uniform(rng, 0.3, 4.0),
        shot_gain=_log_uniform(rng, 0.01, 0.3),
        defocus_sigma=0.0 if rng.random() < 0.5 else float(rng.uniform(0.3, 1.8)),
        motion_blur_px=0.0 if rng.random() < 0.6 else float(rng.uniform(2.0, 8.0)),
        motion_angle_deg=float(rng.uniform(0.0, 180.0)),
        bit_depth=16 if sixteen else 8,
        sensor_bits=int(rng.choice((10, 12, 14, 16))) if sixteen else 8,
        jpeg_quality=int(rng.integers(30, 96)) if not sixteen and rng.random() < 0.35 else None,
        fouling=0.0 if rng.random() < 0.6 else float(rng.uniform(0.1, 0.6)),
    )
    name = f"site-{seed}"
    return Site(name, optics, perturb_look_mix(SLURRY_MIX, rng, name))


_STYLES: dict[str, Site] = {}


def register_site_style(name: str, optics: SiteOptics, look_mix: LookMix = SLURRY_MIX) -> Site:
    """Add a named site; a duplicate name raises."""
    if name in _STYLES:
        raise ValueError(f"site style {name!r} is already registered")
    site = Site(name, optics, look_mix)
    _STYLES[name] = site
    return site


def get_site_style(name: str) -> Site:
    """The named site; an unknown name raises naming the known ones."""
    try:
        return _STYLES[name]
    except KeyError:
        raise ValueError(
            f"unknown site style {name!r}; known styles: {', '.join(_STYLES)}"
        ) from None


def site_style_names() -> tuple[str, ...]:
    """Names of the registered site styles."""
    return tuple(_STYLES)


register_site_style("clean-8bit", SiteOptics(background_level=50.0, haze=0.8))
register_site_style(
    "bright-16bit",
    SiteOptics(
        background_level=90.0,
        exposure=1.5,
        gamma=1.2,
        vignetting=0.15,
        bit_depth=16,
        sensor_bits=12,
        read_noise=1.5,
        shot_gain=0.08,
    ),
)
register_site_style(
    "hazy-jpeg",
    SiteOptics(
        background_level=70.0,
        haze=1.8,
        contrast=0.65,
        defocus_sigma=1.2,
        jpeg_quality=40,
        read_noise=1.2,
    ),
)
register_site_style(
    "dark-noisy",
    SiteOptics(
        background_level=28.0,
        exposure=0.7,
        gamma=1.3,
        read_noise=4.0,
        shot_gain=0.3,
        vignetting=0.55,
        gradient_x=0.3,
    ),
)
register_site_style(
    "motion-blur", SiteOptics(background_level=55.0, motion_blur_px=7.0, motion_angle_deg=30.0)
)
register_site_style(
    "fouled-window", SiteOptics(background_level=60.0, fouling=0.6, contrast=0.8, gradient_y=0.3)
)

SITE_STYLES: Mapping[str, Site] = MappingProxyType(_STYLES)


def resolve_sites(sites: Site | int | Iterable[Site | int]) -> tuple[Site, ...]:
    """Sites from a site, a seed, or any mix of them (e.g. range(200))."""
    items: Iterable[Site | int] = [sites] if isinstance(sites, Site | int) else sites
    resolved = tuple(item if isinstance(item, Site) else draw_site(int(item)) for item in items)
    if not resolved:
        raise ValueError("sites must name at least one site")
    return resolved


def parse_site_range(text: str) -> range:
    """ "A-B" (inclusive, A <= B, both >= 0) as range(A, B + 1); bad text raises."""
    start, dash, end = text.strip().partition("-")
    try:
        low, high = int(start), int(end)
    except ValueError:
        raise ValueError(f"expected a site range A-B such as 0-199, got {text!r}") from None
    if not dash or low < 0 or high < low:
        raise ValueError(f"expected a site range A-B with 0 <= A <= B, got {text!r}")
    return range(low, high + 1)


# --- applying optics --------------------------------------------------------------


def illumination_field(
    optics: SiteOptics, *, top: int, left: int, height: int, width: int, frame: tuple[int, int]
) -> FloatImage:
    """The site's relative illumination (1 at the field centre) over a window of a
    frame of size (height, width) = frame."""
    frame_h, frame_w = frame
    ys = ((np.arange(top, top + height, dtype=np.float32) + 0.5) / frame_h) - np.float32(0.5)
    xs = ((np.arange(left, left + width, dtype=np.float32) + 0.5) / frame_w) - np.float32(0.5)
    rows = np.float32(1.0) - np.float32(2.0 * optics.vignetting) * ys * ys
    rows += np.float32(optics.gradient_y) * ys
    cols = -np.float32(2.0 * optics.vignetting) * xs * xs + np.float32(optics.gradient_x) * xs
    field = rows[:, None] + cols[None, :]
    return np.maximum(field, np.float32(0.2))


def _motion_kernel(length: float, angle_deg: float) -> npt.NDArray[np.float32]:
    size = max(3, math.ceil(length) | 1)
    kernel = np.zeros((size, size), dtype=np.float32)
    half = (size - 1) / 2.0
    dx = 0.5 * length * math.cos(math.radians(angle_deg))
    dy = 0.5 * length * math.sin(math.radians(angle_deg))
    start = (round((half - dx) * 16), round((half - dy) * 16))
    end = (round((half + dx) * 16), round((half + dy) * 16))
    cv2.line(kernel, start, end, 1.0, 1, cv2.LINE_AA, 4)
    total = float(kernel.sum())
    return kernel / np.float32(total if total > 0 else 1.0)


def apply_site_optics(
    canvas: FloatImage,
    optics: SiteOptics,
    rng: np.random.Generator,
    noise: FloatImage,
    illumination: FloatImage,
    *,
    fouling: FoulingSmudge | None = None,
    fouling_coverage: float = 0.0,
) -> npt.NDArray[np.uint8] | npt.NDArray[np.uint16]:
    """Turn a rendered scene into what this site's camera writes (uint8 or uint16).

    noise is a unit-variance field of the canvas's shape; illumination the site's
    relative light over the canvas (see `illumination_field`). Overwrites canvas.
    """
    if fouling is not None and fouling_coverage > 0.0:
        fouling.apply(canvas, fouling_coverage)
    level = np.float32(optics.background_level)
    if optics.contrast != 1.0:
        canvas -= level
        canvas *= np.float32(optics.contrast)
        canvas += level
    canvas *= illumination
    canvas *= np.float32(optics.exposure)
    if optics.defocus_sigma > 0.2:
        cv2.GaussianBlur(canvas, (0, 0), optics.defocus_sigma, dst=canvas)
    if optics.motion_blur_px >= 1.5:
        kernel = _motion_kernel(optics.motion_blur_px, optics.motion_angle_deg)
        cv2.filter2D(canvas, -1, kernel, dst=canvas, borderType=cv2.BORDER_REFLECT)
    np.minimum(canvas, np.float32(255.0), out=canvas)
    np.maximum(canvas, np.float32(0.0), out=canvas)
    add_sensor_noise(canvas, noise, optics.read_noise, optics.shot_gain)
    np.clip(canvas, 0.0, 255.0, out=canvas)
    canvas *= np.float32(1.0 / 255.0)
    if optics.gamma != 1.0:
        cv2.pow(canvas, 1.0 / optics.gamma, dst=canvas)
    if optics.bit_depth == 16:
        canvas *= np.float32((1 << optics.sensor_bits) - 1)
        canvas += np.float32(0.5)
        return canvas.astype(np.uint16)
    canvas *= np.float32(255.0)
    image = np.asarray(cv2.convertScaleAbs(canvas), dtype=np.uint8)
    if optics.jpeg_quality is not None:
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, optics.jpeg_quality])
        if ok:
            image = np.asarray(cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE), dtype=np.uint8)
    return image


def with_optics(site: Site, **changes: Any) -> Site:
    """A copy of site with some optics fields changed (validated)."""
    return replace(site, optics=replace(site.optics, **changes))
