"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium against
the real server of a real daemon. The page loads, the trend grows as frames arrive, the
latest frame shows its particle boxes, the strip of recent frames shows thumbnails with
theirs and a click on one holds it in the large view until Live is clicked, an alarm's
raise and acknowledge are marked on the trend, and an Acknowledge click reaches the alarm
engine. The clock and the time axis say the date and the browser's time zone, and the
page explains "adjusted", "CUSUM" and a "–" value in tooltips.

Screenshots land in the test's folder; with CRYSTAL_MONITOR_SCREENSHOTS=docs they are
also written to docs/ (dashboard.png, dashboard-acknowledged.png), which is how the
committed ones are made.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from monitor.config.settings import load_settings
from monitor.daemon import Daemon
from monitor.runtime.probe_state import RECENT_FRAMES
from tests.daemon_process import wait_for
from tests.mosquitto import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SPEED = 20.0  # simulated seconds per real second: minutes of trend in a short test
SCREENSHOTS = os.environ.get("CRYSTAL_MONITOR_SCREENSHOTS")
THUMB_WIDTH = 160  # dashboard.js asks for strip thumbnails this wide (the frames are 800)
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")  # how the API writes times
HIGH_COLOUR = "#e5383b"  # dashboard.js PRIORITY_COLOURS.high


def _require_browser() -> None:
    """A missing browser fails the test: a skipped browser test must never count as passed."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    pytest.fail(
        f"needs {CHROMIUM} and {CHROMEDRIVER}: run 'sudo apt-get install chromium "
        "chromium-driver' (make test does it when run as root)"
    )


class FastClock:
    """The daemon's clock running SPEED times faster than the wall clock."""

    def __init__(self) -> None:
        self._start = time.time()

    def __call__(self) -> float:
        return self._start + (time.time() - self._start) * SPEED


def _settings(state: Path, port: int, extra_alarms: Sequence[dict[str, Any]] = ()) -> Any:
    fraction_alarm = {
        "kind": "fraction_high",
        "class_name": "PG",
        "deadband": 0.02,
    }
    return load_settings(
        data={
            "daemon": {"state_dir": str(state)},
            "aggregation": {"windows": ["1m", "5m", "15m"], "publish_interval": "0.5s"},
            "http": {"enabled": True, "port": port, "refresh": "1s", "frame_width": 800},
            "alarms": {
                "definitions": [
                    {
                        **fraction_alarm,
                        "id": "pg_high",
                        "priority": "high",
                        "message": "PG share {value:.1%} above {limit:.0%} (5-min window)",
                        "window": "5m",
                        "limit": 0.15,
                        "min_count": 100,
                    },
                    {
                        **fraction_alarm,
                        "id": "pg_warning",
                        "priority": "medium",
                        "message": "PG share {value:.1%} above {limit:.0%} (1-min window)",
                        "window": "1m",
                        "limit": 0.08,
                        "min_count": 50,
                    },
                    {
                        "id": "probe_stale",
                        "kind": "probe_stale",
                        "priority": "high",
                        "message": "no frame for {value:.0f} s",
                        "max_age": "2m",
                    },
                    *extra_alarms,
                ]
            },
            "probes": [
                {
                    "id": "R1",
                    "sampling": "particles",
                    "source": {
                        "type": "simulated",
                        "mode": "frame",
                        "fps": 2,
                        "width": 800,
                        "height": 600,
                        "particles": 22,
                        "profile": "ramp:0.02:0.4@60-1200",
                        "seed": 4,
                    },
                }
            ],
        }
    )


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    port = free_port()
    running = Daemon(_settings(tmp_path / "state", port), clock=FastClock())
    running.start()
    try:
        yield running
    finally:
        running.stop()


# For the explanations: a shift (CUSUM) alarm, and a fraction alarm that never has enough
# particles, so its value stays "–" with a reason.
EXPLAINED_ALARMS = (
    {
        "id": "pg_onset",
        "kind": "shift",
        "class_name": "PG",
        "priority": "low",
        "message": "PG onset detected (CUSUM)",
        "baseline": 0.02,
        "shifted": 0.1,
        "threshold": 5.0,
    },
    {
        "id": "pg_rare",
        "kind": "fraction_high",
        "class_name": "PG",
        "priority": "low",
        "message": "PG share {value:.1%} above {limit:.0%}",
        "window": "5m",
        "limit": 0.5,
        "min_count": 1_000_000,
    },
)


@pytest.fixture
def explained_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """The daemon with EXPLAINED_ALARMS added."""
    port = free_port()
    clock = FastClock()
    running = Daemon(_settings(tmp_path / "state", port, EXPLAINED_ALARMS), clock=clock)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)  # the system browser: nothing is downloaded
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1600,1150",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _save(driver: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    if SCREENSHOTS:
        target = Path(SCREENSHOTS)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / name)


def _alarm_status(daemon: Daemon, alarm_id: str) -> dict[str, Any]:
    return next(a for a in daemon.view.alarm_states("R1") if a["alarm_id"] == alarm_id)


def _alarm_state(daemon: Daemon, alarm_id: str) -> str:
    return str(_alarm_status(daemon, alarm_id)["state"])


# The alarm markers on the trend, read in one go (the trend is redrawn every refresh).
_MARKERS_JS = """
return [...arguments[0].querySelectorAll("svg.trend g.alarm-marker")].map((g) => ({
  alarm_id: g.dataset.alarmId, to_state: g.dataset.toState,
  raised: g.classList.contains("raised"),
  stroke: g.querySelector("line.mark").getAttribute("stroke"),
  title: g.querySelector("title").textContent,
}));
"""


def _markers(browser: Any, probe: Any, alarm_id: str, to_state: str) -> list[dict[str, Any]]:
    return [
        marker
        for marker in browser.execute_script(_MARKERS_JS, probe)
        if marker["alarm_id"] == alarm_id and marker["to_state"] == to_state
    ]


# What the page shows of the recent frames, read in one go (the strip is redrawn as
# frames arrive, so element handles go stale).
_FRAMES_JS = """
const section = arguments[0];
const rects = (root) => [...root.querySelectorAll("rect")].map((r) => r.dataset.label);
const wrap = section.querySelector(".frame-wrap");
const live = section.querySelector(".live-toggle");
return {
  large: {
    key: wrap.dataset.key || null, ts: wrap.dataset.ts, loaded: wrap.dataset.loaded,
    width: wrap.querySelector("img").naturalWidth, labels: rects(wrap),
  },
  live: live.getAttribute("aria-pressed") === "true",
  refreshes: Number(document.body.dataset.refreshes || 0),
  thumbs: [...section.querySelectorAll(".strip .thumb")].map((thumb) => ({
    key: thumb.dataset.key, ts: thumb.dataset.ts, index: Number(thumb.dataset.index),
    selected: thumb.classList.contains("selected"),
    width: thumb.querySelector("img").naturalWidth, labels: rects(thumb),
  })),
};
"""


def _stored_labels(daemon: Daemon) -> dict[str, Counter[str]]:
    """Per stored frame key, its particles by class, uncertain and out of distribution
    apart (what the boxes say)."""
    labels: dict[str, Counter[str]] = {}
    for row in daemon.store.frames_since("R1", 0.0):
        counted = Counter({name: n for name, n in row.counts.items() if n})
        if row.n_uncertain:
            counted["uncertain"] = row.n_uncertain
        if row.n_ood:
            counted["not a crystal"] = row.n_ood
        labels[row.key] = counted
    return labels


def _click_thumb(browser: Any, probe: Any, index: int) -> tuple[str, str]:
    """Click the strip's thumbnail at `index` (newest is 0); (key, ISO time) of its frame."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        try:
            thumb = probe.find_element(By.CSS_SELECTOR, f'.strip .thumb[data-index="{index}"]')
            key, ts = thumb.get_attribute("data-key"), thumb.get_attribute("data-ts")
            thumb.click()
            return str(key), str(ts)
        except StaleElementReferenceException:
            time.sleep(0.05)  # redrawn just then: the next refresh is a second away
    raise AssertionError("the strip kept changing under the click")


def test_dashboard_trend_grows_and_an_acknowledge_click_reaches_the_engine(
    daemon: Daemon, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert daemon.web is not None
    browser.get(daemon.web.url)
    wait = WebDriverWait(browser, 120, poll_frequency=0.2)
    probe = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'section[data-probe="R1"]'))
    trend = probe.find_element(By.CSS_SELECTOR, "svg.trend")

    def points() -> int:
        return int(trend.get_attribute("data-points") or 0)

    wait.until(lambda _: points() >= 2)
    first = points()
    wait.until(lambda _: points() > first)  # the trend grows as frames arrive
    assert trend.get_attribute("data-window") == "300"  # the first fraction alarm's window

    # The header names the model with its held-out-site figure, and says plainly that it
    # was trained on simulated images only.
    manifest = daemon.model.manifest
    header = browser.find_element(By.ID, "model").text
    assert f"model {manifest.name} {manifest.version} (held-out site macro-F1 0." in header
    warning = browser.find_element(By.ID, "model-warning")
    assert warning.is_displayed() and "trained on simulated images only" in warning.text

    # The latest frame with its particles boxed and coloured by class.
    boxes_css = ".frame-wrap svg.frame-boxes rect"
    wait.until(lambda _: probe.find_elements(By.CSS_SELECTOR, boxes_css))
    # Read in one go: the boxes are redrawn as frames arrive, so element handles go stale.
    labels = set(
        browser.execute_script(
            "return [...arguments[0].querySelectorAll(arguments[1])].map((r) => r.dataset.label);",
            probe,
            boxes_css,
        )
    )
    assert labels and labels <= {"CEX", "PG", "uncertain", "not a crystal"}
    image = probe.find_element(By.CSS_SELECTOR, ".frame-wrap img")
    assert browser.execute_script("return arguments[0].naturalWidth", image) == 800

    # The strip: the last RECENT_FRAMES frames as thumbnails, newest first, each with its
    # particles boxed as classified; live, the large view shows the newest.
    def shown() -> dict[str, Any]:
        return dict(browser.execute_script(_FRAMES_JS, probe))

    def strip_ready(page: dict[str, Any]) -> bool:
        thumbs = page["thumbs"]
        return (
            len(thumbs) == RECENT_FRAMES
            and all(thumb["width"] == THUMB_WIDTH and thumb["labels"] for thumb in thumbs)
            and page["large"]["loaded"] == "true"
            and page["large"]["key"] == thumbs[0]["key"]
        )

    def page_when(condition: Any) -> dict[str, Any]:
        """The page as `shown` says, once `condition` holds for it."""
        return dict(wait.until(lambda _: page if condition(page := shown()) else None))

    page = page_when(strip_ready)
    stored = _stored_labels(daemon)
    thumbs = page["thumbs"]
    assert [thumb["index"] for thumb in thumbs] == list(range(RECENT_FRAMES))
    # Frame times are ISO 8601 UTC strings with milliseconds: in time order as strings.
    assert all(ISO_MS.fullmatch(thumb["ts"]) for thumb in thumbs), thumbs
    assert [thumb["ts"] for thumb in thumbs] == sorted((t["ts"] for t in thumbs), reverse=True)
    for thumb in thumbs:
        assert Counter(thumb["labels"]) == stored[thumb["key"]], thumb
    assert page["live"]
    assert [thumb["selected"] for thumb in thumbs] == [True] + [False] * (RECENT_FRAMES - 1)
    assert Counter(page["large"]["labels"]) == stored[page["large"]["key"]]

    # A click on an older thumbnail holds it in the large view, with its boxes, and holds
    # the strip, while the daemon goes on.
    held_key, held_ts = _click_thumb(browser, probe, 4)
    page = page_when(
        lambda page: page["large"]["key"] == held_key and page["large"]["loaded"] == "true"
    )
    assert page["large"]["ts"] == held_ts and not page["live"]
    assert Counter(page["large"]["labels"]) == stored[held_key]
    assert page["large"]["width"] == 800  # the full-size frame, not the thumbnail
    assert [t["key"] for t in page["thumbs"] if t["selected"]] == [held_key]
    held_strip = [thumb["key"] for thumb in page["thumbs"]]
    caption = probe.find_element(By.CSS_SELECTOR, ".frame-caption").text
    assert caption.startswith("HELD") and "Live" in caption
    recorded = daemon.recorder.recorded
    refreshes = page["refreshes"]
    # Until the daemon has dropped every frame of the held strip, and the page refreshed.
    assert wait_for(lambda: daemon.recorder.recorded >= recorded + RECENT_FRAMES + 1, 60)
    wait.until(lambda _: shown()["refreshes"] >= refreshes + 2)
    held_frames = {frame.key for frame in daemon.probes["R1"].recent_frames}
    assert not held_frames & set(held_strip)
    page = shown()
    assert page["large"]["key"] == held_key and not page["live"]
    assert [thumb["key"] for thumb in page["thumbs"]] == held_strip
    # Another held frame the daemon no longer has: fetched when the strip was held.
    other_key, _ = _click_thumb(browser, probe, 2)
    page = page_when(
        lambda page: page["large"]["key"] == other_key and page["large"]["loaded"] == "true"
    )
    assert page["large"]["width"] == 800
    assert Counter(page["large"]["labels"]) == stored[other_key]

    # Live again: the large view and the strip follow the newest frame.
    probe.find_element(By.CSS_SELECTOR, ".live-toggle").click()
    page = page_when(
        lambda page: (
            page["live"] and strip_ready(page) and page["thumbs"][0]["key"] not in held_strip
        )
    )
    assert page["thumbs"][0]["selected"]
    stored = _stored_labels(daemon)
    assert Counter(page["large"]["labels"]) == stored[page["large"]["key"]]

    # The ramp crosses the limit; the alarm comes up on the page, unacknowledged.
    row_css = '.alarm[data-alarm-id="pg_high"]'
    row = wait.until(lambda _: probe.find_element(By.CSS_SELECTOR, row_css))
    wait.until(lambda _: row.get_attribute("data-state") == "active_unacknowledged")
    wait.until(lambda _: points() >= 40)  # a trend worth a screenshot
    limits = probe.find_elements(By.CSS_SELECTOR, "svg.trend line.limit")
    assert len(limits) == 2  # pg_high and pg_warning, both on PG
    label_text = " ".join(t.text for t in probe.find_elements(By.CSS_SELECTOR, "svg.trend text"))
    assert "pg_high > 15 %" in label_text and "pg_warning > 8 %" in label_text
    assert probe.find_elements(By.CSS_SELECTOR, "svg.trend polygon.band")
    assert _alarm_state(daemon, "pg_high") == "active_unacknowledged"
    # The raise is marked on the trend in the alarm's priority colour, its tooltip with
    # the time and the message rendered when it tripped.
    trip_message = _alarm_status(daemon, "pg_high")["trip_message"]
    raised = wait.until(lambda _: _markers(browser, probe, "pg_high", "active_unacknowledged"))
    assert len(raised) == 1, raised
    assert raised[0]["raised"] and raised[0]["stroke"] == HIGH_COLOUR
    assert re.fullmatch(r"pg_high raised \d\d:\d\d:\d\d — (.+)", raised[0]["title"]), raised
    assert raised[0]["title"].endswith(f" — {trip_message}")
    _save(browser, tmp_path, "dashboard.png")

    # Acknowledge without a name is refused on the page and never reaches the engine.
    row.find_element(By.CSS_SELECTOR, "button.ack").click()
    notice = browser.find_element(By.ID, "notice")
    wait.until(lambda _: "Enter your name" in notice.text)
    assert _alarm_state(daemon, "pg_high") == "active_unacknowledged"

    browser.find_element(By.ID, "operator").send_keys("op-anna")
    row.find_element(By.CSS_SELECTOR, "input.comment").send_keys("lab sample taken")
    row.find_element(By.CSS_SELECTOR, "button.ack").click()
    assert wait_for(lambda: _alarm_state(daemon, "pg_high") == "active_acknowledged", 30)

    def journalled() -> bool:
        # The engine's state changes a moment before its journal entry is committed.
        return any(
            entry["event"] == "acknowledge"
            and entry["alarm_id"] == "pg_high"
            and entry["who"] == "op-anna"
            and entry["comment"] == "lab sample taken"
            and entry["accepted"]
            for entry in daemon.store.recent_alarm_journal(100, "R1")
        )

    assert wait_for(journalled, 10), daemon.store.recent_alarm_journal(100, "R1")
    wait.until(lambda _: row.get_attribute("data-state") == "active_acknowledged")
    assert not row.find_element(By.CSS_SELECTOR, "button.ack").is_enabled()
    assert "acknowledged by op-anna" in notice.text
    # The acknowledge is marked too, muted, with who did it.
    acked = wait.until(lambda _: _markers(browser, probe, "pg_high", "active_acknowledged"))
    assert not acked[0]["raised"] and acked[0]["stroke"] is None
    assert re.fullmatch(r"pg_high acknowledged \d\d:\d\d:\d\d by op-anna", acked[0]["title"])
    assert len(_markers(browser, probe, "pg_high", "active_unacknowledged")) == 1
    _save(browser, tmp_path, "dashboard-acknowledged.png")
    # No script error, no blocked resource (the page's CSP allows only this server). A held
    # frame the daemon dropped before the page fetched it full-size is a 404 the page
    # expects (it shows the thumbnail instead).
    errors = [
        entry
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE"
        and not ("/frame.jpg?key=" in entry["message"] and "404" in entry["message"])
    ]
    assert errors == []


# The trend's time axis: [x, text] of its tick labels and of their dates, its zone, and
# the legend's words on the zone.
_AXIS_JS = """
const svg = arguments[0];
const texts = (css) => [...svg.querySelectorAll(css)].map(
  (text) => [text.getAttribute("x"), text.textContent]);
const legend = svg.parentElement.querySelector(".legend .zone");
return {
  ticks: texts("text.tick"), dates: texts("text.tick-date"), zone: svg.dataset.zone,
  legend: legend && legend.textContent,
};
"""
_CLOCK = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (\S+)")
NO_VALUE = "\u2013"  # what the page shows for a value it does not have


def _set_time_zone(browser: Any, zone: str) -> None:
    """The browser's time zone, as if the machine were in `zone` (reload to apply)."""
    browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": ""})
    browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": zone})


def _clock(browser: Any, wait: Any) -> tuple[datetime, str]:
    """The header clock once drawn: (its date and time, naive), its zone name."""
    from selenium.webdriver.common.by import By

    text = wait.until(lambda d: d.find_element(By.ID, "clock").text)
    match = _CLOCK.fullmatch(text)
    assert match, f"clock {text!r} is not 'YYYY-MM-DD HH:MM:SS ZONE'"
    return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S"), match[2]


def test_dashboard_clock_and_time_axis_say_the_date_and_time_zone(
    explained_daemon: Daemon, browser: Any
) -> None:
    """The header clock reads "2026-12-03 14:38:59 CET": the daemon's time in the
    browser's zone, named by its short name, or by its UTC offset where it has none; the
    trend's time axis dates its first tick and every tick where the day changes, and the
    legend names the zone."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    daemon = explained_daemon
    assert daemon.web is not None
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    berlin = ZoneInfo("Europe/Berlin")
    _set_time_zone(browser, "Europe/Berlin")
    browser.get(daemon.web.url)
    shown, zone = _clock(browser, wait)
    now = datetime.fromtimestamp(daemon.clock(), berlin)
    assert zone == now.strftime("%Z") and zone in {"CET", "CEST"}
    # The daemon's clock runs SPEED times fast, the page's ticks once a real second.
    assert abs(shown - now.replace(tzinfo=None)) < timedelta(seconds=4 * SPEED), (shown, now)
    assert "Europe/Berlin" in str(browser.find_element(By.ID, "clock").get_attribute("title"))

    probe = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'section[data-probe="R1"]'))
    trend = probe.find_element(By.CSS_SELECTOR, "svg.trend")
    wait.until(lambda _: int(trend.get_attribute("data-points") or 0) >= 2)
    axis = browser.execute_script(_AXIS_JS, trend)
    assert axis["ticks"], axis
    # Within the trend's span the day does not change (unless it runs over midnight).
    assert 1 <= len(axis["dates"]) <= 2, axis
    assert axis["dates"][0][0] == axis["ticks"][0][0]  # under the first tick
    assert axis["dates"][0][1] in {
        (now - timedelta(hours=2)).strftime("%Y-%m-%d"),
        now.strftime("%Y-%m-%d"),
    }
    assert axis["zone"] == zone
    assert axis["legend"] == f"times in {zone}"
    # Over midnight: the date at the first tick and at midnight's, not at the others.
    midnight = datetime(2026, 12, 4, tzinfo=berlin).timestamp()
    ticks = browser.execute_script(
        "return axisTicks(arguments[0], arguments[1], 600)", midnight - 1800, midnight + 1800
    )
    assert [(tick["time"], tick["date"]) for tick in ticks] == [
        ("23:30", "2026-12-03"),
        ("23:40", None),
        ("23:50", None),
        ("00:00", "2026-12-04"),
        ("00:10", None),
        ("00:20", None),
        ("00:30", None),
    ]

    # A zone with no English short name is named by its UTC offset.
    _set_time_zone(browser, "Asia/Kathmandu")
    browser.get(daemon.web.url)
    shown, zone = _clock(browser, wait)
    assert zone == "UTC+05:45"
    now = datetime.fromtimestamp(daemon.clock(), ZoneInfo("Asia/Kathmandu"))
    assert abs(shown - now.replace(tzinfo=None)) < timedelta(seconds=4 * SPEED), (shown, now)


# The page's explanations, read in one go (figures and alarm values are redrawn every
# refresh): each as {text, title} or null where the page does not show it.
_TOOLTIPS_JS = """
const section = arguments[0];
const read = (node) => node && {text: node.textContent, title: node.getAttribute("title")};
const value = (id, css) => read(section.querySelector(
  `.alarm-values .alarm-value[data-alarm-id="${id}"]${css ? ` ${css}` : ""}`));
return {
  adjusted: read(section.querySelector(".figure .ci .adjusted")),
  onset: value("pg_onset", ""), cusum: value("pg_onset", ".cusum"),
  rare: value("pg_rare", ".value"),
  stale: value("probe_stale", ""), stale_value: value("probe_stale", ".value"),
};
"""


def test_dashboard_explains_adjusted_cusum_and_missing_values_in_tooltips(
    explained_daemon: Daemon, browser: Any
) -> None:
    """Tooltips say what "adjusted" and "CUSUM" are; an alarm whose value cannot be
    computed shows "–" with the daemon's reason (value_reason) as its tooltip."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    daemon = explained_daemon
    assert daemon.web is not None
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    browser.get(daemon.web.url)
    probe = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'section[data-probe="R1"]'))

    def complete(page: dict[str, Any]) -> bool:
        stale = page["stale"]
        return all(page.values()) and bool(
            re.fullmatch(r"probe_stale \d+ s / 120 s", stale["text"])
        )

    page = dict(
        wait.until(
            lambda _: (
                page if complete(page := browser.execute_script(_TOOLTIPS_JS, probe)) else None
            )
        )
    )

    adjusted = page["adjusted"]
    assert re.fullmatch(r"adjusted \d+\.\d %", adjusted["text"]), adjusted
    assert "known confusions" in adjusted["title"]
    assert "validation confusion matrix" in adjusted["title"]

    assert page["cusum"]["text"] == "CUSUM"
    for words in ("cumulative sum", "baseline", "threshold"):
        assert words in page["cusum"]["title"], page["cusum"]
    # The sum against the threshold.
    assert re.fullmatch(r"pg_onset CUSUM \d+\.\d\d / 5\.00", page["onset"]["text"]), page

    # pg_rare never has enough particles: "–", and the daemon's reason as the tooltip.
    reason = _alarm_status(daemon, "pg_rare")["value_reason"]
    needed = r"\d+ particles in the 300 s window, 1000000 needed"
    assert re.fullmatch(needed, reason), reason
    assert page["rare"]["text"] == NO_VALUE
    assert re.fullmatch(f"no value: {needed}", page["rare"]["title"]), page["rare"]
    # An alarm with a value shows it, with no such tooltip.
    assert page["stale_value"]["title"] is None
