"""Keeps systemd informed once the daemon runs: READY=1, a STATUS= line of frames/s,
queue depth and the last frame's age, and, with WatchdogSec=, WATCHDOG=1 only while
frames finish (see `watchdog_feeder`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from monitor.pipeline.batcher import MicroBatcher
from monitor.pipeline.frame_queue import FrameQueue
from monitor.pipeline.recorder import Recorder
from monitor.pipeline.workers import Pipeline
from monitor.runtime.probe_state import ProbeState
from monitor.runtime.systemd_notify import SystemdNotifier, watchdog_interval
from monitor.runtime.watchdog_feeder import WatchdogFeeder, WatchdogPolicy, feeder_interval


class SystemdProgress:
    def __init__(
        self,
        notifier: SystemdNotifier,
        *,
        frames: FrameQueue,
        pipeline: Pipeline,
        batcher: MicroBatcher,
        recorder: Recorder,
        probes: Mapping[str, ProbeState],
        clock: Callable[[], float],
    ) -> None:
        self._notifier = notifier
        self._frames = frames
        self._pipeline = pipeline
        self._batcher = batcher
        self._recorder = recorder
        self._probes = probes
        self._clock = clock
        self._feeder: WatchdogFeeder | None = None
        self._status_mark = (time.monotonic(), 0)
        self._batches_seen = 0
        self._batch_progress = time.monotonic()

    def start(self) -> None:
        """READY=1 (the model is warm and the sources run), then the feeder thread."""
        self._notifier.ready(status=f"running: {len(self._probes)} probe(s)")
        if not self._notifier.enabled:
            return
        watchdog_s = watchdog_interval()
        policy = WatchdogPolicy(stall_after_s=watchdog_s) if watchdog_s is not None else None
        self._status_mark = (time.monotonic(), self._recorder.recorded)
        self._feeder = WatchdogFeeder(
            self._notifier,
            policy,
            self.progress,
            self.status_line,
            feeder_interval(watchdog_s),
        )
        self._feeder.start()

    def stop(self) -> None:
        if self._feeder is not None:
            self._feeder.stop()

    def progress(self) -> tuple[float, int]:
        """When the pipeline last made progress (monotonic), and frames waiting or in flight.

        Progress is the older of the last finished frame and the last finished inference
        batch while frames are in flight: frames the quality gate rejects finish without
        inference and must not hide a hung backend. Called from the feeder thread only.
        """
        now = time.monotonic()
        in_flight = self._pipeline.in_flight
        batches = self._batcher.stats.batches
        if batches != self._batches_seen or in_flight == 0:
            self._batches_seen = batches
            self._batch_progress = now
        last = min(self._pipeline.last_progress, self._batch_progress)
        if self._recorder.problem is not None:
            # Held back by a store that cannot write (a full disk): the recorder is alive
            # and retrying, /readyz says why; a restart by the watchdog would not help.
            last = max(last, self._recorder.last_attempt)
        return last, self._frames.qsize() + in_flight

    def status_line(self) -> str:
        """Frames/s since the previous line, frame queue depth and the last frame's age."""
        now = time.monotonic()
        recorded = self._recorder.recorded
        since, before = self._status_mark
        self._status_mark = (now, recorded)
        rate = (recorded - before) / (now - since) if now > since else 0.0
        last = [ts for state in self._probes.values() if (ts := state.last_frame_ts) is not None]
        age = f"{max(0.0, self._clock() - max(last)):.1f}s" if last else "never"
        return (
            f"{rate:.1f} frames/s, queue {self._frames.qsize()}, "
            f"in flight {self._pipeline.in_flight}, last frame {age} ago"
        )
