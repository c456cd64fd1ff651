"""The shadow model page in a real browser: Debian's headless Chromium driven by Selenium
against the real HTTP server, behind its token, over a real shadow record (the SQLite
store the daemon writes) and a review queue with labelled crops. The page shows the
verdict with its reasons, what runs, both models' accuracy on the labelled crops with
McNemar's p, a row per window with its start in the browser's zone and each class's
fraction under both models (the significant differences highlighted) and a chart per
probe and class; the filters reach the API; it reloads by itself; without a shadow it
says how to set one up.

Screenshots land in the test's folder; with CRYSTAL_MONITOR_SCREENSHOTS=docs the page's
is also written to docs/shadow-page.png, which is how the committed one is made.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from monitor.review.sample_store import SampleStore
from monitor.shadow.store import ShadowStore
from tests.daemon_process import wait_for
from tests.fake_view import FakeView
from tests.test_label_api import _settings_two_probes
from tests.test_label_page_browser import _save, browser  # noqa: F401 (the fixture)
from tests.test_shadow_api import (
    CANDIDATE,
    CLASSES,
    LIVE,
    OLDER,
    R2_CANDIDATE_PG,
    RUNNING,
    W0,
    WINDOW_S,
    _frames,
    fill_shadow,
    serve,
)
from tests.test_shadow_api import TOKEN as API_TOKEN

ZONE = "Asia/Kathmandu"  # UTC+05:45: a zone no test machine runs in by chance


@dataclass
class ShadowPage:
    base: str
    view: FakeView
    shadow: ShadowStore


@pytest.fixture
def shadow_page(tmp_path: Path) -> Iterator[ShadowPage]:
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
            yield ShadowPage(base, view, shadow)
    finally:
        shadow.close()
        samples.close()


# What the page shows, read in one go (everything is redrawn on each reload).
_PAGE_JS = """
const text = (node) => node ? node.innerText.trim() : null;
const verdict = document.getElementById("verdict");
return {
  state: document.body.dataset.state || null,
  loads: Number(document.body.dataset.loads || 0),
  verdict: {
    className: verdict.className,
    promote: verdict.dataset.promote,
    word: text(verdict.querySelector(".verdict-word, h2")),
    models: text(verdict.querySelector(".verdict-models")),
    reasons: [...verdict.querySelectorAll(".reason")].map(text),
    checks: Object.fromEntries([...verdict.querySelectorAll(".check")].map(
      (c) => [c.dataset.check, c.classList.contains("ok")])),
    text: text(verdict),
  },
  facts: Object.fromEntries([...document.querySelectorAll("dd[data-fact]")].map(
    (d) => [d.dataset.fact, text(d)])),
  accuracy: Object.fromEntries([...document.querySelectorAll(".accuracy .figure")].map(
    (f) => [f.dataset.model, text(f.querySelector(".value"))])),
  running: text(document.getElementById("running")),
  header: [...document.querySelectorAll("#windows thead th")].map(text),
  rows: [...document.querySelectorAll("#windows tbody tr.window-row")].map((row) => ({
    probe: row.dataset.probe, start: row.dataset.start,
    cells: [...row.cells].map(text),
    significant: [...row.querySelectorAll("td.significant")].map((c) => c.dataset.class),
    partial: row.classList.contains("partial"),
  })),
  table: text(document.querySelector("#windows tbody")),
  charts: [...document.querySelectorAll("#charts svg.shadow-chart")].map((chart) => ({
    probe: chart.dataset.probe, name: chart.dataset.class,
    live: [...chart.querySelectorAll(".point.live")].map((p) => Number(p.dataset.value)),
    candidate: [...chart.querySelectorAll(".point.candidate")].map((p) => Number(p.dataset.value)),
    significant: chart.querySelectorAll(".point.significant").length,
    lines: chart.querySelectorAll("polyline.series").length,
    width: chart.getBoundingClientRect().width,
  })),
  candidates: [...document.getElementById("filter-candidate").options].map((o) => o.value),
  notice: document.getElementById("notice").hidden ? "" : text(document.getElementById("notice")),
  updated: text(document.getElementById("updated")),
};
"""


def _shown(driver: Any) -> dict[str, Any]:
    return dict(driver.execute_script(_PAGE_JS))


def _when(wait: Any, driver: Any, condition: Any) -> dict[str, Any]:
    """The page as `_shown` reads it, once `condition` holds for it."""
    return dict(wait.until(lambda _: page if condition(page := _shown(driver)) else None))


def _local(epoch_s: float, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return datetime.fromtimestamp(epoch_s, ZoneInfo(ZONE)).strftime(fmt)


def _span(start: float, minutes: int = 5) -> str:
    return f"{_local(start)}–{_local(start + 60 * minutes, '%H:%M')}"


def _open(driver: Any, base: str) -> Any:
    """Log in and open the page in ZONE; a wait for what follows."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": ZONE})
    driver.get(f"{base}/login?token={API_TOKEN}")
    driver.get(f"{base}/shadow")
    return WebDriverWait(driver, 60, poll_frequency=0.1)


def test_the_page_shows_the_verdict_the_windows_and_the_charts(
    shadow_page: ShadowPage,
    browser: Any,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    # Behind the token: without the login cookie the page sends the browser to /login.
    browser.get(f"{shadow_page.base}/shadow")
    assert browser.current_url.endswith("/login")
    wait = _open(browser, shadow_page.base)
    page = _when(wait, browser, lambda page: page["state"] == "report")

    # The verdict as a banner, with every reason and each check of the rule.
    verdict = page["verdict"]
    assert verdict["className"] == "verdict promote" and verdict["promote"] == "true"
    assert verdict["word"] == "PROMOTE: YES"
    assert verdict["models"] == f"{CANDIDATE} against {LIVE}"
    (reason,) = verdict["reasons"]
    assert "fractions differ in 1 full windows" in reason
    assert "candidate right more often (McNemar p = 0.0309)" in reason
    assert verdict["checks"] == {
        "enough_windows": True,
        "enough_labels": True,
        "not_worse_on_labels": True,
        "better_on_labels": True,
        "fractions_agree": False,
    }
    assert "4 full windows (≥ 200 crops; 3 needed), 1 differing" in verdict["text"]

    # What runs, and both models on the labelled crops.
    facts = page["facts"]
    assert facts["Candidate"] == CANDIDATE
    assert facts["Model"] == RUNNING["path"]
    assert facts["Share"] == "25 % of the frames"
    assert facts["Windows"] == "5 min"
    assert (facts["Compared"], facts["Skipped"], facts["Failed"]) == (
        "52 frames",
        "3 frames",
        "1 frame",
    )
    assert facts["Labelled scored"] == "60 crops"
    assert facts["In this range"] == "52 frames, 1040 crops"
    assert facts["Agreement"] == "93.5 %"  # 972 of 1040 crops
    assert page["accuracy"] == {"live": "66.7 %", "candidate": "83.3 %"}
    assert facts["Scored by both"] == "60 crops"
    assert (facts["Only live right"], facts["Only candidate right"]) == ("4", "14")
    assert facts["McNemar p"] == "0.0309"

    # A row per window and probe, its time in the browser's zone.
    assert page["header"][:5] == ["Probe", "Window", "Frames", "Crops", "Agreement"]
    assert page["header"][5:] == ["CEX", "PG", *["live", "candidate", "Δ [95 % CI]"] * 2]
    rows = page["rows"]
    assert [(r["probe"], r["cells"][1]) for r in rows] == [
        ("R1", _span(W0)),
        ("R1", _span(W0 + 300)),
        ("R1", _span(W0 + 600)),
        ("R1", _span(W0 + 900)),
        ("R2", _span(W0 + 900)),
    ]
    # Kathmandu kept UTC+05:30 until 1986: the browser's own zone rules, not an offset.
    assert rows[0]["cells"][1] == "1970-01-12 18:15–18:20"
    assert rows[0]["start"] == "1970-01-12T12:45:00.000Z"
    first = rows[0]["cells"]
    assert first[2:10] == ["12", "240", "97.5 %", "80.0 %", "80.0 %", first[7], "20.0 %", "20.0 %"]
    assert first[7].startswith("+0.0 pp [-") and first[10].startswith("+0.0 pp [-")
    assert rows[0]["significant"] == [] and not rows[0]["partial"]
    assert rows[3]["cells"][2:5] == ["4", "80", "97.5 %"] and rows[3]["partial"]
    # R2 sees twice the PG share under the candidate: both classes' differences stand out.
    assert rows[4]["cells"][2:] == [
        "12",
        "240",
        "80.0 %",
        "80.0 %",
        "60.0 %",
        "-20.0 pp [-22.1, -17.9]",
        "20.0 %",
        "40.0 %",
        "+20.0 pp [+17.9, +22.1]",
    ]
    assert rows[4]["significant"] == ["CEX", "PG"]

    # A chart per probe and class: the fraction under both models in each window.
    charts = {(c["probe"], c["name"]): c for c in page["charts"]}
    assert list(charts) == [("R1", "CEX"), ("R1", "PG"), ("R2", "CEX"), ("R2", "PG")]
    assert charts["R1", "PG"]["live"] == pytest.approx([0.2] * 4)
    assert charts["R1", "PG"]["candidate"] == pytest.approx([0.2] * 4)
    assert charts["R1", "PG"]["lines"] == 2 and charts["R1", "PG"]["significant"] == 0
    assert charts["R2", "PG"]["live"] == pytest.approx([0.2])
    assert charts["R2", "PG"]["candidate"] == pytest.approx([0.4])
    assert charts["R2", "PG"]["significant"] == 2  # both points of the one window
    assert charts["R2", "CEX"]["candidate"] == pytest.approx([0.6])
    assert all(c["width"] > 250 for c in page["charts"])
    assert page["candidates"] == ["", CANDIDATE, OLDER]
    assert page["updated"] == f"as of {_local(1_000_000.0, '%Y-%m-%d %H:%M:%S')}"
    assert page["notice"] == ""

    # It reloads by itself: frames compared since show up without a click.
    loads = page["loads"]
    rows_after = _frames("R2", W0 + 1200, 3, R2_CANDIDATE_PG)
    shadow_page.shadow.add_frames(
        [(f, f"R2_{f.ts:.0f}.tif", LIVE, CANDIDATE, CLASSES) for f in rows_after],
        recorded_at=W0 + 1300,
    )
    assert shadow_page.view.shadow_running is not None
    shadow_page.view.shadow_running["compared"] = 55
    slow = WebDriverWait(browser, 30, poll_frequency=0.2)
    page = _when(slow, browser, lambda page: len(page["rows"]) == 6)
    assert page["loads"] > loads
    assert page["rows"][5]["cells"][:4] == ["R2", _span(W0 + 1200), "3", "60"]
    assert page["facts"]["Compared"] == "55 frames"
    # The whole page in the screenshot: the window as tall as the page.
    for _ in range(3):  # the window's height includes the browser's own bars
        hidden = browser.execute_script(
            "return document.documentElement.scrollHeight - window.innerHeight"
        )
        if hidden <= 0:
            break
        browser.set_window_size(1600, browser.get_window_size()["height"] + hidden)
    _when(wait, browser, lambda page: page["rows"])
    _save(browser, tmp_path, "shadow-page.png")

    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    # The refusal before the login is the one error the page expects.
    assert all("/shadow" in entry["message"] and "401" in entry["message"] for entry in errors), (
        errors
    )


def test_the_filters_reach_the_api_and_the_verdict_follows(
    shadow_page: ShadowPage,
    browser: Any,  # noqa: F811 (the fixture imported above)
) -> None:
    """Windows, a time range in the browser's zone and the candidate reach /api/shadow."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    wait = _open(browser, shadow_page.base)
    _when(wait, browser, lambda page: page["state"] == "report")
    asked = shadow_page.view.shadow_asked

    def reload_with(change: Any) -> dict[str, Any]:
        loads = _shown(browser)["loads"]
        change()
        return _when(wait, browser, lambda page: page["loads"] > loads)

    windows = Select(browser.find_element(By.ID, "filter-window"))
    page = reload_with(lambda: windows.select_by_value("10m"))
    assert asked[-1]["window_s"] == 600.0
    assert [r["cells"][1] for r in page["rows"]] == [
        _span(W0 - 300, 10),
        _span(W0 + 300, 10),
        _span(W0 + 900, 10),
        _span(W0 + 900, 10),
    ]
    assert [r["cells"][2] for r in page["rows"]] == ["12", "24", "4", "12"]
    page = reload_with(lambda: windows.select_by_value(""))
    assert asked[-1]["window_s"] is None and len(page["rows"]) == 5

    # From W2's start as the browser's clock shows it: two full windows, not yet.
    set_value = (
        "arguments[0].value = arguments[1];"
        "arguments[0].dispatchEvent(new Event('change', {bubbles: true}));"
    )
    since = browser.find_element(By.ID, "filter-since")
    page = reload_with(
        lambda: browser.execute_script(set_value, since, _local(W0 + 600, "%Y-%m-%dT%H:%M:%S"))
    )
    assert asked[-1]["since"] == W0 + 600
    assert [r["probe"] for r in page["rows"]] == ["R1", "R1", "R2"]
    verdict = page["verdict"]
    assert verdict["promote"] == "false" and verdict["word"] == "PROMOTE: NOT YET"
    assert verdict["className"] == "verdict hold"
    (reason,) = verdict["reasons"]
    assert reason.startswith("2 full windows (>= 200 compared crops")
    assert "let the shadow run longer or raise model.shadow.share" in reason
    assert verdict["checks"]["enough_windows"] is False
    page = reload_with(lambda: browser.execute_script(set_value, since, ""))

    # The older candidate: its one window, and no labelled crops scored by it.
    candidate = Select(browser.find_element(By.ID, "filter-candidate"))
    page = reload_with(lambda: candidate.select_by_value(OLDER))
    assert asked[-1]["candidate"] == OLDER
    assert [(r["probe"], r["cells"][1], r["cells"][4]) for r in page["rows"]] == [
        ("R1", _span(W0 - 300), "100.0 %")
    ]
    assert page["verdict"]["promote"] == "false"
    assert any(
        r.startswith(
            "0 labelled crops scored by both models, 50 needed: label more crops on /label"
        )
        for r in page["verdict"]["reasons"]
    )
    assert page["facts"]["Scored by both"] == "0 crops"
    assert page["accuracy"] == {"live": "–", "candidate": "–"}


@pytest.fixture
def without_shadow() -> Iterator[str]:
    """The server over a view with no shadow configured and no record; its base URL."""
    yield from serve(FakeView(shadow=None))


def test_without_a_shadow_the_page_says_how_to_set_one_up(
    without_shadow: str,
    browser: Any,  # noqa: F811 (the fixture imported above)
) -> None:
    from selenium.webdriver.common.by import By

    base = without_shadow
    wait = _open(browser, base)
    page = _when(wait, browser, lambda page: page["state"] == "none")
    assert page["verdict"]["word"] == "No shadow model"
    assert "no shadow model: set [model.shadow] path = " in page["verdict"]["text"]
    assert "systemctl reload crystal-monitor" in page["verdict"]["text"]
    assert page["rows"] == [] and page["charts"] == [] and page["notice"] == ""
    # The pages link to each other.
    browser.find_element(By.LINK_TEXT, "Dashboard").click()
    wait.until(lambda d: d.current_url.rstrip("/") == base)
    browser.find_element(By.LINK_TEXT, "Shadow model").click()
    wait.until(lambda d: d.current_url.endswith("/shadow"))
    browser.find_element(By.LINK_TEXT, "Label crops").click()
    wait.until(lambda d: d.current_url.endswith("/label"))
    browser.find_element(By.LINK_TEXT, "Shadow model").click()
    wait.until(lambda d: d.current_url.endswith("/shadow"))
    assert wait_for(lambda: _shown(browser)["state"] == "none", 30)
