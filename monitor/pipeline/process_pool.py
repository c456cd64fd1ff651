"""Worker processes for the frames' own work, with shared memory for their pixels.

Why processes: decode, quality gate, segmentation and preprocessing are numpy and
OpenCV calls with Python between them, so threads of one process serialise on the GIL
and the daemon uses about one core whatever the machine has. Each worker process runs
`frame_work.prepare_frame` on the frames it is sent and writes what it makes (the
model's input tensors, the frame, the crops' images when asked) into a slot of a
shared-memory arena of its own; only small descriptions travel through its pipe
(offsets, boxes, sizes), never pixel arrays. The daemon wraps a slot in numpy views,
hands the tensors to the micro-batcher and frees the slot once the batch that read
them has been delivered.

A frame whose file a worker can read itself (a folder source's file) goes as its path;
any other frame (the simulator, a camera stream) is read in the daemon and its pixels
written into the slot for the worker.

Frames travel in groups: one message, one slot and one reply for up to `MAX_GROUP`
frames (`prepare_group`), so a folder of small crop files pays the pipe, the pickling
and the reply thread once per group rather than once per crop. How many frames a
group may hold follows from the bytes recent frames used (`group_limit`), so large
frames still go one to a slot.

Failure design:
- A worker that dies (a decoder crash, the OOM killer) is restarted with a new arena;
  the frames it held raise `WorkerLostError`, and the pipeline tries each once more before
  recording it as failed, so a frame that kills workers is recorded, never lost.
- Workers ignore SIGTERM and SIGINT (systemd signals the whole control group; the
  daemon drains its queue first, then tells them to stop) and exit when the daemon's
  end of their pipe closes, so a SIGKILLed daemon leaves no worker behind.
- The arena is unlinked as soon as its worker has mapped it: nothing is left in
  /dev/shm whatever kills whom.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import structlog

from monitor.config.exit_codes import EX_UNAVAILABLE
from monitor.config.settings import ProbeConfig
from monitor.config.startup_error import StartupError
from monitor.manifest import InputSpec
from monitor.pipeline.frame_work import (
    FrameReadError,
    PreparedFrame,
    prepare_frame,
    probe_stages,
    read_frame,
)

log = structlog.get_logger(__name__)

ALIGN = 64  # bytes: each array in a slot starts on a cache line
READY_TIMEOUT_S = 60.0
RESTART_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)
NO_WORKER_TIMEOUT_S = 30.0
STUCK_AFTER_S = 60.0  # one frame, decode to tensors, takes milliseconds
STUCK_CHECK_S = 1.0
# What frames' `read` callables live in, imported when a worker starts: unpickling one
# must never import (an import opens files, which a process out of descriptors cannot).
WORKER_IMPORTS = ("monitor.sources.folder",)
# Frames per message at most: enough to amortise the pipe and fill a batch from a few
# groups, few enough that the workers share a burst evenly.
MAX_GROUP = 16


class WorkerLostError(Exception):
    """The worker process preparing a frame died before answering."""


# An array's place in a slot: (offset, shape, dtype string). An array that did not fit
# travels pickled instead (counted in PoolStats.oversize).
ArrayRef = tuple[int, tuple[int, ...], str]
Placed = ArrayRef | np.ndarray


@dataclass
class PoolStats:
    restarts: int = 0
    oversize: int = 0
    """Frames whose arrays outgrew a slot and were sent pickled (raise batcher.slot_mib)."""


@dataclass
class PreparedHandle:
    """A prepared frame whose arrays may live in a slot; `release` frees the slot
    (call it once nothing reads `frame.tensors` any more)."""

    frame: PreparedFrame
    release: Callable[[], None]


@dataclass(frozen=True)
class FrameRequest:
    """One frame to prepare: read by the worker (`read`, a picklable callable) or
    given (`grey`, read in the daemon)."""

    probe: str
    read: Callable[[], np.ndarray] | None
    grey: np.ndarray | None = None


FrameResult = PreparedFrame | FrameReadError | RuntimeError
"""A frame of a group: prepared, unreadable, or failed in the worker (the message)."""


@dataclass
class PreparedGroup:
    """A group's frames in the order asked, whose arrays may live in one slot;
    `release` frees the slot (once nothing reads any frame's `tensors` any more)."""

    results: list[FrameResult]
    release: Callable[[], None]


# ---------------------------------------------------------------- the worker process


class _SlotWriter:
    """Hands out arrays from one slot, front to back; np.empty once the slot is full."""

    def __init__(self, buffer: memoryview, start: int, end: int) -> None:
        self.buffer = buffer
        self.cursor = start
        self._end = end
        self.placed: dict[int, ArrayRef] = {}
        self.overflowed = False

    def allocate(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        offset = -(-self.cursor // ALIGN) * ALIGN
        if offset + nbytes > self._end:
            self.overflowed = True
            return np.empty(shape, dtype)
        array = array_at(self.buffer, offset, shape, dtype)
        self.cursor = offset + nbytes
        self.placed[id(array)] = (offset, tuple(shape), dtype.str)
        return array

    def ref(self, array: np.ndarray) -> Placed:
        return self.placed.get(id(array), array)


def array_at(
    buffer: memoryview, offset: int, shape: tuple[int, ...], dtype: np.dtype[Any]
) -> np.ndarray:
    """An array over `buffer`'s bytes from `offset`, holding the buffer exported while
    it lives. np.frombuffer keeps the export; np.ndarray(buffer=...) does not (it keeps
    only the mmap object), so an arena closed under such a view unmaps memory still in
    use and the next read is a SIGSEGV. With the export held, closing raises BufferError
    instead and the mapping stays until the last view goes."""
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(buffer, dtype, count=count, offset=offset).reshape(shape)


def _attach(name: str) -> SharedMemory:
    """Map the daemon's arena without registering it with the resource tracker (before
    Python 3.13 attaching registers it, and the tracker would unlink and warn)."""
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return SharedMemory(name=name)
    finally:
        resource_tracker.register = register


def _serve(conn: Connection, arena_name: str, slot_bytes: int, probes: list[ProbeConfig]) -> None:
    """The worker process's loop: one group of frames at a time, in the order sent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _cv2_threads_one()
    for module in WORKER_IMPORTS:
        importlib.import_module(module)
    arena = _attach(arena_name)
    buffer = arena.buf
    assert buffer is not None
    stages = probe_stages(probes)
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                return  # the daemon is gone
            # A message that cannot be unpickled (an import failing for want of
            # descriptors, say) ends the worker loudly: the daemon sees a death, replaces
            # it and tries the frame once more.
            message = pickle.loads(data)
            if message is None:
                return
            if message[0] == "probes":
                stages = probe_stages(message[1])
                continue
            _, job, slot, spec, with_images, frames = message
            reply = _prepare_group(
                buffer, slot * slot_bytes, (slot + 1) * slot_bytes, stages=stages,
                frames=frames, spec=spec, with_images=with_images,
            )  # fmt: skip
            try:
                conn.send((job, reply))
            except (BrokenPipeError, OSError):
                return
    finally:
        with contextlib.suppress(BufferError):  # a view may outlive the loop; exit frees all
            arena.close()


def _cv2_threads_one() -> None:
    """One OpenCV thread per worker process: the processes are the parallelism."""
    import cv2  # noqa: PLC0415  (the worker's own import)

    cv2.setNumThreads(1)


def _prepare_group(
    buffer: memoryview,
    start: int,
    end: int,
    *,
    stages: dict[str, Any],
    frames: list[tuple[str, Callable[[], np.ndarray] | None, Placed | None]],
    spec: InputSpec,
    with_images: bool,
) -> list[tuple[Any, ...]]:
    """Prepare each frame of a group into one slot, after the inputs the daemon placed
    there; one reply per frame, each ending with the bytes the frame used and whether
    any of its arrays outgrew the slot."""
    inputs_end = max(
        (ref[0] + _nbytes(ref) for _, _, ref in frames if isinstance(ref, tuple)), default=start
    )
    writer = _SlotWriter(buffer, inputs_end, end)
    replies = []
    for probe, read, grey_ref in frames:
        writer.overflowed = False
        before = writer.cursor
        try:
            reply = _prepare(
                writer, stages[probe], read=read, grey_ref=grey_ref, spec=spec,
                with_images=with_images,
            )  # fmt: skip
        except Exception as exc:  # one bad frame must never stop a worker
            reply = ("failed", f"internal: {type(exc).__name__}: {exc}")
        used = writer.cursor - before + (0 if grey_ref is None else _nbytes(grey_ref))
        replies.append((*reply, used, writer.overflowed))
    return replies


def _nbytes(ref: Placed) -> int:
    if isinstance(ref, np.ndarray):
        return int(ref.nbytes)
    _, shape, dtype = ref
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _prepare(
    writer: _SlotWriter,
    stages: Any,
    *,
    read: Callable[[], np.ndarray] | None,
    grey_ref: Placed | None,
    spec: InputSpec,
    with_images: bool,
) -> tuple[Any, ...]:
    if read is not None:
        try:
            decoded = read_frame(read)
        except FrameReadError as failed:
            return ("unreadable", failed.reason, failed.detail, failed.transient)
        grey = writer.allocate(decoded.shape, decoded.dtype)
        grey[...] = decoded
    else:
        assert grey_ref is not None
        grey = _view(writer.buffer, grey_ref)
        if isinstance(grey_ref, tuple):
            writer.placed[id(grey)] = grey_ref
    frame = prepare_frame(
        grey, stages, spec, with_crop_images=with_images, allocate=writer.allocate
    )
    if frame.status == "rejected":
        return ("rejected", frame.reason, writer.ref(grey))
    assert frame.tensors is not None
    images = None if frame.crop_images is None else [writer.ref(i) for i in frame.crop_images]
    return ("ok", writer.ref(grey), writer.ref(frame.tensors), frame.boxes, frame.sizes, images)


def _view(buffer: memoryview, ref: Placed) -> np.ndarray:
    if isinstance(ref, np.ndarray):
        return ref
    offset, shape, dtype = ref
    return array_at(buffer, offset, shape, np.dtype(dtype))


# ---------------------------------------------------------------- the daemon's side


class _Worker:
    """One worker process as the daemon sees it: its pipe, arena, free slots, and the
    frames sent and not yet answered."""

    def __init__(
        self, context: Any, index: int, slots: int, slot_bytes: int, probes: list[ProbeConfig]
    ) -> None:
        self.index = index
        self.slot_bytes = slot_bytes
        self.arena = SharedMemory(create=True, size=slots * slot_bytes)
        self.free: queue.Queue[int] = queue.Queue()
        for slot in range(slots):
            self.free.put(slot)
        self.pending: dict[int, Future[list[tuple[Any, ...]]]] = {}
        self.sent_at: dict[int, float] = {}  # monotonic time each pending frame was sent
        self.lock = threading.Lock()
        self.lost = False
        ours, theirs = context.Pipe(duplex=True)
        self.conn: Connection = ours
        self.process = context.Process(
            target=_serve,
            args=(theirs, self.arena.name, slot_bytes, probes),
            name=f"crystal-monitor-worker-{index}",
            daemon=True,
        )
        try:
            self.process.start()
        finally:
            theirs.close()  # the daemon keeps only its end: EOF when the worker dies
        try:
            if not self.conn.poll(READY_TIMEOUT_S):
                raise RuntimeError(
                    f"worker process {index} did not start within {READY_TIMEOUT_S:.0f} s"
                )
            hello = self.conn.recv()
            if hello[0] != "ready":
                raise RuntimeError(f"worker process {index} said {hello!r} instead of ready")
        except (EOFError, OSError) as exc:
            self._abort()
            raise RuntimeError(f"worker process {index} died while starting: {exc}") from exc
        except RuntimeError:
            self._abort()
            raise
        finally:
            self.arena.unlink()  # mapped by both: nothing is left in /dev/shm
        self.pid = int(hello[1])

    def _abort(self) -> None:
        self.process.kill()
        self.process.join(timeout=5.0)
        self.conn.close()

    def send(self, message: tuple[Any, ...] | None) -> None:
        with self.lock:
            self.conn.send(message)

    def close(self) -> None:
        try:
            self.arena.close()
        except BufferError:
            # A view is still alive (a batch not yet run): the mapping stays while it
            # does, and the arena object with it, so its __del__ never tries again.
            _STILL_MAPPED.append(self.arena)


_STILL_MAPPED: list[SharedMemory] = []


class FramePreparers:
    """The pool of worker processes, seen from the pipeline's threads: `prepare` sends a
    frame to the least busy worker and blocks until it is prepared."""

    def __init__(
        self,
        workers: int,
        probes: Sequence[ProbeConfig],
        *,
        slots_per_worker: int = 4,
        slot_bytes: int = 16 << 20,
    ) -> None:
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["monitor.pipeline.process_pool", *WORKER_IMPORTS])
        self._count = max(1, workers)
        self._slots = max(2, slots_per_worker)
        self._slot_bytes = slot_bytes
        self._probes = list(probes)
        self._workers: list[_Worker] = []
        self._retired: list[_Worker] = []
        self._jobs = 0
        self._jobs_lock = threading.Lock()
        self._restart_lock = threading.Lock()
        self._stopping = False
        self.stuck_after_s = STUCK_AFTER_S
        self.stats = PoolStats()
        # Bytes of slot the largest recent frame used, decaying (written by the
        # dispatch threads; a lost update only delays the next group's size).
        self._frame_bytes = slot_bytes // 2

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def size(self) -> int:
        return self._count

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self._workers]

    def start(self) -> None:
        """Start every worker; one that cannot start stops the others and says what to
        change (StartupError, exit 69: shared memory, descriptors or memory may be back
        at the next try)."""
        try:
            for index in range(self._count):
                self._workers.append(self._spawn(index))
        except (OSError, RuntimeError) as exc:
            self.stop(timeout=2.0)
            raise StartupError(
                "batcher.workers",
                f"cannot start worker process {len(self._workers)} of {self._count}: {exc}; "
                "check the free space in /dev/shm (batcher.slot_mib x 4 per worker), the "
                "descriptor limit and memory, or lower batcher.workers (batcher.processes = "
                "false runs the work on threads)",
                exit_code=EX_UNAVAILABLE,
            ) from exc

    def _spawn(self, index: int) -> _Worker:
        worker = _Worker(self._context, index, self._slots, self._slot_bytes, self._probes)
        threading.Thread(
            target=self._receive, args=(worker,), name=f"worker-{index}-replies", daemon=True
        ).start()
        log.info("worker_process_started", index=index, pid=worker.pid, arena=worker.arena.name)
        return worker

    def update_probes(self, probes: Sequence[ProbeConfig]) -> None:
        """New thresholds for frames sent from now on (a reload)."""
        self._probes = list(probes)
        for worker in list(self._workers):
            with contextlib.suppress(OSError):  # dying: its replacement gets these probes
                worker.send(("probes", self._probes))

    def group_limit(self) -> int:
        """How many frames the next group may hold: as many as fit in half a slot at the
        bytes the largest recent frame used (one until a frame has been measured)."""
        return max(1, min(MAX_GROUP, self._slot_bytes // 2 // max(1, self._frame_bytes)))

    def prepare(
        self,
        probe: str,
        read: Callable[[], np.ndarray] | None,
        grey: np.ndarray | None,
        spec: InputSpec,
        *,
        with_crop_images: bool,
    ) -> PreparedHandle:
        """Prepare one frame: read by the worker (`read`, a picklable callable) or given
        (`grey`, read here). Raises FrameReadError, WorkerLostError or RuntimeError."""
        group = self.prepare_group(
            [FrameRequest(probe, read, grey)], spec, with_crop_images=with_crop_images
        )
        result = group.results[0]
        if not isinstance(result, PreparedFrame):
            group.release()
            raise result
        return PreparedHandle(result, group.release)

    def prepare_group(
        self, frames: Sequence[FrameRequest], spec: InputSpec, *, with_crop_images: bool
    ) -> PreparedGroup:
        """Prepare frames in one worker and one slot, each on its own: a frame that is
        unreadable or fails is that frame's result. Raises WorkerLostError (for the
        whole group) when the worker dies on it."""
        worker, slot, future = self._send(frames, spec, with_crop_images)
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                worker.free.put(slot)

        try:
            results = [self._unpack(worker, reply) for reply in future.result()]
        except BaseException:
            release()
            raise
        return PreparedGroup(results, release)

    def _send(
        self, frames: Sequence[FrameRequest], spec: InputSpec, with_crop_images: bool
    ) -> tuple[_Worker, int, Future[list[tuple[Any, ...]]]]:
        """Send the frames to a live worker with a free slot. A worker that dies before
        they are sent costs them nothing: another is picked."""
        while True:
            worker = self._live_worker()
            try:
                slot = worker.free.get(timeout=0.2)
            except queue.Empty:
                continue  # all its slots wait for inference; look again (it may have died)
            try:
                refs = self._place_inputs(worker, slot, [frame.grey for frame in frames])
                future: Future[list[tuple[Any, ...]]] = Future()
                with self._jobs_lock:
                    self._jobs += 1
                    job = self._jobs
                message = (
                    "frames", job, slot, spec, with_crop_images,
                    [(f.probe, f.read, ref) for f, ref in zip(frames, refs, strict=True)],
                )  # fmt: skip
                with worker.lock:
                    if not worker.lost:
                        try:
                            worker.conn.send(message)
                        except OSError:
                            # Dead before its reader noticed (a broken pipe): the frames
                            # never reached it, so it costs them nothing.
                            worker.lost = True
                        else:
                            worker.pending[job] = future
                            worker.sent_at[job] = time.monotonic()
                            return worker, slot, future
            except BaseException:
                worker.free.put(slot)
                raise
            worker.free.put(slot)  # it died meanwhile: another one

    def _live_worker(self) -> _Worker:
        """The least busy worker that is not being replaced; waits while all are."""
        deadline = time.monotonic() + NO_WORKER_TIMEOUT_S
        while True:
            live = [worker for worker in self._workers if not worker.lost]
            if live:
                return min(live, key=lambda w: len(w.pending))
            if self._stopping or time.monotonic() > deadline:
                raise WorkerLostError("no worker process is running")
            time.sleep(0.05)

    def _place_inputs(
        self, worker: _Worker, slot: int, greys: list[np.ndarray | None]
    ) -> list[Placed | None]:
        """Write the frames read here into the front of the slot, one after another, in
        at most half of it; one that does not fit travels pickled (counted)."""
        buffer = worker.arena.buf
        assert buffer is not None
        cursor = start = slot * worker.slot_bytes
        refs: list[Placed | None] = []
        for grey in greys:
            if grey is None:
                refs.append(None)
                continue
            offset = -(-cursor // ALIGN) * ALIGN
            if offset + grey.nbytes > start + worker.slot_bytes // 2:
                self.stats.oversize += 1
                refs.append(np.ascontiguousarray(grey))
                continue
            view = array_at(buffer, offset, grey.shape, grey.dtype)
            view[...] = grey
            cursor = offset + grey.nbytes
            refs.append((offset, tuple(grey.shape), grey.dtype.str))
        return refs

    def _unpack(self, worker: _Worker, reply: tuple[Any, ...]) -> FrameResult:
        """One frame's reply as its result; counts the bytes it used and its overflow."""
        *answer, used, overflowed = reply
        self.stats.oversize += int(overflowed)
        self._frame_bytes = max(used, self._frame_bytes * 7 // 8)
        kind = answer[0]
        buffer = worker.arena.buf
        assert buffer is not None
        if kind == "unreadable":
            _, reason, detail, transient = answer
            return FrameReadError(reason, detail, transient)
        if kind == "failed":
            return RuntimeError(answer[1])
        if kind == "rejected":
            _, reason, grey_ref = answer
            return PreparedFrame("rejected", reason, _view(buffer, grey_ref).copy())
        _, grey_ref, tensors_ref, boxes, sizes, image_refs = answer
        images = None
        if image_refs is not None:
            images = tuple(_view(buffer, ref).copy() for ref in image_refs)
        return PreparedFrame(
            "ok",
            None,
            _view(buffer, grey_ref).copy(),  # the slot is reused; the dashboard keeps this
            _view(buffer, tensors_ref),  # read by the batcher before the slot is freed
            tuple(boxes),
            tuple(sizes),
            images,
        )

    def _receive(self, worker: _Worker) -> None:
        """Route a worker's replies to the frames waiting for them; on its death fail
        those frames with WorkerLostError and start a replacement."""
        while True:
            try:
                if not worker.conn.poll(STUCK_CHECK_S):
                    self._kill_if_stuck(worker)
                    continue
                reply = worker.conn.recv()
            except (EOFError, OSError):
                break
            with worker.lock:
                future = worker.pending.pop(reply[0], None)
                worker.sent_at.pop(reply[0], None)
            if future is not None:
                future.set_result(reply[1])
        with worker.lock:
            worker.lost = True
            waiting = list(worker.pending.values())
            worker.pending.clear()
            worker.sent_at.clear()
        for future in waiting:
            future.set_exception(WorkerLostError(f"worker process {worker.index} died"))
        if self._stopping:
            return
        worker.process.join(timeout=1.0)
        log.error(
            "worker_process_died",
            index=worker.index,
            pid=worker.pid,
            exitcode=worker.process.exitcode,
            frames_held=len(waiting),  # each tried once more, then recorded as failed
        )
        self._restart(worker)

    def _kill_if_stuck(self, worker: _Worker) -> None:
        """A frame that takes a worker longer than STUCK_AFTER_S (a decoder in a loop) is
        ended by killing the worker: the frame then fails like any that kills a worker."""
        with worker.lock:
            oldest = min(worker.sent_at.values(), default=None)
        if oldest is not None and time.monotonic() - oldest > self.stuck_after_s:
            log.error(
                "worker_process_stuck", index=worker.index, pid=worker.pid,
                seconds=round(time.monotonic() - oldest, 1),
            )  # fmt: skip
            worker.process.kill()

    def _restart(self, dead: _Worker) -> None:
        """Start a replacement, backing off while starting fails (until stopped)."""
        attempt = 0
        while not self._stopping:
            time.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
            attempt += 1
            try:
                replacement = self._spawn(dead.index)
            except Exception:
                log.exception("worker_process_restart_failed", index=dead.index)
                continue
            with self._restart_lock:
                stopping = self._stopping
                self._workers = [replacement if w is dead else w for w in self._workers]
                self._retired.append(dead)
            self.stats.restarts += 1
            if stopping:  # stop() may have gone past it already
                with contextlib.suppress(OSError):
                    replacement.send(None)
            return

    def stop(self, timeout: float = 5.0) -> None:
        """Tell every worker to stop after the frames it holds; kill what remains."""
        with self._restart_lock:
            self._stopping = True
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.send(None)
        for worker in self._workers:
            worker.process.join(timeout=max(0.1, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.warning("worker_process_killed", index=worker.index, pid=worker.pid)
                worker.process.kill()
                worker.process.join(timeout=1.0)
            worker.conn.close()
        for worker in self._workers + self._retired:
            worker.close()
