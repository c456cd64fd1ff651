"""systemd integration: sd_notify datagrams on a real socket, the watchdog policy, the
daemon's READY/WATCHDOG/STOPPING sequence, and the shipped units linted by systemd-analyze."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog

from monitor.config.settings import load_settings
from monitor.daemon import Daemon
from monitor.runtime.systemd_notify import SystemdNotifier, watchdog_interval
from monitor.runtime.watchdog_feeder import WatchdogFeeder, WatchdogPolicy, feeder_interval
from tests.notify_listener import Listener

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
HAVE_ANALYZE = os.access(SYSTEMD_ANALYZE, os.X_OK)


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"crystal-monitor-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    yield Listener(sock, "@" + name)
    sock.close()


# -- the notifier --------------------------------------------------------------------


def test_each_helper_sends_one_datagram_with_exactly_its_lines(listener: Listener) -> None:
    notifier = SystemdNotifier(listener.name)
    assert notifier.ready()
    assert listener.receive() == {"READY": "1"}
    notifier.ready(status="running: 2 probe(s)")
    assert listener.receive() == {"READY": "1", "STATUS": "running: 2 probe(s)"}
    notifier.status("12.5 frames/s, queue 3")
    assert listener.receive() == {"STATUS": "12.5 frames/s, queue 3"}
    notifier.watchdog()
    assert listener.receive() == {"WATCHDOG": "1"}
    notifier.extend_timeout(120)
    assert listener.receive() == {"EXTEND_TIMEOUT_USEC": "120000000"}
    notifier.stopping()
    assert listener.receive() == {"STOPPING": "1"}
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    reloading = listener.receive()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert set(reloading) == {"RELOADING", "MONOTONIC_USEC"} and reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    notifier.notify(STATUS="a", ERRNO=5)
    assert listener.receive() == {"STATUS": "a", "ERRNO": "5"}
    notifier.close()


def test_abstract_namespace_socket_named_with_at_sign(abstract_listener: Listener) -> None:
    notifier = SystemdNotifier(abstract_listener.name)
    notifier.send({"READY": "1", "STATUS": "up"})
    assert abstract_listener.receive() == {"READY": "1", "STATUS": "up"}


def test_unset_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier.from_environment()
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.stopping()


def test_notify_socket_is_read_from_the_environment(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
    SystemdNotifier.from_environment().watchdog()
    assert listener.receive() == {"WATCHDOG": "1"}


def test_send_errors_are_logged_once_and_never_raised(tmp_path: Path) -> None:
    notifier = SystemdNotifier(str(tmp_path / "nobody-listens"))
    with structlog.testing.capture_logs() as logs:
        assert not notifier.ready()
        assert not notifier.watchdog()
    assert [entry["event"] for entry in logs] == ["systemd_notify_failed"]


def test_watchdog_interval_from_usec_and_pid() -> None:
    me = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 60.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(me)}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(me + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}, pid=1) == 2.0
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


# -- the watchdog policy (pure) ----------------------------------------------------------


def test_policy_feeds_while_frames_finish() -> None:
    policy = WatchdogPolicy(stall_after_s=30)
    assert policy.should_feed(now=1000.0, last_progress=999.5, backlog=40)
    assert policy.should_feed(now=1000.0, last_progress=970.0, backlog=40)


def test_policy_feeds_an_idle_pipeline() -> None:
    """No frames for an hour but nothing waiting: the probe is idle, not the pipeline stuck."""
    assert WatchdogPolicy(stall_after_s=30).should_feed(now=5000.0, last_progress=1400.0, backlog=0)


def test_policy_stops_feeding_a_stalled_pipeline_with_work_waiting() -> None:
    policy = WatchdogPolicy(stall_after_s=30)
    assert not policy.should_feed(now=1000.0, last_progress=969.0, backlog=1)
    assert not policy.should_feed(now=1000.0, last_progress=0.0, backlog=64)


def test_feeder_interval_is_half_the_watchdog_and_status_at_least_every_5_s() -> None:
    assert feeder_interval(2.0) == 1.0
    assert feeder_interval(60.0) == 5.0
    assert feeder_interval(None) == 5.0


def test_feeder_sends_status_and_earned_watchdog_in_one_datagram(listener: Listener) -> None:
    progress = [100.0, 5]
    feeder = WatchdogFeeder(
        SystemdNotifier(listener.name),
        WatchdogPolicy(stall_after_s=10),
        lambda: (progress[0], int(progress[1])),
        lambda: "7.0 frames/s",
        interval_s=60,
        monotonic=lambda: 105.0,
    )
    feeder.tick()
    assert listener.receive() == {"STATUS": "7.0 frames/s", "WATCHDOG": "1"}
    progress[0] = 90.0  # 15 s without progress, 5 frames waiting
    feeder.tick()
    assert listener.receive() == {"STATUS": "7.0 frames/s"}
    status_only = WatchdogFeeder(
        SystemdNotifier(listener.name), None, lambda: (0.0, 9), lambda: "idle", interval_s=60
    )
    status_only.tick()
    assert listener.receive() == {"STATUS": "idle"}


# -- the daemon under a (simulated) systemd ------------------------------------------------


def _settings(state: Path):  # type: ignore[no-untyped-def]
    return load_settings(
        data={
            "daemon": {"state_dir": str(state), "shutdown_grace": "2s"},
            "aggregation": {"publish_interval": "0.5s"},
            "probes": [
                {
                    "id": "sim",
                    "sampling": "whole",
                    "source": {
                        "type": "simulated",
                        "mode": "crop",
                        "fps": 30,
                        "profile": "constant:0.5",
                    },
                }
            ],
        }
    )


def test_daemon_ready_after_start_feeds_while_progressing_starves_when_stalled(
    tmp_path: Path, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # feeder every 1 s, stall after 2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    daemon = Daemon(_settings(tmp_path / "state"))
    release = threading.Event()
    try:
        daemon.start()
        ready, before = listener.wait_for("READY", timeout=5)
        assert ready["READY"] == "1" and "STATUS" in ready
        assert before[0]["EXTEND_TIMEOUT_USEC"] == "120000000"  # sent before the model load
        assert all("WATCHDOG" not in lines for lines in before)

        flowing = listener.collect(3.5)
        assert sum("WATCHDOG" in lines for lines in flowing) >= 2
        assert daemon.recorder.recorded > 0
        assert re.match(r"[\d.]+ frames/s, queue \d+", flowing[-1]["STATUS"])

        infer = daemon.backend.infer

        def blocked_infer(batch: np.ndarray) -> np.ndarray:
            release.wait(timeout=30)
            return infer(batch)

        monkeypatch.setattr(daemon.backend, "infer", blocked_infer)
        # A batch in progress may still finish; then 2 s without progress (datagrams sent
        # meanwhile are read and dropped here, so `stalled` holds only later ones).
        listener.collect(4.0)
        stalled = listener.collect(3.0)
        assert len(stalled) >= 2 and all("STATUS" in lines for lines in stalled)
        assert not any("WATCHDOG" in lines for lines in stalled), stalled
    finally:
        release.set()
        daemon.stop()
    after_stop = listener.collect(0.5)
    stopping = [lines for lines in after_stop if "STOPPING" in lines]
    assert stopping, after_stop
    assert after_stop.index(stopping[0]) == len(after_stop) - 1  # nothing after STOPPING=1


# -- the units -----------------------------------------------------------------------------


def _unit_copies(tmp_path: Path) -> dict[str, Path]:
    """The units, with ExecStart pointed at a dummy executable so `verify` can find it."""
    dummy = tmp_path / "crystal-monitor"
    dummy.write_text("#!/bin/sh\nexit 0\n")
    dummy.chmod(0o755)
    copies = {}
    for unit, name in (
        ("crystal-monitor.service", "crystal-monitor.service"),
        ("crystal-monitor@.service", "crystal-monitor@r101.service"),
    ):
        text = (UNITS / unit).read_text()
        assert "ExecStart=/opt/crystal-monitor/venv/bin/crystal-monitor run --config " in text
        copy = tmp_path / name
        copy.write_text(text.replace("/opt/crystal-monitor/venv/bin/crystal-monitor", str(dummy)))
        copies[unit] = copy
    return copies


@pytest.mark.skipif(not HAVE_ANALYZE, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    for unit, copy in _unit_copies(tmp_path).items():
        result = subprocess.run(
            [SYSTEMD_ANALYZE, "verify", "--man=no", str(copy)],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert result.returncode == 0, (unit, result.stderr)
        assert str(copy) not in result.stderr, (unit, result.stderr)  # no warning on our file


@pytest.mark.skipif(not HAVE_ANALYZE, reason="systemd-analyze is not installed")
def test_units_expose_at_most_2_0_to_systemd_analyze_security(tmp_path: Path) -> None:
    for unit, copy in _unit_copies(tmp_path).items():
        result = subprocess.run(
            [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(copy)],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        assert found, (unit, result.stdout[-2000:], result.stderr)
        assert float(found.group(1)) <= 2.0, (unit, found.group(0))


def test_template_unit_is_per_reactor() -> None:
    text = (UNITS / "crystal-monitor@.service").read_text()
    assert "--config /etc/crystal-monitor/%i.toml" in text
    assert "StateDirectory=crystal-monitor/%i\n" in text
    assert "CRYSTAL_MONITOR__DAEMON__STATE_DIR=%S/crystal-monitor/%i\n" in text


def test_units_raise_the_descriptor_limit_well_above_the_http_connection_limit() -> None:
    """1,024 descriptors (the default soft limit) ran out under idle connections and
    made frames unreadable: both units set LimitNOFILE=8192, and the HTTP server's
    default connection limit stays far below it."""
    from monitor.config.http import HttpConfig

    for unit in ("crystal-monitor.service", "crystal-monitor@.service"):
        text = (UNITS / unit).read_text()
        service = text.split("[Service]", 1)[1].split("[Install]", 1)[0]
        limits = re.findall(r"^LimitNOFILE=(\d+)$", service, flags=re.MULTILINE)
        assert limits == ["8192"], (unit, limits)
        assert HttpConfig().max_connections * 8 <= int(limits[0])
