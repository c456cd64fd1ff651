"""The seam between sources and the pipeline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class FrameItem:
    """One frame (or one crop file) ready to be read.

    `read` returns the 2-D uint8 image or raises DecodeError; it runs on a pipeline
    worker, not on the source's thread. `journal` says whether the key names a file
    whose processing must be remembered across restarts. `after_store` runs once the
    frame's row is committed (moving or deleting the file). `retry`, where the source
    can deliver the frame again (a file), is called by the worker when reading failed
    for a passing cause (EMFILE, EACCES, EIO); it returns False once the source has
    tried often enough, and the failure is then recorded. `portable_read` says that
    `read` pickles small (a module-level function and a path) and may run in a worker
    process, which then reads the file itself; otherwise the daemon reads the frame
    and shares its pixels with the worker.
    """

    probe: str
    key: str
    ts: float
    read: Callable[[], np.ndarray]
    journal: bool = True
    after_store: Callable[[], None] | None = field(default=None, compare=False)
    retry: Callable[[str], bool] | None = field(default=None, compare=False)
    attempt: int = 1
    portable_read: bool = False


class FrameSink(Protocol):
    """Where a source hands frames. Returns whether the frame was queued: `block=True`
    waits briefly for room and returns False when there is none (offer it again);
    `block=False` makes room by dropping the oldest queued frame (a live stream cannot
    wait); False once the sink is closed."""

    def put(self, item: FrameItem, *, block: bool) -> bool: ...


class Source(Protocol):
    probe_id: str

    def start(self, sink: FrameSink) -> None:
        """Begin delivering frames from a thread of the source's own."""
        ...

    def stop(self) -> None: ...

    def health(self) -> tuple[bool, str]:
        """(alive, reason) for readiness checks and logs."""
        ...
