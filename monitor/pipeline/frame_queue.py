"""The bounded frame queue between the sources and the pipeline's workers."""

from __future__ import annotations

import queue
import threading

import structlog

from monitor.sources.base import FrameItem

log = structlog.get_logger(__name__)


class FrameQueue:
    """Bounded queue between sources and workers.

    A folder source waits while it is full (its files wait safely on disk, and it
    offers the frame again); a live stream cannot wait, so the oldest queued frame is
    dropped, counted and logged to make room.
    """

    def __init__(self, maxsize: int) -> None:
        self._queue: queue.Queue[FrameItem] = queue.Queue(maxsize)
        self._closed = threading.Event()
        self.dropped = 0

    def put(self, item: FrameItem, *, block: bool) -> bool:
        """Queue `item`; whether it was queued.

        `block=True` waits up to 0.2 s for room and returns False if there is still none
        (the caller offers the frame again, checking meanwhile whether it should stop).
        `block=False` never waits: when full, the oldest queued frame is dropped (counted
        in `dropped`, logged as `frame_dropped`) and `item` is queued, so it returns True.
        After `close`, nothing is queued and it returns False.
        """
        if self._closed.is_set():
            return False
        if block:
            try:
                self._queue.put(item, timeout=0.2)
            except queue.Full:
                return False
            return True
        while True:
            try:
                self._queue.put_nowait(item)
                return True
            except queue.Full:
                try:
                    lost = self._queue.get_nowait()
                except queue.Empty:
                    continue
                self.dropped += 1
                log.warning("frame_dropped", probe=lost.probe, key=lost.key, why="queue full")

    def get(self, timeout: float) -> FrameItem | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def get_many(self, limit: int, timeout: float) -> list[FrameItem]:
        """The next frame (waiting up to `timeout`) and up to `limit - 1` more that are
        queued already: a busy pipeline takes frames in groups, an idle one one by one,
        never waiting to fill a group."""
        first = self.get(timeout)
        if first is None:
            return []
        items = [first]
        while len(items) < limit:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def close(self) -> None:
        self._closed.set()

    def qsize(self) -> int:
        return self._queue.qsize()
