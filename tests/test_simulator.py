"""Tests for the probe simulator (monitor.simulator): determinism, ground truth,
class-independent crop shapes, profiles, file naming and real-time writing."""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from monitor.simulator import (
    CEX,
    PG,
    ConstantProfile,
    CropSimulator,
    FrameConfig,
    FrameSimulator,
    ParticleTruth,
    RampProfile,
    StepProfile,
    parse_frame_timestamp,
    parse_profile,
)
from monitor.simulator.command import add_simulate_arguments, run_simulate
from monitor.simulator.writer import (
    GROUND_TRUTH_FILE,
    FramePacer,
    image_file_name,
    temporary_path,
    write_png_atomically,
)

# Small frames with small particles keep the many-frame tests fast.
SMALL_FRAME = {
    "width": 480,
    "height": 360,
    "cex_length_px": (40.0, 90.0),
    "pg_diameter_px": (30.0, 70.0),
}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="crystal-monitor simulate")
    add_simulate_arguments(parser)
    return parser.parse_args(argv)


def _read_ground_truth(outdir: Path) -> list[dict[str, Any]]:
    lines = (outdir / GROUND_TRUTH_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _laplacian_variance(image: np.ndarray) -> float:
    return float(cv2.Laplacian(image.astype(np.float32), cv2.CV_32F).var())


# --- determinism ---------------------------------------------------------------


def test_same_seed_gives_byte_identical_crops_and_other_seed_differs() -> None:
    first = [CropSimulator(7).render(label) for label in (CEX, PG)]
    second = [CropSimulator(7).render(label) for label in (CEX, PG)]
    other = [CropSimulator(8).render(label) for label in (CEX, PG)]
    for a, b in zip(first, second, strict=True):
        assert a.dtype == np.uint8
        assert a.tobytes() == b.tobytes()
    assert any(
        a.shape != c.shape or a.tobytes() != c.tobytes() for a, c in zip(first, other, strict=True)
    )


def test_same_seed_gives_byte_identical_frames_and_truth_and_other_seed_differs() -> None:
    config = FrameConfig(profile=ConstantProfile(0.3), bubbles=True, fouling=True, **SMALL_FRAME)
    runs = []
    for seed in (3, 3, 4):
        simulator = FrameSimulator(config, seed=seed)
        runs.append([simulator.render(float(t)) for t in (0, 1, 2)])
    for (image_a, truth_a), (image_b, truth_b) in zip(runs[0], runs[1], strict=True):
        assert image_a.tobytes() == image_b.tobytes()
        assert truth_a == truth_b
    assert runs[0][0][0].tobytes() != runs[2][0][0].tobytes()


# --- crops -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def crops_by_class() -> dict[str, list[np.ndarray]]:
    """400 crops of each class from one simulator (interleaved, as the CLI does)."""
    simulator = CropSimulator(11)
    crops: dict[str, list[np.ndarray]] = {CEX: [], PG: []}
    for _ in range(400):
        for label in (CEX, PG):
            crops[label].append(simulator.render(label))
    return crops


def test_crop_size_and_aspect_distributions_do_not_depend_on_class(
    crops_by_class: dict[str, list[np.ndarray]],
) -> None:
    """A model must not be able to tell CEX from PG by crop shape."""
    heights = {k: np.array([c.shape[0] for c in v]) for k, v in crops_by_class.items()}
    aspects = {k: np.array([c.shape[1] / c.shape[0] for c in v]) for k, v in crops_by_class.items()}
    for label in (CEX, PG):
        assert heights[label].min() >= 130
        assert heights[label].max() <= 230
        assert aspects[label].min() >= 0.84
        assert aspects[label].max() <= 1.21
    # Uniform 130-230 px: sd 29, so the mean of 400 has sd 1.5 px.
    assert abs(heights[CEX].mean() - heights[PG].mean()) < 8.0
    assert abs(aspects[CEX].mean() - aspects[PG].mean()) < 0.03
    for q in (10, 50, 90):
        assert abs(np.percentile(heights[CEX], q) - np.percentile(heights[PG], q)) < 15.0
        assert abs(np.percentile(aspects[CEX], q) - np.percentile(aspects[PG], q)) < 0.05
    # Two-sample Kolmogorov-Smirnov distance, below its 0.1 % critical value (0.138).
    grid = np.linspace(130, 230, 101)
    ecdf = {k: np.searchsorted(np.sort(v), grid, side="right") / v.size for k, v in heights.items()}
    assert np.abs(ecdf[CEX] - ecdf[PG]).max() < 0.138


def test_pg_crops_are_brighter_and_more_textured_in_the_centre_than_cex(
    crops_by_class: dict[str, list[np.ndarray]],
) -> None:
    """Measured on the real reference crops: centre-half mean grey CEX 75-126, PG 124-209;
    high-pass (minus a sigma-2 blur) std CEX 3-9, PG 4-14. Synthetic means: CEX about
    98 and 6, PG about 172 and 11."""

    def centre_stats(image: np.ndarray) -> tuple[float, float]:
        grey = image.astype(np.float32)
        height, width = grey.shape
        detail = grey - cv2.GaussianBlur(grey, (0, 0), 2.0)
        centre = (slice(height // 4, 3 * height // 4), slice(width // 4, 3 * width // 4))
        return float(grey[centre].mean()), float(detail[centre].std())

    stats = {k: np.array([centre_stats(c) for c in v]) for k, v in crops_by_class.items()}
    cex_mean, cex_texture = stats[CEX].mean(axis=0)
    pg_mean, pg_texture = stats[PG].mean(axis=0)
    assert 80.0 < cex_mean < 125.0
    assert 140.0 < pg_mean < 210.0
    assert pg_mean > cex_mean + 40.0
    assert pg_texture > 1.4 * cex_texture


def test_crop_render_rejects_unknown_label() -> None:
    with pytest.raises(ValueError, match="CEX, PG"):
        CropSimulator(0).render("needle")


def test_crop_mode_cli_writes_image_folder_with_requested_count_and_share(tmp_path: Path) -> None:
    outdir = tmp_path / "crops"
    code = run_simulate(
        _parse([str(outdir), "--mode", "crop", "--count", "120", "--pg-fraction", "0.3"])
    )
    assert code == 0
    cex_files = sorted((outdir / CEX).glob("*.png"))
    pg_files = sorted((outdir / PG).glob("*.png"))
    assert len(cex_files) + len(pg_files) == 120
    # Binomial(120, 0.3): sd 0.042.
    assert abs(len(pg_files) / 120 - 0.3) < 0.13
    records = _read_ground_truth(outdir)
    assert len(records) == 120
    for record in records:
        file = str(record["file"])
        assert file.startswith(f"{record['label']}/")
        assert record["pg_fraction"] == 0.3
    image = cv2.imread(str(pg_files[0]), cv2.IMREAD_UNCHANGED)
    assert image is not None
    assert image.dtype == np.uint8
    assert image.ndim == 2
    assert 130 <= image.shape[0] <= 230


# --- frames ----------------------------------------------------------------------


def test_frame_mode_cli_writes_full_size_frames_and_truth_inside_the_frame(tmp_path: Path) -> None:
    code = run_simulate(
        _parse([str(tmp_path), "--count", "3", "--pg-fraction", "0.2", "--bubbles"])
    )
    assert code == 0
    frames = sorted(tmp_path.glob("frame_*.png"))
    assert len(frames) == 3
    for frame in frames:
        image = cv2.imread(str(frame), cv2.IMREAD_UNCHANGED)
        assert image is not None
        assert image.shape == (1024, 1360)
        assert image.dtype == np.uint8
    records = _read_ground_truth(tmp_path)
    assert [r["file"] for r in records] == [f.name for f in frames]
    assert [r["t_s"] for r in records] == [0.0, 1.0, 2.0]
    assert records[0]["ts"] == "2026-01-01T00:00:00.000Z"
    assert parse_frame_timestamp(frames[2].name) == datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC)
    particles = [p for r in records for p in r["particles"]]
    assert len(particles) == 90
    for particle in particles:
        x, y, w, h = particle["bbox"]
        assert particle["label"] in (CEX, PG)
        assert isinstance(particle["in_focus"], bool)
        assert w > 0 and h > 0
        assert x >= 0 and y >= 0
        assert x + w <= 1360 and y + h <= 1024


def test_pg_share_in_frame_truth_follows_a_ramp_profile() -> None:
    """Ramp 0 -> 0.4 over 0-60 s: the first half of the frames averages 0.1, the second 0.3."""
    profile = parse_profile("ramp:0:0.4@0-60")
    simulator = FrameSimulator(FrameConfig(profile=profile, particles=30, **SMALL_FRAME), seed=5)
    shares = []
    for t in range(60):
        _, truths = simulator.render(float(t))
        assert len(truths) == 30
        shares.append(sum(truth.label == PG for truth in truths) / len(truths))
    first, second = np.mean(shares[:30]), np.mean(shares[30:])
    expected_first = np.mean([profile.fraction_at(t) for t in range(30)])
    expected_second = np.mean([profile.fraction_at(t) for t in range(30, 60)])
    # 900 particles per half: binomial sd about 0.015.
    assert abs(first - expected_first) < 0.05
    assert abs(second - expected_second) < 0.05
    assert shares[0] == 0.0


def test_empty_share_gives_empty_frames_with_empty_truth() -> None:
    config = FrameConfig(empty_share=1.0, profile=ConstantProfile(0.5), **SMALL_FRAME)
    simulator = FrameSimulator(config, seed=1)
    for t in range(5):
        image, truths = simulator.render(float(t))
        assert truths == []
        # Nothing but lighting and noise: no bright particle pixels.
        assert np.percentile(image, 99.9) < 110

    half = FrameSimulator(FrameConfig(empty_share=0.5, **SMALL_FRAME), seed=1)
    empties = sum(not half.render(float(t))[1] for t in range(40))
    assert 8 <= empties <= 32


def test_in_focus_frames_are_sharper_than_fully_defocused_ones() -> None:
    """Variance of the Laplacian, the usual focus measure, over each particle's box drops
    when every particle is blurred (about 27 against 16 when measured)."""
    sharp_sim = FrameSimulator(FrameConfig(defocus_share=0.0), seed=2)
    blurred_sim = FrameSimulator(FrameConfig(defocus_share=1.0), seed=2)
    sharp, sharp_truth = sharp_sim.render(0.0)
    blurred, blurred_truth = blurred_sim.render(0.0)
    assert all(p.in_focus for p in sharp_truth)
    assert not any(p.in_focus for p in blurred_truth)

    def mean_focus(image: np.ndarray, truths: list[ParticleTruth]) -> float:
        return float(
            np.mean(
                [
                    _laplacian_variance(image[y : y + h, x : x + w])
                    for x, y, w, h in (t.bbox for t in truths)
                ]
            )
        )

    assert mean_focus(sharp, sharp_truth) > 1.3 * mean_focus(blurred, blurred_truth)
    assert _laplacian_variance(sharp) > _laplacian_variance(blurred)


def test_fouling_darkens_the_window_as_time_goes_on() -> None:
    config = FrameConfig(fouling=True, fouling_full_s=600.0, **SMALL_FRAME)
    clean, _ = FrameSimulator(config, seed=9).render(0.0)
    fouled, _ = FrameSimulator(config, seed=9).render(600.0)
    assert fouled.mean() < clean.mean() - 3.0


def test_frame_config_rejects_bad_values_naming_the_field() -> None:
    with pytest.raises(ValueError, match="empty_share"):
        FrameConfig(empty_share=1.5)
    with pytest.raises(ValueError, match="particles"):
        FrameConfig(particles=-1)


# --- profiles --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("constant:0.1", ConstantProfile(0.1)),
        ("step:0.0:0.2@600", StepProfile(0.0, 0.2, 600.0)),
        ("ramp:0:0.3@0-1800", RampProfile(0.0, 0.3, 0.0, 1800.0)),
        (" RAMP:0.1:0@-60-60 ", RampProfile(0.1, 0.0, -60.0, 60.0)),
    ],
)
def test_parse_profile_reads_the_accepted_forms(text: str, expected: object) -> None:
    assert parse_profile(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0.1",
        "constant:",
        "constant:x",
        "constant:1.5",
        "step:0.2@600",
        "step:0:0.2",
        "ramp:0:0.3@1800",
        "ramp:0:0.3@100-50",
        "linear:0:1@0-10",
    ],
)
def test_parse_profile_rejects_bad_text_naming_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="accepted forms") as caught:
        parse_profile(text)
    assert "step:BEFORE:AFTER@SECONDS" in str(caught.value)


def test_profiles_give_the_share_at_a_time() -> None:
    step = StepProfile(0.0, 0.2, 600.0)
    assert step.fraction_at(599.9) == 0.0
    assert step.fraction_at(600.0) == 0.2
    ramp = RampProfile(0.0, 0.3, 100.0, 400.0)
    assert ramp.fraction_at(0.0) == 0.0
    assert ramp.fraction_at(250.0) == pytest.approx(0.15)
    assert ramp.fraction_at(1e6) == 0.3
    assert str(ramp) == "ramp:0:0.3@100-400"


# --- writer and CLI -------------------------------------------------------------


@pytest.mark.parametrize(
    "timestamp",
    [
        datetime(2026, 11, 22, 1, 33, 0, 250000, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2030, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
    ],
)
def test_parse_frame_timestamp_round_trips_writer_names(timestamp: datetime) -> None:
    name = image_file_name(timestamp, 123)
    assert parse_frame_timestamp(name) == timestamp
    assert parse_frame_timestamp(Path("/data/run") / name) == timestamp


def test_writer_names_look_like_vendor_names_and_unrelated_names_parse_to_none() -> None:
    stamp = datetime(2026, 11, 22, 1, 33, 0, 250000, tzinfo=UTC)
    assert image_file_name(stamp, 123) == "frame_20261122T013300.250Z_000123.png"
    assert parse_frame_timestamp("img_0001.png") is None
    assert parse_frame_timestamp("frame_20261399T013300.250Z_000001.png") is None
    assert parse_frame_timestamp("x_20261122T013300Z.bmp") == datetime(
        2026, 11, 22, 1, 33, tzinfo=UTC
    )


def test_write_png_atomically_renames_a_dot_part_file_into_place(tmp_path: Path) -> None:
    target = tmp_path / "frame_20260101T000000.000Z_000000.png"
    partial = temporary_path(target)
    assert partial.parent == tmp_path
    assert partial.name.startswith(".")
    assert not partial.match("*.png")
    write_png_atomically(target, np.full((8, 9), 77, np.uint8))
    assert not partial.exists()
    assert cv2.imread(str(target), cv2.IMREAD_UNCHANGED).tolist() == [[77] * 9] * 8


def test_realtime_frames_are_never_seen_half_written_and_come_at_about_the_rate(
    tmp_path: Path,
) -> None:
    """A watcher polling the folder only ever sees *.png files that decode completely."""
    fps, count = 8.0, 12
    args = _parse(
        [
            str(tmp_path),
            "--count",
            str(count),
            "--realtime",
            str(fps),
            "--width",
            "640",
            "--height",
            "480",
            "--particles",
            "10",
        ]
    )
    codes: list[int] = []
    writer = threading.Thread(target=lambda: codes.append(run_simulate(args)))
    began = time.monotonic()
    writer.start()
    seen: set[str] = set()
    failures: list[str] = []

    def scan() -> None:
        for path in tmp_path.glob("*.png"):
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is None or image.shape != (480, 640):
                failures.append(path.name)
            seen.add(path.name)

    while writer.is_alive():
        scan()
        time.sleep(0.005)
    writer.join()
    scan()
    elapsed = time.monotonic() - began
    assert codes == [0]
    assert failures == []
    assert len(seen) == count
    assert not list(tmp_path.glob(".*.part"))
    # At 8 fps, 12 images take at least 11 periods; allow a slow machine plenty.
    assert elapsed >= (count - 1) / fps * 0.9
    assert elapsed < (count - 1) / fps * 4 + 5
    stamps = sorted(stamp for name in seen if (stamp := parse_frame_timestamp(name)))
    assert len(stamps) == count
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]
    assert 0.5 / fps < float(np.median(gaps)) < 2.0 / fps


def test_frame_pacer_releases_image_i_at_i_over_fps_and_skips_sleep_when_late() -> None:
    now = [100.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    pacer = FramePacer(4.0, clock=lambda: now[0], sleep=sleep)
    assert pacer.wait(0) == 0.0
    now[0] += 0.1
    assert pacer.wait(1) == pytest.approx(0.25)
    now[0] += 1.0  # a slow frame: image 2 is already late
    assert pacer.wait(2) == pytest.approx(1.25)
    assert sleeps == [pytest.approx(0.15)]


def test_cli_rejects_bad_options_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _parse([str(tmp_path), "--pg-fraction", "1.5"])
    assert "--pg-fraction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse([str(tmp_path), "--profile", "sigmoid:0:1"])
    err = capsys.readouterr().err
    assert "--profile" in err
    assert "accepted forms" in err
    with pytest.raises(SystemExit):
        _parse([str(tmp_path), "--pg-fraction", "0.1", "--profile", "constant:0.1"])
    assert "--profile" in capsys.readouterr().err
    assert run_simulate(_parse([str(tmp_path), "--mode", "crop", "--particles", "5"])) == 2
    assert "--particles" in capsys.readouterr().err
    assert run_simulate(_parse([str(tmp_path), "--count", "0"])) == 2
    assert "--realtime" in capsys.readouterr().err


def test_cli_start_time_sets_the_timestamps(tmp_path: Path) -> None:
    args = _parse(
        [
            str(tmp_path),
            "--count",
            "2",
            "--interval",
            "0.5",
            "--particles",
            "2",
            "--width",
            "200",
            "--height",
            "160",
            "--start",
            "2026-11-22T01:33:00.250Z",
        ]
    )
    assert run_simulate(args) == 0
    start = datetime(2026, 11, 22, 1, 33, 0, 250000, tzinfo=UTC)
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert [parse_frame_timestamp(n) for n in names] == [start, start + timedelta(seconds=0.5)]
