"""The composition root: builds every stage in order, starts them, stops them in reverse.

source -> frame queue -> workers (decode, gate, sampling) -> micro-batcher -> backend
-> recorder (store, then aggregators) -> publisher loop (window snapshots).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from monitor import __version__
from monitor.aggregate import FrameRecord, WindowAggregator
from monitor.alarms import AlarmEngine, quality_of
from monitor.config.settings import (
    ConfigError,
    FolderSourceConfig,
    ProbeConfig,
    Settings,
    SimulatedSourceConfig,
    StreamSourceConfig,
    check_environment,
    load_settings,
)
from monitor.imaging.decode import DecodeLimits
from monitor.inference.factory import resolve_backend
from monitor.log_limit import RepeatLimiter
from monitor.manifest import describe_model_quality, load_manifest
from monitor.pipeline.batcher import MicroBatcher
from monitor.pipeline.frame_queue import FrameQueue
from monitor.pipeline.outcome import FrameOutcome, ParticleBox
from monitor.pipeline.recorder import Recorder, failure_reason, result_document
from monitor.pipeline.workers import Pipeline
from monitor.publishers.base import CommandResult, DurableResults, ProbeUpdate, Publisher
from monitor.runtime.reload import ReloadPlan, plan_reload
from monitor.runtime.systemd_notify import SystemdNotifier, watchdog_interval
from monitor.runtime.watchdog_feeder import WatchdogFeeder, WatchdogPolicy, feeder_interval
from monitor.sources.base import Source
from monitor.sources.folder import FolderSource
from monitor.store import Store, StoreTransaction

if TYPE_CHECKING:
    from monitor.web.server import WebServer

log = structlog.get_logger(__name__)

Clock = Callable[[], float]


# Classified frames kept per probe for the dashboard's strip of recent frames. Each is a
# reference to the array the worker already decoded (nothing is copied or encoded on the
# hot path), so a probe holds up to RECENT_FRAMES x one frame in memory: 8 x 1.4 MB for
# 1360 x 1024 8-bit frames. JPEGs are encoded only when the dashboard asks for them.
RECENT_FRAMES = 8


@dataclass(frozen=True)
class LatestFrame:
    """One of the probe's recent classified frames, for the dashboard."""

    ts: float
    key: str
    image: np.ndarray  # 2-D uint8, as decoded
    boxes: tuple[ParticleBox, ...]


@dataclass
class ProbeState:
    """What the daemon keeps per probe between stages."""

    config: ProbeConfig
    aggregator: WindowAggregator
    lock: threading.Lock
    last_frame_ts: float | None = None
    # The last RECENT_FRAMES classified frames, oldest first (see RECENT_FRAMES for memory).
    recent_frames: deque[LatestFrame] = field(default_factory=lambda: deque(maxlen=RECENT_FRAMES))

    @property
    def latest_frame(self) -> LatestFrame | None:
        """The most recently classified frame, or None before the first (read under `lock`)."""
        return self.recent_frames[-1] if self.recent_frames else None


ALARM_STATE = "alarm_engine"
PUBLISH_FAILURE_LOG_INTERVAL_S = 60.0
MODEL_LOAD_TIMEOUT_S = 120.0  # EXTEND_TIMEOUT_USEC for model load, warm-up and engine builds


class Daemon:
    """Also the CommandHandler of the publishers: operator actions arrive here."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = time.time,
        publishers: Sequence[Publisher] = (),
        notifier: SystemdNotifier | None = None,
        publish_loop: bool = True,
        record_delay_s: float = 0.02,
    ) -> None:
        """`publish_loop=False` leaves publish_once to the caller (replay steps it in
        simulated time); `record_delay_s` is how long the recorder gathers rows into one
        transaction (replay, which waits for every frame at each step, uses 0)."""
        self._record_delay_s = record_delay_s
        self.settings = settings
        self._run_publish_loop = publish_loop
        self.notifier = notifier if notifier is not None else SystemdNotifier.from_environment()
        self._feeder: WatchdogFeeder | None = None
        self._status_mark = (time.monotonic(), 0)
        self._batches_seen = 0
        self._batch_progress = time.monotonic()
        self.clock = clock
        self.publishers = list(publishers)
        self._stop = threading.Event()
        self._publisher: threading.Thread | None = None
        self.sources: list[Source] = []
        self.probes: dict[str, ProbeState] = {}
        self._alarm_lock = threading.Lock()
        self._stop_requested = False
        self._reload_requested = False
        self._dropped_seen: dict[str, int] = {}
        self._last_drop: dict[str, float] = {}
        self.started_at = clock()
        self.web: WebServer | None = None

    # -- start-up ---------------------------------------------------------------

    def start(self) -> None:
        settings = self.settings
        self.notifier.extend_timeout(MODEL_LOAD_TIMEOUT_S)
        self.notifier.status("loading model")
        self.model = load_manifest(settings.model.path)
        manifest = self.model.manifest
        log.info(
            "model_loaded",
            name=manifest.name,
            version=manifest.version,
            classes=list(manifest.classes),
            sha256=manifest.onnx_sha256[:12],
            **describe_model_quality(manifest),
        )
        self.store = Store(settings.daemon.state_dir)
        self.backend = resolve_backend(
            settings.backend,
            self.model,
            max_batch=settings.batcher.max_batch,
            state_dir=settings.daemon.state_dir,
            # A TensorRT engine build can take minutes: keep systemd's start timeout moving.
            extend_timeout=self.notifier.extend_timeout,
        )
        size = manifest.input.size
        self.backend.infer(np.zeros((1, 3, size, size), np.float32))  # warm-up
        log.info("backend_ready", backend=self.backend.name)

        now = self.clock()
        for probe in settings.probes:
            aggregator = WindowAggregator(
                manifest.classes,
                windows_s=settings.aggregation.windows,
                confusion_matrix=manifest.validation.confusion_matrix,
                ewma_halflife_s=settings.aggregation.ewma_halflife,
            )
            self.probes[probe.id] = ProbeState(probe, aggregator, threading.Lock())
            self._restore_windows(probe.id, now)

        batcher_config = settings.batcher
        self.batcher = MicroBatcher(
            self.backend,
            max_batch=batcher_config.max_batch,
            max_wait_s=batcher_config.max_wait,
            queue_crops=batcher_config.queue_size,
        )
        self.frames = FrameQueue(batcher_config.frame_queue_size)
        self._durable = [p for p in self.publishers if isinstance(p, DurableResults)]
        self._live_results = [p for p in self.publishers if not isinstance(p, DurableResults)]
        self.recorder = Recorder(
            self.store,
            manifest.classes,
            batch_of=lambda probe: self.probes[probe].aggregator.batch,
            on_recorded=self._on_recorded,
            stage_results=self._stage_results if self._durable else None,
            clock=self.clock,
            max_delay_s=self._record_delay_s,
        )
        workers = batcher_config.workers or max(1, os.cpu_count() or 1)
        self.pipeline = Pipeline(
            manifest,
            settings.probes,
            self.batcher,
            self.frames,
            self.recorder.submit,
            workers=workers,
        )
        self.alarms = AlarmEngine(
            settings.alarms.definitions,
            state=self.store.load_state(ALARM_STATE),
            max_shelve_s=settings.alarms.max_shelve,
        )
        for publisher in self.publishers:
            publisher.start(self)
        if settings.http.enabled:
            from monitor.web.server import WebServer  # noqa: PLC0415  (aiohttp only when used)

            self.web = WebServer(settings.http, self)
            self.web.start()
        self.recorder.start()
        self.batcher.start()
        self.pipeline.start()
        for probe in settings.probes:
            source = self._create_source(probe)
            source.start(self.frames)
            self.sources.append(source)
        if self._run_publish_loop:
            self._publisher = threading.Thread(
                target=self._publish_loop, name="publisher", daemon=True
            )
            self._publisher.start()
        self._start_systemd_feeder()
        log.info(
            "daemon_started",
            version=__version__,
            probes=[p.id for p in settings.probes],
            state_dir=str(settings.daemon.state_dir),
            workers=workers,
        )

    def _start_systemd_feeder(self) -> None:
        """READY=1 only now that the model is warm and the sources run; then keep systemd
        informed (STATUS) and, with WatchdogSec=, feed the watchdog while frames finish."""
        self.notifier.ready(status=f"running: {len(self.probes)} probe(s)")
        if not self.notifier.enabled:
            return
        watchdog_s = watchdog_interval()
        policy = WatchdogPolicy(stall_after_s=watchdog_s) if watchdog_s is not None else None
        self._status_mark = (time.monotonic(), self.recorder.recorded)
        self._feeder = WatchdogFeeder(
            self.notifier,
            policy,
            self._progress,
            self._status_line,
            feeder_interval(watchdog_s),
        )
        self._feeder.start()

    def _progress(self) -> tuple[float, int]:
        """When the pipeline last made progress (monotonic), and frames waiting or in flight.

        Progress is the older of the last finished frame and the last finished inference
        batch while frames are in flight: frames the quality gate rejects finish without
        inference and must not hide a hung backend. Called from the feeder thread only.
        """
        now = time.monotonic()
        in_flight = self.pipeline.in_flight
        batches = self.batcher.stats.batches
        if batches != self._batches_seen or in_flight == 0:
            self._batches_seen = batches
            self._batch_progress = now
        last = min(self.pipeline.last_progress, self._batch_progress)
        if self.recorder.problem is not None:
            # Held back by a store that cannot write (a full disk): the recorder is alive
            # and retrying, /readyz says why; a restart by the watchdog would not help.
            last = max(last, self.recorder.last_attempt)
        return last, self.frames.qsize() + in_flight

    def _status_line(self) -> str:
        """Frames/s since the previous line, frame queue depth and the last frame's age."""
        now = time.monotonic()
        recorded = self.recorder.recorded
        since, before = self._status_mark
        self._status_mark = (now, recorded)
        rate = (recorded - before) / (now - since) if now > since else 0.0
        last = [s.last_frame_ts for s in self.probes.values() if s.last_frame_ts is not None]
        age = f"{max(0.0, self.clock() - max(last)):.1f}s" if last else "never"
        return (
            f"{rate:.1f} frames/s, queue {self.frames.qsize()}, "
            f"in flight {self.pipeline.in_flight}, last frame {age} ago"
        )

    def _restore_windows(self, probe: str, now: float) -> None:
        """Refill the windows from the store so a restart does not blank the trend."""
        state = self.probes[probe]
        current = self.store.current_batch(probe)
        since = now - max(self.settings.aggregation.windows)
        if current is not None:
            state.aggregator.start_batch(current[0], current[1])
            since = max(since, current[1])
        restored = 0
        for row in self.store.frames_since(probe, since):
            if current is not None and row.batch != current[0]:
                continue
            counts = tuple(row.counts.get(name, 0) for name in self.model.manifest.classes)
            state.aggregator.add(
                FrameRecord(
                    ts=row.ts,
                    class_counts=counts,
                    n_uncertain=row.n_uncertain,
                    n_ood=row.n_ood,
                    rejected_reason=None if row.status == "ok" else row.reason or row.status,
                )
            )
            restored += 1
        if restored:
            log.info("windows_restored", probe=probe, frames=restored)

    def _create_source(self, probe: ProbeConfig) -> Source:
        config = probe.source
        limits = DecodeLimits(
            max_pixels=probe.max_pixels, max_decoded_bytes=probe.max_decoded_bytes
        )
        if isinstance(config, FolderSourceConfig):

            def record_skipped(keys: list[str], reason: str) -> None:
                self.store.record_skipped(probe.id, keys, reason, self.clock())

            def journaled(keys: Sequence[str]) -> set[str]:
                return self.store.journaled(probe.id, keys)

            return FolderSource(
                probe.id,
                config,
                journaled=journaled,
                record_skipped=record_skipped,
                limits=limits,
                retention_s=lambda: float(self.settings.store.retention),
            )
        if isinstance(config, SimulatedSourceConfig):
            from monitor.sources.simulated import SimulatedSource  # noqa: PLC0415

            return SimulatedSource(probe.id, config, clock=self.clock)
        if isinstance(config, StreamSourceConfig):
            from monitor.sources.stream import StreamSource  # noqa: PLC0415

            return StreamSource(probe.id, config, clock=self.clock)
        raise AssertionError(f"unhandled source type {config!r}")

    # -- running ---------------------------------------------------------------

    def _on_recorded(self, probe: str, record: FrameRecord, outcome: FrameOutcome) -> None:
        state = self.probes[probe]
        with state.lock:
            state.aggregator.add(record)
            state.last_frame_ts = max(state.last_frame_ts or record.ts, record.ts)
            if outcome.image is not None:  # a reference; the deque drops the oldest
                state.recent_frames.append(
                    LatestFrame(record.ts, outcome.item.key, outcome.image, outcome.boxes)
                )
        if record.accepted and any(record.class_counts):
            counts = dict(zip(self.model.manifest.classes, record.class_counts, strict=True))
            with self._alarm_lock:
                self.alarms.observe_counts(probe, record.ts, counts)
        if self._live_results:
            result = result_document(outcome, self.model.manifest.classes)
            for publisher in self._live_results:
                publisher.publish_result(probe, result)

    def _stage_results(
        self, tx: StoreTransaction, results: Sequence[tuple[str, dict[str, Any]]]
    ) -> None:
        """Inside the recorder's store transaction: the durable publishers' result
        messages commit with their frames, or not at all."""
        for publisher in self._durable:
            for probe, result in results:
                publisher.stage_result(tx, probe, result)

    def snapshot(self, probe: str) -> dict[str, Any]:
        state = self.probes[probe]
        with state.lock:
            return state.aggregator.snapshot(self.clock()).to_json()

    def alarm_states(self, probe: str) -> list[dict[str, Any]]:
        """Every alarm of `probe` as AlarmStatus.to_json() (the HTTP API and /metrics)."""
        with self._alarm_lock:
            return [status.to_json() for status in self.alarms.alarm_states(probe)]

    def publish_once(self) -> None:
        """Snapshot every probe, run the alarms, store, then tell the publishers."""
        now = self.clock()
        manifest = self.model.manifest
        definitions = self.settings.alarms.definitions
        publishing = self._publishing_state(now)
        for probe_id, state in self.probes.items():
            with state.lock:
                snapshot = state.aggregator.snapshot(now).to_json()
                last_frame_ts = state.last_frame_ts
            snapshot["publishing"] = publishing
            with self._alarm_lock:
                quality = quality_of(
                    snapshot,
                    now,
                    last_frame_ts,
                    [d for d in definitions if d.applies_to(probe_id)],
                    watching_since=self.started_at,
                )
                transitions = self.alarms.evaluate(
                    probe_id, snapshot, now, last_frame_ts=last_frame_ts, quality=quality
                )
                statuses = [status.to_json() for status in self.alarms.alarm_states(probe_id)]
            self.store.record_snapshot(probe_id, now, snapshot["batch"], snapshot)
            update = ProbeUpdate(
                probe=probe_id,
                ts=now,
                batch=snapshot["batch"],
                quality=quality,
                model_name=manifest.name,
                model_sha256=manifest.onnx_sha256,
                classes=manifest.classes,
                snapshot=snapshot,
                last_frame_ts=last_frame_ts,
                alarms=statuses,
            )
            for publisher in self.publishers:
                publisher.publish_update(update)
            for transition in transitions:
                self._announce(probe_id, {"type": "alarm", **transition.to_json()})
        self._persist_alarms()

    def _publishing_state(self, now: float) -> dict[str, dict[str, Any]]:
        """Dropped-message counts of the publishers, for the publish_overflow alarm.

        A publisher whose bounded outbox overflowed (a long broker outage) drops the
        oldest events; operators must see that as an alarm, not only in a log line.
        """
        state: dict[str, dict[str, Any]] = {}
        for publisher in self.publishers:
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

    def _persist_alarms(self) -> None:
        with self._alarm_lock:
            journal = [entry.to_json() for entry in self.alarms.drain_journal()]
            state = self.alarms.export_state()
        self.store.record_alarm_journal(journal)
        self.store.save_state(ALARM_STATE, state)

    def _announce(self, probe: str, event: dict[str, Any]) -> None:
        log.info("event", probe=probe, **{k: v for k, v in event.items() if k != "probe"})
        for publisher in self.publishers:
            publisher.publish_event(probe, event)

    # -- operator commands (CommandHandler) ---------------------------------------

    def _known(self, probe: str) -> CommandResult | None:
        if probe not in self.probes:
            return CommandResult(False, f"unknown probe {probe!r}")
        return None

    def acknowledge(self, probe: str, alarm_id: str, who: str, comment: str) -> CommandResult:
        refused = self._known(probe)
        if refused:
            return refused
        with self._alarm_lock:
            result = self.alarms.acknowledge(probe, alarm_id, who, comment, self.clock())
        return self._after_action(probe, result)

    def shelve(
        self, probe: str, alarm_id: str, minutes: float, who: str, comment: str
    ) -> CommandResult:
        refused = self._known(probe)
        if refused:
            return refused
        with self._alarm_lock:
            result = self.alarms.shelve(probe, alarm_id, minutes * 60.0, who, comment, self.clock())
        return self._after_action(probe, result)

    def _after_action(self, probe: str, result: Any) -> CommandResult:
        for transition in result.transitions:
            self._announce(probe, {"type": "alarm", **transition.to_json()})
        self._persist_alarms()
        return CommandResult(result.accepted, result.reason)

    def _publish_loop(self) -> None:
        next_purge = 0.0
        failures = RepeatLimiter(PUBLISH_FAILURE_LOG_INTERVAL_S)
        failing = False
        # The interval is read each time round: a config reload may change it.
        while not self._stop.wait(self.settings.aggregation.publish_interval):
            try:
                self.publish_once()
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + 3600
                    self.store.purge(self.clock() - self.settings.store.retention)
            except Exception as exc:
                # Repeats every interval while the cause lasts (a full disk): one line
                # per reason per interval, with a count, and a traceback only the first time.
                reason = failure_reason(exc)
                count = failures.due(reason)
                if count:
                    log.error(
                        "publish_failed",
                        reason=reason,
                        failures=count,
                        interval_s=PUBLISH_FAILURE_LOG_INTERVAL_S,
                        exc_info=not failing,
                    )
                failing = True
            else:
                if failing:
                    log.info("publish_recovered")
                    failing = False
                    failures.reset()

    def start_batch(self, probe: str, batch_id: str, who: str = "local") -> CommandResult:
        """Reset the probe's windows and tag everything that follows with `batch_id`."""
        refused = self._known(probe)
        if refused:
            return refused
        if not batch_id or len(batch_id) > 128:
            return CommandResult(False, "batch_id must be 1 to 128 characters")
        now = self.clock()
        state = self.probes[probe]
        with state.lock:
            self.store.start_batch(probe, batch_id, now)
            state.aggregator.start_batch(batch_id, now)
        with self._alarm_lock:
            self.alarms.reset_shift(probe, now)
        self._announce(
            probe, {"type": "batch", "action": "start", "batch": batch_id, "ts": now, "who": who}
        )
        return CommandResult(True)

    def stop_batch(self, probe: str, who: str = "local") -> CommandResult:
        refused = self._known(probe)
        if refused:
            return refused
        now = self.clock()
        state = self.probes[probe]
        with state.lock:
            batch = state.aggregator.batch
            if batch is None:
                return CommandResult(False, "no batch is running")
            self.store.stop_batch(probe, now)
            state.aggregator.stop_batch(now)
        self._announce(
            probe, {"type": "batch", "action": "stop", "batch": batch, "ts": now, "who": who}
        )
        return CommandResult(True)

    # -- shutdown ------------------------------------------------------------------

    def request_stop(self) -> None:
        """Safe from a signal handler: only sets a flag (an Event's lock is not reentrant,
        and the handler runs on the main thread, which may be inside Event.wait)."""
        self._stop_requested = True

    def request_reload(self) -> None:
        """Safe from a signal handler, like request_stop; `wait` does the reload."""
        self._reload_requested = True

    def wait(self, config_path: Path | None = None) -> None:
        """Until a stop is requested; reloads `config_path` when asked to (SIGHUP)."""
        while not self._stop_requested:
            if self._reload_requested:
                self._reload_requested = False
                if config_path is not None:
                    self.reload(config_path)
                else:
                    log.warning("config_reload_ignored", why="no configuration file to re-read")
            time.sleep(0.2)

    # -- live reload (SIGHUP) ---------------------------------------------------------

    def reload(self, config_path: Path) -> ReloadPlan | None:
        """Re-read the configuration and apply what can change live; an invalid file
        is logged and the daemon keeps running on the configuration it has."""
        self.notifier.reloading()
        try:
            new_settings = load_settings(config_path)
        except ConfigError as exc:
            problems = exc.problems
        else:
            problems = check_environment(new_settings)
        if problems:
            log.error(
                "config_reload_failed",
                config=str(config_path),
                problems=problems,
                action="kept the running configuration",
            )
            self.notifier.ready(status=f"reload failed, running on the old config: {problems[0]}")
            return None
        plan = plan_reload(self.settings, new_settings)
        self.apply_reload(plan)
        log.info(
            "config_reloaded",
            config=str(config_path),
            applied=list(plan.applied),
            needs_restart=list(plan.needs_restart),
        )
        status = f"reloaded: {len(plan.applied)} change(s) applied"
        if plan.needs_restart:
            status += f", restart needed for {', '.join(plan.needs_restart)}"
        self.notifier.ready(status=status)
        return plan

    def apply_reload(self, plan: ReloadPlan) -> None:
        settings = plan.settings
        self._persist_alarms()  # the old engine's journal is written before the swap
        with self._alarm_lock:
            self.alarms = self.alarms.reconfigured(
                settings.alarms.definitions, max_shelve_s=settings.alarms.max_shelve
            )
        self.pipeline.update_probes(settings.probes)
        for probe in settings.probes:
            self.probes[probe.id].config = probe
        self.settings = settings

    def stop(self) -> None:
        """Stop taking frames, finish in-flight ones within the grace time, flush, close."""
        self.notifier.stopping()
        if self._feeder is not None:
            self._feeder.stop()
        self._stop.set()
        grace = self.settings.daemon.shutdown_grace
        for source in self.sources:
            source.stop()
        self.frames.close()
        drained = self.pipeline.stop(timeout=grace)
        self.batcher.stop(timeout=grace)
        self.recorder.stop(timeout=grace)
        if self._publisher is not None:
            self._publisher.join(timeout=2)
        self.publish_once()
        if self.web is not None:
            self.web.stop()
        for publisher in self.publishers:
            publisher.stop()
        self.store.close()
        self.backend.close()
        log.info("daemon_stopped", drained=drained, frames=self.recorder.recorded)
        self.notifier.close()


def create_publishers(settings: Settings) -> list[Publisher]:
    """The publishers the configuration enables; heavy imports only when used."""
    publishers: list[Publisher] = []
    if settings.mqtt.enabled:
        from monitor.publishers.mqtt import MqttPublisher  # noqa: PLC0415

        publishers.append(
            MqttPublisher(
                settings.mqtt,
                settings.daemon.state_dir,
                version=__version__,
                probes=[probe.id for probe in settings.probes],
            )
        )
    if settings.opcua.enabled:
        from monitor.publishers.opcua import OpcUaPublisher  # noqa: PLC0415

        publishers.append(OpcUaPublisher(settings.opcua, settings.daemon.state_dir))
    return publishers


def run_daemon(settings: Settings, config_path: Path | None = None) -> int:
    """Run in the foreground until SIGTERM or SIGINT (the way systemd runs it); SIGHUP
    re-reads `config_path` and applies what can change live."""
    daemon = Daemon(settings, publishers=create_publishers(settings))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        daemon.request_stop()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        daemon.request_reload()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Ignored until the daemon can reload: systemd's reload during start-up must not kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    daemon.start()
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        daemon.wait(config_path)
    finally:
        daemon.stop()
    return 0
