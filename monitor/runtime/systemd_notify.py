"""A small sd_notify client: tells systemd we are ready, reloading, stopping, alive.

The protocol is one datagram of KEY=VALUE lines sent to the unix socket named in
$NOTIFY_SOCKET (a leading "@" means the abstract namespace). Outside systemd the
variable is unset and every call is a no-op, so the daemon never has to ask.
Sending never raises: a monitor that cannot reach systemd must keep monitoring.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


def _address(socket_path: str) -> str:
    return "\0" + socket_path[1:] if socket_path.startswith("@") else socket_path


class SystemdNotifier:
    """Sends notifications to the service manager at `socket_path` (None: do nothing)."""

    def __init__(self, socket_path: str | None) -> None:
        self.socket_path = socket_path or None
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed_once = False

    @classmethod
    def from_environment(cls) -> SystemdNotifier:
        """The notifier systemd asked for through $NOTIFY_SOCKET (read now, not at import)."""
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def send(self, lines: Mapping[str, str]) -> bool:
        """Send `lines` as one datagram; True when it was handed to the socket."""
        if self.socket_path is None or not lines:
            return False
        payload = "".join(f"{key}={value}\n" for key, value in lines.items()).encode()
        try:
            with self._lock:
                if self._socket is None:
                    self._socket = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                self._socket.sendto(payload, _address(self.socket_path))
        except OSError as exc:
            if not self._failed_once:  # once: a missing socket would otherwise flood the log
                self._failed_once = True
                log.warning("systemd_notify_failed", socket=self.socket_path, error=str(exc))
            return False
        return True

    def notify(self, **fields: str | int) -> bool:
        return self.send({key: str(value) for key, value in fields.items()})

    def ready(self, status: str | None = None) -> bool:
        lines = {"READY": "1"}
        if status is not None:
            lines["STATUS"] = status
        return self.send(lines)

    def reloading(self) -> bool:
        """RELOADING=1 with the monotonic timestamp systemd uses to match the reload."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send({"RELOADING": "1", "MONOTONIC_USEC": str(usec)})

    def stopping(self) -> bool:
        return self.send({"STOPPING": "1"})

    def status(self, text: str) -> bool:
        return self.send({"STATUS": text.replace("\n", " ")})

    def watchdog(self) -> bool:
        return self.send({"WATCHDOG": "1"})

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before the start (or stop) timeout fires."""
        return self.send({"EXTEND_TIMEOUT_USEC": str(round(seconds * 1_000_000))})

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """The systemd watchdog timeout in seconds, or None when no watchdog is meant for us.

    $WATCHDOG_USEC is set with WatchdogSec=; $WATCHDOG_PID, when set, names the process
    that must feed it (a child that inherited the environment must not).
    """
    env = os.environ if environ is None else environ
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid:
        try:
            if int(watchdog_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None
