"""Fault injection against the OPC UA server (issue 11).

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
from dataclasses import dataclass
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from monitor.publishers.opcua_users import write_user
from tests.test_opcua import (
    CLIENT_URI,
    free_port,
    make_client_certificate,
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
