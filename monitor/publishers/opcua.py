"""OpcUaPublisher: the OPC UA server as a Publisher of the threaded daemon.

The asyncua server runs on its own thread with its own event loop. The daemon's
threads hand work over and return at once: `publish_update` keeps only the newest
update per probe (current values; a slow loop skips intermediate ones), while
`publish_event` queues every event in order. One worker task on the loop applies
them. The address space and the security profiles are described in
`monitor.publishers.opcua_server` and `monitor.publishers.opcua_security`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import structlog

from monitor.config.certificates import CertificateFileError
from monitor.config.exit_codes import EX_UNAVAILABLE
from monitor.config.opcua import OpcUaConfig, check_opcua_environment, endpoint_host
from monitor.config.startup_error import StartupError, describe_bind_error
from monitor.publishers.base import CommandHandler, ProbeUpdate
from monitor.publishers.opcua_server import CrystalMonitorServer

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
MAX_QUEUED_EVENTS = 10_000


class OpcUaStartError(StartupError):
    """The OPC UA server could not start; the message names the key, the cause and the fix."""


class OpcUaPublisher:
    """Publisher that serves probe values, alarms and batch events over OPC UA."""

    name = "opcua"

    def __init__(self, config: OpcUaConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir
        self._lock = threading.Lock()
        self._updates: dict[str, ProbeUpdate] = {}
        self._alarm_states: dict[str, list[dict[str, Any]]] = {}
        self._events: deque[tuple[str, dict[str, Any]]] = deque()
        self._dropped_events = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._server: CrystalMonitorServer | None = None
        self._failure: str | None = None

    # -- Publisher ----------------------------------------------------------------------

    def start(self, commands: CommandHandler) -> None:
        """Start the server thread; returns once the server listens, else raises."""
        problems = check_opcua_environment(self.config, starting=True)
        if problems:  # each starts with its key, as "opcua.users_file: not found: ..."
            key, _, problem = "; ".join(problems).partition(": ")
            raise OpcUaStartError(key, problem)
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        server = CrystalMonitorServer(self.config, self.state_dir, commands)
        # A method call returns only once its effect is in the address space: a client
        # reading Acknowledged right after Acknowledge() returned reads true.
        server.after_command = lambda: self._drain(server)
        self._server = server
        self._thread = threading.Thread(
            target=self._run, args=(server, ready), name="opcua", daemon=True
        )
        self._thread.start()
        try:
            ready.result(timeout=START_TIMEOUT_S)
        except concurrent.futures.TimeoutError as exc:
            self.stop()
            raise OpcUaStartError(
                "opcua.enabled",
                f"the OPC UA server did not start within {START_TIMEOUT_S:.0f} s "
                f"({self.config.endpoint}); set opcua.enabled = false to start without it",
                exit_code=EX_UNAVAILABLE,
            ) from exc
        except OSError as exc:
            self._thread.join(timeout=STOP_TIMEOUT_S)
            key, problem = describe_bind_error(
                exc,
                host=endpoint_host(self.config.endpoint),
                port=urlparse(self.config.endpoint).port or 4840,
                key="opcua.endpoint",
                host_key="opcua.endpoint",
            )
            raise OpcUaStartError(key, problem, exit_code=EX_UNAVAILABLE) from exc
        except CertificateFileError as exc:
            # The operator's pair was checked with the configuration; this is one that
            # changed since, or the generated pair under daemon.state_dir.
            self._thread.join(timeout=STOP_TIMEOUT_S)
            key = "opcua.certificate" if self.config.certificate else "daemon.state_dir"
            raise OpcUaStartError(
                key, f"{exc} (replace the file, or delete a generated one to have it made again)"
            ) from exc
        except Exception as exc:
            self._thread.join(timeout=STOP_TIMEOUT_S)
            raise OpcUaStartError(
                "opcua.enabled",
                f'the OPC UA server failed to start: {exc} (daemon.log_level = "debug" '
                "shows the traceback; opcua.enabled = false starts without it)",
                exit_code=EX_UNAVAILABLE,
            ) from exc

    def publish_update(self, update: ProbeUpdate) -> None:
        with self._lock:
            self._updates[update.probe] = update
        self._wake()

    def publish_alarms(self, probe: str, alarms: list[dict[str, Any]]) -> None:
        """Alarm variables right after an operator action; the newest list per probe."""
        with self._lock:
            self._alarm_states[probe] = alarms
        self._wake()

    def publish_event(self, probe: str, event: dict[str, Any]) -> None:
        with self._lock:
            if len(self._events) >= MAX_QUEUED_EVENTS:
                self._events.popleft()
                self._dropped_events += 1
            self._events.append((probe, dict(event)))
        self._wake()

    def publish_result(self, probe: str, result: dict[str, Any]) -> None:
        """Per-frame results are not served over OPC UA (windowed values are)."""

    def health(self) -> tuple[bool, str]:
        if self._failure is not None:
            return False, self._failure
        if self._thread is None or self._loop is None:
            return False, "OPC UA server not started"
        if not self._thread.is_alive():
            return False, "OPC UA server thread stopped"
        message = f"OPC UA listening on {self.config.endpoint} ({self.config.security_profile})"
        if self._dropped_events:
            message += f"; {self._dropped_events} events dropped (event queue full)"
        return True, message

    def diagnostics(self) -> dict[str, Any]:
        """Numbers for `/metrics` and the publish_overflow alarm: events dropped because
        the queue was full, refused logins and client certificates."""
        server = self._server
        counters = server.security_counters() if server is not None else {}
        return {"dropped_total": self._dropped_events, **counters}

    def stop(self) -> None:
        """Send what is queued, close client sessions and the server, end the thread."""
        loop, thread = self._loop, self._thread
        self._stopping = True
        self._wake()
        if thread is not None:
            thread.join(timeout=STOP_TIMEOUT_S)
            if thread.is_alive():
                log.warning("opcua_stop_timeout", seconds=STOP_TIMEOUT_S)
                if loop is not None and not loop.is_closed():
                    loop.call_soon_threadsafe(loop.stop)
        self._thread = None

    # -- the server thread ----------------------------------------------------------------

    def _wake(self) -> None:
        loop, wakeup = self._loop, self._wakeup
        if loop is None or wakeup is None:
            return
        with contextlib.suppress(RuntimeError):  # closed loop: the server has stopped
            loop.call_soon_threadsafe(wakeup.set)

    def _run(self, server: CrystalMonitorServer, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(server, loop, ready))
        except Exception as exc:
            self._failure = f"OPC UA server stopped: {exc}"
            log.exception("opcua_server_crashed")
            if not ready.done():
                ready.set_exception(exc)
        finally:
            self._loop = None
            self._wakeup = None
            loop.close()

    async def _serve(
        self,
        server: CrystalMonitorServer,
        loop: asyncio.AbstractEventLoop,
        ready: concurrent.futures.Future[None],
    ) -> None:
        try:
            await server.start()
        except BaseException as exc:
            await _quietly(server.stop())
            ready.set_exception(exc)
            return
        self._wakeup = asyncio.Event()
        self._loop = loop
        ready.set_result(None)
        try:
            while True:
                await self._drain(server)
                if self._stopping:
                    break
                await self._wakeup.wait()
                self._wakeup.clear()
        finally:
            await _quietly(server.stop())
            log.info("opcua_stopped", endpoint=self.config.endpoint)

    async def _drain(self, server: CrystalMonitorServer) -> None:
        """Apply the pending updates, then the queued events, in arrival order."""
        while True:
            with self._lock:
                updates = list(self._updates.values())
                self._updates.clear()
                alarm_states = list(self._alarm_states.items())
                self._alarm_states.clear()
                events = list(self._events)
                self._events.clear()
            if not updates and not events and not alarm_states:
                return
            for update in updates:
                try:
                    await server.apply_update(update)
                except Exception:
                    log.exception("opcua_update_failed", probe=update.probe)
            # After the updates: an operator's action is newer than any update queued with it.
            for probe, alarms in alarm_states:
                try:
                    await server.apply_alarms(probe, alarms)
                except Exception:
                    log.exception("opcua_alarms_failed", probe=probe)
            for probe, event in events:
                try:
                    await server.emit_event(probe, event)
                except Exception:
                    log.exception("opcua_event_failed", probe=probe, event=event.get("type"))


async def _quietly(stopping: Any) -> None:
    try:
        await stopping
    except Exception:
        log.exception("opcua_stop_failed")
