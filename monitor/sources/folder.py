"""Folder source: the files probe vendor software writes into a folder.

Completeness: a file renamed into the folder is complete at once (write-then-rename
is atomic); a close-after-write event makes it complete after a short quiet time;
a file written in place without close events (network shares) is complete once its
size and mtime have not changed for `settle_time`. Every processed file is journaled
by the store, so a restart neither loses nor double-counts a file; a periodic rescan
catches missed events and a folder that vanished and came back.

Memory. The store's journal is the record of what was processed; the source asks it
(one indexed lookup per new name) and keeps in memory only the names of journaled
files still in the folder, forgotten at each rescan once the file is gone. With
`after = "move"` or `"delete"` that set stays small; with `"keep"` it is as large as
the folder. The journal is purged with the store's retention: a file found by a scan,
not journaled and older (by mtime) than the retention is skipped, not counted again.

A read that fails for a passing cause (EMFILE, EACCES, EIO) is tried again with
backoff, READ_RETRIES times over about ten minutes, before it is recorded as failed.

Frame times. `frame_time` says where a frame's time comes from: the time written in the
file name (else its mtime), the mtime, or its arrival (when this source first saw the
file). A name's or mtime's time further than `frame_time_tolerance` from the arrival is
not believed: an archived frame dropped into a live folder, or a probe PC whose clock is
off, would otherwise leave the probe stale (no frame in any window, the newest frame
hours old) while it classifies every frame. Such a frame gets its arrival time, and the
first one of each kind (too old, in the future) is logged, once per run, with the reason.
The replay does not come through here: it keeps the names' times (`find_recorded_frames`).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import queue
import re
import shutil
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import structlog
from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from monitor.config.settings import FolderSourceConfig
from monitor.config.startup_error import StartupError
from monitor.imaging.decode import (
    DEFAULT_LIMITS,
    DecodeError,
    DecodeLimits,
    decode_image,
    read_open_file,
)
from monitor.sources.base import FrameItem, FrameSink
from monitor.store import storable_text

log = structlog.get_logger(__name__)

CLOSE_QUIET_S = 0.05  # after a close-write, wait this long for a re-open before reading
_TICK_S = 0.05
READ_RETRIES = 12  # tries of a read failing with EMFILE, EACCES, EIO... before it counts
READ_RETRY_FIRST_S = 1.0  # then doubling, at most READ_RETRY_MAX_S: about 10 minutes in all
READ_RETRY_MAX_S = 60.0

_STAMP = re.compile(
    r"(?P<y>\d{4})-?(?P<mo>\d{2})-?(?P<d>\d{2})[T_ -]?(?P<h>\d{2})[-:]?(?P<mi>\d{2})[-:]?"
    r"(?P<s>\d{2})(?:[.,_](?P<frac>\d{1,6}))?"
)


def frame_time_from_name(name: str) -> float | None:
    """A UTC timestamp written into a file name (20261122T013300.250Z, 2026-11-22_01-33-00)."""
    match = _STAMP.search(name)
    if match is None:
        return None
    try:
        moment = datetime(
            int(match["y"]),
            int(match["mo"]),
            int(match["d"]),
            int(match["h"]),
            int(match["mi"]),
            int(match["s"]),
            tzinfo=UTC,
        )
    except ValueError:
        return None
    fraction = match["frac"]
    return moment.timestamp() + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


@dataclass
class _Candidate:
    """A file seen but not yet known to be complete."""

    signature: tuple[int, int] | None  # (size, mtime_ns) at last look
    changed_at: float  # monotonic time the signature last changed
    event_at: float  # monotonic time of the last event
    closed: bool = False  # a close-after-write event arrived


class _EventForwarder(FileSystemEventHandler):
    """Watchdog calls this on its own thread; hand events to the source's thread."""

    def __init__(self, events: queue.SimpleQueue[tuple[str, str]]) -> None:
        self._events = events

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            self._events.put(("moved", os.fsdecode(event.dest_path)))
        elif isinstance(event, FileClosedEvent):
            self._events.put(("closed", os.fsdecode(event.src_path)))
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            self._events.put(("changed", os.fsdecode(event.src_path)))


class FolderSource:
    """Watches one folder for one probe."""

    def __init__(
        self,
        probe_id: str,
        config: FolderSourceConfig,
        *,
        journaled: Callable[[Sequence[str]], set[str]],
        record_skipped: Callable[[list[str], str], None],
        limits: DecodeLimits = DEFAULT_LIMITS,
        retention_s: Callable[[], float] | None = None,
        read_retry_first_s: float = READ_RETRY_FIRST_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`journaled(keys)` answers which keys the store's journal holds; `retention_s()`
        is the store's retention (files older than it that a scan finds are skipped);
        `clock` is the daemon's, which times a file's arrival (frame times are in its
        time, as the windows are)."""
        self.probe_id = probe_id
        self._clock = clock
        self._config = config
        self._root = config.path
        self._root_prefix = os.path.join(str(config.path), "")
        self._journaled = journaled
        # Keys journaled (or handed on) whose files are still in the folder; see above.
        self._seen: set[str] = set()
        self._retention_s = retention_s
        self._read_retry_first_s = read_retry_first_s
        self._retries: dict[str, tuple[float, int]] = {}  # path -> (monotonic due, attempt)
        # A retried read keeps the frame time of its first try: set by a worker before
        # it queues the retry event, read here after that event.
        self._retry_times: dict[str, float] = {}
        self._arrivals: dict[str, float] = {}  # path -> first seen (by clock), until handed on
        # Frames whose name or mtime was too far from their arrival, by "too_old" and
        # "in_future"; each kind is logged at its first frame of the run.
        self.retimed: dict[str, int] = {"too_old": 0, "in_future": 0}
        self._record_skipped = record_skipped
        self._limits = limits
        # Where a file must really be to be read: links out of the folder are refused.
        self._read_within = None if config.follow_symlinks else str(config.path)
        self._patterns = [p.lower() for p in config.patterns]
        self._events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._candidates: dict[str, _Candidate] = {}  # seen, not yet known complete
        self._ready: deque[str] = deque()  # complete, waiting for room in the pipeline
        self._queued: set[str] = set()  # the paths in _ready
        self._next_settle_check = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._missing = False
        self._sink: FrameSink | None = None

    # -- lifecycle ------------------------------------------------------------

    def start(self, sink: FrameSink) -> None:
        """Watch from a thread. A missing folder is waited for (a share not mounted yet);
        one that is there but cannot be listed stops start-up, naming source.path."""
        problem = unlistable_folder_problem(self._root)
        if problem is not None:
            raise StartupError(f"source.path of probe {self.probe_id}", problem)
        self._sink = sink
        self._thread = threading.Thread(
            target=self._run, name=f"folder-{self.probe_id}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._stop_observer()

    @property
    def remembered_names(self) -> int:
        """Names of processed files held in memory (those still in the folder)."""
        return len(self._seen)

    def health(self) -> tuple[bool, str]:
        if self._missing:
            return False, f"folder {self._root} is missing"
        return True, "watching"

    # -- the source's thread --------------------------------------------------------

    def _run(self) -> None:
        self._missing = not self._root.is_dir()
        if self._missing:
            log.warning("probe_folder_missing", probe=self.probe_id, path=str(self._root))
        else:
            self._start_observer()
            self._take_backlog()
        next_rescan = time.monotonic() + self._config.rescan_interval
        next_folder_check = time.monotonic() + 1.0
        while not self._stop.is_set():
            self._drain_events(timeout=_TICK_S)
            now = time.monotonic()
            if now >= next_folder_check:
                next_folder_check = now + 1.0
                if self._check_folder():
                    next_rescan = now  # it came back: look at everything at once
            if now >= next_rescan and not self._missing:
                next_rescan = now + self._config.rescan_interval
                for path in self._unseen(list(self._scan()), forget_absent=True):
                    self._note(path, "rescan")
            self._requeue_due_retries(now)
            self._emit_complete()

    def _start_observer(self) -> None:
        observer = Observer()
        observer.schedule(
            _EventForwarder(self._events), str(self._root), recursive=self._config.recursive
        )
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)

    def _check_folder(self) -> bool:
        """Track the folder vanishing (a network share dropping); True when it is back."""
        present = self._root.is_dir()
        if not present and not self._missing:
            self._missing = True
            log.warning(
                "probe_folder_missing",
                probe=self.probe_id,
                path=str(self._root),
                action="retrying every second",
            )
            self._stop_observer()
        elif present and self._missing:
            self._missing = False
            log.info("probe_folder_back", probe=self.probe_id, path=str(self._root))
            self._stop_observer()
            self._start_observer()
            return True
        return False

    def _take_backlog(self) -> None:
        existing = sorted(self._unseen(list(self._scan())), key=self._sort_key)
        policy = self._config.backlog
        keep = existing
        if policy == "none":
            keep = []
        elif policy.startswith("newest:"):
            keep = existing[-int(policy.split(":")[1]) :] if existing else []
        skipped = [self._key(path) for path in existing if path not in set(keep)]
        if skipped:
            self._record_skipped(skipped, f"backlog={policy}")
            self._seen.update(skipped)
        log.info(
            "probe_backlog",
            probe=self.probe_id,
            found=len(existing),
            queued=len(keep),
            skipped=len(skipped),
            policy=policy,
        )
        for path in keep:
            self._note(path, "rescan")

    def _unseen(self, paths: list[str], *, forget_absent: bool = False) -> list[str]:
        """The paths of a scan not yet processed: neither in memory nor in the journal.

        With `forget_absent`, names of files no longer in the folder are dropped from
        memory (the journal still has them). Unjournaled files older than the store's
        retention are journaled as skipped: their entries were purged, they were
        counted long ago.
        """
        keys = {path: self._key(path) for path in paths}
        if forget_absent:
            self._seen.intersection_update(keys.values())
        unknown = [path for path, key in keys.items() if key not in self._seen]
        if not unknown:
            return []
        journaled = self._journaled([keys[path] for path in unknown])
        self._seen.update(journaled)
        fresh = [path for path in unknown if keys[path] not in journaled]
        retention = self._retention_s() if self._retention_s is not None else 0.0
        if retention > 0 and fresh:
            cutoff = time.time() - retention
            expired = [path for path in fresh if _mtime(path) < cutoff]
            if expired:
                expired_keys = [keys[path] for path in expired]
                self._record_skipped(expired_keys, "older_than_retention")
                self._seen.update(expired_keys)
                log.warning(
                    "probe_files_older_than_retention",
                    probe=self.probe_id,
                    skipped=len(expired),
                    retention_s=retention,
                    action="journaled as skipped, not counted",
                )
                fresh = [path for path in fresh if path not in set(expired)]
        return fresh

    def _drain_events(self, timeout: float) -> None:
        try:
            kind, path = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if kind.startswith("retry:"):
                self._schedule_retry(path, int(kind[len("retry:") :]))
            else:
                self._note(path, kind)
            try:
                kind, path = self._events.get_nowait()
            except queue.Empty:
                return

    def _note(self, path: str, kind: str) -> None:
        if not self._matches(os.path.basename(path)):  # hidden files are no frame
            return
        key = self._key(path)
        if path in self._queued or path in self._retries or key in self._seen:
            return
        if kind != "rescan" and path not in self._candidates and self._journaled([key]):
            self._seen.add(key)  # an event for a file processed before (a touch, a restart)
            return
        self._arrivals.setdefault(path, self._clock())
        if kind == "moved":
            # Renamed into the folder: complete by construction, hand on in arrival order.
            self._candidates.pop(path, None)
            self._queued.add(path)
            self._ready.append(path)
            return
        now = time.monotonic()
        candidate = self._candidates.get(path)
        if candidate is None:
            candidate = _Candidate(signature=_signature(path), changed_at=now, event_at=now)
            if kind == "rescan" and candidate.signature is not None:
                # Found by listing: already complete if untouched for the settle time.
                age = time.time() - candidate.signature[1] / 1e9
                candidate.changed_at = now - max(0.0, age)
            self._candidates[path] = candidate
        candidate.event_at = now
        if kind == "closed":
            candidate.closed = True
        elif kind == "changed":
            candidate.closed = False

    def _settle_candidates(self) -> None:
        """Move files that are now complete from the candidates to the ready queue."""
        now = time.monotonic()
        settled = []
        for path, candidate in self._candidates.items():
            if candidate.closed and now - candidate.event_at >= CLOSE_QUIET_S:
                settled.append(path)
                continue
            signature = _signature(path)
            if signature is None:
                # Vanished (dropped below), or unstat-able like a link loop: the reader
                # reports why.
                if os.path.lexists(path):
                    settled.append(path)
            elif signature != candidate.signature:
                candidate.signature = signature
                candidate.changed_at = now
            elif now - candidate.changed_at >= self._config.settle_time:
                settled.append(path)
        for path in [p for p in self._candidates if not os.path.lexists(p)]:
            del self._candidates[path]  # deleted or renamed away before completing
            self._arrivals.pop(path, None)
        for path in sorted(settled, key=self._sort_key):
            del self._candidates[path]
            self._queued.add(path)
            self._ready.append(path)

    def _emit_complete(self) -> None:
        now = time.monotonic()
        if self._candidates and now >= self._next_settle_check:
            self._next_settle_check = now + _TICK_S
            self._settle_candidates()
        while self._ready and not self._stop.is_set():
            path = self._ready[0]
            if not self._hand_on(path):
                return
            self._ready.popleft()
            self._queued.discard(path)

    def _hand_on(self, path: str, attempt: int = 1, ts: float | None = None) -> bool:
        """Offer one file to the pipeline (`ts`: its frame time, known when retried)."""
        key = self._key(path)
        if ts is None:
            arrived = self._arrivals.get(path)
            ts = self._frame_time(path, self._clock() if arrived is None else arrived)
        item = FrameItem(
            probe=self.probe_id,
            key=key,
            ts=ts,
            read=functools.partial(read_frame_file, path, self._limits, within=self._read_within),
            after_store=self._after_store(path),
            retry=functools.partial(self._request_retry, path, attempt, ts),
            attempt=attempt,
            portable_read=True,
        )
        assert self._sink is not None
        while not self._stop.is_set():
            if self._sink.put(item, block=True):
                self._seen.add(key)
                self._arrivals.pop(path, None)
                return True
        return False

    def _frame_time(self, path: str, arrived: float) -> float:
        """The frame's time by the `frame_time` policy; the arrival time where the name's
        or mtime's time is further than the tolerance from it (see the module's doc)."""
        policy = self._config.frame_time
        if policy == "arrival":
            return arrived
        name = os.path.basename(path)
        ts = frame_time_from_name(name) if policy == "name" else None
        told_by = "name"
        if ts is None:
            told_by = "mtime"
            signature = _signature(path)
            ts = signature[1] / 1e9 if signature else arrived
        offset = ts - arrived
        if abs(offset) <= self._config.frame_time_tolerance:
            return ts
        self._note_retimed(name, told_by, offset)
        return arrived

    def _note_retimed(self, name: str, told_by: str, offset: float) -> None:
        kind = "in_future" if offset > 0 else "too_old"
        self.retimed[kind] += 1
        if self.retimed[kind] > 1:
            return  # once per run: the first frame says what is wrong, the rest would flood
        if kind == "in_future":
            event = "probe_file_time_in_future"
            reason = f"the {told_by} says {offset:.0f} s after the file arrived"
            fix = "check the probe PC's clock"
        else:
            event = "probe_file_time_too_old"
            reason = f"the {told_by} says {-offset:.0f} s before the file arrived"
            fix = (
                "an archived frame dropped into the live folder, or the probe PC's clock is "
                "behind; raise frame_time_tolerance to keep the time of frames delivered late"
            )
        log.warning(
            event,
            probe=self.probe_id,
            example=name[:200],
            offset_s=round(offset, 1),
            tolerance_s=self._config.frame_time_tolerance,
            reason=reason,
            action=f"using the arrival time for such frames (logged once per run); {fix}",
        )

    # -- retries of reads that failed for a passing cause ------------------------------

    def _request_retry(self, path: str, attempt: int, ts: float, detail: str) -> bool:
        """Called by a worker (any thread): deliver `path` again later, or False when
        it has been tried READ_RETRIES times and the failure should be recorded."""
        if attempt >= READ_RETRIES or self._stop.is_set():
            return False
        self._retry_times[path] = ts
        self._events.put((f"retry:{attempt + 1}", path))
        return True

    def _schedule_retry(self, path: str, attempt: int) -> None:
        delay = min(READ_RETRY_MAX_S, self._read_retry_first_s * 2 ** (attempt - 2))
        self._retries[path] = (time.monotonic() + delay, attempt)
        if attempt == 2:
            log.warning(
                "probe_file_read_retrying",
                probe=self.probe_id,
                path=path,
                first_retry_in_s=delay,
                retries=READ_RETRIES - 1,
            )

    def _requeue_due_retries(self, now: float) -> None:
        due = [path for path, (at, _) in self._retries.items() if at <= now]
        for path in due:
            _, attempt = self._retries[path]
            if not self._hand_on(path, attempt, self._retry_times.get(path)):
                return  # stopping, or the queue is full: try again next tick
            del self._retries[path]
            self._retry_times.pop(path, None)

    def _after_store(self, path: str) -> Callable[[], None] | None:
        policy = self._config.after
        if policy == "keep":
            return None

        def move_or_delete() -> None:
            try:
                if policy == "delete":
                    os.unlink(path)
                else:
                    assert self._config.done_dir is not None
                    target = self._config.done_dir / os.path.relpath(path, self._root)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(path, target)
            except OSError as exc:
                log.warning("probe_file_not_moved", probe=self.probe_id, path=path, error=str(exc))

        return move_or_delete

    # -- helpers ---------------------------------------------------------------------

    def _scan(self) -> Iterator[str]:
        def failed(folder: str, exc: OSError) -> None:
            log.warning("probe_scan_failed", probe=self.probe_id, path=folder, error=str(exc))

        return list_frame_files(
            str(self._root), self._patterns, recursive=self._config.recursive, on_error=failed
        )

    def _matches(self, name: str) -> bool:
        return is_frame_name(name, self._patterns)

    def _key(self, path: str) -> str:
        """The file's name relative to the folder, as the journal stores it (a name that
        is not valid UTF-8 gets backslash escapes, the same ones every time)."""
        prefix = self._root_prefix
        if path.startswith(prefix):
            key = path[len(prefix) :]  # the common case, without relpath's normalising
        else:
            key = Path(os.path.relpath(path, self._root)).as_posix()
        return storable_text(key)

    @staticmethod
    def _sort_key(path: str) -> str:
        return os.path.basename(path)


def unlistable_folder_problem(folder: Path) -> str | None:
    """Why `folder`, which exists, cannot be watched (with the fix); None when it can be
    listed or is missing."""
    try:
        with os.scandir(folder):
            return None
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return f"{folder} is not a folder (point it at the folder the probe software writes into)"
    except OSError as exc:
        return (
            f"cannot list {folder}: {exc.strerror or exc} (give the daemon's user read and "
            "execute permission on it; under systemd also check ReadOnlyPaths=)"
        )


def is_frame_name(name: str, patterns: Sequence[str]) -> bool:
    """Whether a file name is a frame the source reads: not hidden (a `.name.part` being
    written), matching one of `patterns`, compared in lower case."""
    if name.startswith("."):
        return False
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in patterns)


def list_frame_files(
    root: str,
    patterns: Sequence[str],
    *,
    recursive: bool,
    on_error: Callable[[str, OSError], None],
) -> Iterator[str]:
    """Paths of the frame files under `root` (sub-folders only with `recursive`; linked
    sub-folders are not entered). A folder that cannot be listed goes to `on_error`."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        if recursive:
                            stack.append(entry.path)
                    elif is_frame_name(entry.name, patterns):
                        yield entry.path
        except OSError as exc:
            on_error(folder, exc)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return time.time()  # unknown: never old enough to skip


def _signature(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_size, info.st_mtime_ns)


def read_frame_file(path: str, limits: DecodeLimits, *, within: str | None = None) -> np.ndarray:
    """Open once, refuse FIFOs, devices and files over the byte cap, decode.

    With `within`, the file must really be inside that folder: a symbolic link (or a
    linked sub-folder) leading out of it is refused as symlink_outside_folder before
    anything is read or decoded.
    """
    try:
        if within is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        else:
            fd = _open_within(path, within)
    except OSError as exc:
        raise DecodeError("unreadable", exc.strerror or str(exc)) from exc
    try:
        data = read_open_file(fd, limits)
    finally:
        os.close(fd)
    return decode_image(data, limits)


# Linux: where an open descriptor really is, from the kernel (see _open_within).
_HAVE_PROC_FD = hasattr(os, "O_PATH") and os.path.isdir("/proc/self/fd")


def _open_within(path: str, folder: str) -> int:
    """Open `path` for reading only if the file it leads to lies inside `folder`.

    Race-free on Linux: the path is resolved once into an O_PATH descriptor (which
    opens nothing, so a link to a device or FIFO has no effect), the kernel says where
    that descriptor really is, and the file is then opened through that same
    descriptor, so a link swapped in between cannot redirect the read.
    """
    real_folder = os.path.realpath(folder)
    if not _HAVE_PROC_FD:
        real = os.path.realpath(path)
        _check_within(path, real, real_folder)
        return os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    handle = os.open(path, os.O_PATH)
    try:
        _check_within(path, os.readlink(f"/proc/self/fd/{handle}"), real_folder)
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise DecodeError("not_a_file", "not a regular file")
        return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NONBLOCK)
    finally:
        os.close(handle)


def _check_within(path: str, real: str, real_folder: str) -> None:
    if real == real_folder or real.startswith(os.path.join(real_folder, "")):
        return
    raise DecodeError(
        "symlink_outside_folder",
        f"{path} leads to {real}, outside the watched folder {real_folder} "
        "(set follow_symlinks = true in the probe's source to read such links)",
    )
