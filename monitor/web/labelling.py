"""The labelling page's API: the review queue's crops, their images, and the operator's
labels (`/api/samples...`; the page itself is /label, `static/label.*`).

GET  /api/samples                 the queued crops, filtered (probe, reason, since/until,
                                  labelled, limit, after_id), with the class list, the
                                  labels so far per class and the queue per reason
GET  /api/samples/{id}/image      the crop as PNG (the browser may keep it a while)
POST /api/samples/{id}/label      {"label": CLASS or "_not_a_particle", "operator": NAME}
POST /api/samples/{id}/unlabel    undo: the crop is unlabelled again

The server's middlewares guard these routes like every other API route (token or login
cookie; a POST must be JSON with the X-Requested-By header). The store is read and
written on the server's worker pool, never on its event loop. Without a review queue
(`review.enabled = false`) every route answers 503 saying so.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog
from aiohttp import web

from monitor.timestamps import iso_utc, parse_time
from monitor.wire import to_wire

log = structlog.get_logger(__name__)

NOT_A_PARTICLE = "_not_a_particle"
KEPT_REASONS = ("uncertain", "out_of_distribution", "boundary", "random")
"""Why the review queue keeps a crop (Sample.kept_because), in the page's order."""
DEFAULT_LIMIT = 200
MAX_LIMIT = 1000
MAX_OPERATOR_CHARS = 64
# A crop's PNG never changes once kept; ids are not reused while the store lives, but a
# new store (a wiped state_dir) starts again at 1, so the browser revalidates (ETag) after
# an hour instead of keeping the file for good.
IMAGE_MAX_AGE_S = 3600
_SAMPLE_TIMES = ("kept_at", "labelled_at")  # epoch seconds in Sample.to_json()

T = TypeVar("T")


class QueuedSample(Protocol):
    """What this API reads of a review sample (monitor.review.sample_store.Sample)."""

    @property
    def id(self) -> int: ...

    def to_json(self) -> dict[str, Any]: ...


class SampleQueue(Protocol):
    """What this API needs of the review queue (monitor.review.sample_store.SampleStore)."""

    @property
    def classes(self) -> tuple[str, ...]: ...

    def list_samples(
        self,
        *,
        probe: str | None = None,
        kept_because: str | None = None,
        since: float | None = None,
        until: float | None = None,
        labelled: bool | None = None,
        limit: int = DEFAULT_LIMIT,
        after_id: int | None = None,
    ) -> Sequence[QueuedSample]: ...

    def get(self, sample_id: int) -> QueuedSample | None: ...

    def image_path(self, sample_id: int) -> Path | None: ...

    def set_label(self, sample_id: int, label: str, *, operator: str, at: float) -> QueuedSample:
        """ValueError for a label that is no class; KeyError for an unknown id."""
        ...

    def clear_label(self, sample_id: int) -> QueuedSample: ...

    def label_counts(self) -> dict[str, int]: ...

    def queue_counts(self) -> dict[str, int]: ...


class BadSampleQueryError(ValueError):
    """A filter of /api/samples the API cannot read; the message names the fix."""


def _time(text: str, name: str) -> float:
    """ISO 8601 (as the API writes times; without a zone taken as UTC) or epoch seconds."""
    try:
        return parse_time(text, name)
    except ValueError as exc:
        raise BadSampleQueryError(str(exc)) from None


def _whole(text: str, name: str, *, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise BadSampleQueryError(f"{name} must be a whole number {span}")
    return value


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass(frozen=True)
class SampleQuery:
    """The filters of one /api/samples request, as SampleStore.list_samples takes them."""

    probe: str | None = None
    kept_because: str | None = None
    since: float | None = None
    until: float | None = None
    labelled: bool | None = None
    limit: int = DEFAULT_LIMIT
    after_id: int | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str], probes: Sequence[str]) -> SampleQuery:
        """Raises BadSampleQueryError naming the parameter and what it takes."""
        probe = query.get("probe") or None
        if probe is not None and probe not in probes:
            raise BadSampleQueryError(f"probe must be one of {', '.join(probes)} (or left out)")
        reason = query.get("reason") or None
        if reason is not None and reason not in KEPT_REASONS:
            raise BadSampleQueryError(
                f"reason must be one of {', '.join(KEPT_REASONS)} (or left out)"
            )
        since = _time(query["since"], "since") if query.get("since") else None
        until = _time(query["until"], "until") if query.get("until") else None
        if since is not None and until is not None and until < since:
            raise BadSampleQueryError("until must not be before since")
        labelled_text = query.get("labelled", "").lower()
        if labelled_text and labelled_text not in _BOOLEANS:
            raise BadSampleQueryError("labelled must be true or false (or left out for both)")
        limit_text = query.get("limit")
        after_text = query.get("after_id")
        return cls(
            probe=probe,
            kept_because=reason,
            since=since,
            until=until,
            labelled=_BOOLEANS[labelled_text] if labelled_text else None,
            limit=_whole(limit_text, "limit", low=1, high=MAX_LIMIT)
            if limit_text
            else DEFAULT_LIMIT,
            after_id=_whole(after_text, "after_id", low=0) if after_text else None,
        )


def sample_on_wire(sample: QueuedSample) -> dict[str, Any]:
    """A sample's JSON with every time as an ISO string (to_wire converts `ts`; the
    kept and labelled times are converted here, before the rounding could touch them)."""
    document = sample.to_json()
    for key in _SAMPLE_TIMES:
        value = document.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            document[key] = iso_utc(value)
    return dict(to_wire(document))


def _answer(document: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.json_response(to_wire(dict(document)), status=status)


def _refusal(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


DISABLED = (
    "the review queue is disabled (review.enabled = false): set review.enabled = true in "
    "the config and restart the daemon to keep crops for labelling"
)


class LabellingApi:
    """The /api/samples routes over the daemon's review queue.

    `samples` returns the queue, or None when it is off; `work` runs a function on the
    server's worker pool; `now` is the daemon's clock (a label's time); `probes` the
    probes this daemon reads.
    """

    def __init__(
        self,
        *,
        samples: Callable[[], SampleQueue | None],
        probes: Callable[[], Sequence[str]],
        now: Callable[[], float],
        work: Callable[[Callable[[], Any]], Awaitable[Any]],
    ) -> None:
        self._samples = samples
        self._probes = probes
        self._now = now
        self._work = work

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/samples", self.list_samples)
        app.router.add_get("/api/samples/{sample_id}/image", self.image)
        app.router.add_post("/api/samples/{sample_id}/label", self.label)
        app.router.add_post("/api/samples/{sample_id}/unlabel", self.unlabel)

    async def _run(self, function: Callable[[], T]) -> T:
        result: T = await self._work(function)
        return result

    @staticmethod
    def _totals(store: SampleQueue) -> dict[str, Any]:
        """The figures the page shows beside the grid, read together."""
        return {
            "classes": list(store.classes),
            "not_a_particle": NOT_A_PARTICLE,
            "reasons": list(KEPT_REASONS),
            "label_counts": store.label_counts(),
            "queue_counts": dict.fromkeys(KEPT_REASONS, 0) | store.queue_counts(),
        }

    async def list_samples(self, request: web.Request) -> web.Response:
        store = self._samples()
        if store is None:
            return _refusal(503, DISABLED)
        try:
            query = SampleQuery.from_query(request.query, self._probes())
        except BadSampleQueryError as exc:
            return _refusal(400, str(exc))

        def collect() -> dict[str, Any]:
            found = store.list_samples(
                probe=query.probe,
                kept_because=query.kept_because,
                since=query.since,
                until=query.until,
                labelled=query.labelled,
                limit=query.limit,
                after_id=query.after_id,
            )
            return {
                "samples": [sample_on_wire(sample) for sample in found],
                # Where the next page starts (after_id=...); None when this one was the last.
                "next_after_id": found[-1].id if len(found) == query.limit else None,
                "limit": query.limit,
                **self._totals(store),
            }

        document = await self._run(collect)
        document["probes"] = list(self._probes())
        document["now"] = self._now()
        return _answer(document)

    @staticmethod
    def _sample_id(request: web.Request) -> int | None:
        text = request.match_info["sample_id"]
        return int(text) if text.isascii() and text.isdigit() else None

    async def image(self, request: web.Request) -> web.StreamResponse:
        store = self._samples()
        if store is None:
            return _refusal(503, DISABLED)
        sample_id = self._sample_id(request)

        def find() -> Path | None:
            path = None if sample_id is None else store.image_path(sample_id)
            return path if path is not None and path.is_file() else None

        path = await self._run(find)
        if path is None:
            return _refusal(404, f"no review sample {request.match_info['sample_id']!r}")
        return web.FileResponse(
            path,
            headers={
                "Content-Type": "image/png",
                "Cache-Control": f"private, max-age={IMAGE_MAX_AGE_S}",
            },
        )

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _refusal(400, "the body is not valid JSON")
        except RecursionError:
            return _refusal(400, 'the body must be a flat JSON object: {"label", "operator"}')
        if not isinstance(body, dict):
            return _refusal(400, 'the body must be a JSON object: {"label", "operator"}')
        return body

    async def label(self, request: web.Request) -> web.Response:
        store = self._samples()
        if store is None:
            return _refusal(503, DISABLED)
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        who = _operator(body, required=True)
        if who is None:
            return _refusal(400, OPERATOR_NEEDED)
        choices = (*store.classes, NOT_A_PARTICLE)
        label = body.get("label")
        if not isinstance(label, str) or label not in choices:
            return _refusal(400, f"'label' must be one of {', '.join(choices)}")
        at = self._now()
        return await self._write(
            request,
            store,
            lambda sample_id: store.set_label(sample_id, label, operator=who, at=at),
        )

    async def unlabel(self, request: web.Request) -> web.Response:
        """Undo: the crop is unlabelled again ("operator", optional, is logged)."""
        store = self._samples()
        if store is None:
            return _refusal(503, DISABLED)
        body = await self._body(request) if request.body_exists else {}
        if isinstance(body, web.Response):
            return body
        who = _operator(body, required=False)
        if who is None and "operator" in body:
            return _refusal(400, OPERATOR_NEEDED)
        return await self._write(request, store, store.clear_label, who=who)

    async def _write(
        self,
        request: web.Request,
        store: SampleQueue,
        change: Callable[[int], QueuedSample],
        *,
        who: str | None = None,
    ) -> web.Response:
        """Apply `change` to the request's sample on the worker pool; answer the sample as
        it is now with the page's totals (404 for an unknown id, 400 for a refused label)."""
        sample_id = self._sample_id(request)
        if sample_id is None:
            return _refusal(404, f"no review sample {request.match_info['sample_id']!r}")

        def write() -> tuple[int, dict[str, Any]]:
            try:
                sample = change(sample_id)
            except KeyError:
                return 404, {"error": f"no review sample {sample_id}"}
            except ValueError as exc:
                return 400, {"error": str(exc)}
            return 200, {"sample": sample_on_wire(sample), **self._totals(store)}

        status, document = await self._run(write)
        if status == 200:
            sample = document["sample"]
            log.info(
                "sample_labelled" if sample.get("label") else "sample_unlabelled",
                sample_id=sample_id,
                label=sample.get("label"),
                operator=sample.get("labelled_by") or who,
            )
        return _answer(document, status)


OPERATOR_NEEDED = (
    f"'operator' (your name) must be 1 to {MAX_OPERATOR_CHARS} characters: enter it under "
    "Operator at the top of the page"
)


def _operator(body: Mapping[str, Any], *, required: bool) -> str | None:
    """The operator's name from a body, stripped; None when missing or not a name."""
    operator = body.get("operator")
    if operator is None and not required:
        return None
    if not isinstance(operator, str) or not operator.strip() or len(operator) > MAX_OPERATOR_CHARS:
        return None
    return operator.strip()
