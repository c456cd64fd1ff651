"""The dashboard's size view in a real browser: Debian's headless Chromium driven by
Selenium against the real HTTP server over a fake read model whose windows carry size
statistics (`tests.test_size_views.sized_view`). Per class, the selected window's size
distribution is drawn as one bar per filled bin, with D10/D50/D90 marked and the unit
said; the D50 of each class is drawn over time from the history; "by d²" switches both
to the square-weighted figures; a window in pixels says how to get micrometres, and a
window without sizes says there are none yet.

Screenshots land in the test's folder; with CRYSTAL_MONITOR_SCREENSHOTS=docs the page's
is also written to docs/dashboard-sizes.png, which is how the committed one is made.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.config.http import HttpConfig
from monitor.daemon import Daemon
from monitor.web.server import WebServer
from tests.fake_view import FakeView, RefusingCommands
from tests.mosquitto import free_port
from tests.test_dashboard_browser import daemon  # noqa: F401 (the fixture)
from tests.test_label_page_browser import _save, browser  # noqa: F401 (the fixture)
from tests.test_size_views import (
    BIN_EDGES,
    CEX_SIZES,
    HISTORY_ROWS,
    PG_FROM_ROW,
    PG_SIZES,
    PX_SIZES,
    UNSIZED_ROWS,
    cex_d50,
    pg_d50,
    sized_view,
)


@pytest.fixture
def served() -> Iterator[tuple[str, FakeView]]:
    """The real server (no token) over `sized_view`; its base URL and the view."""
    view = sized_view()
    server = WebServer(HttpConfig(enabled=True, port=free_port()), view, RefusingCommands())
    server.start()
    try:
        yield server.url.rstrip("/"), view
    finally:
        server.stop()


# What the size view shows, read in one go (it is redrawn on every refresh).
_SIZES_JS = """
const panel = document.querySelector("section.probe .size-panel");
if (!panel) return null;
const dist = panel.querySelector("svg.size-dist");
const trend = panel.querySelector("svg.d50-trend");
const text = (node) => node ? node.textContent.trim() : null;
const rows = {};
for (const row of dist.querySelectorAll("g.size-row")) {
  rows[row.dataset.class] = {
    bars: [...row.querySelectorAll("rect.bar")].map((bar) => ({
      bin: Number(bar.dataset.bin), count: Number(bar.dataset.count),
      height: Number(bar.getAttribute("height")), fill: bar.getAttribute("fill"),
    })),
    caption: text(row.querySelector(".size-caption")),
    quantiles: Object.fromEntries([...row.querySelectorAll("g.quantile")].map(
      (q) => [q.dataset.quantile, text(q.querySelector("text"))])),
  };
}
return {
  refreshes: Number(document.body.dataset.refreshes || 0),
  window: panel.closest("section.probe").querySelector(".windows button.selected").textContent,
  weighting: panel.dataset.weighting,
  unit: panel.dataset.unit,
  title: text(panel.querySelector(".size-title")),
  note: panel.querySelector(".size-note").hidden ? "" : text(panel.querySelector(".size-note")),
  state: dist.dataset.state,
  empty: text(dist.querySelector("text.empty")),
  axis: text(dist.querySelector("text.axis-label")),
  ticks: [...dist.querySelectorAll("text.tick")].map(text),
  rows,
  trend: {
    points: Number(trend.dataset.points),
    sized: Number(trend.dataset.sized),
    title: text(trend.querySelector(".chart-title")),
    lines: Object.fromEntries([...trend.querySelectorAll("polyline.d50-series")].map(
      (line) => [line.dataset.class, line.getAttribute("points").split(" ").length])),
    last: Object.fromEntries([...trend.querySelectorAll("text.last-value")].map(
      (t) => [t.dataset.class, t.textContent])),
    empty: text(trend.querySelector("text.empty")),
  },
};
"""


def _shown(driver: Any) -> dict[str, Any] | None:
    shown = driver.execute_script(_SIZES_JS)
    return None if shown is None else dict(shown)


def _when(wait: Any, driver: Any, condition: Any) -> dict[str, Any]:
    """The size view as `_shown` reads it, once `condition` holds for it."""
    return dict(
        wait.until(lambda _: page if (page := _shown(driver)) and condition(page) else None)
    )


def _click(driver: Any, selector: str, text: str) -> None:
    driver.execute_script(
        "const [sel, text] = arguments;"
        "[...document.querySelectorAll(sel)].find((b) => b.textContent === text).click();",
        selector,
        text,
    )


def _filled(histogram: list[int]) -> list[tuple[int, int]]:
    return [(i, n) for i, n in enumerate(histogram) if n]


def test_size_view_draws_each_class_distribution_d50_trend_and_unit(
    served: tuple[str, FakeView],
    browser: Any,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    base, _view = served
    browser.set_window_size(1600, 1720)
    browser.get(f"{base}/")
    wait = WebDriverWait(browser, 60, poll_frequency=0.1)

    # The 5-min window (the default): micrometres, number-weighted.
    page = _when(wait, browser, lambda p: p["refreshes"] >= 1 and p["trend"]["lines"])
    assert page["window"] == "5 min" and page["weighting"] == "number"
    assert page["unit"] == "um" and page["state"] == "sizes" and page["note"] == ""
    assert page["title"] == "Size distribution · equivalent circle diameter (µm) · 5 min window"
    assert page["axis"] == "equivalent circle diameter (µm), log scale"
    # The axis spans the filled bins and one either side (3.16 to 1778 um), not all
    # four decades of the aggregator's bins.
    assert page["ticks"] == ["5", "10", "20", "50", "100", "200", "500", "1000"]
    assert set(page["rows"]) == {"CEX", "PG"}
    for name, sizes, colour in (("CEX", CEX_SIZES, "#4ea1ff"), ("PG", PG_SIZES, "#d29bff")):
        row = page["rows"][name]
        # One bar per filled bin, each with its count, in the class colour.
        assert [(b["bin"], b["count"]) for b in row["bars"]] == _filled(sizes["histogram"])
        assert {b["fill"] for b in row["bars"]} == {colour}
        assert all(b["height"] > 0 for b in row["bars"])
    cex, pg = page["rows"]["CEX"], page["rows"]["PG"]
    assert cex["quantiles"] == {"D10": "D10 17.2 µm", "D50": "D50 42.1 µm", "D90": "D90 96.5 µm"}
    assert pg["quantiles"] == {"D10": "D10 48.9 µm", "D50": "D50 101 µm", "D90": "D90 215 µm"}
    assert cex["caption"] == f"CEX · {CEX_SIZES['count']} particles · mean aspect ratio 0.31"
    assert pg["caption"] == f"PG · {PG_SIZES['count']} particles · mean aspect ratio 0.78"
    # The fullest bin is the tallest bar.
    tallest = max(cex["bars"], key=lambda b: b["height"])
    assert tallest["count"] == max(CEX_SIZES["histogram"])

    # The D50 trend: every stored row a point, a line per class where it was measured.
    trend = page["trend"]
    assert trend["points"] == HISTORY_ROWS and trend["sized"] == 2
    assert trend["title"] == "D50 (µm), 5 min window"
    assert trend["lines"] == {"CEX": HISTORY_ROWS - UNSIZED_ROWS, "PG": HISTORY_ROWS - PG_FROM_ROW}
    assert trend["last"] == {
        "CEX": f"{cex_d50(HISTORY_ROWS - 1):.1f} µm",
        "PG": f"{pg_d50(HISTORY_ROWS - 1):.0f} µm",
    }
    assert trend["last"] == {"CEX": "42.1 µm", "PG": "101 µm"}
    _save(browser, tmp_path, "dashboard-sizes.png")

    # By d²: the square-weighted quantiles, bars re-weighted, the D50 trend too.
    _click(browser, ".weighting button", "by d²")
    page = _when(wait, browser, lambda p: p["weighting"] == "square")
    cex_sq = page["rows"]["CEX"]
    assert cex_sq["quantiles"] == {
        "D10": "D10 31.8 µm",
        "D50": "D50 68.4 µm",
        "D90": "D90 142 µm",
    }
    assert [(b["bin"], b["count"]) for b in cex_sq["bars"]] == _filled(CEX_SIZES["histogram"])
    tallest_sq = max(cex_sq["bars"], key=lambda b: b["height"])
    weights = [n * BIN_EDGES[i] * BIN_EDGES[i + 1] for i, n in enumerate(CEX_SIZES["histogram"])]
    assert tallest_sq["bin"] == weights.index(max(weights)) != tallest["bin"]
    assert page["trend"]["title"] == "D50 (d²-weighted) (µm), 5 min window"
    assert page["trend"]["last"]["PG"] == f"{101.0 * 1.7:.0f} µm"

    # The 1-min window is in pixels and says how to get micrometres; no PG measured.
    _click(browser, ".weighting button", "by number")
    _click(browser, ".windows button", "1 min")
    page = _when(wait, browser, lambda p: p["window"] == "1 min" and p["unit"] == "px")
    assert "probes.pixel_size_um" in page["note"]
    assert page["axis"] == "equivalent circle diameter (px), log scale"
    assert page["rows"]["CEX"]["quantiles"]["D50"] == "D50 12.5 px"
    assert [(b["bin"], b["count"]) for b in page["rows"]["CEX"]["bars"]] == _filled(
        PX_SIZES["histogram"]
    )
    assert page["rows"]["PG"]["bars"] == [] and page["rows"]["PG"]["quantiles"] == {}
    assert page["rows"]["PG"]["caption"] == "PG · 0 particles · none in the window"

    # The 15-min window has no sizes: the panel says so, nothing is drawn.
    _click(browser, ".windows button", "15 min")
    page = _when(
        wait, browser, lambda p: p["window"] == "15 min" and p["trend"]["points"] == HISTORY_ROWS
    )
    assert page["state"] == "none" and page["empty"] == "no sizes yet"
    assert page["note"].startswith("No sizes yet")
    assert page["rows"] == {}
    assert page["trend"]["sized"] == 0 and page["trend"]["lines"] == {}
    assert page["trend"]["empty"] == "no sizes yet"
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


# The size view beside what it was drawn from: the probe's state the page holds (read in
# the same turn of the page's event loop, so the two cannot differ).
_DRAWN_FROM_JS = """
const view = views.get(arguments[0]);
if (!view || !view.state) return null;
const stats = view.state.snapshot.windows[`${view.window}s`];
const panel = view.sizePanel;
const note = panel.querySelector(".size-note");
const bin = (bar) => [Number(bar.dataset.bin), Number(bar.dataset.count)];
return {
  window: view.window,
  sizes: stats ? stats.sizes || null : null,
  unit: panel.dataset.unit,
  note: note.hidden ? "" : note.textContent,
  rows: Object.fromEntries([...panel.querySelectorAll("svg.size-dist g.size-row")].map((row) => [
    row.dataset.class, {
      bars: [...row.querySelectorAll("rect.bar")].map(bin),
      d50: (row.querySelector('g.quantile[data-quantile="D50"] text') || {}).textContent || null,
    }])),
  trendSized: Number(panel.querySelector("svg.d50-trend").dataset.sized),
};
"""


def test_size_view_of_a_real_daemon_draws_what_its_windows_say(
    daemon: Daemon,  # noqa: F811 (the fixture imported above)
    browser: Any,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    """The simulated probe of the dashboard's own browser test (no pixel size set): the
    size view draws the bins and the D50 of the window the daemon's state carries, in
    pixels and saying how to get micrometres, and the D50 trend fills from the store."""
    from selenium.webdriver.support.ui import WebDriverWait

    assert daemon.web is not None
    browser.set_window_size(1600, 1900)
    browser.get(daemon.web.url)
    wait = WebDriverWait(browser, 90, poll_frequency=0.2)

    def drawn(_: Any) -> dict[str, Any] | None:
        page = browser.execute_script(_DRAWN_FROM_JS, "R1")
        sizes = page and page["sizes"]
        ready = sizes and all(sizes["classes"][name]["count"] for name in ("CEX", "PG"))
        return page if ready and page["trendSized"] == 2 else None

    page = wait.until(drawn)
    sizes = page["sizes"]
    assert sizes["unit"] == "px" and page["unit"] == "px"
    assert "probes.pixel_size_um" in page["note"]
    for name in ("CEX", "PG"):
        figures = sizes["classes"][name]
        row = page["rows"][name]
        assert row["bars"] == [[i, n] for i, n in enumerate(figures["histogram"]) if n]
        assert sum(n for _, n in row["bars"]) == figures["count"]
        d50 = figures["d50"]
        digits = 0 if d50 >= 100 else 1 if d50 >= 10 else 2
        assert row["d50"] == f"D50 {d50:.{digits}f} px"
    # In the test's folder only: docs/ has the fake view's (its figures are asserted).
    assert browser.save_screenshot(str(tmp_path / "dashboard-sizes-daemon.png"))
