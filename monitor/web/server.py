"""The HTTP server: one aiohttp application on its own thread and event loop.

Routes: /healthz (alive, never behind the token), /readyz, /metrics, the JSON API under
/api/ and the dashboard (/, /static/...). Handlers copy what they need from the daemon
under its locks; store queries, JPEG encoding and operator actions run on a small
worker pool so the event loop never waits on SQLite or OpenCV.

Security: bound to loopback by default. With a token (`http.token_env` or
`http.token_credential`; required beyond loopback) every path but /healthz and /login
needs `Authorization: Bearer TOKEN` or the session cookie that /login sets. POSTs must
be JSON with an `X-Requested-By` header, which a cross-site form or simple request
cannot send, and a present Origin must be this server. Without a token the Host header
must name this server (loopback), so a DNS-rebinding page cannot reach it either.

Wrong tokens (at /login or as a Bearer header) are throttled per peer
(`monitor.web.throttle`): a few at once, then one every few seconds, answered 429 with
Retry-After in between. Connections are limited and timed out (`http.max_connections`,
`http.idle_timeout`, `http.header_timeout`; `monitor.web.connections`), and the loop's
accept errors are counted and logged once per interval, never as a traceback each.
JSON bodies are at most 64 KiB; one nested too deeply for the parser is a 400.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlsplit

import structlog
from aiohttp import web

from monitor import __version__
from monitor.config.exit_codes import EX_UNAVAILABLE
from monitor.config.http import HttpConfig, resolve_token
from monitor.config.network import is_loopback_host
from monitor.config.startup_error import StartupError, describe_bind_error
from monitor.timestamps import iso_utc
from monitor.web import views
from monitor.web.connections import (
    ConnectionGuard,
    ErrorReporter,
    GuardedConnection,
    HttpCounters,
    Listener,
)
from monitor.web.labelling import LabellingApi
from monitor.web.metrics import HttpCollector, create_registry, render_metrics
from monitor.web.shadow import ShadowApi
from monitor.web.throttle import FailureThrottle
from monitor.wire import to_wire

if TYPE_CHECKING:
    from monitor.publishers.base import CommandHandler
    from monitor.runtime.view import MonitorView

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
SESSION_COOKIE = "crystal_monitor_session"
SESSION_MAX_AGE_S = 30 * 86400
CSRF_HEADER = "X-Requested-By"
OPEN_PATHS = frozenset({"/healthz", "/login", "/logout"})
PAGES = frozenset({"/", "/label", "/shadow"})  # without a login these send the browser to /login
MAX_WHO_CHARS = 64
MAX_COMMENT_CHARS = 500
JOURNAL_LIMIT = 200
# Encoded JPEGs kept per recent frame the daemon holds: a thumbnail and a full-size view,
# plus slack for the frames that just left its deque.
FRAME_CACHE_PER_FRAME = 3
FRAME_MAX_AGE_S = 600
MAX_BODY_BYTES = 64 * 1024
# Characters of a frame key that stay as they are in the X-Frame-Key header; the rest
# (control characters such as a newline in a file name, '%', non-ASCII) are
# percent-encoded (RFC 3986), so any key makes a valid header.
_KEY_HEADER_SAFE = "/:@!$&'()*+,;=-._~ "

_STATIC_TYPES = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}
_PAGE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
_LOGIN_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebStartError(StartupError):
    """The HTTP server could not start; the message names the key, the cause and the fix."""


def session_value(token: str) -> str:
    """The login cookie: derived from the token, so the cookie never holds the token."""
    digest = hmac.new(token.encode(), b"crystal-monitor dashboard session", hashlib.sha256)
    return digest.hexdigest()


def _load_static() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("monitor.web") / "static"
    files: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in _STATIC_TYPES:
            files[entry.name] = (entry.read_bytes(), _STATIC_TYPES[suffix])
    return files


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


def _json(value: Any, status: int = 200) -> web.Response:
    """Every API answer as monitor.wire writes it: ISO times, rounded numbers, no NaN."""
    return web.json_response(to_wire(value), status=status, dumps=_dumps)


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


class WebServer:
    """Health, metrics, API and dashboard of one daemon; `start` returns once it listens."""

    def __init__(
        self,
        config: HttpConfig,
        view: MonitorView,
        commands: CommandHandler,
        *,
        token: str | None = None,
    ) -> None:
        self.config = config
        self._view = view
        self._commands = commands
        self._token = token if token is not None else resolve_token(config)
        self._session = None if self._token is None else session_value(self._token)
        self._static = _load_static()
        self.counters = HttpCounters()
        self._throttle = FailureThrottle()
        self._registry = create_registry(view)
        self._registry.register(HttpCollector(self.counters))
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="http-worker")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        # (probe, key, ts, width) -> JPEG, oldest first; only the event loop touches it.
        self._frame_cache: dict[tuple[str, str, float, int], bytes] = {}

    @property
    def url(self) -> str:
        host = self.config.host
        shown = "127.0.0.1" if host in {"0.0.0.0", ""} else host
        if ":" in shown:
            shown = f"[{shown}]"
        return f"http://{shown}:{self.config.port}/"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="http", daemon=True)
        self._thread.start()
        where = f"{self.config.host}:{self.config.port}"
        try:
            ready.result(timeout=START_TIMEOUT_S)
        except concurrent.futures.TimeoutError as exc:
            self.stop()
            raise WebStartError(
                "http.enabled",
                f"the HTTP server did not start within {START_TIMEOUT_S:.0f} s ({where}); "
                "set http.enabled = false to start without it",
                exit_code=EX_UNAVAILABLE,
            ) from exc
        except OSError as exc:
            self._thread.join(timeout=STOP_TIMEOUT_S)
            self._pool.shutdown(wait=False)
            key, problem = describe_bind_error(
                exc,
                host=self.config.host,
                port=self.config.port,
                key="http.port",
                host_key="http.host",
            )
            raise WebStartError(key, problem, exit_code=EX_UNAVAILABLE) from exc
        log.info("http_started", url=self.url, token=self._token is not None)

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        reporter = ErrorReporter(self.counters)
        loop.set_exception_handler(reporter)
        config = self.config
        runner = web.AppRunner(
            self._application(),
            access_log=None,
            shutdown_timeout=1.0,
            # aiohttp's own keep-alive timer only as a backstop: the guard's timers decide.
            keepalive_timeout=2 * config.idle_timeout + config.header_timeout,
        )
        try:
            loop.run_until_complete(runner.setup())
            assert runner.server is not None
            # What web.TCPSite does, with aiohttp's protocol factory (runner.server)
            # wrapped in the guard and an accept loop of our own.
            guard = ConnectionGuard(
                runner.server,
                max_connections=config.max_connections,
                idle_timeout=config.idle_timeout,
                header_timeout=config.header_timeout,
                counters=self.counters,
            )
            listener = Listener(guard, reporter)
            loop.run_until_complete(listener.start(config.host, config.port))
        except BaseException as exc:  # reported to start(), which raises it
            with contextlib.suppress(Exception):
                loop.run_until_complete(runner.cleanup())
            loop.close()
            ready.set_exception(exc)
            return
        self._loop = loop
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(listener.close())
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def stop(self) -> None:
        """Close the listener and open connections, then the worker pool."""
        loop, thread = self._loop, self._thread
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=STOP_TIMEOUT_S)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._loop = None
        log.info("http_stopped")

    # -- application ----------------------------------------------------------------------

    def _application(self) -> web.Application:
        app = web.Application(
            middlewares=[self._track_request, self._headers, self._read_body, self._guard],
            client_max_size=MAX_BODY_BYTES,
        )
        get = app.router.add_get
        get("/healthz", self._healthz)
        get("/readyz", self._readyz)
        get("/metrics", self._metrics)
        get("/", self._index)
        get("/label", self._label_page)
        get("/shadow", self._shadow_page)
        get("/static/{name}", self._static_file)
        get("/login", self._login)
        app.router.add_post("/login", self._login)
        get("/logout", self._logout)
        get("/api/state", self._state)
        get("/api/alarms", self._alarms)
        get("/api/probes/{probe}/history", self._history)
        get("/api/probes/{probe}/frames", self._frames)
        get("/api/probes/{probe}/frame", self._frame)
        get("/api/probes/{probe}/frame.jpg", self._frame_jpeg)
        post = app.router.add_post
        post("/api/probes/{probe}/alarms/{alarm_id}/acknowledge", self._acknowledge)
        post("/api/probes/{probe}/alarms/{alarm_id}/shelve", self._shelve)
        LabellingApi(
            samples=lambda: getattr(self._view, "samples", None),
            probes=lambda: self._view.probe_ids,
            now=self._view.now,
            work=self._work,
        ).add_routes(app)
        ShadowApi(
            reporter=lambda: getattr(self._view, "shadow_report", None),
            now=self._view.now,
            work=self._work,
        ).add_routes(app)
        return app

    async def _work(self, function: Callable[..., T], *args: Any) -> T:
        """Run `function` on the worker pool (store reads, encoding, operator actions)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, function, *args)

    # -- middlewares ----------------------------------------------------------------------

    @web.middleware
    async def _track_request(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Tell the connection guard a request's headers are in (its header timer stops)
        and when the answer is ready (its idle timer starts)."""
        transport = request.transport
        connection = transport.get_protocol() if transport is not None else None
        if not isinstance(connection, GuardedConnection):
            return await handler(request)
        connection.request_started()
        try:
            return await handler(request)
        finally:
            connection.request_finished()

    @web.middleware
    async def _read_body(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A body must arrive within http.header_timeout (at most MAX_BODY_BYTES, 413)."""
        if request.body_exists:
            try:
                await asyncio.wait_for(request.read(), self.config.header_timeout)
            except TimeoutError:
                self.counters.dropped["body_timeout"] += 1
                response = _error(
                    408,
                    f"the request body did not arrive within {self.config.header_timeout:g} s "
                    "(http.header_timeout)",
                )
                response.force_close()
                return response
        return await handler(request)

    @web.middleware
    async def _headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400 and request.path.startswith("/api/"):
                response = _error(exc.status, exc.reason)
            else:
                raise
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Content-Security-Policy", _PAGE_CSP)
        if "Cache-Control" not in response.headers and not request.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is None and not self._host_allowed(request.host):
            return _error(
                403,
                f"Host {request.host!r} is not this server: without a token the server "
                "answers only to its loopback address (DNS-rebinding protection)",
            )
        if request.method == "POST":
            refusal = self._cross_site_refusal(request)
            if refusal is not None:
                return _error(403, refusal)
        needs_token = self._token is not None and request.path not in OPEN_PATHS
        if needs_token:
            unauthorised = self._credentials_refusal(request)
            if unauthorised is not None:
                return unauthorised
        return await handler(request)

    def _host_allowed(self, host_header: str) -> bool:
        host = urlsplit(f"//{host_header}").hostname or ""
        return is_loopback_host(host) or host == self.config.host.lower()

    def _cross_site_refusal(self, request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            return f"cross-site request refused (Origin {origin!r} is not this server)"
        if request.path == "/login":
            return None  # the login form: a plain form post, nothing to forge with it
        if request.content_type != "application/json" or not request.headers.get(CSRF_HEADER):
            return (
                f"a POST needs 'Content-Type: application/json' and an '{CSRF_HEADER}' "
                "header (cross-site request protection)"
            )
        return None

    def _credentials_refusal(self, request: web.Request) -> web.StreamResponse | None:
        """None when the session cookie or the Bearer token is right; else 401, or 429
        while the peer is throttled for wrong tokens (the token is then not checked)."""
        assert self._session is not None
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if cookie and hmac.compare_digest(cookie.encode(), self._session.encode()):
            return None  # a cookie derived from the token: not a way to guess it
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            throttled = self._throttled(request)
            if throttled is not None:
                return throttled
            if self._token_matches(credentials):
                self._throttle.succeeded(self._peer(request))
                return None
            self._token_failed(request, "bearer")
        if request.path in PAGES and request.method == "GET":
            raise web.HTTPSeeOther("/login")
        response = _error(
            401,
            "authentication required: send 'Authorization: Bearer TOKEN' or log in at /login",
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="crystal-monitor"'
        return response

    def _token_matches(self, offered: str) -> bool:
        assert self._token is not None
        return hmac.compare_digest(offered.strip().encode(), self._token.encode())

    @staticmethod
    def _peer(request: web.Request) -> str:
        return request.remote or "unknown"

    def _token_failed(self, request: web.Request, where: str) -> None:
        """Count a wrong token against its peer; log when that peer's tries are used up."""
        peer = self._peer(request)
        self.counters.token_failures += 1
        exhausted = self._throttle.failed(peer)
        log.warning("http_token_refused", remote=peer, where=where)
        if exhausted:
            log.warning(
                "http_peer_throttled",
                remote=peer,
                retry_after_s=self._throttle.retry_after(peer),
                burst=self._throttle.burst,
                refill_s=self._throttle.refill_s,
            )

    def _retry_after(self, request: web.Request) -> int:
        retry = self._throttle.retry_after(self._peer(request))
        if retry:
            self.counters.throttled += 1
        return retry

    def _throttled(self, request: web.Request) -> web.Response | None:
        retry = self._retry_after(request)
        if not retry:
            return None
        response = _error(
            429,
            f"too many wrong tokens from {self._peer(request)}: try again in {retry} s",
        )
        response.headers["Retry-After"] = str(retry)
        return response

    # -- health and metrics ---------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json(
            {
                "status": "alive",
                "version": __version__,
                "uptime_s": round(time.monotonic() - self._started, 3),
            }
        )

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = await self._work(views.readiness_checks, self._view)
        reasons = [f"{check.name}: {check.detail}" for check in checks if not check.ok]
        return _json(
            {
                "ready": not reasons,
                "reasons": reasons,
                "checks": [check.to_json() for check in checks],
            },
            status=200 if not reasons else 503,
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self._work(render_metrics, self._registry)
        return web.Response(
            body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    # -- pages ----------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        return self._static_response("index.html", cache=False)

    async def _label_page(self, request: web.Request) -> web.Response:
        return self._static_response("label.html", cache=False)

    async def _shadow_page(self, request: web.Request) -> web.Response:
        return self._static_response("shadow.html", cache=False)

    async def _static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._static or name == "login.html":
            raise web.HTTPNotFound()
        return self._static_response(name, cache=True)

    def _static_response(self, name: str, *, cache: bool) -> web.Response:
        body, content_type = self._static[name]
        response = web.Response(body=body, content_type=content_type)
        if cache:
            response.headers["Cache-Control"] = "max-age=300"
        return response

    async def _login(self, request: web.Request) -> web.StreamResponse:
        if self._token is None:
            raise web.HTTPSeeOther("/")
        if request.method == "POST":
            form = await request.post()
            offered = str(form.get("token", ""))
        else:
            offered = request.query.get("token", "")
        if offered:
            retry = self._retry_after(request)
            if retry:
                page = self._login_page(
                    f"Too many wrong tokens from this address: try again in {retry} s.",
                    status=429,
                )
                page.headers["Retry-After"] = str(retry)
                return page
            if self._token_matches(offered):
                self._throttle.succeeded(self._peer(request))
                response = web.HTTPSeeOther("/")
                assert self._session is not None
                response.set_cookie(
                    SESSION_COOKIE,
                    self._session,
                    max_age=SESSION_MAX_AGE_S,
                    httponly=True,
                    samesite="Strict",
                    path="/",
                )
                log.info("http_login", remote=request.remote)
                raise response
            self._token_failed(request, "login")
            return self._login_page("That token is not valid.", status=401)
        return self._login_page("")

    def _login_page(self, message: str, status: int = 200) -> web.Response:
        body, _ = self._static["login.html"]
        text = body.decode().replace("{{message}}", message)
        response = web.Response(text=text, content_type="text/html", status=status)
        response.headers["Content-Security-Policy"] = _LOGIN_CSP
        return response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        response = web.HTTPSeeOther("/login" if self._token is not None else "/")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response

    # -- JSON API -------------------------------------------------------------------------

    def _probe(self, request: web.Request) -> str:
        probe = request.match_info["probe"]
        if probe not in self._view.probe_ids:
            raise web.HTTPNotFound(reason=f"unknown probe {probe!r}")
        return probe

    async def _state(self, request: web.Request) -> web.Response:
        state = await self._work(views.daemon_state, self._view, self.config.refresh)
        return _json(state)

    async def _alarms(self, request: web.Request) -> web.Response:
        probe = request.query.get("probe")
        if probe is not None and probe not in self._view.probe_ids:
            return _error(404, f"unknown probe {probe!r}")
        try:
            limit = max(1, min(int(request.query.get("limit", JOURNAL_LIMIT)), 5000))
        except ValueError:
            return _error(400, "limit must be a whole number")
        probes = [probe] if probe is not None else list(self._view.probe_ids)

        def collect() -> dict[str, Any]:
            return {
                "states": {p: self._view.alarm_states(p) for p in probes},
                "journal": self._view.recent_alarm_journal(limit, probe),
            }

        return _json(await self._work(collect))

    async def _history(self, request: web.Request) -> web.Response:
        probe = self._probe(request)
        windows = [int(w) for w in self._view.settings.aggregation.windows]
        try:
            window = int(request.query.get("window", views.default_window(self._view, probe)))
        except ValueError:
            window = -1
        if window not in windows:
            return _error(400, f"window must be one of the aggregation windows {windows}")
        span = views.SPANS.get(request.query.get("span", "auto"))
        if span is None:
            return _error(400, "span must be auto, hour or batch")
        history = await self._work(
            lambda: views.probe_history(
                self._view,
                probe,
                window=window,
                span=span,
                history_s=self.config.history,
                history_max_s=self.config.history_max,
            )
        )
        return _json(history)

    def _selection(self, request: web.Request) -> views.FrameSelection:
        try:
            return views.FrameSelection.from_query(request.query)
        except views.BadFrameSelectionError as exc:
            raise web.HTTPBadRequest(reason=str(exc)) from exc

    @staticmethod
    def _no_frame(probe: str, selection: views.FrameSelection) -> web.Response:
        if selection == views.FrameSelection():
            return _error(404, f"no classified frame from probe {probe!r} yet")
        return _error(
            404,
            f"{selection.describe()} is not among the recent frames of probe {probe!r} "
            f"(see /api/probes/{probe}/frames)",
        )

    async def _frames(self, request: web.Request) -> web.Response:
        probe = self._probe(request)
        boxes = request.query.get("boxes", "0") not in {"0", "false", "no", ""}
        listing = await self._work(lambda: views.frames_list(self._view, probe, boxes=boxes))
        return _json(listing)

    async def _frame(self, request: web.Request) -> web.Response:
        probe = self._probe(request)
        selection = self._selection(request)
        boxes = await self._work(views.frame_boxes, self._view, probe, selection)
        if boxes is None:
            return self._no_frame(probe, selection)
        return _json(boxes)

    async def _frame_jpeg(self, request: web.Request) -> web.Response:
        probe = self._probe(request)
        selection = self._selection(request)
        try:
            width = int(request.query.get("width", self.config.frame_width))
        except ValueError:
            return _error(400, "width must be a whole number of pixels")
        width = max(64, min(width, self.config.frame_width))
        found = views.select_frame(self._view.recent_frames(probe), selection)
        if found is None:
            return self._no_frame(probe, selection)
        index, frame = found
        cache_key = (probe, frame.key, frame.ts, width)
        data = self._frame_cache.get(cache_key)
        if data is None:
            data = await self._work(views.encode_frame, frame.image, width)
            self._remember_jpeg(cache_key, data)
        headers = {
            "X-Frame-Ts": iso_utc(frame.ts),
            "X-Frame-Key": quote(frame.key, safe=_KEY_HEADER_SAFE, errors="surrogateescape"),
            "X-Frame-Index": str(index),
        }
        if selection.exact:
            # Key and time name one frame for good: the browser may keep it, so a frame the
            # operator holds on the dashboard stays viewable after the daemon drops it.
            headers["Cache-Control"] = f"private, max-age={FRAME_MAX_AGE_S}, immutable"
        return web.Response(body=data, content_type="image/jpeg", headers=headers)

    def _remember_jpeg(self, cache_key: tuple[str, str, float, int], data: bytes) -> None:
        """Keep encoded JPEGs of recent frames (each size asked for), the oldest dropped
        first: every dashboard asks for the same frames, each is encoded once."""
        self._frame_cache[cache_key] = data
        held = sum(self._view.recent_capacity(probe) for probe in self._view.probe_ids)
        limit = FRAME_CACHE_PER_FRAME * max(1, held)
        while len(self._frame_cache) > limit:
            self._frame_cache.pop(next(iter(self._frame_cache)))

    async def _action_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as exc:
            raise web.HTTPBadRequest(reason="the body is not valid JSON") from exc
        except RecursionError as exc:
            raise web.HTTPBadRequest(
                reason="the body is JSON nested too deeply to parse (an action needs a flat "
                "object: who, comment, minutes)"
            ) from exc
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(reason="the body must be a JSON object")
        who = body.get("who")
        if not isinstance(who, str) or not who.strip() or len(who) > MAX_WHO_CHARS:
            raise web.HTTPBadRequest(
                reason=f"'who' (the operator) must be 1 to {MAX_WHO_CHARS} characters"
            )
        comment = body.get("comment", "")
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS:
            raise web.HTTPBadRequest(
                reason=f"'comment' must be text of at most {MAX_COMMENT_CHARS} characters"
            )
        return {**body, "who": who.strip(), "comment": comment.strip()}

    async def _acknowledge(self, request: web.Request) -> web.Response:
        probe = self._probe(request)
        alarm_id = request.match_info["alarm_id"]
        body = await self._action_body(request)
        result = await self._work(
            self._commands.acknowledge, probe, alarm_id, body["who"], body["comment"]
        )
        log.info(
            "http_acknowledge",
            probe=probe,
            alarm_id=alarm_id,
            who=body["who"],
            accepted=result.accepted,
            reason=result.reason,
        )
        return _json(
            {"accepted": result.accepted, "reason": result.reason},
            status=200 if result.accepted else 409,
        )

    async def _shelve(self, request: web.Request) -> web.Response:
        probe = self._probe(request)
        alarm_id = request.match_info["alarm_id"]
        body = await self._action_body(request)
        minutes = body.get("minutes")
        if (
            isinstance(minutes, bool)
            or not isinstance(minutes, int | float)
            or not math.isfinite(minutes)
            or minutes <= 0
        ):
            return _error(400, "'minutes' must be a number of minutes above 0")
        result = await self._work(
            self._commands.shelve, probe, alarm_id, float(minutes), body["who"], body["comment"]
        )
        log.info(
            "http_shelve",
            probe=probe,
            alarm_id=alarm_id,
            minutes=minutes,
            who=body["who"],
            accepted=result.accepted,
            reason=result.reason,
        )
        return _json(
            {"accepted": result.accepted, "reason": result.reason},
            status=200 if result.accepted else 409,
        )
