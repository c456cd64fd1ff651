"""The composition root: builds every stage from the settings, starts them in order,
stops them in reverse, and stops what did start when a later start fails.

source -> frame queue -> workers (decode, quality gate, sampling) -> micro-batcher
-> backend -> recorder (store, then the windows and the alarm counts) -> publish cycle
(window snapshots, alarms) -> publishers and the web server.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from monitor import __version__
from monitor.config.settings import Settings
from monitor.config.shadow import ShadowConfig
from monitor.manifest import ManifestError
from monitor.pipeline.active_model import ActiveModel
from monitor.pipeline.batcher import MicroBatcher
from monitor.pipeline.frame_queue import FrameQueue
from monitor.pipeline.outcome import ClassifiedFrameObserver
from monitor.pipeline.recorder import Recorder
from monitor.pipeline.workers import Pipeline
from monitor.publishers.base import Publisher
from monitor.review.queue import ReviewQueue
from monitor.review.sample_store import SampleStore
from monitor.runtime.alarm_keeper import AlarmKeeper
from monitor.runtime.events import EventAnnouncer
from monitor.runtime.frame_results import FrameResults
from monitor.runtime.model_loading import load_model, ready_backend
from monitor.runtime.model_swap import ModelSwap, ModelSwapError, candidate_problems
from monitor.runtime.operator_commands import OperatorCommands
from monitor.runtime.probe_state import create_probe_states
from monitor.runtime.publish_cycle import IntervalSchedule, PublishCycle, PublishSchedule
from monitor.runtime.reload import LiveReload, ReloadPlan
from monitor.runtime.systemd_notify import SystemdNotifier
from monitor.runtime.systemd_progress import SystemdProgress
from monitor.runtime.view import LiveView
from monitor.shadow.runner import ShadowRunner
from monitor.shadow.store import DB_FILE as SHADOW_DB_FILE
from monitor.shadow.store import ShadowStore
from monitor.sources.base import Source
from monitor.sources.factory import create_source
from monitor.store import Store

if TYPE_CHECKING:
    from monitor.web.server import WebServer

log = structlog.get_logger(__name__)

SAMPLES_DIR = "samples"  # the review queue's store, under daemon.state_dir (and the CLI's)
SHADOW_DIR = "shadow"  # the shadow model's comparison record, likewise


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
        self.drained: bool | None = None  # whether in-flight frames finished at stop
        self.last_model_swap: dict[str, object] | None = None  # the last reload's swap
        self.frames_recorded = 0  # at stop
        self.shadow: ShadowRunner | None = None  # the candidate model running beside
        self._shadow_store: ShadowStore | None = None
        self._shadow_lock = threading.Lock()
        self.last_shadow_problem: str | None = None  # why the configured shadow is not running

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
        self.model = load_model(settings, self.notifier)
        manifest = self.model.manifest
        self.store = Store(settings.daemon.state_dir)
        self._running.append(("store", self.store.close))
        self.backend = ready_backend(settings, self.model, self.notifier)
        self._running.append(("backend", self._close_backend))
        self.probes = create_probe_states(settings, manifest, self.store, clock())
        self.alarms = AlarmKeeper(settings, self.store)
        self.events = EventAnnouncer(self.publishers)
        results = FrameResults(manifest.classes, self.probes, self.alarms, self.publishers)
        self.batcher = MicroBatcher(
            self.backend,
            max_batch=settings.batcher.max_batch,
            max_wait_s=settings.batcher.max_wait,
            queue_crops=settings.batcher.queue_size,
        )
        self.frames = FrameQueue(settings.batcher.frame_queue_size)
        self.recorder = Recorder(
            self.store,
            manifest.classes,
            batch_of=lambda probe: self.probes[probe].aggregator.batch,
            on_recorded=results.recorded,
            stage_results=results.stage if results.durable else None,
            clock=clock,
            max_delay_s=settings.store.commit_delay,
        )
        self.review = self._build_review()
        self.workers = settings.batcher.workers or max(1, os.cpu_count() or 1)
        self.pipeline = Pipeline(
            ActiveModel(self.model, self.backend),
            settings.probes,
            self.batcher,
            self.frames,
            self.recorder.submit_many,
            workers=self.workers,
            processes=settings.batcher.processes,
            slot_bytes=settings.batcher.slot_mib << 20,
            observers=self._observers(),
            batch_of=lambda probe: self.probes[probe].aggregator.batch,
        )
        self.cycle = PublishCycle(
            settings=lambda: self.settings,
            manifest=manifest,
            running_model=lambda: self.pipeline.active.identity,
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
            samples=None if self.review is None else self.review.store,
            shadow=lambda: self.shadow,
            shadow_record=self.shadow_record,
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

    def _build_review(self) -> ReviewQueue | None:
        """The review queue over <state_dir>/samples, or None with review.enabled off."""
        config = self.settings.review
        if not config.enabled:
            return None
        samples = SampleStore(
            self.settings.daemon.state_dir / SAMPLES_DIR,
            self.model.manifest.classes,
            max_samples=config.max_samples,
        )
        self._running.append(("sample store", samples.close))
        return ReviewQueue(config, samples, clock=self.clock)

    def _observers(self) -> list[ClassifiedFrameObserver]:
        observers: list[ClassifiedFrameObserver] = []
        if self.review is not None:
            observers.append(self.review)
        if self.shadow is not None:
            observers.append(self.shadow)
        return observers

    def shadow_record(self) -> ShadowStore | None:
        """The shadow comparison's record: opened with the first shadow, or for reading
        when an earlier run left one; None when there is none."""
        folder = self.settings.daemon.state_dir / SHADOW_DIR
        if self._shadow_store is None and not (folder / SHADOW_DB_FILE).is_file():
            return None
        return self._open_shadow_record()

    def _close_shadow_record(self) -> None:
        with self._shadow_lock:
            if self._shadow_store is not None:
                self._shadow_store.close()
                self._shadow_store = None

    def _start_shadow(self, config: ShadowConfig) -> ShadowRunner | None:
        """Load, check and warm up the candidate `config` names and start it; a candidate
        that cannot start is logged and left out (the live measurement goes on)."""
        settings = self.settings.model_copy(
            update={"model": self.settings.model.model_copy(update={"path": config.path})}
        )
        try:
            candidate = load_model(settings, self.notifier)
            live_classes = self.pipeline.active.manifest.classes
            if candidate.manifest.classes != live_classes:
                raise ModelSwapError(
                    f"its classes {list(candidate.manifest.classes)} differ from the live "
                    f"model's {list(live_classes)}"
                )
            backend = ready_backend(settings, candidate, self.notifier)
        except Exception as exc:  # any failure leaves the shadow out, never the daemon
            log.error(
                "shadow_refused",
                path=str(config.path),
                reason=str(exc),
                action="the live model runs as usual; fix model.shadow.path and reload",
            )
            self.last_shadow_problem = str(exc)
            return None
        self.last_shadow_problem = None
        runner = ShadowRunner(
            config,
            ActiveModel(candidate, backend),
            self._open_shadow_record(),
            None if self.review is None else self.review.store,
            max_batch=self.settings.batcher.max_batch,
            clock=self.clock,
        )
        runner.start()
        return runner

    def _open_shadow_record(self) -> ShadowStore:
        with self._shadow_lock:  # the web server's threads ask too
            if self._shadow_store is None:
                self._shadow_store = ShadowStore(self.settings.daemon.state_dir / SHADOW_DIR)
                self._running.insert(0, ("shadow record", self._close_shadow_record))
            return self._shadow_store

    def _stop_shadow(self, grace: float) -> None:
        runner, self.shadow = self.shadow, None
        if runner is None:
            return
        self.pipeline.set_observers(self._observers())
        runner.stop(timeout=grace)
        runner.candidate.backend.close()

    def replace_shadow(self, config: ShadowConfig | None) -> str:
        """Stop the running shadow (its queued frames compared first) and start the one
        `config` names; returns a note for the systemd status."""
        self._stop_shadow(float(self.settings.daemon.shutdown_grace))
        if config is None:
            return "shadow model stopped"
        self.shadow = self._start_shadow(config)
        self.pipeline.set_observers(self._observers())
        if self.shadow is None:
            return f"shadow model refused: {self.last_shadow_problem}"
        return f"shadow model {self.shadow.label} running on {config.share:.0%} of frames"

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
        if self.review is not None:
            self.review.start()  # stops after the pipeline: every kept crop is written
            self._running.append(("review queue", lambda: self._stop_review(grace)))
        # Stops after the pipeline, so every frame it was handed is compared; a shadow
        # started by a reload stops here too.
        self._running.append(("shadow", lambda: self._stop_shadow(grace)))
        if self.settings.model.shadow is not None:
            self.shadow = self._start_shadow(self.settings.model.shadow)
            self.pipeline.set_observers(self._observers())
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

    def _close_backend(self) -> None:
        self.backend.close()  # the one running now: a reload may have swapped it

    def _stop_pipeline(self, grace: float) -> None:
        self.drained = self.pipeline.stop(timeout=grace)

    def _stop_review(self, grace: float) -> None:
        assert self.review is not None
        self.review.stop(timeout=grace)

    def _stop_recorder(self, grace: float) -> None:
        self.recorder.stop(timeout=grace)
        self.frames_recorded = self.recorder.recorded

    def apply_reload(self, plan: ReloadPlan) -> list[str]:
        """Apply a reload's live parts; then, when `model.path` changed, try the swap.
        Returns notes for the systemd status (the swap's outcome)."""
        settings = plan.settings
        self.alarms.reconfigure(settings)
        self.pipeline.update_probes(settings.probes)
        for probe in settings.probes:
            self.probes[probe.id].config = probe
        self.settings = settings
        notes = self._apply_model_swap(plan) if plan.new_model is not None else []
        if plan.new_shadow is not None:
            shadow = plan.new_shadow.model.shadow
            notes.append(self.replace_shadow(shadow))
            self.settings = self.settings.model_copy(
                update={"model": self.settings.model.model_copy(update={"shadow": shadow})}
            )
        return notes

    def _apply_model_swap(self, plan: ReloadPlan) -> list[str]:
        assert plan.new_model is not None
        try:
            swap = self.swap_model(plan.new_model)
        except ModelSwapError as exc:
            log.error(
                "model_swap_refused",
                path=str(plan.new_model.model.path),
                reason=str(exc),
                running=self.pipeline.active.identity.label,
                action="kept the running model",
            )
            self.last_model_swap = {"ok": False, "at": self.clock(), "reason": str(exc)}
            return [f"model swap refused, running {self.pipeline.active.identity.label}: {exc}"]
        self.settings = self.settings.model_copy(
            update={
                "model": self.settings.model.model_copy(update={"path": plan.new_model.model.path})
            }
        )
        self.last_model_swap = {"ok": True, "at": self.clock(), "reason": swap.describe()}
        return [swap.describe()]

    def swap_model(self, new_settings: Settings) -> ModelSwap:
        """Load, check and warm up the model `new_settings` names, then swap it in between
        batches; raises ModelSwapError (the running model untouched) at any failure."""
        running = self.pipeline.active
        try:
            candidate = load_model(new_settings, self.notifier)
        except (ManifestError, OSError) as exc:
            raise ModelSwapError(f"cannot load it: {exc}") from exc
        problems = candidate_problems(running.loaded, candidate)
        if problems:
            raise ModelSwapError("; ".join(problems))
        try:
            backend = ready_backend(new_settings, candidate, self.notifier)
        except Exception as exc:  # any backend failure refuses the candidate
            raise ModelSwapError(f"its backend failed to start or warm up: {exc}") from exc
        previous = self.pipeline.swap_model(ActiveModel(candidate, backend))
        self.batcher.use_backend(backend)
        self.model, self.backend = candidate, backend
        matrix = candidate.manifest.validation.confusion_matrix
        for state in self.probes.values():
            with state.lock:
                state.aggregator.use_confusion_matrix(matrix)
        self.batcher.retire(previous.backend)  # closed once its last batch is delivered
        swap = ModelSwap(previous.loaded, candidate)
        log.info(
            "model_swapped", previous=previous.identity.label, current=candidate.identity.label
        )
        return swap

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
