"""Fault injection on the path from a file to its stored row and published result.

Each test reproduces a defect found by the fault-injection run (issue 11) against the
real daemon in a subprocess, its real SQLite file, a real mosquitto broker and the real
HTTP server: a name that is not UTF-8, a database held locked and SIGKILLs, a full
disk (a small tmpfs, root only), files named with old and future times, a retained
command, a descriptor limit (prlimit) and a damaged store file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.memory_soak import process_tree
from monitor.simulator import CropSimulator
from monitor.store import DB_FILE
from tests.daemon_process import DaemonProcess, export, wait_for, write_like_probe
from tests.mosquitto import MosquittoBroker, Subscriber, free_port, running_mosquitto

PREFIX = "cm-faults"


def _config(
    tmp_path: Path,
    state_dir: Path,
    folder: Path,
    *,
    mqtt_port: int | None = None,
    http_port: int | None = None,
    extra: str = "",
    source_extra: str = "",
) -> Path:
    mqtt = (
        f"""
[mqtt]
enabled = true
port = {mqtt_port}
topic_prefix = "{PREFIX}"
results = true
commands = true
reconnect_min = "1s"
reconnect_max = "2s"
"""
        if mqtt_port is not None
        else ""
    )
    http = (
        f"""
[http]
enabled = true
port = {http_port}
"""
        if http_port is not None
        else ""
    )
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[daemon]
state_dir = "{state_dir}"
log_format = "json"
shutdown_grace = "5s"

[aggregation]
publish_interval = "1s"
{extra}
{mqtt}
{http}
[[probes]]
id = "R1"
sampling = "whole"
[probes.source]
type = "folder"
path = "{folder}"
settle_time = "300ms"
rescan_interval = "2s"
{source_extra}
"""
    )
    return path


@pytest.fixture
def crops() -> list[np.ndarray]:
    simulator = CropSimulator(seed=11)
    return [simulator.render("PG" if i % 5 == 0 else "CEX") for i in range(20)]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with running_mosquitto(tmp_path / "mosquitto") as started:
        yield started


def _log_events(daemon: DaemonProcess) -> list[dict[str, Any]]:
    events = []
    for line in daemon.log_text().splitlines():
        try:
            document = json.loads(line)
        except ValueError:
            continue
        if isinstance(document, dict):
            events.append(document)
    return events


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def _results(subscriber: Subscriber) -> list[dict[str, Any]]:
    return [m.json() for m in subscriber.received if m.topic == f"{PREFIX}/R1/results"]


# -- item 1: a name that is not UTF-8 ------------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_stored_and_sinks_nothing(
    tmp_path: Path, crops: list[np.ndarray]
) -> None:
    """Before: SQLite raised UnicodeEncodeError and the whole write group was dropped,
    again at every restart (29 of 61 recorded)."""
    folder = tmp_path / "probe"
    folder.mkdir()
    config = _config(tmp_path, tmp_path / "state", folder)
    for index in range(60):
        write_like_probe(folder, f"crop_{index:03d}.png", crops[index % len(crops)])
    # The probe PC's share writes a Latin-1 name: bytes that are not UTF-8.
    write_like_probe(folder, "latin.png", crops[0])
    os.rename(os.fsencode(folder / "latin.png"), os.fsencode(folder) + b"/probe_\xe9t\xe9.png")
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        assert wait_for(lambda: len(export(config)) >= 61, timeout=90)
        daemon.terminate()
        daemon.start()  # the journal matches the escaped name: not counted again
        time.sleep(6)
        assert daemon.terminate() == 0
    rows = export(config)
    keys = sorted(row["key"] for row in rows)
    assert len(keys) == 61
    assert "probe_\\xe9t\\xe9.png" in keys
    assert {row["status"] for row in rows} == {"ok"}
    assert "store_write_failed" not in daemon.log_text()


# -- item 3 and the acceptance: exactly once, results included ----------------------------


def _hold_database_locked(path: Path, seconds: float) -> None:
    """Another process's writer: BEGIN IMMEDIATE held for `seconds`."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        db.execute("ROLLBACK")
    finally:
        db.close()


@pytest.mark.slow
def test_results_are_published_exactly_once_through_sigkills_and_a_locked_database(
    tmp_path: Path, crops: list[np.ndarray], broker: MosquittoBroker
) -> None:
    """N frames fed while the daemon is SIGKILLed and its database held locked (past the
    5 s busy timeout): the store has N rows and the subscriber sees N distinct result
    seqs 1..N, each naming one stored frame; repeats only as redeliveries of the same
    seq and payload. Before: results were published after the store commit, so a kill
    or a locked outbox lost them while the seqs stayed contiguous."""
    folder = tmp_path / "probe"
    folder.mkdir()
    state = tmp_path / "state"
    config = _config(tmp_path, state, folder, mqtt_port=broker.port)
    total = 400
    written = threading.Event()

    def writer() -> None:
        for index in range(total):
            write_like_probe(folder, f"crop_{index:05d}.png", crops[index % len(crops)])
            time.sleep(0.02)
        written.set()

    with (
        Subscriber(broker.port, [f"{PREFIX}/R1/results"]) as subscriber,
        DaemonProcess(config, tmp_path / "daemon.log") as daemon,
    ):
        daemon.start()
        assert wait_for((state / DB_FILE).exists, timeout=60)
        thread = threading.Thread(target=writer)
        thread.start()
        rng = random.Random(7)
        for round_ in range(3):
            time.sleep(rng.uniform(1.0, 2.5))
            _hold_database_locked(state / DB_FILE, rng.uniform(6.0, 8.0))
            time.sleep(rng.uniform(0.5, 2.0))
            daemon.kill()
            if round_ == 1:  # killed with the lock held: the next start waits for it
                locker = threading.Thread(target=_hold_database_locked, args=(state / DB_FILE, 3.0))
                locker.start()
                daemon.start()
                locker.join()
            else:
                daemon.start()
        thread.join()
        assert written.is_set()
        assert wait_for(lambda: len(export(config)) >= total, timeout=240, interval=2)
        assert wait_for(lambda: len({r["seq"] for r in _results(subscriber)}) >= total, timeout=120)
        time.sleep(3)  # a late duplicate row or an extra seq would show up here
        assert daemon.terminate() == 0
        results = _results(subscriber)
    rows = export(config)
    assert sorted(row["key"] for row in rows) == [f"crop_{i:05d}.png" for i in range(total)]
    by_seq: dict[int, dict[str, Any]] = {}
    for result in results:
        if result["seq"] in by_seq:
            assert by_seq[result["seq"]] == result  # a redelivery, the same message
        by_seq[result["seq"]] = result
    assert sorted(by_seq) == list(range(1, total + 1))
    assert sorted(r["key"] for r in by_seq.values()) == sorted(row["key"] for row in rows)
    events = _log_events(daemon)
    assert any(
        e.get("event") == "store_write_failed" and "locked" in e.get("reason", "") for e in events
    )


# -- item 4 and the acceptance: a full disk ---------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs for the state folder (needs root, as CI here runs)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], check=True
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(disk: Path) -> Path:
    """Writes zeros until the disk is full. Unbuffered: a buffered file's close would flush
    its last partial chunk into the full disk and raise ENOSPC again (it did in CI, where
    the free space was not a multiple of the chunk)."""
    filler = disk / "filler"
    chunk = b"\0" * (1 << 16)
    with filler.open("wb", buffering=0) as out:
        try:
            while out.write(chunk):
                pass
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    assert shutil.disk_usage(disk).free < len(chunk)
    return filler


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_a_full_disk_for_30_s_is_reported_and_every_frame_is_stored_after(
    tmp_path: Path, crops: list[np.ndarray], small_disk: Path
) -> None:
    """Before: /readyz stayed 200, nothing counted the failures, failed frames were never
    retried until a restart and the log flooded with tracebacks."""
    folder = tmp_path / "probe"
    folder.mkdir()
    port = free_port()
    config = _config(tmp_path, small_disk / "state", folder, http_port=port)
    base = f"http://127.0.0.1:{port}"
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        for index in range(20):
            write_like_probe(folder, f"before_{index:03d}.png", crops[index % len(crops)])
        assert wait_for(lambda: len(export(config)) >= 20, timeout=90)
        assert wait_for(lambda: _get(f"{base}/readyz")[0] == 200, timeout=30)
        filler = _fill(small_disk)
        full_since = time.monotonic()
        for index in range(60):
            write_like_probe(folder, f"during_{index:03d}.png", crops[index % len(crops)])
            time.sleep(0.1)
        assert wait_for(lambda: _get(f"{base}/readyz")[0] == 503, timeout=30)
        _, body = _get(f"{base}/readyz")
        reasons = json.loads(body)["reasons"]
        assert any(r.startswith("store:") and "full" in r for r in reasons), reasons
        failures_first = _metric(_get(f"{base}/metrics")[1], "crystal_monitor_store_write_failures")
        assert failures_first >= 1
        assert _metric(_get(f"{base}/metrics")[1], "crystal_monitor_store_writable") == 0
        time.sleep(max(0.0, 30.0 - (time.monotonic() - full_since)))
        failures_later = _metric(_get(f"{base}/metrics")[1], "crystal_monitor_store_write_failures")
        assert failures_later > failures_first  # still retrying, still counted
        assert _get(f"{base}/healthz")[0] == 200  # alive, only not ready
        filler.unlink()  # space is back
        assert wait_for(lambda: len(export(config)) >= 80, timeout=120)
        assert wait_for(lambda: _get(f"{base}/readyz")[0] == 200, timeout=30)
        assert daemon.terminate() == 0
    rows = export(config)
    assert sorted(r["key"] for r in rows if r["key"].startswith("during_")) == [
        f"during_{i:03d}.png" for i in range(60)
    ]
    assert len(rows) == 80
    assert {r["status"] for r in rows} == {"ok"}
    events = _log_events(daemon)
    failed_lines = [e for e in events if e.get("event") == "store_write_failed"]
    # Rate-limited: one line per reason per minute (with a count), not one per retry.
    assert 1 <= len(failed_lines) <= 4, len(failed_lines)
    assert sum(int(e["failures"]) for e in failed_lines) < failures_later
    assert any(e.get("event") == "store_write_recovered" for e in events)
    assert daemon.log_text().count("Traceback") <= 2


# -- item 5: retention by the time of recording, future names ---------------------------


def test_old_names_survive_retention_and_future_names_use_the_arrival_time(
    tmp_path: Path, crops: list[np.ndarray]
) -> None:
    """Before: crops named with old times were deleted at once by the retention purge,
    and names dated in the future left the windows empty."""
    folder = tmp_path / "probe"
    folder.mkdir()
    config = _config(tmp_path, tmp_path / "state", folder, extra='[store]\nretention = "1d"\n')
    for index in range(30):
        write_like_probe(folder, f"20010101T0000{index:02d}Z.png", crops[index % len(crops)])
    for index in range(30):
        write_like_probe(folder, f"20990101T0000{index:02d}Z.png", crops[index % len(crops)])
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        assert wait_for(lambda: len(export(config)) >= 60, timeout=90)
        daemon.terminate()
        daemon.start()  # the purge runs at every start: nothing may go
        time.sleep(5)
        windows = export(config, "windows")
        assert daemon.terminate() == 0
    rows = export(config)
    assert len(rows) == 60
    now = time.time()
    future = [r for r in rows if r["key"].startswith("2099")]
    assert len(future) == 30
    # Export writes ISO times; all of the future ones are now, within minutes.
    for row in future:
        ts = datetime.fromisoformat(row["ts"].replace("Z", "+00:00")).timestamp()
        assert abs(ts - now) < 600, row
    # The future-named frames count in the live windows (the old-named ones are history).
    assert max(int(w["frames"]) for w in windows) >= 30
    assert any(e.get("event") == "probe_file_time_in_future" for e in _log_events(daemon))


# -- item 6: retained commands ------------------------------------------------------------


def _mosquitto_pub(port: int, topic: str, body: dict[str, Any], *, retain: bool) -> None:
    """Publish as an operator's tool would: mosquitto_pub, QoS 1, retained or not."""
    flags = ["-r"] if retain else []
    subprocess.run(
        ["mosquitto_pub", "-p", str(port), "-t", topic, *flags, "-q", "1", "-m", json.dumps(body)],
        check=True,
        timeout=10,
    )


def test_a_retained_command_is_refused_with_the_reason_and_never_executed(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """Before: a retained cmd/batch start was executed again at every (re)connect."""
    folder = tmp_path / "probe"
    folder.mkdir()
    config = _config(tmp_path, tmp_path / "state", folder, mqtt_port=broker.port)
    topic = f"{PREFIX}/R1/cmd/batch"
    command = {"action": "start", "batch_id": "B-retained", "who": "op", "request_id": "r1"}
    _mosquitto_pub(broker.port, topic, command, retain=True)
    with (
        Subscriber(broker.port, [f"{PREFIX}/R1/cmd/reply", f"{PREFIX}/R1/events"]) as sub,
        DaemonProcess(config, tmp_path / "daemon.log") as daemon,
    ):
        for _ in range(2):  # a restart replays the retained message again
            daemon.start()
            assert sub.wait_for(
                lambda got: len([m for m in got if m.topic.endswith("cmd/reply")]) >= 1,
                timeout=60,
            )
            daemon.terminate()
            replies = [m.json() for m in sub.received if m.topic.endswith("cmd/reply")]
            sub.clear()
            assert len(replies) == 1
            assert replies[0]["accepted"] is False
            assert replies[0]["request_id"] == "r1"
            assert "retained command ignored" in replies[0]["reason"]
            assert "mosquitto_pub -r -n" in replies[0]["reason"]
        # The same command sent live (not retained) is executed, once.
        daemon.start()  # subscribed once the retained command's refusal comes back
        assert sub.wait_for(
            lambda got: len([m for m in got if m.topic.endswith("cmd/reply")]) >= 1, timeout=60
        )
        live = {**command, "batch_id": "B-live", "request_id": "r2"}
        _mosquitto_pub(broker.port, topic, live, retain=False)
        assert sub.wait_for(
            lambda got: any(
                m.topic.endswith("cmd/reply") and m.json()["request_id"] == "r2" for m in got
            ),
            timeout=30,
        )
        assert daemon.terminate() == 0
        accepted = [m.json() for m in sub.received if m.topic.endswith("cmd/reply")]
        batches = [m.json() for m in sub.received if m.topic.endswith("/events")]
    assert [r["accepted"] for r in accepted if r["request_id"] == "r2"] == [True]
    assert [e["batch"] for e in batches if e.get("type") == "batch"] == ["B-live"]


# -- item 13: a passing read error is retried, not recorded ------------------------------


def _lowest_free_descriptor(pid: int) -> int:
    """A soft RLIMIT_NOFILE of this refuses every new descriptor (the limit bounds the
    number a new one gets, and a worker process's numbers have gaps)."""
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(fd for fd in range(len(used) + 1) if fd not in used)


def test_files_unreadable_for_a_while_are_retried_not_recorded_as_failed(
    tmp_path: Path, crops: list[np.ndarray]
) -> None:
    """The daemon runs out of descriptors (the limit of each of its processes, worker
    processes included, lowered with prlimit while it runs): files that cannot be opened
    wait and are stored once descriptors are back. Before: each was recorded for good as
    'error/unreadable: Too many open files'."""
    folder = tmp_path / "probe"
    folder.mkdir()
    config = _config(tmp_path, tmp_path / "state", folder)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        write_like_probe(folder, "first.png", crops[0])
        assert wait_for(lambda: len(export(config)) >= 1, timeout=90)
        assert daemon.process is not None
        limits = {
            pid: resource.prlimit(pid, resource.RLIMIT_NOFILE)
            for pid in process_tree(daemon.process.pid)
        }
        for pid, (_, hard) in limits.items():
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (_lowest_free_descriptor(pid), hard))
        try:
            for index in range(10):
                write_like_probe(folder, f"starved_{index}.png", crops[index])
            assert wait_for(lambda: "probe_file_read_retrying" in daemon.log_text(), timeout=30)
            time.sleep(3)
        finally:
            for pid, limit in limits.items():
                with contextlib.suppress(ProcessLookupError):  # a worker replaced meanwhile
                    resource.prlimit(pid, resource.RLIMIT_NOFILE, limit)
        assert wait_for(lambda: len(export(config)) >= 11, timeout=120)
        assert daemon.terminate() == 0
    rows = export(config)
    assert sorted(r["key"] for r in rows) == ["first.png"] + [f"starved_{i}.png" for i in range(10)]
    assert {r["status"] for r in rows} == {"ok"}


# -- item 14: a damaged store file ---------------------------------------------------------


def test_a_damaged_store_stops_start_up_with_the_fix_and_no_traceback(tmp_path: Path) -> None:
    folder = tmp_path / "probe"
    folder.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    (state / DB_FILE).write_bytes(b"this is not a database\n" * 200)
    config = _config(tmp_path, state, folder)
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 65, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert f"mv {state / DB_FILE} {state / DB_FILE}.damaged" in result.stderr
    exported = subprocess.run(
        [sys.executable, "-m", "monitor", "export", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert exported.returncode == 65
    assert "Traceback" not in exported.stderr
