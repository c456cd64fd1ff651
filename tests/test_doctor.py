"""`crystal-monitor doctor` and the deploy examples: what a host and a config need."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.cli.doctor import (
    FREE_SPACE_FAIL_BYTES,
    FREE_SPACE_WARN_BYTES,
    TENSORRT_MISSING,
    Check,
    check_free_space,
    check_opcua_port,
    describe_free_space,
    exit_code,
    format_check,
    free_space_status,
)
from monitor.cli.main import main
from monitor.config.exit_codes import EX_CONFIG, EX_UNAVAILABLE

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "deploy" / "examples"


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )


def _lines(output: str, status: str, what: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"{status:<4}  {what}")]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _write_config(tmp_path: Path, folder: Path, extra: str = "") -> Path:
    config = tmp_path / "monitor.toml"
    config.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"

[[probes]]
id = "R1"
[probes.source]
type = "folder"
path = "{folder}"
{extra}
"""
    )
    return config


def test_doctor_without_config_passes_and_reports_model_and_tensorrt() -> None:
    """On this host the shipped model verifies and a missing TensorRT is a warning with the fix."""
    result = _doctor()
    assert result.returncode == 0, result.stdout + result.stderr
    model = _lines(result.stdout, "ok", "model")
    assert len(model) == 1
    assert "shipped default" in model[0]
    assert "classes CEX, PG" in model[0]
    assert "sha256 verified" in model[0]
    (quality,) = _lines(result.stdout, "warn", "model quality")
    assert "held-out site macro-F1 0." in quality
    assert "trained on simulated images only" in quality
    assert "OOD check on" in quality
    if importlib.util.find_spec("tensorrt") is None:
        assert _lines(result.stdout, "warn", "tensorrt") == [f"warn  tensorrt: {TENSORRT_MISSING}"]
    else:
        assert len(_lines(result.stdout, "ok", "tensorrt")) == 1
    assert len(_lines(result.stdout, "ok", "onnxruntime providers")) == 1
    assert "CPUExecutionProvider" in _lines(result.stdout, "ok", "onnxruntime providers")[0]
    assert not [line for line in result.stdout.splitlines() if line.startswith("FAIL")]


def test_doctor_fails_naming_a_missing_probe_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-probe-folder"
    result = _doctor("--config", str(_write_config(tmp_path, missing)))
    assert result.returncode == EX_CONFIG, result.stdout
    failed = _lines(result.stdout, "FAIL", "probes[0] R1")
    assert len(failed) == 1
    assert str(missing) in failed[0]
    assert "not found" in failed[0]


def test_doctor_warns_but_passes_when_the_mqtt_broker_is_down(tmp_path: Path) -> None:
    """The daemon queues MQTT messages in its outbox, so a down broker is not a failure."""
    folder = tmp_path / "probe"
    folder.mkdir()
    port = _free_port()
    config = _write_config(
        tmp_path, folder, f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n'
    )
    result = _doctor("--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    warned = _lines(result.stdout, "warn", f"mqtt broker 127.0.0.1:{port}")
    assert len(warned) == 1
    assert "outbox" in warned[0]
    assert len(_lines(result.stdout, "ok", "probes[0] R1")) == 1
    assert len(_lines(result.stdout, "ok", "daemon.state_dir")) == 1


def test_exit_code_is_nonzero_only_when_a_check_failed() -> None:
    ok = Check("ok", "model", "verified")
    warn = Check("warn", "gpu", "no NVIDIA GPU found")
    fail = Check("FAIL", "probes[0] R1", "folder /x not found")
    assert exit_code([]) == 0
    assert exit_code([ok, warn, warn]) == 0
    assert exit_code([ok, fail, warn]) == EX_CONFIG
    assert format_check(warn) == "warn  gpu: no NVIDIA GPU found"
    assert format_check(fail) == "FAIL  probes[0] R1: folder /x not found"


def test_only_port_failures_exit_69_any_other_failure_78() -> None:
    """As `run` would exit: a port in the way may free up (69), a config will not (78)."""
    busy = Check("FAIL", "http 127.0.0.1:8080", "in use", fail_code=EX_UNAVAILABLE)
    folder = Check("FAIL", "probes[0] R1", "folder /x not found")
    assert exit_code([Check("ok", "python", "3.11"), busy]) == EX_UNAVAILABLE
    assert exit_code([busy, folder]) == EX_CONFIG
    assert exit_code([Check("warn", "gpu", "none", fail_code=EX_UNAVAILABLE)]) == 0


def test_opcua_port_in_use_fails_naming_opcua_endpoint_and_a_free_one_is_ok() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        busy = check_opcua_port(f"opc.tcp://127.0.0.1:{port}/crystal-monitor")
    assert (busy.status, busy.fail_code) == ("FAIL", EX_UNAVAILABLE)
    assert busy.detail.startswith(f"opcua.endpoint: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in busy.detail
    port = _free_port()
    free = check_opcua_port(f"opc.tcp://127.0.0.1:{port}/crystal-monitor")
    assert free == Check("ok", f"opcua endpoint 127.0.0.1:{port}", "port free to bind")


@pytest.mark.parametrize(
    "example",
    sorted(str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*.toml")),
)
def test_example_config_validates_once_its_paths_exist(
    example: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each deploy example passes `validate-config` with its plant paths moved under tmp."""
    text = (EXAMPLES / example).read_text()
    for plant_root in ("/srv/probe", "/var/lib/crystal-monitor", "/etc/crystal-monitor"):
        text = text.replace(plant_root, str(tmp_path / plant_root.strip("/").replace("/", "-")))
    for probe_folder in ("R1", "R2"):
        (tmp_path / "srv-probe" / probe_folder).mkdir(parents=True, exist_ok=True)
    users = tmp_path / "etc-crystal-monitor" / "credentials"
    users.mkdir(parents=True)
    for name in ("opcua-users-R1", "opcua-users-R2"):
        (users / name).write_text("")
    config = tmp_path / Path(example).name
    config.write_text(text)
    assert main(["validate-config", str(config)]) == 0, capsys.readouterr().err
    assert "valid" in capsys.readouterr().out


def test_two_reactor_instances_do_not_share_state_topics_or_ports() -> None:
    from monitor.config.settings import load_settings

    r1, r2 = (load_settings(EXAMPLES / "two-reactors" / f"{r}.toml") for r in ("R1", "R2"))
    assert r1.daemon.state_dir != r2.daemon.state_dir
    assert r1.mqtt.topic_prefix != r2.mqtt.topic_prefix
    assert r1.mqtt.client_id != r2.mqtt.client_id
    assert r1.opcua.endpoint != r2.opcua.endpoint


def test_doctor_fails_with_69_on_a_busy_http_port(tmp_path: Path) -> None:
    """The one FAIL is the port, named by its key with the fix; the rest of the config is fine."""
    folder = tmp_path / "probe"
    folder.mkdir()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        config = _write_config(tmp_path, folder, f"[http]\nenabled = true\nport = {port}\n")
        result = _doctor("--config", str(config))
    assert result.returncode == EX_UNAVAILABLE, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert failed == [
        f"FAIL  http 127.0.0.1:{port}: http.port: cannot listen on 127.0.0.1:{port}: the port "
        "is in use by another program (a running crystal-monitor?): stop it or set http.port "
        "to a free port"
    ]
    spaces = [line for line in result.stdout.splitlines() if "  free space: " in line]
    assert len(spaces) == 1, result.stdout  # the state and the probe folder share a disk


def test_free_space_fails_under_100_mb_and_warns_under_1_gb() -> None:
    assert FREE_SPACE_FAIL_BYTES == 100 * 10**6 and FREE_SPACE_WARN_BYTES == 10**9
    assert free_space_status(0) == "FAIL"
    assert free_space_status(99_999_999) == "FAIL"
    assert free_space_status(100_000_000) == "warn"
    assert free_space_status(999_999_999) == "warn"
    assert free_space_status(10**9) == "ok"
    keys = ["daemon.state_dir", "probes[0].source.path"]
    low = describe_free_space(50 * 10**6, 20 * 10**9, "/var/lib/cm", keys)
    assert low.startswith("0.05 GB free of 20.00 GB on the filesystem of /var/lib/cm ")
    assert "(daemon.state_dir, probes[0].source.path)" in low
    assert "move daemon.state_dir" in low
    assert "free space soon" in describe_free_space(500 * 10**6, 20 * 10**9, "/x", keys)
    assert describe_free_space(5 * 10**9, 20 * 10**9, "/x", keys).endswith(
        "on the filesystem of /x (daemon.state_dir, probes[0].source.path)"
    )


def test_free_space_is_checked_once_per_filesystem_from_the_nearest_existing_folder(
    tmp_path: Path,
) -> None:
    checks = check_free_space(
        [("daemon.state_dir", tmp_path / "not" / "yet"), ("probes[0].source.path", tmp_path)]
    )
    assert len(checks) == 1
    assert checks[0].what == "free space"
    assert f"on the filesystem of {tmp_path} (daemon.state_dir, probes[0].source.path)" in (
        checks[0].detail
    )
