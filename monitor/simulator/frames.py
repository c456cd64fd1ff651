"""Frame mode: full probe frames with many particles, and the truth about each.

A frame is what the probe camera delivers (1360 x 1024 px by default): dark,
unevenly lit slurry with overlapping needle bundles (CEX) and granular
agglomerates (PG), some out of focus, optionally bubbles, empty frames and a
window that fouls over time. The number of PG particles in a frame is binomial
in the profile's PG share at the frame's time, so counting the truth over many
frames recovers the profile.

Particles are placed on a coarse occupancy grid so that they mostly do not pile
up: a simple segmenter can then find them, as it can in a moderately dense real
slurry. Lighting, the noise bank and the fouling shape are fixed per simulator,
like one probe in one batch.

`FrameConfig.density` thickens the slurry: 0 is the sparse placement above, 1 a
dense slurry where needles cover most of the frame and particles touch and
overlap. `look_mix` and `sites` work as in crop mode (see `CropSimulator`): with
neither, frames are the original simulator's; at a site each frame gets that
site's optics (a range of sites: each frame from one of them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

from monitor.simulator.background import (
    FloatImage,
    FoulingSmudge,
    IlluminationModel,
    NoiseBank,
    add_sensor_noise,
    draw_bubble,
    draw_slurry_haze,
    to_uint8,
)
from monitor.simulator.labels import CEX, PG
from monitor.simulator.looks import CLASSIC_MIX, Look, LookMix, get_look_mix
from monitor.simulator.profiles import ConstantProfile, PgProfile
from monitor.simulator.sites import (
    Site,
    apply_site_optics,
    draw_site,
    illumination_field,
    resolve_sites,
)

# Extra blur sigma (px) for out-of-focus particles; in-focus ones get up to 0.6.
DEFOCUS_SIGMA_RANGE = (2.5, 6.0)
IN_FOCUS_SIGMA_MAX = 0.6
# Placement: a candidate is accepted when at most this share of its footprint
# lies on already occupied cells; after PLACEMENT_TRIES the least crowded wins.
MAX_OVERLAP = 0.08
PLACEMENT_TRIES = 30
# PG sizes of the slurry looks in frames (diameter px), for FrameConfig.pg_diameter_px.
SLURRY_PG_DIAMETER_PX = (80.0, 400.0)
# At density 1, extra needle bundles whose footprints add up to this many frames.
DENSE_COVER_FRAMES = 1.0


# A pixel belongs to a particle's own mask where drawing it changed the canvas by at
# least this many grey levels (its light, or the darkening of what it hides): about
# half the light of a dim particle's edge after the optics' blur, and half the
# segmenter's default threshold (40), so the truth is the particle's visible
# silhouette, not its faint blur halo. Holes (pores, gaps between a bundle's needles
# narrower than the closing) are filled: area is the silhouette's.
TRUTH_LEVEL = 20.0
_TRUTH_CLOSE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
_TOUCH_KERNEL = np.ones((3, 3), np.uint8)


@dataclass(frozen=True)
class ParticleTruth:
    """What was drawn: class label, box (x, y, w, h) clipped to the frame, focus, look,
    and the size and shape of the particle's own mask (clipped to the frame, before
    compositing: what later particles hide of it still counts), in pixels.

    Sizes follow `monitor.imaging.particle_size.measure_mask` (pixels as unit squares,
    Feret diameters over their corners); all zero for a particle too faint to reach
    TRUTH_LEVEL anywhere. `touching`: its mask, dilated by 1 px, meets another
    particle's mask (touching or overlapping)."""

    label: str
    bbox: tuple[int, int, int, int]
    in_focus: bool
    look: str = ""
    area_px: float = 0.0
    ecd_px: float = 0.0
    feret_max_px: float = 0.0
    feret_min_px: float = 0.0
    aspect_ratio: float = 0.0
    touching: bool = False


@dataclass(frozen=True)
class FrameConfig:
    """What frames to draw. Lengths are in pixels, times in seconds."""

    width: int = 1360
    height: int = 1024
    particles: int = 30
    profile: PgProfile = field(default_factory=lambda: ConstantProfile(0.0))
    defocus_share: float = 0.2
    empty_share: float = 0.0
    bubbles: bool = False
    fouling: bool = False
    fouling_full_s: float = 3600.0
    slurry_haze: float = 0.3
    cex_length_px: tuple[float, float] = (110.0, 260.0)
    pg_diameter_px: tuple[float, float] = (90.0, 190.0)
    density: float = 0.0

    def __post_init__(self) -> None:
        if self.width < 64 or self.height < 64:
            raise ValueError(f"frame must be at least 64 x 64 px, got {self.width} x {self.height}")
        if self.particles < 0:
            raise ValueError(f"particles must be >= 0, got {self.particles}")
        for name in ("defocus_share", "empty_share", "density"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.fouling_full_s <= 0.0:
            raise ValueError(f"fouling_full_s must be > 0, got {self.fouling_full_s}")
        if self.slurry_haze < 0.0:
            raise ValueError(f"slurry_haze must be >= 0, got {self.slurry_haze}")
        for name in ("cex_length_px", "pg_diameter_px"):
            low, high = getattr(self, name)
            if not 4.0 <= low <= high:
                raise ValueError(
                    f"{name} must be (low, high) with 4 <= low <= high, got {low, high}"
                )


def _draw_region(
    centre: tuple[float, float], size: float, shape: tuple[int, ...]
) -> tuple[slice, slice]:
    """The part of the canvas a look drawing a particle `size` across at `centre` can
    change within its box: every look's box lies within about 0.8 size of the centre
    (plus the defocus growth), so 1.25 size + 40 px leaves room."""
    reach = 1.25 * size + 40.0
    cx, cy = centre
    height, width = shape[0], shape[1]
    x0, x1 = max(0, math.floor(cx - reach)), min(width, math.ceil(cx + reach) + 1)
    y0, y1 = max(0, math.floor(cy - reach)), min(height, math.ceil(cy + reach) + 1)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _own_mask(
    canvas: FloatImage,
    before: FloatImage,
    region: tuple[slice, slice],
    box: tuple[int, int, int, int],
) -> np.ndarray:
    """The particle's own pixels within its box (h x w uint8, 1 = particle): where its
    drawing changed the canvas by TRUTH_LEVEL or more, closed and with holes filled."""
    x, y, w, h = box
    mask = np.zeros((h, w), np.uint8)
    ys, xs = region
    # The box within the region (always all of it for the shipped looks).
    bx0, by0 = max(x, xs.start), max(y, ys.start)
    bx1, by1 = min(x + w, xs.stop), min(y + h, ys.stop)
    if bx1 <= bx0 or by1 <= by0:
        return mask
    earlier = before[by0 - ys.start : by1 - ys.start, bx0 - xs.start : bx1 - xs.start]
    change = np.abs(canvas[by0:by1, bx0:bx1] - earlier)
    mask[by0 - y : by1 - y, bx0 - x : bx1 - x] = change >= TRUTH_LEVEL
    # Padded first: erosion treats pixels beyond the image as set, so a mask that
    # fills its box (as every particle's does) would keep the box's corners.
    padded = cv2.copyMakeBorder(mask, 3, 3, 3, 3, cv2.BORDER_CONSTANT, value=0)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, _TRUTH_CLOSE)[3:-3, 3:-3]
    contours, _ = cv2.findContours(closed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled


def _mask_size(mask: np.ndarray) -> tuple[float, float, float, float, float]:
    """(area, ecd, feret max, feret min, aspect ratio) in pixels, by the definitions of
    `monitor.imaging.particle_size.measure_mask`: pixels are unit squares, the Feret
    diameters are caliper widths over their outer corners (rotating calipers on the
    hull). Repeated here because the simulator sits beside, not above, the imaging
    layer; tests/test_separation.py checks that the two agree."""
    area = float(np.count_nonzero(mask))
    if area == 0.0:
        return 0.0, 0.0, 0.0, 0.0, 0.0
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    boundary = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
    corners = np.concatenate([boundary + offset for offset in ((0, 0), (1, 0), (0, 1), (1, 1))])
    hull = cv2.convexHull(corners.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    feret_max = float(np.sqrt(((hull[:, None, :] - hull[None, :, :]) ** 2).sum(axis=2)).max())
    feret_min = math.inf
    for index in range(len(hull)):
        edge = hull[(index + 1) % len(hull)] - hull[index]
        length = math.hypot(edge[0], edge[1])
        if length > 0.0:
            distances = (hull - hull[index]) @ (np.array([-edge[1], edge[0]]) / length)
            feret_min = min(feret_min, float(distances.max() - distances.min()))
    ecd = math.sqrt(4.0 * area / math.pi)
    return area, ecd, feret_max, feret_min, feret_min / feret_max


def _window(
    mask: np.ndarray, box: tuple[int, int, int, int], window: tuple[int, int, int, int]
) -> np.ndarray:
    """The mask (placed at its box) seen through the frame window (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = window
    out = np.zeros((y1 - y0, x1 - x0), np.uint8)
    x, y, w, h = box
    ax0, ay0 = max(x0, x), max(y0, y)
    ax1, ay1 = min(x1, x + w), min(y1, y + h)
    if ax1 > ax0 and ay1 > ay0:
        out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = mask[ay0 - y : ay1 - y, ax0 - x : ax1 - x]
    return out


def touching_flags(boxes: list[tuple[int, int, int, int]], masks: list[np.ndarray]) -> list[bool]:
    """For each particle: does its mask, dilated by 1 px, meet another particle's mask?"""
    flags = [False] * len(boxes)
    for i, (xi, yi, wi, hi) in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            if flags[i] and flags[j]:
                continue
            xj, yj, wj, hj = boxes[j]
            # Where box i grown by 1 px meets box j: only there can they touch.
            x0, y0 = max(xi - 1, xj), max(yi - 1, yj)
            x1, y1 = min(xi + wi + 1, xj + wj), min(yi + hi + 1, yj + hj)
            if x1 <= x0 or y1 <= y0:
                continue
            near_i = _window(masks[i], boxes[i], (x0 - 1, y0 - 1, x1 + 1, y1 + 1))
            grown = cv2.dilate(near_i, _TOUCH_KERNEL)[1:-1, 1:-1]
            if np.any(grown & _window(masks[j], boxes[j], (x0, y0, x1, y1))):
                flags[i] = flags[j] = True
    return flags


def _particle_truths(
    drawn: list[tuple[_PlannedParticle, tuple[int, int, int, int], np.ndarray]],
) -> list[ParticleTruth]:
    touching = touching_flags([box for _, box, _ in drawn], [mask for _, _, mask in drawn])
    truths = []
    for (particle, box, mask), touches in zip(drawn, touching, strict=True):
        area, ecd, feret_max, feret_min, aspect = _mask_size(mask)
        truths.append(
            ParticleTruth(
                particle.label,
                box,
                particle.in_focus,
                particle.look.name,
                area_px=area,
                ecd_px=ecd,
                feret_max_px=feret_max,
                feret_min_px=feret_min,
                aspect_ratio=aspect,
                touching=touches,
            )
        )
    return truths


@dataclass(frozen=True)
class _PlannedParticle:
    label: str
    centre: tuple[float, float]
    size: float
    angle_deg: float
    defocus: float
    in_focus: bool
    look: Look


class _OccupancyGrid:
    """Coarse map of where particles already are, to spread new ones out.

    Footprints are capsules (a thick segment): a needle bundle along its axis, an
    agglomerate or bubble as a disc.
    """

    CELL = 8

    def __init__(self, height: int, width: int) -> None:
        self._grid = np.zeros(
            (math.ceil(height / self.CELL), math.ceil(width / self.CELL)), np.uint8
        )

    def _footprint(
        self, centre: tuple[float, float], half_length: float, radius: float, angle_deg: float
    ) -> tuple[int, int, npt.NDArray[np.uint8]] | None:
        """The capsule rasterised on the part of the grid it covers, with its offset."""
        cell = self.CELL
        dx = half_length * math.cos(math.radians(angle_deg)) / cell
        dy = half_length * math.sin(math.radians(angle_deg)) / cell
        cx, cy, r = centre[0] / cell, centre[1] / cell, max(1.0, radius / cell)
        x0 = max(0, math.floor(cx - abs(dx) - r))
        y0 = max(0, math.floor(cy - abs(dy) - r))
        x1 = min(self._grid.shape[1], math.ceil(cx + abs(dx) + r) + 1)
        y1 = min(self._grid.shape[0], math.ceil(cy + abs(dy) + r) + 1)
        if x1 <= x0 or y1 <= y0:
            return None
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.line(
            mask,
            (round(cx - dx - x0), round(cy - dy - y0)),
            (round(cx + dx - x0), round(cy + dy - y0)),
            1,
            max(1, round(2 * r)),
        )
        return x0, y0, mask

    def place(
        self,
        rng: np.random.Generator,
        half_length: float,
        radius: float,
        angle_deg: float,
        max_overlap: float = MAX_OVERLAP,
    ) -> tuple[float, float]:
        """Pick a centre with little overlap, mark it occupied and return it."""
        height, width = (n * self.CELL for n in self._grid.shape)
        reach = half_length + radius
        best: tuple[float, tuple[float, float], tuple[int, int, npt.NDArray[np.uint8]] | None]
        best = (math.inf, (width / 2.0, height / 2.0), None)
        for _ in range(PLACEMENT_TRIES):
            # Centres may sit near the edge so particles get cut by it, as in a
            # real frame, but at least about half of each stays visible.
            margin_x = min(0.3 * reach, width / 2.0)
            margin_y = min(0.3 * reach, height / 2.0)
            centre = (
                float(rng.uniform(margin_x, width - margin_x)),
                float(rng.uniform(margin_y, height - margin_y)),
            )
            footprint = self._footprint(centre, half_length, radius, angle_deg)
            if footprint is None:
                continue
            x0, y0, mask = footprint
            window = self._grid[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
            overlap = np.count_nonzero(window & mask) / max(1, int(np.count_nonzero(mask)))
            if overlap < best[0]:
                best = (overlap, centre, footprint)
            if overlap <= max_overlap:
                break
        _, centre, footprint = best
        if footprint is not None:
            x0, y0, mask = footprint
            window = self._grid[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
            window |= mask
        return centre


class FrameSimulator:
    """Renders probe frames with ground truth, deterministically under a seed.

    Successive `render` calls continue one random stream: the same seed and the
    same sequence of times give byte-identical frames. look_mix and sites as in
    `CropSimulator`, except that look_mix "slurry" without sites uses one site
    drawn from the seed (one probe), not a range. Frames are uint16 at a 16-bit site.
    """

    def __init__(
        self,
        config: FrameConfig | None = None,
        seed: int = 0,
        *,
        look_mix: str | LookMix | None = None,
        sites: Site | int | Iterable[Site | int] | None = None,
    ) -> None:
        self.config = config if config is not None else FrameConfig()
        mix = None if look_mix is None else get_look_mix(look_mix)
        if sites is None and mix is not None and mix is not CLASSIC_MIX:
            sites = draw_site(seed)
        self.sites: tuple[Site, ...] = () if sites is None else resolve_sites(sites)
        self.look_mix = mix
        self._site_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x517E]))
        self._site_fouling: dict[str, FoulingSmudge] = {}
        # The site of the frame rendered last (None before the first or when classic).
        self.last_site: Site | None = None
        probe_seed, noise_seed, fouling_seed, frame_seed = np.random.SeedSequence(seed).spawn(4)
        cfg = self.config
        self._lighting = IlluminationModel(
            np.random.default_rng(probe_seed), cfg.height, cfg.width
        ).render()
        self._noise = NoiseBank(np.random.default_rng(noise_seed), cfg.height, cfg.width)
        self._fouling = (
            FoulingSmudge(np.random.default_rng(fouling_seed), cfg.height, cfg.width)
            if cfg.fouling
            else None
        )
        self._rng = np.random.default_rng(frame_seed)

    def pg_fraction_at(self, t_seconds: float) -> float:
        """The profile's expected PG share at this time."""
        return self.config.profile.fraction_at(t_seconds)

    def render(
        self, t_seconds: float
    ) -> tuple[npt.NDArray[np.uint8] | npt.NDArray[np.uint16], list[ParticleTruth]]:
        """One frame at t_seconds after the start, and the particles drawn in it.

        uint8, except at a 16-bit site (uint16).
        """
        cfg = self.config
        rng = self._rng
        site = self._next_site()
        self.last_site = site
        mix = self.look_mix or (site.look_mix if site is not None else CLASSIC_MIX)
        if site is None:
            canvas: FloatImage = self._lighting * np.float32(rng.uniform(0.97, 1.03))
        else:
            level = site.optics.background_level * float(rng.uniform(0.97, 1.03))
            canvas = np.full((cfg.height, cfg.width), level, dtype=np.float32)
        grid = _OccupancyGrid(cfg.height, cfg.width)
        truths: list[ParticleTruth] = []

        empty = rng.random() < cfg.empty_share
        if not empty:
            haze = cfg.slurry_haze if site is None else site.optics.haze * cfg.slurry_haze / 0.3
            draw_slurry_haze(canvas, rng, haze + 1.5 * cfg.density)
            plan = self._plan_particles(rng, grid, self.pg_fraction_at(t_seconds), mix)
            # Out-of-focus particles are farther from the window: draw them
            # first so in-focus ones lie on top.
            drawn: list[tuple[_PlannedParticle, tuple[int, int, int, int], np.ndarray]] = []
            for particle in sorted(plan, key=lambda p: p.in_focus):
                region = _draw_region(particle.centre, particle.size, canvas.shape)
                before = canvas[region].copy()
                box = particle.look.draw(
                    canvas,
                    rng,
                    particle.centre,
                    particle.size,
                    particle.angle_deg,
                    defocus=particle.defocus,
                )
                if box is not None:
                    drawn.append((particle, box, _own_mask(canvas, before, region, box)))
            truths = _particle_truths(drawn)

        if cfg.bubbles:
            for _ in range(int(rng.poisson(1.5))):
                radius = float(rng.uniform(15.0, 60.0))
                centre = grid.place(rng, 0.0, radius, 0.0)
                draw_bubble(canvas, rng, centre, radius)

        if self._fouling is not None:
            self._fouling.apply(canvas, t_seconds / cfg.fouling_full_s)
        if site is None:
            add_sensor_noise(canvas, self._noise.sample(rng))
            return to_uint8(canvas), truths
        image = apply_site_optics(
            canvas,
            site.optics,
            rng,
            self._noise.sample(rng),
            illumination_field(
                site.optics,
                top=0,
                left=0,
                height=cfg.height,
                width=cfg.width,
                frame=(cfg.height, cfg.width),
            ),
            fouling=self._site_smudge(site),
            fouling_coverage=site.optics.fouling,
        )
        return image, truths

    def _next_site(self) -> Site | None:
        """The site of the next frame (drawn per frame from a range), or None (classic)."""
        if not self.sites:
            return None
        if len(self.sites) == 1:
            return self.sites[0]
        return self.sites[int(self._site_rng.integers(0, len(self.sites)))]

    def _site_smudge(self, site: Site) -> FoulingSmudge | None:
        """The window deposit of a site, fixed per site like the probe's own window."""
        if site.optics.fouling <= 0.0:
            return None
        smudge = self._site_fouling.get(site.name)
        if smudge is None:
            seed = np.random.SeedSequence([0xF0, *site.name.encode()])
            cfg = self.config
            smudge = FoulingSmudge(np.random.default_rng(seed), cfg.height, cfg.width)
            self._site_fouling[site.name] = smudge
        return smudge

    def _plan_particles(
        self,
        rng: np.random.Generator,
        grid: _OccupancyGrid,
        pg_fraction: float,
        mix: LookMix,
    ) -> list[_PlannedParticle]:
        """Labels (binomial PG count), looks, sizes, angles, focus and places for one frame.

        Density adds needle bundles enough to cover the frame DENSE_COVER_FRAMES
        times over at density 1 (the PG share stays the profile's) and lets them
        overlap more and more.
        """
        cfg = self.config
        count = cfg.particles
        max_overlap = MAX_OVERLAP
        if cfg.density > 0.0 and count > 0:
            mean_length = sum(cfg.cex_length_px) / 2.0
            footprint = mean_length * (0.2 * mean_length + 8.0)
            count += round(cfg.density * DENSE_COVER_FRAMES * cfg.width * cfg.height / footprint)
            max_overlap = MAX_OVERLAP + (1.0 - MAX_OVERLAP) * cfg.density
        pg_count = int(rng.binomial(count, pg_fraction))
        labels = [PG] * pg_count + [CEX] * (count - pg_count)
        order = rng.permutation(count)
        plan: list[_PlannedParticle] = []
        for index in order.tolist():
            label = labels[index]
            look = mix.choose(label, rng)
            angle = float(rng.uniform(0.0, 180.0))
            in_focus = bool(rng.random() >= cfg.defocus_share)
            defocus = float(
                rng.uniform(0.0, IN_FOCUS_SIGMA_MAX)
                if in_focus
                else rng.uniform(*DEFOCUS_SIGMA_RANGE)
            )
            if label == CEX:
                size = float(rng.uniform(*cfg.cex_length_px))
                radius = size / 2.0 if look.name == "dense" else 0.1 * size + 4.0
                half_length = 0.0 if look.name == "dense" else size / 2.0
                centre = grid.place(rng, half_length, radius, angle, max_overlap)
            else:
                size = float(rng.uniform(*cfg.pg_diameter_px))
                centre = grid.place(rng, 0.0, size / 2.0, angle, max_overlap)
            plan.append(_PlannedParticle(label, centre, size, angle, defocus, in_focus, look))
        return plan
