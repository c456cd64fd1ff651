"""Tests for the simulator's particle looks, site optics (domain randomisation),
slurry density and the CLI flags that choose them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.imaging.decode import read_image_file
from monitor.simulator import CEX, PG, ConstantProfile, CropSimulator, FrameConfig, FrameSimulator
from monitor.simulator.command import add_simulate_arguments, run_simulate
from monitor.simulator.crops import CropTruth
from monitor.simulator.looks import (
    CLASSIC_MIX,
    SLURRY_MIX,
    LookMix,
    get_look,
    look_names,
    single_look_mix,
)
from monitor.simulator.sites import (
    SiteOptics,
    draw_site,
    get_site_style,
    parse_site_range,
    register_site_style,
    with_optics,
)
from monitor.simulator.writer import GROUND_TRUTH_FILE, write_png_atomically

CLEAN = get_site_style("clean-8bit")
SMALL_FRAME = {"width": 480, "height": 360, "cex_length_px": (40.0, 90.0)}


def _crops(look: str, count: int = 6, seed: int = 3) -> list[tuple[np.ndarray, CropTruth]]:
    """In-focus crops of one look at the clean site."""
    simulator = CropSimulator(seed, look_mix=single_look_mix(look), sites=CLEAN, defocus_share=0.0)
    label = get_look(look).label
    return [simulator.render_with_truth(label) for _ in range(count)]


def _laplacian_variance(image: np.ndarray) -> float:
    return float(cv2.Laplacian(image.astype(np.float32), cv2.CV_32F).var())


def _centre(image: np.ndarray, share: float = 0.5) -> np.ndarray:
    height, width = image.shape
    dy, dx = int(height * share / 2), int(width * share / 2)
    return image[height // 2 - dy : height // 2 + dy, width // 2 - dx : width // 2 + dx]


@pytest.mark.parametrize("look", look_names())
def test_every_look_renders_in_crop_mode_with_its_label_look_and_a_box_inside(look: str) -> None:
    for image, truth in _crops(look, count=3):
        height, width = image.shape
        assert image.dtype == np.uint8
        assert truth.label == get_look(look).label
        assert truth.look == look
        assert truth.site == "clean-8bit"
        x, y, w, h = truth.bbox
        assert x >= 0 and y >= 0 and w > 0 and h > 0
        assert x + w <= width and y + h <= height
        # The box covers the crop centre: the label is the particle at the centre.
        assert x <= width / 2 <= x + w and y <= height / 2 <= y + h


@pytest.mark.parametrize("look", look_names())
def test_every_look_renders_in_frame_mode_and_truth_records_it(look: str) -> None:
    label = get_look(look).label
    config = FrameConfig(
        **SMALL_FRAME,
        pg_diameter_px=(40.0, 90.0),
        particles=6,
        profile=ConstantProfile(1.0 if label == PG else 0.0),
    )
    image, truths = FrameSimulator(config, seed=1, look_mix=single_look_mix(look)).render(0.0)
    assert image.shape == (360, 480)
    assert len(truths) == 6
    for truth in truths:
        assert (truth.label, truth.look) == (label, look)
        x, y, w, h = truth.bbox
        assert x >= 0 and y >= 0 and x + w <= 480 and y + h <= 360


def test_overexposed_pg_has_a_large_clipped_core_and_granular_has_almost_none() -> None:
    clipped = [float(np.mean(_centre(image, 0.3) >= 254)) for image, _ in _crops("overexposed")]
    granular = [float(np.mean(_centre(image, 0.3) >= 254)) for image, _ in _crops("granular")]
    assert min(clipped) > 0.5
    assert max(granular) < 0.2


def test_defocused_pg_is_softer_and_dimmer_than_granular() -> None:
    defocused = [_crops("defocused", seed=s)[0][0] for s in range(4)]
    granular = [_crops("granular", seed=s)[0][0] for s in range(4)]
    assert np.median([_laplacian_variance(_centre(i)) for i in defocused]) < 0.5 * np.median(
        [_laplacian_variance(_centre(i)) for i in granular]
    )
    assert np.mean([_centre(i).std() for i in defocused]) < np.mean(
        [_centre(i).std() for i in granular]
    )


def _bright_share(image: np.ndarray) -> float:
    """Share of pixels well above the crop's dark background (its 5th percentile)."""
    return float(np.mean(image > np.percentile(image, 5) + 25))


def _edge_coherence(image: np.ndarray) -> float:
    """Orientation coherence of the gradient (structure tensor): 1 = straight edges
    all along one direction, 0 = no preferred direction."""
    blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 1.0)
    gx = cv2.Sobel(blurred, cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(blurred, cv2.CV_32F, 0, 1)
    jxx, jyy, jxy = (cv2.GaussianBlur(a, (0, 0), 4.0) for a in (gx * gx, gy * gy, gx * gy))
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + 1e-3)
    return float(np.median(coherence))


def test_dense_cex_covers_most_of_the_crop_with_straight_edges_and_single_does_not() -> None:
    dense = [image for image, _ in _crops("dense")]
    single = [image for image, _ in _crops("single")]
    assert np.median([_bright_share(i) for i in dense]) > 0.6
    assert np.median([_bright_share(i) for i in single]) < 0.45
    # Straight needle edges: oriented gradients, far more than a granular blob's.
    granular = [image for image, _ in _crops("granular")]
    assert np.median([_edge_coherence(i) for i in dense]) > 0.3
    assert np.median([_edge_coherence(i) for i in dense]) > 1.5 * np.median(
        [_edge_coherence(_centre(i)) for i in granular]
    )


def test_needle_crossed_pg_has_straight_edges_across_its_texture_unlike_granular() -> None:
    crossed = [_edge_coherence(_centre(image, 0.4)) for image, _ in _crops("needle_crossed", 8)]
    granular = [_edge_coherence(_centre(image, 0.4)) for image, _ in _crops("granular", 8)]
    assert np.median(crossed) > np.median(granular)


def test_over_blob_is_labelled_cex_and_brighter_around_the_needles_than_a_plain_bundle() -> None:
    blob = _crops("over_blob", 8)
    bundle = _crops("bundle", 8)
    assert {truth.label for _, truth in blob} == {CEX}
    assert np.median([np.median(_centre(i)) for i, _ in blob]) > np.median(
        [np.median(_centre(i)) for i, _ in bundle]
    )


def test_classic_mix_chooses_without_random_draws_and_slurry_uses_every_look() -> None:
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert CLASSIC_MIX.choose(PG, rng).name == "granular"
    assert rng.bit_generator.state == state
    seen = {SLURRY_MIX.choose(label, rng).name for label in (CEX, PG) for _ in range(400)}
    assert seen == set(look_names())


def test_look_mix_rejects_unknown_looks_and_a_class_without_looks() -> None:
    with pytest.raises(ValueError, match="unknown look 'sparkly'"):
        LookMix("bad", {"sparkly": 1.0, "bundle": 1.0})
    with pytest.raises(ValueError, match="no look with weight > 0 for PG"):
        LookMix("bad", {"bundle": 1.0})


# --- sites ----------------------------------------------------------------------


def test_sites_are_deterministic_under_a_seed_and_differ_between_seeds() -> None:
    assert draw_site(7) == draw_site(7)
    optics = [draw_site(seed).optics for seed in range(40)]
    assert len({o.exposure for o in optics}) == 40
    assert {o.bit_depth for o in optics} == {8, 16}
    assert any(o.jpeg_quality is not None for o in optics)
    assert any(o.motion_blur_px > 0 for o in optics) and any(o.fouling > 0 for o in optics)
    first = CropSimulator(1, sites=7).render(PG)
    assert np.array_equal(first, CropSimulator(1, sites=7).render(PG))
    assert not np.array_equal(first, CropSimulator(1, sites=8).render(PG))


def test_training_sites_spread_crops_over_many_sites() -> None:
    simulator = CropSimulator(0, look_mix="slurry")
    names = {simulator.render_with_truth(CEX)[1].site for _ in range(60)}
    assert len(names) > 40


def test_site_optics_change_the_image_as_named() -> None:
    """The same scene (same seed) through optics that differ in one field each."""

    def crop_with(**optics: object) -> np.ndarray:
        changed = with_optics(CLEAN, **{"read_noise": 0.1, "shot_gain": 0.0, **optics})
        return CropSimulator(5, sites=changed, look_mix=single_look_mix("bundle")).render(CEX)

    base = crop_with()
    assert crop_with(exposure=1.6).mean() > base.mean() + 10
    sharpness = _laplacian_variance(base)
    assert _laplacian_variance(crop_with(defocus_sigma=2.0)) < 0.5 * sharpness
    assert _laplacian_variance(crop_with(motion_blur_px=7.0)) < 0.7 * sharpness
    assert _laplacian_variance(crop_with(read_noise=6.0)) > 2.0 * sharpness
    assert float(crop_with(contrast=0.5).std()) < 0.8 * float(base.std())
    assert crop_with(gamma=1.5).mean() > base.mean() + 10


def test_site_style_registry_rejects_a_duplicate_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_site_style("clean-8bit", SiteOptics())
    with pytest.raises(ValueError, match="known styles: clean-8bit"):
        get_site_style("nope")
    with pytest.raises(ValueError, match="jpeg_quality needs bit_depth 8"):
        SiteOptics(bit_depth=16, sensor_bits=12, jpeg_quality=50)


def test_16_bit_sites_give_uint16_that_round_trip_through_png_and_the_decoder(
    tmp_path: Path,
) -> None:
    site = get_site_style("bright-16bit")
    simulator = CropSimulator(2, sites=site)
    image = simulator.render(PG)
    assert image.dtype == np.uint16
    assert int(image.max()) < 1 << site.optics.sensor_bits
    path = tmp_path / "crop.png"
    write_png_atomically(path, image)
    assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), image)
    decoded = read_image_file(path)
    assert decoded.dtype == np.uint8 and decoded.shape == image.shape
    # The decoder scales by the bits in use: a 12-bit image reaching full scale
    # comes back as the 8-bit rendering would be.
    shift = int(image.max()).bit_length() - 8
    assert np.array_equal(decoded, (image >> shift).astype(np.uint8))
    frame, _ = FrameSimulator(FrameConfig(**SMALL_FRAME), seed=0, sites=site).render(0.0)
    assert frame.dtype == np.uint16


def test_jpeg_sites_show_block_artefacts() -> None:
    def blockiness(image: np.ndarray) -> float:
        """Mean jump across 8-px block borders over the mean jump elsewhere."""
        jumps = np.abs(np.diff(image.astype(np.float32), axis=1))
        borders = jumps[:, 7::8].mean()
        return float(borders / jumps.mean())

    plain = CropSimulator(4, sites=with_optics(CLEAN, read_noise=3.0)).render(CEX)
    jpeg = CropSimulator(4, sites=with_optics(CLEAN, read_noise=3.0, jpeg_quality=15)).render(CEX)
    assert blockiness(jpeg) > blockiness(plain) + 0.1


# --- density ----------------------------------------------------------------------


def _coverage_and_overlaps(density: float) -> tuple[float, float, int]:
    config = FrameConfig(**SMALL_FRAME, pg_diameter_px=(30.0, 70.0), particles=12, density=density)
    image, truths = FrameSimulator(config, seed=4).render(0.0)
    covered = np.zeros((360, 480), bool)
    for truth in truths:
        x, y, w, h = truth.bbox
        covered[y : y + h, x : x + w] = True
    overlaps = sum(
        1
        for i, a in enumerate(truths)
        for b in truths[i + 1 :]
        if a.bbox[0] < b.bbox[0] + b.bbox[2]
        and b.bbox[0] < a.bbox[0] + a.bbox[2]
        and a.bbox[1] < b.bbox[1] + b.bbox[3]
        and b.bbox[1] < a.bbox[1] + a.bbox[3]
    )
    bright = float(np.mean(image > np.percentile(image, 5) + 20))
    return float(covered.mean()), bright, overlaps


def test_density_raises_frame_coverage_and_overlaps_and_zero_keeps_sparse_frames() -> None:
    sparse_cover, sparse_bright, sparse_overlaps = _coverage_and_overlaps(0.0)
    dense_cover, dense_bright, dense_overlaps = _coverage_and_overlaps(1.0)
    assert dense_cover > 0.85 > sparse_cover
    assert dense_bright > sparse_bright + 0.2
    assert dense_overlaps > 10 * max(1, sparse_overlaps)
    default = FrameSimulator(FrameConfig(**SMALL_FRAME), seed=4).render(0.0)[0]
    zero = FrameSimulator(FrameConfig(**SMALL_FRAME, density=0.0), seed=4).render(0.0)[0]
    assert np.array_equal(default, zero)


# --- CLI ----------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="crystal-monitor simulate")
    add_simulate_arguments(parser)
    return run_simulate(parser.parse_args(argv))


def test_cli_site_range_records_site_and_look_per_crop(tmp_path: Path) -> None:
    assert _run([str(tmp_path), "--mode", "crop", "--count", "12", "--sites", "3-5"]) == 0
    records = [json.loads(line) for line in (tmp_path / GROUND_TRUTH_FILE).read_text().splitlines()]
    assert len(records) == 12
    assert {r["site"] for r in records} <= {"site-3", "site-4", "site-5"}
    for record in records:
        assert get_look(record["look"]).label == record["label"]
        assert read_image_file(tmp_path / record["file"]).ndim == 2


def test_cli_frames_with_a_style_and_density_record_site_and_particle_looks(
    tmp_path: Path,
) -> None:
    argv = [str(tmp_path), "--count", "2", "--width", "320", "--height", "240"]
    argv += ["--site-style", "bright-16bit", "--density", "0.5", "--particles", "5"]
    assert _run(argv) == 0
    records = [json.loads(line) for line in (tmp_path / GROUND_TRUTH_FILE).read_text().splitlines()]
    assert [r["site"] for r in records] == ["bright-16bit"] * 2
    assert len(records[0]["particles"]) > 5
    assert all(p["look"] in look_names() for p in records[0]["particles"])
    image = cv2.imread(str(tmp_path / records[0]["file"]), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint16


def test_cli_classic_default_records_classic_looks_and_no_site(tmp_path: Path) -> None:
    assert _run([str(tmp_path), "--mode", "crop", "--count", "4"]) == 0
    records = [json.loads(line) for line in (tmp_path / GROUND_TRUTH_FILE).read_text().splitlines()]
    assert {r["look"] for r in records} <= {"bundle", "granular"}
    assert {r["site"] for r in records} == {None}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sites", "9-2"], "--sites: expected a site range A-B with 0 <= A <= B"),
        (["--sites", "abc"], "--sites: expected a site range A-B"),
        (["--site", "-1"], "--site: must be >= 0"),
        (["--site-style", "nope"], "--site-style: unknown site style 'nope'"),
        (["--look-mix", "fancy"], "--look-mix: invalid choice"),
        (["--density", "1.5"], "--density: must be between 0 and 1"),
        (["--site", "1", "--sites", "0-3"], "--sites: not allowed with argument --site"),
    ],
)
def test_cli_rejects_bad_site_look_and_density_values_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit):
        _run([str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_cli_density_in_crop_mode_is_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run([str(tmp_path), "--mode", "crop", "--density", "0.5"]) == 2
    assert "--density applies to --mode frame only" in capsys.readouterr().err


def test_parse_site_range_is_inclusive() -> None:
    assert parse_site_range("0-199") == range(200)
    assert parse_site_range("4-4") == range(4, 5)
