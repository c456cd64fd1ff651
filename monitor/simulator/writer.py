"""Writing simulated images the way probe vendor software does.

Vendor software drops one file per image into an experiment folder, named with
its UTC capture time and a sequence number, e.g.
`frame_20261122T013300.250Z_000123.png`. A watcher must never read a file half
written, so each PNG is written under a dot-prefixed temporary name that does
not match `*.png` and then renamed into place, which is atomic within a folder.
The ground truth goes, one JSON object per image, to `ground_truth.jsonl`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from monitor.simulator.frames import ParticleTruth
from monitor.timestamps import iso_utc

GROUND_TRUTH_FILE = "ground_truth.jsonl"
_STAMP_FORMAT = "%Y%m%dT%H%M%S"
_STAMP_PATTERN = re.compile(r"(\d{8}T\d{6})(?:\.(\d{1,6}))?Z")


def _as_utc(timestamp: datetime) -> datetime:
    """Aware UTC datetime; a naive one is taken to be UTC already."""
    if timestamp.tzinfo is None:
        return timestamp.replace(tzinfo=UTC)
    return timestamp.astimezone(UTC)


def format_file_stamp(timestamp: datetime) -> str:
    """Compact UTC stamp with milliseconds for file names: 20261122T013300.250Z."""
    utc = _as_utc(timestamp)
    return f"{utc.strftime(_STAMP_FORMAT)}.{utc.microsecond // 1000:03d}Z"


def image_file_name(timestamp: datetime, sequence: int, prefix: str = "frame") -> str:
    """`{prefix}_{UTC stamp}_{sequence:06d}.png`."""
    return f"{prefix}_{format_file_stamp(timestamp)}_{sequence:06d}.png"


def parse_frame_timestamp(name: str | os.PathLike[str]) -> datetime | None:
    """The UTC capture time in a file name written here (or named alike), else None.

    Looks for `YYYYMMDDTHHMMSS[.fff]Z` anywhere in the file's base name, so a
    prefix, a sequence number and any extension are ignored.
    """
    match = _STAMP_PATTERN.search(Path(name).name)
    if match is None:
        return None
    try:
        stamp = datetime.strptime(match.group(1), _STAMP_FORMAT)
    except ValueError:
        return None
    fraction = match.group(2) or ""
    microseconds = int(fraction.ljust(6, "0")) if fraction else 0
    return stamp.replace(microsecond=microseconds, tzinfo=UTC)


def temporary_path(path: Path) -> Path:
    """Where `path` is written before the rename: `.name.png.part` in the same folder."""
    return path.with_name(f".{path.name}.part")


def write_png_atomically(path: Path, image: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]) -> None:
    """Write a PNG so that `path` either does not exist or holds the whole file.

    A uint16 image becomes a 16-bit greyscale PNG, as 16-bit probe cameras write.
    """
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode a PNG for {path}")
    partial = temporary_path(path)
    try:
        with partial.open("wb") as handle:
            handle.write(encoded.tobytes())
        # No fsync: the rename alone makes readers see all or nothing; surviving
        # a power cut is not a simulator's job.
        partial.replace(path)
    except BaseException:
        # Interrupted (Ctrl-C on a real-time run) or failed: leave no debris.
        partial.unlink(missing_ok=True)
        raise


def particle_records(
    truths: Iterable[ParticleTruth], pixel_size_um: float | None = None
) -> list[dict[str, Any]]:
    """Ground-truth particles as JSON-ready dicts: label, bbox [x, y, w, h], in_focus,
    look, touching, the size and shape in pixels (area_px, ecd_px, feret_max_px,
    feret_min_px, aspect_ratio) and, with a pixel size, in micrometres (area_um2,
    ecd_um, feret_max_um, feret_min_um)."""
    records = []
    for truth in truths:
        record: dict[str, Any] = {
            "label": truth.label,
            "bbox": list(truth.bbox),
            "in_focus": truth.in_focus,
            "look": truth.look,
            "touching": truth.touching,
            "area_px": truth.area_px,
            "ecd_px": round(truth.ecd_px, 3),
            "feret_max_px": round(truth.feret_max_px, 3),
            "feret_min_px": round(truth.feret_min_px, 3),
            "aspect_ratio": round(truth.aspect_ratio, 4),
        }
        if pixel_size_um is not None:
            record.update(
                area_um2=round(truth.area_px * pixel_size_um**2, 3),
                ecd_um=round(truth.ecd_px * pixel_size_um, 3),
                feret_max_um=round(truth.feret_max_px * pixel_size_um, 3),
                feret_min_um=round(truth.feret_min_px * pixel_size_um, 3),
            )
        records.append(record)
    return records


class GroundTruthLog:
    """Appends one JSON object per written image to OUTDIR/ground_truth.jsonl."""

    def __init__(self, outdir: Path) -> None:
        self.path = outdir / GROUND_TRUTH_FILE
        self._handle = self.path.open("a", encoding="utf-8")

    def append(
        self,
        file: str,
        timestamp: datetime,
        t_s: float,
        pg_fraction: float,
        **fields: Any,
    ) -> None:
        """Write one line (file relative to OUTDIR) and flush it, so readers see it now."""
        record: dict[str, Any] = {
            "file": file,
            "ts": iso_utc(_as_utc(timestamp)),
            "t_s": round(t_s, 6),
            "pg_fraction": round(pg_fraction, 6),
        }
        record.update(fields)
        self._handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._handle.flush()

    def close(self) -> None:
        """Close the file."""
        self._handle.close()

    def __enter__(self) -> GroundTruthLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class FramePacer:
    """Holds a loop to a fixed rate: image i is released at start + i / fps.

    A late image is released at once and the schedule is kept, so the average
    rate stays right after a slow frame. Clock and sleep are injectable for tests.
    """

    def __init__(
        self,
        fps: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not fps > 0.0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.period = 1.0 / fps
        self._clock = clock
        self._sleep = sleep
        self._start = clock()

    def wait(self, index: int) -> float:
        """Sleep until image `index` is due; return seconds since the pacer started."""
        due = self._start + index * self.period
        delay = due - self._clock()
        if delay > 0.0:
            self._sleep(delay)
        return self._clock() - self._start
