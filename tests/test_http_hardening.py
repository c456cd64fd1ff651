"""The HTTP server under abuse, against the real daemon and its real aiohttp server.

Idle, never-used and slow connections are closed by the server's timeouts; a connection
limit makes room by closing the longest idle connection and refuses a new one only when
every connection is busy; with the daemon's descriptors exhausted, failed accepts are
counted and logged once per interval with a count instead of a traceback each, and the
daemon stores frames again once the connections go. A newline in a file name does not
break /frame.jpg, deeply nested JSON is a 400, wrong tokens are throttled per peer (at
/login and as Bearer headers alike), and a weak token stops start-up with exit 78.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import resource
import secrets
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import cv2
import numpy as np
import pytest

from monitor.config.http import MIN_TOKEN_BITS, estimate_token_bits, token_weakness
from monitor.config.settings import EX_CONFIG
from monitor.daemon import Daemon
from monitor.simulator import CropSimulator
from monitor.web.throttle import LOGIN_BURST, FailureThrottle
from tests.daemon_process import DaemonProcess, export, wait_for, write_like_probe
from tests.mosquitto import free_port
from tests.test_http import CSRF, TOKEN, call, get_json, metric_samples, settings_for

DROPPED = "crystal_monitor_http_connections_dropped_total"
ACK = "/api/probes/R1/alarms/pg_high/acknowledge"


def _raise_descriptor_limit(wanted: int) -> None:
    """This process (and the daemons it starts) may hold `wanted` descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {wanted} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _dropped(samples: dict[Any, float], reason: str) -> float:
    return samples[(DROPPED, frozenset({("reason", reason)}))]


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True when the server closed `sock` (end of stream or reset) within `timeout`,
    having sent nothing on it."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    assert data == b"", data  # an idle connection is never answered, only closed
    return True


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def _request_from(
    source: str, port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One GET from the loopback address `source` (127.0.0.2 ... are other peers)."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=30, source_address=(source, 0)
    )
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@contextlib.contextmanager
def _serving(tmp_path: Path, http: dict[str, Any]) -> Iterator[tuple[Daemon, str, Path]]:
    """An in-process daemon with its HTTP server: (daemon, base URL, watched folder)."""
    folder = tmp_path / "probe"
    folder.mkdir()
    port = free_port()
    daemon = Daemon(settings_for(tmp_path / "state", folder, port, http))
    daemon.start()
    try:
        yield daemon, f"http://127.0.0.1:{port}", folder
    finally:
        daemon.stop()


# -- item 9: a newline in a file name -------------------------------------------------------


def test_a_newline_in_a_file_name_still_serves_its_frame_jpeg(tmp_path: Path) -> None:
    """The key goes into the X-Frame-Key header percent-encoded; it was put there raw, and
    aiohttp's header-injection check then dropped the connection without an answer."""
    with _serving(tmp_path, {}) as (daemon, base, folder):
        name = "crop\nsecond line\r.png"
        crop = CropSimulator(seed=4).render("CEX")
        write_like_probe(folder, name, crop)
        assert wait_for(lambda: daemon.recorder.recorded == 1, timeout=60)
        status, listing = get_json(f"{base}/api/probes/R1/frames")
        assert status == 200 and [frame["key"] for frame in listing["frames"]] == [name]

        status, headers, body = call(f"{base}/api/probes/R1/frame.jpg")
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        assert headers["X-Frame-Key"] == "crop%0Asecond line%0D.png"
        assert unquote(headers["X-Frame-Key"]) == name
        image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert image is not None and image.shape == crop.shape[:2]

        status, headers, _ = call(f"{base}/api/probes/R1/frame.jpg?key={quote(name)}")
        assert status == 200 and unquote(headers["X-Frame-Key"]) == name
        assert call(f"{base}/healthz")[0] == 200


# -- item 10: deep JSON --------------------------------------------------------------------


def test_deeply_nested_json_is_a_400_and_a_large_body_a_413(tmp_path: Path) -> None:
    with _serving(tmp_path, {}) as (_daemon, base, _folder):
        json_headers = {"Content-Type": "application/json", **CSRF}
        deep_list = b"[" * 30_000 + b"]" * 30_000
        deep_object = b'{"who": ' * 6_000 + b"1" + b"}" * 6_000
        for path in (ACK, "/api/probes/R1/alarms/pg_high/shelve"):
            for body in (deep_list, deep_object):
                status, _, answer = call(
                    f"{base}{path}", method="POST", headers=json_headers, body=body
                )
                assert status == 400, (path, answer[:200])
                assert "nested too deeply" in json.loads(answer)["error"]
        large = b'{"who": "' + b"x" * 70_000 + b'"}'
        status, _, answer = call(f"{base}{ACK}", method="POST", headers=json_headers, body=large)
        assert status == 413, answer[:200]
        # The server is still well: an ordinary action is answered (pg_high is not active).
        status, _, answer = call(
            f"{base}{ACK}", method="POST", headers=json_headers, body=b'{"who": "anna"}'
        )
        assert status == 409 and json.loads(answer)["accepted"] is False


# -- item 11: wrong tokens and weak ones ----------------------------------------------------


def test_wrong_tokens_are_throttled_per_peer_at_login_and_as_bearer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CM_TEST_HTTP_TOKEN", TOKEN)
    with _serving(tmp_path, {"token_env": "CM_TEST_HTTP_TOKEN"}) as (daemon, base, _folder):
        port = int(base.rsplit(":", 1)[1])
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        # A few wrong tries are answered as before, then the peer waits.
        for index in range(LOGIN_BURST):
            assert call(f"{base}/login?token=wrong-{index}")[0] == 401
        status, headers, body = call(f"{base}/login?token=wrong-again")
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert b"Too many wrong tokens from this address" in body
        # While it waits its tokens are not even checked: the right one is no way out,
        # neither at /login nor as a Bearer header; /healthz does not care.
        assert call(f"{base}/login?token={TOKEN}")[0] == 429
        status, headers, body = call(f"{base}/api/state", headers=bearer)
        assert status == 429 and "try again in" in json.loads(body)["error"]
        assert call(f"{base}/healthz")[0] == 200
        # A deeply nested JSON body at /login is no way to a 500 either.
        status, _, _ = call(
            f"{base}/login",
            method="POST",
            headers={"Content-Type": "application/json"},
            body=b"[" * 30_000 + b"]" * 30_000,
        )
        assert status == 200  # no token in a form: the login page

        # Another peer is not affected: it logs in at once and reads the counters.
        status, headers, _ = _request_from("127.0.0.2", port, f"/login?token={TOKEN}")
        assert status == 303 and headers["Location"] == "/"
        status, _, text = _request_from("127.0.0.2", port, "/metrics", bearer)
        assert status == 200
        samples = metric_samples(text.decode())
        assert samples[("crystal_monitor_http_token_failures_total", frozenset())] == LOGIN_BURST
        assert samples[("crystal_monitor_http_throttled_total", frozenset())] == 3

        # Wrong Bearer tokens count towards the same throttle as wrong logins.
        wrong = {"Authorization": "Bearer not-the-token-0123456789"}
        for _ in range(LOGIN_BURST):
            assert _request_from("127.0.0.3", port, "/api/state", wrong)[0] == 401
        assert _request_from("127.0.0.3", port, "/login?token=guess")[0] == 429
        assert _request_from("127.0.0.3", port, "/api/state", bearer)[0] == 429

        # A successful login forgets the peer's failures.
        for index in range(LOGIN_BURST - 1):
            assert _request_from("127.0.0.4", port, f"/login?token=typo-{index}")[0] == 401
        assert _request_from("127.0.0.4", port, f"/login?token={TOKEN}")[0] == 303
        for index in range(LOGIN_BURST):
            assert _request_from("127.0.0.4", port, f"/login?token=again-{index}")[0] == 401
        assert _request_from("127.0.0.4", port, "/login?token=once-more")[0] == 429
        assert daemon.web is not None
        assert daemon.web.counters.token_failures == 3 * LOGIN_BURST + LOGIN_BURST - 1


def test_the_throttle_refills_at_its_rate_and_its_peer_table_stays_bounded() -> None:
    now = [1000.0]
    throttle = FailureThrottle(burst=3, refill_s=10.0, max_peers=100, clock=lambda: now[0])
    assert [throttle.failed("10.0.0.1") for _ in range(3)] == [False, False, True]
    assert throttle.retry_after("10.0.0.1") == 10
    now[0] += 4.0
    assert throttle.retry_after("10.0.0.1") == 6
    now[0] += 6.0
    assert throttle.retry_after("10.0.0.1") == 0  # one more try earned
    assert throttle.failed("10.0.0.1") is True
    assert throttle.retry_after("10.0.0.1") == 10
    now[0] += 30.0
    assert throttle.retry_after("10.0.0.1") == 0 and len(throttle) == 0  # full again: forgotten
    throttle.failed("10.0.0.1")
    throttle.succeeded("10.0.0.1")
    assert len(throttle) == 0
    for index in range(10_000):
        throttle.failed(f"10.1.{index // 256}.{index % 256}")
        assert len(throttle) <= 100
    assert len(throttle) == 100


def test_token_strength_rules() -> None:
    for _ in range(50):
        assert token_weakness(secrets.token_urlsafe(32)) is None
        assert token_weakness(secrets.token_hex(16)) is None
    assert token_weakness(TOKEN) is None
    assert estimate_token_bits(secrets.token_urlsafe(32)) > 200
    weak = {
        "short": "the token has 5 characters, fewer than 16",
        "a" * 40: "only 1 distinct characters",
        "ab" * 20: "only 2 distinct characters",
        "1234567890123456": "too easy to guess (about 33 bits",
        "abcdefgh" * 4: "too easy to guess (about 38 bits",
        "0123456789012345678901234": "too easy to guess",
    }
    for token, problem in weak.items():
        found = token_weakness(token)
        assert found is not None and problem in found, (token, found)
    assert (
        estimate_token_bits("0123456789012345678901234") < MIN_TOKEN_BITS
    )  # digits: 3.3 bits each


def test_a_weak_token_stops_start_up_with_exit_78_naming_the_key_and_the_fix(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"

[http]
enabled = true
host = "0.0.0.0"
port = {free_port()}
token_env = "CM_TEST_WEAK_TOKEN"

[[probes]]
id = "R1"
source = {{ type = "folder", path = "{tmp_path}" }}
"""
    )
    for token, problem in (
        ("x" * 32, "has only 1 distinct characters"),
        ("1234567890123456", "is too easy to guess"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "monitor", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "CM_TEST_WEAK_TOKEN": token},
        )
        assert result.returncode == EX_CONFIG, result.stderr
        assert f"http.token_env: the token {problem}" in result.stderr, result.stderr
        assert "secrets.token_urlsafe(32)" in result.stderr
        assert not (tmp_path / "state").exists()


# -- item 2: timeouts and the connection limit ----------------------------------------------


def test_a_slow_header_is_cut_off_and_the_limit_evicts_idle_before_refusing(
    tmp_path: Path,
) -> None:
    http = {"max_connections": 8, "header_timeout": "2s", "idle_timeout": "60s"}
    with _serving(tmp_path, http) as (daemon, base, _folder):
        assert daemon.web is not None
        counters = daemon.web.counters
        port = int(base.rsplit(":", 1)[1])

        # A client that trickles header lines (slowloris) is cut off by header_timeout,
        # long before idle_timeout.
        slow = _connect(port)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = False
        deadline = time.monotonic() + 30
        while not closed and time.monotonic() < deadline:
            try:
                slow.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            closed = _closed_by_server(slow, 0.5)
        slow.close()
        assert closed
        assert counters.dropped["header_timeout"] == 1
        assert wait_for(lambda: counters.open_connections == 0, timeout=10, interval=0.05)

        # At the limit a new connection closes the longest idle one, so idle connections
        # cannot lock /healthz out.
        idle = [_connect(port) for _ in range(8)]
        assert wait_for(lambda: counters.open_connections == 8, timeout=10, interval=0.05)
        newcomer = _connect(port)
        assert _closed_by_server(idle[0], 10)
        assert call(f"{base}/healthz")[0] == 200  # made room by closing idle[1]
        assert _closed_by_server(idle[1], 10)
        assert counters.dropped["evicted"] == 2 and counters.dropped["over_limit"] == 0
        for sock in [*idle, newcomer]:
            sock.close()
        assert wait_for(lambda: counters.open_connections == 0, timeout=10, interval=0.05)

        # When every connection is busy with a request (here: bodies that never finish),
        # a new connection is closed at once; the bodies get 408 after header_timeout.
        busy = []
        for _ in range(8):
            sock = _connect(port)
            sock.sendall(
                f"POST {ACK} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                "X-Requested-By: test\r\nContent-Length: 100\r\n\r\n{{".encode()
            )
            busy.append(sock)
        assert wait_for(lambda: counters.requests_in_progress == 8, timeout=10, interval=0.05)
        refused = _connect(port)
        assert _closed_by_server(refused, 10)
        refused.close()
        assert counters.dropped["over_limit"] == 1 and counters.dropped["evicted"] == 2
        for sock in busy:
            sock.settimeout(30)
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
            sock.close()
        assert counters.dropped["body_timeout"] == 8
        samples = metric_samples(call(f"{base}/metrics")[2].decode())
        assert [_dropped(samples, r) for r in ("header_timeout", "evicted", "over_limit")] == [
            1,
            2,
            1,
        ]


def _daemon_config(tmp_path: Path, port: int, http: str) -> tuple[Path, Path]:
    folder = tmp_path / "probe"
    folder.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
log_format = "json"
shutdown_grace = "5s"

[aggregation]
publish_interval = "1s"

[http]
enabled = true
port = {port}
{http}

[[probes]]
id = "R1"
sampling = "whole"
[probes.source]
type = "folder"
path = "{folder}"
settle_time = "200ms"
rescan_interval = "1s"
"""
    )
    return config, folder


def _wait_healthy(base: str, daemon: DaemonProcess) -> None:
    def answers() -> bool:
        assert daemon.alive(), daemon.log_text()[-3000:]
        try:
            return call(f"{base}/healthz")[0] == 200
        except OSError:
            return False

    assert wait_for(answers, timeout=120), daemon.log_text()[-3000:]
    # The web server answers before the stages after it (the worker processes) have
    # started; a test that starves or floods the daemon waits for all of them.
    started = wait_for(lambda: '"daemon_started"' in daemon.log_text(), timeout=60, interval=0.2)
    assert started, daemon.log_text()[-3000:]


@pytest.mark.slow
def test_a_thousand_idle_connections_for_a_minute_are_timed_out_while_frames_are_stored(
    tmp_path: Path,
) -> None:
    """Acceptance: 1,000 idle connections held against the daemon for 60 s (each one the
    server closes is opened again). The server closes them by its idle timeout,
    /healthz answers throughout, and the frames dropped meanwhile are all stored."""
    _raise_descriptor_limit(4096)
    port = free_port()
    idle_timeout = 3.0
    config, folder = _daemon_config(
        tmp_path, port, f'idle_timeout = "{idle_timeout}s"\nmax_connections = 2000'
    )
    base = f"http://127.0.0.1:{port}"
    simulator = CropSimulator(seed=8)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        _wait_healthy(base, daemon)
        selector = selectors.DefaultSelector()
        opened: dict[socket.socket, float] = {}

        def open_one() -> None:
            sock = _connect(port)
            sock.setblocking(False)
            opened[sock] = time.monotonic()
            selector.register(sock, selectors.EVENT_READ)

        for _ in range(1000):
            open_one()
        first_generation = set(opened)
        lifetimes: list[float] = []
        health: list[int] = []
        health_latency: list[float] = []
        frames: list[str] = []
        end = time.monotonic() + 60
        next_health = next_frame = time.monotonic()
        while time.monotonic() < end:
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(1)
                except ConnectionResetError:
                    data = b""
                assert data == b""  # closed, never answered
                lifetimes.append(time.monotonic() - opened.pop(sock))
                first_generation.discard(sock)
                selector.unregister(sock)
                sock.close()
                open_one()
            now = time.monotonic()
            if now >= next_health:
                health.append(call(f"{base}/healthz")[0])
                health_latency.append(time.monotonic() - now)
                next_health = now + 2.0
            if now >= next_frame and len(frames) < 20:
                name = f"during_{len(frames):02d}.png"
                write_like_probe(folder, name, simulator.render("CEX" if len(frames) % 4 else "PG"))
                frames.append(name)
                next_frame = now + 2.0
        # On a loaded machine the loop above may fall behind its schedule: the rest of
        # the frames go in while the thousand connections are still held.
        while len(frames) < 20:
            name = f"during_{len(frames):02d}.png"
            write_like_probe(folder, name, simulator.render("CEX" if len(frames) % 4 else "PG"))
            frames.append(name)
        assert len(opened) == 1000
        for sock in list(opened):
            selector.unregister(sock)
            sock.close()
        selector.close()

        assert not first_generation  # every one of the first thousand was closed by the server
        assert len(lifetimes) >= 5000, len(lifetimes)
        assert min(lifetimes) >= idle_timeout * 0.5  # by the timer, not by anything sooner
        assert len(health) >= 15 and set(health) == {200}, health
        assert len(frames) == 20
        assert wait_for(lambda: len(export(config)) >= 20, timeout=120, interval=1)
        rows = {row["key"]: row for row in export(config)}
        assert sorted(rows) == frames and {row["status"] for row in rows.values()} == {"ok"}
        samples = metric_samples(call(f"{base}/metrics")[2].decode())
        assert _dropped(samples, "idle_timeout") >= len(lifetimes)
        assert _dropped(samples, "over_limit") == 0 and _dropped(samples, "evicted") == 0
        assert daemon.terminate() == 0
    print(  # the measured figures, shown with -s
        f"closed by idle timeout: {len(lifetimes)}, lifetime min {min(lifetimes):.2f} s, "
        f"max {max(lifetimes):.2f} s; /healthz polls: {len(health)}, latency median "
        f"{sorted(health_latency)[len(health_latency) // 2] * 1000:.0f} ms, max "
        f"{max(health_latency) * 1000:.0f} ms"
    )


def _open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
def test_out_of_descriptors_accept_errors_are_logged_once_per_interval_with_a_count(
    tmp_path: Path,
) -> None:
    """The daemon's descriptor limit lowered to 80 over what it uses, 600 connections: the
    failed accepts give a few log lines with counts (no traceback), the metric counts them,
    and once the connections are gone the daemon serves and stores frames again."""
    _raise_descriptor_limit(4096)
    port = free_port()
    config, folder = _daemon_config(tmp_path, port, 'idle_timeout = "120s"\nmax_connections = 4000')
    base = f"http://127.0.0.1:{port}"
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        _wait_healthy(base, daemon)
        assert daemon.process is not None
        pid = daemon.process.pid
        limit = _open_descriptors(pid) + 80
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
        flood: list[socket.socket] = []
        for _ in range(600):
            sock = socket.socket()
            sock.setblocking(False)
            code = sock.connect_ex(("127.0.0.1", port))
            assert code in (0, errno.EINPROGRESS), code
            flood.append(sock)
        assert wait_for(lambda: "http_accept_failed" in daemon.log_text(), timeout=30)
        time.sleep(13)  # the fault lasts longer than one log interval (10 s)
        for sock in flood:
            sock.close()
        assert wait_for(lambda: _open_descriptors(pid) < limit - 40, timeout=60)
        _wait_healthy(base, daemon)

        simulator = CropSimulator(seed=9)
        names = [f"after_{index}.png" for index in range(5)]
        for name in names:
            write_like_probe(folder, name, simulator.render("CEX"))
        assert wait_for(
            lambda: {row["key"] for row in export(config)} >= set(names), timeout=120, interval=1
        )
        samples = metric_samples(call(f"{base}/metrics")[2].decode())
        accept_errors = samples[("crystal_monitor_http_accept_errors_total", frozenset())]
        assert daemon.terminate() == 0

    lines = daemon.log_text().splitlines()
    failed = [json.loads(line) for line in lines if '"http_accept_failed"' in line]
    assert 2 <= len(failed) <= 3, failed
    assert {line["error"] for line in failed} == {"Too many open files"}
    assert failed[0]["count"] == 1 and failed[1]["count"] >= 2
    assert "LimitNOFILE" in failed[0]["fix"]
    assert sum(line["count"] for line in failed) <= accept_errors
    assert not [line for line in lines if "Traceback" in line or "out of system resource" in line]
    print(  # the measured figures, shown with -s
        f"descriptor limit {limit}: {accept_errors:.0f} failed accepts, {len(failed)} log "
        f"lines, {len(lines)} log lines in all"
    )
