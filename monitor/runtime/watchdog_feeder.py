"""Feeds the systemd watchdog only while the pipeline proves it is making progress.

A thread that merely sends WATCHDOG=1 on a timer would keep a deadlocked pipeline
"alive" forever; here each ping is earned: either nothing is waiting (an idle probe is
not a stuck pipeline) or a frame finished recently. When work waits and nothing has
finished for `stall_after_s`, the pings stop and systemd restarts the service.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from monitor.runtime.systemd_notify import SystemdNotifier

log = structlog.get_logger(__name__)

STATUS_INTERVAL_S = 5.0


@dataclass(frozen=True)
class WatchdogPolicy:
    """Pure decision: feed or not, from monotonic times and the amount of waiting work."""

    stall_after_s: float

    def should_feed(self, now: float, last_progress: float, backlog: int) -> bool:
        if backlog <= 0:
            return True
        return now - last_progress <= self.stall_after_s


def feeder_interval(watchdog_s: float | None) -> float:
    """Half the watchdog timeout (systemd's advice), and a status line at least every 5 s."""
    if watchdog_s is None:
        return STATUS_INTERVAL_S
    return min(watchdog_s / 2, STATUS_INTERVAL_S)


class WatchdogFeeder:
    """Every `interval_s`: send STATUS=<status()>, plus WATCHDOG=1 when the policy says so.

    `policy` None means no watchdog is configured: status lines only.
    `probe_state` returns (monotonic time of the last finished frame, frames waiting).
    """

    def __init__(
        self,
        notifier: SystemdNotifier,
        policy: WatchdogPolicy | None,
        probe_state: Callable[[], tuple[float, int]],
        status: Callable[[], str],
        interval_s: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._notifier = notifier
        self._policy = policy
        self._probe_state = probe_state
        self._status = status
        self._interval_s = interval_s
        self._monotonic = monotonic
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._starving = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="watchdog-feeder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def tick(self) -> None:
        """One round: build the datagram and send it (STATUS and WATCHDOG together)."""
        lines: dict[str, str] = {}
        try:
            lines["STATUS"] = self._status().replace("\n", " ")
        except Exception:
            log.exception("systemd_status_failed")
        if self._policy is not None:
            last_progress, backlog = self._probe_state()
            now = self._monotonic()
            if self._policy.should_feed(now, last_progress, backlog):
                lines["WATCHDOG"] = "1"
                if self._starving:
                    self._starving = False
                    log.info("watchdog_feeding_resumed")
            elif not self._starving:
                self._starving = True
                log.error(
                    "pipeline_stalled",
                    backlog=backlog,
                    seconds_since_progress=round(now - last_progress, 1),
                    action="watchdog not fed; systemd will restart the service",
                )
        self._notifier.send(lines)

    def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # the feeder must outlive a bad status callback
                log.exception("watchdog_feeder_failed")
            if self._stop.wait(self._interval_s):
                return
