"""The shadow model page's API: how a candidate model compares with the live one on the
same crops (`/api/shadow`; the page itself is /shadow, `static/shadow.*`).

GET /api/shadow   the shadow report (monitor.shadow.report) for a time range: per window
                  and probe the agreement and each class's fraction under both models
                  with the difference and its interval, the labelled crops scored
                  (McNemar), the promotion verdict with its reasons, and what runs now
                  ("running"). Filters: since/until (ISO 8601 or epoch seconds),
                  window (seconds or a duration such as "5m"; left out: the configured
                  model.shadow.window), candidate (a model label on record; left out:
                  the newest).

The server's middlewares guard this route like every other API route (token or login
cookie). The report reads SQLite, so it is made on the server's worker pool, never on
its event loop. Without a shadow model and without a shadow record the route answers 503
saying how to set one up.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from monitor.config.durations import parse_duration
from monitor.timestamps import iso_utc, parse_time
from monitor.wire import to_wire

MIN_WINDOW_S = 10.0  # as model.shadow.window: shorter windows hold too few crops to compare
MAX_WINDOW_S = 30 * 86400.0
MAX_CANDIDATE_CHARS = 200
_REPORT_TIMES = ("since", "until")  # epoch seconds (or None) in the report
_WINDOW_TIMES = ("start", "end")  # epoch seconds in each of its windows

NO_SHADOW = (
    "no shadow model: set [model.shadow] path = ... (the candidate's exported model "
    "directory) in the config and reload (systemctl reload crystal-monitor)"
)


class ShadowReporter(Protocol):
    """What this API calls on the view (LiveView.shadow_report): the report plus
    "running", or None when no [model.shadow] is configured and no record exists."""

    def __call__(
        self,
        *,
        since: float | None,
        until: float | None,
        window_s: float | None,
        candidate: str | None,
    ) -> dict[str, Any] | None: ...


class BadShadowQueryError(ValueError):
    """A parameter of /api/shadow the API cannot read; the message names the fix."""


def _moment(text: str, name: str) -> float:
    """A time the API can also write back (ISO 8601 UTC stops at the year 9999)."""
    try:
        seconds = parse_time(text, name)
    except ValueError as exc:
        raise BadShadowQueryError(str(exc)) from None
    try:
        iso_utc(seconds)
    except (ValueError, OverflowError, OSError):
        raise BadShadowQueryError(f"{name} lies outside the years 1 to 9999") from None
    return seconds


def _window(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = math.nan
    if not MIN_WINDOW_S <= seconds <= MAX_WINDOW_S:
        raise BadShadowQueryError(
            f"window must be a duration from {MIN_WINDOW_S:g} s to {MAX_WINDOW_S / 86400:g} "
            "days, in seconds or like '5m', '1h' (or left out for model.shadow.window)"
        )
    return seconds


@dataclass(frozen=True)
class ShadowQuery:
    """The parameters of one /api/shadow request, as the view's shadow_report takes them."""

    since: float | None = None
    until: float | None = None
    window_s: float | None = None
    candidate: str | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> ShadowQuery:
        """Raises BadShadowQueryError naming the parameter and what it takes."""
        since = _moment(query["since"], "since") if query.get("since") else None
        until = _moment(query["until"], "until") if query.get("until") else None
        if since is not None and until is not None and until <= since:
            raise BadShadowQueryError("until must be after since")
        candidate = query.get("candidate") or None
        if candidate is not None and len(candidate) > MAX_CANDIDATE_CHARS:
            raise BadShadowQueryError(
                f"candidate must be a model label (name:version:sha12) of at most "
                f"{MAX_CANDIDATE_CHARS} characters"
            )
        return cls(
            since=since,
            until=until,
            window_s=_window(query["window"]) if query.get("window") else None,
            candidate=candidate,
        )


def unknown_candidate(report: Mapping[str, Any], candidate: str | None) -> str | None:
    """Why `candidate` names no model the report knows (None when it does or is unset):
    one on record or the one running now, which may have no compared frame yet."""
    if candidate is None:
        return None
    known = list(report.get("candidates") or [])
    running = report.get("running") or {}
    if candidate in known or candidate == running.get("candidate"):
        return None
    if not known:
        return (
            f"no candidate has been compared yet, so there is no record of {candidate!r}: "
            "leave candidate out"
        )
    return (
        f"no shadow record of candidate {candidate!r}: candidate must be one of "
        f"{', '.join(known)} (or left out for the newest)"
    )


def report_on_wire(report: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The report with every time as an ISO string (its since/until, each window's
    start and end), converted before to_wire's rounding could touch the epoch seconds."""
    document = dict(report)
    for key in _REPORT_TIMES:
        document[key] = _iso(document.get(key))
    document["windows"] = [
        {**window, **{key: _iso(window.get(key)) for key in _WINDOW_TIMES}}
        for window in document.get("windows") or []
    ]
    document["now"] = iso_utc(now)
    return dict(to_wire(document))


def _iso(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    return iso_utc(value) if math.isfinite(value) else None


def _refusal(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class ShadowApi:
    """The /api/shadow route over the view's shadow report.

    `reporter` returns the view's shadow_report, or None where the view has none; `work`
    runs a function on the server's worker pool; `now` is the daemon's clock (the
    answer says when it was made).
    """

    def __init__(
        self,
        *,
        reporter: Callable[[], ShadowReporter | None],
        now: Callable[[], float],
        work: Callable[[Callable[[], Any]], Awaitable[Any]],
    ) -> None:
        self._reporter = reporter
        self._now = now
        self._work = work

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/shadow", self.report)

    async def report(self, request: web.Request) -> web.Response:
        reporter = self._reporter()
        if reporter is None:
            return _refusal(503, NO_SHADOW)
        try:
            query = ShadowQuery.from_query(request.query)
        except BadShadowQueryError as exc:
            return _refusal(400, str(exc))

        def collect() -> dict[str, Any] | None:
            return reporter(
                since=query.since,
                until=query.until,
                window_s=query.window_s,
                candidate=query.candidate,
            )

        report: dict[str, Any] | None = await self._work(collect)
        if report is None:
            return _refusal(503, NO_SHADOW)
        refusal = unknown_candidate(report, query.candidate)
        if refusal is not None:
            return _refusal(400, refusal)
        return web.json_response(report_on_wire(report, self._now()))
