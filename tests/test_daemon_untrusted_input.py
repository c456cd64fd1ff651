"""The daemon against input an attacker or a broken probe could put in front of it.

A real daemon subprocess watching real folders, its real SQLite store read back with
`crystal-monitor export`, its real log file: decompression bombs that pass the pixel
limit, files bigger than any image the limits allow, symbolic links out of the watched
folder, and libraries that write to stderr behind structlog's back.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import cv2
import numpy as np

from monitor.simulator import CropSimulator
from tests.bad_images import png_rgba16_zeros, with_bad_iccp
from tests.daemon_process import DaemonProcess, export, wait_for, write_like_probe
from tests.mosquitto import free_port

MIB = 1 << 20


def _folder_probe(probe: str, folder: Path, extra: str = "") -> str:
    return f"""
[[probes]]
id = "{probe}"
sampling = "whole"
[probes.source]
type = "folder"
path = "{folder}"
settle_time = "300ms"
rescan_interval = "2s"
{extra}
"""


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
log_format = "json"
shutdown_grace = "5s"

[batcher]
workers = 2
{body}
"""
    )
    return path


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def _rows_by_key(config: Path) -> dict[tuple[str, str], dict[str, str]]:
    return {(row["probe"], row["key"]): row for row in export(config)}


def _log_events(daemon: DaemonProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]


def test_images_that_decode_to_hundreds_of_megabytes_are_refused_without_the_memory(
    tmp_path: Path,
) -> None:
    """A 381 KB PNG of 7000 x 7000 16-bit RGBA is under the 50 MP pixel limit but 392 MB
    decoded: refused from its header as decoded_too_large. A 200 MB file is more than
    any image the limits allow: refused as file_too_large without being read whole. The
    daemon's peak memory does not grow by more than a fraction of either, and good
    frames around them are stored."""
    folder = tmp_path / "probe"
    folder.mkdir()
    config = _config(tmp_path, _folder_probe("R1", folder))
    crop = CropSimulator(seed=5).render("CEX")
    bomb = png_rgba16_zeros(7000, 7000)
    assert len(bomb) < 400_000
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        write_like_probe(folder, "a_before.png", crop)
        assert wait_for(lambda: len(export(config)) >= 1, timeout=60), daemon.log_text()[-3000:]
        assert daemon.process is not None
        baseline = _peak_rss_bytes(daemon.process.pid)
        for name in ("bomb_1.png", "bomb_2.png", "bomb_3.png"):
            (folder / f".{name}").write_bytes(bomb)
            os.replace(folder / f".{name}", folder / name)
        with (folder / ".huge.png").open("wb") as huge:
            huge.truncate(200 * MIB)  # sparse: no disk used, 200 MB of zeros to read
        os.replace(folder / ".huge.png", folder / "huge.png")
        write_like_probe(folder, "z_after.png", crop)
        assert wait_for(lambda: len(export(config)) >= 6, timeout=60), daemon.log_text()[-3000:]
        growth = _peak_rss_bytes(daemon.process.pid) - baseline
        assert daemon.terminate() == 0
    rows = _rows_by_key(config)
    for name in ("bomb_1.png", "bomb_2.png", "bomb_3.png"):
        assert rows["R1", name]["status"] == "error", rows["R1", name]
        assert rows["R1", name]["reason"] == "decoded_too_large", rows["R1", name]
    assert rows["R1", "huge.png"]["status"] == "error"
    assert rows["R1", "huge.png"]["reason"] == "file_too_large", rows["R1", "huge.png"]
    for name in ("a_before.png", "z_after.png"):
        assert rows["R1", name]["status"] == "ok" and rows["R1", name]["n_CEX"] == "1"
    # The old code peaked at 824 MB for one such PNG (two decode workers: more).
    assert growth < 100 * MIB, f"peak RSS grew by {growth / MIB:.0f} MiB"
    refused = [e for e in _log_events(daemon) if e.get("event") == "frame_unreadable"]
    assert sorted(str(e["key"]) for e in refused) == [
        "bomb_1.png",
        "bomb_2.png",
        "bomb_3.png",
        "huge.png",
    ]


def test_symlinks_out_of_the_folder_are_refused_unless_follow_symlinks_is_set(
    tmp_path: Path,
) -> None:
    """R1 (default): a link to a file outside its folder, absolute or relative, is recorded
    as symlink_outside_folder and never decoded; a link to a file inside the folder is
    read. R2 (follow_symlinks = true) reads the same outside links."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    simulator = CropSimulator(seed=8)
    cex, pg = simulator.render("CEX"), simulator.render("PG")
    write_like_probe(outside, "secret.png", pg)
    folders = {"R1": tmp_path / "r1", "R2": tmp_path / "r2"}
    for folder in folders.values():
        (folder / "kept").mkdir(parents=True)
        write_like_probe(folder / "kept", "inner.png", cex)  # not recursive: only via the link
        (folder / "escape.png").symlink_to(outside / "secret.png")
        (folder / "escape_relative.png").symlink_to(Path("..") / "elsewhere" / "secret.png")
        (folder / "inside.png").symlink_to(folder / "kept" / "inner.png")
        write_like_probe(folder, "plain.png", cex)
    config = _config(
        tmp_path,
        _folder_probe("R1", folders["R1"])
        + _folder_probe("R2", folders["R2"], "follow_symlinks = true"),
    )
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        assert wait_for(lambda: len(export(config)) >= 8, timeout=60), daemon.log_text()[-3000:]
        assert daemon.terminate() == 0
    rows = _rows_by_key(config)
    for name in ("escape.png", "escape_relative.png"):
        refused = rows["R1", name]
        assert refused["status"] == "error", refused
        assert refused["reason"] == "symlink_outside_folder", refused
        assert refused["n_PG"] in {"", "0"}, refused  # never decoded, never classified
        followed = rows["R2", name]
        assert followed["status"] == "ok" and followed["n_PG"] == "1", followed
    for probe in ("R1", "R2"):
        for name in ("inside.png", "plain.png"):
            row = rows[probe, name]
            assert row["status"] == "ok" and row["n_CEX"] == "1", row
    refused_logs = [
        (e["probe"], e["key"], e["reason"])
        for e in _log_events(daemon)
        if e.get("event") == "frame_unreadable"
    ]
    assert sorted(refused_logs) == [
        ("R1", "escape.png", "symlink_outside_folder"),
        ("R1", "escape_relative.png", "symlink_outside_folder"),
    ]


def _send(port: int, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(payload)
        connection.settimeout(2)
        with contextlib.suppress(TimeoutError):
            connection.recv(1024)  # the server's answer or its closing, whichever comes


def test_every_line_of_the_json_log_is_json_with_library_and_native_warnings(
    tmp_path: Path,
) -> None:
    """libpng's warning about a bad iCCP profile (written by C code straight to fd 2),
    aiohttp's tracebacks for malformed requests and asyncua's complaint about a malformed
    OPC UA header (stdlib logging) all arrive as JSON lines, with their text kept."""
    folder = tmp_path / "probe"
    folder.mkdir()
    http_port, opcua_port = free_port(), free_port()
    config = _config(
        tmp_path,
        f"""
[http]
enabled = true
port = {http_port}

[opcua]
enabled = true
security_profile = "demo"
endpoint = "opc.tcp://127.0.0.1:{opcua_port}/crystal-monitor"
"""
        + _folder_probe("R1", folder),
    )
    crop = CropSimulator(seed=2).render("CEX")
    ok, encoded = cv2.imencode(".png", crop)
    assert ok

    def listening() -> bool:
        try:
            for port in (http_port, opcua_port):
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            return False
        return True

    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        assert wait_for(listening, timeout=60, interval=0.2), daemon.log_text()[-3000:]
        (folder / ".iccp.png").write_bytes(with_bad_iccp(encoded.tobytes()))
        os.replace(folder / ".iccp.png", folder / "iccp.png")
        write_like_probe(folder, "plain.png", np.ascontiguousarray(crop))
        _send(http_port, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
        _send(opcua_port, b"\x00" * 64)
        assert wait_for(lambda: len(export(config)) >= 2, timeout=60), daemon.log_text()[-3000:]
        time.sleep(1)
        assert daemon.terminate() == 0
    lines = daemon.log_text().splitlines()
    not_json = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not not_json, "\n".join(not_json[:20])
    events = [json.loads(line) for line in lines]
    native = [e for e in events if e.get("event") == "native_stderr"]
    assert any("iCCP" in str(e["line"]) for e in native), native
    library = [e for e in events if e.get("event") == "library_log"]
    aiohttp = [e for e in library if str(e.get("logger", "")).startswith("aiohttp")]
    assert aiohttp and "BadHttpMessage" in str(aiohttp[0].get("exception")), library
    asyncua = [e for e in library if str(e.get("logger", "")).startswith("asyncua")]
    assert any("malformed" in str(e.get("message")) for e in asyncua), library
    rows = _rows_by_key(config)
    assert rows["R1", "iccp.png"]["status"] == "ok" and rows["R1", "iccp.png"]["n_CEX"] == "1"
