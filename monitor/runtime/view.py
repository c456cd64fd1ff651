"""The read model: what the web server and replay may see of the running daemon.

`MonitorView` is the narrow protocol they are written against (their tests fake it);
`LiveView` is the daemon's implementation, reading the stages' own state under their
locks and copying what it hands out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from monitor.alarms import Quality
from monitor.config.settings import Settings
from monitor.config.shadow import ShadowConfig
from monitor.manifest import ModelManifest
from monitor.pipeline.batcher import BucketCounts, MicroBatcher
from monitor.pipeline.frame_queue import FrameQueue
from monitor.pipeline.recorder import RecordedCounts, Recorder
from monitor.pipeline.workers import Pipeline
from monitor.publishers.base import Publisher
from monitor.review.sample_store import SampleStore
from monitor.runtime.alarm_keeper import AlarmKeeper
from monitor.runtime.probe_state import LatestFrame, ProbeState
from monitor.shadow.report import shadow_report
from monitor.shadow.runner import ShadowRunner
from monitor.shadow.store import ShadowStore
from monitor.sources.base import Source
from monitor.store import Store

DEFAULT_SHADOW_WINDOW_S = float(ShadowConfig.model_fields["window"].default)

SnapshotRow = tuple[float, str | None, dict[str, Any]]
"""(time, batch, ProbeSnapshot.to_json()) of one stored window snapshot."""


@dataclass(frozen=True)
class Histogram:
    """Counts per bucket (not cumulative; the last is above every bound) and their sum."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float


@dataclass(frozen=True)
class PipelineLoad:
    """Queues and inference, for /metrics and replay's barrier."""

    frames_queued: int
    frame_queue_capacity: int
    frames_dropped: int
    frames_in_flight: int
    crops_queued: int
    crop_queue_capacity: int
    inference_crops: int
    inference_failures: int
    batch_sizes: Histogram
    batch_seconds: Histogram
    worker_processes: int = 0
    """Worker processes running (0 with batcher.processes = false)."""
    worker_restarts: int = 0
    worker_oversize_frames: int = 0

    @property
    def idle(self) -> bool:
        """No frame waiting for a worker or being worked on."""
        return self.frames_queued == 0 and self.frames_in_flight == 0


@dataclass(frozen=True)
class Health:
    """(ok, why) of one source or publisher, with the publisher's own figures."""

    name: str
    ok: bool
    detail: str
    diagnostics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProbeReading:
    """One probe's figures, read together."""

    probe: str
    snapshot: dict[str, Any]  # ProbeSnapshot.to_json() at `now`
    last_frame_ts: float | None
    quality: Quality | None  # as the last publish tick rated it; None before the first
    latest_frame: LatestFrame | None


class MonitorView(Protocol):
    """What a reader of the running daemon sees. Every method returns copies."""

    @property
    def settings(self) -> Settings:
        """The configuration running now (a reload may replace it)."""
        ...

    @property
    def manifest(self) -> ModelManifest: ...

    @property
    def backend_name(self) -> str: ...

    @property
    def probe_ids(self) -> tuple[str, ...]: ...

    def now(self) -> float:
        """The daemon's clock (recorded time in a replay)."""
        ...

    def probe(self, probe: str) -> ProbeReading:
        """Raises KeyError for a probe the daemon does not read."""
        ...

    def recent_frames(self, probe: str) -> list[LatestFrame]:
        """The probe's recent classified frames, newest first (KeyError: unknown probe)."""
        ...

    def recent_capacity(self, probe: str) -> int: ...

    def alarm_states(self, probe: str) -> list[dict[str, Any]]:
        """Every alarm of `probe` as AlarmStatus.to_json()."""
        ...

    def recorded_counts(self) -> RecordedCounts: ...

    def store_problem(self) -> str | None:
        """Why the store cannot be written now (retrying); None when it can."""
        ...

    def sources(self) -> list[Health]:
        """One per configured probe, in order; a source not started yet is not ok."""
        ...

    def publishers(self) -> list[Health]: ...

    def pipeline_load(self) -> PipelineLoad: ...

    def current_batch(self, probe: str) -> tuple[str, float] | None: ...

    def probe_snapshots(self, probe: str, since: float, max_rows: int) -> list[SnapshotRow]: ...

    def recent_alarm_journal(self, limit: int, probe: str | None) -> list[dict[str, Any]]: ...


class LiveView:
    """The running daemon's MonitorView."""

    def __init__(
        self,
        *,
        settings: Callable[[], Settings],
        manifest: ModelManifest,
        backend_name: str,
        probes: Mapping[str, ProbeState],
        alarms: AlarmKeeper,
        store: Store,
        recorder: Recorder,
        frames: FrameQueue,
        pipeline: Pipeline,
        batcher: MicroBatcher,
        sources: Sequence[Source],
        publishers: Sequence[Publisher],
        clock: Callable[[], float],
        samples: SampleStore | None = None,
        shadow: Callable[[], ShadowRunner | None] = lambda: None,
        shadow_record: Callable[[], ShadowStore | None] = lambda: None,
    ) -> None:
        self._settings = settings
        self._manifest = manifest
        self._backend_name = backend_name
        self._probes = probes
        self._alarms = alarms
        self._store = store
        self._recorder = recorder
        self._frames = frames
        self._pipeline = pipeline
        self._batcher = batcher
        self._sources = sources  # filled as the sources start
        self._publishers = tuple(publishers)
        self._clock = clock
        self._samples = samples
        self._shadow = shadow
        self._shadow_record = shadow_record

    @property
    def settings(self) -> Settings:
        return self._settings()

    @property
    def samples(self) -> SampleStore | None:
        """The review queue's store for the labelling page; None with review off."""
        return self._samples

    def shadow_report(
        self,
        *,
        since: float | None,
        until: float | None,
        window_s: float | None,
        candidate: str | None,
    ) -> dict[str, Any] | None:
        """The shadow comparison for a time range (monitor.shadow.report) with what runs
        now under "running"; None when no shadow ever ran here. `window_s` None: the
        configured model.shadow.window (or its default without a shadow now)."""
        runner = self._shadow()
        record = runner.store if runner is not None else self._shadow_record()
        if record is None:
            return None
        configured = self.settings.model.shadow
        if window_s is None:
            window_s = (
                float(configured.window) if configured is not None else DEFAULT_SHADOW_WINDOW_S
            )
        report = shadow_report(
            record,
            self._samples,
            window_s=window_s,
            since=since,
            until=until,
            candidate=candidate,
        )
        report["running"] = runner.status() if runner is not None else None
        return report

    @property
    def manifest(self) -> ModelManifest:
        """The running model's manifest (a reload may swap the model)."""
        return self._pipeline.active.manifest

    @property
    def backend_name(self) -> str:
        return self._pipeline.active.backend.name

    @property
    def probe_ids(self) -> tuple[str, ...]:
        return tuple(self._probes)

    def now(self) -> float:
        return self._clock()

    def probe(self, probe: str) -> ProbeReading:
        state = self._probes[probe]
        now = self._clock()
        with state.lock:
            return ProbeReading(
                probe,
                state.aggregator.snapshot(now).to_json(),
                state.last_frame_ts,
                state.quality,
                state.recent_frames[-1] if state.recent_frames else None,
            )

    def recent_frames(self, probe: str) -> list[LatestFrame]:
        return self._probes[probe].newest_first()

    def recent_capacity(self, probe: str) -> int:
        return int(self._probes[probe].recent_frames.maxlen or 0)

    def alarm_states(self, probe: str) -> list[dict[str, Any]]:
        return self._alarms.states(probe)

    def recorded_counts(self) -> RecordedCounts:
        return self._recorder.counts()

    def store_problem(self) -> str | None:
        return self._recorder.problem

    def sources(self) -> list[Health]:
        started = {source.probe_id: source for source in list(self._sources)}
        health = []
        for probe in self._probes:
            source = started.get(probe)
            if source is None:
                health.append(Health(probe, False, "source not started yet"))
            else:
                alive, detail = source.health()
                health.append(Health(probe, alive, detail))
        return health

    def publishers(self) -> list[Health]:
        health = []
        for publisher in self._publishers:
            connected, detail = publisher.health()
            diagnostics = getattr(publisher, "diagnostics", None)
            figures = dict(diagnostics()) if diagnostics is not None else {}
            health.append(Health(publisher.name, connected, detail, figures))
        return health

    def pipeline_load(self) -> PipelineLoad:
        config = self._settings().batcher
        stats = self._batcher.stats
        pool = self._pipeline.pool
        return PipelineLoad(
            frames_queued=self._frames.qsize(),
            frame_queue_capacity=config.frame_queue_size,
            frames_dropped=self._frames.dropped,
            frames_in_flight=self._pipeline.in_flight,
            crops_queued=self._batcher.queued_crops,
            crop_queue_capacity=max(config.queue_size, config.max_batch),
            inference_crops=stats.crops,
            inference_failures=stats.failures,
            batch_sizes=_histogram(self._batcher.batch_size_histogram),
            batch_seconds=_histogram(self._batcher.latency_histogram),
            worker_processes=0 if pool is None else pool.size,
            worker_restarts=0 if pool is None else pool.stats.restarts,
            worker_oversize_frames=0 if pool is None else pool.stats.oversize,
        )

    def current_batch(self, probe: str) -> tuple[str, float] | None:
        return self._store.current_batch(probe)

    def probe_snapshots(self, probe: str, since: float, max_rows: int) -> list[SnapshotRow]:
        return self._store.probe_snapshots(probe, since, max_rows=max_rows)

    def recent_alarm_journal(self, limit: int, probe: str | None) -> list[dict[str, Any]]:
        return self._store.recent_alarm_journal(limit, probe)


def _histogram(buckets: BucketCounts) -> Histogram:
    counts, total = buckets.read()
    return Histogram(buckets.bounds, tuple(counts), total)
