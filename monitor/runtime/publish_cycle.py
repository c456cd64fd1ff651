"""The publish cycle: every publish interval, snapshot each probe's windows, evaluate its
alarms, store the snapshot, then tell the publishers. And when it runs: on a timer of
its own (`IntervalSchedule`, the live daemon) or when stepped (`ManualSchedule`, replay).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from monitor.config.settings import Settings
from monitor.log_limit import RepeatLimiter
from monitor.manifest import ModelIdentity, ModelManifest
from monitor.pipeline.recorder import failure_reason
from monitor.publishers.base import ProbeUpdate, Publisher
from monitor.runtime.alarm_keeper import AlarmKeeper
from monitor.runtime.events import EventAnnouncer
from monitor.runtime.probe_state import ProbeState
from monitor.store import Store

log = structlog.get_logger(__name__)

PUBLISH_FAILURE_LOG_INTERVAL_S = 60.0
PURGE_INTERVAL_S = 3600.0


class PublishCycle:
    def __init__(
        self,
        *,
        settings: Callable[[], Settings],
        manifest: ModelManifest,
        running_model: Callable[[], ModelIdentity],
        probes: Mapping[str, ProbeState],
        alarms: AlarmKeeper,
        store: Store,
        publishers: Sequence[Publisher],
        events: EventAnnouncer,
        clock: Callable[[], float],
    ) -> None:
        self._settings = settings  # read each time: a reload may change the interval
        self._manifest = manifest
        self._running_model = running_model  # a swap changes it
        self._probes = probes
        self._alarms = alarms
        self._store = store
        self._publishers = tuple(publishers)
        self._events = events
        self._clock = clock
        self._dropped_seen: dict[str, int] = {}
        self._last_drop: dict[str, float] = {}

    @property
    def interval_s(self) -> float:
        return float(self._settings().aggregation.publish_interval)

    def publish_once(self) -> None:
        """One tick for every probe; the alarm journal and state are stored at the end."""
        now = self._clock()
        publishing = self._publishing_state(now)
        for probe_id, state in self._probes.items():
            with self._alarms.announcing:  # see AlarmKeeper.announcing
                self._publish_probe(probe_id, state, now, publishing)
        self._alarms.persist()

    def _publish_probe(
        self, probe_id: str, state: ProbeState, now: float, publishing: dict[str, Any]
    ) -> None:
        snapshot, last_frame_ts = state.snapshot(now)
        snapshot["publishing"] = publishing
        transitions, quality, statuses = self._alarms.evaluate(
            probe_id, snapshot, now, last_frame_ts
        )
        quality = quality or "GOOD"
        with state.lock:
            state.quality = quality  # the dashboard shows what the plant was told
        self._store.record_snapshot(probe_id, now, snapshot["batch"], snapshot)
        update = ProbeUpdate(
            probe=probe_id,
            ts=now,
            batch=snapshot["batch"],
            quality=quality,
            model=self._model_of(snapshot),
            classes=self._manifest.classes,
            snapshot=snapshot,
            last_frame_ts=last_frame_ts,
            alarms=statuses,
        )
        for publisher in self._publishers:
            publisher.publish_update(update)
        self._events.announce_transitions(probe_id, transitions)

    def _model_of(self, snapshot: dict[str, Any]) -> ModelIdentity:
        """The model of the newest frame counted; the running one before any frame."""
        newest = snapshot.get("model")
        return ModelIdentity(**newest) if newest else self._running_model()

    def purge_expired(self) -> None:
        """Drop stored rows older than the retention (frames, snapshots, journal) and
        particle rows older than theirs."""
        now, store = self._clock(), self._settings().store
        self._store.purge(now - store.retention, now - store.particle_retention)

    def _publishing_state(self, now: float) -> dict[str, dict[str, Any]]:
        """Dropped-message counts of the publishers, for the publish_overflow alarm.

        A publisher whose bounded outbox overflowed (a long broker outage) drops the
        oldest events; operators must see that as an alarm, not only in a log line.
        """
        state: dict[str, dict[str, Any]] = {}
        for publisher in self._publishers:
            diagnostics = getattr(publisher, "diagnostics", None)
            if diagnostics is None:
                continue
            dropped = int(diagnostics().get("dropped_total", 0))
            if dropped > self._dropped_seen.get(publisher.name, 0):
                self._dropped_seen[publisher.name] = dropped
                self._last_drop[publisher.name] = now
                log.error("publish_backlog_dropped", publisher=publisher.name, dropped=dropped)
            state[publisher.name] = {
                "dropped_total": dropped,
                "last_drop_ts": self._last_drop.get(publisher.name),
            }
        return state


class PublishSchedule(Protocol):
    """When the publish cycle runs."""

    def start(self, cycle: PublishCycle) -> None: ...

    def stop(self) -> None: ...


class IntervalSchedule:
    """The live daemon's: every publish interval on a thread of its own, and a purge of
    expired rows every hour. A failing tick (a full disk) is logged once per reason
    per interval, with a count, and the next tick tries again."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, cycle: PublishCycle) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(cycle,), name="publisher", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self, cycle: PublishCycle) -> None:
        next_purge = 0.0
        failures = RepeatLimiter(PUBLISH_FAILURE_LOG_INTERVAL_S)
        failing = False
        # The interval is read each time round: a config reload may change it.
        while not self._stop.wait(cycle.interval_s):
            try:
                cycle.publish_once()
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + PURGE_INTERVAL_S
                    cycle.purge_expired()
            except Exception as exc:
                reason = failure_reason(exc)
                count = failures.due(reason)
                if count:
                    log.error(
                        "publish_failed",
                        reason=reason,
                        failures=count,
                        interval_s=PUBLISH_FAILURE_LOG_INTERVAL_S,
                        exc_info=not failing,  # the traceback only the first time
                    )
                failing = True
            else:
                if failing:
                    log.info("publish_recovered")
                    failing = False
                    failures.reset()


class ManualSchedule:
    """Runs the cycle only when told to (`tick`): replay steps it in recorded time."""

    def __init__(self) -> None:
        self._cycle: PublishCycle | None = None

    def start(self, cycle: PublishCycle) -> None:
        self._cycle = cycle

    def tick(self) -> None:
        if self._cycle is None:
            raise RuntimeError("ManualSchedule.tick before the daemon started")
        self._cycle.publish_once()

    def stop(self) -> None:
        """Nothing runs on its own."""
