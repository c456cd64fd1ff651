"""Stop and reload requests from signal handlers, acted on by the main thread."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


class ControlRequests:
    """The handlers only set flags: an Event's lock is not reentrant, and a handler runs
    on the main thread, which may be inside Event.wait."""

    def __init__(self) -> None:
        self._stop_requested = False
        self._reload_requested = False

    def request_stop(self) -> None:
        self._stop_requested = True

    def request_reload(self) -> None:
        self._reload_requested = True

    def wait(self, config_path: Path | None, reload: Callable[[Path], object]) -> None:
        """Until a stop is requested; calls `reload(config_path)` when asked to (SIGHUP)."""
        while not self._stop_requested:
            if self._reload_requested:
                self._reload_requested = False
                if config_path is not None:
                    reload(config_path)
                else:
                    log.warning("config_reload_ignored", why="no configuration file to re-read")
            time.sleep(0.2)
