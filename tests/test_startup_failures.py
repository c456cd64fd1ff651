"""`crystal-monitor run` failing at start-up, as a person or systemd sees it: the real CLI
in a subprocess, a real busy socket, a real broker refusing our login.

Each failure ends with one plain line on stderr naming the key and the fix (the JSON log
above it says the same once, as `startup_failed`), the documented exit code (69: a port
in the way, 78: the configuration) and no traceback unless log_level is debug. A broker
that is merely down does not stop start-up: the outbox keeps the messages."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from monitor.config.exit_codes import EX_CONFIG, EX_UNAVAILABLE
from tests.mosquitto import free_port, running_mosquitto

CRYSTAL_MONITOR = Path(sys.executable).with_name("crystal-monitor")


@dataclass(frozen=True)
class Exited:
    code: int
    events: list[dict[str, Any]]  # the JSON log lines
    plain: list[str]  # every other line: the one for a person
    stderr: str


def _write_config(tmp_path: Path, extra: str = "", *, log_level: str = "info") -> Path:
    folder = tmp_path / "probe"
    folder.mkdir(exist_ok=True)
    config = tmp_path / "monitor.toml"
    config.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
log_format = "json"
log_level = "{log_level}"
shutdown_grace = "2s"

[[probes]]
id = "R1"
sampling = "whole"
[probes.source]
type = "folder"
path = "{folder}"
{extra}
"""
    )
    return config


def _run(config: Path, env: dict[str, str] | None = None) -> Exited:
    result = subprocess.run(
        [str(CRYSTAL_MONITOR), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )
    events, plain = [], []
    for line in result.stderr.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            plain.append(line)
    return Exited(result.returncode, events, plain, result.stderr)


def _assert_one_line_naming(exited: Exited, code: int, key: str, *fix: str) -> str:
    """The exit code, one plain line that names `key` and says `fix`, logged once, and no
    traceback anywhere."""
    assert exited.code == code, exited.stderr
    assert len(exited.plain) == 1, exited.stderr
    (line,) = exited.plain
    prefix = "config error: " if code == EX_CONFIG else "error: "
    assert line.startswith(f"{prefix}{key}: "), line
    for words in fix:
        assert words in line, line
    assert exited.stderr.rstrip().endswith(line)  # the last word is the fix
    assert "Traceback" not in exited.stderr
    failed = [event for event in exited.events if event["event"] == "startup_failed"]
    assert [(e["level"], e["key"], e["exit_code"]) for e in failed] == [("error", key, code)]
    assert "exception" not in failed[0]
    assert not [e for e in exited.events if e["level"] == "critical"], exited.stderr
    return line


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield int(other.getsockname()[1])


def test_a_busy_http_port_is_one_line_naming_http_port_and_exit_69(
    tmp_path: Path, busy_port: int
) -> None:
    config = _write_config(tmp_path, f"[http]\nenabled = true\nport = {busy_port}\n")
    line = _assert_one_line_naming(
        _run(config),
        EX_UNAVAILABLE,
        "http.port",
        f"127.0.0.1:{busy_port}",
        "in use",
        "set http.port",
    )
    assert "stop it" in line


def test_a_busy_opcua_port_is_one_line_naming_opcua_endpoint_and_exit_69(
    tmp_path: Path, busy_port: int
) -> None:
    """asyncua's own traceback of the failed bind is not shown either."""
    endpoint = f"opc.tcp://127.0.0.1:{busy_port}/crystal-monitor"
    config = _write_config(
        tmp_path, f'[opcua]\nenabled = true\nsecurity_profile = "demo"\nendpoint = "{endpoint}"\n'
    )
    exited = _run(config)
    _assert_one_line_naming(exited, EX_UNAVAILABLE, "opcua.endpoint", "in use")
    assert not [e for e in exited.events if e["event"] == "library_log"], exited.stderr


def test_at_debug_level_the_start_up_failure_is_logged_with_its_traceback(
    tmp_path: Path, busy_port: int
) -> None:
    config = _write_config(
        tmp_path, f"[http]\nenabled = true\nport = {busy_port}\n", log_level="debug"
    )
    exited = _run(config)
    assert exited.code == EX_UNAVAILABLE
    (failed,) = [event for event in exited.events if event["event"] == "startup_failed"]
    assert "Traceback" in failed["exception"] and "OSError" in failed["exception"]
    assert exited.plain == [f"error: {failed['error']}"]


def test_an_unreadable_tls_certificate_is_one_line_naming_its_key_and_exit_78(
    tmp_path: Path,
) -> None:
    ca_file = tmp_path / "broker-ca.pem"
    ca_file.write_text("not a certificate\n")
    config = _write_config(
        tmp_path,
        f"[mqtt]\nenabled = true\nport = {free_port()}\n"
        f'[mqtt.tls]\nenabled = true\nca_file = "{ca_file}"\n',
    )
    _assert_one_line_naming(_run(config), EX_CONFIG, "mqtt.tls.ca_file", str(ca_file), "PEM file")


def test_a_probe_folder_that_cannot_be_listed_is_one_line_naming_source_path_and_exit_78(
    tmp_path: Path,
) -> None:
    """A path that is a file stands in for an unreadable folder (root reads everything)."""
    config = _write_config(tmp_path)
    text = config.read_text().replace(str(tmp_path / "probe"), str(config))
    config.write_text(text)
    _assert_one_line_naming(
        _run(config), EX_CONFIG, "source.path of probe R1", str(config), "not a folder"
    )


def test_a_broker_refusing_our_password_is_one_line_naming_the_user_and_the_password_source(
    tmp_path: Path,
) -> None:
    with running_mosquitto(tmp_path / "broker", users={"monitor": "right-pw"}) as broker:
        config = _write_config(
            tmp_path,
            f'[mqtt]\nenabled = true\nport = {broker.port}\nusername = "monitor"\n'
            'password_env = "MQTT_PW"\n',
        )
        exited = _run(config, env={"MQTT_PW": "wrong-pw"})
    _assert_one_line_naming(
        exited, EX_CONFIG, "mqtt.username", "refused the login", "'monitor'", "MQTT_PW"
    )


def test_a_broker_that_is_down_does_not_stop_start_up(tmp_path: Path) -> None:
    """The daemon starts and buffers in its outbox; SIGTERM then stops it cleanly."""
    config = _write_config(tmp_path, f"[mqtt]\nenabled = true\nport = {free_port()}\n")
    process = subprocess.Popen(
        [str(CRYSTAL_MONITOR), "run", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        seen = []
        for line in process.stderr:
            seen.append(line)
            if '"daemon_started"' in line:
                break
        assert any('"mqtt_unreachable"' in line for line in seen), "".join(seen)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
