"""Windowed class statistics: intervals, design effect, quantification correction, windows."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.aggregate import (
    ConfusionCorrection,
    EwmaFractions,
    FrameRecord,
    WindowAggregator,
    adjusted_fractions,
    design_effect,
    slope_per_minute,
    wilson_interval,
    wilson_interval_from_fraction,
)

CLASSES = ("CEX", "PG")


def _frame(ts: float, cex: int = 0, pg: int = 0, uncertain: int = 0) -> FrameRecord:
    return FrameRecord(ts=ts, class_counts=(cex, pg), n_uncertain=uncertain)


def _rejected(ts: float, reason: str) -> FrameRecord:
    return FrameRecord(ts=ts, class_counts=(0, 0), rejected_reason=reason)


# -- Wilson interval --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [
        (0, 10, (0.0000, 0.2775)),
        (5, 10, (0.2366, 0.7634)),
        (1, 100, (0.0018, 0.0545)),
        (10, 10, (0.7225, 1.0000)),
    ],
)
def test_wilson_interval_matches_published_values_to_four_decimals(
    successes: int, n: int, expected: tuple[float, float]
) -> None:
    low, high = wilson_interval(successes, n)
    assert round(low, 4) == pytest.approx(expected[0], abs=1e-9)
    assert round(high, 4) == pytest.approx(expected[1], abs=1e-9)


def test_wilson_interval_without_observations_is_the_whole_unit_interval() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_accepts_a_fractional_effective_sample_size() -> None:
    low, high = wilson_interval(2.5, 10.0)
    assert (low, high) == pytest.approx(wilson_interval_from_fraction(0.25, 10.0))
    # A smaller effective n at the same fraction gives a wider interval.
    wide_low, wide_high = wilson_interval(1.25, 5.0)
    assert wide_low < low and wide_high > high


# -- design effect ----------------------------------------------------------------------


def test_design_effect_is_about_one_for_independent_binomial_frames() -> None:
    rng = np.random.default_rng(1)
    totals = rng.poisson(20, size=4000) + 1
    successes = rng.binomial(totals, 0.1)
    assert 1.0 <= design_effect(successes, totals) < 1.1


def test_design_effect_is_large_when_each_frame_has_its_own_fraction() -> None:
    rng = np.random.default_rng(2)
    totals = np.full(4000, 20)
    # Beta(0.5, 4.5): mean 0.1, intra-frame correlation 1/6, so deff = 1 + 19/6 = 4.17.
    successes = rng.binomial(totals, rng.beta(0.5, 4.5, size=totals.size))
    assert design_effect(successes, totals) == pytest.approx(1 + 19 / 6, rel=0.15)


@pytest.mark.parametrize(
    ("successes", "totals"),
    [([3], [10]), ([0, 0, 0], [5, 7, 9]), ([5, 7, 9], [5, 7, 9]), ([2, 0], [10, 0])],
    ids=["one-frame", "no-successes", "all-successes", "one-frame-with-particles"],
)
def test_design_effect_is_one_without_between_frame_information(
    successes: list[int], totals: list[int]
) -> None:
    assert design_effect(successes, totals) == 1.0


# -- adjusted classify-and-count ----------------------------------------------------------


@pytest.mark.parametrize(
    ("tpr", "fpr", "observed_pg"),
    [(0.99, 0.005, 0.03), (0.9, 0.05, 0.2), (0.8, 0.1, 0.5), (0.95, 0.02, 0.9)],
)
def test_two_class_adjusted_share_equals_rogan_gladen(
    tpr: float, fpr: float, observed_pg: float
) -> None:
    # Rows true (CEX, PG), columns predicted; the positive class is PG.
    matrix = [
        [round((1 - fpr) * 1000), round(fpr * 1000)],
        [round((1 - tpr) * 1000), round(tpr * 1000)],
    ]
    n = 10_000
    counts = [n * (1 - observed_pg), n * observed_pg]
    expected_pg = min(max((observed_pg - fpr) / (tpr - fpr), 0.0), 1.0)
    adjusted = adjusted_fractions(counts, matrix)
    assert adjusted[1] == pytest.approx(expected_pg, abs=1e-12)
    assert adjusted[0] == pytest.approx(1 - expected_pg, abs=1e-12)


def test_adjusted_share_recovers_the_true_mix_from_expected_three_class_counts() -> None:
    matrix = np.array([[900, 60, 40], [50, 800, 150], [20, 80, 900]])
    rates = matrix / matrix.sum(axis=1, keepdims=True)
    true_shares = np.array([0.7, 0.2, 0.1])
    expected_observed = 5000 * rates.T @ true_shares
    assert not np.allclose(expected_observed / 5000, true_shares)
    np.testing.assert_allclose(
        adjusted_fractions(expected_observed, matrix), true_shares, atol=1e-12
    )


def test_adjusted_share_is_clipped_at_zero_when_fewer_positives_than_false_positives() -> None:
    matrix = [[990, 10], [10, 990]]  # 1 % false PG
    adjusted = adjusted_fractions([9_960, 40], matrix)  # 0.4 % observed PG
    assert adjusted[1] == 0.0
    assert adjusted[0] == 1.0


def test_confusion_row_without_support_leaves_that_class_unadjusted() -> None:
    matrix = [[90, 10, 0], [10, 90, 0], [0, 0, 0]]
    correction = ConfusionCorrection(matrix)
    np.testing.assert_array_equal(correction.matrix[2], [0.0, 0.0, 1.0])
    adjusted = correction.adjust([40, 40, 20])
    assert adjusted[2] == pytest.approx(0.2)
    assert adjusted[0] == pytest.approx(0.4)


def test_singular_confusion_matrix_falls_back_to_observed_shares() -> None:
    correction = ConfusionCorrection([[50, 50], [50, 50]])  # classifier is a coin flip
    assert not correction.invertible
    np.testing.assert_allclose(correction.adjust([30, 10]), [0.75, 0.25])


def test_adjusted_share_refuses_a_matrix_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="one row per class"):
        adjusted_fractions([1, 2, 3], [[1, 0], [0, 1]])


# -- slope ----------------------------------------------------------------------------


def test_slope_of_a_ramp_from_zero_to_thirty_percent_over_thirty_minutes_is_a_hundredth() -> None:
    times = np.arange(0.0, 1801.0, 10.0) + 1.7e9  # epoch seconds must not lose precision
    values = 0.3 * (times - times[0]) / 1800.0
    assert slope_per_minute(times, values) == pytest.approx(0.01, rel=1e-9)


def test_slope_needs_two_distinct_times() -> None:
    assert slope_per_minute([5.0, 5.0, 5.0], [0.0, 1.0, 0.5]) is None
    assert slope_per_minute([5.0], [1.0]) is None
    assert slope_per_minute([], []) is None


def test_weighted_frame_slope_equals_the_particle_indicator_regression() -> None:
    rng = np.random.default_rng(3)
    times = np.sort(rng.uniform(0, 300, size=40))
    totals = rng.integers(1, 12, size=40)
    positives = rng.binomial(totals, np.linspace(0.1, 0.6, 40))
    particle_times = np.repeat(times, totals)
    indicators = np.concatenate(
        [np.r_[np.ones(y), np.zeros(m - y)] for y, m in zip(positives, totals, strict=True)]
    )
    by_frame = slope_per_minute(times, positives / totals, totals)
    by_particle = slope_per_minute(particle_times, indicators)
    assert by_frame == pytest.approx(by_particle, rel=1e-9)


# -- window aggregator ------------------------------------------------------------------


def test_window_holds_records_after_its_start_up_to_and_including_now() -> None:
    agg = WindowAggregator(CLASSES, windows_s=(60, 300))
    agg.add(_frame(40.0, cex=1))  # exactly now - 60: outside
    agg.add(_frame(40.001, cex=2))  # just inside
    agg.add(_frame(100.0, cex=4))  # exactly now: inside
    agg.add(_frame(100.5, cex=8))  # after now: not yet
    window = agg.snapshot(100.0).windows[60]
    assert window.n == 6
    assert window.frames == 2


def test_each_window_counts_only_its_own_span() -> None:
    agg = WindowAggregator(CLASSES)
    for t in range(1, 901):
        agg.add(_frame(float(t), cex=1))
    windows = agg.snapshot(900.0).windows
    assert {seconds: w.frames for seconds, w in windows.items()} == {60: 60, 300: 300, 900: 900}


def test_records_arriving_a_few_seconds_late_give_the_same_snapshot_as_in_order() -> None:
    rng = random.Random(4)
    records = [
        _frame(0.1 * i, cex=rng.randint(0, 9), pg=rng.randint(0, 2), uncertain=rng.randint(0, 1))
        for i in range(1, 4000)
    ]
    records[::37] = [_rejected(r.ts, "out_of_focus") for r in records[::37]]
    # Each record is delayed by up to 3 s, then the stream is delivered in arrival order.
    late = sorted(records, key=lambda r: r.ts + rng.uniform(0, 3))
    assert late != records
    # Short windows, so old records are pruned and the buffer recycled while late ones land.
    windows_s = (20, 60, 120)
    in_order = WindowAggregator(CLASSES, windows_s, confusion_matrix=[[95, 5], [10, 90]])
    shuffled = WindowAggregator(CLASSES, windows_s, confusion_matrix=[[95, 5], [10, 90]])
    for record in records:
        in_order.add(record)
    for record in late:
        shuffled.add(record)
    now = records[-1].ts
    expected = in_order.snapshot(now).to_json()
    actual = shuffled.snapshot(now).to_json()
    assert actual["windows"] == expected["windows"]
    for seconds in windows_s:
        members = [r for r in records if now - seconds < r.ts <= now]
        window = actual["windows"][str(seconds)]
        assert window["n"] == sum(sum(r.class_counts) for r in members)
        assert window["rejected_frames"] == sum(not r.accepted for r in members)
        assert window["frames"] == sum(r.accepted for r in members)
    for name in CLASSES:
        assert actual["trend"][name]["ewma"] == pytest.approx(expected["trend"][name]["ewma"])
        assert actual["trend"][name]["slope_per_min"] == pytest.approx(
            expected["trend"][name]["slope_per_min"]
        )


def test_a_record_older_than_the_longest_window_is_discarded() -> None:
    agg = WindowAggregator(CLASSES, windows_s=(60, 300))
    agg.add(_frame(1000.0, cex=1))
    agg.add(_frame(650.0, pg=5))
    snapshot = agg.snapshot(1000.0)
    assert len(agg) == 1
    assert snapshot.windows[300].n == 1


def test_start_batch_empties_every_window_and_tags_snapshots() -> None:
    agg = WindowAggregator(CLASSES)
    for t in range(100):
        agg.add(_frame(float(t), cex=3, pg=1))
    assert agg.snapshot(99.0).windows[900].n == 400
    agg.start_batch("B-17", 100.0)
    agg.add(_frame(99.5, pg=9))  # late frame from before the batch: ignored
    agg.add(_frame(101.0, cex=2))
    snapshot = agg.snapshot(102.0)
    assert agg.batch == "B-17"
    assert snapshot.batch == "B-17"
    assert snapshot.windows[900].n == 2
    assert snapshot.windows[900].classes["PG"].fraction == 0.0
    assert snapshot.trend["PG"].ewma == 0.0


def test_stop_batch_empties_windows_and_clears_the_batch() -> None:
    agg = WindowAggregator(CLASSES)
    agg.start_batch("B-17", 0.0)
    agg.add(_frame(1.0, cex=2, pg=2))
    agg.stop_batch(2.0)
    snapshot = agg.snapshot(3.0)
    assert agg.batch is None
    assert snapshot.batch is None
    assert snapshot.windows[60].n == 0
    assert snapshot.windows[60].classes["PG"].fraction is None
    assert snapshot.trend["PG"].ewma is None


def test_ewma_is_half_way_one_half_life_after_a_step_from_zero_to_one() -> None:
    agg = WindowAggregator(CLASSES, ewma_halflife_s=60.0)
    agg.start_batch("B", 0.0)
    assert agg.snapshot(0.0).trend["PG"].ewma is None
    t = 0.0
    for _ in range(12_000):  # 20 min of CEX only at 10 frames/s
        t += 0.1
        agg.add(_frame(t, cex=5))
    for _ in range(600):  # then one half-life of PG only
        t += 0.1
        agg.add(_frame(t, pg=5))
    trend = agg.snapshot(t).trend
    assert trend["PG"].ewma == pytest.approx(0.5, abs=0.01)
    assert trend["CEX"].ewma == pytest.approx(0.5, abs=0.01)


def test_ewma_does_not_depend_on_arrival_order() -> None:
    forward, backward = EwmaFractions(2, 30.0), EwmaFractions(2, 30.0)
    forward.update(0.0, (4, 0))
    forward.update(20.0, (0, 4))
    backward.update(20.0, (0, 4))
    backward.update(0.0, (4, 0))
    assert backward.fractions() == pytest.approx(forward.fractions())
    assert forward.fractions()[1] == pytest.approx(1 / (1 + 0.5 ** (20 / 30)))


def test_trend_slope_of_a_ramp_from_zero_to_thirty_percent_over_thirty_minutes() -> None:
    agg = WindowAggregator(CLASSES)
    agg.start_batch("B", 0.0)
    for t in range(1, 1801):
        pg = round(1000 * 0.3 * t / 1800)
        agg.add(_frame(float(t), cex=1000 - pg, pg=pg))
    trend = agg.snapshot(1800.0).trend
    assert trend["PG"].slope_per_min == pytest.approx(0.01, abs=2e-4)
    assert trend["CEX"].slope_per_min == pytest.approx(-0.01, abs=2e-4)


def test_rejected_and_uncertain_shares_and_reasons() -> None:
    agg = WindowAggregator(CLASSES, windows_s=(60,))
    for t in range(1, 9):
        agg.add(_frame(float(t), cex=3, pg=1, uncertain=1))
    agg.add(_rejected(9.0, "out_of_focus"))
    agg.add(_rejected(10.0, "blank_window"))
    window = agg.snapshot(10.0).windows[60]
    assert window.frames == 8
    assert window.rejected_frames == 2
    assert window.rejected_by_reason == {"out_of_focus": 1, "blank_window": 1}
    assert window.rejected_share == pytest.approx(0.2)
    assert window.n == 32
    assert window.n_uncertain == 8
    assert window.uncertain_share == pytest.approx(8 / 40)


def test_shares_are_zero_for_an_empty_window() -> None:
    window = WindowAggregator(CLASSES).snapshot(10.0).windows[60]
    assert (window.rejected_share, window.uncertain_share) == (0.0, 0.0)
    assert (window.particles_per_min, window.frames_per_min) == (0.0, 0.0)
    assert window.classes["PG"].ci95 is None


def test_rates_per_minute_over_a_full_window() -> None:
    agg = WindowAggregator(CLASSES, windows_s=(60, 300))
    agg.start_batch("B", 0.0)
    for i in range(1, 3001):  # 300 s at 10 frames/s, every 10th frame rejected
        t = i * 0.1
        agg.add(_rejected(t, "blur") if i % 10 == 0 else _frame(t, cex=4, pg=1))
    window = agg.snapshot(300.0).windows[60]
    assert window.frames_per_min == pytest.approx(600.0)
    assert window.particles_per_min == pytest.approx(540 * 5)


def test_rates_of_a_window_younger_than_its_length_use_the_elapsed_time() -> None:
    agg = WindowAggregator(CLASSES, windows_s=(60, 300))
    agg.start_batch("B", 0.0)
    for i in range(1, 301):  # 30 s at 10 frames/s
        agg.add(_frame(i * 0.1, cex=5))
    windows = agg.snapshot(30.0).windows
    assert windows[60].frames_per_min == pytest.approx(600.0)
    assert windows[300].frames_per_min == pytest.approx(600.0)
    assert windows[300].particles_per_min == pytest.approx(3000.0)


def test_memory_holds_only_the_longest_window_after_an_hour_at_ten_frames_per_second() -> None:
    agg = WindowAggregator(CLASSES)
    agg.start_batch("B", 0.0)
    for i in range(1, 36_001):
        agg.add(_frame(i * 0.1, cex=1))
    assert len(agg) == 9_000
    assert agg.snapshot(3600.0).windows[900].frames == 9_000


def test_interval_widens_by_the_design_effect_when_frames_cluster() -> None:
    agg = WindowAggregator(CLASSES, windows_s=(60,))
    for t in range(1, 41):  # half the frames all PG, half all CEX: strongly clustered
        agg.add(_frame(float(t), cex=0 if t % 2 else 10, pg=10 if t % 2 else 0))
    pg = agg.snapshot(40.0).windows[60].classes["PG"]
    plain = wilson_interval(200, 400)
    assert pg.fraction == 0.5
    assert pg.effective_n < 400 / 5
    assert pg.ci95 is not None
    assert pg.ci95[1] - pg.ci95[0] > 2 * (plain[1] - plain[0])


def test_adjusted_share_appears_only_with_a_confusion_matrix() -> None:
    matrix = [[990, 10], [10, 990]]
    plain = WindowAggregator(CLASSES, windows_s=(60,))
    corrected = WindowAggregator(CLASSES, windows_s=(60,), confusion_matrix=matrix)
    for agg in (plain, corrected):
        agg.add(_frame(1.0, cex=970, pg=30))
    assert plain.snapshot(1.0).windows[60].classes["PG"].adjusted is None
    adjusted = corrected.snapshot(1.0).windows[60].classes["PG"].adjusted
    assert adjusted == pytest.approx((0.03 - 0.01) / (0.99 - 0.01))


def test_snapshot_json_has_the_published_shape_and_survives_json_dumps() -> None:
    agg = WindowAggregator(CLASSES, confusion_matrix=[[99, 1], [2, 98]])
    agg.start_batch("B-1", 0.0)
    agg.add(_frame(1.0, cex=9, pg=1, uncertain=2))
    agg.add(_rejected(2.0, "out_of_focus"))
    document = json.loads(json.dumps(agg.snapshot(2.0).to_json()))
    assert document["ts"] == 2.0
    assert document["batch"] == "B-1"
    assert set(document["windows"]) == {"60", "300", "900"}
    window = document["windows"]["60"]
    assert window["rejected_by_reason"] == {"out_of_focus": 1}
    assert set(window) == {
        "n", "n_uncertain", "frames", "rejected_frames", "rejected_by_reason",
        "rejected_share", "uncertain_share", "n_ood", "ood_share", "particles_per_min",
        "frames_per_min", "classes", "sizes",
    }  # fmt: skip
    assert set(window["sizes"]) == {"unit", "measure", "bin_edges", "classes"}
    pg = window["classes"]["PG"]
    assert set(pg) == {"n", "fraction", "ci95", "adjusted", "effective_n"}
    assert pg["fraction"] == 0.1
    assert len(pg["ci95"]) == 2
    assert set(document["trend"]["PG"]) == {"ewma", "slope_per_min", "span_s"}
    assert document["trend"]["PG"]["span_s"] == 0.0  # one frame with particles: no span yet


def test_trend_span_is_the_time_between_the_first_and_last_frame_with_particles() -> None:
    agg = WindowAggregator(CLASSES)
    agg.add(_frame(10.0, cex=9, pg=1))
    agg.add(_rejected(20.0, "out_of_focus"))
    agg.add(_frame(70.0, cex=8, pg=2))
    trend = agg.snapshot(80.0).trend["PG"]
    assert trend.span_s == 60.0
    assert trend.slope_per_min == pytest.approx(0.1)


def test_records_must_match_the_class_list_and_rejected_frames_carry_no_particles() -> None:
    agg = WindowAggregator(CLASSES)
    with pytest.raises(ValueError, match="3 class counts"):
        agg.add(FrameRecord(ts=1.0, class_counts=(1, 2, 3)))
    with pytest.raises(ValueError, match="must carry no particles"):
        FrameRecord(ts=1.0, class_counts=(1, 0), rejected_reason="blur")
    with pytest.raises(ValueError, match="non-negative"):
        FrameRecord(ts=1.0, class_counts=(-1, 0))


def test_aggregator_refuses_a_confusion_matrix_for_other_classes() -> None:
    with pytest.raises(ValueError, match="manifest's validation matrix"):
        WindowAggregator(CLASSES, confusion_matrix=[[1, 0, 0], [0, 1, 0], [0, 0, 1]])


# -- properties -------------------------------------------------------------------------

_frames = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=5.0),  # gap to the previous frame
        st.lists(st.integers(0, 30), min_size=3, max_size=3),
        st.integers(0, 5),
        st.sampled_from([None, None, None, "blur", "blank"]),
    ),
    min_size=1,
    max_size=60,
)
_matrices = st.lists(st.lists(st.integers(0, 1000), min_size=3, max_size=3), min_size=3, max_size=3)


@settings(max_examples=150, deadline=None)
@given(frames=_frames, matrix=_matrices)
def test_window_fractions_sum_to_one_and_intervals_contain_them(
    frames: list[tuple[float, list[int], int, str | None]], matrix: list[list[int]]
) -> None:
    agg = WindowAggregator(("CEX", "PG", "other"), windows_s=(10, 60, 300), confusion_matrix=matrix)
    t = 0.0
    for gap, counts, uncertain, reason in frames:
        t += gap
        if reason is None:
            agg.add(FrameRecord(ts=t, class_counts=tuple(counts), n_uncertain=uncertain))
        else:
            agg.add(FrameRecord(ts=t, class_counts=(0, 0, 0), rejected_reason=reason))
    for window in agg.snapshot(t).windows.values():
        assert 0.0 <= window.rejected_share <= 1.0
        assert 0.0 <= window.uncertain_share <= 1.0
        if window.n == 0:
            continue
        fractions = [c.fraction for c in window.classes.values()]
        assert sum(f for f in fractions if f is not None) == pytest.approx(1.0)
        adjusted = [c.adjusted for c in window.classes.values()]
        assert sum(a for a in adjusted if a is not None) == pytest.approx(1.0)
        for stats in window.classes.values():
            assert stats.fraction is not None and stats.ci95 is not None
            low, high = stats.ci95
            assert 0.0 <= low <= stats.fraction <= high <= 1.0
            assert stats.adjusted is not None and 0.0 <= stats.adjusted <= 1.0
            assert 0 < stats.effective_n <= window.n


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10_000), data=st.data())
def test_wilson_interval_lies_in_the_unit_interval_and_contains_the_fraction(
    n: int, data: st.DataObject
) -> None:
    successes = data.draw(st.integers(0, n))
    low, high = wilson_interval(successes, n)
    assert 0.0 <= low <= successes / n <= high <= 1.0


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(0, 10_000), min_size=4, max_size=4).filter(lambda c: sum(c) > 0),
    matrix=st.lists(st.lists(st.integers(0, 500), min_size=4, max_size=4), min_size=4, max_size=4),
)
def test_adjusted_fractions_are_shares_in_the_unit_interval(
    counts: list[int], matrix: list[list[int]]
) -> None:
    adjusted = adjusted_fractions(counts, matrix)
    assert np.all(adjusted >= 0.0) and np.all(adjusted <= 1.0)
    assert adjusted.sum() == pytest.approx(1.0)
