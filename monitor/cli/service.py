"""The daemon in the foreground, the way systemd runs it: until SIGTERM or SIGINT, with
SIGHUP re-reading the configuration file."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

import structlog

from monitor.config.settings import Settings
from monitor.daemon import Daemon
from monitor.publishers.factory import create_publishers
from monitor.runtime.control import ControlRequests

log = structlog.get_logger(__name__)


def run_daemon(settings: Settings, config_path: Path | None = None) -> int:
    daemon = Daemon(settings, publishers=create_publishers(settings))
    requests = ControlRequests()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        requests.request_stop()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        requests.request_reload()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Ignored until the daemon can reload: systemd's reload during start-up must not kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    daemon.start()
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        requests.wait(config_path, daemon.reloader.reload)
    finally:
        daemon.stop()
    return 0
