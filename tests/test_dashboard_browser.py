"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium against
the real server of a real daemon. The page loads, the trend grows as frames arrive, the
latest frame shows its particle boxes, and an Acknowledge click reaches the alarm engine.

Screenshots land in the test's folder; with CRYSTAL_MONITOR_SCREENSHOTS=docs they are
also written to docs/ (dashboard.png, dashboard-acknowledged.png), which is how the
committed ones are made.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.config import load_settings
from monitor.daemon import Daemon
from tests.daemon_process import wait_for
from tests.mosquitto import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SPEED = 20.0  # simulated seconds per real second: minutes of trend in a short test
SCREENSHOTS = os.environ.get("CRYSTAL_MONITOR_SCREENSHOTS")


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


def _settings(state: Path, port: int) -> Any:
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


def _alarm_state(daemon: Daemon, alarm_id: str) -> str:
    return str(next(a for a in daemon.alarm_states("R1") if a["alarm_id"] == alarm_id)["state"])


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

    # The latest frame with its particles boxed and coloured by class.
    wait.until(lambda _: probe.find_elements(By.CSS_SELECTOR, "svg.frame-boxes rect"))
    labels = {
        rect.get_attribute("data-label")
        for rect in probe.find_elements(By.CSS_SELECTOR, "svg.frame-boxes rect")
    }
    assert labels and labels <= {"CEX", "PG", "uncertain"}
    image = probe.find_element(By.CSS_SELECTOR, ".frame-wrap img")
    assert browser.execute_script("return arguments[0].naturalWidth", image) == 800

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
    journal = daemon.store.recent_alarm_journal(100, "R1")
    assert any(
        entry["event"] == "acknowledge"
        and entry["alarm_id"] == "pg_high"
        and entry["who"] == "op-anna"
        and entry["comment"] == "lab sample taken"
        and entry["accepted"]
        for entry in journal
    ), journal
    wait.until(lambda _: row.get_attribute("data-state") == "active_acknowledged")
    assert not row.find_element(By.CSS_SELECTOR, "button.ack").is_enabled()
    assert "acknowledged by op-anna" in notice.text
    _save(browser, tmp_path, "dashboard-acknowledged.png")
    # No script error, no blocked resource (the page's CSP allows only this server).
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
