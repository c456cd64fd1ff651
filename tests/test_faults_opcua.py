"""Fault injection against the OPC UA server (issue 11, items 8, 11 and 12).

A damaged server certificate, a burst of untrusted client certificates and a password
guesser, each against the real server with a real asyncua client: the daemon itself in a
subprocess for the certificate (start-up and exit code are what matter there), the
OpcUaPublisher for the rest.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from monitor.config.opcua import OpcUaConfig
from monitor.publishers.opcua import OpcUaPublisher
from monitor.publishers.opcua_certificates import write_files_atomically
from monitor.publishers.opcua_security import RepeatedLog
from monitor.publishers.opcua_users import LoginThrottle, write_user
from tests.test_opcua import (
    CLIENT_URI,
    NS,
    RecordingCommands,
    free_port,
    make_client_certificate,
    make_update,
)

SC = ua.StatusCodes


async def open_client(
    url: str,
    server_certificate: Path,
    pair: tuple[Path, Path],
    user: str | None = None,
    password: str | None = None,
) -> Client:
    """A Basic256Sha256 SignAndEncrypt client with the certificate `pair`, not connected."""
    client = Client(url, timeout=10)
    client.application_uri = CLIENT_URI
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        certificate=str(pair[0]),
        private_key=str(pair[1]),
        server_certificate=str(server_certificate),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    if user is not None:
        client.set_user(user)
    if password is not None:
        client.set_password(password)
    return client


async def login_status(
    url: str, server_certificate: Path, pair: tuple[Path, Path], user: str, password: str
) -> int:
    """Good when `user` could log in and read the server's state, else the refusal's code."""
    client = await open_client(url, server_certificate, pair, user, password)
    try:
        await client.connect()
    except ua.UaStatusCodeError as exc:
        return int(exc.code)
    try:
        await client.nodes.server_state.read_value()
    finally:
        await client.disconnect()
    return int(SC.Good)


# -- item 8: a damaged server certificate -------------------------------------------------


@dataclass
class Plant:
    """Files of a production-profile daemon: users, trusted client, OPC UA endpoint."""

    base: Path
    port: int
    client: tuple[Path, Path]
    users: Path
    trust_dir: Path

    @property
    def url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/crystal-monitor"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    def config(self, extra: str = "") -> Path:
        path = self.base / "config.toml"
        path.write_text(
            f"""
[daemon]
state_dir = "{self.state_dir}"
log_format = "json"
shutdown_grace = "2s"

[opcua]
enabled = true
endpoint = "{self.url}"
users_file = "{self.users}"
trust_dir = "{self.trust_dir}"
{extra}

[[probes]]
id = "R1"
source = {{ type = "simulated", mode = "crop", fps = 2, profile = "constant:0.1", seed = 3 }}
"""
        )
        return path


@pytest.fixture
def plant(tmp_path: Path) -> Plant:
    trust_dir = tmp_path / "trusted"
    client = make_client_certificate(tmp_path / "client", "scada")
    trust_dir.mkdir()
    (trust_dir / "scada.der").write_bytes(client[0].read_bytes())
    users = tmp_path / "users"
    write_user(users, "operator", "op-pass-1")
    return Plant(tmp_path, free_port(), client, users, trust_dir)


class DaemonRun:
    """`crystal-monitor run` in a subprocess; its stdout and stderr in one log file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "--config", str(config)],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_listening(self, timeout: float = 90.0) -> None:
        """Until the OPC UA server listens; fails with the log if the daemon exits first."""
        deadline = time.monotonic() + timeout
        while "opcua_listening" not in self.text():
            code = self.process.poll()
            assert code is None, f"daemon exited with {code}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"not listening:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def __enter__(self) -> DaemonRun:
        return self

    def __exit__(self, *exc: object) -> None:
        """Never leave a daemon running after a test, passed or failed."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def test_truncated_server_certificate_is_regenerated_with_a_warning_and_the_daemon_starts(
    plant: Plant,
) -> None:
    """The self-generated certificate cut to half its length (a crash while writing it)
    used to stop every later start with exit 1 and 'error parsing asn1 value': the
    daemon now makes a new pair, says so in a warning, and a client logs in with it."""
    config = plant.config()
    cert = plant.state_dir / "opcua" / "server_cert.der"
    key = plant.state_dir / "opcua" / "server_key.pem"
    with DaemonRun(config, plant.base / "first.log") as first:
        first.wait_listening()
        assert first.stop() == 0
    original = cert.read_bytes()
    cert.write_bytes(original[: len(original) // 2])

    with DaemonRun(config, plant.base / "second.log") as second:
        second.wait_listening()
        status = asyncio.run(login_status(plant.url, cert, plant.client, "operator", "op-pass-1"))
        assert status == SC.Good
        assert second.stop() == 0
    log = second.text()
    assert "Traceback" not in log
    warnings = [line for line in log.splitlines() if "opcua_server_cert_regenerated" in line]
    assert len(warnings) == 1, log[-3000:]
    assert '"level": "warning"' in warnings[0]
    assert "unreadable" in warnings[0] and str(cert) in warnings[0]
    regenerated = cert.read_bytes()
    assert regenerated != original and len(regenerated) > len(original) // 2
    assert key.stat().st_mode & 0o777 == 0o600
    assert sorted(path.name for path in cert.parent.iterdir() if path.is_file()) == [
        "server_cert.der",
        "server_key.pem",
    ]  # no temporary file left behind


def test_truncated_key_or_a_key_of_another_pair_is_regenerated(plant: Plant) -> None:
    """A key cut short, or one that does not belong to the certificate (a crash between
    writing the two files), is replaced by a new pair instead of failing start-up or
    serving a certificate whose key the server does not hold."""
    config = plant.config()
    cert = plant.state_dir / "opcua" / "server_cert.der"
    key = plant.state_dir / "opcua" / "server_key.pem"
    with DaemonRun(config, plant.base / "first.log") as first:
        first.wait_listening()
        assert first.stop() == 0
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key.write_bytes(
        stranger.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with DaemonRun(config, plant.base / "second.log") as second:
        second.wait_listening()
        status = asyncio.run(login_status(plant.url, cert, plant.client, "operator", "op-pass-1"))
        assert status == SC.Good
        assert second.stop() == 0
    assert "key does not match" in second.text()
    key.write_bytes(key.read_bytes()[:100])
    with DaemonRun(config, plant.base / "third.log") as third:
        third.wait_listening()
        status = asyncio.run(login_status(plant.url, cert, plant.client, "operator", "op-pass-1"))
        assert status == SC.Good
        assert third.stop() == 0
    assert "Traceback" not in third.text()
    assert "opcua_server_cert_regenerated" in third.text()


@pytest.mark.parametrize("damaged", ["certificate", "private_key"])
def test_damaged_operator_certificate_stops_start_up_with_exit_78_naming_the_file(
    plant: Plant, damaged: str
) -> None:
    """A certificate the operator configured is never replaced: start-up stops with the
    configuration exit code, a message naming the file and the fix, and no traceback."""
    mine = plant.base / "operator-pki"
    pair = make_client_certificate(mine, "server")
    target = pair[0] if damaged == "certificate" else pair[1]
    target.write_bytes(target.read_bytes()[:200])
    config = plant.config(f'certificate = "{pair[0]}"\nprivate_key = "{pair[1]}"')
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 78, output
    assert "Traceback" not in output
    assert f"opcua.{damaged}" in output and str(target) in output
    assert "replace" in output  # the fix: replace the file, or unset both keys
    assert target.read_bytes() == target.read_bytes()[:200]


# -- items 11 and 12: login throttling and the rejected-certificate folder -----------------


@dataclass
class Server:
    publisher: OpcUaPublisher
    url: str
    state_dir: Path
    trusted: tuple[Path, Path]
    base: Path

    @property
    def server_certificate(self) -> Path:
        return self.state_dir / "opcua" / "server_cert.der"

    @property
    def rejected_dir(self) -> Path:
        return self.state_dir / "opcua" / "rejected"


REJECTED_MAX = 5
MAX_FAILURES = 3
LOCKOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("faults-opcua")
    state_dir, trust_dir = base / "state", base / "trusted"
    trusted = make_client_certificate(base / "client", "trusted-client")
    trust_dir.mkdir()
    (trust_dir / "trusted-client.der").write_bytes(trusted[0].read_bytes())
    users = base / "users"
    write_user(users, "operator", "op-pass-1")
    url = f"opc.tcp://127.0.0.1:{free_port()}/crystal-monitor"
    config = OpcUaConfig(
        enabled=True,
        endpoint=url,
        namespace_uri=NS,
        users_file=users,
        trust_dir=trust_dir,
        rejected_max_files=REJECTED_MAX,
        login_max_failures=MAX_FAILURES,
        login_lockout=LOCKOUT_S,
        login_lockout_max=4 * LOCKOUT_S,
    )
    publisher = OpcUaPublisher(config, state_dir)
    publisher.start(RecordingCommands())
    publisher.publish_update(make_update("P1", ts=time.time()))
    try:
        yield Server(publisher, url, state_dir, trusted, base)
    finally:
        publisher.stop()


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def test_untrusted_certificates_leave_at_most_the_newest_n_files_logged_rate_limited(
    server: Server,
) -> None:
    """N + 20 clients with distinct untrusted certificates: every one is refused, the
    rejected folder keeps only the newest N (for the admin to trust one), each
    rejection is counted, and the log gets one line, not N + 20."""
    count = REJECTED_MAX + 20
    pairs = [make_client_certificate(server.base / "strangers", f"s{i}") for i in range(count)]

    async def scenario() -> list[int]:
        codes = []
        for pair in pairs:
            client = await open_client(
                server.url, server.server_certificate, pair, "operator", "op-pass-1"
            )
            with pytest.raises(ua.UaStatusCodeError) as refused:
                await client.connect()
            codes.append(int(refused.value.code))
        return codes

    with structlog.testing.capture_logs() as logs:
        codes = asyncio.run(scenario())
    assert codes == [SC.BadCertificateUntrusted] * count
    kept = sorted(path.read_bytes() for path in server.rejected_dir.iterdir())
    assert kept == sorted(pair[0].read_bytes() for pair in pairs[-REJECTED_MAX:])
    lines = events(logs, "opcua_client_cert_rejected")
    assert len(lines) == 1 and lines[0]["log_level"] == "warning"
    diagnostics = server.publisher.diagnostics()
    assert diagnostics["client_certs_rejected"] >= count
    assert diagnostics["rejected_files_deleted"] >= count - REJECTED_MAX


def test_repeated_wrong_passwords_lock_the_peer_out_then_the_right_one_works(
    server: Server,
) -> None:
    """After MAX_FAILURES wrong passwords from one address, even the right password is
    refused until the lockout ends; it then works. A wrong password after a lockout
    locks out for twice as long. Refusals are logged rate-limited and counted."""
    url, cert, pair = server.url, server.server_certificate, server.trusted

    async def attempt(password: str) -> int:
        return await login_status(url, cert, pair, "operator", password)

    async def until_accepted(timeout: float) -> int:
        """Retry the right password until accepted; returns how many were refused."""
        refused = 0
        deadline = time.monotonic() + timeout
        while await attempt("op-pass-1") != SC.Good:
            refused += 1
            assert time.monotonic() < deadline, "still locked out"
            await asyncio.sleep(0.1)
        return refused

    async def scenario() -> tuple[list[int], int, list[int], int]:
        wrong = [await attempt(f"guess-{i}") for i in range(MAX_FAILURES)]
        during = await attempt("op-pass-1")  # right password, locked out
        waited = await until_accepted(10 * LOCKOUT_S)
        # success forgets the failures: MAX_FAILURES - 1 wrong ones do not lock out
        again = [await attempt(f"guess-{i}") for i in range(MAX_FAILURES - 1)]
        assert await attempt("op-pass-1") == SC.Good
        # locked again, then one more failure after that lockout doubles it
        again += [await attempt(f"guess-{i}") for i in range(MAX_FAILURES)]
        await until_accepted(10 * LOCKOUT_S)
        return wrong, during, again, waited

    diagnostics_before = server.publisher.diagnostics()
    with structlog.testing.capture_logs() as logs:
        wrong, during, again, waited = asyncio.run(scenario())
    assert wrong == [SC.BadUserAccessDenied] * MAX_FAILURES
    assert during == SC.BadUserAccessDenied
    assert waited >= 0
    assert again == [SC.BadUserAccessDenied] * (2 * MAX_FAILURES - 1)
    lockouts = events(logs, "opcua_login_locked_out")
    assert [entry["seconds"] for entry in lockouts] == [LOCKOUT_S, LOCKOUT_S]
    assert all(entry["peer"] == "127.0.0.1" for entry in lockouts)
    refused = events(logs, "opcua_login_refused")
    assert 1 <= len(refused) < 2 * MAX_FAILURES  # rate-limited: not one line per attempt
    assert all(entry["log_level"] == "warning" for entry in refused)
    diagnostics = server.publisher.diagnostics()
    failed = diagnostics["logins_failed"] - diagnostics_before["logins_failed"]
    assert failed == 3 * MAX_FAILURES - 1
    assert diagnostics["login_lockouts"] - diagnostics_before["login_lockouts"] == 2


def test_lockout_doubles_for_each_failure_after_it_up_to_the_maximum(server: Server) -> None:
    """A peer that keeps guessing after each lockout waits 1, 2, 4, 4 lockout units."""
    url, cert, pair = server.url, server.server_certificate, server.trusted

    async def attempt(password: str) -> int:
        return await login_status(url, cert, pair, "operator", password)

    async def wait_unlocked(seconds: float) -> None:
        await asyncio.sleep(seconds + 0.1)

    async def scenario() -> None:
        for _ in range(MAX_FAILURES):
            assert await attempt("guess") == SC.BadUserAccessDenied
        for seconds in (LOCKOUT_S, 2 * LOCKOUT_S, 4 * LOCKOUT_S):
            await wait_unlocked(seconds)
            assert await attempt("guess") == SC.BadUserAccessDenied
        await wait_unlocked(4 * LOCKOUT_S)
        assert await attempt("op-pass-1") == SC.Good

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())
    lockouts = events(logs, "opcua_login_locked_out")
    assert [entry["seconds"] for entry in lockouts] == [
        LOCKOUT_S,
        2 * LOCKOUT_S,
        4 * LOCKOUT_S,
        4 * LOCKOUT_S,
    ]


# -- the pure parts, with an injected clock ------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_login_throttle_forgets_quiet_peers_and_tracks_a_bounded_number() -> None:
    """Failures of an address quiet for lockout_max are forgotten; a thousand guessing
    addresses keep at most max_peers entries, the oldest dropped."""
    clock = FakeClock()
    throttle = LoginThrottle(
        max_failures=2, lockout_s=1.0, lockout_max_s=8.0, max_peers=16, clock=clock
    )
    assert throttle.failed("10.0.0.1") == 0.0
    assert throttle.failed("10.0.0.1") == 1.0
    assert throttle.locked_for("10.0.0.1") == 1.0
    clock.now += 1.0
    assert throttle.locked_for("10.0.0.1") == 0.0
    assert throttle.failed("10.0.0.1") == 2.0
    clock.now += 2.0 + 8.0  # the lockout, then lockout_max of quiet
    assert throttle.failed("10.0.0.1") == 0.0  # counting from zero again
    for i in range(1000):
        throttle.failed(f"192.168.{i // 256}.{i % 256}")
    assert len(throttle) == 16
    assert throttle.locked_for("10.0.0.1") == 0.0


def test_repeated_log_writes_one_line_per_kind_per_interval_with_the_held_count() -> None:
    clock = FakeClock()
    repeated = RepeatedLog(interval_s=60.0, clock=clock)
    assert repeated.due("wrong password") == 0
    assert [repeated.due("wrong password") for _ in range(5)] == [None] * 5
    assert repeated.due("untrusted") == 0  # another kind has its own interval
    clock.now += 60.0
    assert repeated.due("wrong password") == 5


def test_a_failed_write_of_the_server_pair_leaves_the_old_files_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills while the new pair is staged: the old certificate and key stay
    as they were and no temporary file is left behind."""
    cert, key = tmp_path / "server_cert.der", tmp_path / "server_key.pem"
    cert.write_bytes(b"old certificate")
    key.write_bytes(b"old key")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_files_atomically([(key, b"new key", 0o600), (cert, b"new certificate", 0o644)])
    assert cert.read_bytes() == b"old certificate" and key.read_bytes() == b"old key"
    assert sorted(path.name for path in tmp_path.iterdir()) == [cert.name, key.name]


def test_lockout_settings_are_validated() -> None:
    """The longest lockout may not be shorter than the first; durations parse as text."""
    config = OpcUaConfig(login_lockout="500ms", login_lockout_max="1m", rejected_max_files=0)
    assert (config.login_lockout, config.login_lockout_max) == (0.5, 60.0)
    with pytest.raises(ValidationError, match="login_lockout_max"):
        OpcUaConfig(login_lockout="10s", login_lockout_max="5s")
    with pytest.raises(ValidationError):
        OpcUaConfig(login_max_failures=0)
