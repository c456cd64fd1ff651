"""Per-probe sliding-window statistics over the stream of classified frames.

One `WindowAggregator` per probe takes one `FrameRecord` per frame and, whenever asked,
produces a `ProbeSnapshot`: for each window (60 s, 5 min, 15 min by default) the
particle and frame counts, the class fractions with design-effect Wilson intervals and
the confusion-adjusted shares, the size distribution of each class (`sizes`, see
`monitor.aggregate.sizes`), plus a per-class EWMA and rate of change. Pure logic: the
caller passes every timestamp in; nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.aggregate.sizes import SIZE_BIN_EDGES, SizeStats, SizeUnit, class_sizes
from monitor.aggregate.statistics import (
    ConfusionCorrection,
    EwmaFractions,
    design_effect,
    slope_per_minute,
    wilson_interval_from_fraction,
)

DEFAULT_WINDOWS_S: tuple[float, ...] = (60.0, 300.0, 900.0)


@dataclass(frozen=True)
class FrameRecord:
    """What the pipeline learned from one frame of one probe.

    `class_counts` are particles classified confidently, per class in manifest order;
    `n_uncertain` particles fell below the model's uncertainty threshold and `n_ood`
    were rejected as out of distribution (not crystals the model knows). A rejected
    frame (out of focus, blank probe window, ...) has `rejected_reason` set and no
    particles; it still counts towards the frame rate and the rejected share.

    `sizes` holds (class index, equivalent circle diameter, aspect ratio) of each
    confidently classified particle whose size was measured, in the aggregator's size
    unit; a particle without a size (a tile, a sampler without masks) counts in the
    fractions but not in the size distributions.
    """

    ts: float
    class_counts: tuple[int, ...]
    n_uncertain: int = 0
    rejected_reason: str | None = None
    n_ood: int = 0
    sizes: tuple[tuple[int, float, float], ...] = ()

    def __post_init__(self) -> None:
        if not math.isfinite(self.ts):
            raise ValueError(f"frame timestamp must be finite seconds, got {self.ts}")
        if self.n_uncertain < 0 or self.n_ood < 0 or any(c < 0 for c in self.class_counts):
            raise ValueError(
                f"particle counts must be non-negative, got {self.class_counts}, "
                f"n_uncertain={self.n_uncertain} and n_ood={self.n_ood}"
            )
        particles = self.n_uncertain or self.n_ood or any(self.class_counts)
        if any(not 0 <= index < len(self.class_counts) for index, _, _ in self.sizes):
            raise ValueError(
                f"size class indices must be below {len(self.class_counts)}, got "
                f"{sorted({index for index, _, _ in self.sizes})}"
            )
        if self.rejected_reason is not None and (particles or self.sizes):
            raise ValueError(
                f"rejected frame ({self.rejected_reason}) must carry no particles: "
                "set its counts to zero or leave rejected_reason None"
            )

    @property
    def accepted(self) -> bool:
        """True when the frame passed the quality gate."""
        return self.rejected_reason is None


@dataclass(frozen=True)
class ClassStats:
    """One class in one window."""

    n: int
    """Confident particles of this class."""
    fraction: float | None
    """n / all confident particles in the window; None when there are none."""
    ci95: tuple[float, float] | None
    """Wilson 95 % interval on `fraction` with the design-effect effective n."""
    adjusted: float | None
    """Confusion-adjusted share (adjusted classify-and-count); None without a matrix."""
    effective_n: float
    """Particle count divided by the design effect: what the interval is worth."""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        return {
            "n": self.n,
            "fraction": self.fraction,
            "ci95": None if self.ci95 is None else [self.ci95[0], self.ci95[1]],
            "adjusted": self.adjusted,
            "effective_n": self.effective_n,
        }


@dataclass(frozen=True)
class WindowStats:
    """Everything counted in one window, ending at the snapshot time."""

    window_s: int
    n: int
    """Confident particles, all classes."""
    n_uncertain: int
    frames: int
    """Accepted frames."""
    rejected_frames: int
    rejected_by_reason: dict[str, int]
    rejected_share: float
    """Rejected / (accepted + rejected) frames; 0 without frames."""
    uncertain_share: float
    """Uncertain / (confident + uncertain) particles; 0 without particles."""
    n_ood: int
    """Particles rejected as out of distribution: never in a class fraction."""
    ood_share: float
    """Out-of-distribution / all particles (confident + uncertain + out of distribution)."""
    particles_per_min: float
    """Confident particles per minute."""
    frames_per_min: float
    """Accepted plus rejected frames per minute."""
    classes: dict[str, ClassStats]
    sizes: SizeStats
    """Each class's size distribution over its confident particles with a size."""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able values (the window length is the key one level up)."""
        return {
            "n": self.n,
            "n_uncertain": self.n_uncertain,
            "frames": self.frames,
            "rejected_frames": self.rejected_frames,
            "rejected_by_reason": dict(self.rejected_by_reason),
            "rejected_share": self.rejected_share,
            "uncertain_share": self.uncertain_share,
            "n_ood": self.n_ood,
            "ood_share": self.ood_share,
            "particles_per_min": self.particles_per_min,
            "frames_per_min": self.frames_per_min,
            "classes": {name: stats.to_json() for name, stats in self.classes.items()},
            "sizes": self.sizes.to_json(),
        }


@dataclass(frozen=True)
class ClassTrend:
    """How one class's share is moving."""

    ewma: float | None
    """Exponentially weighted fraction; None before any particle in the batch."""
    slope_per_min: float | None
    """Least-squares change of the fraction per minute over the trend window."""
    span_s: float = 0.0
    """Seconds between the first and last frame the slope rests on: a slope over a few
    seconds (a batch that just started) is noise, and rate alarms wait for enough span."""


@dataclass(frozen=True)
class ProbeSnapshot:
    """One probe's statistics at time `ts`, tagged with the running batch."""

    ts: float
    batch: str | None
    windows: dict[int, WindowStats]
    trend: dict[str, ClassTrend]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able values; window keys become strings ("60", "300", ...)."""
        return {
            "ts": self.ts,
            "batch": self.batch,
            "windows": {str(seconds): stats.to_json() for seconds, stats in self.windows.items()},
            "trend": {
                name: {
                    "ewma": trend.ewma,
                    "slope_per_min": trend.slope_per_min,
                    "span_s": trend.span_s,
                }
                for name, trend in self.trend.items()
            },
        }


def _whole_seconds(value: float, what: str) -> int:
    if not (math.isfinite(value) and value > 0 and float(value).is_integer()):
        raise ValueError(f"{what} must be a positive whole number of seconds, got {value}")
    return int(value)


class _FrameColumns:
    """Frame records as numpy columns sorted by timestamp, in a reusable buffer.

    A snapshot over 15 min at 10 frames/s reads 9,000 frames; turning that many record
    objects into arrays on every snapshot costs about 7 ms, so each record is written
    into the columns once, on arrival, and a snapshot works on array views. Time runs
    along the last axis so that each class's counts are contiguous. Live rows are
    [start, stop); pruning advances start, and the rows are moved to the front (or into
    a larger buffer) only when the end of the buffer is reached.
    """

    def __init__(self, n_classes: int, capacity: int = 1024) -> None:
        self._n_classes = n_classes
        self._ts: np.ndarray = np.empty(capacity, dtype=np.float64)
        # Rows: one per class, then uncertain particles, the rejection reason code and
        # out-of-distribution particles.
        self._ints: np.ndarray = np.empty((n_classes + 3, capacity), dtype=np.int64)
        self._start = 0
        self._stop = 0
        self.reason_names: list[str] = []
        """Rejection reasons in code order; the reason row holds -1 for accepted frames."""
        self._reason_codes: dict[str, int] = {}

    def __len__(self) -> int:
        return self._stop - self._start

    def clear(self) -> None:
        self._start = 0
        self._stop = 0
        self.reason_names.clear()
        self._reason_codes.clear()

    @property
    def ts(self) -> np.ndarray:
        """Timestamps, ascending."""
        return self._ts[self._start : self._stop]

    @property
    def counts(self) -> np.ndarray:
        """Confident particles, shape (classes, frames)."""
        return self._ints[: self._n_classes, self._start : self._stop]

    @property
    def uncertain(self) -> np.ndarray:
        return self._ints[self._n_classes, self._start : self._stop]

    @property
    def ood(self) -> np.ndarray:
        return self._ints[self._n_classes + 2, self._start : self._stop]

    @property
    def reason(self) -> np.ndarray:
        """Index into `reason_names`, -1 for an accepted frame."""
        return self._ints[self._n_classes + 1, self._start : self._stop]

    def insert(self, record: FrameRecord) -> None:
        """Place the record in timestamp order (after any record with the same ts)."""
        self._make_room()
        start, stop = self._start, self._stop
        position = stop
        if stop > start and record.ts < self._ts[stop - 1]:
            position = start + int(np.searchsorted(self._ts[start:stop], record.ts, "right"))
            self._ts[position + 1 : stop + 1] = self._ts[position:stop]
            self._ints[:, position + 1 : stop + 1] = self._ints[:, position:stop]
        self._ts[position] = record.ts
        self._ints[: self._n_classes, position] = record.class_counts
        self._ints[self._n_classes, position] = record.n_uncertain
        self._ints[self._n_classes + 1, position] = self._code_of(record.rejected_reason)
        self._ints[self._n_classes + 2, position] = record.n_ood
        self._stop = stop + 1

    def drop_through(self, horizon: float) -> None:
        """Forget every record with ts <= horizon."""
        self._start += int(np.searchsorted(self.ts, horizon, "right"))
        if self._start == self._stop:
            self._start = self._stop = 0

    def _code_of(self, reason: str | None) -> int:
        if reason is None:
            return -1
        code = self._reason_codes.get(reason)
        if code is None:
            code = len(self.reason_names)
            self._reason_codes[reason] = code
            self.reason_names.append(reason)
        return code

    def _make_room(self) -> None:
        capacity = self._ts.shape[0]
        if self._stop < capacity:
            return
        live = self._stop - self._start
        # Grow when more than half full, so moving rows to the front stays amortised O(1).
        if live * 2 > capacity:
            ts = np.empty(capacity * 2, dtype=np.float64)
            ints = np.empty((self._ints.shape[0], capacity * 2), dtype=np.int64)
        else:
            ts, ints = self._ts, self._ints
        ts[:live] = self._ts[self._start : self._stop]
        ints[:, :live] = self._ints[:, self._start : self._stop]
        self._ts, self._ints = ts, ints
        self._start, self._stop = 0, live


class _ParticleColumns:
    """One class's sized particles in the retained frames: rows time, ECD and aspect
    ratio, sorted by time, in a reusable buffer (as `_FrameColumns`: live columns are
    [start, stop), moved to the front or into a larger buffer only at the end). One per
    class, so a window of a class is a slice: no masks or copies before the sort."""

    def __init__(self, capacity: int = 4096) -> None:
        self._data: np.ndarray = np.empty((3, capacity), dtype=np.float64)
        self._start = 0
        self._stop = 0

    def __len__(self) -> int:
        return self._stop - self._start

    def clear(self) -> None:
        self._start = 0
        self._stop = 0

    @property
    def ts(self) -> np.ndarray:
        return self._data[0, self._start : self._stop]

    def between(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """(ECD, aspect ratio) of live rows [start, end) (views)."""
        rows = self._data[1:, self._start + start : self._start + end]
        return rows[0], rows[1]

    def insert(self, ts: float, sizes: Sequence[tuple[float, float]]) -> None:
        """Place one frame's (ECD, aspect ratio) pairs in time order (after any with the
        same ts)."""
        count = len(sizes)
        if count == 0:
            return
        self._make_room(count)
        start, stop = self._start, self._stop
        position = stop
        if stop > start and ts < self._data[0, stop - 1]:
            position = start + int(np.searchsorted(self._data[0, start:stop], ts, "right"))
            self._data[:, position + count : stop + count] = self._data[:, position:stop]
        block = self._data[:, position : position + count]
        block[0] = ts
        block[1:] = np.asarray(sizes, dtype=np.float64).T
        self._stop = stop + count

    def drop_through(self, horizon: float) -> None:
        """Forget every particle with ts <= horizon."""
        self._start += int(np.searchsorted(self.ts, horizon, "right"))
        if self._start == self._stop:
            self._start = self._stop = 0

    def _make_room(self, count: int) -> None:
        capacity = self._data.shape[1]
        if self._stop + count <= capacity:
            return
        live = self._stop - self._start
        if (live + count) * 2 > capacity:
            data = np.empty((3, max(capacity * 2, (live + count) * 2)), dtype=np.float64)
        else:
            data = self._data
        data[:, :live] = self._data[:, self._start : self._stop]
        self._data = data
        self._start, self._stop = 0, live


class WindowAggregator:
    """Sliding-window class statistics for ONE probe.

    Records are kept in timestamp order (see `_FrameColumns`); one arriving a few
    seconds late is inserted in place. Anything at or before the newest timestamp minus
    the longest window can no longer enter a window and is dropped, on `add` and on
    `snapshot`, so memory is bounded by the longest window.

    A window of W seconds at time `now` holds the records with now - W < ts <= now.
    Pruning follows the newest record seen, so a snapshot taken at a `now` behind the
    newest record may miss records older than that record minus the longest window.
    After `start_batch` or `stop_batch` at time T, records with ts < T are ignored:
    they belong to the batch that ended.
    """

    def use_confusion_matrix(self, confusion_matrix: Sequence[Sequence[int]] | None) -> None:
        """Correct the shares with this validation matrix from now on (a model swap brings
        its own); None turns the correction off. A matrix of the wrong size is refused
        and the correction in use stays."""
        correction: ConfusionCorrection | None = None
        if confusion_matrix is not None:
            correction = ConfusionCorrection(confusion_matrix)
            size = correction.matrix.shape[0]
            if size != len(self.classes):
                raise ValueError(
                    f"confusion matrix is {size} x {size} but there are "
                    f"{len(self.classes)} classes (use the manifest's validation matrix)"
                )
        self._correction = correction

    def __init__(
        self,
        classes: Sequence[str],
        windows_s: Sequence[float] = DEFAULT_WINDOWS_S,
        confusion_matrix: Sequence[Sequence[int]] | None = None,
        ewma_halflife_s: float = 60.0,
        trend_window_s: float | None = None,
        *,
        size_unit: SizeUnit = "px",
        size_bin_edges: Sequence[float] = SIZE_BIN_EDGES,
    ) -> None:
        """`size_unit`: the unit the records' sizes are in ("um" with the probe's pixel
        size, else "px"), said in every window's `sizes`."""
        self.classes: tuple[str, ...] = tuple(classes)
        if not self.classes:
            raise ValueError("need at least one class name (from the model manifest)")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"class names must be unique, got {list(self.classes)}")
        if not windows_s:
            raise ValueError("need at least one window length, e.g. windows_s=(60, 300, 900)")
        self.windows_s: tuple[int, ...] = tuple(
            sorted({_whole_seconds(w, "window length") for w in windows_s})
        )
        if len(self.windows_s) != len(windows_s):
            raise ValueError(f"window lengths must be distinct, got {list(windows_s)}")
        if trend_window_s is None:
            self.trend_window_s = float(self.windows_s[len(self.windows_s) // 2])
        else:
            if not (math.isfinite(trend_window_s) and trend_window_s > 0):
                raise ValueError(f"trend window must be positive seconds, got {trend_window_s}")
            self.trend_window_s = float(trend_window_s)
        self.use_confusion_matrix(confusion_matrix)
        self._retention_s = max(float(self.windows_s[-1]), self.trend_window_s)
        self._ewma = EwmaFractions(len(self.classes), ewma_halflife_s)
        self._frames = _FrameColumns(len(self.classes))
        self.size_unit: SizeUnit = size_unit
        self.size_bin_edges: tuple[float, ...] = tuple(float(e) for e in size_bin_edges)
        if len(self.size_bin_edges) < 2 or any(
            not low < high
            for low, high in zip(self.size_bin_edges[:-1], self.size_bin_edges[1:], strict=True)
        ):
            raise ValueError(
                f"size bin edges must be at least two increasing numbers, got {size_bin_edges}"
            )
        self._particles = [_ParticleColumns() for _ in self.classes]
        self._batch: str | None = None
        self._reset_ts: float | None = None
        self._first_ts: float | None = None
        self._latest_ts: float | None = None

    # -- feeding -------------------------------------------------------------------

    @property
    def batch(self) -> str | None:
        """The running batch id, or None outside a batch."""
        return self._batch

    def __len__(self) -> int:
        """Records currently retained (bounded by the longest window)."""
        return len(self._frames)

    def start_batch(self, batch_id: str, ts: float) -> None:
        """Start batch `batch_id` at `ts`: every window and the EWMA start empty."""
        self._reset(ts)
        self._batch = batch_id

    def stop_batch(self, ts: float) -> None:
        """End the running batch at `ts`: windows and EWMA start empty, batch is None."""
        self._reset(ts)
        self._batch = None

    def _reset(self, ts: float) -> None:
        self._frames.clear()
        for columns in self._particles:
            columns.clear()
        self._ewma.reset()
        self._reset_ts = ts
        self._first_ts = None
        self._latest_ts = None

    def add(self, record: FrameRecord) -> None:
        """Take one frame's record; late ones are placed in time order, stale ones dropped."""
        if len(record.class_counts) != len(self.classes):
            raise ValueError(
                f"record has {len(record.class_counts)} class counts but the aggregator has "
                f"{len(self.classes)} classes {list(self.classes)}"
            )
        ts = record.ts
        if self._reset_ts is not None and ts < self._reset_ts:
            return
        if self._latest_ts is not None and ts <= self._latest_ts - self._retention_s:
            return
        self._frames.insert(record)
        if record.sizes:
            by_class: list[list[tuple[float, float]]] = [[] for _ in self.classes]
            for index, ecd, aspect_ratio in record.sizes:
                by_class[index].append((ecd, aspect_ratio))
            for columns, sizes in zip(self._particles, by_class, strict=True):
                columns.insert(ts, sizes)
        if self._latest_ts is None or ts > self._latest_ts:
            self._latest_ts = ts
        if self._first_ts is None or ts < self._first_ts:
            self._first_ts = ts
        if record.accepted:
            self._ewma.update(ts, record.class_counts)
        self._frames.drop_through(self._latest_ts - self._retention_s)
        for columns in self._particles:
            columns.drop_through(self._latest_ts - self._retention_s)

    # -- reading -------------------------------------------------------------------

    def snapshot(self, now: float) -> ProbeSnapshot:
        """Statistics of every window ending at `now`, and the per-class trend."""
        frames = self._frames
        frames.drop_through(now - self._retention_s)
        for columns in self._particles:
            columns.drop_through(now - self._retention_s)
        ts = frames.ts
        end = int(np.searchsorted(ts, now, side="right"))
        origin = self._reset_ts if self._reset_ts is not None else self._first_ts
        # Particles per frame, summed once for all windows (the windows share their end).
        frame_totals = frames.counts[:, :end].sum(axis=0)

        windows: dict[int, WindowStats] = {}
        for window_s in self.windows_s:
            start = int(np.searchsorted(ts, now - window_s, side="right"))
            span_s = float(window_s) if origin is None else min(float(window_s), now - origin)
            windows[window_s] = self._window_stats(
                window_s,
                start,
                end,
                span_s,
                per_frame_totals=frame_totals[start:end],
                sizes=self._window_sizes(now - window_s, now),
            )

        trend_start = int(np.searchsorted(ts, now - self.trend_window_s, side="right"))
        trend_counts = frames.counts[:, trend_start:end]
        trend_totals = frame_totals[trend_start:end]
        occupied = trend_totals > 0
        trend_times = ts[trend_start:end][occupied]
        weights = trend_totals[occupied].astype(np.float64)
        trend_fractions = trend_counts[:, occupied] / weights
        ewma = self._ewma.fractions()
        span_s = float(trend_times[-1] - trend_times[0]) if trend_times.size else 0.0
        trend = {
            name: ClassTrend(
                ewma=ewma[j],
                slope_per_min=slope_per_minute(trend_times, trend_fractions[j], weights),
                span_s=span_s,
            )
            for j, name in enumerate(self.classes)
        }
        return ProbeSnapshot(ts=now, batch=self._batch, windows=windows, trend=trend)

    def _window_sizes(self, after: float, until: float) -> SizeStats:
        """Each class's size distribution over its particles with after < ts <= until."""
        classes = {}
        for name, columns in zip(self.classes, self._particles, strict=True):
            ts = columns.ts
            start = int(np.searchsorted(ts, after, side="right"))
            end = int(np.searchsorted(ts, until, side="right"))
            ecd, aspect_ratio = columns.between(start, end)
            classes[name] = class_sizes(ecd, aspect_ratio, self.size_bin_edges)
        return SizeStats(unit=self.size_unit, bin_edges=self.size_bin_edges, classes=classes)

    def _window_stats(  # noqa: PLR0917 (private, called once, each argument named there)
        self,
        window_s: int,
        start: int,
        end: int,
        span_s: float,
        per_frame_totals: np.ndarray,
        sizes: SizeStats,
    ) -> WindowStats:
        frames = self._frames
        class_counts = frames.counts[:, start:end]
        n_uncertain = int(frames.uncertain[start:end].sum())
        n_ood = int(frames.ood[start:end].sum())
        reason = frames.reason[start:end]
        reason_counts = np.bincount(reason[reason >= 0], minlength=len(frames.reason_names))
        rejected_by_reason = {
            name: int(count)
            for name, count in zip(frames.reason_names, reason_counts, strict=True)
            if count
        }
        frames_total = end - start
        rejected = sum(rejected_by_reason.values())
        per_class = class_counts.sum(axis=1)
        n = int(per_frame_totals.sum())
        adjusted: np.ndarray | None = None
        if self._correction is not None and n > 0:
            adjusted = self._correction.adjust(per_class)
        classes: dict[str, ClassStats] = {}
        for j, name in enumerate(self.classes):
            n_class = int(per_class[j])
            if n == 0:
                classes[name] = ClassStats(
                    n=0, fraction=None, ci95=None, adjusted=None, effective_n=0.0
                )
                continue
            fraction = n_class / n
            effective_n = n / design_effect(class_counts[j], per_frame_totals)
            classes[name] = ClassStats(
                n=n_class,
                fraction=fraction,
                ci95=wilson_interval_from_fraction(fraction, effective_n),
                adjusted=None if adjusted is None else float(adjusted[j]),
                effective_n=effective_n,
            )
        minutes = span_s / 60.0
        return WindowStats(
            window_s=window_s,
            n=n,
            n_uncertain=n_uncertain,
            frames=frames_total - rejected,
            rejected_frames=rejected,
            rejected_by_reason=rejected_by_reason,
            rejected_share=rejected / frames_total if frames_total else 0.0,
            uncertain_share=n_uncertain / (n + n_uncertain) if n + n_uncertain else 0.0,
            n_ood=n_ood,
            ood_share=n_ood / (n + n_uncertain + n_ood) if n + n_uncertain + n_ood else 0.0,
            particles_per_min=n / minutes if minutes > 0 else 0.0,
            frames_per_min=frames_total / minutes if minutes > 0 else 0.0,
            classes=classes,
            sizes=sizes,
        )
