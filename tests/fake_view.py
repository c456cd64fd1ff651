"""An in-memory MonitorView and CommandHandler for unit tests of the web package: the
figures a test sets are what the view hands out, no daemon, store or thread behind it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.aggregate import FrameRecord, WindowAggregator
from monitor.alarms import Quality
from monitor.config.settings import Settings, load_settings
from monitor.manifest import ModelManifest, default_model_dir, load_manifest
from monitor.pipeline.recorder import RecordedCounts
from monitor.publishers.base import CommandResult
from monitor.review.sample_store import SampleStore
from monitor.runtime.probe_state import LatestFrame
from monitor.runtime.view import Health, Histogram, MonitorView, PipelineLoad, ProbeReading
from monitor.shadow.report import shadow_report
from monitor.shadow.store import ShadowStore


def _empty_counts() -> RecordedCounts:
    return RecordedCounts({}, {}, {}, {}, {}, {}, 0)


@dataclass
class FakeView:
    """One probe, R1, with windows fed by `add_frame`."""

    settings: Settings = field(
        default_factory=lambda: load_settings(
            data={"probes": [{"id": "R1", "source": {"type": "folder", "path": "/srv/probe/R1"}}]}
        )
    )
    manifest: ModelManifest = field(
        default_factory=lambda: load_manifest(default_model_dir()).manifest
    )
    backend_name: str = "onnxruntime[cpu]"
    clock: float = 1_000_000.0
    quality: Quality | None = None
    last_frame_ts: float | None = None
    frames: list[LatestFrame] = field(default_factory=list)
    alarms: list[dict[str, Any]] = field(default_factory=list)
    counts: RecordedCounts = field(default_factory=_empty_counts)
    problem: str | None = None
    source_health: list[Health] = field(default_factory=lambda: [Health("R1", True, "watching")])
    publisher_health: list[Health] = field(default_factory=list)
    load: PipelineLoad = field(
        default_factory=lambda: PipelineLoad(
            frames_queued=3,
            frame_queue_capacity=64,
            frames_dropped=1,
            frames_in_flight=2,
            crops_queued=40,
            crop_queue_capacity=1024,
            inference_crops=1200,
            inference_failures=0,
            batch_sizes=Histogram((1.0, 8.0, 32.0), (2, 5, 30, 0), 1100.0),
            batch_seconds=Histogram((0.01, 0.1), (10, 27, 0), 1.5),
            worker_processes=2,
            worker_restarts=1,
            worker_oversize_frames=4,
        )
    )

    shadow: ShadowStore | None = None
    """The shadow record `shadow_report` reads (a real store); None: no shadow."""
    shadow_samples: SampleStore | None = None
    """The review queue whose labelled crops both models are scored on."""
    shadow_running: dict[str, Any] | None = None
    """What the report says runs now ("running"); None: no shadow runs now."""
    shadow_window_s: float = 300.0
    """model.shadow.window: the windows of a report asked for without one."""
    shadow_asked: list[dict[str, Any]] = field(default_factory=list)
    """The arguments of every shadow_report call, oldest first."""
    window_sizes: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    """The size statistics `probe` gives each window (window seconds -> the window's
    "sizes" document; None: no "sizes" key, as from a daemon without sizes); a window
    not named keeps what the aggregator gives."""
    stored_snapshots: list[tuple[float, str | None, dict[str, Any]]] = field(default_factory=list)
    """The store's rows (ts, batch, ProbeSnapshot.to_json()) `probe_snapshots` reads."""

    def __post_init__(self) -> None:
        self.aggregator = WindowAggregator(
            self.manifest.classes, windows_s=self.settings.aggregation.windows
        )

    def add_frame(self, ts: float, counts: tuple[int, ...]) -> None:
        self.aggregator.add(FrameRecord(ts=ts, class_counts=counts, n_uncertain=0))
        self.last_frame_ts = max(self.last_frame_ts or ts, ts)

    @property
    def probe_ids(self) -> tuple[str, ...]:
        return tuple(probe.id for probe in self.settings.probes)

    def now(self) -> float:
        return self.clock

    def probe(self, probe: str) -> ProbeReading:
        if probe not in self.probe_ids:
            raise KeyError(probe)
        snapshot = self.aggregator.snapshot(self.clock).to_json()
        for seconds, sizes in self.window_sizes.items():
            stats = snapshot["windows"][str(seconds)]
            if sizes is None:
                stats.pop("sizes", None)
            else:
                stats["sizes"] = sizes
        latest = self.frames[0] if self.frames else None
        return ProbeReading(probe, snapshot, self.last_frame_ts, self.quality, latest)

    def recent_frames(self, probe: str) -> list[LatestFrame]:
        if probe not in self.probe_ids:
            raise KeyError(probe)
        return list(self.frames)

    def recent_capacity(self, probe: str) -> int:
        return 8

    def alarm_states(self, probe: str) -> list[dict[str, Any]]:
        return list(self.alarms)

    def recorded_counts(self) -> RecordedCounts:
        return self.counts

    def store_problem(self) -> str | None:
        return self.problem

    def sources(self) -> list[Health]:
        return list(self.source_health)

    def publishers(self) -> list[Health]:
        return list(self.publisher_health)

    def pipeline_load(self) -> PipelineLoad:
        return self.load

    def current_batch(self, probe: str) -> tuple[str, float] | None:
        return None

    def probe_snapshots(
        self, probe: str, since: float, max_rows: int
    ) -> list[tuple[float, str | None, dict[str, Any]]]:
        rows = [row for row in self.stored_snapshots if row[0] >= since]
        return rows[-max_rows:]

    def recent_alarm_journal(self, limit: int, probe: str | None) -> list[dict[str, Any]]:
        return []

    def shadow_report(
        self,
        *,
        since: float | None,
        until: float | None,
        window_s: float | None,
        candidate: str | None,
    ) -> dict[str, Any] | None:
        """LiveView.shadow_report over `shadow`: the real report plus "running"."""
        asked = {"since": since, "until": until, "window_s": window_s, "candidate": candidate}
        self.shadow_asked.append(asked)
        if self.shadow is None:
            return None
        report = shadow_report(
            self.shadow,
            self.shadow_samples,
            window_s=self.shadow_window_s if window_s is None else window_s,
            since=since,
            until=until,
            candidate=candidate,
        )
        return {**report, "running": self.shadow_running}


def a_sizes_document(
    classes: dict[str, dict[str, Any]],
    *,
    unit: str = "um",
    bin_edges: tuple[float, ...] = (5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0),
) -> dict[str, Any]:
    """A window's "sizes" as the aggregator writes it: ECD on fixed log-spaced bins; each
    class's figures default to none measured (count 0, quantiles None, empty bins)."""
    empty = {
        "count": 0,
        **dict.fromkeys(("d10", "d50", "d90", "d10_sq", "d50_sq", "d90_sq"), None),
        "mean_aspect_ratio": None,
        "histogram": [0] * (len(bin_edges) - 1),
    }
    return {
        "unit": unit,
        "measure": "ecd",
        "bin_edges": list(bin_edges),
        "classes": {name: {**empty, **figures} for name, figures in classes.items()},
    }


def a_frame(ts: float, key: str) -> LatestFrame:
    return LatestFrame(ts, key, np.full((48, 64), 128, np.uint8), ())


class RefusingCommands:
    """A CommandHandler that refuses every action, saying so."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def acknowledge(self, probe: str, alarm_id: str, who: str, comment: str) -> CommandResult:
        self.calls.append(("acknowledge", probe, alarm_id, who))
        return CommandResult(False, "refused by the fake")

    def shelve(
        self, probe: str, alarm_id: str, minutes: float, who: str, comment: str
    ) -> CommandResult:
        self.calls.append(("shelve", probe, alarm_id, who))
        return CommandResult(False, "refused by the fake")

    def start_batch(
        self, probe: str, batch_id: str, who: str = "local", *, end_running: bool = False
    ) -> CommandResult:
        return CommandResult(False, "refused by the fake")

    def stop_batch(self, probe: str, who: str = "local") -> CommandResult:
        return CommandResult(False, "refused by the fake")


def as_view(fake: FakeView) -> MonitorView:
    """The fake, checked by mypy-style structural typing at the call site."""
    return fake
