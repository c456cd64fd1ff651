"""Crop mode: single-particle images like the public OpenCrystalData crops.

A crop is what a segmenter cuts out of a frame: one particle centred on a patch
of probe background (the same lighting, haze and noise as frame mode), with bits
of neighbours cut by the edges and sometimes out of focus.

Crop height and aspect ratio come from one distribution for both classes, drawn
before the class is looked at. The public dataset has every CEX crop at 151 x
151 px and PG crops of varied size; copying that would let a model learn the
label from the shape alone.

With a look mix or sites (`look_mix="slurry"`, `sites=range(200)`), each crop is
drawn at one of the sites (its optics, see `monitor.simulator.sites`) with a look
chosen from the mix (see `monitor.simulator.looks`), and `render_with_truth`
says which. Without them the output is the original simulator's, byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from monitor.simulator.background import (
    BBox,
    FloatImage,
    FoulingSmudge,
    IlluminationModel,
    NoiseBank,
    add_sensor_noise,
    draw_slurry_haze,
    to_uint8,
)
from monitor.simulator.labels import CEX, LABELS, PG
from monitor.simulator.looks import CLASSIC_MIX, LookMix, get_look_mix
from monitor.simulator.particles import draw_agglomerate, draw_needle_bundle
from monitor.simulator.sites import (
    DEFAULT_TRAINING_SITES,
    Site,
    apply_site_optics,
    illumination_field,
    resolve_sites,
)

# Crop side (height) in pixels and width/height ratio, for both classes alike.
CROP_SIDE_RANGE = (130, 230)
CROP_ASPECT_RANGE = (0.85, 1.2)
# The frame a crop is imagined to come from, for its lighting.
VIRTUAL_FRAME = (1024, 1360)
# Neighbours cut by the crop edges never take these looks: a packed mat or a blob
# would cover the crop and hide the particle the crop is about.
NEIGHBOUR_EXCLUDED_LOOKS = ("dense", "over_blob")

Image = npt.NDArray[np.uint8] | npt.NDArray[np.uint16]
SitesArg = Site | int | Iterable[Site | int] | None


@dataclass(frozen=True)
class CropTruth:
    """What a crop shows: the centre particle's label, look, box (x, y, w, h) and
    focus, and the site it was drawn at (None for the classic simulator)."""

    label: str
    look: str
    bbox: BBox
    in_focus: bool
    site: str | None


class CropSimulator:
    """Renders single-particle crops of either class, deterministically under a seed.

    defocus_share is the share of crops whose main particle is out of focus;
    neighbour_rate the mean number of neighbouring particles cut by the edges.

    look_mix and sites choose the looks and optics:
    - neither (the default): the classic simulator, today's output exactly;
    - sites only (a Site, a site seed, or several, e.g. range(200)): each crop
      from one of them, with that site's optics and its own look mix;
    - look_mix "slurry" (or a LookMix): that mix, at the given sites or, when
      none are given, at DEFAULT_TRAINING_SITES (sites 0-199);
    - look_mix "classic" with sites: the two original looks through site optics.
    Site crops are uint16 at 16-bit sites, uint8 otherwise.
    """

    def __init__(
        self,
        seed: int,
        *,
        defocus_share: float = 0.2,
        neighbour_rate: float = 4.0,
        look_mix: str | LookMix | None = None,
        sites: SitesArg = None,
    ) -> None:
        if not 0.0 <= defocus_share <= 1.0:
            raise ValueError(f"defocus_share must be between 0 and 1, got {defocus_share}")
        if neighbour_rate < 0.0:
            raise ValueError(f"neighbour_rate must be >= 0, got {neighbour_rate}")
        self._rng = np.random.default_rng(seed)
        # One probe's lighting, computed once; each crop takes a window of it
        # with its own gain, as crops come from many frames and batches.
        self._lighting = IlluminationModel(self._rng, *VIRTUAL_FRAME)
        max_width = math.ceil(CROP_SIDE_RANGE[1] * CROP_ASPECT_RANGE[1]) + 1
        self._noise = NoiseBank(self._rng, CROP_SIDE_RANGE[1], max_width)
        self.defocus_share = defocus_share
        self.neighbour_rate = neighbour_rate
        mix = None if look_mix is None else get_look_mix(look_mix)
        if sites is None and mix is not None and mix is not CLASSIC_MIX:
            sites = DEFAULT_TRAINING_SITES
        self.sites: tuple[Site, ...] = () if sites is None else resolve_sites(sites)
        # A mix given explicitly overrides the sites' own mixes.
        self.look_mix = mix
        self._site_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x517E]))

    def draw_size(self) -> tuple[int, int]:
        """(height, width) of the next crop, from the class-independent distribution."""
        side = int(self._rng.integers(CROP_SIDE_RANGE[0], CROP_SIDE_RANGE[1] + 1))
        aspect = float(self._rng.uniform(*CROP_ASPECT_RANGE))
        return side, max(8, round(side * aspect))

    def render(self, label: str) -> Image:
        """One crop (height x width) whose centred particle is of class `label`.

        uint8, except at a 16-bit site (uint16).
        """
        return self.render_with_truth(label)[0]

    def render_with_truth(self, label: str) -> tuple[Image, CropTruth]:
        """One crop and what it shows (label, look, box, focus, site)."""
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}")
        if self.sites:
            return self._render_at_site(label)
        return self._render_classic(label)

    def _render_classic(self, label: str) -> tuple[npt.NDArray[np.uint8], CropTruth]:
        height, width = self.draw_size()
        rng = self._rng
        frame_h, frame_w = VIRTUAL_FRAME
        top = int(rng.integers(0, frame_h - height))
        left = int(rng.integers(0, frame_w - width))
        canvas = self._lighting.render(top, left, height, width)
        canvas *= np.float32(rng.uniform(0.8, 1.25))
        # Crops are cut where particles are, which is where the slurry is thick.
        draw_slurry_haze(canvas, rng, float(rng.uniform(0.6, 1.5)))

        side = min(height, width)
        # Some neighbours lie in front of the particle (needles across a PG
        # agglomerate are common in the real crops), the rest behind it.
        in_front = rng.random(int(rng.poisson(self.neighbour_rate))) < 0.35
        for _ in range(int(np.count_nonzero(~in_front))):
            self._draw_neighbour(canvas, side)

        centre = (
            width / 2.0 + float(rng.normal(0.0, 0.04 * width)),
            height / 2.0 + float(rng.normal(0.0, 0.04 * height)),
        )
        in_focus = rng.random() >= self.defocus_share
        defocus = float(rng.uniform(0.0, 0.6) if in_focus else rng.uniform(2.0, 4.5))
        angle = float(rng.uniform(0.0, 180.0))
        if label == CEX:
            # Needle bundles run across the whole crop, as in the real CEX crops.
            length = math.hypot(height, width) * float(rng.uniform(0.75, 1.15))
            box = draw_needle_bundle(canvas, rng, centre, length, angle, defocus=defocus)
        else:
            diameter = side * float(rng.uniform(0.6, 0.92))
            box = draw_agglomerate(canvas, rng, centre, diameter, angle, defocus=defocus)
        for _ in range(int(np.count_nonzero(in_front))):
            self._draw_neighbour(canvas, side)

        add_sensor_noise(canvas, self._noise.sample(rng, height, width))
        look = "bundle" if label == CEX else "granular"
        truth = CropTruth(label, look, box or (0, 0, width, height), bool(in_focus), None)
        return to_uint8(canvas), truth

    def _render_at_site(self, label: str) -> tuple[Image, CropTruth]:
        """A crop at one of the sites: its scene, its looks, its optics."""
        rng = self._rng
        site = self.sites[int(self._site_rng.integers(0, len(self.sites)))]
        optics = site.optics
        mix = self.look_mix or site.look_mix
        height, width = self.draw_size()
        frame_h, frame_w = VIRTUAL_FRAME
        top = int(rng.integers(0, frame_h - height))
        left = int(rng.integers(0, frame_w - width))
        level = optics.background_level * float(rng.uniform(0.85, 1.15))
        canvas: FloatImage = np.full((height, width), level, dtype=np.float32)
        draw_slurry_haze(canvas, rng, optics.haze * float(rng.uniform(0.6, 1.4)))

        side = min(height, width)
        in_front = rng.random(int(rng.poisson(self.neighbour_rate))) < 0.35
        for _ in range(int(np.count_nonzero(~in_front))):
            self._draw_site_neighbour(canvas, side, mix)
        centre = (
            width / 2.0 + float(rng.normal(0.0, 0.04 * width)),
            height / 2.0 + float(rng.normal(0.0, 0.04 * height)),
        )
        in_focus = bool(rng.random() >= self.defocus_share)
        defocus = float(rng.uniform(0.0, 0.6) if in_focus else rng.uniform(2.0, 4.5))
        angle = float(rng.uniform(0.0, 180.0))
        look = mix.choose(label, rng)
        if label == CEX:
            size = math.hypot(height, width) * float(rng.uniform(0.75, 1.15))
        else:
            size = side * float(rng.uniform(0.6, 0.92))
        box = look.draw(canvas, rng, centre, size, angle, defocus=defocus)
        for _ in range(int(np.count_nonzero(in_front))):
            self._draw_site_neighbour(canvas, side, mix)

        fouling = None
        coverage = 0.0
        if optics.fouling > 0.0:
            fouling = FoulingSmudge(rng, height, width)
            coverage = optics.fouling * float(rng.uniform(0.5, 1.0))
        image = apply_site_optics(
            canvas,
            optics,
            rng,
            self._noise.sample(rng, height, width),
            illumination_field(
                optics, top=top, left=left, height=height, width=width, frame=VIRTUAL_FRAME
            ),
            fouling=fouling,
            fouling_coverage=coverage,
        )
        truth = CropTruth(label, look.name, box or (0, 0, width, height), in_focus, site.name)
        return image, truth

    def _draw_site_neighbour(self, canvas: FloatImage, side: int, mix: LookMix) -> None:
        """A neighbour cut by an edge, in a look of the mix (never a covering one)."""
        rng = self._rng
        height, width = canvas.shape
        edge = int(rng.integers(0, 4))
        along = float(rng.uniform(0.0, 1.0))
        depth = float(rng.uniform(-0.15, 0.1)) * side
        centre = (
            (along * width, depth),
            (along * width, height - depth),
            (depth, along * height),
            (width - depth, along * height),
        )[edge]
        defocus = float(rng.uniform(0.0, 4.0))
        angle = float(rng.uniform(0.0, 180.0))
        label = CEX if rng.random() < 0.9 else PG
        look = mix.choose(label, rng, exclude=NEIGHBOUR_EXCLUDED_LOOKS)
        if label == CEX:
            size = side * float(rng.uniform(0.6, 1.4))
        else:
            size = side * float(rng.uniform(0.4, 0.8))
        look.draw(canvas, rng, centre, size, angle, defocus=defocus)

    def _draw_neighbour(self, canvas: npt.NDArray[np.float32], side: int) -> None:
        """A particle centred near or beyond an edge, so only part of it shows."""
        rng = self._rng
        height, width = canvas.shape
        edge = int(rng.integers(0, 4))
        along = float(rng.uniform(0.0, 1.0))
        depth = float(rng.uniform(-0.15, 0.1)) * side
        if edge == 0:
            centre = (along * width, depth)
        elif edge == 1:
            centre = (along * width, height - depth)
        elif edge == 2:
            centre = (depth, along * height)
        else:
            centre = (width - depth, along * height)
        defocus = float(rng.uniform(0.0, 4.0))
        angle = float(rng.uniform(0.0, 180.0))
        # Neighbours are mostly needles whatever the crop's class: the slurry is
        # cephalexin, and a neighbour's class must not hint at the crop's label.
        if rng.random() < 0.9:
            length = side * float(rng.uniform(0.6, 1.4))
            draw_needle_bundle(canvas, rng, centre, length, angle, defocus=defocus)
        else:
            diameter = side * float(rng.uniform(0.4, 0.8))
            draw_agglomerate(canvas, rng, centre, diameter, angle, defocus=defocus)
