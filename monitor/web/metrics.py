"""/metrics: the daemon's own counters in Prometheus form, read at scrape time.

A custom collector in a registry of its own (no process-global state, so two daemons in
one test process never mix): the hot path keeps its plain counters and fixed-bucket
histograms, read through the daemon's view (`MonitorView`), and a scrape turns them
into metric families. Nothing here is updated per frame.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from monitor import __version__
from monitor.web.connections import DROP_REASONS, HttpCounters
from monitor.web.views import readiness_checks

if TYPE_CHECKING:
    from monitor.runtime.view import Histogram, MonitorView, PipelineLoad

PREFIX = "crystal_monitor"


def _histogram(name: str, documentation: str, counts: Histogram) -> HistogramMetricFamily:
    per_bucket, total = counts.counts, counts.total
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip(counts.bounds, per_bucket, strict=False):
        cumulative += count
        buckets.append((repr(float(bound)), cumulative))  # le="0.005", "2.0"
    cumulative += per_bucket[-1]
    buckets.append(("+Inf", cumulative))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


class DaemonCollector(Collector):
    """Frames, particles, rejects, queues, batches, inference latency, publishers, alarms."""

    def __init__(self, view: MonitorView) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        view = self._view
        load = view.pipeline_load()
        yield from self._info(view)
        yield from self._recorded(view)
        yield from self._queues(load)
        yield from self._inference(load)
        yield from self._publishers(view)
        yield from self._probes(view)

    def _info(self, view: MonitorView) -> Iterator[Metric]:
        manifest = view.manifest
        info = InfoMetricFamily(f"{PREFIX}_build", "Daemon version and the model it runs.")
        info.add_metric(
            [],
            {
                "version": __version__,
                "model": manifest.name,
                "model_version": manifest.version,
                "model_sha256": manifest.onnx_sha256,
                "backend": view.backend_name,
            },
        )
        yield info
        ready = GaugeMetricFamily(
            f"{PREFIX}_ready", "1 when the model is loaded, sources alive, publishers connected."
        )
        ready.add_metric([], float(all(check.ok for check in readiness_checks(view))))
        yield ready

    def _recorded(self, view: MonitorView) -> Iterator[Metric]:
        counts = view.recorded_counts()
        frames = CounterMetricFamily(
            f"{PREFIX}_frames",
            "Frames recorded, by probe and status (ok, rejected by the quality gate, error).",
            labels=["probe", "status"],
        )
        for probe in view.probe_ids:
            for status in ("ok", "rejected", "error"):
                frames.add_metric([probe, status], counts.frames.get((probe, status), 0))
        yield frames
        rejects = CounterMetricFamily(
            f"{PREFIX}_frame_rejects",
            "Frames not classified, by probe, status and reason (empty, out_of_focus, ...).",
            labels=["probe", "status", "reason"],
        )
        for (probe, status, reason), count in sorted(counts.problems.items()):
            rejects.add_metric([probe, status, reason], count)
        yield rejects
        particles = CounterMetricFamily(
            f"{PREFIX}_particles",
            "Particles classified with confidence, by probe and class.",
            labels=["probe", "class"],
        )
        for probe in view.probe_ids:
            for name in view.manifest.classes:
                particles.add_metric([probe, name], counts.particles.get((probe, name), 0))
        yield particles
        uncertain = CounterMetricFamily(
            f"{PREFIX}_uncertain_particles",
            "Particles below the model's confidence threshold, by probe.",
            labels=["probe"],
        )
        for probe in view.probe_ids:
            uncertain.add_metric([probe], counts.uncertain.get(probe, 0))
        yield uncertain
        ood = CounterMetricFamily(
            f"{PREFIX}_out_of_distribution_particles",
            "Particles rejected as out of distribution (not crystals the model knows), by probe.",
            labels=["probe"],
        )
        for probe in view.probe_ids:
            ood.add_metric([probe], counts.out_of_distribution.get(probe, 0))
        yield ood
        failures = CounterMetricFamily(
            f"{PREFIX}_store_write_failures",
            "Failed store writes, by reason (each retried with backoff, or written frame by"
            " frame); frames are not lost by them.",
            labels=["reason"],
        )
        for reason, count in sorted(counts.store_failures.items()):
            failures.add_metric([reason], count)
        yield failures
        yield GaugeMetricFamily(
            f"{PREFIX}_store_writable",
            "1 while the store accepts writes, 0 while writes fail and are being retried.",
            value=0 if view.store_problem() else 1,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_frames_unstorable",
            "Frames that could not be stored even as an error row (each logged).",
            value=counts.unstorable,
        )

    def _queues(self, load: PipelineLoad) -> Iterator[Metric]:
        gauges: list[tuple[str, str, float]] = [
            ("frame_queue_depth", "Frames waiting for a decode worker.", load.frames_queued),
            (
                "frame_queue_capacity",
                "Most frames the frame queue holds.",
                load.frame_queue_capacity,
            ),
            (
                "frames_in_flight",
                "Frames taken by a worker and not yet recorded.",
                load.frames_in_flight,
            ),
            (
                "batcher_queue_crops",
                "Crops waiting for inference in the micro-batcher.",
                load.crops_queued,
            ),
            (
                "batcher_queue_capacity",
                "Most crops the micro-batcher queue holds.",
                load.crop_queue_capacity,
            ),
        ]
        for name, documentation, value in gauges:
            gauge = GaugeMetricFamily(f"{PREFIX}_{name}", documentation)
            gauge.add_metric([], float(value))
            yield gauge
        dropped = CounterMetricFamily(
            f"{PREFIX}_frames_dropped",
            "Stream frames dropped because the frame queue was full.",
        )
        dropped.add_metric([], load.frames_dropped)
        yield dropped
        workers = GaugeMetricFamily(
            f"{PREFIX}_worker_processes", "Worker processes preparing frames (0: threads)."
        )
        workers.add_metric([], float(load.worker_processes))
        yield workers
        yield from _counters(
            (
                (
                    "worker_restarts",
                    "Worker processes that died and were replaced (each logged).",
                    load.worker_restarts,
                ),
                (
                    "worker_oversize_frames",
                    "Frames whose arrays outgrew a shared-memory slot and went pickled.",
                    load.worker_oversize_frames,
                ),
            )
        )

    def _inference(self, load: PipelineLoad) -> Iterator[Metric]:
        yield _histogram(
            f"{PREFIX}_inference_batch_size",
            "Crops per inference batch.",
            load.batch_sizes,
        )
        yield _histogram(
            f"{PREFIX}_inference_seconds",
            "Time the backend took per inference batch.",
            load.batch_seconds,
        )
        yield from _counters(
            (
                ("inference_crops", "Crops run through the backend.", load.inference_crops),
                ("inference_failures", "Inference batches that raised.", load.inference_failures),
            )
        )

    def _publishers(self, view: MonitorView) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{PREFIX}_publisher_connected",
            "1 when the publisher is connected.",
            labels=["publisher"],
        )
        backlog = GaugeMetricFamily(
            f"{PREFIX}_publish_backlog",
            "Messages waiting for the broker's acknowledgement.",
            labels=["publisher"],
        )
        dropped = CounterMetricFamily(
            f"{PREFIX}_publish_dropped",
            "Messages dropped because the bounded outbox was full.",
            labels=["publisher"],
        )
        for publisher in view.publishers():
            up.add_metric([publisher.name], float(publisher.ok))
            numbers = publisher.diagnostics
            if not numbers:
                continue
            backlog.add_metric([publisher.name], float(numbers.get("backlog", 0)))
            dropped.add_metric([publisher.name], float(numbers.get("dropped_total", 0)))
        yield up
        yield backlog
        yield dropped

    def _probes(self, view: MonitorView) -> Iterator[Metric]:
        now = view.now()
        age = GaugeMetricFamily(
            f"{PREFIX}_last_frame_age_seconds",
            "Seconds since the probe's newest frame (absent before the first).",
            labels=["probe"],
        )
        fraction = GaugeMetricFamily(
            f"{PREFIX}_class_fraction",
            "Share of a class among confident particles in a window (absent without particles).",
            labels=["probe", "class", "window"],
        )
        window_n = GaugeMetricFamily(
            f"{PREFIX}_window_particles",
            "Confident particles in a window.",
            labels=["probe", "window"],
        )
        alarm_active = GaugeMetricFamily(
            f"{PREFIX}_alarm_active",
            "1 while the alarm is active (acknowledged or not).",
            labels=["probe", "alarm", "priority"],
        )
        alarm_unacked = GaugeMetricFamily(
            f"{PREFIX}_alarm_unacknowledged",
            "1 while the alarm waits for an operator's acknowledgement.",
            labels=["probe", "alarm", "priority"],
        )
        for probe in view.probe_ids:
            reading = view.probe(probe)
            snapshot, last = reading.snapshot, reading.last_frame_ts
            if last is not None:
                age.add_metric([probe], max(0.0, now - last))
            for window, stats in snapshot["windows"].items():
                window_n.add_metric([probe, window], stats["n"])
                for name, cls in stats["classes"].items():
                    if cls["fraction"] is not None:
                        fraction.add_metric([probe, name, window], cls["fraction"])
            for alarm in view.alarm_states(probe):
                labels = [probe, alarm["alarm_id"], alarm["priority"]]
                alarm_active.add_metric(labels, float(alarm["active"]))
                alarm_unacked.add_metric(labels, float(not alarm["acknowledged"]))
        yield from (age, fraction, window_n, alarm_active, alarm_unacked)


class HttpCollector(Collector):
    """The HTTP server's own counters: connections, the ones it closed and why, accept
    errors, wrong tokens and throttled requests."""

    def __init__(self, counters: HttpCounters) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        counters = self._counters
        connections = GaugeMetricFamily(f"{PREFIX}_http_connections", "Open HTTP connections.")
        connections.add_metric([], float(counters.open_connections))
        yield connections
        in_progress = GaugeMetricFamily(
            f"{PREFIX}_http_requests_in_progress",
            "HTTP connections busy with a request (the rest wait for one).",
        )
        in_progress.add_metric([], float(counters.requests_in_progress))
        yield in_progress
        dropped = CounterMetricFamily(
            f"{PREFIX}_http_connections_dropped",
            "HTTP connections the server closed, by reason: over_limit (refused, every "
            "connection busy), evicted (the longest idle one, to make room), idle_timeout, "
            "header_timeout, body_timeout.",
            labels=["reason"],
        )
        for reason in DROP_REASONS:  # fixed names: never iterates the live Counter
            dropped.add_metric([reason], counters.dropped.get(reason, 0))
        yield dropped
        yield from _counters(
            (
                (
                    "http_accept_errors",
                    "Failed accepts of HTTP connections (e.g. EMFILE: out of descriptors).",
                    counters.accept_errors,
                ),
                (
                    "http_token_failures",
                    "Wrong tokens offered at /login or as a Bearer header.",
                    counters.token_failures,
                ),
                (
                    "http_throttled",
                    "Requests answered 429 because their peer offered too many wrong tokens.",
                    counters.throttled,
                ),
            )
        )


def create_registry(view: MonitorView) -> CollectorRegistry:
    """A registry holding only this daemon's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(view))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of `registry`."""
    return generate_latest(registry)


def _counters(rows: Iterable[tuple[str, str, float]]) -> Iterator[Metric]:
    """One unlabelled counter per (name, documentation, value)."""
    for name, documentation, value in rows:
        counter = CounterMetricFamily(f"{PREFIX}_{name}", documentation)
        counter.add_metric([], value)
        yield counter
