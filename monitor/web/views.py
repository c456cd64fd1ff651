"""What the HTTP server shows, built from the daemon's read model (`MonitorView`):
readiness, state, history, the recent frames.

Plain functions over copies the view hands out; they never touch the network, so the
server runs the slow ones (store queries, JPEG encoding) on a worker thread and keeps
its event loop free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np

from monitor import __version__
from monitor.alarms import FractionHighAlarm, FractionLowAlarm
from monitor.manifest import describe_model_quality
from monitor.pipeline.recorder import RecordedCounts
from monitor.wire import snapshot_on_wire

if TYPE_CHECKING:
    from monitor.runtime.probe_state import LatestFrame
    from monitor.runtime.view import MonitorView

MAX_TREND_POINTS = 720
JPEG_QUALITY = 80
Span = Literal["auto", "hour", "batch"]
SPANS: dict[str, Span] = {"auto": "auto", "hour": "hour", "batch": "batch"}


class UnknownProbeError(LookupError):
    """A probe id that this daemon does not read."""


# -- readiness ------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


def readiness_checks(view: MonitorView) -> list[Check]:
    """Model loaded, the store writable, every probe's source alive, every publisher connected."""
    manifest = view.manifest
    checks = [Check("model", True, f"{manifest.name} {manifest.version} on {view.backend_name}")]
    problem = view.store_problem()
    checks.append(Check("store", problem is None, problem or "writing"))
    for source in view.sources():
        checks.append(Check(f"source {source.name}", source.ok, source.detail))
    for publisher in view.publishers():
        checks.append(Check(f"publisher {publisher.name}", publisher.ok, publisher.detail))
    return checks


# -- current state --------------------------------------------------------------------


def fraction_limits(view: MonitorView, probe: str) -> list[dict[str, Any]]:
    """The class-fraction alarm limits of `probe`, to draw on its trend (live after a reload)."""
    limits = []
    for definition in view.settings.alarms.definitions:
        if not isinstance(definition, FractionHighAlarm | FractionLowAlarm):
            continue
        if not definition.applies_to(probe):
            continue
        limits.append(
            {
                "alarm_id": definition.id,
                "kind": definition.kind,
                "class_name": definition.class_name,
                "window": int(definition.window),
                "limit": definition.limit,
                "deadband": definition.deadband,
                "priority": definition.priority,
                "use_adjusted": definition.use_adjusted,
            }
        )
    return limits


def default_window(view: MonitorView, probe: str) -> int:
    """The window the trend opens on: the first fraction alarm's, else the middle one."""
    for limit in fraction_limits(view, probe):
        return int(limit["window"])
    windows = view.settings.aggregation.windows
    return int(windows[len(windows) // 2])


def _counts_of(counts: RecordedCounts, probe: str, classes: Sequence[str]) -> dict[str, Any]:
    return {
        "frames": {
            status: counts.frames.get((probe, status), 0) for status in ("ok", "rejected", "error")
        },
        "particles": {name: counts.particles.get((probe, name), 0) for name in classes},
        "uncertain": counts.uncertain.get(probe, 0),
        "out_of_distribution": counts.out_of_distribution.get(probe, 0),
        "problems": {
            f"{status}:{reason}": n
            for (p, status, reason), n in sorted(counts.problems.items())
            if p == probe
        },
    }


def probe_state(view: MonitorView, probe: str, counts: RecordedCounts) -> dict[str, Any]:
    """One probe as the dashboard shows it."""
    try:
        reading = view.probe(probe)
    except KeyError:
        raise UnknownProbeError(probe) from None
    now = view.now()
    alarms = view.alarm_states(probe)
    source = next((s for s in view.sources() if s.name == probe), None)
    last_frame_ts, latest = reading.last_frame_ts, reading.latest_frame
    return {
        "id": probe,
        "batch": reading.snapshot["batch"],
        # As the plant was told at the last publish tick; before the first, not yet rated.
        "quality": reading.quality or "UNCERTAIN",
        "last_frame_ts": last_frame_ts,
        "last_frame_age_s": None if last_frame_ts is None else max(0.0, now - last_frame_ts),
        "source": {
            "alive": source is not None and source.ok,
            "detail": source.detail if source is not None else "not started",
        },
        "snapshot": snapshot_on_wire(reading.snapshot),
        "counts": _counts_of(counts, probe, view.manifest.classes),
        "alarms": alarms,
        "active_alarms": [
            alarm for alarm in alarms if alarm["state"] != "normal" or alarm["shelved"]
        ],
        "limits": fraction_limits(view, probe),
        "default_window": default_window(view, probe),
        "latest_frame": None if latest is None else {"ts": latest.ts, "key": latest.key},
    }


def daemon_state(view: MonitorView, refresh_s: float) -> dict[str, Any]:
    """Every probe's current state plus what the page needs to draw it."""
    manifest = view.manifest
    counts = view.recorded_counts()
    return {
        "ts": view.now(),
        "version": __version__,
        "model": {
            "name": manifest.name,
            "version": manifest.version,
            "sha256": manifest.onnx_sha256,
            "quality": describe_model_quality(manifest),
        },
        "classes": list(manifest.classes),
        "windows": [int(w) for w in view.settings.aggregation.windows],
        "refresh_s": refresh_s,
        "probes": [probe_state(view, probe, counts) for probe in view.probe_ids],
    }


# -- history --------------------------------------------------------------------------


def history_since(
    view: MonitorView, probe: str, span: Span, history_s: float, history_max_s: float
) -> tuple[float, str]:
    """Where the trend starts: the running batch's start (auto, batch) or `history_s` ago."""
    now = view.now()
    if span != "hour":
        current = view.current_batch(probe)
        if current is not None:
            return max(current[1], now - history_max_s), "batch"
    return now - history_s, "hour"


def trend_series(
    rows: Sequence[tuple[float, str | None, dict[str, Any]]],
    classes: Sequence[str],
    window: int,
) -> dict[str, Any]:
    """Stored snapshots as columns for one window: time, particle count and per class the
    fraction, its 95 % interval, the adjusted share and the median size (`d50`, and
    `d50_sq` square-weighted; None where a row has no sizes: stored by a daemon that did
    not measure them). `size_unit` is the newest sized row's unit ("um" or "px"), None
    when no row has sizes; a row in another unit (before the probe's pixel size was set)
    has no D50 either, so that one line never mixes pixels and micrometres."""
    key = str(window)
    ts: list[float] = []
    n: list[int] = []
    series: dict[str, dict[str, list[float | None]]] = {
        name: {"fraction": [], "low": [], "high": [], "adjusted": [], "d50": [], "d50_sq": []}
        for name in classes
    }
    size_unit: str | None = None
    units: list[str | None] = []
    for row_ts, _batch, snapshot in rows:
        stats = snapshot.get("windows", {}).get(key)
        if stats is None:
            continue  # stored before the window was configured
        ts.append(row_ts)
        n.append(int(stats.get("n", 0)))
        sizes = stats.get("sizes") or {}
        units.append(sizes.get("unit"))
        if sizes:
            size_unit = sizes.get("unit", size_unit)
        for name in classes:
            cls = stats.get("classes", {}).get(name, {})
            ci = cls.get("ci95") or (None, None)
            sized = sizes.get("classes", {}).get(name, {})
            column = series[name]
            column["fraction"].append(cls.get("fraction"))
            column["low"].append(ci[0])
            column["high"].append(ci[1])
            column["adjusted"].append(cls.get("adjusted"))
            column["d50"].append(sized.get("d50"))
            column["d50_sq"].append(sized.get("d50_sq"))
    for index, unit in enumerate(units):
        if unit != size_unit:
            for column in series.values():
                column["d50"][index] = column["d50_sq"][index] = None
    return {"ts": ts, "n": n, "series": series, "size_unit": size_unit}


def probe_history(
    view: MonitorView,
    probe: str,
    *,
    window: int,
    span: Span,
    history_s: float,
    history_max_s: float,
) -> dict[str, Any]:
    """The trend of one probe in one window, from the store (runs on a worker thread)."""
    if probe not in view.probe_ids:
        raise UnknownProbeError(probe)
    since, shown = history_since(view, probe, span, history_s, history_max_s)
    rows = view.probe_snapshots(probe, since, MAX_TREND_POINTS)
    classes = view.manifest.classes
    return {
        "probe": probe,
        "window": window,
        "span": shown,
        "since": since,
        "now": view.now(),
        "batch": rows[-1][1] if rows else None,
        "classes": list(classes),
        **trend_series(rows, classes, window),
    }


# -- the recent frames ----------------------------------------------------------------


class BadFrameSelectionError(ValueError):
    """A frame selection the API cannot read (a malformed index or time)."""


FRAME_TIME_RESOLUTION_S = 0.001


def _frame_time(text: str) -> float:
    """A frame time as the API writes it (ISO 8601 UTC), or epoch seconds."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise BadFrameSelectionError("ts must be a finite frame time")
        return seconds
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadFrameSelectionError(
            "ts must be a frame time as the API gives it (ISO 8601, e.g. 2024-05-01T12:00:00.123Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True)
class FrameSelection:
    """Which recent frame a request means: `index` counts back from the newest (0), or
    `key` (with `ts` when a key can repeat). Nothing selected means the newest."""

    index: int | None = None
    key: str | None = None
    ts: float | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> FrameSelection:
        index_text, key, ts_text = query.get("index"), query.get("key"), query.get("ts")
        if index_text is not None and key is not None:
            raise BadFrameSelectionError("select a frame by index or by key, not both")
        if ts_text is not None and key is None:
            raise BadFrameSelectionError("ts selects among frames of one key: give key too")
        index = None
        if index_text is not None:
            try:
                index = int(index_text)
            except ValueError:
                index = -1
            if index < 0:
                raise BadFrameSelectionError(
                    "index must be a whole number from 0 (the newest frame) up"
                )
        ts = None if ts_text is None else _frame_time(ts_text)
        return cls(index=index, key=key, ts=ts)

    def matches(self, frame: LatestFrame) -> bool:
        """The frame's key, and its time to the millisecond the API gave it with (ISO
        times are truncated to whole milliseconds)."""
        if frame.key != self.key:
            return False
        return self.ts is None or 0.0 <= frame.ts - self.ts < FRAME_TIME_RESOLUTION_S

    @property
    def exact(self) -> bool:
        """Names one frame for good (its content never changes): key and time."""
        return self.key is not None and self.ts is not None

    def describe(self) -> str:
        if self.key is not None:
            return f"frame {self.key!r}" + ("" if self.ts is None else f" at {self.ts!r}")
        return f"frame index {self.index or 0}"


def recent_frames(view: MonitorView, probe: str) -> list[LatestFrame]:
    """The probe's recent classified frames, newest first."""
    try:
        return view.recent_frames(probe)
    except KeyError:
        raise UnknownProbeError(probe) from None


def select_frame(
    frames: Sequence[LatestFrame], selection: FrameSelection
) -> tuple[int, LatestFrame] | None:
    """(index, frame) of the selected frame among `frames` (newest first), or None."""
    if selection.key is not None:
        for index, frame in enumerate(frames):
            if selection.matches(frame):
                return index, frame
        return None
    index = selection.index or 0
    return (index, frames[index]) if index < len(frames) else None


def _box_counts(frame: LatestFrame, classes: Sequence[str]) -> tuple[dict[str, int], int, int]:
    """(confident particles per class, low-confidence particles, out-of-distribution ones)."""
    counts = dict.fromkeys(classes, 0)
    uncertain = ood = 0
    for box in frame.boxes:
        if box.out_of_distribution:
            ood += 1
        elif box.uncertain:
            uncertain += 1
        else:
            counts[box.label] = counts.get(box.label, 0) + 1
    return counts, uncertain, ood


def frame_json(
    probe: str, index: int, frame: LatestFrame, classes: Sequence[str], *, boxes: bool
) -> dict[str, Any]:
    """One recent frame: time, key, size, particles per class (uncertain apart) and,
    with `boxes`, every particle's box in image pixels."""
    height, width = frame.image.shape[:2]
    counts, uncertain, ood = _box_counts(frame, classes)
    body: dict[str, Any] = {
        "probe": probe,
        "index": index,
        "ts": frame.ts,
        "key": frame.key,
        "width": int(width),
        "height": int(height),
        "particles": len(frame.boxes),
        "counts": counts,
        "uncertain": uncertain,
        "out_of_distribution": ood,
    }
    if boxes:
        body["boxes"] = [
            {
                "x": box.x,
                "y": box.y,
                "w": box.w,
                "h": box.h,
                "label": box.label,
                "confidence": box.confidence,
                "uncertain": box.uncertain,
                "out_of_distribution": box.out_of_distribution,
            }
            for box in frame.boxes
        ]
    return body


def frames_list(view: MonitorView, probe: str, *, boxes: bool) -> dict[str, Any]:
    """The recent frames of `probe`, newest first, each as frame_json."""
    frames = recent_frames(view, probe)
    classes = view.manifest.classes
    return {
        "probe": probe,
        "capacity": view.recent_capacity(probe),
        "classes": list(classes),
        "frames": [
            frame_json(probe, index, frame, classes, boxes=boxes)
            for index, frame in enumerate(frames)
        ],
    }


def frame_boxes(
    view: MonitorView, probe: str, selection: FrameSelection | None = None
) -> dict[str, Any] | None:
    """The selected recent frame (the newest by default) with its size and particle
    boxes (image pixels), or None when the daemon holds no such frame."""
    found = select_frame(recent_frames(view, probe), selection or FrameSelection())
    if found is None:
        return None
    index, frame = found
    return frame_json(probe, index, frame, view.manifest.classes, boxes=True)


def encode_frame(image: np.ndarray, max_width: int) -> bytes:
    """JPEG of a greyscale frame scaled down (never up) to `max_width` pixels wide."""
    height, width = image.shape[:2]
    if width > max_width:
        size = (max_width, max(1, round(height * max_width / width)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(data.tobytes())
