"""The shadow API (/api/shadow) of the real HTTP server over a real shadow record (the
SQLite store the daemon writes) and a real review queue with labelled crops: the report's
windows per probe with agreement and each class's fraction under both models, the
difference with its interval, the labelled crops scored, the verdict with its reasons and
what runs now; every time ISO 8601 UTC; the since/until/window/candidate filters reach
the report; a bad parameter is a 400 naming the fix, no shadow a 503 saying how to set
one up; all of it behind the token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from monitor.aggregate.statistics import Z_95
from monitor.config.http import HttpConfig
from monitor.review.sample_store import NewSample, SampleStore
from monitor.shadow.comparison import FrameComparison
from monitor.shadow.store import CandidateCall, ShadowStore
from monitor.web.server import WebServer
from tests.fake_view import FakeView, RefusingCommands
from tests.mosquitto import free_port
from tests.test_label_api import BEARER, T0, TOKEN, _settings_two_probes, call, get_json

LIVE = "cex-pg-lite0-96:2.0:0123456789ab"
CANDIDATE = "cex-pg-site-b:2.1:fedcba987654"
OLDER = "cex-pg-site-b:2.0:aaaaaaaaaaaa"
CLASSES = ("CEX", "PG")
WINDOW_S = 300.0
W0 = 996_300.0
"""The first of the candidate's four windows (aligned: 3321 x 300 s), 12:45:00Z."""
CROPS_PER_FRAME = 20
RUNNING = {
    "candidate": CANDIDATE,
    "path": "/var/lib/crystal-monitor/models/site-b-2.1",
    "share": 0.25,
    "window_s": WINDOW_S,
    "compared": 52,
    "skipped": 3,
    "failed": 1,
    "labelled_scored": 60,
}
# PG crops under the candidate in each frame of a four-frame cycle: R1 agrees with the
# live model on average (4 of 20 PG either way), R2 sees twice the PG share (8 of 20).
R1_CANDIDATE_PG = (4, 5, 3, 4)
R2_CANDIDATE_PG = (8, 9, 7, 8)
LIVE_PG = 4


def _frame(probe: str, ts: float, candidate_pg: int) -> FrameComparison:
    return FrameComparison(
        probe=probe,
        ts=ts,
        crops=CROPS_PER_FRAME,
        agreed=CROPS_PER_FRAME - abs(candidate_pg - LIVE_PG),
        live_counts=(CROPS_PER_FRAME - LIVE_PG, LIVE_PG),
        candidate_counts=(CROPS_PER_FRAME - candidate_pg, candidate_pg),
    )


def _frames(probe: str, start: float, n: int, cycle: tuple[int, ...]) -> list[FrameComparison]:
    """`n` frames of one probe, 25 s apart from 10 s into the window at `start`."""
    return [_frame(probe, start + 10 + 25 * i, cycle[i % len(cycle)]) for i in range(n)]


def fill_shadow(shadow: ShadowStore, samples: SampleStore) -> None:
    """The record of a shadow run:

    - the older candidate OLDER, one window of R1 before W0 (12 frames, all agreeing);
    - CANDIDATE: R1 in W0, W1, W2 (12 frames each, full) and 4 frames in W3; R2 in W3
      (12 frames, full) where the candidate calls twice the live model's PG share;
    - 60 labelled review crops scored by CANDIDATE: 36 both models right, 14 only the
      candidate, 4 only the live model, 6 neither.
    """
    rows = [
        (f, f"R1_{f.ts:.0f}.tif", LIVE, OLDER, CLASSES) for f in _frames("R1", W0 - 300, 12, (4,))
    ]
    frames = [
        *[frame for w in range(3) for frame in _frames("R1", W0 + 300 * w, 12, R1_CANDIDATE_PG)],
        *_frames("R1", W0 + 900, 4, R1_CANDIDATE_PG),
        *_frames("R2", W0 + 900, 12, R2_CANDIDATE_PG),
    ]
    rows += [(f, f"{f.probe}_{f.ts:.0f}.tif", LIVE, CANDIDATE, CLASSES) for f in frames]
    shadow.add_frames(rows, recorded_at=T0 - 60)

    outcomes = [(True, True)] * 36 + [(False, True)] * 14 + [(True, False)] * 4
    outcomes += [(False, False)] * 6
    calls = []
    for i, (live_right, candidate_right) in enumerate(outcomes):
        label = CLASSES[i % 2]
        other = CLASSES[(i + 1) % 2]
        sample_id = samples.add(
            NewSample(
                probe="R1",
                frame_key=f"R1_{i:06d}.tif",
                ts=W0 + 10 * i,
                batch="B-0412",
                bbox=(4 * i, 8, 48, 48),
                model=LIVE,
                guess=label if live_right else other,
                confidence=0.9,
                probabilities={label if live_right else other: 0.9},
                status="ok",
                decision_reason=None,
                ood_score=None,
                kept_because="random",
                kept_at=W0 + 10 * i + 0.5,
            ),
            np.full((48, 48), 100 + i, np.uint8),
        )
        samples.set_label(sample_id, label, operator="op-anna", at=T0 - 600)
        calls.append(CandidateCall(sample_id, label if candidate_right else other, "ok"))
    shadow.add_labelled(CANDIDATE, calls, at=T0 - 300)


def serve(view: FakeView) -> Iterator[str]:
    """The real server over `view`, behind TOKEN; yields its base URL."""
    server = WebServer(
        HttpConfig(enabled=True, port=free_port()), view, RefusingCommands(), token=TOKEN
    )
    server.start()
    try:
        yield server.url.rstrip("/")
    finally:
        server.stop()


@dataclass
class Running:
    base: str
    view: FakeView


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    shadow = ShadowStore(tmp_path / "shadow")
    samples = SampleStore(tmp_path / "samples", CLASSES)
    fill_shadow(shadow, samples)
    view = FakeView(
        settings=_settings_two_probes(),
        shadow=shadow,
        shadow_samples=samples,
        shadow_running=dict(RUNNING),
        shadow_window_s=WINDOW_S,
    )
    try:
        for base in serve(view):
            yield Running(base, view)
    finally:
        shadow.close()
        samples.close()


def _windows(document: dict[str, Any]) -> list[tuple[str, str, str, int, int]]:
    return [
        (w["probe"], w["start"], w["end"], w["frames"], w["crops"]) for w in document["windows"]
    ]


def _numbers(value: Any) -> Iterator[float]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


def test_the_report_has_its_windows_fractions_labels_and_verdict_with_iso_times(
    running: Running,
) -> None:
    status, document = get_json(f"{running.base}/api/shadow")
    assert status == 200, document
    assert document["candidate"] == CANDIDATE
    assert document["candidates"] == [OLDER, CANDIDATE]  # the newest last
    assert document["live_models"] == [LIVE]
    assert document["classes"] == list(CLASSES)
    # No window asked for: the configured model.shadow.window.
    assert document["window_s"] == WINDOW_S
    assert running.view.shadow_asked[-1] == {
        "since": None,
        "until": None,
        "window_s": None,
        "candidate": None,
    }
    assert document["since"] is None and document["until"] is None
    assert document["now"] == "1970-01-12T13:46:40.000Z"  # the daemon's clock, T0
    assert document["frames"] == 52 and document["crops"] == 52 * CROPS_PER_FRAME
    # Agreed: R1 78 of 80 per four frames (40 frames), R2 64 of 80 (12 frames).
    assert document["agreement"] == pytest.approx((10 * 78 + 3 * 64) / 1040, abs=1e-6)

    # Windows in time order, then by probe; their start and end as ISO 8601 UTC.
    assert _windows(document) == [
        ("R1", "1970-01-12T12:45:00.000Z", "1970-01-12T12:50:00.000Z", 12, 240),
        ("R1", "1970-01-12T12:50:00.000Z", "1970-01-12T12:55:00.000Z", 12, 240),
        ("R1", "1970-01-12T12:55:00.000Z", "1970-01-12T13:00:00.000Z", 12, 240),
        ("R1", "1970-01-12T13:00:00.000Z", "1970-01-12T13:05:00.000Z", 4, 80),
        ("R2", "1970-01-12T13:00:00.000Z", "1970-01-12T13:05:00.000Z", 12, 240),
    ]
    # No epoch second is left in the answer: every time went out as ISO.
    assert max(_numbers(document)) < 10_000

    same = document["windows"][0]
    assert same["agreement"] == pytest.approx(0.975)
    for name, share in (("CEX", 0.8), ("PG", 0.2)):
        figures = same["classes"][name]
        assert figures["live"] == pytest.approx(share)
        assert figures["candidate"] == pytest.approx(share)
        assert figures["difference"] == pytest.approx(0.0, abs=1e-9)
        low, high = figures["difference_ci"]
        assert low < 0 < high and low == pytest.approx(-high)
        assert figures["significant"] is False

    differing = document["windows"][4]
    assert differing["agreement"] == pytest.approx(0.8)
    # Frames are the clusters: scores (c_i - 8) / 240 per frame, c_i of 8, 9, 7, 8.
    half = Z_95 * math.sqrt(12 / 11 * 6) / 240
    pg = differing["classes"]["PG"]
    assert (pg["live"], pg["candidate"]) == (pytest.approx(0.2), pytest.approx(0.4))
    assert pg["difference"] == pytest.approx(0.2)
    # Six significant digits on the wire (monitor.wire).
    assert pg["difference_ci"] == [
        pytest.approx(0.2 - half, abs=1e-6),
        pytest.approx(0.2 + half, abs=1e-6),
    ]
    assert pg["significant"] is True
    cex = differing["classes"]["CEX"]
    assert cex["difference"] == pytest.approx(-0.2) and cex["significant"] is True

    assert document["labelled"] == {
        "crops": 60,
        "live_accuracy": pytest.approx(40 / 60, abs=1e-6),
        "candidate_accuracy": pytest.approx(50 / 60, abs=1e-6),
        "only_live_right": 4,
        "only_candidate_right": 14,
        # Exact McNemar: 2 * P(X <= 4), X ~ Binomial(18, 1/2).
        "mcnemar_p": pytest.approx(2 * 4048 / 2**18, abs=1e-7),
    }
    verdict = document["verdict"]
    assert verdict["promote"] is True
    assert (verdict["full_windows"], verdict["differing_windows"]) == (4, 1)
    assert len(verdict["reasons"]) == 1
    assert "fractions differ in 1 full windows" in verdict["reasons"][0]
    assert "candidate right more often (McNemar p = 0.0309)" in verdict["reasons"][0]
    assert verdict["checks"]["better_on_labels"] is True
    assert verdict["checks"]["fractions_agree"] is False
    assert document["rule"]["min_full_windows"] == 3
    assert document["running"] == RUNNING


def test_since_and_until_cut_the_record_and_the_verdict_follows(running: Running) -> None:
    base = f"{running.base}/api/shadow"
    status, document = get_json(f"{base}?since=1970-01-12T12:55:00Z")
    assert status == 200, document
    assert running.view.shadow_asked[-1]["since"] == W0 + 600
    assert document["since"] == "1970-01-12T12:55:00.000Z" and document["until"] is None
    assert [(w["probe"], w["start"]) for w in document["windows"]] == [
        ("R1", "1970-01-12T12:55:00.000Z"),
        ("R1", "1970-01-12T13:00:00.000Z"),
        ("R2", "1970-01-12T13:00:00.000Z"),
    ]
    verdict = document["verdict"]
    assert verdict["promote"] is False and verdict["full_windows"] == 2
    assert verdict["checks"]["enough_windows"] is False
    (reason,) = verdict["reasons"]
    assert reason.startswith("2 full windows (>= 200 compared crops")
    assert "3 needed: let the shadow run longer or raise model.shadow.share" in reason

    # Epoch seconds work as well; until is exclusive: only W2 of R1 is left.
    status, document = get_json(f"{base}?since={W0 + 600:.0f}&until=1970-01-12T13:00:00.000Z")
    assert status == 200
    asked = running.view.shadow_asked[-1]
    assert (asked["since"], asked["until"]) == (W0 + 600, W0 + 900)
    assert document["until"] == "1970-01-12T13:00:00.000Z"
    assert _windows(document) == [
        ("R1", "1970-01-12T12:55:00.000Z", "1970-01-12T13:00:00.000Z", 12, 240)
    ]
    assert document["frames"] == 12 and document["verdict"]["full_windows"] == 1


def test_the_window_parameter_regroups_the_frames(running: Running) -> None:
    for window in ("10m", "600", "600s"):
        status, document = get_json(f"{running.base}/api/shadow?window={window}")
        assert status == 200, document
        assert running.view.shadow_asked[-1]["window_s"] == 600.0
        assert document["window_s"] == 600
        # Aligned 600 s windows: W0 alone, W1 with W2, W3.
        assert _windows(document) == [
            ("R1", "1970-01-12T12:40:00.000Z", "1970-01-12T12:50:00.000Z", 12, 240),
            ("R1", "1970-01-12T12:50:00.000Z", "1970-01-12T13:00:00.000Z", 24, 480),
            ("R1", "1970-01-12T13:00:00.000Z", "1970-01-12T13:10:00.000Z", 4, 80),
            ("R2", "1970-01-12T13:00:00.000Z", "1970-01-12T13:10:00.000Z", 12, 240),
        ]
    document = get_json(f"{running.base}/api/shadow?window=1h")[1]
    # Aligned hours: 12:00 to 13:00 holds W0 to W2 of R1.
    assert [w["frames"] for w in document["windows"]] == [36, 4, 12]


def test_an_older_candidate_is_reported_on_its_own_frames(running: Running) -> None:
    status, document = get_json(f"{running.base}/api/shadow?candidate={OLDER}")
    assert status == 200, document
    assert running.view.shadow_asked[-1]["candidate"] == OLDER
    assert document["candidate"] == OLDER
    assert _windows(document) == [
        ("R1", "1970-01-12T12:40:00.000Z", "1970-01-12T12:45:00.000Z", 12, 240)
    ]
    assert document["windows"][0]["agreement"] == 1.0
    assert document["labelled"]["crops"] == 0  # its calls on the labelled crops: none
    reasons = document["verdict"]["reasons"]
    assert document["verdict"]["promote"] is False
    assert any(
        r.startswith("0 labelled crops scored by both models, 50 needed: label more crops")
        for r in reasons
    ), reasons


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("since=yesterday", "since must be an ISO 8601 time (e.g. 2026-12-03T14:00:00Z)"),
        ("until=nan", "until must be a finite time"),
        ("since=1e20", "since lies outside the years 1 to 9999"),
        ("since=2000&until=1000", "until must be after since"),
        ("since=2000&until=2000", "until must be after since"),
        ("window=fast", "window must be a duration from 10 s to 30 days, in seconds or like '5m'"),
        ("window=5s", "window must be a duration from 10 s to 30 days"),
        ("window=-5m", "window must be a duration from 10 s to 30 days"),
        ("window=90d", "window must be a duration from 10 s to 30 days"),
        ("candidate=" + "x" * 201, "candidate must be a model label (name:version:sha12)"),
        (
            "candidate=cex-pg:9.9:000000000000",
            f"no shadow record of candidate 'cex-pg:9.9:000000000000': candidate must be one "
            f"of {OLDER}, {CANDIDATE} (or left out for the newest)",
        ),
    ],
)
def test_a_bad_parameter_is_a_400_naming_the_fix(running: Running, query: str, words: str) -> None:
    status, document = get_json(f"{running.base}/api/shadow?{query}")
    assert status == 400
    assert words in document["error"], document


def test_without_a_shadow_the_api_is_a_503_saying_how_to_set_one_up() -> None:
    view = FakeView(shadow=None)
    for base in serve(view):
        status, document = get_json(f"{base}/api/shadow")
        assert status == 503
        assert document["error"].startswith("no shadow model: set [model.shadow] path = ")
        assert "reload (systemctl reload crystal-monitor)" in document["error"]
        assert view.shadow_asked  # the view was asked, and said there is none
        # The parameters are read before the record: a bad one is still a 400.
        assert get_json(f"{base}/api/shadow?window=soon")[0] == 400


def test_before_the_first_comparison_the_report_says_so(tmp_path: Path) -> None:
    shadow = ShadowStore(tmp_path / "shadow")
    view = FakeView(shadow=shadow, shadow_running={**RUNNING, "compared": 0})
    try:
        for base in serve(view):
            status, document = get_json(f"{base}/api/shadow")
            assert status == 200, document
            assert document["candidate"] is None and document["candidates"] == []
            assert document["windows"] == [] and document["note"] == "no frame compared yet"
            assert document["running"]["candidate"] == CANDIDATE
            assert document["running"]["compared"] == 0
            # The running candidate may be asked for by name before its first frame.
            assert get_json(f"{base}/api/shadow?candidate={CANDIDATE}")[0] == 200
            status, document = get_json(f"{base}/api/shadow?candidate={OLDER}")
            assert status == 400
            assert "no candidate has been compared yet" in document["error"]
    finally:
        shadow.close()


def test_the_token_guards_the_shadow_page_and_api(running: Running) -> None:
    asked = len(running.view.shadow_asked)
    for path in ("/api/shadow", "/api/shadow?window=5m", "/static/shadow.js"):
        status, headers, _ = call(f"{running.base}{path}")
        assert status == 401, path
        assert headers["www-authenticate"] == 'Bearer realm="crystal-monitor"'
    status, _, _ = call(f"{running.base}/api/shadow", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    assert len(running.view.shadow_asked) == asked  # refused before the report was made
    status, headers, _ = call(f"{running.base}/shadow")
    assert (status, headers["location"]) == (303, "/login")


def test_the_page_is_served_and_every_page_links_to_it(running: Running) -> None:
    status, headers, page = call(f"{running.base}/shadow", headers=BEARER)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert headers["cache-control"] == "no-store"
    assert "script-src 'self'" in headers["content-security-policy"]
    assert b'src="/static/shadow.js"' in page and b'href="/static/shadow.css"' in page
    assert b'href="/static/dashboard.css"' in page
    assert b'<a href="/shadow" aria-current="page">Shadow model</a>' in page
    assert b"https://" not in page and b"http://" not in page
    for path in ("/", "/label"):
        other = call(f"{running.base}{path}", headers=BEARER)[2]
        assert b'<a href="/shadow">Shadow model</a>' in other, path
    for asset in ("shadow.js", "shadow.css"):
        status, _, body = call(f"{running.base}/static/{asset}", headers=BEARER)
        assert status == 200 and len(body) > 1000 and b"https://" not in body
