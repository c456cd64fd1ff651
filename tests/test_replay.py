"""`crystal-monitor replay`: a recorded batch through the daemon's own pipeline and alarms.

The acceptance batch is what a probe records in 30 minutes at 1 frame/s: 1,800 full
frames of 1360 x 1024 px with about 30 particles each, PG stepping from 2 % to 30 % at
minute 10, which trips the default configuration's `pg_high` alarm (5-minute window
above 15 %, 30 s on-delay). The same files are played once to a live daemon, renamed
into its watched folder as their time comes on a clock running 12 times real time with
its own publish loop, and once through `crystal-monitor replay`.

The replay evaluates the alarms every publish interval P of recorded time from the
first frame, with every earlier frame recorded; the live daemon evaluates them every P
at moments of its own choosing and sees its frames `lag` late (the processing time,
about 80 ms, which the 12x clock stretches to about 1 s of recorded time). So the live
raise L and the replayed raise R obey R - P < L < R + P + lag: within one publish
interval, and on the late side also the live daemon's lag, measured during the run
(asserting |L - R| <= P alone would fail in about 2 % of runs, whenever the lag
straddles one of the live daemon's evaluations).

The replay's wall time is printed, not asserted (shared build machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from monitor.cli.subcommands import DEFAULT_CONFIG
from monitor.config.settings import load_settings
from monitor.daemon import Daemon
from monitor.replay.runner import (
    CollectingPublisher,
    find_recorded_frames,
    replay_frames,
    replay_settings,
)
from monitor.runtime.systemd_notify import SystemdNotifier
from monitor.sources.folder import frame_time_from_name

BATCH_S = 1800
FRAME_INTERVAL_S = 1.0
STEP_AT_S = 600
PUBLISH_S = 5.0  # the default configuration's publish interval, in recorded time
LIVE_SCALE = 12.0  # recorded seconds per real second for the live daemon
CATCH_UP_S = 180.0  # real seconds a live daemon behind its probe may take to catch up
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def _config_text(state_dir: Path, live_folder: Path) -> str:
    """The shipped example configuration, pointed at this test's folders."""
    text = DEFAULT_CONFIG.replace(
        'state_dir = "/var/lib/crystal-monitor"', f'state_dir = "{state_dir}"'
    ).replace('path = "/srv/probe/R1"', f'path = "{live_folder}"')
    assert str(state_dir) in text and str(live_folder) in text
    return text


def _cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
        timeout=timeout,
        check=False,
    )


class FastClock:
    """Recorded time for the live daemon: stands at `origin` until `go`, then runs
    `scale` times faster than real time."""

    def __init__(self, origin: float, scale: float) -> None:
        self.origin = origin
        self.scale = scale
        self.started: float | None = None

    def go(self) -> None:
        self.started = time.monotonic()

    def __call__(self) -> float:
        if self.started is None:
            return self.origin
        return self.origin + (time.monotonic() - self.started) * self.scale


def _drop_in_as_due(frames: list[Path], folder: Path, clock: FastClock) -> None:
    """The probe: each frame appears in the watched folder when the clock reaches its
    time, written under a hidden name and renamed into place as vendor software does."""
    for path in frames:
        due = frame_time_from_name(path.name)
        assert due is not None
        while clock() < due:
            time.sleep(0.002)
        hidden = folder / f".{path.name}.part"
        os.link(path, hidden)
        os.rename(hidden, folder / path.name)


class LivePublisher(CollectingPublisher):
    """Also notes how far behind its input the live daemon records (recorded seconds)."""

    def __init__(self, clock: FastClock) -> None:
        super().__init__()
        self.clock = clock
        self.lags: list[tuple[float, float]] = []  # (frame time, clock at record - frame time)

    def publish_result(self, probe: str, result: dict[str, Any]) -> None:
        self.lags.append((result["ts"], self.clock() - result["ts"]))
        super().publish_result(probe, result)


@dataclass(frozen=True)
class Acceptance:
    batch: Path
    origin: float
    live_events: list[dict[str, Any]]
    live_lag_s: float  # longest frame-time-to-recorded by the end of the batch, recorded s
    report: Path
    report_html: str
    replay_stdout: str
    replay_wall_s: float


@pytest.fixture(scope="module")
def acceptance(tmp_path_factory: pytest.TempPathFactory) -> Acceptance:
    root = tmp_path_factory.mktemp("replay")
    batch = root / "batch"
    made = _cli(
        "simulate", batch, "--mode", "frame", "--count", BATCH_S, "--interval",
        FRAME_INTERVAL_S, "--profile", f"step:0.02:0.3@{STEP_AT_S}", "--seed", 7,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    frames = sorted(batch.glob("*.png"))
    assert len(frames) == BATCH_S
    origin = frame_time_from_name(frames[0].name)
    assert origin is not None

    config = root / "crystal-monitor.toml"
    live_folder = root / "live-probe"
    live_folder.mkdir()
    config.write_text(_config_text(root / "live-state", live_folder))

    report = root / "report.html"
    started = time.monotonic()
    replayed = _cli("replay", batch, "--config", config, "--report", report)
    wall_s = time.monotonic() - started
    assert replayed.returncode == 0, replayed.stderr
    print(
        f"\nreplay of a {BATCH_S // 60}-minute batch ({BATCH_S} frames of 1360 x 1024 px): "
        f"{wall_s:.1f} s wall for `crystal-monitor replay` (model load included)\n"
        + replayed.stdout
    )
    # The live daemon: the same configuration, its publish interval compressed with time.
    data = tomllib.loads(config.read_text())
    # As fast as this host keeps up with, at most LIVE_SCALE: a live daemon that falls
    # behind its probe sees late frames, and its windows are not the replay's (measured
    # from the replay, which runs as fast as the host allows, with a margin).
    host_frames_per_s = BATCH_S / wall_s
    scale = max(1.0, min(LIVE_SCALE, 0.6 * host_frames_per_s * FRAME_INTERVAL_S))
    data["aggregation"]["publish_interval"] = PUBLISH_S / scale
    settings = load_settings(data=data)
    clock = FastClock(origin, scale)
    live = LivePublisher(clock)
    daemon = Daemon(settings, clock=clock, publishers=[live], notifier=SystemdNotifier(None))
    daemon.start()
    probe = threading.Thread(target=_drop_in_as_due, args=(frames, live_folder, clock))
    try:
        clock.go()
        probe.start()
        probe.join()
        run_end = origin + BATCH_S + 2 * PUBLISH_S
        while clock() < run_end:
            time.sleep(0.05)
        # On a busy host the live daemon can still be behind its probe here; a stop now
        # would leave those frames on disk for the next start (not lost, but not in this
        # run's results). Wait for them, within reason, so that every frame is compared.
        behind = BATCH_S - len(live.results)
        waited = time.monotonic()
        while len(live.results) < BATCH_S and time.monotonic() < waited + CATCH_UP_S:
            time.sleep(0.1)
        waited = time.monotonic() - waited
    finally:
        daemon.stop()
    # Every frame recorded, each once: nothing lost, nothing counted twice.
    assert sorted(r["key"] for r in live.results) == [path.name for path in frames], (
        f"{len(live.results)} of {BATCH_S} frames recorded, {behind} of them still "
        f"missing at the end of the batch, {waited:.0f} s waited"
    )
    # What is compared is what the live daemon published up to the end of the batch
    # (+2 intervals), and the lag of the frames it had recorded by then: frames that
    # arrived while it caught up cannot have moved those events, and events after it
    # (the clock runs on with no new frames) are no part of the batch.
    live_events = [e for e in live.events if float(e["ts"]) <= run_end]
    lags = sorted(lag for ts, lag in live.lags if ts + lag <= run_end)
    assert lags, "the live daemon recorded no frame before the end of the batch"
    assert lags[0] >= 0.0
    print(
        f"\nlive daemon at {scale:.2g}x: frame time to recorded, in recorded seconds: "
        f"median {lags[len(lags) // 2]:.2f}, p95 {lags[int(len(lags) * 0.95)]:.2f}, "
        f"max {lags[-1]:.2f}; {behind} frames still to record at the end of the batch "
        f"({waited:.1f} s waited for them)"
    )

    return Acceptance(
        batch=batch,
        origin=origin,
        live_events=live_events,
        live_lag_s=lags[-1],
        report=report,
        report_html=report.read_text(encoding="utf-8"),
        replay_stdout=replayed.stdout,
        replay_wall_s=wall_s,
    )


def _raised(events: list[dict[str, Any]], alarm_id: str) -> list[float]:
    return [
        float(e["ts"])
        for e in events
        if e.get("type") == "alarm"
        and e["alarm_id"] == alarm_id
        and e["to_state"] == "active_unacknowledged"
    ]


class _ReportParser(HTMLParser):
    """Collects the elements the checks look at, with their attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], tuple[str, ...]]] = []
        self._open: list[tuple[str, dict[str, str]]] = []
        self.data_json = ""
        self._in_data = False
        self.table_cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        parents = tuple(c for _, a in self._open for c in a.get("class", "").split())
        self.elements.append((tag, values, parents))
        if tag not in {"line", "rect", "polyline", "polygon", "meta", "br"}:
            self._open.append((tag, values))
        self._in_data = tag == "script" and values.get("id") == "replay-data"
        self._in_cell = self._in_cell or tag == "td"

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self._open) - 1, -1, -1):
            if self._open[index][0] == tag:
                del self._open[index:]
                break
        if tag == "script":
            self._in_data = False
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_data:
            self.data_json += data
        elif self._in_cell:
            self.table_cells.append(data)

    def find(self, tag: str, css: str, inside: str | None = None) -> list[dict[str, str]]:
        return [
            attrs
            for name, attrs, parents in self.elements
            if name == tag
            and css in attrs.get("class", "").split()
            and (inside is None or inside in parents)
        ]


def _parse(html_text: str) -> _ReportParser:
    parser = _ReportParser()
    parser.feed(html_text)
    parser.close()
    return parser


def _assert_agrees(replayed: float, live: float, live_lag_s: float) -> None:
    """Within one publish interval; later live by at most that plus the live lag."""
    assert -PUBLISH_S < live - replayed <= PUBLISH_S + live_lag_s, (replayed, live, live_lag_s)


@pytest.mark.slow
def test_replay_raises_pg_high_when_the_live_daemon_did(acceptance: Acceptance) -> None:
    """The acceptance: same files, same configuration, same alarm code; the replay's
    pg_high stands within one publish interval of the live daemon's."""
    live = _raised(acceptance.live_events, "pg_high")
    data = json.loads(_parse(acceptance.report_html).data_json)
    replayed = [
        m["ts"]
        for m in data["markers"]
        if m["alarm_id"] == "pg_high" and m["transition"] == "raise"
    ]
    assert len(live) == 1, acceptance.live_events
    assert len(replayed) == 1, data["markers"]
    # The step is at minute 10; the 5-minute share needs a few minutes to pass 15 %.
    assert acceptance.origin + STEP_AT_S < live[0] < acceptance.origin + STEP_AT_S + 300
    print(
        f"pg_high raised at +{live[0] - acceptance.origin:.1f} s live, "
        f"+{replayed[0] - acceptance.origin:.1f} s in the replay"
    )
    _assert_agrees(replayed[0], live[0], acceptance.live_lag_s)
    assert data["publish_interval_s"] == PUBLISH_S
    assert data["frames"] == BATCH_S


@pytest.mark.slow
def test_report_shows_trend_band_limit_and_the_alarm_marker(acceptance: Acceptance) -> None:
    """One self-contained file: the PG trend with its band and the 15 % limit, the frame
    quality charts, and a pg_high raise marker at the time the live daemon raised it."""
    html_text = acceptance.report_html
    report = _parse(html_text)
    live = _raised(acceptance.live_events, "pg_high")[0]

    charts = report.find("svg", "trend-chart")
    assert [c["data-class"] for c in charts] == ["PG"]
    assert charts[0]["data-window"] == "300"
    trend = report.find("polyline", "trend", inside="trend-chart")
    points = [tuple(map(float, p.split(","))) for t in trend for p in t["points"].split()]
    assert len(points) > BATCH_S / PUBLISH_S * 0.9  # one point per publish interval
    assert report.find("polygon", "band", inside="trend-chart")
    limits = report.find("line", "limit", inside="trend-chart")
    assert limits and all(line["y1"] == line["y2"] for line in limits)

    markers = [
        m
        for m in report.find("g", "alarm-marker", inside="trend-chart")
        if m["data-alarm"] == "pg_high" and m["data-transition"] == "raise"
    ]
    assert len(markers) == 1
    _assert_agrees(float(markers[0]["data-ts"]), live, acceptance.live_lag_s)
    assert markers[0]["data-time"].startswith("2026-01-01T00:1")

    assert report.find("svg", "quality-chart") and report.find("svg", "rate-chart")
    assert "pg_high" in report.table_cells
    # Self-contained: nothing is fetched from anywhere.
    assert "http://" not in html_text and "https://" not in html_text
    assert not [a for _, a, _ in report.elements if "src" in a or "href" in a]
    # The stdout summary names the alarm and its batch time.
    line = next(x for x in acceptance.replay_stdout.splitlines() if "pg_high" in x)
    assert f"+{int((float(markers[0]['data-ts']) - acceptance.origin) // 60)}:" in line


def _small_batch(tmp_path: Path) -> tuple[Path, Path]:
    batch = tmp_path / "batch"
    made = _cli(
        "simulate", batch, "--mode", "frame", "--count", 90, "--interval", 1,
        "--width", 640, "--height", 480, "--particles", 12,
        "--profile", "step:0.02:0.6@30", "--seed", 3,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    config = tmp_path / "config.toml"
    config.write_text(_config_text(tmp_path / "live-state", tmp_path / "live"))
    return batch, config


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            flat.update({f"{prefix}{key}[{i}]": v for i, v in enumerate(value)})
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_pacing_changes_nothing_the_replay_reports(tmp_path: Path) -> None:
    """Replay waits for every frame at every tick, so `--speed` only changes how long it
    takes: paced and unpaced runs publish identical windows and alarm events."""
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
            "on_delay": "4s",
            "min_count": 30,
        }
    ]
    settings = load_settings(data=data)
    frames = find_recorded_frames(batch, ("*.png",), recursive=False)
    runs = []
    for speed in (None, 60.0):
        narrowed = replay_settings(settings, "R1", tmp_path / f"state-{speed}")
        runs.append(replay_frames(narrowed, "R1", frames, folder=batch, speed=speed))
    fast, paced = runs
    assert [u.ts for u in fast.updates] == [u.ts for u in paced.updates]
    for one, other in zip(fast.updates, paced.updates, strict=True):
        # Frames finishing inside one interval are recorded in the order the workers
        # finish them (as live); the EWMA may then differ in the last digit.
        mine, theirs = _flat(one.snapshot), _flat(other.snapshot)
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            if isinstance(value, float):
                assert value == pytest.approx(theirs[key], rel=1e-12), key
            else:
                assert value == theirs[key], key
        assert one.quality == other.quality and one.alarms == other.alarms
    assert fast.events == paced.events
    assert _raised(fast.events, "pg_high")  # the step did trip the alarm
    # Ticks every publish interval from the first frame, the last at or after the last frame.
    assert fast.updates[0].ts == frames[0].ts + 2.0
    assert fast.updates[-1].ts >= frames[-1].ts > fast.updates[-2].ts


def test_frames_without_a_time_in_the_name_are_ordered_by_file_time(tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    (folder / "sub").mkdir(parents=True)
    for name, mtime in (("b.png", 300.0), ("a.png", 200.0), ("c.bmp", 100.0)):
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, (mtime, mtime))
    (folder / "frame_19700101T000230.000Z_000001.png").write_bytes(b"x")  # 150 s
    (folder / ".half-written.png.part").write_bytes(b"x")
    (folder / "notes.txt").write_bytes(b"x")
    (folder / "sub" / "d.png").write_bytes(b"x")
    os.utime(folder / "sub" / "d.png", (50.0, 50.0))

    frames = find_recorded_frames(folder, ("*.png", "*.bmp"), recursive=False)
    assert [(f.key, f.ts, f.ts_from_name) for f in frames] == [
        ("c.bmp", 100.0, False),
        ("frame_19700101T000230.000Z_000001.png", 150.0, True),
        ("a.png", 200.0, False),
        ("b.png", 300.0, False),
    ]
    nested = find_recorded_frames(folder, ("*.png",), recursive=True)
    assert nested[0].key == "sub/d.png"


def test_bad_inputs_exit_with_a_message_that_names_the_fix(tmp_path: Path) -> None:
    """Through the real command line; none of these loads the model."""
    config = tmp_path / "config.toml"
    config.write_text(_config_text(tmp_path / "state", tmp_path / "live"))
    report = tmp_path / "report.html"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no frames here")

    missing = _cli("replay", tmp_path / "nope", "--config", config, "--report", report)
    assert missing.returncode == 66
    assert f"recorded batch folder not found: {tmp_path / 'nope'}" in missing.stderr

    nothing = _cli("replay", empty, "--config", config, "--report", report)
    assert nothing.returncode == 66
    assert f"no frame files in {empty}" in nothing.stderr and "*.png" in nothing.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace("publish_interval", "publish_intervall"))
    refused = _cli("replay", empty, "--config", bad, "--report", report)
    assert refused.returncode == 78
    assert "config error: aggregation.publish_intervall: unknown key" in refused.stderr

    absent = _cli("replay", empty, "--config", tmp_path / "none.toml", "--report", report)
    assert absent.returncode == 78
    assert f"config error: config file not found: {tmp_path / 'none.toml'}" in absent.stderr

    unknown = _cli("replay", empty, "--config", config, "--report", report, "--probe", "R9")
    assert unknown.returncode == 64 and "--probe 'R9' is not in" in unknown.stderr

    speed = _cli("replay", empty, "--config", config, "--report", report, "--speed", "-3")
    assert speed.returncode == 2 and "must be > 0 or 'max'" in speed.stderr
    assert not report.exists()


@pytest.mark.parametrize("recursive", [False, True])
def test_replay_takes_exactly_the_files_the_folder_source_would(
    tmp_path: Path, recursive: bool
) -> None:
    """One scan for both, checked against a running FolderSource's backlog: hidden
    part-files, other extensions (a `.png.part` too) and, unless recursive, sub-folders
    are left out the same way; upper-case extensions match; a linked sub-folder is never
    entered. A hidden sub-folder is entered when recursive, as the source always did (the
    replay's own scan before issue 12 skipped it)."""
    from monitor.config.settings import FolderSourceConfig
    from monitor.sources.base import FrameItem
    from monitor.sources.folder import FolderSource

    names = [
        "frame_a.png", "B.PNG", "c.Tiff", ".frame_c.png.part", "frame_e.png.part",
        "notes.txt", "sub/frame_d.tif", "sub/.frame_g.png.part", ".hidden/frame_h.png",
    ]  # fmt: skip
    for index, name in enumerate(names):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 + index, 1_000_000 + index))
    (tmp_path / "linked").symlink_to(tmp_path / "sub", target_is_directory=True)
    expected = ["frame_a.png", "B.PNG", "c.Tiff"]
    if recursive:
        expected += ["sub/frame_d.tif", ".hidden/frame_h.png"]

    config = FolderSourceConfig(type="folder", path=tmp_path, recursive=recursive)
    frames = find_recorded_frames(tmp_path, config.patterns, recursive=recursive)
    assert [frame.key for frame in frames] == expected  # in mtime order, keyed as the source
    assert not any(frame.ts_from_name for frame in frames)

    handed_on: list[str] = []

    class KeySink:
        def put(self, item: FrameItem, *, block: bool) -> bool:
            handed_on.append(item.key)
            return True

    source = FolderSource(
        "R1", config, journaled=lambda keys: set(), record_skipped=lambda keys, why: None
    )
    source.start(KeySink())
    try:
        deadline = time.monotonic() + 10
        while len(handed_on) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # room for a file it should not have taken
    finally:
        source.stop()
    assert sorted(handed_on) == sorted(expected)
