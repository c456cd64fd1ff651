"""The labelling API (/api/samples...) of the real HTTP server over a review queue: the
queue filtered by probe, reason, time and labelled state, paged by after_id, with the
counts per class and per reason; a crop's PNG with caching headers; a label and its undo
written to the store with the operator's name and the daemon's time; every refusal a 400
naming the fix, an unknown crop a 404, no queue a 503; all of it behind the token.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from monitor.config.http import HttpConfig
from monitor.web.server import WebServer
from tests.fake_view import FakeView, RefusingCommands
from tests.mosquitto import free_port

TOKEN = "label-api-token-for-the-test-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
POST = {**BEARER, "Content-Type": "application/json", "X-Requested-By": "test"}
NOT_A_PARTICLE = "_not_a_particle"
T0 = 1_000_000.0  # FakeView's clock; the samples' frame times lie before it


@dataclass(frozen=True)
class Sample:
    """The fields of monitor.review.sample_store.Sample."""

    id: int
    probe: str
    frame_key: str
    ts: float
    batch: str | None
    model: str
    guess: str
    confidence: float
    probabilities: dict[str, float]
    status: str
    decision_reason: str | None
    kept_because: str
    kept_at: float
    label: str | None = None
    labelled_by: str | None = None
    labelled_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InMemorySampleStore:
    """The SampleStore API over a dict, its crops as real PNG files in `folder`."""

    folder: Path
    classes: tuple[str, ...] = ("CEX", "PG")
    samples: dict[int, Sample] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sample: Sample, image: np.ndarray) -> None:
        ok, png = cv2.imencode(".png", image)
        assert ok
        (self.folder / f"{sample.id}.png").write_bytes(png.tobytes())
        self.samples[sample.id] = sample

    def list_samples(
        self,
        *,
        probe: str | None = None,
        kept_because: str | None = None,
        since: float | None = None,
        until: float | None = None,
        labelled: bool | None = None,
        limit: int = 200,
        after_id: int | None = None,
    ) -> list[Sample]:
        with self.lock:
            found = [
                s
                for _, s in sorted(self.samples.items())
                if (probe is None or s.probe == probe)
                and (kept_because is None or s.kept_because == kept_because)
                and (since is None or s.ts >= since)
                and (until is None or s.ts <= until)
                and (labelled is None or (s.label is not None) == labelled)
                and (after_id is None or s.id > after_id)
            ]
        return found[:limit]

    def get(self, sample_id: int) -> Sample | None:
        return self.samples.get(sample_id)

    def image_path(self, sample_id: int) -> Path | None:
        return self.folder / f"{sample_id}.png" if sample_id in self.samples else None

    def set_label(self, sample_id: int, label: str, *, operator: str, at: float) -> Sample:
        if label not in (*self.classes, NOT_A_PARTICLE):
            raise ValueError(f"label must be one of {self.classes}")
        with self.lock:
            sample = replace(self.samples[sample_id], label=label, labelled_by=operator)
            self.samples[sample_id] = replace(sample, labelled_at=at)
            return self.samples[sample_id]

    def clear_label(self, sample_id: int) -> Sample:
        with self.lock:
            sample = self.samples[sample_id]
            self.samples[sample_id] = replace(
                sample, label=None, labelled_by=None, labelled_at=None
            )
            return self.samples[sample_id]

    def label_counts(self) -> dict[str, int]:
        counts = dict.fromkeys((*self.classes, NOT_A_PARTICLE), 0)
        for sample in self.samples.values():
            if sample.label is not None:
                counts[sample.label] += 1
        return counts

    def queue_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for sample in self.samples.values():
            if sample.label is None:
                counts[sample.kept_because] = counts.get(sample.kept_because, 0) + 1
        return counts


@dataclass
class ReviewView(FakeView):
    """FakeView with a review queue (None: review.enabled = false)."""

    samples: InMemorySampleStore | None = None


REASONS = ("uncertain", "out_of_distribution", "boundary", "random")


def _fill(store: InMemorySampleStore) -> None:
    """12 crops: probes R1 and R2 alternating, reasons in turn, one a minute."""
    for i in range(1, 13):
        guess = "PG" if i % 3 == 0 else "CEX"
        confidence = 0.5 + i / 40
        store.add(
            Sample(
                id=i,
                probe="R1" if i % 2 else "R2",
                frame_key=f"frame_{i:04d}.png",
                ts=T0 - 3600 + 60 * i,
                batch="B7",
                model="default:1.0:0123456789ab",
                guess=guess,
                confidence=confidence,
                probabilities={
                    "CEX": confidence if guess == "CEX" else 1 - confidence,
                    "PG": confidence if guess == "PG" else 1 - confidence,
                },
                status="uncertain" if i % 4 == 1 else "ok",
                decision_reason="low_confidence" if i % 4 == 1 else None,
                kept_because=REASONS[(i - 1) % 4],
                kept_at=T0 - 3600 + 60 * i + 0.25,
            ),
            np.full((40 + i, 36 + i), 10 * i, np.uint8),
        )


@dataclass
class Running:
    base: str
    store: InMemorySampleStore
    view: ReviewView


def _settings_two_probes() -> Any:
    from monitor.config.settings import load_settings

    return load_settings(
        data={
            "probes": [
                {"id": "R1", "source": {"type": "folder", "path": "/srv/probe/R1"}},
                {"id": "R2", "source": {"type": "folder", "path": "/srv/probe/R2"}},
            ]
        }
    )


def _serve(view: ReviewView) -> Iterator[str]:
    server = WebServer(
        HttpConfig(enabled=True, port=free_port()), view, RefusingCommands(), token=TOKEN
    )
    server.start()
    try:
        yield server.url.rstrip("/")
    finally:
        server.stop()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    store = InMemorySampleStore(tmp_path)
    _fill(store)
    view = ReviewView(settings=_settings_two_probes(), samples=store)
    for base in _serve(view):
        yield Running(base, store, view)


def call(
    url: str, *, method: str = "GET", headers: dict[str, str] | None = None, body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one request; HTTP errors are
    answers, not exceptions."""
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, _headers(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, _headers(error.headers), error.read()


def _headers(message: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in message.items()}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def get_json(url: str) -> tuple[int, Any]:
    status, _, body = call(url, headers=BEARER)
    return status, json.loads(body)


def post_json(url: str, payload: Any, headers: dict[str, str] = POST) -> tuple[int, Any]:
    status, _, body = call(url, method="POST", headers=headers, body=payload)
    return status, json.loads(body)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _ids(document: dict[str, Any]) -> list[int]:
    return [sample["id"] for sample in document["samples"]]


def test_the_queue_is_listed_with_iso_times_classes_and_counts(running: Running) -> None:
    status, document = get_json(f"{running.base}/api/samples")
    assert status == 200
    assert _ids(document) == list(range(1, 13))
    assert document["classes"] == ["CEX", "PG"]
    assert document["not_a_particle"] == NOT_A_PARTICLE
    assert document["reasons"] == list(REASONS)
    assert document["probes"] == ["R1", "R2"]
    assert document["label_counts"] == {"CEX": 0, "PG": 0, NOT_A_PARTICLE: 0}
    assert document["queue_counts"] == dict.fromkeys(REASONS, 3)
    assert document["next_after_id"] is None and document["limit"] == 200
    first = document["samples"][0]
    # Times as every API answer writes them: ISO 8601 UTC with milliseconds, to the ms.
    assert first["ts"] == "1970-01-12T12:47:40.000Z" and _epoch(first["ts"]) == T0 - 3540
    assert first["kept_at"] == "1970-01-12T12:47:40.250Z"
    assert first["labelled_at"] is None and first["label"] is None
    assert _epoch(document["now"]) == T0
    assert first["guess"] == "CEX" and first["confidence"] == pytest.approx(0.525)
    assert first["kept_because"] == "uncertain" and first["decision_reason"] == "low_confidence"
    assert first["probabilities"] == {"CEX": pytest.approx(0.525), "PG": pytest.approx(0.475)}


def test_the_filters_reach_the_store(running: Running) -> None:
    base = f"{running.base}/api/samples"
    assert _ids(get_json(f"{base}?probe=R2")[1]) == [2, 4, 6, 8, 10, 12]
    assert _ids(get_json(f"{base}?reason=boundary")[1]) == [3, 7, 11]
    assert _ids(get_json(f"{base}?probe=R1&reason=out_of_distribution")[1]) == []
    # since/until: ISO 8601 as the API writes times, or epoch seconds; both ends included.
    since = "1970-01-12T12:50:40.000Z"  # sample 4's frame time
    assert _ids(get_json(f"{base}?since={since}&until={T0 - 3600 + 360:.0f}")[1]) == [4, 5, 6]
    # Paging: limit and after_id, next_after_id saying where the next page starts.
    status, page = get_json(f"{base}?limit=5")
    assert status == 200 and _ids(page) == [1, 2, 3, 4, 5] and page["next_after_id"] == 5
    page = get_json(f"{base}?limit=5&after_id=10")[1]
    assert _ids(page) == [11, 12] and page["next_after_id"] is None
    # Labelled or not.
    running.store.set_label(3, "PG", operator="op-a", at=T0 - 10)
    assert _ids(get_json(f"{base}?labelled=true")[1]) == [3]
    assert 3 not in _ids(get_json(f"{base}?labelled=false")[1])
    document = get_json(f"{base}?labelled=true")[1]
    assert document["label_counts"]["PG"] == 1
    assert document["queue_counts"]["boundary"] == 2
    assert document["samples"][0]["labelled_at"] == "1970-01-12T13:46:30.000Z"


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("probe=R9", "probe must be one of R1, R2"),
        ("reason=bored", "reason must be one of uncertain, out_of_distribution, boundary"),
        ("since=yesterday", "since must be an ISO 8601 time (e.g. 2026-12-03T14:00:00Z)"),
        ("until=nan", "until must be a finite time"),
        ("since=2000&until=1000", "until must not be before since"),
        ("labelled=maybe", "labelled must be true or false"),
        ("limit=0", "limit must be a whole number from 1 to 1000"),
        ("limit=many", "limit must be a whole number from 1 to 1000"),
        ("after_id=-1", "after_id must be a whole number of at least 0"),
    ],
)
def test_a_bad_filter_is_a_400_naming_the_fix(running: Running, query: str, words: str) -> None:
    status, document = get_json(f"{running.base}/api/samples?{query}")
    assert status == 400
    assert words in document["error"], document


def test_a_label_and_its_undo_reach_the_store_with_the_operator(running: Running) -> None:
    url = f"{running.base}/api/samples/5"
    status, answer = post_json(f"{url}/label", {"label": "PG", "operator": "  op-anna "})
    assert status == 200, answer
    stored = running.store.samples[5]
    assert (stored.label, stored.labelled_by, stored.labelled_at) == ("PG", "op-anna", T0)
    assert answer["sample"]["label"] == "PG" and answer["sample"]["labelled_by"] == "op-anna"
    assert answer["sample"]["labelled_at"] == "1970-01-12T13:46:40.000Z"
    assert answer["label_counts"] == {"CEX": 0, "PG": 1, NOT_A_PARTICLE: 0}
    assert answer["queue_counts"] == {**dict.fromkeys(REASONS, 3), "uncertain": 2}

    status, answer = post_json(f"{url}/label", {"label": NOT_A_PARTICLE, "operator": "op-ben"})
    assert status == 200
    assert running.store.samples[5].label == NOT_A_PARTICLE
    assert running.store.samples[5].labelled_by == "op-ben"
    assert answer["label_counts"][NOT_A_PARTICLE] == 1 and answer["label_counts"]["PG"] == 0

    status, answer = post_json(f"{url}/unlabel", {"operator": "op-ben"})
    assert status == 200
    stored = running.store.samples[5]
    assert (stored.label, stored.labelled_by, stored.labelled_at) == (None, None, None)
    assert answer["sample"]["label"] is None
    assert answer["queue_counts"]["uncertain"] == 3
    # An undo needs no name (the label it undoes had one).
    assert post_json(f"{url}/unlabel", {})[0] == 200


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            {"label": "PG"},
            "'operator' (your name) must be 1 to 64 characters: enter it under Operator",
        ),
        ({"label": "PG", "operator": "   "}, "'operator' (your name)"),
        ({"label": "PG", "operator": "x" * 65}, "must be 1 to 64 characters"),
        ({"label": "Pg", "operator": "op"}, "'label' must be one of CEX, PG, _not_a_particle"),
        ({"label": 1, "operator": "op"}, "'label' must be one of CEX, PG, _not_a_particle"),
        ([1, 2], "the body must be a JSON object"),
    ],
)
def test_a_bad_label_is_a_400_naming_the_fix_and_changes_nothing(
    running: Running, body: Any, words: str
) -> None:
    status, answer = post_json(f"{running.base}/api/samples/2/label", body)
    assert status == 400
    assert words in answer["error"], answer
    assert running.store.samples[2].label is None


def test_an_unknown_crop_is_a_404(running: Running) -> None:
    label = {"label": "CEX", "operator": "op"}
    for sample_id in ("99", "abc", "-1", "1e3"):
        base = f"{running.base}/api/samples/{sample_id}"
        status, answer = post_json(f"{base}/label", label)
        assert status == 404 and "no review sample" in answer["error"], (sample_id, answer)
        assert post_json(f"{base}/unlabel", {})[0] == 404
        assert call(f"{base}/image", headers=BEARER)[0] == 404


def test_a_crop_comes_as_png_the_browser_may_keep(running: Running) -> None:
    url = f"{running.base}/api/samples/4/image"
    status, headers, body = call(url, headers=BEARER)
    assert status == 200 and headers["content-type"] == "image/png"
    assert headers["cache-control"] == "private, max-age=3600"
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.shape == (44, 40) and int(image[0, 0]) == 40
    # Revalidation after the hour: the same file answers 304.
    assert "etag" in headers
    status, _, body = call(url, headers={**BEARER, "If-None-Match": headers["etag"]})
    assert status == 304 and body == b""


def test_a_post_needs_json_and_the_cross_site_header(running: Running) -> None:
    url = f"{running.base}/api/samples/2/label"
    label = {"label": "CEX", "operator": "op"}
    assert post_json(url, label, headers={**BEARER, "Content-Type": "application/json"})[0] == 403
    status, _, _ = call(url, method="POST", headers={**POST}, body=b"{not json")
    assert status == 400
    assert running.store.samples[2].label is None


def test_without_a_review_queue_every_route_is_a_503_naming_the_key(tmp_path: Path) -> None:
    for base in _serve(ReviewView(samples=None)):
        answers = [
            get_json(f"{base}/api/samples"),
            post_json(f"{base}/api/samples/1/label", {"label": "CEX", "operator": "op"}),
            post_json(f"{base}/api/samples/1/unlabel", {}),
        ]
        status, _, body = call(f"{base}/api/samples/1/image", headers=BEARER)
        answers.append((status, json.loads(body)))
        for status, answer in answers:
            assert status == 503
            assert answer["error"].startswith("the review queue is disabled (review.enabled")
            assert "set review.enabled = true" in answer["error"]


def test_the_token_guards_the_labelling_page_and_api(running: Running) -> None:
    for path in ("/api/samples", "/api/samples/1/image", "/static/label.js"):
        assert call(f"{running.base}{path}")[0] == 401, path
    status, headers, _ = call(f"{running.base}/label")
    assert (status, headers["location"]) == (303, "/login")
    status, _, _ = call(
        f"{running.base}/api/samples/1/label",
        method="POST",
        headers={"Content-Type": "application/json", "X-Requested-By": "test"},
        body={"label": "CEX", "operator": "op"},
    )
    assert status == 401 and running.store.samples[1].label is None


def test_the_page_and_the_dashboard_link_to_each_other(running: Running) -> None:
    status, headers, page = call(f"{running.base}/label", headers=BEARER)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"]
    assert b'src="/static/label.js"' in page and b'href="/static/label.css"' in page
    assert b'<a href="/">Dashboard</a>' in page
    assert b"https://" not in page and b"http://" not in page
    dashboard = call(f"{running.base}/", headers=BEARER)[2]
    assert b'<a href="/label">Label crops</a>' in dashboard
    for asset in ("label.js", "label.css"):
        status, _, body = call(f"{running.base}/static/{asset}", headers=BEARER)
        assert status == 200 and len(body) > 1000 and b"https://" not in body
    # The page keeps the operator's name where the dashboard does.
    script = call(f"{running.base}/static/label.js", headers=BEARER)[2]
    dashboard_js = call(f"{running.base}/static/dashboard.js", headers=BEARER)[2]
    key = b'const OPERATOR_KEY = "crystal-monitor.operator";'
    assert key in script and key in dashboard_js
