"""Folder source: the files probe vendor software writes into a folder.

Completeness: a file renamed into the folder is complete at once (write-then-rename
is atomic); a close-after-write event makes it complete after a short quiet time;
a file written in place without close events (network shares) is complete once its
size and mtime have not changed for `settle_time`. Every processed file is journaled
by the store, so a restart neither loses nor double-counts a file; a periodic rescan
catches missed events and a folder that vanished and came back.
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
from collections.abc import Callable, Iterator
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

from monitor.config import FolderSourceConfig
from monitor.decode import DEFAULT_LIMITS, DecodeError, DecodeLimits, decode_image
from monitor.sources.base import FrameItem, FrameSink

log = structlog.get_logger(__name__)

CLOSE_QUIET_S = 0.05  # after a close-write, wait this long for a re-open before reading
_TICK_S = 0.05

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
        journaled: set[str],
        record_skipped: Callable[[list[str], str], None],
        limits: DecodeLimits = DEFAULT_LIMITS,
    ) -> None:
        self.probe_id = probe_id
        self._config = config
        self._root = config.path
        self._root_prefix = os.path.join(str(config.path), "")
        self._seen = set(journaled)
        self._record_skipped = record_skipped
        self._limits = limits
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
                for path in self._scan():
                    self._note(path, "rescan")
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
        existing = sorted(self._scan(), key=self._sort_key)
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

    def _drain_events(self, timeout: float) -> None:
        try:
            kind, path = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._note(path, kind)
            try:
                kind, path = self._events.get_nowait()
            except queue.Empty:
                return

    def _note(self, path: str, kind: str) -> None:
        name = os.path.basename(path)
        if name.startswith(".") or not self._matches(name):
            return
        if path in self._queued or self._key(path) in self._seen:
            return
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

    def _hand_on(self, path: str) -> bool:
        key = self._key(path)
        name = os.path.basename(path)
        ts = frame_time_from_name(name)
        if ts is None:
            signature = _signature(path)
            ts = signature[1] / 1e9 if signature else time.time()
        item = FrameItem(
            probe=self.probe_id,
            key=key,
            ts=ts,
            read=functools.partial(_read_regular_file, path, self._limits),
            after_store=self._after_store(path),
        )
        assert self._sink is not None
        while not self._stop.is_set():
            if self._sink.put(item, block=True):
                self._seen.add(key)
                return True
        return False

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
        stack = [str(self._root)]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            if self._config.recursive:
                                stack.append(entry.path)
                        elif (
                            not entry.name.startswith(".")
                            and self._matches(entry.name)
                            and self._key(entry.path) not in self._seen
                        ):
                            yield entry.path
            except OSError as exc:
                log.warning("probe_scan_failed", probe=self.probe_id, path=folder, error=str(exc))

    def _matches(self, name: str) -> bool:
        lowered = name.lower()
        return any(fnmatch.fnmatchcase(lowered, pattern) for pattern in self._patterns)

    def _key(self, path: str) -> str:
        prefix = self._root_prefix
        if path.startswith(prefix):
            return path[len(prefix) :]  # the common case, without relpath's normalising
        return Path(os.path.relpath(path, self._root)).as_posix()

    @staticmethod
    def _sort_key(path: str) -> str:
        return os.path.basename(path)


def _signature(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_size, info.st_mtime_ns)


def _read_regular_file(path: str, limits: DecodeLimits) -> np.ndarray:
    """Open once, refuse FIFOs and devices (reading one would block a worker), decode."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise DecodeError("unreadable", exc.strerror or str(exc)) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DecodeError("not_a_file", "not a regular file")
        if info.st_size > limits.max_pixels * 8:
            raise DecodeError("file_too_large", f"{info.st_size:,} bytes")
        chunks = []
        while chunk := os.read(fd, max(info.st_size, 1 << 16)):
            chunks.append(chunk)
    except OSError as exc:
        raise DecodeError("unreadable", exc.strerror or str(exc)) from exc
    finally:
        os.close(fd)
    return decode_image(b"".join(chunks), limits)
