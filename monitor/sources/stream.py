"""Stream source: a camera stream through OpenCV (RTSP, HTTP, a video file, a device index).

Frames are capped at `max_fps`; a stream that fails is reopened with exponential
backoff. A live stream cannot wait, so when the pipeline is full the oldest queued
frame is dropped and counted (see FrameQueue). A video file ends at its last frame.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import structlog

from monitor.config.settings import StreamSourceConfig
from monitor.imaging.decode import to_grey_uint8
from monitor.sources.base import FrameItem, FrameSink

log = structlog.get_logger(__name__)


class StreamSource:
    def __init__(
        self, probe_id: str, config: StreamSourceConfig, *, clock: Callable[[], float]
    ) -> None:
        self.probe_id = probe_id
        self._config = config
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = False
        self._ended = False
        self.reconnects = 0
        self.dropped = 0

    def start(self, sink: FrameSink) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(sink,), name=f"stream-{self.probe_id}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def health(self) -> tuple[bool, str]:
        if self._ended:
            return False, "video file ended"
        return (self._connected, "streaming" if self._connected else "reconnecting")

    def _open(self) -> cv2.VideoCapture:
        url = self._config.url
        return cv2.VideoCapture(int(url)) if url.isdigit() else cv2.VideoCapture(url)

    def _run(self, sink: FrameSink) -> None:
        is_file = Path(self._config.url).is_file()
        backoff = self._config.reconnect_min
        sequence = 0
        min_gap = 1.0 / self._config.max_fps
        while not self._stop.is_set():
            capture = self._open()
            if not capture.isOpened():
                capture.release()
                log.warning("stream_unavailable", probe=self.probe_id, retry_in_s=backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._config.reconnect_max)
                self.reconnects += 1
                continue
            self._connected = True
            backoff = self._config.reconnect_min
            log.info("stream_connected", probe=self.probe_id)
            last_emit = 0.0
            while not self._stop.is_set():
                ok, frame = capture.read()
                if not ok or frame is None:
                    break
                now = time.monotonic()
                if now - last_emit < min_gap:
                    if is_file:
                        # A file delivers frames as fast as we read them: pace it.
                        self._stop.wait(min_gap - (now - last_emit))
                    else:
                        continue
                last_emit = time.monotonic()
                grey = to_grey_uint8(np.asarray(frame))
                item = FrameItem(
                    probe=self.probe_id,
                    key=f"stream-{sequence:010d}",
                    ts=self._clock(),
                    read=functools.partial(_same, grey),
                    journal=False,
                )
                if not sink.put(item, block=False):
                    self.dropped += 1
                sequence += 1
            capture.release()
            self._connected = False
            if is_file:
                self._ended = True
                log.info("stream_ended", probe=self.probe_id, frames=sequence)
                return
            log.warning("stream_lost", probe=self.probe_id, retry_in_s=backoff)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self._config.reconnect_max)
            self.reconnects += 1


def _same(image: np.ndarray) -> np.ndarray:
    """The frame is already in memory: reading it is returning it."""
    return image
