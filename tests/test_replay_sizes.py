"""The replay report's particle sizes (issue 15): the batch's size distribution per class,
summed from back-to-back windows so each particle counts once, with D10/D50/D90 read off
the summed bins, and each class's D50 over the batch from its windows; a replay whose
windows carry no sizes says so.

Most tests build the replay result from evaluations as the daemon publishes them (the
report draws only from `ReplayResult`), so each figure is known; one replays simulated
frames through the daemon's own pipeline and checks the report against its frames.
"""

from __future__ import annotations

import json
import re
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from monitor.config.settings import load_settings
from monitor.manifest import ModelIdentity
from monitor.publishers.base import ProbeUpdate
from monitor.replay.report import histogram_quantile, render_report
from monitor.replay.result import ReplayResult
from monitor.replay.runner import find_recorded_frames, replay_frames, replay_settings
from tests.fake_view import a_sizes_document
from tests.test_replay import _small_batch

T0 = 1_796_600_000.0  # the batch's first frame
PUBLISH_S = 60.0
EVALUATIONS = 30  # every minute for 30 minutes
WINDOW_S = 300  # the middle window: no alarm watches a class
CLASSES = ("CEX", "PG")
EDGES = tuple(float(f"{10.0 ** (k / 4):.6g}") for k in range(17))  # 4 bins per decade
PG_FROM = 10  # PG particles from the 11th evaluation on


def _bin(k: float) -> float:
    """The diameter k quarter-decades above 1: bin k spans _bin(k) to _bin(k + 1)."""
    return float(10.0 ** (k / 4))


def _evaluation_sizes(i: int, unit: str) -> dict[str, Any]:
    """The 5-min window's sizes at evaluation i: CEX 1:2:1 in bins 5, 6, 7 (i + 1 times),
    PG 3 particles in bin 8 from PG_FROM on; the windows' own D50s grow with i."""
    cex = [0] * 16
    cex[5], cex[6], cex[7] = i + 1, 2 * (i + 1), i + 1
    figures: dict[str, dict[str, Any]] = {
        "CEX": {
            "count": 4 * (i + 1),
            "d50": 30.0 + 0.5 * i,
            "d50_sq": 50.0 + 0.5 * i,
            "mean_aspect_ratio": 0.2 + 0.01 * i,
            "histogram": cex,
        },
        "PG": {},
    }
    if i >= PG_FROM:
        pg = [0] * 16
        pg[8] = 3
        figures["PG"] = {
            "count": 3,
            "d50": 100.0 + i,
            "d50_sq": 120.0 + i,
            "mean_aspect_ratio": 0.8,
            "histogram": pg,
        }
    return a_sizes_document(figures, unit=unit, bin_edges=EDGES)


def _result(tmp_path: Path, *, unit: str | None = "um") -> ReplayResult:
    """Thirty evaluations of a 30-minute batch; with `unit` None, none carries sizes."""
    settings = load_settings(
        data={
            "daemon": {"state_dir": str(tmp_path / "state")},
            "aggregation": {"windows": ["1m", "5m", "15m"], "publish_interval": "1m"},
            "probes": [{"id": "R1", "source": {"type": "folder", "path": str(tmp_path)}}],
        }
    )
    model = ModelIdentity("cex-pg", "2.0", "ab" * 32)
    updates = []
    for i in range(EVALUATIONS):
        ts = T0 + PUBLISH_S * (i + 1)
        pg = 0.0 if i < PG_FROM else 3 / (4 * (i + 1) + 3)
        classes = {
            "CEX": {"n": 4 * (i + 1), "fraction": 1 - pg, "ci95": [0.8, 1.0]},
            "PG": {"n": 0, "fraction": pg, "ci95": [0.0, 0.2]},
        }
        window: dict[str, Any] = {"n": 4 * (i + 1), "classes": classes}
        if unit is not None:
            window["sizes"] = _evaluation_sizes(i, unit)
        snapshot = {"ts": ts, "batch": None, "windows": {str(WINDOW_S): window}, "trend": {}}
        updates.append(ProbeUpdate("R1", ts, None, "GOOD", model, CLASSES, snapshot, ts - 1.0))
    results = [{"ts": T0 + s, "status": "ok"} for s in range(0, 1800, 10)]
    return ReplayResult(
        folder=tmp_path / "batch",
        probe=settings.probes[0],
        settings=settings,
        definitions=(),
        model_name="cex-pg 2.0",
        model_sha256="ab" * 32,
        classes=CLASSES,
        frames=len(results),
        frames_without_stamp=0,
        first_ts=T0,
        last_ts=T0 + 1799.0,
        results=results,
        updates=updates,
        events=[],
        lost_frames=0,
        speed=None,
    )


class _SizeParser(HTMLParser):
    """The size section's drawn values: bars, quantile labels, D50 lines and their last
    values, the table's cells per class."""

    def __init__(self) -> None:
        super().__init__()
        self.bars: list[dict[str, str]] = []
        self.quantiles: dict[tuple[str, str], str] = {}
        self.lines: dict[str, int] = {}
        self.last: dict[str, str] = {}
        self.cells: dict[str, list[str]] = {}
        self.svg_units: list[str] = []
        self._open: tuple[str, Any] | None = None
        self._row: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        css = a.get("class", "")
        if tag == "svg" and "size-dist" in css:
            self.svg_units.append(a["data-unit"])
        elif tag == "rect" and css == "bar":
            self.bars.append(a)
        elif tag == "g" and css == "quantile":
            self._open = ("quantile", (a["data-class"], a["data-quantile"]))
        elif tag == "polyline" and css == "d50":
            self.lines[a["data-class"]] = len(a["points"].split())
        elif tag == "text" and css == "last-value":
            self._open = ("last", a["data-class"])
        elif tag == "tr" and "data-class" in a:
            self._row = a["data-class"]
            self.cells[self._row] = []
        elif tag == "td" and self._row is not None:
            self.cells[self._row].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        elif tag == "g" or (tag == "text" and self._open is not None and self._open[0] == "last"):
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            kind, key = self._open
            if kind == "quantile" and data.strip():
                self.quantiles[key] = data.strip()
            elif kind == "last":
                self.last[key] = self.last.get(key, "") + data
        if self._row is not None and self.cells[self._row]:
            self.cells[self._row][-1] += data


def _data(html: str) -> dict[str, Any]:
    found = re.search(r'<script type="application/json" id="replay-data">(.*?)</script>', html)
    assert found is not None
    return dict(json.loads(found.group(1).replace("<\\/", "</")))


def test_histogram_quantile_interpolates_on_the_log_scale_within_the_crossing_bin() -> None:
    edges = [1.0, 10.0, 100.0, 1000.0]
    assert histogram_quantile(edges, [0, 4, 0], 0.5) == pytest.approx(10.0**1.5)
    assert histogram_quantile(edges, [1, 1, 2], 0.5) == pytest.approx(100.0)
    assert histogram_quantile(edges, [1, 1, 2], 0.75) == pytest.approx(10.0**2.5)
    assert histogram_quantile(edges, [0, 0, 0], 0.5) is None


def test_report_shows_the_batch_size_distribution_and_the_d50_over_time(
    tmp_path: Path,
) -> None:
    html = render_report(_result(tmp_path))
    assert "<h2>Particle sizes</h2>" in html
    # Summed over the 5-min windows ending at the last evaluation and every 5 min before
    # it (evaluations 29, 24, 19, 14, 9, 4): each particle once, not every evaluation's.
    tiles = [29, 24, 19, 14, 9, 4]
    cex_units = sum(i + 1 for i in tiles)
    assert cex_units == 105
    data = _data(html)["sizes"]
    assert (data["window"], data["unit"], data["tiles"]) == (WINDOW_S, "um", 6)
    cex, pg = data["batch"]["CEX"], data["batch"]["PG"]
    assert cex["histogram"][5:8] == [cex_units, 2 * cex_units, cex_units]
    assert cex["count"] == 4 * cex_units == 420
    assert pg["count"] == 3 * 4 and pg["histogram"][8] == 12  # tiles 14 to 29 had PG
    # Read off the summed bins: CEX 1:2:1 in bins 5-7 has its median mid-bin 6 and its
    # D10 0.4 of the way through bin 5 (10 % of 4 parts = 0.4 of bin 5's 1 part).
    assert cex["d50"] == pytest.approx(_bin(6.5))
    assert cex["d10"] == pytest.approx(_bin(5.4))
    assert cex["d90"] == pytest.approx(_bin(7.6))
    assert pg["d50"] == pytest.approx(_bin(8.5))
    # The mean aspect ratio weighted by each tile's particles.
    aspect = sum((0.2 + 0.01 * i) * (i + 1) for i in tiles) / cex_units
    assert cex["mean_aspect_ratio"] == pytest.approx(aspect)
    assert pg["mean_aspect_ratio"] == pytest.approx(0.8)

    shown = _SizeParser()
    shown.feed(html)
    assert shown.svg_units == ["um"]
    bars = [(b["data-class"], int(b["data-bin"]), int(b["data-count"])) for b in shown.bars]
    assert bars == [("CEX", 5, 105), ("CEX", 6, 210), ("CEX", 7, 105), ("PG", 8, 12)]
    assert {b["fill"] for b in shown.bars if b["data-class"] == "CEX"} == {"#1d4ed8"}
    assert shown.quantiles[("CEX", "D50")] == f"D50 {_bin(6.5):.1f} µm" == "D50 42.2 µm"
    assert shown.quantiles[("CEX", "D10")] == f"D10 {_bin(5.4):.1f} µm"
    assert shown.quantiles[("PG", "D50")] == f"D50 {_bin(8.5):.0f} µm" == "D50 133 µm"
    # The table: particles, D10, D50, D90, D50 d²-weighted, mean aspect ratio.
    assert shown.cells["CEX"][:3] == ["CEX", "420", f"{_bin(5.4):.1f} µm"]
    assert shown.cells["CEX"][3] == "42.2 µm" and shown.cells["CEX"][-1] == f"{aspect:.2f}"
    assert shown.cells["PG"][1:3] == ["12", f"{_bin(8.1):.0f} µm"]
    # The D50 over time: one point per evaluation with sizes, the last value labelled.
    assert shown.lines == {"CEX": EVALUATIONS, "PG": EVALUATIONS - PG_FROM}
    assert shown.last == {"CEX": "44.5 µm", "PG": "129 µm"}
    d50 = data["d50"]
    assert [p["d50"] for p in d50["CEX"]] == [30.0 + 0.5 * i for i in range(EVALUATIONS)]
    assert d50["PG"][PG_FROM - 1]["d50"] is None and d50["PG"][-1]["d50_sq"] == 149.0


def test_report_sizes_in_pixels_name_the_pixel_size_setting(tmp_path: Path) -> None:
    html = render_report(_result(tmp_path, unit="px"))
    assert "Sizes are in pixels: set <code>probes.pixel_size_um</code>" in html
    shown = _SizeParser()
    shown.feed(html)
    assert shown.svg_units == ["px"]
    assert shown.quantiles[("CEX", "D50")] == "D50 42.2 px"
    assert "equivalent circle diameter (px), log scale" in html


def test_report_without_sizes_says_there_are_none_yet(tmp_path: Path) -> None:
    html = render_report(_result(tmp_path, unit=None))
    assert "<h2>Particle sizes</h2>" in html
    assert "No sizes yet: no window of this replay carries size statistics" in html
    assert 'class="bar"' not in html and "size-dist" not in html
    assert _data(html)["sizes"] is None
    # The rest of the report is drawn as before.
    assert "CEX share over the batch" in html


def test_a_real_replay_reports_the_sizes_its_windows_measured(tmp_path: Path) -> None:
    """90 simulated frames through the daemon's own pipeline: the batch's histogram per
    class holds exactly the confident particles of the frames its back-to-back windows
    cover, the bars draw it, and the D50 chart has a point per evaluation with sizes."""
    batch, config = _small_batch(tmp_path)
    data = tomllib.loads(config.read_text())
    data["aggregation"] = {"windows": ["10s", "30s", "60s"], "publish_interval": "2s"}
    data["alarms"]["definitions"] = [
        {
            "id": "pg_high",
            "kind": "fraction_high",
            "priority": "high",
            "message": "PG {value:.0%}",
            "class_name": "PG",
            "window": "30s",
            "limit": 0.3,
            "min_count": 30,
        }
    ]
    settings = replay_settings(load_settings(data=data), "R1", tmp_path / "state")
    frames = find_recorded_frames(batch, ("*.png",), recursive=False)
    result = replay_frames(settings, "R1", frames, folder=batch)
    html = render_report(result)
    sizes = _data(html)["sizes"]
    assert sizes is not None and sizes["window"] == 30
    # The tiles end at the last evaluation and every 30 s before it, as far as one goes.
    ends = [u.ts for u in result.updates]
    tiles = [end for end in ends if any(abs(end - (ends[-1] - 30 * k)) < 1e-6 for k in range(9))]
    assert sizes["tiles"] == len(tiles) == 3
    covered = [row for row in result.results if min(tiles) - 30 < float(row["ts"]) <= max(tiles)]
    assert len(covered) >= len(result.results) - 2  # at most a publish interval left out
    shown = _SizeParser()
    shown.feed(html)
    for name in CLASSES:
        particles = sum(int(row["counts"].get(name, 0)) for row in covered)
        figures = sizes["batch"][name]
        assert particles > 0 and figures["count"] == sum(figures["histogram"]) == particles
        bars = [
            (int(b["data-bin"]), int(b["data-count"]))
            for b in shown.bars
            if b["data-class"] == name
        ]
        assert bars == [(i, n) for i, n in enumerate(figures["histogram"]) if n]
        d50s = [point["d50"] for point in sizes["d50"][name] if point["d50"] is not None]
        assert shown.lines[name] == len(d50s) > 0
        digits = 0 if d50s[-1] >= 100 else 1 if d50s[-1] >= 10 else 2
        unit = "µm" if sizes["unit"] == "um" else "px"
        assert shown.last[name] == f"{d50s[-1]:.{digits}f} {unit}"
