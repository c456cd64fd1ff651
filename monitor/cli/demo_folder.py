"""The demo's probe folder, kept small: `make run` writes 3 frames/s of about 600 KB
each (6.5 GB an hour), so frames the daemon has recorded are deleted once they are older
than `demo --keep-frames` (a minute).

Only the demo does this. At a plant the probe's folder belongs to the vendor software;
what the daemon does with a stored file is the probe's `after` setting (keep, move or
delete). A frame is deleted only once the store's journal holds it, so an unrecorded
frame (the daemon behind, or stopped) always stays for the daemon to take.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from monitor.sources.folder import list_frame_files
from monitor.store import Store, StoreError, storable_text

log = structlog.get_logger(__name__)

PRUNE_INTERVAL_S = 10.0  # at most this long between passes


def prune_recorded_frames(
    folder: Path, probe: str, store: Store, patterns: Sequence[str], older_than: float
) -> int:
    """Delete the frame files in `folder` last modified before `older_than` (epoch
    seconds) whose keys the store's journal holds for `probe`; returns how many."""
    old: dict[str, str] = {}

    def unlistable(path: str, exc: OSError) -> None:
        log.warning("demo_folder_unlistable", path=path, error=str(exc))

    for path in list_frame_files(str(folder), patterns, recursive=False, on_error=unlistable):
        try:
            modified = os.stat(path).st_mtime
        except OSError:
            continue  # gone already
        if modified < older_than:
            old[storable_text(os.path.basename(path))] = path
    deleted = 0
    for key in store.journaled(probe, list(old)) if old else ():
        try:
            os.unlink(old[key])
            deleted += 1
        except FileNotFoundError:
            pass
    return deleted


class RecordedFramePruner:
    """Runs `prune_recorded_frames` on the demo probe's folder every few seconds, on a
    thread of its own, reading the daemon's store through a read-only handle."""

    def __init__(
        self,
        folder: Path,
        state_dir: Path,
        probe: str,
        patterns: Sequence[str],
        *,
        keep_s: float,
    ) -> None:
        """Recorded frames younger than `keep_s` stay, to look at or classify."""
        self._folder = folder
        self._state_dir = state_dir
        self._probe = probe
        self._patterns = tuple(patterns)
        self._keep_s = keep_s
        # Often enough that the folder holds little more than `keep_s` of frames.
        self._interval_s = max(1.0, min(PRUNE_INTERVAL_S, keep_s / 2))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="demo-pruner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        store: Store | None = None
        try:
            while not self._stop.wait(self._interval_s):
                if store is None:
                    store = self._open_store()
                    if store is None:
                        continue
                older_than = time.time() - self._keep_s
                try:
                    deleted = prune_recorded_frames(
                        self._folder, self._probe, store, self._patterns, older_than
                    )
                except (sqlite3.Error, OSError) as exc:  # try again at the next pass
                    log.warning("demo_frames_not_pruned", error=str(exc))
                    continue
                log.debug("demo_frames_pruned", deleted=deleted, folder=str(self._folder))
        finally:
            if store is not None:
                store.close()

    def _open_store(self) -> Store | None:
        """The daemon's store once it exists (the daemon creates it as it starts)."""
        try:
            return Store(self._state_dir, readonly=True)
        except (FileNotFoundError, StoreError):
            return None
