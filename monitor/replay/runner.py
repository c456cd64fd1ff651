"""`crystal-monitor replay FOLDER`: run a recorded batch through the live pipeline.

A process engineer tuning alarm limits wants to know how the limits would have behaved
on a batch that already ran. Replay answers with the daemon itself, not a model of it:
a `Daemon` built from the same configuration, with its own throw-away store, an
injected clock that follows the recording's timestamps, and an in-memory publisher that
collects the window snapshots and alarm events exactly as MQTT would receive them.

Frames are fed in timestamp order straight into the daemon's frame queue, read and
decoded the way the folder source reads and decodes them. The daemon's publish loop is
off; replay steps it instead. At every publish interval of recorded time it waits until
every frame fed so far (all frames stamped at or before the tick) has been recorded,
sets the clock to the tick and calls `publish_once`. The windows, the CUSUM, the
on/off-delays and the stale-probe check therefore see what a live daemon publishing at
that tick would have seen, and the result does not depend on how fast the replay runs.
(Frames of one interval are recorded in the order the workers finish them, as in the
live daemon; that can move the EWMA in its last digit, and the CUSUM by one frame's
step while it sits at its floor of 0, never the windows.) `--speed N` only paces the
feed (N x recorded time), e.g. to leave CPU to a live daemon on
the same host; the default runs as fast as the host allows.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from monitor.config.settings import (
    FolderSourceConfig,
    ProbeConfig,
    Settings,
)
from monitor.publishers.base import CommandHandler, ProbeUpdate
from monitor.replay.result import EX_NOINPUT, RecordedFrame, ReplayError, ReplayResult
from monitor.store import storable_text

if TYPE_CHECKING:
    import numpy as np

    from monitor.runtime.view import MonitorView
    from monitor.sources.base import FrameItem, FrameSink

# The sources (any monitor.sources module loads the folder source), the decoder and the
# daemon load OpenCV and ONNX Runtime, and the runtime loads the sources: imported where
# a replay runs, so registering the command (`crystal-monitor --help`) loads neither.

log = structlog.get_logger(__name__)

_READ_AHEAD = 8  # frames decoded ahead of the pipeline (each 1360 x 1024 frame ~1.4 MB)
_IDLE_SETTLE_S = 2.0  # pipeline idle this long with frames unrecorded: they failed inference


def find_recorded_frames(
    folder: Path, patterns: Sequence[str], *, recursive: bool
) -> list[RecordedFrame]:
    """The frame files of a recorded batch in time order (name stamp, else mtime).

    The files are the ones the folder source would take from that folder (its own scan
    and name patterns: hidden `.name.part` files skipped), keyed as it keys them.
    Raises ReplayError when the folder is missing or holds no frame.
    """
    from monitor.sources.folder import frame_time_from_name, list_frame_files  # noqa: PLC0415

    if not folder.exists():
        raise ReplayError(f"recorded batch folder not found: {folder}", EX_NOINPUT)
    if not folder.is_dir():
        raise ReplayError(f"not a folder: {folder} (give the folder of frame files)", EX_NOINPUT)

    def unlistable(path: str, exc: OSError) -> None:
        raise ReplayError(f"cannot list {path}: {exc.strerror or exc}", EX_NOINPUT) from exc

    frames: list[RecordedFrame] = []
    for path in list_frame_files(str(folder), patterns, recursive=recursive, on_error=unlistable):
        name = os.path.basename(path)
        stamp = frame_time_from_name(name)
        try:
            ts = stamp if stamp is not None else os.stat(path).st_mtime
        except OSError as exc:  # a dangling link: no time, and nothing to read either
            log.warning("replay_file_skipped", path=path, error=str(exc))
            continue
        key = storable_text(Path(os.path.relpath(path, folder)).as_posix())
        frames.append(RecordedFrame(path, key, ts, stamp is not None))
    if not frames:
        shown = ", ".join(patterns)
        where = "or its sub-folders " if recursive else ""
        hint = "" if recursive else "; add --recursive if the frames are in sub-folders"
        raise ReplayError(f"no frame files in {folder} {where}matching {shown}{hint}", EX_NOINPUT)
    frames.sort(key=lambda frame: (frame.ts, frame.key))
    return frames


class SimulatedClock:
    """The daemon's clock during a replay: recorded time, moved on by the replay only."""

    def __init__(self, now: float) -> None:
        self._now = now

    def __call__(self) -> float:
        return self._now

    def set(self, now: float) -> None:
        self._now = now


class CollectingPublisher:
    """Receives what MQTT would: per-frame results, window updates and alarm events.

    Also the replay's barrier: `wait_results` blocks until a number of frames has been
    recorded (the daemon calls `publish_result` for every recorded frame).
    """

    name = "replay"

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.updates: list[ProbeUpdate] = []
        self.events: list[dict[str, Any]] = []
        self._recorded = threading.Condition()

    def start(self, commands: CommandHandler) -> None:
        """Nothing to connect: replay takes no operator commands."""

    def publish_update(self, update: ProbeUpdate) -> None:
        self.updates.append(update)

    def publish_alarms(self, probe: str, alarms: list[dict[str, Any]]) -> None:
        """Replay takes no operator actions, so this is never called."""

    def publish_event(self, probe: str, event: dict[str, Any]) -> None:
        self.events.append({"probe": probe, **event})

    def publish_result(self, probe: str, result: dict[str, Any]) -> None:
        with self._recorded:
            self.results.append(result)
            self._recorded.notify_all()

    def wait_results(self, count: int, timeout: float) -> bool:
        """True once `count` frames have been recorded; False after `timeout` seconds."""
        with self._recorded:
            return self._recorded.wait_for(lambda: len(self.results) >= count, timeout)

    def health(self) -> tuple[bool, str]:
        return True, "collecting"

    def stop(self) -> None:
        """Nothing to flush: everything is already in memory."""


def replay_settings(settings: Settings, probe_id: str, state_dir: Path) -> Settings:
    """The live configuration narrowed to one probe, for a replay.

    Same model, backend, quality gate, sampling, windows and alarms; a private store
    under `state_dir`, committing each frame at once (replay waits for every frame at
    each tick anyway); no MQTT, OPC UA or HTTP; and `batcher.max_wait` 0: holding a batch open
    for more crops only adds that wait to every tick (it changes timing, never a
    result). The probe's own source is not started: replay feeds the frames itself.
    """
    probe = next(p for p in settings.probes if p.id == probe_id)
    return settings.model_copy(
        update={
            "daemon": settings.daemon.model_copy(update={"state_dir": state_dir}),
            "store": settings.store.model_copy(update={"commit_delay": 0.0}),
            "batcher": settings.batcher.model_copy(update={"max_wait": 0.0}),
            "mqtt": settings.mqtt.model_copy(update={"enabled": False}),
            "opcua": settings.opcua.model_copy(update={"enabled": False}),
            # Nor a dashboard: the live daemon's port may be in use on this host.
            "http": settings.http.model_copy(update={"enabled": False}),
            "probes": (probe,),
        }
    )


def frame_patterns(probe: ProbeConfig) -> tuple[tuple[str, ...], bool]:
    """File patterns and recursion of the probe's folder source, or the folder defaults."""
    if isinstance(probe.source, FolderSourceConfig):
        return probe.source.patterns, probe.source.recursive
    defaults = FolderSourceConfig.model_fields
    patterns: tuple[str, ...] = defaults["patterns"].default
    return patterns, False


class _Pacer:
    """Holds the feed to `speed` x recorded time (None: no holding)."""

    def __init__(self, origin_ts: float, speed: float | None) -> None:
        self._origin_ts = origin_ts
        self._speed = speed
        self._started = time.monotonic()

    def wait_until(self, ts: float) -> None:
        if self._speed is None:
            return
        due = self._started + (ts - self._origin_ts) / self._speed
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def replay_frames(
    settings: Settings,
    probe_id: str,
    frames: Sequence[RecordedFrame],
    *,
    folder: Path,
    speed: float | None = None,
    progress: Callable[[float, int], None] | None = None,
) -> ReplayResult:
    """Run `frames` through a daemon built from `settings` and collect what it published.

    `settings` must already be narrowed by `replay_settings` (private store, no
    publishers). `progress(ts, frames_recorded)` is called after each tick.
    """
    from monitor.daemon import Daemon  # noqa: PLC0415
    from monitor.imaging.decode import DecodeLimits  # noqa: PLC0415
    from monitor.runtime.publish_cycle import ManualSchedule  # noqa: PLC0415
    from monitor.runtime.systemd_notify import SystemdNotifier  # noqa: PLC0415
    from monitor.sources.base import FrameItem  # noqa: PLC0415
    from monitor.sources.folder import read_frame_file  # noqa: PLC0415

    if not frames:
        raise ReplayError(f"no frames to replay in {folder}", EX_NOINPUT)
    probe = next(p for p in settings.probes if p.id == probe_id)
    interval = settings.aggregation.publish_interval
    origin = frames[0].ts
    end = frames[-1].ts
    clock = SimulatedClock(origin)
    collector = CollectingPublisher()
    feed = ReplayFeed(probe_id)
    schedule = ManualSchedule()
    daemon = Daemon(
        settings,
        clock=clock,
        publishers=[collector],
        sources=[feed],
        publish_schedule=schedule,
        notifier=SystemdNotifier(None),
    )
    started = time.monotonic()
    daemon.start()
    # The folder source's own reader: open once, refuse non-files, decode with the
    # probe's pixel and decoded-size limits. The replay folder is named by the user, so
    # links out of it are followed.
    limits = DecodeLimits(max_pixels=probe.max_pixels, max_decoded_bytes=probe.max_decoded_bytes)
    read_file = functools.partial(read_frame_file, limits=limits)
    pacer = _Pacer(origin, speed)
    # Files are read and decoded a few frames ahead on a thread of their own, so the
    # workers are busy again at once after each step's wait instead of starting on I/O.
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-read")
    decoded: dict[int, Future[np.ndarray]] = {}

    def read_ahead(upto: int) -> None:
        for ahead in range(index, min(upto, len(frames))):
            if ahead not in decoded:
                decoded[ahead] = prefetch.submit(read_file, frames[ahead].path)

    fed = 0
    lost = 0
    published = 0
    try:
        index = 0
        tick = origin + interval
        while True:
            while index < len(frames) and frames[index].ts <= tick:
                frame = frames[index]
                read_ahead(index + _READ_AHEAD)
                pacer.wait_until(frame.ts)
                feed.put(FrameItem(probe_id, frame.key, frame.ts, read=decoded.pop(index).result))
                index += 1
                fed += 1
            read_ahead(index + _READ_AHEAD)
            pacer.wait_until(tick)
            lost += _wait_recorded(daemon.view, collector, fed - lost)
            clock.set(tick)
            schedule.tick()
            published = len(collector.updates)
            if progress is not None:
                progress(tick, len(collector.results))
            if tick >= end:
                break
            tick = origin + (round((tick - origin) / interval) + 1) * interval
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
        daemon.stop()
    # stop() publishes once more at the last tick; that repeat adds nothing to the trend.
    del collector.updates[published:]
    wall_s = time.monotonic() - started
    manifest = daemon.view.manifest
    return ReplayResult(
        folder=folder,
        probe=probe,
        settings=settings,
        definitions=tuple(d for d in settings.alarms.definitions if d.applies_to(probe_id)),
        model_name=manifest.name,
        model_sha256=manifest.onnx_sha256,
        classes=manifest.classes,
        frames=len(frames),
        frames_without_stamp=sum(1 for f in frames if not f.ts_from_name),
        first_ts=origin,
        last_ts=end,
        results=list(collector.results),
        updates=list(collector.updates),
        events=list(collector.events),
        lost_frames=lost,
        speed=speed,
        wall_s=wall_s,
    )


class ReplayFeed:
    """The replay's source: frames are put in by the replay loop, in time order, and
    handed to the daemon's frame queue, waiting while it is full as the folder source
    waits."""

    def __init__(self, probe_id: str) -> None:
        self.probe_id = probe_id
        self._sink: FrameSink | None = None

    def start(self, sink: FrameSink) -> None:
        self._sink = sink

    def put(self, item: FrameItem) -> None:
        if self._sink is None:
            raise RuntimeError("ReplayFeed.put before the daemon started")
        while not self._sink.put(item, block=True):  # full: wait for the workers
            pass

    def stop(self) -> None:
        """Nothing runs on its own."""

    def health(self) -> tuple[bool, str]:
        return True, "replaying a recorded batch"


def _wait_recorded(view: MonitorView, collector: CollectingPublisher, expected: int) -> int:
    """Block until `expected` frames are recorded; return how many never will be.

    A frame whose inference failed is dropped by the pipeline without a record (a live
    daemon retries it after a restart); once the pipeline has been idle for a while with
    frames still missing, those frames are counted as lost instead of waited for.
    """
    idle_since: float | None = None
    while not collector.wait_results(expected, timeout=0.25):
        if not view.pipeline_load().idle:
            idle_since = None
            continue
        now = time.monotonic()
        idle_since = idle_since or now
        if now - idle_since >= _IDLE_SETTLE_S:
            missing = expected - len(collector.results)
            log.warning("replay_frames_not_recorded", frames=missing)
            return missing
    return 0
