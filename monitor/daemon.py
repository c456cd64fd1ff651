"""The composition root: builds every stage from the settings, starts them in order,
stops them in reverse, and stops what did start when a later start fails.

source -> frame queue -> workers (decode, quality gate, sampling) -> micro-batcher
-> backend -> recorder (store, then the windows and the alarm counts) -> publish cycle
(window snapshots, alarms) -> publishers and the web server.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from monitor import __version__
from monitor.config.settings import Settings
from monitor.inference.factory import resolve_backend
from monitor.manifest import describe_model_quality, load_manifest
from monitor.pipeline.batcher import MicroBatcher
from monitor.pipeline.frame_queue import FrameQueue
from monitor.pipeline.outcome import FrameOutcome
from monitor.pipeline.recorder import Recorder, result_document
from monitor.pipeline.workers import Pipeline
from monitor.publishers.base import DurableResults, Publisher
from monitor.runtime.alarm_keeper import AlarmKeeper
from monitor.runtime.events import EventAnnouncer
from monitor.runtime.operator_commands import OperatorCommands
from monitor.runtime.probe_state import create_probe_states
from monitor.runtime.publish_cycle import IntervalSchedule, PublishCycle, PublishSchedule
from monitor.runtime.reload import LiveReload, ReloadPlan
from monitor.runtime.systemd_notify import SystemdNotifier
from monitor.runtime.systemd_progress import SystemdProgress
from monitor.runtime.view import LiveView
from monitor.sources.base import Source
from monitor.sources.factory import create_source
from monitor.store import Store, StoreTransaction

if TYPE_CHECKING:
    from monitor.web.server import WebServer

log = structlog.get_logger(__name__)

MODEL_LOAD_TIMEOUT_S = 120.0  # EXTEND_TIMEOUT_USEC for model load, warm-up and engine builds


class Daemon:
    """`sources` (default: built from each probe's `source`) and `publish_schedule`
    (default: every publish interval on a thread) are injected by replay."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        publishers: Sequence[Publisher] = (),
        sources: Sequence[Source] | None = None,
        publish_schedule: PublishSchedule | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.publishers = list(publishers)
        self._given_sources = sources
        self.schedule = publish_schedule or IntervalSchedule()
        self.notifier = notifier if notifier is not None else SystemdNotifier.from_environment()
        self.sources: list[Source] = []
        self.web: WebServer | None = None
        self._running: list[tuple[str, Callable[[], None]]] = []  # how to stop, in start order
        self._stop_requested = False
        self._reload_requested = False
        self.drained: bool | None = None  # whether in-flight frames finished at stop
        self.frames_recorded = 0  # at stop

    def start(self) -> None:
        try:
            self._build()
            self._start_stages()
        except BaseException:
            log.error("daemon_start_failed", stopping=[name for name, _ in self._running])
            self._stop_running()
            raise

    def _build(self) -> None:
        settings, clock = self.settings, self.clock
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
        self._running.append(("store", self.store.close))
        self.backend = resolve_backend(
            settings.backend,
            self.model,
            max_batch=settings.batcher.max_batch,
            state_dir=settings.daemon.state_dir,
            extend_timeout=self.notifier.extend_timeout,  # an engine build takes minutes
        )
        self._running.append(("backend", self.backend.close))
        size = manifest.input.size
        self.backend.infer(np.zeros((1, 3, size, size), np.float32))  # warm-up
        log.info("backend_ready", backend=self.backend.name)

        self.probes = create_probe_states(settings, manifest, self.store, clock())
        self.alarms = AlarmKeeper(settings, self.store)
        self.events = EventAnnouncer(self.publishers)
        self.batcher = MicroBatcher(
            self.backend,
            max_batch=settings.batcher.max_batch,
            max_wait_s=settings.batcher.max_wait,
            queue_crops=settings.batcher.queue_size,
        )
        self.frames = FrameQueue(settings.batcher.frame_queue_size)
        durable = [p for p in self.publishers if isinstance(p, DurableResults)]
        self.recorder = Recorder(
            self.store,
            manifest.classes,
            batch_of=lambda probe: self.probes[probe].aggregator.batch,
            on_recorded=self._on_recorded,
            stage_results=_staging(durable) if durable else None,
            clock=clock,
            max_delay_s=settings.store.commit_delay,
        )
        self.workers = settings.batcher.workers or max(1, os.cpu_count() or 1)
        self.pipeline = Pipeline(
            manifest,
            settings.probes,
            self.batcher,
            self.frames,
            self.recorder.submit,
            workers=self.workers,
        )
        self.cycle = PublishCycle(
            settings=lambda: self.settings,
            manifest=manifest,
            probes=self.probes,
            alarms=self.alarms,
            store=self.store,
            publishers=self.publishers,
            events=self.events,
            clock=clock,
        )
        self.commands = OperatorCommands(self.probes, self.alarms, self.store, self.events, clock)
        self.view = LiveView(
            settings=lambda: self.settings,
            manifest=manifest,
            backend_name=self.backend.name,
            probes=self.probes,
            alarms=self.alarms,
            store=self.store,
            recorder=self.recorder,
            frames=self.frames,
            pipeline=self.pipeline,
            batcher=self.batcher,
            sources=self.sources,
            publishers=self.publishers,
            clock=clock,
        )
        self.progress = SystemdProgress(
            self.notifier,
            frames=self.frames,
            pipeline=self.pipeline,
            batcher=self.batcher,
            recorder=self.recorder,
            probes=self.probes,
            clock=clock,
        )
        self.reloader = LiveReload(
            lambda: self.settings,
            self.apply_reload,
            status=lambda text: self.notifier.ready(status=text),
            reloading=self.notifier.reloading,
        )

    def _start_stages(self) -> None:
        """Downstream first, so every stage has somewhere to hand its output."""
        grace = self.settings.daemon.shutdown_grace
        for publisher in self.publishers:
            publisher.start(self.commands)
            self._running.append((f"publisher {publisher.name}", publisher.stop))
        if self.settings.http.enabled:
            from monitor.web.server import WebServer  # noqa: PLC0415  (aiohttp only when used)

            self.web = WebServer(self.settings.http, self.view, self.commands)
            self.web.start()
            self._running.append(("web", self.web.stop))
        # Stopping: everything recorded by now is in the windows; publish it once more.
        self._running.append(("last publish", self.cycle.publish_once))
        self.recorder.start()
        self._running.append(("recorder", lambda: self._stop_recorder(grace)))
        self.batcher.start()
        self._running.append(("batcher", lambda: self.batcher.stop(timeout=grace)))
        self.pipeline.start()
        self._running.append(("pipeline", lambda: self._stop_pipeline(grace)))
        self._running.append(("frame queue", self.frames.close))
        given = self._given_sources
        for probe in self.settings.probes if given is None else ():
            self.sources.append(
                create_source(
                    probe,
                    store=self.store,
                    clock=self.clock,
                    retention_s=lambda: float(self.settings.store.retention),
                )
            )
        self.sources.extend(given or ())
        for source in self.sources:
            source.start(self.frames)
            self._running.append((f"source {source.probe_id}", source.stop))
        self.schedule.start(self.cycle)
        self._running.append(("publish schedule", self.schedule.stop))
        self.progress.start()
        self._running.append(("systemd progress", self.progress.stop))
        log.info(
            "daemon_started",
            version=__version__,
            probes=[p.id for p in self.settings.probes],
            state_dir=str(self.settings.daemon.state_dir),
            workers=self.workers,
        )

    def _on_recorded(self, outcome: FrameOutcome) -> None:
        """After a frame's row is committed: the windows, the alarms' counts, live results."""
        probe = outcome.item.probe
        record = self.probes[probe].add(outcome)
        classes = self.model.manifest.classes
        if record.accepted and any(record.class_counts):
            counts = dict(zip(classes, record.class_counts, strict=True))
            self.alarms.observe_counts(probe, record.ts, counts)
        live = [p for p in self.publishers if not isinstance(p, DurableResults)]
        if live:
            result = result_document(outcome, classes)
            for publisher in live:
                publisher.publish_result(probe, result)

    def _stop_pipeline(self, grace: float) -> None:
        self.drained = self.pipeline.stop(timeout=grace)

    def _stop_recorder(self, grace: float) -> None:
        self.recorder.stop(timeout=grace)
        self.frames_recorded = self.recorder.recorded

    def apply_reload(self, plan: ReloadPlan) -> None:
        settings = plan.settings
        self.alarms.reconfigure(settings)
        self.pipeline.update_probes(settings.probes)
        for probe in settings.probes:
            self.probes[probe.id].config = probe
        self.settings = settings

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
                    self.reloader.reload(config_path)
                else:
                    log.warning("config_reload_ignored", why="no configuration file to re-read")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop taking frames, finish in-flight ones within the grace time, flush, close."""
        self.notifier.stopping()
        self._stop_running()
        log.info("daemon_stopped", drained=self.drained, frames=self.frames_recorded)
        self.notifier.close()

    def _stop_running(self) -> None:
        """Everything that started, in reverse; one failing stop does not skip the rest."""
        while self._running:
            name, stop = self._running.pop()
            try:
                stop()
            except Exception:
                log.exception("stop_failed", stage=name)


def _staging(durable: Sequence[DurableResults]) -> Callable[..., None]:
    """Inside the recorder's store transaction: the durable publishers' result messages
    commit with their frames, or not at all."""

    def stage(tx: StoreTransaction, results: Sequence[tuple[str, dict[str, Any]]]) -> None:
        for publisher in durable:
            for probe, result in results:
                publisher.stage_result(tx, probe, result)

    return stage


def create_publishers(settings: Settings) -> list[Publisher]:
    """The publishers the configuration enables; heavy imports only when used."""
    publishers: list[Publisher] = []
    if settings.mqtt.enabled:
        from monitor.publishers.mqtt import MqttPublisher  # noqa: PLC0415

        probes = [probe.id for probe in settings.probes]
        publishers.append(
            MqttPublisher(
                settings.mqtt, settings.daemon.state_dir, version=__version__, probes=probes
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
