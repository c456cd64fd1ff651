"""The labelling page in a real browser: Debian's headless Chromium driven by Selenium
against the real HTTP server, behind its token, over a review queue holding simulator
crops. Labels made by key presses (a number key per class, 0 / x for "not a particle",
space for skip, u / Backspace for undo, arrows to move) arrive in the store with the
operator's name; the page refuses to label without a name and says where to enter it;
the counts per class and the queue per reason follow; the filters narrow the grid; the
dashboard and the page link to each other and share the operator's name.

Screenshots land in the test's folder; with CRYSTAL_MONITOR_SCREENSHOTS=docs the page's
is also written to docs/label-page.png, which is how the committed one is made.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from monitor.config.http import HttpConfig
from monitor.review.sample_store import NewSample, Sample, SampleStore
from monitor.simulator import CropSimulator
from monitor.web.server import WebServer
from tests.daemon_process import wait_for
from tests.fake_view import RefusingCommands
from tests.mosquitto import free_port
from tests.test_label_api import (
    NOT_A_PARTICLE,
    T0,
    ReviewView,
    _settings_two_probes,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = os.environ.get("CRYSTAL_MONITOR_SCREENSHOTS")
TOKEN = "label-page-token-for-the-test-0123456789"
REASONS = ("uncertain", "out_of_distribution", "boundary", "random")
N_SAMPLES = 36
OPERATOR = "op-anna"


def _require_browser() -> None:
    """A missing browser fails the test: a skipped browser test must never count as passed."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    pytest.fail(
        f"needs {CHROMIUM} and {CHROMEDRIVER}: run 'sudo apt-get install chromium "
        "chromium-driver' (make test does it when run as root)"
    )


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
        "--window-size=1600,1000",
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


class LabelStore(SampleStore):
    """The daemon's sample store (a real SQLite file and PNGs), read whole by the test."""

    @property
    def samples(self) -> dict[int, Sample]:
        return {sample.id: sample for sample in self.list_samples(limit=10_000)}


def _fill(store: LabelStore) -> None:
    """N_SAMPLES simulator crops, one every 30 s, the reasons in turn."""
    simulator = CropSimulator(11)
    rng = np.random.default_rng(5)
    for i in range(1, N_SAMPLES + 1):
        truth = "PG" if i % 3 == 0 else "CEX"
        guess = truth if rng.random() < 0.8 else ("CEX" if truth == "PG" else "PG")
        confidence = float(rng.uniform(0.5, 0.98))
        other = "PG" if guess == "CEX" else "CEX"
        store.add(
            NewSample(
                probe="R1" if i % 4 else "R2",
                frame_key=f"R1_{i:06d}.tif",
                ts=T0 - 3600 + 30 * i,
                bbox=(10 * i, 20, 64, 64),
                batch="B-0412",
                model="default:1.0:0123456789ab",
                guess=guess,
                confidence=confidence,
                probabilities={guess: confidence, other: 1 - confidence},
                status="uncertain" if i % 4 == 1 else "ok",
                decision_reason="low_confidence" if i % 4 == 1 else None,
                ood_score=None,
                kept_because=REASONS[(i - 1) % 4],
                kept_at=T0 - 3600 + 30 * i + 0.5,
            ),
            simulator.render(truth),
        )


@dataclass
class LabelPage:
    base: str
    store: LabelStore
    view: ReviewView


@pytest.fixture
def label_page(tmp_path: Path) -> Iterator[LabelPage]:
    store = LabelStore(tmp_path / "samples", ("CEX", "PG"))
    _fill(store)
    view = ReviewView(settings=_settings_two_probes(), samples=store)
    server = WebServer(
        HttpConfig(enabled=True, port=free_port()), view, RefusingCommands(), token=TOKEN
    )
    server.start()
    try:
        yield LabelPage(server.url.rstrip("/"), store, view)
    finally:
        server.stop()
        store.close()


# What the page shows, read in one go (tiles are redrawn as labels come back).
_PAGE_JS = """
const data = (node) => ({...node.dataset});
return {
  selected: document.body.dataset.selected || null,
  pending: Number(document.body.dataset.pending || 0),
  loads: Number(document.body.dataset.loads || 0),
  tiles: [...document.querySelectorAll("#crops .crop")].map((tile) => ({
    id: Number(tile.dataset.id), label: tile.dataset.label || null,
    kept_because: tile.dataset.keptBecause, selected: tile.classList.contains("selected"),
    width: tile.querySelector("img").naturalWidth,
    text: tile.innerText,
  })),
  keys: [...document.querySelectorAll("#keys .label-key")].map(data),
  keyText: [...document.querySelectorAll("#keys .label-key")].map((k) => k.innerText),
  queue: Object.fromEntries([...document.querySelectorAll("#queue .reason-count")].map(
    (item) => [item.dataset.reason, Number(item.dataset.count)])),
  notice: document.getElementById("notice").textContent,
  detail: document.getElementById("detail").innerText,
  operator: document.getElementById("operator").value,
  missing: document.getElementById("operator").classList.contains("missing"),
};
"""


def _shown(browser: Any) -> dict[str, Any]:
    return dict(browser.execute_script(_PAGE_JS))


def _when(wait: Any, browser: Any, condition: Any) -> dict[str, Any]:
    """The page as `_shown` reads it, once `condition` holds for it."""
    return dict(wait.until(lambda _: page if condition(page := _shown(browser)) else None))


def _press(browser: Any, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    for key in keys:
        ActionChains(browser).send_keys(key).perform()


def _stored(store: LabelStore) -> dict[int, tuple[str | None, str | None]]:
    return {i: (s.label, s.labelled_by) for i, s in sorted(store.samples.items())}


def _settled(page: dict[str, Any]) -> bool:
    return page["pending"] == 0


def test_key_presses_label_crops_in_the_store_with_the_operator_name(
    label_page: LabelPage,
    browser: Any,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    store = label_page.store
    wait = WebDriverWait(browser, 60, poll_frequency=0.1)
    # Behind the token: the login link sets the cookie, then the page loads.
    browser.get(f"{label_page.base}/label")
    assert browser.current_url.endswith("/login")
    browser.get(f"{label_page.base}/login?token={TOKEN}")
    browser.get(f"{label_page.base}/label")
    page = _when(
        wait,
        browser,
        lambda page: len(page["tiles"]) == N_SAMPLES and all(t["width"] for t in page["tiles"]),
    )
    # Each crop with the model's guess and confidence and why it was kept.
    first = store.samples[1]
    assert page["tiles"][0]["id"] == 1 and page["tiles"][0]["selected"]
    assert f"{first.guess} {first.confidence * 100:.0f} %" in page["tiles"][0]["text"]
    assert "uncertain" in page["tiles"][0]["text"]
    assert "out of distribution" in page["tiles"][1]["text"]
    assert [t["kept_because"] for t in page["tiles"][:4]] == list(REASONS)
    # The legend says which key is which class, with the labels so far.
    assert [(k["label"], k["count"]) for k in page["keys"]] == [
        ("CEX", "0"),
        ("PG", "0"),
        (NOT_A_PARTICLE, "0"),
    ]
    assert [text.split()[:2] for text in page["keyText"]] == [["1", "CEX"], ["2", "PG"], ["0", "/"]]
    assert page["queue"] == dict.fromkeys(REASONS, N_SAMPLES // 4)
    assert "Frame R1_000001.tif" in page["detail"].replace("\n", " ")

    # Without a name nothing is labelled, and the page says where to enter it.
    _press(browser, "1")
    page = _when(wait, browser, lambda page: "Enter your name under Operator" in page["notice"])
    assert page["missing"] and "(top right)" in page["notice"]
    assert all(label is None for label, _ in _stored(store).values())

    operator = browser.find_element(By.ID, "operator")
    assert browser.switch_to.active_element == operator
    operator.send_keys(OPERATOR, Keys.ENTER)  # Enter goes back to the crops
    assert browser.execute_script("return localStorage.getItem('crystal-monitor.operator')") == (
        OPERATOR
    )

    # 1 and 2: the class of each key; space skips; x and 0: not a particle.
    _press(browser, "1", "2", " ", "x", "0")
    assert wait_for(lambda: store.samples[5].label is not None, 30)
    page = _when(wait, browser, _settled)
    stored = _stored(store)
    assert {i: v for i, v in stored.items() if v[0]} == {
        1: ("CEX", OPERATOR),
        2: ("PG", OPERATOR),
        4: (NOT_A_PARTICLE, OPERATOR),
        5: (NOT_A_PARTICLE, OPERATOR),
    }
    assert store.samples[1].labelled_at == label_page.view.clock  # the daemon's time
    assert page["selected"] == "6"  # after each label (and the skip) the next crop
    assert [t["label"] for t in page["tiles"][:6]] == [
        "CEX",
        "PG",
        None,
        NOT_A_PARTICLE,
        NOT_A_PARTICLE,
        None,
    ]
    assert "→ PG" in page["tiles"][1]["text"] and OPERATOR in page["tiles"][1]["text"]
    assert {k["label"]: int(k["count"]) for k in page["keys"]} == store.label_counts()
    assert page["queue"] == {**dict.fromkeys(REASONS, N_SAMPLES // 4), **store.queue_counts()}
    assert page["queue"]["uncertain"] == N_SAMPLES // 4 - 2  # crops 1 and 5

    # u undoes the newest label, Backspace the one before; the selection goes back.
    _press(browser, "u")
    assert wait_for(lambda: store.samples[5].label is None, 30)
    _press(browser, Keys.BACKSPACE)
    assert wait_for(lambda: store.samples[4].label is None, 30)
    page = _when(wait, browser, _settled)
    assert page["selected"] == "4"
    assert {i: v for i, v in _stored(store).items() if v[0]} == {
        1: ("CEX", OPERATOR),
        2: ("PG", OPERATOR),
    }
    assert store.samples[4].labelled_at is None
    assert "undone, unlabelled again" in page["notice"]

    # A label changed, then undone: the crop gets back its earlier label and labeller.
    _press(browser, Keys.HOME, "2")
    assert wait_for(lambda: store.samples[1].label == "PG", 30)
    _press(browser, "u")
    assert wait_for(lambda: store.samples[1].label == "CEX", 30)
    assert store.samples[1].labelled_by == OPERATOR
    page = _when(wait, browser, _settled)
    assert page["selected"] == "1" and "back to CEX" in page["notice"]
    assert {k["label"]: int(k["count"]) for k in page["keys"]} == {
        "CEX": 1,
        "PG": 1,
        NOT_A_PARTICLE: 0,
    }

    # The arrows move the selection: right by one, down by a row of the grid.
    columns = browser.execute_script("return columns()")
    assert columns > 1
    _press(browser, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_DOWN)
    page = _when(wait, browser, lambda page: page["selected"] == str(3 + columns))
    _press(browser, Keys.ARROW_LEFT, Keys.ARROW_UP)
    page = _when(wait, browser, lambda page: page["selected"] == "2")
    _press(browser, "1")  # crop 2, labelled PG before, now CEX
    assert wait_for(lambda: store.samples[2].label == "CEX", 30)
    _when(wait, browser, _settled)
    _save(browser, tmp_path, "label-page.png")

    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    # The refusal before the login is the one error the page expects.
    assert all("/label" in entry["message"] and "401" in entry["message"] for entry in errors) or (
        errors == []
    ), errors


def test_the_filters_narrow_the_grid(
    label_page: LabelPage,
    browser: Any,
) -> None:
    """Probe, reason, labelled or not, and a time range (in the browser's zone) reach the
    API as filters; after a choice the keys label again at once."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    store = label_page.store
    store.set_label(7, "PG", operator="op-ben", at=T0 - 5)
    wait = WebDriverWait(browser, 60, poll_frequency=0.1)
    browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "Asia/Kathmandu"})
    browser.get(f"{label_page.base}/login?token={TOKEN}")
    browser.get(f"{label_page.base}/label")
    page = _when(wait, browser, lambda page: len(page["tiles"]) == N_SAMPLES - 1)
    assert 7 not in [t["id"] for t in page["tiles"]]  # unlabelled only, at first

    def reload_with(change: Any) -> dict[str, Any]:
        loads = _shown(browser)["loads"]
        change()
        return _when(wait, browser, lambda page: page["loads"] > loads and _settled(page))

    reason = Select(browser.find_element(By.ID, "filter-reason"))
    page = reload_with(lambda: reason.select_by_value("boundary"))
    assert [t["id"] for t in page["tiles"]] == [i for i in range(3, N_SAMPLES + 1, 4) if i != 7]
    assert browser.switch_to.active_element.tag_name == "body"  # the keys work again
    probe = Select(browser.find_element(By.ID, "filter-probe"))
    page = reload_with(lambda: probe.select_by_value("R2"))
    assert page["tiles"] == []
    page = reload_with(lambda: reason.select_by_value(""))
    assert [t["id"] for t in page["tiles"]] == list(range(4, N_SAMPLES + 1, 4))
    shown = Select(browser.find_element(By.ID, "filter-labelled"))
    page = reload_with(lambda: (probe.select_by_value(""), shown.select_by_value("true")))
    assert [(t["id"], t["label"]) for t in page["tiles"]] == [(7, "PG")]
    page = reload_with(lambda: shown.select_by_value(""))
    assert len(page["tiles"]) == N_SAMPLES

    # From crop 10's frame time to crop 12's, as the browser's clock shows them.
    def local(sample_id: int) -> str:
        moment = datetime.fromtimestamp(store.samples[sample_id].ts, ZoneInfo("Asia/Kathmandu"))
        return moment.strftime("%Y-%m-%dT%H:%M:%S")

    set_value = (
        "arguments[0].value = arguments[1];"
        "arguments[0].dispatchEvent(new Event('change', {bubbles: true}));"
    )
    since = browser.find_element(By.ID, "filter-since")
    until = browser.find_element(By.ID, "filter-until")
    reload_with(lambda: browser.execute_script(set_value, since, local(10)))
    page = reload_with(lambda: browser.execute_script(set_value, until, local(12)))
    assert [t["id"] for t in page["tiles"]] == [10, 11, 12]


def test_the_dashboard_and_the_page_link_to_each_other_and_share_the_name(
    label_page: LabelPage,
    browser: Any,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60, poll_frequency=0.1)
    browser.get(f"{label_page.base}/login?token={TOKEN}")
    browser.get(f"{label_page.base}/")
    browser.find_element(By.ID, "operator").send_keys("op-carl")
    browser.find_element(By.LINK_TEXT, "Label crops").click()
    wait.until(lambda d: d.current_url.endswith("/label"))
    page = _when(wait, browser, lambda page: len(page["tiles"]) == N_SAMPLES)
    assert page["operator"] == "op-carl"
    _press(browser, "2")
    assert wait_for(lambda: label_page.store.samples[1].labelled_by == "op-carl", 30)
    assert label_page.store.samples[1].label == "PG"
    browser.find_element(By.LINK_TEXT, "Dashboard").click()
    wait.until(lambda d: d.current_url.rstrip("/") == label_page.base)
