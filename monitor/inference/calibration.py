"""INT8 calibration data: crop images read through the daemon's own decode and preprocessing.

TensorRT picks INT8 scales from the activations it sees on these batches, so they must
be what the classifier sees in the plant: particle crops, prepared exactly as the
pipeline prepares them (`monitor.imaging.decode`, then `monitor.imaging.preprocess` as the manifest
says). No TensorRT here: the batches and the fingerprint are plain numpy and files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from monitor.imaging.decode import DecodeError, read_image_file
from monitor.imaging.preprocess import prepare_batch
from monitor.manifest import InputSpec

CALIBRATION_BATCH = 16
CALIBRATION_MAX_IMAGES = 512
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


class CalibrationError(Exception):
    """Calibration images that cannot be used; the message names the fix."""


def calibration_files(folder: Path, *, limit: int = CALIBRATION_MAX_IMAGES) -> list[Path]:
    """The first `limit` image files under `folder`, in a stable (sorted) order."""
    if not folder.is_dir():
        raise CalibrationError(
            f"calibration folder not found: {folder} (set backend.tensorrt.calibration_dir or "
            "--calibration to a folder of crop images)"
        )
    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    return files[:limit]


def calibration_fingerprint(files: list[Path]) -> str:
    """sha256 over the names and contents of the calibration images: part of the engine key,
    so other calibration images mean another INT8 engine."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def calibration_batches(
    files: list[Path], spec: InputSpec, *, batch_size: int = CALIBRATION_BATCH
) -> list[np.ndarray]:
    """Full (batch_size, 3, S, S) float32 batches of the readable images, in file order.

    Unreadable files are skipped; a remainder smaller than one batch is dropped (the
    calibration profile has one fixed batch size).
    """
    images = []
    for path in files:
        try:
            images.append(read_image_file(path))
        except DecodeError:
            continue
    usable = len(images) - len(images) % batch_size
    if usable == 0:
        raise CalibrationError(
            f"INT8 calibration needs at least {batch_size} readable images, found "
            f"{len(images)} among {len(files)} files (add crops, e.g. `crystal-monitor "
            "simulate DIR --mode crop --count 512`, or use precision = 'fp16')"
        )
    return [
        prepare_batch(images[start : start + batch_size], spec)
        for start in range(0, usable, batch_size)
    ]
