"""Particle sizes through the web package (issue 15): /api/state carries each window's
"sizes" as the aggregator wrote it, the history carries each class's D50 per stored
snapshot, and a window or row without sizes (a daemon that does not measure them, rows
stored before it did) reads as none rather than failing.

`sized_view` is also the fixture of the browser test of the size view.
"""

from __future__ import annotations

import math
from typing import Any

from monitor.web import views
from tests.fake_view import FakeView, a_sizes_document, as_view

# Log-spaced bins as the aggregator draws them: 1 to 10,000, four bins per decade (the
# numbers as on the wire, 6 significant digits).
BIN_EDGES = tuple(float(f"{10.0 ** (k / 4):.6g}") for k in range(17))
CEX_HISTOGRAM = [0, 0, 0, 2, 14, 60, 95, 60, 20, 2, 0, 0, 0, 0, 0, 0]
PG_HISTOGRAM = [0, 0, 0, 0, 0, 0, 4, 10, 20, 15, 5, 1, 0, 0, 0, 0]
CEX_SIZES = {
    "count": sum(CEX_HISTOGRAM),
    "d10": 17.2,
    "d50": 42.1,
    "d90": 96.5,
    "d10_sq": 31.8,
    "d50_sq": 68.4,
    "d90_sq": 142.0,
    "mean_aspect_ratio": 0.31,  # Feret min / max: needles
    "histogram": CEX_HISTOGRAM,
}
PG_SIZES = {
    "count": sum(PG_HISTOGRAM),
    "d10": 48.9,
    "d50": 101.0,
    "d90": 215.0,
    "d10_sq": 92.3,
    "d50_sq": 178.0,
    "d90_sq": 301.0,
    "mean_aspect_ratio": 0.78,  # roundish agglomerates
    "histogram": PG_HISTOGRAM,
}
# The 1-min window of a probe without a pixel size: ECD in pixels.
PX_SIZES = {
    "count": 40,
    "d10": 6.25,
    "d50": 12.5,
    "d90": 30.4,
    "d10_sq": 9.1,
    "d50_sq": 19.0,
    "d90_sq": 41.2,
    "mean_aspect_ratio": 0.35,
    "histogram": [0, 0, 1, 8, 15, 12, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],
}
HISTORY_STEP_S = 30.0
HISTORY_ROWS = 60  # the last 30 minutes
UNSIZED_ROWS = 10  # the oldest rows: stored before the daemon measured sizes
PG_FROM_ROW = 24  # PG particles (and so a PG D50) only from this row on


def cex_d50(row: int) -> float:
    """CEX needles growing over the 30 minutes, 30 um to 42.1 um."""
    return round(30.0 + 12.1 * row / (HISTORY_ROWS - 1), 4)


def pg_d50(row: int) -> float:
    """PG agglomerates appearing at PG_FROM_ROW and growing, 80 um to 101 um."""
    return round(80.0 + 21.0 * (row - PG_FROM_ROW) / (HISTORY_ROWS - 1 - PG_FROM_ROW), 4)


def _stored_row(clock: float, row: int) -> tuple[float, str | None, dict[str, Any]]:
    """One stored snapshot as ProbeSnapshot.to_json() writes it, the 5-min window with
    sizes (from UNSIZED_ROWS on), the 15-min window never."""
    ts = clock - HISTORY_STEP_S * (HISTORY_ROWS - 1 - row)
    pg_share = 0.0 if row < PG_FROM_ROW else 0.02 + 0.1 * (row - PG_FROM_ROW) / HISTORY_ROWS
    fractions = {"CEX": 1.0 - pg_share, "PG": pg_share}
    classes = {
        name: {"n": 0, "fraction": f, "ci95": [max(0.0, f - 0.03), min(1.0, f + 0.03)]}
        for name, f in fractions.items()
    }
    five: dict[str, Any] = {"n": 300, "classes": classes}
    if row >= UNSIZED_ROWS:
        pg = (
            {}
            if row < PG_FROM_ROW
            else {"count": 20, "d50": pg_d50(row), "d50_sq": pg_d50(row) * 1.7}
        )
        five["sizes"] = a_sizes_document(
            {"CEX": {"count": 250, "d50": cex_d50(row), "d50_sq": cex_d50(row) * 1.6}, "PG": pg},
            bin_edges=BIN_EDGES,
        )
    return ts, None, {"ts": ts, "windows": {"300": five, "900": {"n": 900, "classes": classes}}}


def sized_view() -> FakeView:
    """Probe R1 with sizes in its 5-min window (um) and 1-min window (px), none in its
    15-min window, and half an hour of stored snapshots with the D50 of each class."""
    fake = FakeView(clock=1_796_650_000.0)  # 2026-12-07 13:26:40 UTC
    for k in range(40):
        fake.add_frame(fake.clock - 250.0 + 5.0 * k, (27, 3))
    fake.window_sizes = {
        300: a_sizes_document({"CEX": CEX_SIZES, "PG": PG_SIZES}, bin_edges=BIN_EDGES),
        60: a_sizes_document({"CEX": PX_SIZES, "PG": {}}, unit="px", bin_edges=BIN_EDGES),
        900: None,
    }
    fake.stored_snapshots = [_stored_row(fake.clock, row) for row in range(HISTORY_ROWS)]
    return fake


def _history(fake: FakeView, window: int) -> dict[str, Any]:
    return views.probe_history(
        as_view(fake), "R1", window=window, span="auto", history_s=3600, history_max_s=86400
    )


def test_state_carries_each_windows_sizes_as_the_aggregator_wrote_them() -> None:
    fake = sized_view()
    probe = views.daemon_state(as_view(fake), refresh_s=2.0)["probes"][0]
    windows = probe["snapshot"]["windows"]
    sizes = windows["300s"]["sizes"]
    assert (sizes["unit"], sizes["measure"]) == ("um", "ecd")
    assert sizes["bin_edges"] == list(BIN_EDGES)
    assert sizes["classes"]["CEX"] == CEX_SIZES
    assert sizes["classes"]["PG"]["d50_sq"] == 178.0
    assert windows["60s"]["sizes"]["unit"] == "px"
    assert "sizes" not in windows["900s"]  # absent stays absent: the page says so


def test_history_has_each_classes_d50_and_none_where_a_row_has_no_sizes() -> None:
    fake = sized_view()
    history = _history(fake, 300)
    assert len(history["ts"]) == HISTORY_ROWS
    assert history["size_unit"] == "um"
    cex, pg = history["series"]["CEX"], history["series"]["PG"]
    assert cex["d50"][:UNSIZED_ROWS] == [None] * UNSIZED_ROWS
    assert cex["d50"][UNSIZED_ROWS:] == [cex_d50(r) for r in range(UNSIZED_ROWS, HISTORY_ROWS)]
    assert pg["d50"][:PG_FROM_ROW] == [None] * PG_FROM_ROW  # no PG measured yet
    assert pg["d50"][-1] == 101.0
    assert math.isclose(pg["d50_sq"][-1], 101.0 * 1.7)
    # The fraction columns are as before.
    assert cex["fraction"][0] == 1.0 and pg["low"][0] == 0.0


def test_history_of_a_window_never_sized_has_no_unit_and_no_d50() -> None:
    history = _history(sized_view(), 900)
    assert len(history["ts"]) == HISTORY_ROWS
    assert history["size_unit"] is None
    for name in ("CEX", "PG"):
        assert history["series"][name]["d50"] == [None] * HISTORY_ROWS
        assert history["series"][name]["d50_sq"] == [None] * HISTORY_ROWS


def test_history_drops_the_d50_of_rows_in_another_unit_than_the_newest() -> None:
    """Rows stored before the probe's pixel size was set are in pixels: the D50 line,
    in micrometres, leaves them out rather than mixing the two."""
    fake = sized_view()
    for row in range(UNSIZED_ROWS, UNSIZED_ROWS + 5):
        fake.stored_snapshots[row][2]["windows"]["300"]["sizes"]["unit"] = "px"
    history = _history(fake, 300)
    assert history["size_unit"] == "um"
    cex = history["series"]["CEX"]
    assert cex["d50"][: UNSIZED_ROWS + 5] == [None] * (UNSIZED_ROWS + 5)
    assert cex["d50_sq"][UNSIZED_ROWS + 4] is None
    assert cex["d50"][UNSIZED_ROWS + 5] == cex_d50(UNSIZED_ROWS + 5)
