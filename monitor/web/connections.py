"""The HTTP server's connections: a limit, idle and header timeouts, quiet accept errors.

aiohttp (3.9 and later) times a kept-alive connection out only after an answer (3.14 also
from the connect), has no time limit for a request's headers, and no connection limit.
`ConnectionGuard` wraps the protocol factory that `loop.create_server` gets (aiohttp's
`web.Server`, which `AppRunner.setup` makes and `TCPSite.start` would pass on): every
connection gets a `GuardedConnection` that forwards the transport's callbacks to
aiohttp's own protocol and keeps one timer, by phase:

- waiting for a request (new, or kept alive after an answer): `idle_timeout`;
- the first bytes of a request have come, its headers not yet: `header_timeout`;
- a request is being handled (the server's first middleware calls `request_started`
  and `request_finished`): no timer here; the body is read with `header_timeout` there.

At `max_connections` a new connection closes the one that has waited longest for a
request (as nginx reuses idle keep-alive connections), so idle connections cannot lock
out /healthz; when every connection is busy with a request, the new one is closed at
once. Each close is counted by reason in `HttpCounters`.

`Listener` binds the listening sockets itself and accepts with `loop.sock_accept`, so
a failed accept (EMFILE, ENFILE, ENOBUFS, ENOMEM: out of descriptors or memory) is
counted, logged once per interval with the count (`ErrorReporter`), and retried after a
second. `loop.create_server` would hand such a failure to the loop's exception handler
as a traceback each time, and on CPython 3.11 its accept loop keeps going after one and
schedules a retry for every further try (python/cpython#151615): thousands of failures
and tracebacks a second (120,770 in one 30 s test). `ErrorReporter` is also the server
loop's exception handler, so nothing else the loop reports can flood the log either.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger(__name__)

ERROR_LOG_INTERVAL_S = 10.0
ACCEPT_RETRY_S = 1.0
LISTEN_BACKLOG = 128
_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Why connections were closed by the server rather than by the client.
DROP_REASONS = ("over_limit", "evicted", "idle_timeout", "header_timeout", "body_timeout")


@dataclass
class HttpCounters:
    """Connection and authentication counters of one server; only its loop writes them."""

    open_connections: int = 0
    requests_in_progress: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    accept_errors: int = 0
    token_failures: int = 0
    throttled: int = 0


class Phase(enum.Enum):
    WAITING = "waiting for a request"
    HEADERS = "receiving a request's headers"
    HANDLING = "handling a request"


class ConnectionGuard:
    """The protocol factory for `loop.create_server`: aiohttp's, with the limit and
    the timeouts around each connection."""

    def __init__(
        self,
        inner_factory: Callable[[], asyncio.Protocol],
        *,
        max_connections: int,
        idle_timeout: float,
        header_timeout: float,
        counters: HttpCounters,
    ) -> None:
        self.inner_factory = inner_factory
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.counters = counters
        self._open: set[GuardedConnection] = set()
        # Connections not handling a request, the longest waiting first.
        self._waiting: OrderedDict[GuardedConnection, None] = OrderedDict()

    def __call__(self) -> GuardedConnection:
        return GuardedConnection(self)

    def admit(self, connection: GuardedConnection) -> bool:
        """Make room for a new connection; False when every one is busy (then it is
        closed unserved)."""
        if len(self._open) >= self.max_connections:
            if not self._waiting:
                self.counters.dropped["over_limit"] += 1
                return False
            oldest = next(iter(self._waiting))
            oldest.drop("evicted")
        self._open.add(connection)
        self._count()
        return True

    def waiting(self, connection: GuardedConnection, *, again: bool) -> None:
        if again:
            self._waiting.pop(connection, None)
        self._waiting.setdefault(connection, None)
        self._count()

    def busy(self, connection: GuardedConnection) -> None:
        self._waiting.pop(connection, None)
        self._count()

    def release(self, connection: GuardedConnection) -> None:
        self._waiting.pop(connection, None)
        self._open.discard(connection)
        self._count()

    def _count(self) -> None:
        self.counters.open_connections = len(self._open)
        self.counters.requests_in_progress = len(self._open) - len(self._waiting)


class GuardedConnection(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, one timer by phase around it."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self.phase = Phase.WAITING

    # -- the transport's callbacks, forwarded -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if not self._guard.admit(self):
            self._closing = True
            transport.close()
            return
        self._inner = self._guard.inner_factory()
        self._inner.connection_made(transport)
        self._wait(Phase.WAITING, again=True)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self.phase is Phase.WAITING:
            self._wait(Phase.HEADERS, again=False)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._inner is None else self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._inner is None:
            return
        self._guard.release(self)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- phases ---------------------------------------------------------------------------

    def request_started(self) -> None:
        """The headers of a request have been parsed (called by the first middleware)."""
        self.phase = Phase.HANDLING
        self._cancel_timer()
        self._guard.busy(self)

    def request_finished(self) -> None:
        """The handler has answered; the connection waits for the next request."""
        if not self._closing and self._inner is not None:
            self._wait(Phase.WAITING, again=True)

    def drop(self, reason: str) -> None:
        """Close the connection from the server's side, counted by `reason`."""
        if self._closing or self._transport is None:
            return
        self._closing = True
        self._cancel_timer()
        self._guard.counters.dropped[reason] += 1
        self._guard.release(self)  # its descriptor goes with the next loop turn
        self._transport.close()

    def _wait(self, phase: Phase, *, again: bool) -> None:
        self.phase = phase
        self._guard.waiting(self, again=again)
        timeout = self._guard.idle_timeout if phase is Phase.WAITING else self._guard.header_timeout
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(timeout, self._expire)

    def _expire(self) -> None:
        self._timer = None
        assert self._transport is not None
        if self.phase is Phase.WAITING and self._transport.get_write_buffer_size() > 0:
            # The last answer is still going out to a slow reader: idle only once it is sent.
            self._timer = asyncio.get_running_loop().call_later(
                self._guard.idle_timeout, self._expire
            )
            return
        self.drop("idle_timeout" if self.phase is Phase.WAITING else "header_timeout")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ErrorReporter:
    """Repeating errors counted and logged at most once per kind per interval.

    The first of a kind is logged at once; later ones within `interval_s` are only
    counted, and the next line after the interval says how many there were (`count`).
    Called with a loop context it is the server loop's exception handler.
    """

    def __init__(
        self,
        counters: HttpCounters,
        *,
        interval_s: float = ERROR_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._counters = counters
        self._interval_s = interval_s
        self._clock = clock
        self._last_logged: dict[tuple[str, str], float] = {}
        self._unlogged: Counter[tuple[str, str]] = Counter()

    def accept_failed(self, exc: OSError) -> None:
        self._counters.accept_errors += 1
        self.report(
            "http_accept_failed",
            exc.strerror or str(exc),
            accept_errors_total=self._counters.accept_errors,
            fix="raise the descriptor limit (LimitNOFILE= in the unit) or lower "
            "http.max_connections",
        )

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message", ""))
        detail = f"{type(exc).__name__}: {exc}" if exc is not None else message
        self.report("http_loop_error", detail, message=message)

    def report(self, event: str, detail: str, **fields: Any) -> None:
        kind = (event, detail)
        self._unlogged[kind] += 1
        now = self._clock()
        last = self._last_logged.get(kind)
        if last is not None and now - last < self._interval_s:
            return
        self._last_logged[kind] = now
        count = self._unlogged.pop(kind)
        if last is not None:
            fields["since_s"] = round(now - last, 1)
        log.error(event, error=detail, count=count, **fields)


class Listener:
    """The listening sockets of `host`:`port` (every address it resolves to, as
    `loop.create_server` binds them) and an accept loop on each."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        reporter: ErrorReporter,
        *,
        retry_s: float = ACCEPT_RETRY_S,
    ) -> None:
        self._factory = factory
        self._reporter = reporter
        self._retry_s = retry_s
        self._sockets: list[socket.socket] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, host: str, port: int) -> None:
        """Bind and listen (raises OSError, e.g. when the port is taken), then accept."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        try:
            for family, kind, proto, _name, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
        except OSError:
            self._close_sockets()
            raise
        self._tasks = [loop.create_task(self._accept(sock)) for sock in self._sockets]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, _peer = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno not in _ACCEPT_ERRNOS:
                    self._reporter.report("http_accept_failed", exc.strerror or str(exc))
                    continue  # e.g. ECONNABORTED: that client is gone, the next may not be
                self._reporter.accept_failed(exc)
                await asyncio.sleep(self._retry_s)  # descriptors come back as others close
                continue
            try:
                await loop.connect_accepted_socket(self._factory, connection)
            except OSError as exc:
                connection.close()
                self._reporter.report("http_accept_failed", exc.strerror or str(exc))
