"""The learned particle detector (particles.separation = "learned"), through ONNX Runtime.

The network (trained by `python -m model_zoo train-detector`, see
model_zoo/particle_detector.py) sees the frame at a quarter of its size and predicts,
on a grid of GRID x GRID frame pixels, a heat map of particle centres, each centre's
offset within its cell and its box's log width and height. Decoding keeps the cells
that are the highest of their 3 x 3 neighbourhood and above the threshold: one box
per particle even where the boxes overlap, which is what a crowded slurry needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from monitor.manifest import DETECTOR_MANIFEST

INPUT_SCALE = 4  # the network sees the frame 4x smaller
GRID = 8  # frame pixels per output cell
OUTPUT_CHANNELS = 5  # heat logit, offset x, offset y, log w, log h
INPUT_MEAN = 128.0
INPUT_SCALE_GREY = 64.0

Box = tuple[int, int, int, int]


class DetectorError(Exception):
    """The detector's files are missing or unreadable; the message names the fix."""


def network_input(grey: np.ndarray) -> np.ndarray:
    """The frame as the network sees it: uint8, INPUT_SCALE x smaller (area average),
    cut to whole GRID cells."""
    height, width = grey.shape
    rows, columns = height // GRID, width // GRID
    cut = grey[: rows * GRID, : columns * GRID]
    size = (columns * GRID // INPUT_SCALE, rows * GRID // INPUT_SCALE)
    return np.asarray(cv2.resize(cut, size, interpolation=cv2.INTER_AREA))


@dataclass(frozen=True)
class Detection:
    box: Box  # x, y, w, h in frame pixels, clipped to the frame
    score: float  # the heat map's peak, 0..1


def decode(
    grid: np.ndarray, threshold: float, frame_shape: tuple[int, int], limit: int
) -> list[Detection]:
    """Boxes from one output grid (5, rows, columns): the heat map's local maxima
    (3 x 3) above `threshold`, highest first, at most `limit`."""
    heat = 1.0 / (1.0 + np.exp(-grid[0].astype(np.float32)))
    peaks = (heat >= cv2.dilate(heat, np.ones((3, 3), np.uint8))) & (heat > threshold)
    rows, columns = np.nonzero(peaks)
    scores = heat[rows, columns]
    order = np.argsort(-scores, kind="stable")[:limit]
    height, width = frame_shape
    found = []
    for index in order.tolist():
        row, column = int(rows[index]), int(columns[index])
        cx = (column + float(grid[1, row, column])) * GRID
        cy = (row + float(grid[2, row, column])) * GRID
        w = float(np.exp(grid[3, row, column])) * GRID
        h = float(np.exp(grid[4, row, column])) * GRID
        x0, y0 = max(0, round(cx - w / 2)), max(0, round(cy - h / 2))
        x1, y1 = min(width, round(cx + w / 2)), min(height, round(cy + h / 2))
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            found.append(Detection((x0, y0, x1 - x0, y1 - y0), float(scores[index])))
    return found


class ParticleDetector:
    """Loads a detector directory (detector.json + its ONNX file) and finds particles.

    ONNX Runtime runs on one thread: the detector runs inside a frame's preparation,
    which already has a worker process or thread per core."""

    def __init__(self, directory: Path, threshold: float) -> None:
        manifest_path = directory / DETECTOR_MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
            onnx_path = directory / str(manifest["onnx_file"])
            if int(manifest["grid"]) != GRID or int(manifest["input_scale"]) != INPUT_SCALE:
                raise DetectorError(
                    f"{manifest_path}: grid {manifest['grid']} / input_scale "
                    f"{manifest['input_scale']} are not this monitor's {GRID} / {INPUT_SCALE}: "
                    "retrain with this version's `python -m model_zoo train-detector`"
                )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DetectorError(
                f"cannot read the particle detector in {directory} ({exc}): set "
                "particles.detector to a folder made by `python -m model_zoo train-detector`"
            ) from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(onnx_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise DetectorError(f"cannot load {onnx_path}: {exc}") from exc
        self._input = self._session.get_inputs()[0].name
        self._threshold = threshold

    def detect(
        self, small: np.ndarray, frame_shape: tuple[int, int], limit: int
    ) -> list[Detection]:
        """Particles in a frame given as network_input(frame)."""
        tensor = (small.astype(np.float32) - INPUT_MEAN) / INPUT_SCALE_GREY
        (grid,) = self._session.run(None, {self._input: tensor[None, None]})
        return decode(grid[0], self._threshold, frame_shape, limit)
