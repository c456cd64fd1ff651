"""The learned particle detector (particles.separation = "learned"): its training
targets and the daemon's decoding agree, a tiny training run exports a detector the
daemon loads through ONNX Runtime, bad detector folders are refused with the fix, and
the shipped detector finds the particles of simulated slurries from sparse to dense."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.instances import match_boxes
from model_zoo.cli import main as model_zoo_main
from model_zoo.particle_detector import FrameBatches, render_frames, targets
from monitor.config.settings import ParticlesConfig, ProbeConfig, check_sections_environment
from monitor.inference.particle_detector import (
    GRID,
    INPUT_SCALE,
    DetectorError,
    ParticleDetector,
    decode,
    network_input,
)
from monitor.manifest import DETECTOR_MANIFEST, default_detector_dir
from monitor.pipeline.sampling import ParticleSampler
from monitor.simulator import FrameConfig, FrameSimulator, RampProfile


def _grid_from_targets(target: np.ndarray) -> np.ndarray:
    """What a perfect network would output for these targets: heat logits that peak
    at the centres, the regression channels as they are."""
    heat = np.clip(target[0], 1e-4, 1 - 1e-4)
    logits = np.log(heat / (1 - heat))
    return np.concatenate([logits[None], target[1:5]]).astype(np.float32)


def test_decoding_a_perfect_output_gives_back_the_training_boxes() -> None:
    boxes = np.array(
        [[100, 80, 200, 60], [130, 90, 60, 180], [700, 500, 150, 150], [1300, 990, 50, 30]],
        np.float32,
    )
    target = targets(boxes, (1024 // GRID, 1360 // GRID))
    found = decode(_grid_from_targets(target), 0.5, (1024, 1360), limit=10)
    assert len(found) == 4
    # Two overlapping boxes (a needle across a needle) stay two.
    for expected in boxes:
        best = min(found, key=lambda d: np.abs(np.array(d.box) - expected).sum())
        x, y, w, h = best.box
        assert abs(x - expected[0]) <= 1 and abs(y - expected[1]) <= 1
        # The last box is clipped at the frame's edge (1360 x 1024).
        assert abs(min(x + w, 1360) - min(expected[0] + expected[2], 1360)) <= 1
        assert abs(min(y + h, 1024) - min(expected[1] + expected[3], 1024)) <= 1
        assert best.score > 0.99


def test_decode_keeps_the_highest_peaks_up_to_the_limit() -> None:
    boxes = np.array([[x, 100, 40, 40] for x in range(0, 1200, 100)], np.float32)
    target = targets(boxes, (1024 // GRID, 1360 // GRID))
    row = 120 // GRID  # the centres' row
    target[0, row, :] *= np.linspace(0.6, 1.0, 1360 // GRID)  # later centres score higher
    found = decode(_grid_from_targets(target), 0.5, (1024, 1360), limit=3)
    assert [d.box[0] for d in found] == [1100, 1000, 900]


def test_mirrored_training_crops_keep_their_targets_consistent() -> None:
    frames = render_frames(2, seed=7)
    batches = FrameBatches(frames, seed=3)
    for _ in range(4):
        images, maps = batches.batch(4)
        cells = (128 * INPUT_SCALE // GRID, 160 * INPUT_SCALE // GRID)
        assert images.shape == (4, 1, 128, 160) and maps.shape == (4, 6, *cells)
        centres = maps[:, 5] > 0
        # Offsets stay within their cell whichever way the crop was flipped.
        offsets = maps[:, 1:3].permute(1, 0, 2, 3)[:, centres]
        assert float(offsets.min()) >= 0.0 and float(offsets.max()) <= 1.0
        # Each centre is the heat map's peak (1.0) in its cell.
        assert np.allclose(maps[:, 0][centres].numpy(), 1.0)


def test_a_tiny_training_run_exports_a_detector_the_daemon_loads(tmp_path: Path) -> None:
    out = tmp_path / "detector"
    code = model_zoo_main(
        [
            "train-detector",
            str(out),
            "--frames",
            "4",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--workers",
            "1",
        ]
    )
    assert code == 0
    manifest = json.loads((out / DETECTOR_MANIFEST).read_text())
    assert manifest["onnx_file"] == "detector.onnx" and manifest["steps"] == 3
    detector = ParticleDetector(out, threshold=0.01)
    simulator = FrameSimulator(FrameConfig(), seed=3)
    image, _ = simulator.render(0.0)
    found = detector.detect(network_input(image), image.shape, limit=5)
    assert len(found) <= 5
    for detection in found:
        x, y, w, h = detection.box
        assert x >= 0 and y >= 0 and x + w <= 1360 and y + h <= 1024 and w >= 2 and h >= 2


def test_a_folder_without_a_detector_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DetectorError, match="train-detector"):
        ParticleDetector(tmp_path, threshold=0.3)
    (tmp_path / DETECTOR_MANIFEST).write_text(
        '{"onnx_file": "detector.onnx", "grid": 32, "input_scale": 4}'
    )
    with pytest.raises(DetectorError, match="grid 32"):
        ParticleDetector(tmp_path, threshold=0.3)
    probe = ProbeConfig.model_validate(
        {
            "id": "p1",
            "source": {"type": "simulated"},
            "sampling": "particles",
            "particles": {"separation": "learned", "detector": str(tmp_path / "nowhere")},
        }
    )
    problems = check_sections_environment({"probes": (probe,)})
    assert any("probes[0].particles.detector" in p and "train-detector" in p for p in problems)


def _recall(density: float, frames: int, config: ParticlesConfig) -> tuple[float, float]:
    """Recall and precision at IoU 0.5 against the in-focus particles of seed 15's ramp
    (as bench/instances.py; a box on an out-of-focus particle is neither)."""
    simulator = FrameSimulator(
        FrameConfig(density=density, profile=RampProfile(0.0, 0.3, 0.0, 3600.0)), seed=15
    )
    sampler = ParticleSampler(config)
    matched = truths = counted = 0
    for index in range(frames):
        image, truth = simulator.render(index * 3600.0 / frames)
        in_focus = [t.bbox for t in truth if t.in_focus]
        blurred = [t.bbox for t in truth if not t.in_focus]
        found = sampler.find_particles(image)
        pairs = match_boxes(in_focus, found)
        used = {f for _, f in pairs}
        rest = [box for f, box in enumerate(found) if f not in used]
        matched += len(pairs)
        truths += len(in_focus)
        counted += len(found) - len(match_boxes(blurred, rest))
    return matched / truths, matched / max(1, counted)


# Dense: issue 15's target, not met yet (recall 0.65 with the shipped detector,
# bench/instances.py); strict, so the day it is met the mark must go.
_DENSE_NOT_MET = pytest.mark.xfail(strict=True, reason="dense recall 0.65 < 0.75 (BENCHMARKS.md)")


@pytest.mark.parametrize(
    ("density", "min_recall"), [(0.0, 0.9), pytest.param(1.0, 0.75, marks=_DENSE_NOT_MET)]
)
def test_the_shipped_detector_separates_sparse_and_dense_slurries(
    density: float, min_recall: float
) -> None:
    assert (default_detector_dir() / DETECTOR_MANIFEST).is_file()
    recall, precision = _recall(density, 6, ParticlesConfig(separation="learned"))
    assert recall >= min_recall
    assert precision >= 0.75
