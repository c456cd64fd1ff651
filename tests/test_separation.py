"""Particles in a slurry (issue 15): the simulator's ground truth per particle (size,
shape, touching), the watershed split of touching particles, the masks every particle
crop carries, and recall against the ground truth."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

import monitor.simulator.frames as frames_module
from monitor.config.settings import ParticlesConfig
from monitor.imaging.particle_size import measure_mask
from monitor.pipeline.sampling import ParticleSampler, WholeImageSampler
from monitor.simulator import PG, ConstantProfile, FrameConfig, FrameSimulator, ParticleTruth
from monitor.simulator.command import add_simulate_arguments, run_simulate
from monitor.simulator.frames import touching_flags
from monitor.simulator.looks import Look, LookMix
from monitor.simulator.writer import GROUND_TRUTH_FILE

Box = tuple[int, int, int, int]
RADIUS = 50.0


def _draw_disc(
    canvas: np.ndarray,
    rng: np.random.Generator,
    centre: tuple[float, float],
    size: float,
    angle_deg: float,
    *,
    defocus: float = 0.0,
) -> Box | None:
    """A hard disc of diameter `size` (pixel centres within the radius), 120 levels bright."""
    del rng, angle_deg, defocus
    cx, cy = centre
    radius = size / 2.0
    height, width = canvas.shape
    x0, y0 = max(0, math.floor(cx - radius) - 1), max(0, math.floor(cy - radius) - 1)
    x1, y1 = min(width, math.ceil(cx + radius) + 2), min(height, math.ceil(cy + radius) + 2)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    inside = (xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2 <= radius * radius
    canvas[y0:y1, x0:x1][inside] += 120.0
    rows, columns = np.nonzero(inside)
    return (
        x0 + int(columns.min()),
        y0 + int(rows.min()),
        int(columns.max() - columns.min()) + 1,
        int(rows.max() - rows.min()) + 1,
    )


class _DiscMix(LookMix):
    """Every particle is a disc (a look outside the registry, for tests only)."""

    def __init__(self) -> None:
        object.__setattr__(self, "name", "discs")
        object.__setattr__(self, "weights", {})

    def choose(
        self, label: str, rng: np.random.Generator, *, exclude: tuple[str, ...] = ()
    ) -> Look:
        return Look("disc", label, _draw_disc, "a hard disc")


def _discs_at(
    monkeypatch: pytest.MonkeyPatch, centres: list[tuple[float, float]]
) -> list[ParticleTruth]:
    """Render one frame of PG discs of RADIUS at exactly these centres; its truth."""
    places: Iterator[tuple[float, float]] = iter(centres)
    monkeypatch.setattr(frames_module._OccupancyGrid, "place", lambda *args, **kwargs: next(places))
    config = FrameConfig(
        particles=len(centres),
        profile=ConstantProfile(1.0),
        defocus_share=0.0,
        pg_diameter_px=(2 * RADIUS, 2 * RADIUS),
    )
    _, truths = FrameSimulator(config, seed=1, look_mix=_DiscMix()).render(0.0)
    return sorted(truths, key=lambda t: t.bbox)


def test_a_lone_disc_has_the_area_diameter_and_feret_of_its_drawn_radius(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (truth,) = _discs_at(monkeypatch, [(400.0, 300.0)])
    assert truth.label == PG
    assert truth.bbox == (350, 250, 100, 100)
    assert truth.area_px == pytest.approx(math.pi * RADIUS**2, rel=0.002)
    assert truth.ecd_px == pytest.approx(2 * RADIUS, abs=0.1)
    # Pixels are unit squares: a ruler across the disc reads its diameter, plus at most
    # a pixel where the calipers meet a corner.
    assert 2 * RADIUS <= truth.feret_max_px <= 2 * RADIUS + 1.5
    assert 2 * RADIUS - 0.5 <= truth.feret_min_px <= 2 * RADIUS + 0.5
    assert truth.aspect_ratio == pytest.approx(truth.feret_min_px / truth.feret_max_px)
    assert truth.aspect_ratio > 0.98
    assert truth.touching is False


def test_touching_is_set_for_discs_side_by_side_and_not_across_a_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pixel columns 250-349 and 350-449: side by side; 750-849 is far from both.
    left, right, alone = _discs_at(monkeypatch, [(300.0, 300.0), (400.0, 300.0), (800.0, 300.0)])
    assert left.bbox[0] + left.bbox[2] == right.bbox[0]
    assert (left.touching, right.touching, alone.touching) == (True, True, False)


def test_touching_needs_the_masks_to_meet_within_one_pixel() -> None:
    disc = np.zeros((11, 11), np.uint8)
    cv2.circle(disc, (5, 5), 5, 1, -1)
    # Side by side (no gap), a 1 px gap, overlapping, and a diagonal corner contact.
    assert touching_flags([(0, 0, 11, 11), (11, 0, 11, 11)], [disc, disc]) == [True, True]
    assert touching_flags([(0, 0, 11, 11), (12, 0, 11, 11)], [disc, disc]) == [False, False]
    assert touching_flags([(0, 0, 11, 11), (6, 2, 11, 11)], [disc, disc]) == [True, True]
    square = np.ones((4, 4), np.uint8)
    assert touching_flags([(0, 0, 4, 4), (4, 4, 4, 4)], [square, square]) == [True, True]
    assert touching_flags([(0, 0, 4, 4), (5, 5, 4, 4)], [square, square]) == [False, False]


def test_simulator_sizes_agree_with_measure_mask() -> None:
    """The simulator repeats measure_mask's definitions (it may not import imaging)."""
    rng = np.random.default_rng(4)
    for _ in range(12):
        mask = np.zeros((120, 160), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            centre = (int(rng.integers(20, 140)), int(rng.integers(20, 100)))
            axes = (int(rng.integers(3, 50)), int(rng.integers(1, 20)))
            cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        reference = measure_mask(mask)
        assert reference is not None
        area, ecd, feret_max, feret_min, aspect = frames_module._mask_size(mask)
        assert (area, ecd, feret_max, feret_min, aspect) == pytest.approx(
            (
                reference.area,
                reference.ecd,
                reference.feret_max,
                reference.feret_min,
                reference.aspect_ratio,
            )
        )


def test_every_simulated_particle_has_a_size_and_dense_frames_have_touching_ones() -> None:
    sparse = FrameSimulator(FrameConfig(profile=ConstantProfile(0.3)), seed=2).render(0.0)[1]
    dense = FrameSimulator(FrameConfig(density=1.0, profile=ConstantProfile(0.3)), seed=2)
    crowded = dense.render(0.0)[1]
    for truth in sparse + crowded:
        _, _, w, h = truth.bbox
        assert 0 < truth.area_px <= w * h
        assert truth.ecd_px == pytest.approx(math.sqrt(4 * truth.area_px / math.pi))
        assert 0 < truth.feret_min_px <= truth.feret_max_px <= math.hypot(w, h) + 1e-6
        assert 0 < truth.aspect_ratio <= 1
    # Needle bundles are long and thin, agglomerates round.
    assert np.median([t.aspect_ratio for t in sparse if t.label != PG]) < 0.5
    assert np.median([t.aspect_ratio for t in sparse + crowded if t.label == PG]) > 0.7
    assert sum(t.touching for t in sparse) < 0.5 * len(sparse)
    assert sum(t.touching for t in crowded) > 0.9 * len(crowded)


def test_ground_truth_file_lists_sizes_in_pixels_and_micrometres(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    args = parser.parse_args(
        [
            str(tmp_path),
            "--count",
            "2",
            "--particles",
            "6",
            "--pixel-size-um",
            "2.5",
            "--width",
            "400",
            "--height",
            "300",
        ]
    )
    assert run_simulate(args) == 0
    lines = (tmp_path / GROUND_TRUTH_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["pixel_size_um"] for r in records] == [2.5, 2.5]
    particles = [p for r in records for p in r["particles"]]
    assert particles
    for particle in particles:
        assert set(particle) >= {
            "label",
            "bbox",
            "touching",
            "area_px",
            "ecd_px",
            "feret_max_px",
            "feret_min_px",
            "aspect_ratio",
            "area_um2",
            "ecd_um",
            "feret_max_um",
            "feret_min_um",
        }
        assert particle["area_um2"] == pytest.approx(particle["area_px"] * 6.25, abs=0.01)
        assert particle["ecd_um"] == pytest.approx(particle["ecd_px"] * 2.5, abs=0.01)
        assert particle["feret_max_um"] == pytest.approx(particle["feret_max_px"] * 2.5, abs=0.01)


def test_ground_truth_pixel_size_defaults_to_a_typical_probe(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    assert run_simulate(parser.parse_args([str(tmp_path), "--count", "1"])) == 0
    record = json.loads((tmp_path / GROUND_TRUTH_FILE).read_text().splitlines()[0])
    assert record["pixel_size_um"] == 0.8


# -- separation -------------------------------------------------------------------------


SPLIT_RADIUS = 35.0


def _two_touching_discs() -> tuple[np.ndarray, list[Box]]:
    """A dark, noisy 1360 x 1024 frame with two bright discs of radius 35 overlapping by
    7 px, and their boxes."""
    rng = np.random.default_rng(0)
    canvas = np.full((1024, 1360), 35.0, np.float32)
    boxes = []
    for cx in (500.0, 500.0 + 2 * SPLIT_RADIUS - 7.0):
        boxes.append(_draw_disc(canvas, rng, (cx, 500.0), 2 * SPLIT_RADIUS, 0.0))
    canvas = cv2.GaussianBlur(canvas, (0, 0), 1.6) + rng.normal(0.0, 3.0, canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8), [b for b in boxes if b is not None]


def _iou(a: Box, b: Box) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / (a[2] * a[3] + b[2] * b[3] - ix * iy)


def test_watershed_splits_two_touching_discs_that_none_keeps_as_one() -> None:
    image, discs = _two_touching_discs()
    whole = ParticleSampler(ParticlesConfig(separation="none")).find_particles(image)
    assert len(whole) == 1
    x, _, w, _ = whole[0]
    assert x <= discs[0][0] and x + w >= discs[1][0] + discs[1][2]  # both discs in one box
    split = ParticleSampler(ParticlesConfig(separation="watershed")).find_particles(image)
    assert len(split) == 2
    for disc in discs:
        assert max(_iou(disc, box) for box in split) >= 0.8


@pytest.mark.parametrize("separation", ["none", "watershed"])
def test_every_particle_crop_has_its_own_mask_within_its_box(separation: str) -> None:
    image, _ = _two_touching_discs()
    frame = FrameSimulator(FrameConfig(density=0.5, profile=ConstantProfile(0.3)), seed=4)
    for grey in (image, frame.render(0.0)[0]):
        crops = ParticleSampler(ParticlesConfig(separation=separation)).sample(grey)  # type: ignore[arg-type]
        assert crops
        for crop in crops:
            _, _, w, h = crop.bbox
            assert crop.mask is not None
            assert crop.mask.shape == (h, w)
            rows, columns = np.nonzero(crop.mask)
            # The box is the mask's own extent.
            assert (rows.min(), columns.min()) == (0, 0)
            assert (rows.max(), columns.max()) == (h - 1, w - 1)
    # The split discs' masks are each about one disc.
    crops = ParticleSampler(ParticlesConfig(separation="watershed")).sample(image)
    disc_area = math.pi * SPLIT_RADIUS**2
    for crop in crops:
        assert crop.mask is not None
        assert np.count_nonzero(crop.mask) == pytest.approx(disc_area, rel=0.2)


def test_refined_edges_reach_a_faint_needle_and_follow_a_discs_outline() -> None:
    """A bar with a thin, faint needle sticking out (2 px wide, 30 grey levels: averaged
    over the working scale's 4 x 4 px it is below even the hysteresis level) and a disc,
    lightly blurred: with refine_edges the bar's box reaches the needle's tip and the
    disc's box and area are its drawn ones within a 2 px grid; without, the needle is cut
    off and the disc's edge is a 4 px grid's."""
    rng = np.random.default_rng(5)
    image = rng.normal(35.0, 3.0, (1024, 1360))
    cv2.rectangle(image, (500, 480), (620, 520), 115.0, -1)
    cv2.line(image, (620, 500), (720, 500), 65.0, 2)
    cv2.circle(image, (300, 300), 50, 120.0, -1)
    image = np.clip(cv2.GaussianBlur(image, (0, 0), 1.0), 0, 255).astype(np.uint8)
    disc_area = np.count_nonzero(cv2.circle(np.zeros((128, 128), np.uint8), (64, 64), 50, 1, -1))
    refined = ParticleSampler(ParticlesConfig(refine_edges=True)).sample(image)
    coarse = ParticleSampler(ParticlesConfig(refine_edges=False)).sample(image)
    (bar,) = [crop for crop in refined if crop.bbox[0] >= 400]
    (coarse_bar,) = [crop for crop in coarse if crop.bbox[0] >= 400]
    assert bar.bbox[0] + bar.bbox[2] >= 718, bar.bbox  # the needle ends at x = 720
    assert coarse_bar.bbox[0] + coarse_bar.bbox[2] <= 640, coarse_bar.bbox
    (disc,) = [crop for crop in refined if crop.bbox[0] < 400]
    assert np.allclose(disc.bbox, (250, 250, 101, 101), atol=2), disc.bbox
    assert disc.mask is not None
    assert np.count_nonzero(disc.mask) == pytest.approx(disc_area, rel=0.04)


def test_crop_mode_mask_is_the_crops_main_object() -> None:
    rng = np.random.default_rng(1)
    crop = np.clip(rng.normal(40.0, 4.0, (151, 151)), 0, 255).astype(np.uint8)
    cv2.circle(crop, (70, 80), 30, 170, -1)
    cv2.circle(crop, (10, 10), 3, 170, -1)  # a speck: not the main object
    (sampled,) = WholeImageSampler().sample(crop)
    assert sampled.bbox == (0, 0, 151, 151)
    assert sampled.mask is not None
    assert sampled.mask.shape == crop.shape
    assert np.count_nonzero(sampled.mask) == pytest.approx(math.pi * 30**2, rel=0.1)
    assert sampled.mask[80, 70] == 1
    assert sampled.mask[10, 10] == 0


def _reference_boxes(grey: np.ndarray, config: ParticlesConfig) -> list[Box]:
    """Frame mode's segmentation before separation existed (kept here verbatim)."""
    height, width = grey.shape
    small = cv2.resize(grey, (width // 4, height // 4), interpolation=cv2.INTER_AREA)
    tiny = cv2.resize(small, (width // 16, height // 16), interpolation=cv2.INTER_AREA)
    background = cv2.resize(
        cv2.medianBlur(tiny, 9), (small.shape[1], small.shape[0]), interpolation=cv2.INTER_LINEAR
    )
    raw = (cv2.subtract(small, background) > config.threshold).astype(np.uint8)
    close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    mask = cv2.morphologyEx(raw, cv2.MORPH_CLOSE, close)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    boxes = []
    for index in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[index])
        if config.min_area <= area * 16 <= config.max_area:
            boxes.append((area, (x * 4, y * 4, w * 4, h * 4)))
    boxes.sort(reverse=True)
    return [box for _, box in boxes[: config.max_per_frame]]


def test_separation_none_without_edge_refinement_gives_the_boxes_of_before() -> None:
    config = ParticlesConfig(separation="none", refine_edges=False)
    sampler = ParticleSampler(config)
    for density in (0.0, 1.0):
        simulator = FrameSimulator(FrameConfig(density=density), seed=8)
        for t in (0.0, 1.0):
            image = simulator.render(t)[0]
            assert sampler.find_particles(image) == _reference_boxes(image, config)


# -- recall against ground truth -------------------------------------------------------------


def _recall(
    density: float,
    separation: str,
    frames: int,
    seed: int,
    *,
    max_cover: float = 0.15,
    refine_edges: bool = True,
) -> float:
    """Share of in-focus particles matched one to one by a found box at IoU >= 0.5."""
    simulator = FrameSimulator(FrameConfig(density=density, profile=ConstantProfile(0.15)), seed)
    sampler = ParticleSampler(
        ParticlesConfig(
            separation=separation,  # type: ignore[arg-type]
            separation_max_cover=max_cover,
            refine_edges=refine_edges,
        )
    )
    found = total = 0
    for index in range(frames):
        image, truths = simulator.render(float(index))
        boxes = sampler.find_particles(image)
        counted = [t.bbox for t in truths if t.in_focus]
        pairs = sorted(
            ((_iou(t, b), i, j) for i, t in enumerate(counted) for j, b in enumerate(boxes)),
            reverse=True,
        )
        used_t: set[int] = set()
        used_b: set[int] = set()
        for iou, i, j in pairs:
            if iou >= 0.5 and i not in used_t and j not in used_b:
                used_t.add(i)
                used_b.add(j)
        found += len(used_t)
        total += len(counted)
    return found / total


def test_sparse_slurry_recall_is_above_0_9_with_edges_placed_on_the_finer_grid() -> None:
    """Sparse frames (density 0), 2 x 6 frames: issue 15's 0.9. On the working scale alone
    a bundle's faint and stray needles fall below the threshold and its box is too small
    for IoU 0.5 (bench/instances.py: 0.87 before edges were refined, 0.93 after)."""
    refined = np.mean([_recall(0.0, "watershed", 6, seed) for seed in (3, 11)])
    coarse = np.mean([_recall(0.0, "watershed", 6, seed, refine_edges=False) for seed in (3, 11)])
    none = np.mean([_recall(0.0, "none", 6, seed) for seed in (3, 11)])
    assert refined >= 0.9, refined
    assert refined >= coarse + 0.03, (refined, coarse)
    assert refined >= none, (refined, none)


def _share_within(box: Box, outer: Box) -> float:
    """The share of `box`'s area that lies within `outer`."""
    x, y, w, h = box
    ox, oy, ow, oh = outer
    inside = max(0, min(x + w, ox + ow) - max(x, ox)) * max(0, min(y + h, oy + oh) - max(y, oy))
    return inside / (w * h)


def test_the_watershed_leaves_a_lone_grainy_agglomerate_whole() -> None:
    """Sparse frames with 40 % PG: an agglomerate touching nothing is one box, not cut
    into pieces. Its dark grains are holes in the foreground; the distance transform of
    the foreground with its holes had a maximum between every two of them, and 8 of
    these 48 agglomerates came out in two or more pieces (PG precision 0.77-0.82 in
    bench/instances.py); the watershed now splits hole-filled silhouettes."""
    simulator = FrameSimulator(FrameConfig(profile=ConstantProfile(0.4)), seed=3)
    sampler = ParticleSampler(ParticlesConfig(separation="watershed"))
    cut = lone = 0
    for index in range(6):
        image, truths = simulator.render(float(index))
        boxes = sampler.find_particles(image)
        for truth in truths:
            if truth.label == "PG" and truth.in_focus and not truth.touching:
                # Boxes lying (80 % of their area or more) within the agglomerate's box.
                pieces = sum(_share_within(box, truth.bbox) >= 0.8 for box in boxes)
                lone += 1
                cut += pieces >= 2
    assert lone >= 40, lone
    assert cut <= 0.05 * lone, (cut, lone)


def test_dense_slurry_recall_with_watershed_is_above_none_but_left_unsplit_by_default() -> None:
    """Dense frames (density 1): forced, the watershed finds about twice as many particles
    as `none`, yet far fewer than the issue's 0.75 (needles covering the frame merge into
    blobs that distance-transform seeds cannot cut), and it over-counts PG there
    (BENCHMARKS.md); so by default (separation_max_cover 0.15) a frame that dense is
    segmented as with `none`, box for box."""
    forced = np.mean([_recall(1.0, "watershed", 2, seed, max_cover=1.0) for seed in (3, 11)])
    none = np.mean([_recall(1.0, "none", 2, seed) for seed in (3, 11)])
    assert forced >= 1.5 * none, (forced, none)
    assert forced >= 0.09, forced
    simulator = FrameSimulator(FrameConfig(density=1.0, profile=ConstantProfile(0.15)), 3)
    image, _ = simulator.render(0.0)
    default = ParticleSampler(ParticlesConfig(separation="watershed")).find_particles(image)
    assert default == ParticleSampler(ParticlesConfig(separation="none")).find_particles(image)


@pytest.mark.parametrize("separation", ["none", "watershed"])
def test_a_particles_mask_is_its_silhouette_with_holes_filled(separation: str) -> None:
    """A ring-shaped particle (an agglomerate with a large pore) is measured as its
    outline's area, as the simulator's truth is."""
    rng = np.random.default_rng(2)
    image = np.clip(rng.normal(35.0, 3.0, (1024, 1360)), 0, 255).astype(np.uint8)
    cv2.circle(image, (600, 500), 60, 170, -1)
    cv2.circle(image, (600, 500), 30, 35, -1)
    (crop,) = ParticleSampler(ParticlesConfig(separation=separation)).sample(image)  # type: ignore[arg-type]
    assert crop.mask is not None
    assert np.count_nonzero(crop.mask) == pytest.approx(math.pi * 60**2, rel=0.1)
