"""The one micro-batcher shared by all probes.

Workers submit the prepared crops of a frame with a callback and move on to the next
frame; one thread packs requests into batches of up to `max_batch` crops, waiting at
most `max_wait` for a batch to fill, runs the backend and hands each request its rows.
The queue is bounded in crops: a full queue blocks the submitting worker, which in turn
slows the frame queue, so memory never grows without bound.

A model swap (a reload) hands new requests another backend. A batch holds the requests
of one backend only, and a backend `retire`d by the swap is closed once the last request
prepared for it has been delivered, so no crop is lost or run twice across the swap.
"""

from __future__ import annotations

import bisect
import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from monitor.inference.backend import Backend, PendingResult, PipelinedBackend

log = structlog.get_logger(__name__)

ResultCallback = Callable[[np.ndarray | None, str | None], None]


@dataclass
class _Request:
    crops: np.ndarray  # (k, 3, S, S) with k <= max_batch
    on_done: ResultCallback
    backend: Backend  # the model the crops were prepared for; a batch never mixes two


class _FrameJob:
    """Reassembles the probabilities of a frame whose crops were split across requests."""

    def __init__(self, parts: int, on_done: ResultCallback) -> None:
        self._lock = threading.Lock()
        self._remaining = parts
        self._rows: list[np.ndarray | None] = [None] * parts
        self._error: str | None = None
        self._on_done = on_done

    def part_done(self, index: int, rows: np.ndarray | None, error: str | None) -> None:
        with self._lock:
            self._rows[index] = rows
            self._error = self._error or error
            self._remaining -= 1
            finished = self._remaining == 0
        if finished:
            if self._error is not None:
                self._on_done(None, self._error)
            else:
                self._on_done(np.concatenate([r for r in self._rows if r is not None]), None)


# Seconds per inference batch: 1 ms (a GPU) to 10 s (a stalled CPU).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def batch_size_buckets(max_batch: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to `max_batch`, which is always a bound of its own."""
    bounds = {float(max_batch)}
    size = 1
    while size < max_batch:
        bounds.add(float(size))
        size *= 2
    return tuple(sorted(bounds))


class BucketCounts:
    """Observations counted into fixed buckets, for a Prometheus histogram at scrape time.

    One list index and two additions per observation (per batch, not per crop), so the
    batcher needs no metrics library; written by the batcher thread only.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is above every bound
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value

    def read(self) -> tuple[list[int], float]:
        """(count per bucket, not cumulative, the last above every bound; sum)."""
        return list(self._counts), self._sum


@dataclass
class BatcherStats:
    batches: int = 0
    crops: int = 0
    infer_seconds: float = 0.0
    failures: int = 0


class MicroBatcher:
    def __init__(
        self, backend: Backend, *, max_batch: int, max_wait_s: float, queue_crops: int
    ) -> None:
        self._backend = backend
        self._max_batch = max_batch
        self._max_wait = max_wait_s
        self._capacity = max(queue_crops, max_batch)
        self._queue: deque[_Request] = deque()
        self._queued_crops = 0
        # Requests submitted and not yet delivered, per backend (by identity), and the
        # backends to close once theirs reach zero.
        self._outstanding: dict[int, int] = {}
        self._retiring: dict[int, Backend] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self.stats = BatcherStats()
        self.batch_size_histogram = BucketCounts(batch_size_buckets(max_batch))
        self.latency_histogram = BucketCounts(LATENCY_BUCKETS_S)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued (within `timeout`), then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout)

    @property
    def queued_crops(self) -> int:
        return self._queued_crops

    def submit(
        self, crops: np.ndarray, on_done: ResultCallback, *, backend: Backend | None = None
    ) -> bool:
        """Queue a frame's crops for `backend` (default: the one the batcher was built
        with); blocks while the queue is full; False once stopping."""
        if len(crops) == 0:
            on_done(np.empty((0, 0), np.float32), None)
            return True
        target = backend or self._backend
        pieces = [crops[i : i + self._max_batch] for i in range(0, len(crops), self._max_batch)]
        job = _FrameJob(len(pieces), on_done)
        for index, piece in enumerate(pieces):
            request = _Request(piece, functools.partial(job.part_done, index), target)
            with self._cond:
                while self._queued_crops + len(piece) > self._capacity and not self._stopping:
                    self._cond.wait(0.1)
                if self._stopping:
                    return False
                self._queue.append(request)
                self._queued_crops += len(piece)
                key = id(target)
                self._outstanding[key] = self._outstanding.get(key, 0) + 1
                self._cond.notify_all()
        return True

    def use_backend(self, backend: Backend) -> None:
        """The default backend from now on (after a model swap)."""
        self._backend = backend

    def retire(self, backend: Backend) -> None:
        """Close `backend` once no submitted request waits for it (at once when none does)."""
        with self._cond:
            if self._outstanding.get(id(backend), 0) > 0:
                self._retiring[id(backend)] = backend
                return
        self._close_retired(backend)

    def _close_retired(self, backend: Backend) -> None:
        try:
            backend.close()
        except Exception:  # the new model runs already; a failed close is only logged
            log.exception("backend_close_failed", backend=backend.name)
        else:
            log.info("backend_retired", backend=backend.name)

    def _delivered(self, requests: list[_Request]) -> None:
        """Count requests off their backend; close a retired backend when it has none left."""
        closing: list[Backend] = []
        with self._cond:
            for request in requests:
                key = id(request.backend)
                left = self._outstanding.get(key, 0) - 1
                if left > 0:
                    self._outstanding[key] = left
                    continue
                self._outstanding.pop(key, None)
                retired = self._retiring.pop(key, None)
                if retired is not None:
                    closing.append(retired)
        for backend in closing:
            self._close_retired(backend)

    def _take_batch(self, *, block: bool = True) -> list[_Request]:
        """Requests for the next batch. `block=False` (a batch is in flight on a pipelined
        backend) takes what is queued now, or nothing, so the batch in flight is collected
        without waiting for this one to fill."""
        with self._cond:
            while not self._queue:
                if self._stopping or not block:
                    return []
                self._cond.wait(0.1)
            deadline = time.monotonic() + self._max_wait
            while self._queued_crops < self._max_batch and not self._stopping and block:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            taken: list[_Request] = []
            size = 0
            backend = self._queue[0].backend
            while (
                self._queue
                and size + len(self._queue[0].crops) <= self._max_batch
                and self._queue[0].backend is backend
            ):
                request = self._queue.popleft()
                taken.append(request)
                size += len(request.crops)
            self._queued_crops -= size
            self._cond.notify_all()
            return taken

    def _run(self) -> None:
        if isinstance(self._backend, PipelinedBackend):
            self._run_pipelined()
            return
        while True:
            requests = self._take_batch()
            if not requests:
                return
            batch = (
                requests[0].crops
                if len(requests) == 1
                else np.concatenate([r.crops for r in requests])
            )
            started = time.perf_counter()
            try:
                probabilities = requests[0].backend.infer(batch)
                error = None
            except Exception as exc:  # a failed batch must not kill the batcher
                probabilities = None
                error = self._failed(exc, len(batch))
            self._deliver(requests, len(batch), probabilities, error, started)

    def _run_pipelined(self) -> None:
        """Keep one batch in flight: submit batch N+1 before collecting batch N, so packing
        and copying the next batch overlap the GPU working on the current one."""
        in_flight: _InFlight | None = None
        while True:
            requests = self._take_batch(block=in_flight is None)
            submitted: _InFlight | None = None
            if requests:
                batch = (
                    requests[0].crops
                    if len(requests) == 1
                    else np.concatenate([r.crops for r in requests])
                )
                submitted = _InFlight(requests, len(batch), time.perf_counter())
                backend = requests[0].backend
                try:
                    if not isinstance(backend, PipelinedBackend):
                        raise TypeError(f"backend {backend.name} cannot pipeline batches")
                    submitted.pending = backend.submit(batch)
                except Exception as exc:  # a failed batch must not kill the batcher
                    submitted.error = self._failed(exc, len(batch))
            if in_flight is not None:
                self._collect(in_flight)
            elif not requests:
                return  # stopping, nothing queued and nothing in flight
            in_flight = submitted

    def _collect(self, flight: _InFlight) -> None:
        probabilities = None
        if flight.pending is not None:
            try:
                probabilities = flight.pending.wait()
            except Exception as exc:  # a failed batch must not kill the batcher
                flight.error = self._failed(exc, flight.size)
        self._deliver(flight.requests, flight.size, probabilities, flight.error, flight.started)

    def _failed(self, exc: Exception, crops: int) -> str:
        """Count and log a failed batch; the error its frames are answered with."""
        self.stats.failures += 1
        log.error("inference_failed", error=str(exc), crops=crops)
        return f"inference_failed: {exc}"

    def _deliver(
        self,
        requests: list[_Request],
        size: int,
        probabilities: np.ndarray | None,
        error: str | None,
        started: float,
    ) -> None:
        """Count the batch and hand each request its rows (or the error)."""
        elapsed = time.perf_counter() - started
        self.stats.infer_seconds += elapsed
        self.stats.batches += 1
        self.stats.crops += size
        self.latency_histogram.observe(elapsed)
        self.batch_size_histogram.observe(size)
        offset = 0
        try:
            for request in requests:
                count = len(request.crops)
                rows = None if probabilities is None else probabilities[offset : offset + count]
                offset += count
                request.on_done(rows, error)
        finally:
            self._delivered(requests)


@dataclass
class _InFlight:
    """A batch submitted to a pipelined backend and not yet collected."""

    requests: list[_Request]
    size: int
    started: float
    pending: PendingResult | None = None
    error: str | None = None
