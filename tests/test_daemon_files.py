"""The daemon as systemd runs it, against files written the way probe software writes them."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.simulator import CropSimulator
from tests.bad_images import png_claiming
from tests.daemon_process import DaemonProcess, export, wait_for, write_config, write_like_probe


@pytest.mark.slow
def test_every_file_is_counted_exactly_once_across_three_sigkills(tmp_path: Path) -> None:
    folder = tmp_path / "probe"
    folder.mkdir()
    config = write_config(tmp_path / "config.toml", tmp_path / "state", folder)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    simulator = CropSimulator(seed=3)
    crops = [simulator.render("PG" if i % 7 == 0 else "CEX") for i in range(50)]
    total = 2000
    written = threading.Event()

    def writer() -> None:
        for index in range(total):
            write_like_probe(folder, f"crop_{index:05d}.png", crops[index % len(crops)])
            time.sleep(0.004)
        written.set()

    with daemon:
        daemon.start()
        thread = threading.Thread(target=writer)
        thread.start()
        rng = random.Random(5)
        for _ in range(3):
            time.sleep(rng.uniform(2.0, 5.0))
            daemon.kill()
            time.sleep(0.5)
            daemon.start()
        thread.join()
        assert written.is_set()
        assert wait_for(lambda: len(export(config)) >= total, timeout=240, interval=2)
        time.sleep(3)  # a late duplicate would show up here
        assert daemon.terminate() == 0
    rows = export(config)
    keys = [row["key"] for row in rows]
    assert len(keys) == total, (len(keys), len(set(keys)))
    assert sorted(keys) == [f"crop_{i:05d}.png" for i in range(total)]
    assert {row["status"] for row in rows} == {"ok"}


def test_bad_files_are_logged_once_counted_and_the_rest_classified(tmp_path: Path) -> None:
    folder = tmp_path / "probe"
    folder.mkdir()
    config = write_config(tmp_path / "config.toml", tmp_path / "state", folder)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    daemon.start()
    try:
        simulator = CropSimulator(seed=9)
        cex, pg = simulator.render("CEX"), simulator.render("PG")
        write_like_probe(folder, "a_cex.png", cex)
        write_like_probe(folder, "b_pg16.tif", pg.astype(np.uint16) * 257)
        write_like_probe(folder, "c_cex_rgb.jpg", cv2.merge([cex, cex, cex]))
        (folder / "zero.png").write_bytes(b"")
        _, data = cv2.imencode(".png", pg)
        (folder / "truncated.png").write_bytes(data.tobytes()[: len(data) // 2])
        (folder / "text.png").write_text("a text file named .png\n")
        (folder / "bomb.png").write_bytes(png_claiming(50_000, 50_000))
        (folder / "dangling.png").symlink_to(folder / "missing-target.png")
        (folder / "loop.png").symlink_to(folder / "loop.png")
        unreadable = folder / "unreadable.png"
        if os.geteuid() == 0:
            # root reads any file whatever its mode: a FIFO is what root cannot read as one.
            os.mkfifo(unreadable)
        else:
            unreadable.write_bytes(data.tobytes())
            unreadable.chmod(0)
        write_like_probe(folder, "z_pg.png", pg)
        assert wait_for(lambda: len(export(config)) >= 11, timeout=60)
        time.sleep(3)  # rescans must not log the bad files again
        assert daemon.alive()
    finally:
        assert daemon.terminate() == 0
    rows = {row["key"]: row for row in export(config)}
    expected_errors = {
        "zero.png": "empty_file",
        "truncated.png": "truncated",
        "text.png": "not_an_image",
        "bomb.png": "too_many_pixels",
        "dangling.png": "unreadable",
        "loop.png": "unreadable",
        "unreadable.png": "not_a_file" if os.geteuid() == 0 else "unreadable",
    }
    for key, reason in expected_errors.items():
        assert rows[key]["status"] == "error" and rows[key]["reason"] == reason, rows[key]
    for key, label in {
        "a_cex.png": "CEX",
        "b_pg16.tif": "PG",
        "c_cex_rgb.jpg": "CEX",
        "z_pg.png": "PG",
    }.items():
        assert rows[key]["status"] == "ok", rows[key]
        assert rows[key][f"n_{label}"] == "1", rows[key]
    events = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    unreadable_logs = [e["key"] for e in events if e.get("event") == "frame_unreadable"]
    assert sorted(unreadable_logs) == sorted(expected_errors), unreadable_logs
