"""The shadow comparison (issue 14): per-window fractions, agreement and the
frame-clustered interval for the difference checked by hand and by simulation, windows,
McNemar, the promotion verdict with each of its reasons, the shadow record over a real
SQLite file, and the report over a real shadow record and a real review sample store."""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from monitor.aggregate.statistics import Z_95
from monitor.review.sample_store import NewSample, SampleStore
from monitor.shadow.comparison import (
    ClassDifference,
    FrameComparison,
    LabelledScore,
    PromotionRule,
    WindowComparison,
    compare_window,
    differing_windows,
    mcnemar_exact,
    promotion_verdict,
    score_labelled,
    windows_of,
)
from monitor.shadow.report import shadow_report
from monitor.shadow.store import CandidateCall, ShadowStore, ShadowStoreError

CLASSES = ("CEX", "PG")
LIVE = "cex-pg:1.0:aaaaaaaaaaaa"
CANDIDATE = "cex-pg-site:2.0:bbbbbbbbbbbb"
OLDER_CANDIDATE = "cex-pg-site:1.9:cccccccccccc"


def _frame(
    live: tuple[int, int],
    candidate: tuple[int, int],
    *,
    crops: int | None = None,
    agreed: int | None = None,
    ts: float = 0.0,
    probe: str = "R1",
) -> FrameComparison:
    """A frame whose crops all got a certain call unless `crops` says more were seen."""
    crops = max(sum(live), sum(candidate)) if crops is None else crops
    return FrameComparison(probe, ts, crops, crops if agreed is None else agreed, live, candidate)


def _compare(frames: list[FrameComparison]) -> WindowComparison:
    return compare_window("R1", start=0.0, end=300.0, frames=frames, classes=CLASSES)


def _pg(window: WindowComparison) -> ClassDifference:
    return window.classes[CLASSES.index("PG")]


# -- compare_window -----------------------------------------------------------------------


def test_fractions_agreement_and_interval_match_the_delta_method_by_hand() -> None:
    """Three frames; each model's fraction counts only the crops it was sure of."""
    frames = [
        _frame((8, 1), (7, 2), crops=10, agreed=8),
        _frame((4, 1), (3, 2), crops=5, agreed=4),
        _frame((5, 0), (4, 0), crops=5, agreed=4),  # the candidate unsure of one crop
    ]
    window = _compare(frames)
    assert (window.frames, window.crops, window.agreed) == (3, 20, 16)
    assert window.agreement == pytest.approx(16 / 20)

    # Sure calls: live 9 + 5 + 5 = 19 crops, 2 PG; candidate 9 + 5 + 4 = 18, 4 PG.
    live, candidate = 2 / 19, 4 / 18
    pg = _pg(window)
    assert pg.live == pytest.approx(live)
    assert pg.candidate == pytest.approx(candidate)
    assert pg.difference == pytest.approx(4 / 18 - 2 / 19)  # = 20/171
    # Each frame's linearised contribution: (y - R x) / X for the candidate minus the same
    # for the live model, y = the frame's PG calls, x = its sure calls, X = the window's.
    s1 = (2 - candidate * 9) / 18 - (1 - live * 9) / 19  # = 0 - 1/361
    s2 = (2 - candidate * 5) / 18 - (1 - live * 5) / 19  # = 4/81 - 9/361
    s3 = (0 - candidate * 4) / 18 - (0 - live * 5) / 19  # = -4/81 + 10/361
    assert s1 + s2 + s3 == pytest.approx(0.0, abs=1e-15)
    variance = 3 / (3 - 1) * (s1**2 + s2**2 + s3**2)
    half = Z_95 * math.sqrt(variance)
    assert pg.low == pytest.approx(20 / 171 - half)
    assert pg.high == pytest.approx(20 / 171 + half)
    assert half == pytest.approx(0.07873, abs=1e-5)
    assert pg.significant  # 0.117 +- 0.079: the interval excludes 0
    # With two classes CEX's shares are 1 - PG's: the mirror difference, the same width.
    cex = window.classes[0]
    assert cex.difference == pytest.approx(-20 / 171)
    assert cex.high - cex.low == pytest.approx(2 * half)


def test_identical_models_differ_by_zero_with_an_interval_of_width_zero() -> None:
    frames = [_frame((9 - i % 4, i % 4), (9 - i % 4, i % 4), ts=i) for i in range(20)]
    window = _compare(frames)
    assert window.agreement == 1.0
    for difference in window.classes:
        assert difference.live == difference.candidate
        assert difference.difference == 0.0
        assert (difference.low, difference.high) == (0.0, 0.0)
        assert not difference.significant


def test_ten_percent_more_pg_in_every_one_of_thirty_frames_is_significant() -> None:
    """Frames of 20 to 39 crops; in each the candidate calls a tenth of them (rounded)
    PG that the live model called CEX."""
    rng = np.random.default_rng(3)
    frames = []
    for i in range(30):
        size = 20 + i % 20
        pg = int(rng.binomial(size, 0.05))
        extra = round(0.1 * size)
        frames.append(
            _frame((size - pg, pg), (size - pg - extra, pg + extra), agreed=size - extra, ts=i)
        )
    pg = _pg(_compare(frames))
    assert pg.difference == pytest.approx(0.1, abs=0.01)
    assert pg.significant
    assert 0.0 < pg.low < pg.difference < pg.high


def test_a_difference_in_one_frame_gives_a_wider_interval_than_the_same_spread_out() -> None:
    """Frames are the clusters: 15 more PG calls in one frame of 30 is one event; one more
    in each of 15 frames is fifteen."""
    base = (19, 1)
    clustered = [_frame(base, (4, 16) if i == 0 else base, ts=i) for i in range(30)]
    spread = [_frame(base, (18, 2) if i % 2 else base, ts=i) for i in range(30)]
    one, many = _pg(_compare(clustered)), _pg(_compare(spread))
    assert one.difference == pytest.approx(15 / 600)
    assert many.difference == pytest.approx(15 / 600)
    # By hand: scores (d_f - 0.5) / 600 with d_f the frame's extra PG calls.
    clustered_half = Z_95 * math.sqrt(30 / 29 * (14.5**2 + 29 * 0.5**2)) / 600
    spread_half = Z_95 * math.sqrt(30 / 29 * 30 * 0.5**2) / 600
    assert one.high - one.low == pytest.approx(2 * clustered_half)
    assert many.high - many.low == pytest.approx(2 * spread_half)
    assert one.high - one.low > 5 * (many.high - many.low)
    assert not one.significant
    assert many.significant


def test_fewer_than_two_frames_gives_fractions_but_no_interval() -> None:
    pg = _pg(_compare([_frame((150, 50), (140, 60))]))
    assert pg.difference == pytest.approx(0.05)
    assert (pg.low, pg.high) == (None, None)
    assert not pg.significant
    empty = _compare([])
    assert (empty.frames, empty.crops, empty.agreement) == (0, 0, None)
    assert all(c.difference is None for c in empty.classes)


def test_no_fraction_and_no_difference_when_a_model_was_sure_of_no_crop() -> None:
    """All crops uncertain under both: no fraction at all; under one: no difference."""
    unsure = _compare([_frame((0, 0), (0, 0), crops=5, agreed=5, ts=i) for i in range(4)])
    assert unsure.agreement == 1.0
    for difference in unsure.classes:
        assert difference == ClassDifference(difference.name, None, None, None, None, None)
    one_sided = _pg(_compare([_frame((0, 0), (3, 2), crops=5, agreed=0, ts=i) for i in range(4)]))
    assert (one_sided.live, one_sided.candidate) == (None, pytest.approx(0.4))
    assert one_sided.difference is None
    assert not one_sided.significant


def test_the_interval_covers_a_true_difference_of_zero_about_95_percent_of_the_time() -> None:
    """400 windows of 30 frames; both models draw their PG calls from the same per-frame
    process (frame sizes vary, each frame its own PG rate, each model sure of 90 %)."""
    rng = np.random.default_rng(20261214)
    covered = 0
    windows = 400
    for _ in range(windows):
        sizes = rng.integers(5, 40, size=30)
        rates = rng.beta(2, 18, size=30)  # mean 10 % PG, overdispersed between frames
        frames = []
        for size, rate in zip(sizes, rates, strict=True):
            calls = []
            for _model in range(2):
                sure = int(rng.binomial(size, 0.9))
                pg = int(rng.binomial(sure, rate))
                calls.append((sure - pg, pg))
            frames.append(_frame(calls[0], calls[1], crops=int(size), agreed=0))
        pg_difference = _pg(_compare(frames))
        assert pg_difference.low is not None
        assert pg_difference.high is not None
        covered += pg_difference.low <= 0.0 <= pg_difference.high
    assert 0.90 <= covered / windows <= 0.99


# -- windows_of ---------------------------------------------------------------------------


def test_windows_group_frames_by_probe_and_aligned_start_in_time_order() -> None:
    frames = [
        _frame((9, 1), (9, 1), ts=610.0, probe="R1"),
        _frame((9, 1), (8, 2), ts=100.0, probe="R2"),
        _frame((9, 1), (9, 1), ts=350.0, probe="R1"),
        _frame((8, 2), (8, 2), ts=120.0, probe="R1"),
        _frame((7, 3), (7, 3), ts=299.9, probe="R1"),
    ]
    windows = windows_of(frames, CLASSES, 300.0)
    assert [(w.probe, w.start, w.end, w.frames) for w in windows] == [
        ("R1", 0.0, 300.0, 2),
        ("R2", 0.0, 300.0, 1),
        ("R1", 300.0, 600.0, 1),
        ("R1", 600.0, 900.0, 1),
    ]
    assert _pg(windows[0]).live == pytest.approx(5 / 20)
    assert _pg(windows[1]).candidate == pytest.approx(0.2)
    assert windows_of([], CLASSES, 300.0) == []


# -- McNemar ------------------------------------------------------------------------------


def test_mcnemar_exact_p_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(5, 5) == 1.0
    stats = pytest.importorskip("scipy.stats")
    for b in range(0, 25, 3):
        for c in range(0, 25, 4):
            if b + c:
                expected = stats.binomtest(b, b + c, 0.5).pvalue
                assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9), (b, c)


def test_mcnemar_exact_on_more_than_1024_discordant_crops() -> None:
    """A large review store: 2**n no longer fits a float from n = 1024."""
    assert mcnemar_exact(600, 600) == 1.0
    stats = pytest.importorskip("scipy.stats")
    expected = stats.binomtest(560, 1200, 0.5).pvalue
    assert mcnemar_exact(560, 640) == pytest.approx(expected, rel=1e-6)


def test_score_labelled_counts_right_and_discordant_crops() -> None:
    score = score_labelled(
        [("PG", True, True), ("PG", False, True), ("CEX", True, False), ("CEX", False, False)]
    )
    assert score == LabelledScore(4, 2, 2, 1, 1)
    assert (score.live_accuracy, score.candidate_accuracy) == (0.5, 0.5)
    assert score.p_value == 1.0
    assert score_labelled([]).live_accuracy is None


# -- promotion_verdict --------------------------------------------------------------------


def _window(crops: int, *, differs: bool = False, frames: int = 30) -> WindowComparison:
    low, high = (0.01, 0.05) if differs else (-0.01, 0.02)
    pg = ClassDifference("PG", 0.03, 0.03 + (low + high) / 2, (low + high) / 2, low, high)
    cex = ClassDifference("CEX", 0.97, 0.97 - (low + high) / 2, -(low + high) / 2, -high, -low)
    return WindowComparison("R1", 0.0, 300.0, frames, crops, crops, (cex, pg))


RULE = PromotionRule()
FULL = [_window(200), _window(250), _window(400)]
LABELS_EQUAL = LabelledScore(60, 50, 50, 2, 2)


def test_promotion_rule_defaults() -> None:
    defaults = (RULE.min_window_crops, RULE.min_full_windows, RULE.min_labelled, RULE.alpha)
    assert defaults == (200, 3, 50, 0.05)


def test_promote_when_fractions_agree_and_the_candidate_is_not_worse() -> None:
    verdict = promotion_verdict(FULL, LABELS_EQUAL, RULE)
    assert verdict.promote
    assert (verdict.full_windows, verdict.differing_windows) == (3, 0)
    assert verdict.reasons == (
        "fractions agree within their intervals and the candidate is not worse on labelled crops",
    )
    assert verdict.checks == {
        "enough_windows": True,
        "enough_labels": True,
        "not_worse_on_labels": True,
        "better_on_labels": False,
        "fractions_agree": True,
    }


def test_promote_when_fractions_differ_and_the_labels_show_the_candidate_better() -> None:
    better = LabelledScore(60, 40, 52, 1, 13)
    assert better.p_value < 0.05
    windows = [_window(300, differs=True), *FULL]
    verdict = promotion_verdict(windows, better, RULE)
    assert verdict.promote
    assert (verdict.full_windows, verdict.differing_windows) == (4, 1)
    assert verdict.checks["better_on_labels"]
    assert not verdict.checks["fractions_agree"]
    (reason,) = verdict.reasons
    assert reason.startswith("fractions differ in 1 full windows")
    assert f"McNemar p = {better.p_value:.3g}" in reason


def test_no_promotion_with_too_few_full_windows_names_the_fix() -> None:
    """Small windows and windows of one frame (no interval) are no evidence."""
    windows = [_window(200), _window(199), _window(10_000, frames=1), _window(500)]
    verdict = promotion_verdict(windows, LABELS_EQUAL, RULE)
    assert not verdict.promote
    assert verdict.full_windows == 2
    assert not verdict.checks["enough_windows"]
    (reason,) = verdict.reasons
    assert reason.startswith("2 full windows (>= 200 compared crops from 2 or more frames), 3")
    assert "let the shadow run longer or raise model.shadow.share" in reason


def test_no_promotion_with_too_few_labels_names_the_fix() -> None:
    verdict = promotion_verdict(FULL, LabelledScore(49, 45, 49, 0, 4), RULE)
    assert not verdict.promote
    assert not verdict.checks["enough_labels"]
    (reason,) = verdict.reasons
    assert reason == (
        "49 labelled crops scored by both models, 50 needed: label more crops on /label"
    )


def test_no_promotion_when_the_candidate_is_worse_on_labels_names_the_fix() -> None:
    verdict = promotion_verdict(FULL, LabelledScore(60, 55, 50, 6, 1), RULE)
    assert not verdict.promote
    assert not verdict.checks["not_worse_on_labels"]
    (reason,) = verdict.reasons
    assert reason.startswith(
        "the candidate is right on 50 of 60 labelled crops, the live model on 55"
    )
    assert "keep the live model; retrain the candidate" in reason
    assert "crystal-monitor samples export" in reason


def test_no_promotion_when_fractions_differ_without_a_significant_labelled_gain() -> None:
    slightly_better = LabelledScore(60, 50, 52, 3, 5)
    assert slightly_better.p_value == pytest.approx(2 * (1 + 8 + 28 + 56) / 256)
    windows = [*FULL[:2], _window(200, differs=True), _window(900, differs=True)]
    verdict = promotion_verdict(windows, slightly_better, RULE)
    assert not verdict.promote
    assert (verdict.full_windows, verdict.differing_windows) == (4, 2)
    assert verdict.checks["not_worse_on_labels"]
    assert not verdict.checks["better_on_labels"]
    (reason,) = verdict.reasons
    assert reason.startswith("2 full windows show a class fraction differing beyond its interval")
    assert "McNemar p = 0.727, 0.05 needed" in reason
    assert reason.endswith("label more crops where the two disagree")


def test_a_differing_window_below_the_full_size_does_not_block_promotion() -> None:
    verdict = promotion_verdict([*FULL, _window(199, differs=True)], LABELS_EQUAL, RULE)
    assert verdict.promote
    assert verdict.differing_windows == 0


def test_every_missing_piece_of_evidence_is_named_at_once() -> None:
    verdict = promotion_verdict([], LabelledScore(0, 0, 0, 0, 0), RULE)
    assert not verdict.promote
    assert len(verdict.reasons) == 2
    assert "model.shadow.share" in verdict.reasons[0]
    assert "/label" in verdict.reasons[1]


# -- the shadow record --------------------------------------------------------------------


def _row(
    ts: float, candidate: str = CANDIDATE, probe: str = "R1", live: tuple[int, int] = (9, 1)
) -> tuple[FrameComparison, str, str, str, tuple[str, ...]]:
    comparison = FrameComparison(probe, ts, 11, 10, live, (8, 2))
    return comparison, f"{probe}/frame-{ts:.0f}.png", LIVE, candidate, CLASSES


def test_frames_round_trip_with_time_and_candidate_filters(tmp_path: Path) -> None:
    store = ShadowStore(tmp_path / "shadow")
    assert store.frames() == []
    assert store.classes() is None
    assert store.candidates() == []
    store.add_frames([_row(30.0), _row(10.0, OLDER_CANDIDATE), _row(20.0, probe="R2")], 99.0)
    store.add_frames([_row(40.0)], 100.0)
    everything = store.frames()
    assert [frame.ts for frame, _, _ in everything] == [10.0, 20.0, 30.0, 40.0]
    first, live, candidate = everything[0]
    assert first == FrameComparison("R1", 10.0, 11, 10, (9, 1), (8, 2))
    assert (live, candidate) == (LIVE, OLDER_CANDIDATE)
    assert [f.ts for f, _, _ in store.frames(since=20.0, until=40.0)] == [20.0, 30.0]
    assert [f.ts for f, _, _ in store.frames(since=20.0)] == [20.0, 30.0, 40.0]
    assert [f.ts for f, _, _ in store.frames(until=20.0)] == [10.0]
    only = store.frames(candidate_model=CANDIDATE)
    assert [(f.probe, f.ts) for f, _, _ in only] == [("R2", 20.0), ("R1", 30.0), ("R1", 40.0)]
    assert store.candidates() == [OLDER_CANDIDATE, CANDIDATE]
    assert store.classes() == CLASSES
    store.close()
    reopened = ShadowStore(tmp_path / "shadow", create=False)
    assert len(reopened.frames()) == 4
    reopened.close()


def test_candidates_are_ordered_by_their_latest_frame(tmp_path: Path) -> None:
    store = ShadowStore(tmp_path)
    store.add_frames([_row(10.0, CANDIDATE), _row(20.0, OLDER_CANDIDATE)], 1.0)
    assert store.candidates() == [CANDIDATE, OLDER_CANDIDATE]
    store.add_frames([_row(30.0, CANDIDATE)], 2.0)
    assert store.candidates() == [OLDER_CANDIDATE, CANDIDATE]
    store.close()


def test_labelled_calls_round_trip_per_candidate_and_a_rescore_replaces(tmp_path: Path) -> None:
    store = ShadowStore(tmp_path)
    assert store.labelled(CANDIDATE) == {}
    assert store.last_scored(CANDIDATE) == 0
    store.add_labelled(
        CANDIDATE, [CandidateCall(3, "PG", "ok"), CandidateCall(7, "CEX", "uncertain")], 5.0
    )
    store.add_labelled(OLDER_CANDIDATE, [CandidateCall(9, "CEX", "ok")], 5.0)
    assert store.labelled(CANDIDATE) == {
        3: CandidateCall(3, "PG", "ok"),
        7: CandidateCall(7, "CEX", "uncertain"),
    }
    assert store.last_scored(CANDIDATE) == 7
    assert store.last_scored(OLDER_CANDIDATE) == 9
    store.add_labelled(CANDIDATE, [CandidateCall(3, "CEX", "ok")], 6.0)
    assert store.labelled(CANDIDATE)[3] == CandidateCall(3, "CEX", "ok")
    assert len(store.labelled(CANDIDATE)) == 2
    store.close()


def test_opening_a_missing_record_for_reading_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ShadowStoreError) as raised:
        ShadowStore(tmp_path / "state" / "shadow", create=False)
    message = str(raised.value)
    assert str(tmp_path / "state" / "shadow" / "shadow.sqlite") in message
    assert "[model.shadow]" in message
    assert "daemon.state_dir or --state-dir" in message
    assert not (tmp_path / "state").exists()  # reading creates nothing


def test_the_report_reads_while_the_daemon_holds_a_write_transaction(tmp_path: Path) -> None:
    """WAL: a reader is not blocked by a writer, and sees only committed frames."""
    daemon = ShadowStore(tmp_path)
    daemon.add_frames([_row(10.0)], 1.0)
    writer = sqlite3.connect(tmp_path / "shadow.sqlite", isolation_level=None)
    assert writer.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    writer.execute("BEGIN EXCLUSIVE")  # blocks every reader unless in WAL mode
    writer.execute(
        "INSERT INTO frames (probe, frame_key, ts, live_model, candidate_model, classes, "
        "crops, agreed, live_counts, candidate_counts, recorded_at) "
        "VALUES ('R1', 'k', 20.0, ?, ?, '[\"CEX\", \"PG\"]', 1, 1, '[1, 0]', '[1, 0]', 2.0)",
        (LIVE, CANDIDATE),
    )
    report = ShadowStore(tmp_path, create=False)
    started = time.monotonic()
    assert [f.ts for f, _, _ in report.frames()] == [10.0]
    assert time.monotonic() - started < 1.0  # not the 5 s busy timeout
    writer.execute("COMMIT")
    assert [f.ts for f, _, _ in report.frames()] == [10.0, 20.0]
    writer.close()
    report.close()
    daemon.close()


# -- the report over real stores ----------------------------------------------------------


def _keep(samples: SampleStore, index: int, *, guess: str, status: str = "ok") -> int:
    image = np.full((8, 8), 40 + index % 200, dtype=np.uint8)
    sample = NewSample(
        probe="R1",
        frame_key=f"R1/frame-{index}.png",
        ts=1000.0 + index,
        batch=None,
        bbox=(0, 0, 8, 8),
        model=LIVE,
        guess=guess,
        confidence=0.9 if status == "ok" else 0.5,
        probabilities={"CEX": 0.9, "PG": 0.1} if guess == "CEX" else {"CEX": 0.1, "PG": 0.9},
        status=status,
        decision_reason=None if status == "ok" else "low_confidence",
        ood_score=None,
        kept_because="random" if status == "ok" else "uncertain",
        kept_at=1000.0 + index,
    )
    return samples.add(sample, image)


def _other(label: str) -> str:
    return "CEX" if label == "PG" else "PG"


def _fill_stores(tmp_path: Path) -> tuple[ShadowStore, SampleStore]:
    """Three 300 s windows of 30 frames of 10 crops, the same counts under both models but
    one crop in each frame called the other way by each; 60 labelled crops: both right on
    47, only the live model on 2, only the candidate on 8, neither on 3 (one of them a
    crop the live model was unsure of); besides, crops that do not count."""
    shadow = ShadowStore(tmp_path / "shadow")
    rows = []
    for i in range(90):
        pg = 1 + i % 3
        comparison = FrameComparison("R1", 300.0 * (i // 30) + 10 * (i % 30), 10, 9,
                                     (10 - pg, pg), (10 - pg, pg))  # fmt: skip
        rows.append((comparison, f"R1/frame-{i}.png", LIVE, CANDIDATE, CLASSES))
    rows.append((FrameComparison("R1", 50.0, 10, 0, (10, 0), (0, 10)), "old", LIVE,
                 OLDER_CANDIDATE, CLASSES))  # fmt: skip
    shadow.add_frames(rows, recorded_at=2000.0)

    samples = SampleStore(tmp_path / "samples", CLASSES)
    calls = []
    plan = [(True, True)] * 47 + [(True, False)] * 2 + [(False, True)] * 8 + [(False, False)] * 3
    for index, (live_right, candidate_right) in enumerate(plan):
        label = CLASSES[index % 2]
        if index == len(plan) - 1:  # the live model was unsure, though its guess was right
            sample_id = _keep(samples, index, guess=label, status="uncertain")
        else:
            sample_id = _keep(samples, index, guess=label if live_right else _other(label))
        samples.set_label(sample_id, label, operator="ana", at=3000.0)
        calls.append(CandidateCall(sample_id, label if candidate_right else _other(label), "ok"))
    # Not counted: "not a particle", not scored by the candidate, not labelled.
    bubble = _keep(samples, 100, guess="PG")
    samples.set_label(bubble, "_not_a_particle", operator="ana", at=3000.0)
    calls.append(CandidateCall(bubble, "CEX", "ok"))
    unscored = _keep(samples, 101, guess="PG")
    samples.set_label(unscored, "PG", operator="ana", at=3000.0)
    calls.append(CandidateCall(_keep(samples, 102, guess="PG"), "PG", "ok"))
    shadow.add_labelled(CANDIDATE, calls, at=3100.0)
    return shadow, samples


def test_report_scores_labelled_crops_and_promotes_an_agreeing_candidate(
    tmp_path: Path,
) -> None:
    shadow, samples = _fill_stores(tmp_path)
    report = shadow_report(shadow, samples, window_s=300.0)
    assert report["candidate"] == CANDIDATE
    assert report["candidates"] == [OLDER_CANDIDATE, CANDIDATE]
    assert report["live_models"] == [LIVE]
    assert report["classes"] == list(CLASSES)
    assert (report["frames"], report["crops"]) == (90, 900)
    assert report["agreement"] == pytest.approx(0.9)
    assert [(w["start"], w["frames"], w["crops"]) for w in report["windows"]] == [
        (0.0, 30, 300),
        (300.0, 30, 300),
        (600.0, 30, 300),
    ]
    pg = report["windows"][0]["classes"]["PG"]
    assert pg["live"] == pytest.approx(60 / 300)
    assert (pg["difference"], pg["difference_ci"], pg["significant"]) == (0.0, [0.0, 0.0], False)
    assert report["labelled"] == {
        "crops": 60,
        "live_accuracy": pytest.approx(49 / 60),
        "candidate_accuracy": pytest.approx(55 / 60),
        "only_live_right": 2,
        "only_candidate_right": 8,
        "mcnemar_p": pytest.approx(2 * (1 + 10 + 45) / 1024),
    }
    assert report["rule"] == {
        "min_window_crops": 200,
        "min_full_windows": 3,
        "min_labelled": 50,
        "alpha": 0.05,
    }
    verdict = report["verdict"]
    assert verdict["promote"] is True
    assert (verdict["full_windows"], verdict["differing_windows"]) == (3, 0)
    assert verdict["reasons"] == [
        "fractions agree within their intervals and the candidate is not worse on labelled crops"
    ]
    shadow.close()
    samples.close()


def test_report_for_a_shorter_range_or_another_candidate_does_not_promote(
    tmp_path: Path,
) -> None:
    shadow, samples = _fill_stores(tmp_path)
    narrow = shadow_report(shadow, samples, window_s=300.0, since=300.0, until=600.0)
    assert (narrow["frames"], narrow["since"], narrow["until"]) == (30, 300.0, 600.0)
    assert narrow["verdict"]["promote"] is False
    assert narrow["verdict"]["reasons"][0].startswith("1 full windows")
    older = shadow_report(shadow, samples, window_s=300.0, candidate=OLDER_CANDIDATE)
    assert older["candidate"] == OLDER_CANDIDATE
    assert (older["frames"], older["agreement"]) == (1, 0.0)
    assert older["labelled"]["crops"] == 0
    assert older["verdict"]["promote"] is False
    assert len(older["verdict"]["reasons"]) == 2
    without_samples = shadow_report(shadow, None, window_s=300.0)
    assert without_samples["labelled"]["crops"] == 0
    assert without_samples["verdict"]["promote"] is False
    shadow.close()
    samples.close()


def test_report_before_any_frame_was_compared(tmp_path: Path) -> None:
    report = shadow_report(ShadowStore(tmp_path), None, window_s=300.0)
    assert report == {
        "candidate": None,
        "candidates": [],
        "windows": [],
        "note": "no frame compared yet",
    }


# -- the verdict over many windows: chance differences -----------------------------------


def _chance_windows(rng: np.random.Generator, count: int) -> list[WindowComparison]:
    """`count` full windows of two equally good models (the coverage test's process)."""
    windows = []
    for _ in range(count):
        frames = []
        for size, rate in zip(rng.integers(5, 40, 30), rng.beta(2, 18, 30), strict=True):
            calls = []
            for _model in range(2):
                sure = int(rng.binomial(size, 0.9))
                pg = int(rng.binomial(sure, rate))
                calls.append((sure - pg, pg))
            frames.append(_frame(calls[0], calls[1], crops=int(size), agreed=0))
        windows.append(_compare(frames))
    return windows


def test_a_twelve_hour_batch_of_equally_good_models_is_not_blocked_by_chance_windows() -> None:
    """144 five-minute windows: at 95 % each, several 'differ' by chance; the verdict
    judges them together (Bonferroni), so agreeing models can still be promoted."""
    rng = np.random.default_rng(7)
    promoted = 0
    for _batch in range(10):
        windows = _chance_windows(rng, 144)
        chance_flags = sum(any(c.significant for c in w.classes) for w in windows)
        assert chance_flags >= 1  # what the plain 95 % flags would have blocked on
        verdict = promotion_verdict(windows, LABELS_EQUAL, RULE)
        promoted += verdict.promote
    assert promoted >= 8  # family-wise 5 %: about 19 in 20 batches pass


def test_a_real_shift_in_a_few_windows_of_a_long_batch_still_counts_as_differing() -> None:
    rng = np.random.default_rng(8)
    windows = _chance_windows(rng, 144)
    shifted = [
        _compare([_frame((90, 10), (75, 25), ts=float(i)) for i in range(30)]) for _ in range(3)
    ]
    verdict = promotion_verdict([*windows, *shifted], LABELS_EQUAL, RULE)
    assert not verdict.promote
    assert verdict.differing_windows >= 3
    assert differing_windows(shifted, RULE.alpha) == shifted
