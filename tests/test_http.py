"""The HTTP server against a real daemon: health, readiness reasons, Prometheus metrics
that add up to what was processed, the JSON API, operator actions reaching the alarm
engine, the token, and the refusal to serve beyond loopback without one.

A real Daemon reads a folder of probe files written the way vendor software writes them,
its real aiohttp server listens on a free port, and the tests talk HTTP to it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.config.http import HttpConfig
from monitor.config.settings import EX_CONFIG, load_settings
from monitor.daemon import Daemon
from monitor.publishers.base import CommandHandler, ProbeUpdate
from monitor.runtime.probe_state import RECENT_FRAMES
from monitor.simulator import CropSimulator
from monitor.timestamps import iso_utc
from monitor.web import views
from monitor.web.server import SESSION_COOKIE, WebServer, WebStartError
from monitor.wire import to_wire
from tests.daemon_process import wait_for, write_like_probe
from tests.fake_view import FakeView, RefusingCommands
from tests.mosquitto import free_port

CSRF = {"X-Requested-By": "test"}


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


TOKEN = "s3cret-token-for-the-test-0123456789"
N_CEX, N_PG = 24, 8


class SwitchPublisher:
    """A publisher whose connection the test switches, with outbox numbers to export."""

    name = "switch"

    def __init__(self) -> None:
        self.connected = True

    def start(self, commands: CommandHandler) -> None:
        pass

    def publish_update(self, update: ProbeUpdate) -> None:
        pass

    def publish_alarms(self, probe: str, alarms: list[dict[str, Any]]) -> None:
        pass

    def publish_event(self, probe: str, event: dict[str, Any]) -> None:
        pass

    def publish_result(self, probe: str, result: dict[str, Any]) -> None:
        pass

    def health(self) -> tuple[bool, str]:
        return (True, "connected") if self.connected else (False, "broker unreachable")

    def diagnostics(self) -> dict[str, Any]:
        return {"backlog": 7, "dropped_total": 0}

    def stop(self) -> None:
        pass


class ResultsPublisher(SwitchPublisher):
    """Remembers (key, status) of every per-frame result, in the order the daemon sent them."""

    name = "results"

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[tuple[str, str]] = []

    def publish_result(self, probe: str, result: dict[str, Any]) -> None:
        self.statuses.append((result["key"], result["status"]))


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(NoRedirect)


def call(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request; HTTP errors are answers, not exceptions."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=30) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def post_json(url: str, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, body = call(
        url,
        method="POST",
        headers={"Content-Type": "application/json", **(headers if headers is not None else CSRF)},
        body=json.dumps(payload).encode(),
    )
    return status, json.loads(body)


def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, body = call(url, headers=headers)
    return status, json.loads(body)


def settings_for(state: Path, folder: Path, port: int, http: dict[str, Any]) -> Any:
    return load_settings(
        data={
            "daemon": {"state_dir": str(state)},
            "aggregation": {"windows": ["1m", "1h"], "publish_interval": "0.3s"},
            "http": {"enabled": True, "port": port, **http},
            "alarms": {
                "definitions": [
                    {
                        "id": "pg_high",
                        "kind": "fraction_high",
                        "priority": "high",
                        "message": "PG {value:.0%} above {limit:.0%}",
                        "class_name": "PG",
                        "window": "1h",
                        "limit": 0.1,
                        "min_count": 10,
                    }
                ]
            },
            "probes": [
                {
                    "id": "R1",
                    "source": {
                        "type": "folder",
                        "path": str(folder),
                        "settle_time": "200ms",
                        "rescan_interval": "1s",
                        # Files named up to 10 min back keep their names' times.
                        "frame_time_tolerance": "1h",
                    },
                }
            ],
        }
    )


def write_probe_files(folder: Path) -> None:
    """32 crops (24 CEX, 8 PG), two blank frames, a saturated one and a text file."""
    folder.mkdir(parents=True)
    simulator = CropSimulator(seed=21)
    for index in range(N_CEX + N_PG):
        label = "PG" if index < N_PG else "CEX"
        write_like_probe(folder, f"crop_{index:03d}.png", simulator.render(label))
    grey = np.full((151, 151), 128, np.uint8)
    write_like_probe(folder, "blank_1.png", grey)
    write_like_probe(folder, "blank_2.png", grey)
    write_like_probe(folder, "white.png", np.full((151, 151), 255, np.uint8))
    (folder / "notes.png").write_text("not an image\n")


class Running:
    def __init__(self, daemon: Daemon, publisher: SwitchPublisher, port: int) -> None:
        self.daemon, self.publisher = daemon, publisher
        self.base = f"http://127.0.0.1:{port}"

    def alarm(self, alarm_id: str) -> dict[str, Any]:
        return next(a for a in self.daemon.view.alarm_states("R1") if a["alarm_id"] == alarm_id)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("http")
    folder = root / "probe"
    write_probe_files(folder)
    port = free_port()
    publisher = SwitchPublisher()
    daemon = Daemon(settings_for(root / "state", folder, port, {}), publishers=[publisher])
    daemon.start()
    try:
        assert wait_for(lambda: daemon.recorder.recorded == N_CEX + N_PG + 4, timeout=120)
        running = Running(daemon, publisher, port)
        assert wait_for(lambda: running.alarm("pg_high")["active"], timeout=30)
        yield running
    finally:
        daemon.stop()


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def stored_totals(daemon: Daemon) -> tuple[dict[str, int], int, int]:
    """(confident particles per class, low-confidence ones, out-of-distribution ones)."""
    particles: dict[str, int] = {}
    uncertain = ood = 0
    for row in daemon.store.frames_since("R1", 0.0):
        for name, count in row.counts.items():
            particles[name] = particles.get(name, 0) + count
        uncertain += row.n_uncertain
        ood += row.n_ood
    return particles, uncertain, ood


# -- health -------------------------------------------------------------------------------


def test_healthz_says_alive(running: Running) -> None:
    status, body = get_json(f"{running.base}/healthz")
    assert status == 200
    assert body["status"] == "alive"


def test_readyz_names_a_disconnected_publisher_and_recovers(running: Running) -> None:
    running.publisher.connected = False
    try:
        status, body = get_json(f"{running.base}/readyz")
        assert status == 503
        assert body["ready"] is False
        assert body["reasons"] == ["publisher switch: broker unreachable"]
    finally:
        running.publisher.connected = True
    status, body = get_json(f"{running.base}/readyz")
    assert status == 200 and body["ready"] is True and body["reasons"] == []
    checks = {check["check"]: check for check in body["checks"]}
    assert checks["model"]["ok"] and "cex-pg" in checks["model"]["detail"]
    assert checks["source R1"] == {"check": "source R1", "ok": True, "detail": "watching"}


# -- metrics ------------------------------------------------------------------------------


def test_metrics_count_exactly_what_was_processed(running: Running) -> None:
    status, headers, body = call(f"{running.base}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = metric_samples(body.decode())

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("crystal_monitor_frames_total", probe="R1", status="ok") == N_CEX + N_PG
    assert value("crystal_monitor_frames_total", probe="R1", status="rejected") == 3
    assert value("crystal_monitor_frames_total", probe="R1", status="error") == 1
    rejects = "crystal_monitor_frame_rejects_total"
    assert value(rejects, probe="R1", status="rejected", reason="empty") == 2
    assert value(rejects, probe="R1", status="rejected", reason="saturated") == 1
    assert value(rejects, probe="R1", status="error", reason="not_an_image") == 1

    particles, uncertain, ood = stored_totals(running.daemon)
    assert sum(particles.values()) + uncertain + ood == N_CEX + N_PG  # one crop per file
    for name, count in particles.items():
        assert value("crystal_monitor_particles_total", probe="R1", **{"class": name}) == count
    assert value("crystal_monitor_uncertain_particles_total", probe="R1") == uncertain
    assert value("crystal_monitor_out_of_distribution_particles_total", probe="R1") == ood

    stats = running.daemon.batcher.stats
    assert stats.crops == N_CEX + N_PG
    assert value("crystal_monitor_inference_crops_total") == N_CEX + N_PG
    assert value("crystal_monitor_inference_batch_size_count") == stats.batches
    assert value("crystal_monitor_inference_batch_size_sum") == N_CEX + N_PG
    assert value("crystal_monitor_inference_batch_size_bucket", le="+Inf") == stats.batches
    assert value("crystal_monitor_inference_seconds_count") == stats.batches
    assert value("crystal_monitor_inference_seconds_sum") == pytest.approx(stats.infer_seconds)
    assert value("crystal_monitor_frame_queue_depth") == 0
    assert value("crystal_monitor_batcher_queue_crops") == 0
    assert value("crystal_monitor_publish_backlog", publisher="switch") == 7
    assert value("crystal_monitor_publisher_connected", publisher="switch") == 1
    assert value("crystal_monitor_alarm_active", probe="R1", alarm="pg_high", priority="high") == 1
    window_n = value("crystal_monitor_window_particles", probe="R1", window="3600")
    assert window_n == sum(particles.values())
    pg = value("crystal_monitor_class_fraction", probe="R1", window="3600", **{"class": "PG"})
    assert pg == pytest.approx(particles["PG"] / window_n)


# -- JSON API -----------------------------------------------------------------------------


def test_state_api_shows_counts_quality_snapshot_and_alarms(running: Running) -> None:
    status, state = get_json(f"{running.base}/api/state")
    assert status == 200
    assert state["classes"] == ["CEX", "PG"] and state["windows"] == [60, 3600]
    quality = state["model"]["quality"]
    assert quality["training_data"] == "simulated"
    assert quality["out_of_distribution_check"] is True
    assert 0.9 <= quality["held_out_site_macro_f1"] <= 1.0
    assert any("simulated images only" in warning for warning in quality["warnings"])
    (probe,) = state["probes"]
    particles, uncertain, ood = stored_totals(running.daemon)
    assert probe["id"] == "R1" and probe["quality"] == "GOOD"
    assert probe["counts"]["frames"] == {"ok": N_CEX + N_PG, "rejected": 3, "error": 1}
    assert probe["counts"]["particles"] == particles
    assert probe["counts"]["uncertain"] == uncertain
    assert probe["counts"]["out_of_distribution"] == ood
    hour = probe["snapshot"]["windows"]["3600s"]
    assert hour["window_s"] == 3600
    assert hour["n"] == sum(particles.values())
    assert hour["classes"]["PG"]["n"] == particles["PG"]
    assert hour["rejected_frames"] == 4
    assert hour["rejected_by_reason"] == {"empty": 2, "saturated": 1, "not_an_image": 1}
    assert probe["last_frame_age_s"] >= 0
    assert probe["source"] == {"alive": True, "detail": "watching"}
    assert [a["alarm_id"] for a in probe["active_alarms"]] == ["pg_high"]
    assert probe["limits"] == [
        {
            "alarm_id": "pg_high",
            "kind": "fraction_high",
            "class_name": "PG",
            "window": 3600,
            "limit": 0.1,
            "deadband": 0.01,
            "priority": "high",
            "use_adjusted": False,
        }
    ]
    assert probe["default_window"] == 3600
    assert probe["latest_frame"]["key"].startswith("crop_")


def test_history_serves_the_stored_snapshots(running: Running) -> None:
    store = running.daemon.store
    assert wait_for(lambda: len(store.probe_snapshots("R1", 0.0)) >= 3, timeout=30)
    status, history = get_json(f"{running.base}/api/probes/R1/history?window=3600")
    assert status == 200
    assert history["span"] == "hour" and history["window"] == 3600
    stored = {iso_utc(ts): snap for ts, _, snap in store.probe_snapshots("R1", 0.0)}
    assert len(history["ts"]) >= 3
    pg = history["series"]["PG"]
    assert len(pg["fraction"]) == len(pg["low"]) == len(pg["high"]) == len(history["ts"])
    for index, ts in enumerate(history["ts"]):
        window = stored[ts]["windows"]["3600"]
        assert history["n"][index] == window["n"]
        assert pg["fraction"][index] == to_wire(window["classes"]["PG"]["fraction"])
        assert [pg["low"][index], pg["high"][index]] == (
            to_wire(window["classes"]["PG"]["ci95"]) or [None, None]
        )
    assert get_json(f"{running.base}/api/probes/R1/history?window=61")[0] == 400
    assert get_json(f"{running.base}/api/probes/R9/history")[0] == 404


def test_latest_frame_comes_as_boxes_and_a_scaled_jpeg(running: Running) -> None:
    status, frame = get_json(f"{running.base}/api/probes/R1/frame")
    assert status == 200
    # The newest by frame time (the recorded order of two workers can differ from it);
    # among equal times the one recorded last.
    held = list(running.daemon.probes["R1"].recent_frames)
    latest = max(reversed(held), key=lambda recent: recent.ts)
    assert frame["key"] == latest.key and frame["ts"] == iso_utc(latest.ts)
    height, width = latest.image.shape
    assert (frame["width"], frame["height"]) == (width, height)
    (box,) = frame["boxes"]  # a crop file is one particle
    assert box["label"] == latest.boxes[0].label and box["label"] in ("CEX", "PG")
    first = latest.boxes[0]
    assert (box["x"], box["y"], box["w"], box["h"]) == (first.x, first.y, first.w, first.h)

    status, headers, body = call(f"{running.base}/api/probes/R1/frame.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert image.shape == (height, width)  # never scaled up
    status, _, body = call(f"{running.base}/api/probes/R1/frame.jpg?width=64")
    small = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert small.shape[1] == 64 and small.shape[0] == round(height * 64 / width)


def _jpeg(body: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert image is not None
    return image


def test_the_recent_frames_are_the_last_classified_ones(running: Running) -> None:
    status, listing = get_json(f"{running.base}/api/probes/R1/frames")
    assert status == 200 and RECENT_FRAMES == 8
    assert listing["capacity"] == RECENT_FRAMES and listing["classes"] == ["CEX", "PG"]
    frames = listing["frames"]
    # 36 crops and frames went in, 32 were classified: only the last 8 of those are held.
    stored = [
        row
        for row in running.daemon.store.iter_frames()
        if row.probe == "R1" and row.status == "ok"
    ]
    assert len(stored) == N_CEX + N_PG
    held = {row.key: row for row in stored[-RECENT_FRAMES:]}
    by_key = {frame.key: frame for frame in running.daemon.probes["R1"].recent_frames}
    assert len(frames) == RECENT_FRAMES
    assert {frame["key"] for frame in frames} == set(held)
    assert [frame["index"] for frame in frames] == list(range(RECENT_FRAMES))
    times = [frame["ts"] for frame in frames]
    assert times == sorted(times, reverse=True)  # newest first
    for frame in frames:
        row = held[frame["key"]]
        assert frame["ts"] == iso_utc(row.ts)
        assert frame["counts"] == row.counts
        assert frame["uncertain"] == row.n_uncertain
        assert frame["out_of_distribution"] == row.n_ood
        assert frame["particles"] == 1  # a crop file is one particle
        height, width = by_key[frame["key"]].image.shape
        assert (frame["width"], frame["height"]) == (width, height)
        assert "boxes" not in frame  # only with ?boxes=1
    status, with_boxes = get_json(f"{running.base}/api/probes/R1/frames?boxes=1")
    assert status == 200
    for frame, boxed in zip(frames, with_boxes["frames"], strict=True):
        assert boxed["key"] == frame["key"] and len(boxed["boxes"]) == 1
        (box,) = boxed["boxes"]
        assert frame["counts"].get(box["label"], 0) == (0 if box["uncertain"] else 1)

    # The newest frame is what the old endpoints show, and index 0 of the new ones.
    status, newest = get_json(f"{running.base}/api/probes/R1/frame")
    assert status == 200 and newest == get_json(f"{running.base}/api/probes/R1/frame?index=0")[1]
    assert {k: v for k, v in newest.items() if k != "boxes"} == frames[0]
    for frame in frames:
        status, chosen = get_json(f"{running.base}/api/probes/R1/frame?key={frame['key']}")
        assert status == 200 and chosen["index"] == frame["index"]
        assert chosen["ts"] == frame["ts"] and len(chosen["boxes"]) == 1
        box = by_key[frame["key"]].boxes[0]
        assert (chosen["boxes"][0]["x"], chosen["boxes"][0]["label"]) == (box.x, box.label)

    # The JPEG of a chosen frame, by index or by key (and time), at a chosen width.
    third = frames[3]
    status, headers, body = call(f"{running.base}/api/probes/R1/frame.jpg?index=3")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert (headers["X-Frame-Key"], headers["X-Frame-Index"]) == (third["key"], "3")
    assert headers["X-Frame-Ts"] == third["ts"]
    assert headers["Cache-Control"] == "no-store"  # index 3 is another frame tomorrow
    image = by_key[third["key"]].image
    assert body == views.encode_frame(image, 960)
    assert _jpeg(body).shape == image.shape
    url = f"{running.base}/api/probes/R1/frame.jpg?key={third['key']}&ts={third['ts']}&width=64"
    status, headers, body = call(url)
    assert status == 200 and headers["X-Frame-Key"] == third["key"]
    assert "immutable" in headers["Cache-Control"]  # key and time name it for good
    assert body == views.encode_frame(image, 64)
    assert _jpeg(body).shape == (round(image.shape[0] * 64 / image.shape[1]), 64)
    assert call(url)[2] == body  # the second time from the server's cache
    status, headers, body = call(f"{running.base}/api/probes/R1/frame.jpg")
    assert status == 200 and headers["X-Frame-Key"] == frames[0]["key"]

    # What is not held, or not a selection, is said so.
    gone = stored[0].key
    for query, expected in (
        (f"key={gone}", 404),
        (f"key={third['key']}&ts={_epoch(third['ts']) + 1}", 404),
        (f"index={RECENT_FRAMES}", 404),
        ("index=-1", 400),
        ("index=two", 400),
        (f"index=0&key={third['key']}", 400),
        ("ts=12.5", 400),
        (f"key={third['key']}&ts=soon", 400),
    ):
        for path in ("frame", "frame.jpg"):
            status, _, body = call(f"{running.base}/api/probes/R1/{path}?{query}")
            assert status == expected, (path, query, body)
            assert json.loads(body)["error"]
    assert (
        "not among the recent frames"
        in get_json(f"{running.base}/api/probes/R1/frame?key={gone}")[1]["error"]
    )
    assert get_json(f"{running.base}/api/probes/R9/frames")[0] == 404


def _stamp(ts: float) -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(ts)) + f".{round(ts % 1 * 1000):03d}Z"


def test_the_recent_frames_grow_to_their_bound_and_stay_there(tmp_path: Path) -> None:
    """Files one at a time, each named with its time: the list grows by one per classified
    frame, never past RECENT_FRAMES, a rejected frame never enters it, and it lists the
    frames newest first even when one arrives late."""
    folder = tmp_path / "probe"
    folder.mkdir()
    port = free_port()
    results = ResultsPublisher()
    daemon = Daemon(settings_for(tmp_path / "state", folder, port, {}), publishers=[results])
    daemon.start()
    base = f"http://127.0.0.1:{port}"
    try:
        status, listing = get_json(f"{base}/api/probes/R1/frames")
        assert (status, listing["frames"], listing["capacity"]) == (200, [], RECENT_FRAMES)
        assert get_json(f"{base}/api/probes/R1/frame")[0] == 404
        assert call(f"{base}/api/probes/R1/frame.jpg?index=0")[0] == 404

        simulator = CropSimulator(seed=21)  # the crops of write_probe_files: all classified
        start = float(int(time.time()) - 600)
        # Seconds after start, in the order the files are written: the 9th file is older
        # than the two before it, the 6th is blank (rejected, never listed).
        offsets = [0, 1, 2, 3, 4, 5, 6, 7, 8.5, 8.25, 10, 11, 12]
        classified: list[tuple[str, float]] = []
        for count, offset in enumerate(offsets, start=1):
            ts = start + offset
            name = f"{_stamp(ts)}_{count:02d}.png"
            if count == 6:
                write_like_probe(folder, name, np.full((151, 151), 128, np.uint8))
            else:
                label = "PG" if len(classified) < N_PG else "CEX"
                write_like_probe(folder, name, simulator.render(label))
                classified.append((name, ts))
            # Results are published after the frame is added to the recent frames.
            assert wait_for(lambda n=count: len(results.statuses) == n, timeout=60)
            status, listing = get_json(f"{base}/api/probes/R1/frames")
            assert status == 200
            held = classified[-RECENT_FRAMES:]
            expected = [
                (name, iso_utc(ts)) for name, ts in sorted(held, key=lambda i: i[1], reverse=True)
            ]
            got = [(frame["key"], frame["ts"]) for frame in listing["frames"]]
            assert len(got) == min(len(classified), RECENT_FRAMES), results.statuses
            assert got == expected
        statuses = [status for _, status in results.statuses]
        assert statuses == ["ok"] * 5 + ["rejected"] + ["ok"] * (len(offsets) - 6)
        assert len(classified) == len(offsets) - 1 > RECENT_FRAMES
        assert len(daemon.probes["R1"].recent_frames) == RECENT_FRAMES
        # The newest by time is index 0 of every frame endpoint.
        status, headers, _ = call(f"{base}/api/probes/R1/frame.jpg")
        assert status == 200 and headers["X-Frame-Key"] == classified[-1][0]
        rows = {row.key: row for row in daemon.store.iter_frames() if row.status == "ok"}
        for frame in get_json(f"{base}/api/probes/R1/frames")[1]["frames"]:
            assert frame["counts"] == rows[frame["key"]].counts
            assert frame["uncertain"] == rows[frame["key"]].n_uncertain
    finally:
        daemon.stop()


def test_acknowledge_and_shelve_reach_the_alarm_engine(running: Running) -> None:
    base = f"{running.base}/api/probes/R1/alarms/pg_high"
    assert running.alarm("pg_high")["state"] == "active_unacknowledged"
    # Cross-site protections: no custom header, a form content type, a foreign Origin.
    assert post_json(f"{base}/acknowledge", {"who": "x"}, headers={})[0] == 403
    status, _, _ = call(
        f"{base}/acknowledge",
        method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded", **CSRF},
        body=b"who=x",
    )
    assert status == 403
    foreign = {**CSRF, "Origin": "http://evil.example"}
    assert post_json(f"{base}/acknowledge", {"who": "x"}, headers=foreign)[0] == 403
    assert post_json(f"{base}/acknowledge", {"comment": "no name"})[0] == 400
    assert running.alarm("pg_high")["state"] == "active_unacknowledged"

    status, body = post_json(
        f"{base}/acknowledge", {"who": "op-anna", "comment": "sample sent to the lab"}
    )
    assert (status, body) == (200, {"accepted": True, "reason": None})
    assert running.alarm("pg_high")["state"] == "active_acknowledged"
    status, body = post_json(f"{base}/acknowledge", {"who": "op-anna"})
    assert status == 409 and body["accepted"] is False and body["reason"]

    assert post_json(f"{base}/shelve", {"who": "op-ben", "minutes": 0})[0] == 400
    status, body = post_json(f"{base}/shelve", {"who": "op-ben", "minutes": 30, "comment": "cip"})
    assert (status, body["accepted"]) == (200, True)
    alarm = running.alarm("pg_high")
    assert alarm["shelved"] is True and alarm["shelved_by"] == "op-ben"
    assert (
        post_json(f"{running.base}/api/probes/R1/alarms/nope/shelve", {"who": "b", "minutes": 5})[0]
        == 409
    )
    assert (
        post_json(f"{running.base}/api/probes/R9/alarms/pg_high/acknowledge", {"who": "b"})[0]
        == 404
    )

    status, alarms = get_json(f"{running.base}/api/alarms?probe=R1")
    assert status == 200
    assert alarms["states"]["R1"][0]["shelved"] is True
    actions = {(e["event"], e["who"], e["comment"], e["accepted"]) for e in alarms["journal"]}
    assert ("acknowledge", "op-anna", "sample sent to the lab", True) in actions
    assert ("shelve", "op-ben", "cip", True) in actions


def test_a_foreign_host_header_is_refused_without_a_token(running: Running) -> None:
    """DNS rebinding: a page from another site resolved to 127.0.0.1 sends its own Host."""
    status, _, body = call(f"{running.base}/api/state", headers={"Host": "evil.example"})
    assert status == 403 and b"DNS-rebinding" in body
    assert call(f"{running.base}/api/state", headers={"Host": "localhost"})[0] == 200


def test_the_dashboard_page_and_its_assets_come_from_the_package(running: Running) -> None:
    status, headers, page = call(f"{running.base}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert b'src="/static/dashboard.js"' in page and b'href="/static/dashboard.css"' in page
    assert b"https://" not in page and b"http://" not in page  # nothing from a CDN
    for asset in ("dashboard.js", "dashboard.css"):
        status, _, body = call(f"{running.base}/static/{asset}")
        assert status == 200 and len(body) > 1000
        assert b"https://" not in body  # no CDN
    assert call(f"{running.base}/static/../server.py")[0] == 404


# -- the token ----------------------------------------------------------------------------


@pytest.fixture
def tokened_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    monkeypatch.setenv("CM_TEST_HTTP_TOKEN", TOKEN)
    folder = tmp_path / "probe"
    folder.mkdir()
    port = free_port()
    settings = settings_for(tmp_path / "state", folder, port, {"token_env": "CM_TEST_HTTP_TOKEN"})
    daemon = Daemon(settings)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def tokened(tokened_daemon: Daemon) -> str:
    assert tokened_daemon.web is not None
    return tokened_daemon.web.url.rstrip("/")


def test_a_token_guards_everything_but_healthz(tokened: str) -> None:
    assert call(f"{tokened}/healthz")[0] == 200
    for path in ("/api/state", "/readyz", "/metrics", "/static/dashboard.js", "/api/alarms"):
        status, headers, _ = call(f"{tokened}{path}")
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Bearer")
    status, headers, _ = call(f"{tokened}/")
    assert (status, headers["Location"]) == (303, "/login")

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert call(f"{tokened}/api/state", headers=bearer)[0] == 200
    assert call(f"{tokened}/metrics", headers=bearer)[0] == 200
    assert call(f"{tokened}/api/state", headers={"Authorization": "Bearer wrong"})[0] == 401
    # Operator actions need the token and the cross-site header.
    ack = f"{tokened}/api/probes/R1/alarms/pg_high/acknowledge"
    assert post_json(ack, {"who": "a"})[0] == 401
    assert post_json(ack, {"who": "a"}, headers=bearer)[0] == 403
    assert post_json(ack, {"who": "a"}, headers={**bearer, **CSRF})[0] == 409  # not active


def test_the_login_link_sets_a_cookie_that_opens_the_dashboard(tokened: str) -> None:
    assert call(f"{tokened}/login?token=wrong")[0] == 401
    status, headers, _ = call(f"{tokened}/login?token={TOKEN}")
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie and TOKEN not in cookie
    session = {"Cookie": cookie.split(";", 1)[0]}
    assert call(f"{tokened}/", headers=session)[0] == 200
    assert call(f"{tokened}/api/state", headers=session)[0] == 200

    status, headers, _ = call(
        f"{tokened}/login",
        method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body=f"token={TOKEN}".encode(),
    )
    assert status == 303 and headers["Set-Cookie"].split(";", 1)[0] == session["Cookie"]


# -- refusing to start --------------------------------------------------------------------


def _run_cli(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def _config_file(tmp_path: Path, http: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"

[http]
enabled = true
{http}

[[probes]]
id = "R1"
source = {{ type = "folder", path = "{tmp_path}" }}
"""
    )
    return path


def test_binding_beyond_loopback_without_a_token_exits_78(tmp_path: Path) -> None:
    result = _run_cli(_config_file(tmp_path, 'host = "0.0.0.0"\nport = 18080'))
    assert result.returncode == EX_CONFIG, result.stderr
    assert "config error: http: host '0.0.0.0' is reachable beyond this machine" in result.stderr
    assert "set http.token_env" in result.stderr and "127.0.0.1" in result.stderr
    assert not (tmp_path / "state").exists()


def test_a_missing_or_weak_token_exits_78(tmp_path: Path) -> None:
    config = _config_file(tmp_path, 'host = "0.0.0.0"\ntoken_env = "CM_TEST_UNSET_TOKEN"')
    env = {k: v for k, v in os.environ.items() if k != "CM_TEST_UNSET_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert result.returncode == EX_CONFIG, result.stderr
    assert "http.token_env: environment variable CM_TEST_UNSET_TOKEN is not set" in result.stderr
    result = _run_cli(config, {"CM_TEST_UNSET_TOKEN": "short"})
    assert result.returncode == EX_CONFIG, result.stderr
    assert "http.token_env: the token has 5 characters, fewer than 16" in result.stderr


def test_a_token_allows_binding_beyond_loopback_in_the_config() -> None:
    settings = load_settings(
        data={
            "http": {"enabled": True, "host": "0.0.0.0", "token_credential": "http-token"},
            "probes": [{"id": "R1", "source": {"type": "folder", "path": "/srv/x"}}],
        }
    )
    assert settings.http.host == "0.0.0.0" and settings.http.token_credential == "http-token"


def test_a_busy_port_fails_with_the_fix_in_the_message() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = WebServer(HttpConfig(enabled=True, port=port), FakeView(), RefusingCommands())
        with pytest.raises(WebStartError, match=r"cannot listen on 127\.0\.0\.1:\d+.*http\.port"):
            server.start()


def test_during_a_batch_the_history_starts_at_the_batch(tokened_daemon: Daemon) -> None:
    assert tokened_daemon.web is not None
    base = tokened_daemon.web.url.rstrip("/")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    status, history = get_json(f"{base}/api/probes/R1/history", headers=bearer)
    assert status == 200 and history["span"] == "hour"
    assert tokened_daemon.commands.start_batch("R1", "B-42").accepted
    started = tokened_daemon.store.current_batch("R1")
    assert started is not None and started[0] == "B-42"
    status, history = get_json(f"{base}/api/probes/R1/history?window=60", headers=bearer)
    assert (status, history["span"], history["since"]) == (200, "batch", iso_utc(started[1]))
    status, history = get_json(f"{base}/api/probes/R1/history?span=hour", headers=bearer)
    assert history["span"] == "hour"
    assert get_json(f"{base}/api/probes/R1/history?span=week", headers=bearer)[0] == 400
    status, state = get_json(f"{base}/api/state", headers=bearer)
    assert state["probes"][0]["batch"] == "B-42"


def test_a_long_history_is_thinned_evenly_in_the_store(tmp_path: Path) -> None:
    """A day of snapshots reaches the page as a few hundred points, newest included."""
    from monitor.store import Store

    store = Store(tmp_path)
    try:
        for index in range(1000):
            store.record_snapshot("R1", 1000.0 + index, None, {"i": index})
            store.record_snapshot("R2", 1000.0 + index, None, {"i": -index})
        rows = store.probe_snapshots("R1", 1100.0, max_rows=10)
        step = (900 - 1) / (10 - 1)
        assert [row[2]["i"] for row in rows] == [100 + round(i * step) for i in range(10)]
        assert len(store.probe_snapshots("R1", 1100.0)) == 900
        assert len(store.probe_snapshots("R1", 1995.0, max_rows=10)) == 5
    finally:
        store.close()


def test_http_config_errors_name_the_key_and_the_fix() -> None:
    from monitor.config.settings import ConfigError

    probes = [{"id": "R1", "source": {"type": "folder", "path": "/srv/x"}}]
    both = {"enabled": True, "token_env": "A", "token_credential": "b"}
    with pytest.raises(ConfigError) as caught:
        load_settings(data={"http": both, "probes": probes})
    assert caught.value.problems == ["http: set token_env or token_credential, not both"]
    with pytest.raises(ConfigError) as caught:
        load_settings(data={"http": {"enabled": True, "prot": 1}, "probes": probes})
    assert caught.value.problems[0].startswith("http.prot: unknown key")
    # A disabled server binds nothing, so its host needs no token.
    settings = load_settings(data={"http": {"host": "0.0.0.0"}, "probes": probes})
    assert settings.http.enabled is False
