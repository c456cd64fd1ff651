"""Renderers for one particle of each class, shared by crop mode and frame mode.

Each renderer draws the particle's light into a small patch around it, blurs the
patch by the optics (plus any defocus) and adds it to a float canvas, so a
particle costs in proportion to its own size, not the frame's. Drawing is done
on 8-bit scratch images because OpenCV anti-aliases only those; a 1/16 px fixed
point (shift=4) keeps thin needles from snapping to whole pixels.

Looks, from the real EasyViewer crops: a CEX needle shows as a thin bright line,
or, when wide, as two bright edges around a darker core; needles come in bundles
along a common axis with a few strays crossing. A PG agglomerate is a compact,
lumpy blob of many small bright grains with darker pores, much brighter overall.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import numpy.typing as npt

from monitor.simulator.background import BBox, FloatImage

# Blur of an object in the focal plane: the real crops are soft even where sharp.
OPTICS_SIGMA = 1.6
# OpenCV drawing in fixed point: coordinates are multiplied by 2**SHIFT.
SHIFT = 4
FIXED = 1 << SHIFT


def _fixed(points: npt.NDArray[np.float64]) -> npt.NDArray[np.int32]:
    """Float pixel coordinates to OpenCV fixed-point integers."""
    return np.round(points * FIXED).astype(np.int32)


def _grain_field(rng: np.random.Generator, height: int, width: int) -> FloatImage:
    """Uniform 0..1 noise with grains 2-3 px across, drawn at half size (cheap)."""
    small = rng.random(((height + 1) // 2, (width + 1) // 2), dtype=np.float32)
    return np.asarray(
        cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR), dtype=np.float32
    )


def _add_patch(
    canvas: FloatImage,
    patch: FloatImage,
    x0: int,
    y0: int,
    transmission: FloatImage | None = None,
) -> None:
    """Add a patch whose top-left corner sits at (x0, y0); parts off the canvas are dropped.

    transmission, when given, first multiplies the canvas: an opaque particle hides
    part of what lies behind it.
    """
    height, width = canvas.shape
    size_y, size_x = patch.shape
    cx0, cy0 = max(0, x0), max(0, y0)
    cx1, cy1 = min(width, x0 + size_x), min(height, y0 + size_y)
    if cx1 <= cx0 or cy1 <= cy0:
        return
    sub = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    region = canvas[cy0:cy1, cx0:cx1]
    if transmission is not None:
        region *= transmission[sub]
    region += patch[sub]


def _clip_box(corners: tuple[float, float, float, float], width: int, height: int) -> BBox | None:
    """(x, y, w, h) of the float box (x0, y0, x1, y1) clipped to the canvas, or None."""
    x0, y0, x1, y1 = corners
    left, top = max(0, math.floor(x0)), max(0, math.floor(y0))
    right, bottom = min(width, math.ceil(x1)), min(height, math.ceil(y1))
    if right - left < 1 or bottom - top < 1:
        return None
    return left, top, right - left, bottom - top


def needle_corners(
    centres: npt.NDArray[np.float64],
    angles_rad: npt.NDArray[np.float64],
    lengths: npt.NDArray[np.float64],
    widths: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Corners of each needle's rectangle, in order around it: (count, 4, 2)."""
    directions = np.stack((np.cos(angles_rad), np.sin(angles_rad)), axis=1)
    normals = np.stack((-directions[:, 1], directions[:, 0]), axis=1)
    tips = (lengths / 2.0)[:, None] * directions
    sides = (widths / 2.0)[:, None] * normals
    return np.stack(
        (
            centres - tips - sides,
            centres + tips - sides,
            centres + tips + sides,
            centres - tips + sides,
        ),
        axis=1,
    )


def draw_needle_bundle(
    canvas: FloatImage,
    rng: np.random.Generator,
    centre: tuple[float, float],
    length: float,
    angle_deg: float,
    *,
    defocus: float = 0.0,
    brightness: float = 1.0,
) -> BBox | None:
    """Draw a CEX bundle: several thin straight needles around one axis.

    length is the longest needle in pixels, angle_deg the bundle axis (0 = along
    +x, counter-clockwise in image coordinates), defocus an extra Gaussian blur
    sigma in pixels, brightness a multiplier on the needles' light. Returns the
    bundle's box (x, y, w, h) clipped to the canvas, or None when it falls outside.
    """
    height, width = canvas.shape
    sigma = math.hypot(OPTICS_SIGMA, defocus)
    if rng.random() < 0.3:
        # A packed bundle: many wide needles side by side read as one bright,
        # granular bar (the reference crops CEX (2) and CEX (3)).
        count = int(rng.integers(20, 40))
        half_width = length * float(rng.uniform(0.05, 0.1))
        spread = float(rng.uniform(0.5, 2.0))
        brightness *= 0.55
    else:
        count = int(rng.integers(6, 24))
        half_width = length * float(rng.uniform(0.03, 0.15))
        spread = float(rng.uniform(1.0, 6.0))

    angles = angle_deg + rng.normal(0.0, spread, count)
    strays = rng.random(count) < 0.15
    angles[strays] += rng.uniform(-35.0, 35.0, int(strays.sum()))
    angles = np.radians(angles)
    lengths = length * rng.uniform(0.4, 1.0, count)
    lengths[0] = length
    along = rng.uniform(-0.5, 0.5, count) * (length - lengths)
    across = np.clip(rng.normal(0.0, half_width / 2.0, count), -half_width, half_width)
    widths = np.clip(rng.lognormal(math.log(3.0), 0.5, count), 1.0, 10.0)
    edge_light = brightness * rng.uniform(35.0, 100.0, count)
    core_share = rng.uniform(0.2, 0.55, count)

    axis = math.radians(angle_deg)
    axis_dir = np.array([math.cos(axis), math.sin(axis)])
    axis_normal = np.array([-math.sin(axis), math.cos(axis)])
    needle_centres = (
        np.asarray(centre, dtype=np.float64)
        + along[:, None] * axis_dir
        + across[:, None] * axis_normal
    )
    corners = needle_corners(needle_centres, angles, lengths, widths)

    margin = math.ceil(3.0 * sigma) + 2
    x0 = math.floor(float(corners[..., 0].min())) - margin
    y0 = math.floor(float(corners[..., 1].min())) - margin
    x1 = math.ceil(float(corners[..., 0].max())) + margin + 1
    y1 = math.ceil(float(corners[..., 1].max())) + margin + 1
    shape = (y1 - y0, x1 - x0)
    quads = _fixed(corners - np.array([x0, y0], dtype=np.float64))
    tips_fixed = (quads[:, 0] + quads[:, 3]) // 2, (quads[:, 1] + quads[:, 2]) // 2
    edge_values = np.round(edge_light).astype(np.int32).tolist()
    core_values = np.round(edge_light * core_share).astype(np.int32).tolist()
    thicknesses = np.maximum(1, np.round(widths)).astype(np.int32).tolist()
    # Needles are drawn round-robin into a few 8-bit layers whose sum is the
    # bundle's light: crossings add up, without a float scratch per needle.
    layers = [np.zeros(shape, dtype=np.uint8) for _ in range(3)]
    for index in range(count):
        layer = layers[index % len(layers)]
        if widths[index] >= 3.0:
            # Wide needle: light scatters at its faces, so two bright edges
            # around a dimmer core.
            quad = quads[index]
            cv2.fillConvexPoly(layer, quad, core_values[index], cv2.LINE_AA, SHIFT)
            cv2.polylines(layer, [quad], True, edge_values[index], 1, cv2.LINE_AA, SHIFT)
        else:
            cv2.line(
                layer,
                tips_fixed[0][index].tolist(),
                tips_fixed[1][index].tolist(),
                edge_values[index],
                thicknesses[index],
                cv2.LINE_AA,
                SHIFT,
            )
    patch = layers[0].astype(np.float32)
    for layer in layers[1:]:
        patch += layer

    # Crystal surfaces are not perfectly smooth: a fine multiplicative speckle
    # gives the granular look of dense bundles in the real images.
    speckle = _grain_field(rng, *patch.shape)
    patch *= 0.5 + 1.0 * speckle
    patch = _blur(patch, sigma)
    _add_patch(canvas, patch, x0, y0)

    grow = 1.0 + defocus
    outer = (
        float(corners[..., 0].min()) - grow,
        float(corners[..., 1].min()) - grow,
        float(corners[..., 0].max()) + grow,
        float(corners[..., 1].max()) + grow,
    )
    return _clip_box(outer, width, height)


def _outline(
    rng: np.random.Generator, radius: float, aspect: float, angle: float
) -> npt.NDArray[np.float64]:
    """A lumpy closed outline around (0, 0): a circle bent by random low harmonics."""
    phis = np.linspace(0.0, 2.0 * math.pi, 96, endpoint=False)
    harmonics = np.arange(2, 8, dtype=np.float64)
    amplitudes = rng.uniform(0.0, 0.22, harmonics.size) / harmonics**0.6
    phases = rng.uniform(0.0, 2.0 * math.pi, harmonics.size)
    waves = np.cos(harmonics[:, None] * phis[None, :] + phases[:, None])
    radii = 1.0 + amplitudes @ waves
    radii *= radius / max(1.0, float(radii.max()) / 1.15)
    xs = radii * np.cos(phis)
    ys = aspect * radii * np.sin(phis)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    return np.stack((cos_a * xs - sin_a * ys, sin_a * xs + cos_a * ys), axis=1)


def _sprinkle(
    rng: np.random.Generator,
    field: FloatImage,
    count: int,
    value_range: tuple[float, float],
    sigma: float,
) -> None:
    """Add count dots at random places: impulses that a later blur of `sigma` turns
    into Gaussian dots peaking at their drawn value."""
    if count <= 0:
        return
    ys = rng.integers(0, field.shape[0], count)
    xs = rng.integers(0, field.shape[1], count)
    heights = rng.uniform(*value_range, count) * (2.0 * math.pi * sigma * sigma)
    np.add.at(field, (ys, xs), heights.astype(np.float32))


def _blur(image: FloatImage, sigma: float) -> FloatImage:
    """Gaussian blur; wide ones run at half size, several times cheaper and alike to the eye."""
    if sigma <= 2.5:
        return np.asarray(cv2.GaussianBlur(image, (0, 0), sigma), dtype=np.float32)
    height, width = image.shape
    small = cv2.resize(image, ((width + 1) // 2, (height + 1) // 2), interpolation=cv2.INTER_AREA)
    # Area downsampling and linear upsampling already blur by about one pixel.
    small = cv2.GaussianBlur(small, (0, 0), math.sqrt(sigma * sigma - 1.0) / 2.0)
    return np.asarray(
        cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR), dtype=np.float32
    )


def draw_agglomerate(
    canvas: FloatImage,
    rng: np.random.Generator,
    centre: tuple[float, float],
    diameter: float,
    angle_deg: float,
    *,
    defocus: float = 0.0,
    brightness: float = 1.0,
) -> BBox | None:
    """Draw a PG agglomerate: a compact, rough-edged blob of small bright grains.

    diameter is the blob's size in pixels along its long side, angle_deg turns its
    outline, defocus is an extra Gaussian blur sigma in pixels and brightness
    scales its light. The blob partly hides what lies behind it. Returns its box
    (x, y, w, h) clipped to the canvas, or None when it falls outside.
    """
    height, width = canvas.shape
    sigma = math.hypot(OPTICS_SIGMA, defocus)
    radius = diameter / 2.0
    aspect = float(rng.uniform(0.75, 1.0))
    outline = _outline(rng, radius, aspect, math.radians(angle_deg))

    half = math.ceil(radius * 1.2 + 3.0 * sigma + 6.0)
    cx, cy = centre
    x0, y0 = round(cx) - half, round(cy) - half
    size = 2 * half + 1
    small_size = half + 1
    local_centre = np.array([cx - x0, cy - y0])

    # Roughen the edge at half size: smooth the outline, add grain-sized noise
    # and threshold, so the rim breaks into loose grains like the real ones.
    small_mask = np.zeros((small_size, small_size), dtype=np.uint8)
    cv2.fillPoly(small_mask, [_fixed((outline + local_centre) / 2.0)], 255, cv2.LINE_AA, SHIFT)
    smooth = cv2.GaussianBlur(
        small_mask.astype(np.float32) * np.float32(1.0 / 255.0), (0, 0), max(0.8, radius * 0.025)
    )
    grains = rng.random((small_size, small_size), dtype=np.float32) - np.float32(0.5)
    smooth += grains * (0.7 + 0.5 * smooth)
    body = (cv2.resize(smooth, (size, size), interpolation=cv2.INTER_LINEAR) > 0.5).astype(
        np.float32
    )

    glare = rng.random() < 0.2
    # Glare: some agglomerates face the light and saturate the camera, leaving
    # only dark specks of texture (see the reference crop PG (567)).
    base = float(rng.uniform(150.0, 200.0) if glare else rng.uniform(45.0, 105.0)) * brightness
    axis = np.arange(size, dtype=np.float32)
    tilt = float(rng.uniform(0.0, 2.0 * math.pi))
    slope = float(rng.uniform(0.0, 0.3)) / radius
    across = (axis - np.float32(local_centre[0])) * np.float32(slope * math.cos(tilt))
    down = (axis - np.float32(local_centre[1])) * np.float32(slope * math.sin(tilt))
    shading = across[None, :] + down[:, None]
    shading += np.float32(1.0)
    # Clumps: the agglomerate is made of sub-agglomerates a few grains across.
    clump_seeds = rng.random((size // 10 + 2, size // 10 + 2), dtype=np.float32)
    clumps = np.asarray(
        cv2.resize(clump_seeds, (size, size), interpolation=cv2.INTER_CUBIC), dtype=np.float32
    )
    clumps *= np.float32(0.9)
    clumps += np.float32(0.55)
    shading *= clumps
    light = shading
    light *= np.float32(base)

    area = math.pi * radius * radius * aspect
    grain_light = (0.3 if glare else 1.0) * brightness
    # Coarse grains (bright) and pores (dark) share one half-size field.
    coarse = np.zeros((small_size, small_size), dtype=np.float32)
    coarse_sigma = float(rng.uniform(1.0, 1.5))
    _sprinkle(
        rng,
        coarse,
        int(area / rng.uniform(80.0, 200.0)),
        (20.0 * grain_light, 80.0 * grain_light),
        coarse_sigma,
    )
    _sprinkle(
        rng, coarse, int(area / rng.uniform(60.0, 200.0)), (-1.0 * base, -0.3 * base), coarse_sigma
    )
    coarse = np.asarray(cv2.GaussianBlur(coarse, (0, 0), coarse_sigma), dtype=np.float32)
    light += cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR) * clumps
    # Fine grains: impulses that the final blur rounds into dots.
    light_sigma = math.hypot(sigma, float(rng.uniform(1.0, 1.8)))
    _sprinkle(
        rng,
        light,
        int(area / rng.uniform(7.0, 16.0)),
        (20.0 * grain_light, 90.0 * grain_light),
        light_sigma,
    )

    np.maximum(light, np.float32(0.1 * base), out=light)
    light *= body
    # A brighter rim where the outer grains catch the light.
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    rim = body - cv2.erode(body, kernel)
    light += rim * np.float32(rng.uniform(0.0, 60.0) * brightness)

    light = _blur(light, light_sigma)
    # How much of the background shows through: smooth enough to compute at
    # half size from the outline field.
    opacity = float(rng.uniform(0.4, 0.7))
    cover = np.clip((smooth - np.float32(0.5)) * np.float32(3.0) + np.float32(0.5), 0.0, 1.0)
    cover = cv2.GaussianBlur(cover, (0, 0), max(0.5, sigma / 2.0))
    transmission = np.asarray(
        cv2.resize(cover, (size, size), interpolation=cv2.INTER_LINEAR), dtype=np.float32
    )
    transmission *= np.float32(-opacity)
    transmission += np.float32(1.0)
    _add_patch(canvas, light, x0, y0, transmission)

    bx, by, bw, bh = cv2.boundingRect(body.astype(np.uint8))
    if bw == 0 or bh == 0:
        return None
    grow = defocus
    outer = (x0 + bx - grow, y0 + by - grow, x0 + bx + bw + grow, y0 + by + bh + grow)
    return _clip_box(outer, width, height)
