"""Looks: the ways one particle of each class can appear in a working slurry.

A look is a renderer with the same call for every look: it draws one particle of
its class into a float canvas around `centre`, `size` pixels across (a CEX look's
longest extent, a PG look's diameter), turned by `angle_deg`, blurred by an extra
`defocus` sigma, and returns the box (x, y, w, h) of the particle it drew,
clipped to the canvas (None when it fell outside). Crop mode and frame mode call
the same renderers, so the ground truth is the same in both.

The looks, from what real in-situ images of this process show:

PG (phenylglycine) agglomerates
    granular        bright lumpy blob of small grains and pores (the original look)
    overexposed     smooth, clipped white core with a speckled rim
    needle_crossed  agglomerate seen through and behind CEX needles: bright straight
                    needle edges cross its texture, some in front, some behind
    defocused       hazy, low-contrast disc with a soft rim and a fine speckle
    fused           a few spheres fused together
CEX (cephalexin) needles
    bundle          bundle of thin needles around one axis (the original look)
    dense           needles packed edge to edge, filling `size` in every direction
    single          one to three long single needles
    over_blob       needles in front of an out-of-focus blob; still CEX, the
                    needles being the particle at the centre

A `LookMix` gives each look a weight within its class; a site draws one (see
`monitor.simulator.sites`). The "classic" mix is the two original looks only and
draws no random numbers to choose them, so classic output is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import cv2
import numpy as np
import numpy.typing as npt

from monitor.simulator.background import BBox, FloatImage
from monitor.simulator.labels import CEX, LABELS, PG
from monitor.simulator.particles import (
    OPTICS_SIGMA,
    SHIFT,
    _add_patch,
    _blur,
    _clip_box,
    _fixed,
    _grain_field,
    _outline,
    _sprinkle,
    draw_agglomerate,
    draw_needle_bundle,
    needle_corners,
)


class LookRenderer(Protocol):
    """Draws one particle into canvas; returns its clipped box or None."""

    def __call__(
        self,
        canvas: FloatImage,
        rng: np.random.Generator,
        centre: tuple[float, float],
        size: float,
        angle_deg: float,
        *,
        defocus: float = 0.0,
    ) -> BBox | None: ...


@dataclass(frozen=True)
class Look:
    """A named way to draw a particle of one class."""

    name: str
    label: str
    draw: LookRenderer
    description: str


_LOOKS: dict[str, Look] = {}


def register_look(look: Look) -> Look:
    """Add a look to the registry; a duplicate name or unknown label raises."""
    if look.name in _LOOKS:
        raise ValueError(f"look {look.name!r} is already registered")
    if look.label not in LABELS:
        raise ValueError(f"look {look.name!r} has unknown label {look.label!r}")
    _LOOKS[look.name] = look
    return look


def get_look(name: str) -> Look:
    """The registered look of this name; an unknown name raises naming the known ones."""
    try:
        return _LOOKS[name]
    except KeyError:
        raise ValueError(f"unknown look {name!r}; known looks: {', '.join(_LOOKS)}") from None


def look_names(label: str | None = None) -> tuple[str, ...]:
    """Registered look names, of one class or all, in registration order."""
    return tuple(name for name, look in _LOOKS.items() if label is None or look.label == label)


# --- drawing helpers ------------------------------------------------------------


def _draw_needles(
    canvas: FloatImage,
    rng: np.random.Generator,
    *,
    centres: npt.NDArray[np.float64],
    angles_rad: npt.NDArray[np.float64],
    lengths: npt.NDArray[np.float64],
    widths: npt.NDArray[np.float64],
    edge_light: npt.NDArray[np.float64],
    sigma: float,
    layers: int = 3,
) -> tuple[float, float, float, float] | None:
    """Straight needles as in `draw_needle_bundle`, from explicit geometry.

    Wide needles (>= 3 px) show two bright edges around a dimmer core, thin ones a
    bright line. Returns the unclipped float extent (x0, y0, x1, y1) of all needles.
    """
    count = len(centres)
    if count == 0:
        return None
    corners = needle_corners(centres, angles_rad, lengths, widths)
    height, width = canvas.shape
    margin = math.ceil(3.0 * sigma) + 2
    # Only the part over the canvas (plus the blur margin) is worth drawing.
    x0 = max(math.floor(float(corners[..., 0].min())), -margin) - margin
    y0 = max(math.floor(float(corners[..., 1].min())), -margin) - margin
    x1 = min(math.ceil(float(corners[..., 0].max())), width + margin) + margin + 1
    y1 = min(math.ceil(float(corners[..., 1].max())), height + margin) + margin + 1
    if x1 <= x0 or y1 <= y0:
        return None
    shape = (y1 - y0, x1 - x0)
    quads = _fixed(corners - np.array([x0, y0], dtype=np.float64))
    ends_a = ((quads[:, 0] + quads[:, 3]) // 2).tolist()
    ends_b = ((quads[:, 1] + quads[:, 2]) // 2).tolist()
    core_share = rng.uniform(0.2, 0.55, count)
    edge_values = np.clip(np.round(edge_light), 0, 255).astype(np.int32).tolist()
    core_values = np.clip(np.round(edge_light * core_share), 0, 255).astype(np.int32).tolist()
    thicknesses = np.maximum(1, np.round(widths)).astype(np.int32).tolist()
    wide = (widths >= 3.0).tolist()
    planes = [np.zeros(shape, dtype=np.uint8) for _ in range(layers)]
    for index in range(count):
        plane = planes[index % layers]
        if wide[index]:
            quad = quads[index]
            cv2.fillConvexPoly(plane, quad, core_values[index], cv2.LINE_AA, SHIFT)
            cv2.polylines(plane, [quad], True, edge_values[index], 1, cv2.LINE_AA, SHIFT)
        else:
            cv2.line(
                plane,
                ends_a[index],
                ends_b[index],
                edge_values[index],
                thicknesses[index],
                cv2.LINE_AA,
                SHIFT,
            )
    patch = planes[0].astype(np.float32)
    for plane in planes[1:]:
        patch += plane
    patch *= np.float32(0.5) + _grain_field(rng, *patch.shape)
    _add_patch(canvas, _blur(patch, sigma), x0, y0)
    return (
        float(corners[..., 0].min()),
        float(corners[..., 1].min()),
        float(corners[..., 0].max()),
        float(corners[..., 1].max()),
    )


def _needles_through(
    canvas: FloatImage,
    rng: np.random.Generator,
    *,
    centre: tuple[float, float],
    reach: float,
    count: int,
    length_range: tuple[float, float],
    light_range: tuple[float, float],
    sigma: float,
) -> None:
    """count long needles crossing the disc of radius `reach` around centre, any angle."""
    offsets = rng.uniform(-reach, reach, (count, 2))
    centres = np.asarray(centre, dtype=np.float64) + offsets
    angles = rng.uniform(0.0, math.pi, count)
    lengths = rng.uniform(*length_range, count)
    widths = np.clip(rng.lognormal(math.log(4.0), 0.5, count), 1.5, 12.0)
    light = rng.uniform(*light_range, count)
    _draw_needles(
        canvas,
        rng,
        centres=centres,
        angles_rad=angles,
        lengths=lengths,
        widths=widths,
        edge_light=light,
        sigma=sigma,
    )


def _patch_frame(
    centre: tuple[float, float], half: int
) -> tuple[int, int, int, npt.NDArray[np.float64]]:
    """x0, y0, side and the local centre of a square patch of half-width `half`."""
    cx, cy = centre
    x0, y0 = round(cx) - half, round(cy) - half
    return x0, y0, 2 * half + 1, np.array([cx - x0, cy - y0])


def _soft_body(
    outline: npt.NDArray[np.float64], local_centre: npt.NDArray[np.float64], size: int, soft: float
) -> FloatImage:
    """A 0..1 filled outline at half resolution, blurred by `soft` px, resized to size."""
    small = (size + 1) // 2
    mask = np.zeros((small, small), dtype=np.uint8)
    cv2.fillPoly(mask, [_fixed((outline + local_centre) / 2.0)], 255, cv2.LINE_AA, SHIFT)
    body = mask.astype(np.float32) * np.float32(1.0 / 255.0)
    if soft > 0.3:
        body = np.asarray(cv2.GaussianBlur(body, (0, 0), soft / 2.0), dtype=np.float32)
    return np.asarray(cv2.resize(body, (size, size), interpolation=cv2.INTER_LINEAR), np.float32)


def _body_box(body: FloatImage, x0: int, y0: int, grow: float, canvas: FloatImage) -> BBox | None:
    bx, by, bw, bh = cv2.boundingRect((body > 0.5).astype(np.uint8))
    if bw == 0 or bh == 0:
        return None
    height, width = canvas.shape
    corners = (x0 + bx - grow, y0 + by - grow, x0 + bx + bw + grow, y0 + by + bh + grow)
    return _clip_box(corners, width, height)


# --- PG looks --------------------------------------------------------------------


def draw_granular(
    canvas: FloatImage,
    rng: np.random.Generator,
    centre: tuple[float, float],
    size: float,
    angle_deg: float,
    *,
    defocus: float = 0.0,
) -> BBox | None:
    """The original PG look: a bright lumpy blob of grains and pores."""
    return draw_agglomerate(canvas, rng, centre, size, angle_deg, defocus=defocus)


def draw_overexposed(
    canvas: FloatImage,
    rng: np.random.Generator,
    centre: tuple[float, float],
    size: float,
    angle_deg: float,
    *,
    defocus: float = 0.0,
) -> BBox | None:
    """PG facing the light: a smooth core far above full scale (clips white) and a
    band of dark and bright speckle where the outer grains scatter."""
    sigma = math.hypot(OPTICS_SIGMA, defocus)
    radius = size / 2.0
    outline = _outline(rng, radius, float(rng.uniform(0.75, 1.0)), math.radians(angle_deg))
    half = math.ceil(radius * 1.2 + 3.0 * sigma + 6.0)
    x0, y0, side, local = _patch_frame(centre, half)
    body = _soft_body(outline, local, side, max(1.0, radius * 0.03))
    # Distance from the edge decides core or rim: the rim is a band 10-25 % of the
    # radius wide, the core a plateau far above what the camera can record.
    inside = (body > 0.5).astype(np.uint8)
    depth = cv2.distanceTransform(inside, cv2.DIST_L2, 3)
    rim_width = max(4.0, radius * float(rng.uniform(0.1, 0.25)))
    core = np.clip((depth - np.float32(rim_width)) * np.float32(2.0 / rim_width), 0.0, 1.0)
    core = core * core * (np.float32(3.0) - np.float32(2.0) * core)
    level = float(rng.uniform(450.0, 700.0))
    light = core * np.float32(level)
    rim = body - core * body
    speckle = np.zeros_like(light)
    area = math.pi * radius * radius
    _sprinkle(rng, speckle, int(area / rng.uniform(4.0, 9.0)), (60.0, 220.0), 1.0)
    _sprinkle(rng, speckle, int(area / rng.uniform(5.0, 10.0)), (-160.0, -60.0), 1.0)
    speckle = np.asarray(cv2.GaussianBlur(speckle, (0, 0), 1.0), dtype=np.float32)
    light += rim * (np.float32(rng.uniform(110.0, 200.0)) + speckle)
    np.maximum(light, 0.0, out=light)
    light = _blur(light, sigma)
    transmission = np.float32(1.0) - np.float32(rng.uniform(0.6, 0.9)) * body
    _add_patch(canvas, light, x0, y0, transmission)
    return _body_box(body, x0, y0, defocus, canvas)


def draw_needle_crossed(
    canvas: FloatImage,
    rng: np.random.Generator,
    centre: tuple[float, float],
    size: float,
    angle_deg: float,
    *,
    defocus: float = 0.0,
) -> BBox | None:
    """A PG agglomerate in a needle slurry: needles behind it show through its
    translucent body, needles in front cross its texture with bright straight edges."""
    sigma = math.hypot(OPTICS_SIGMA, defocus)
    reach = 0.4 * size
    lengths = (1.0 * size, 2.2 * size)
    _needles_through(
        canvas,
        rng,
        centre=centre,
        reach=reach,
        count=int(rng.integers(2, 7)),
        length_range=lengths,
        light_range=(40.0, 110.0),
        sigma=sigma + 0.5,
    )
    box = draw_agglomerate(
        canvas,
        rng,
        centre,
        size,
        angle_deg,
        defocus=defocus,
        brightness=float(rng.uniform(0.6, 0.9)),
    )
    _needles_through(
        canvas,
        rng,
        centre=centre,
        reach=reach,
        count=int(rng.integers(2, 7)),
        length_range=lengths,
        light_range=(60.0, 150.0),
        sigma=sigma,
    )
    return box


def draw_defocused(
    canvas: FloatImage,
    rng: np.random.Generator,
    centre: tuple[float, float],
    size: float,
    angle_deg: float,
    *,
    defocus: float = 0.0,
) -> BBox | None:
    """PG away from the focal plane: a hazy, low-contrast disc with a soft rim and a
    faint fine speckle."""
    radius = size / 2.0
    soft = radius * float(rng.uniform(0.08, 0.2)) + defocus
    outline = _outline(rng, radius, float(rng.uniform(0.8, 1.0)), math.radians(angle_deg))
    half = math.ceil(radius * 1.2 + 2.0 * soft + 6.0)
    x0, y0, side, local = _patch_frame(centre, half)
    body = _soft_body(outline, local, side, soft)
    glow = body * np.float32(rng.uniform(45.0, 95.0))
    # A broad shading, brighter towards one side.
    axis = (np.arange(side, dtype=np.float32) - np.float32(half)) / np.float32(max(1.0, radius))
    tilt = float(rng.uniform(0.0, 2.0 * math.pi))
    shading = (
        np.float32(1.0)
        + np.float32(0.25 * math.cos(tilt)) * axis[None, :]
        + np.float32(0.25 * math.sin(tilt)) * axis[:, None]
    )
    glow *= shading
    speckle = np.zeros_like(glow)
    _sprinkle(
        rng, speckle, int(math.pi * radius * radius / rng.uniform(5.0, 10.0)), (6.0, 18.0), 0.9
    )
    speckle = np.asarray(cv2.GaussianBlur(speckle, (0, 0), 0.9), dtype=np.float32)
    glow += speckle * body
    transmission = np.float32(1.0) - np.float32(rng.uniform(0.05, 0.25)) * body
    _add_patch(canvas, glow, x0, y0, transmission)
    return _body_box(body, x0, y0, 0.0, canvas)


def draw_fused(
    canvas: FloatImage,
    rng: np.random.Generator,
    centre: tuple[float, float],
    size: float,
    angle_deg: float,
    *,
    defocus: float = 0.0,
) -> BBox | None:
    """Two to five roughly spherical PG particles grown into one another: each a
    disc with a bright rim and a softly lit, finely grained interior."""
    sigma = math.hypot(OPTICS_SIGMA, defocus)
    count = int(rng.integers(2, 6))
    radii = rng.uniform(0.22, 0.38, count) * size
    offsets = np.zeros((count, 2))
    for index in range(1, count):
        anchor = offsets[int(rng.integers(0, index))]
        direction = float(rng.uniform(0.0, 2.0 * math.pi))
        reach = (radii[index] + radii[int(rng.integers(0, index))]) * float(rng.uniform(0.5, 0.85))
        offsets[index] = anchor + reach * np.array([math.cos(direction), math.sin(direction)])
    # Centre the cluster and scale it so its extent is about `size`.
    lows = (offsets - radii[:, None]).min(axis=0)
    highs = (offsets + radii[:, None]).max(axis=0)
    offsets -= (lows + highs) / 2.0
    scale = size / max(1.0, float((highs - lows).max()))
    offsets *= scale
    radii *= scale
    turn = math.radians(angle_deg)
    rotation = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    offsets = offsets @ rotation.T

    half = math.ceil(size / 2.0 * 1.15 + 3.0 * sigma + 6.0)
    x0, y0, side, local = _patch_frame(centre, half)
    ys, xs = np.ogrid[0:side, 0:side]
    light = np.zeros((side, side), dtype=np.float32)
    body = np.zeros((side, side), dtype=np.float32)
    base = float(rng.uniform(90.0, 160.0))
    for index in range(count):
        cx, cy = local + offsets[index]
        r = float(radii[index])
        distance = np.sqrt(((xs - cx) ** 2 + (ys - cy) ** 2).astype(np.float32)) / np.float32(r)
        disc = np.clip((np.float32(1.0) - distance) * np.float32(r / 1.5), 0.0, 1.0)
        # Brighter towards the rim, where the light crosses more crystal.
        sphere = disc * (np.float32(0.8) + np.float32(0.35) * np.minimum(distance, 1.0) ** 3)
        sphere *= np.float32(base * float(rng.uniform(0.8, 1.2)))
        np.maximum(light, sphere, out=light)
        np.maximum(body, disc, out=body)
    grains = _grain_field(rng, side, side) - np.float32(0.5)
    light *= np.float32(1.0) + np.float32(0.9) * grains
    light = _blur(light, sigma)
    transmission = np.float32(1.0) - np.float32(rng.uniform(0.4, 0.7)) * body
    _add_patch(canvas, light, x0, y0, transmission)
    return _body_box(body, x0, y0, defocus, canvas)


# --- CEX looks -------------------------------------------------------------------


def draw_bundle(
    canvas: FloatImage,
    rng: np.random.Generator,
    centre: tuple[float, float],
    size: float,
    angle_deg: float,
    *,
    defocus: float = 0.0,
) -> BBox | None:
    """The original CEX look: a bundle of thin needles around one axis."""
    return draw_needle_bundle(canvas, rng, centre, size, angle_deg, defocus=defocus)


def draw_dense(
    canvas: FloatImage,
    rng: np.random.Generator,
    centre: tuple[float, float],
    size: float,
    angle_deg: float,
    *,
    defocus: float = 0.0,
) -> BBox | None:
    """Needles packed edge to edge over a square `size` across, along one to three
    axes: the thick CEX mat that fills real crops."""
    height, width = canvas.shape
    sigma = math.hypot(OPTICS_SIGMA, defocus)
    side = 0.8 * size
    axes = angle_deg + rng.uniform(-60.0, 60.0, int(rng.integers(1, 4)))
    axes[0] = angle_deg
    mean_length = 0.75 * size
    mean_width = 4.5
    count = int(min(500, max(20, 1.3 * side * side / (mean_length * mean_width))))
    centres = np.asarray(centre, dtype=np.float64) + rng.uniform(-side / 2, side / 2, (count, 2))
    choice = rng.integers(0, len(axes), count)
    angles = np.radians(axes[choice] + rng.normal(0.0, float(rng.uniform(2.0, 8.0)), count))
    lengths = size * rng.uniform(0.45, 1.05, count)
    widths = np.clip(rng.lognormal(math.log(3.5), 0.5, count), 1.0, 12.0)
    light = rng.uniform(25.0, 75.0, count)
    _draw_needles(
        canvas,
        rng,
        centres=centres,
        angles_rad=angles,
        lengths=lengths,
        widths=widths,
        edge_light=light,
        sigma=sigma,
        layers=4,
    )
    grow = 1.0 + defocus
    half = side / 2.0 + grow
    return _clip_box(
        (centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half), width, height
    )


def draw_single(
    canvas: FloatImage,
    rng: np.random.Generator,
    centre: tuple[float, float],
    size: float,
    angle_deg: float,
    *,
    defocus: float = 0.0,
) -> BBox | None:
    """One to three long single needles, near the given axis."""
    height, width = canvas.shape
    sigma = math.hypot(OPTICS_SIGMA, defocus)
    count = int(rng.integers(1, 4))
    angles = np.radians(angle_deg + rng.normal(0.0, 12.0, count))
    angles[0] = math.radians(angle_deg)
    lengths = size * rng.uniform(0.6, 1.0, count)
    lengths[0] = size
    across = np.array([-math.sin(math.radians(angle_deg)), math.cos(math.radians(angle_deg))])
    offsets = rng.normal(0.0, 0.06 * size, count)
    offsets[0] = 0.0
    centres = np.asarray(centre, dtype=np.float64) + offsets[:, None] * across
    widths = rng.uniform(2.0, 9.0, count)
    light = rng.uniform(60.0, 140.0, count)
    extent = _draw_needles(
        canvas,
        rng,
        centres=centres,
        angles_rad=angles,
        lengths=lengths,
        widths=widths,
        edge_light=light,
        sigma=sigma,
    )
    if extent is None:
        return None
    grow = 1.0 + defocus
    x0, y0, x1, y1 = extent
    return _clip_box((x0 - grow, y0 - grow, x1 + grow, y1 + grow), width, height)


def draw_over_blob(
    canvas: FloatImage,
    rng: np.random.Generator,
    centre: tuple[float, float],
    size: float,
    angle_deg: float,
    *,
    defocus: float = 0.0,
) -> BBox | None:
    """CEX needles in front of a large out-of-focus blob (a particle far behind).

    The blob is not a particle of the ground truth: the needles at the centre are,
    and they are what the box covers.
    """
    radius = size * float(rng.uniform(0.25, 0.45))
    shift = rng.normal(0.0, 0.12 * size, 2)
    blob_centre = (centre[0] + float(shift[0]), centre[1] + float(shift[1]))
    soft = radius * float(rng.uniform(0.25, 0.45))
    outline = _outline(rng, radius, float(rng.uniform(0.75, 1.0)), float(rng.uniform(0, math.pi)))
    half = math.ceil(radius * 1.2 + 2.0 * soft + 6.0)
    x0, y0, side, local = _patch_frame(blob_centre, half)
    body = _soft_body(outline, local, side, soft)
    glow = body * np.float32(rng.uniform(50.0, 110.0))
    _add_patch(canvas, glow, x0, y0, np.float32(1.0) - np.float32(0.2) * body)
    return draw_needle_bundle(canvas, rng, centre, size, angle_deg, defocus=defocus)


for _look in (
    Look("granular", PG, draw_granular, "bright lumpy blob of grains and pores"),
    Look("overexposed", PG, draw_overexposed, "smooth clipped white core, speckled rim"),
    Look("needle_crossed", PG, draw_needle_crossed, "agglomerate crossed by needles"),
    Look("defocused", PG, draw_defocused, "hazy low-contrast disc, soft rim, fine speckle"),
    Look("fused", PG, draw_fused, "a few fused spheres"),
    Look("bundle", CEX, draw_bundle, "bundle of thin needles around one axis"),
    Look("dense", CEX, draw_dense, "needles packed edge to edge"),
    Look("single", CEX, draw_single, "one to three long single needles"),
    Look("over_blob", CEX, draw_over_blob, "needles in front of an out-of-focus blob"),
):
    register_look(_look)


# --- mixes -----------------------------------------------------------------------


def _frozen(weights: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType(dict(weights))


@dataclass(frozen=True)
class LookMix:
    """Weights of the looks (by name) within each class; zero or missing means never.

    Each class needs at least one look with a positive weight. Choosing draws one
    random number, except where a class has only one look, so a one-look-per-class
    mix draws exactly the random numbers the original simulator did.
    """

    name: str
    weights: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", _frozen(self.weights))
        for look_name, weight in self.weights.items():
            get_look(look_name)
            if not (math.isfinite(weight) and weight >= 0.0):
                raise ValueError(f"look mix {self.name!r}: weight of {look_name!r} must be >= 0")
        for label in LABELS:
            if not self._choices(label)[0]:
                raise ValueError(f"look mix {self.name!r} has no look with weight > 0 for {label}")

    def _choices(self, label: str) -> tuple[list[Look], npt.NDArray[np.float64]]:
        looks = [
            get_look(name)
            for name, weight in self.weights.items()
            if weight > 0.0 and get_look(name).label == label
        ]
        weights = np.array([self.weights[look.name] for look in looks], dtype=np.float64)
        return looks, weights

    def choose(
        self, label: str, rng: np.random.Generator, *, exclude: tuple[str, ...] = ()
    ) -> Look:
        """A look of class `label`, drawn by weight (no draw when there is one choice)."""
        looks, weights = self._choices(label)
        if exclude:
            kept = [i for i, look in enumerate(looks) if look.name not in exclude]
            if kept:
                looks, weights = [looks[i] for i in kept], weights[kept]
        if len(looks) == 1:
            return looks[0]
        cumulative = np.cumsum(weights)
        pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        return looks[min(pick, len(looks) - 1)]

    def share(self, look_name: str) -> float:
        """This look's share within its class."""
        look = get_look(look_name)
        _, weights = self._choices(look.label)
        return float(self.weights.get(look_name, 0.0)) / float(weights.sum())


CLASSIC_MIX = LookMix("classic", {"granular": 1.0, "bundle": 1.0})
SLURRY_MIX = LookMix(
    "slurry",
    {
        "granular": 0.3,
        "overexposed": 0.2,
        "needle_crossed": 0.2,
        "defocused": 0.15,
        "fused": 0.15,
        "bundle": 0.3,
        "dense": 0.35,
        "single": 0.15,
        "over_blob": 0.2,
    },
)
LOOK_MIXES: Mapping[str, LookMix] = MappingProxyType(
    {CLASSIC_MIX.name: CLASSIC_MIX, SLURRY_MIX.name: SLURRY_MIX}
)


def get_look_mix(mix: str | LookMix) -> LookMix:
    """A named mix ("classic", "slurry") or the mix itself."""
    if isinstance(mix, LookMix):
        return mix
    try:
        return LOOK_MIXES[mix]
    except KeyError:
        raise ValueError(
            f"unknown look mix {mix!r}; known mixes: {', '.join(LOOK_MIXES)}"
        ) from None


def single_look_mix(look_name: str) -> LookMix:
    """A mix that draws only this look for its class (and the classic look for the other)."""
    look = get_look(look_name)
    other = "bundle" if look.label == PG else "granular"
    return LookMix(f"only-{look_name}", {look_name: 1.0, other: 1.0})


def perturb_look_mix(base: LookMix, rng: np.random.Generator, name: str) -> LookMix:
    """A site's own mix: each weight of `base` times a random factor (mean 1)."""
    factors = rng.gamma(3.0, 1.0 / 3.0, len(base.weights)).tolist()
    weights = zip(base.weights.items(), factors, strict=True)
    return LookMix(name, {look: weight * factor for (look, weight), factor in weights})
