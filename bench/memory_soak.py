"""Memory of the daemon and its worker processes over a long run.

`crystal-monitor run` as systemd runs it (a subprocess with its forkserver and worker
processes), 4 probes x 10 crop files/s renamed into watched folders and deleted once
stored (after = "delete", so the folders do not grow), the default pipeline. Every
30 s: the RSS summed over the daemon and all its descendants, and their PSS (which
counts a page shared by several processes once). The steady state is the mean of the
samples in minutes 2-4; the end is the mean of the last three samples.

    python -m bench.memory_soak [--minutes 30] [--write]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2

from bench.report import machine_line, replace_section
from monitor.simulator import CropSimulator

PROBES = 4
FPS = 10.0
SAMPLE_EVERY_S = 30.0


def process_tree(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def memory_mib(pid: int) -> tuple[float, float, int]:
    """(RSS summed, PSS summed, processes) over `pid` and its descendants."""
    rss = pss = 0
    pids = process_tree(pid)
    for current in pids:
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return rss / 1024, pss / 1024, len(pids)


def _config(root: Path) -> Path:
    probes = "".join(
        f"""
[[probes]]
id = "P{i}"
sampling = "whole"
[probes.source]
type = "folder"
path = "{root / f"p{i}"}"
after = "delete"
settle_time = "100ms"
"""
        for i in range(PROBES)
    )
    config = root / "config.toml"
    config.write_text(
        f"""
[daemon]
state_dir = "{root / "state"}"
log_level = "warning"
{probes}"""
    )
    for i in range(PROBES):
        (root / f"p{i}").mkdir()
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--write", action="store_true", help="record the table in BENCHMARKS.md")
    args = parser.parse_args()
    simulator = CropSimulator(seed=8)
    encoded = [
        cv2.imencode(".png", simulator.render("PG" if i % 5 == 0 else "CEX"))[1].tobytes()
        for i in range(200)
    ]
    stop = threading.Event()
    written = [0] * PROBES
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = _config(root)
        log = (root / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "--config", str(config)],
            stdout=log,
            stderr=log,
        )

        def writer(probe: int) -> None:
            folder = root / f"p{probe}"
            next_at = time.monotonic()
            while not stop.is_set():
                index = written[probe]
                part = folder / f".c{index:07d}.part"
                part.write_bytes(encoded[index % len(encoded)])
                os.replace(part, folder / f"c{index:07d}.png")
                written[probe] += 1
                next_at += 1 / FPS
                time.sleep(max(0.0, next_at - time.monotonic()))

        time.sleep(5.0)
        threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(PROBES)]
        for thread in threads:
            thread.start()
        samples: list[tuple[float, float, float, int]] = []
        started = time.monotonic()
        try:
            while time.monotonic() - started < args.minutes * 60:
                time.sleep(SAMPLE_EVERY_S)
                if daemon.poll() is not None:
                    raise RuntimeError(f"the daemon exited with {daemon.returncode}")
                minute = (time.monotonic() - started) / 60
                samples.append((minute, *memory_mib(daemon.pid)))
                print(f"{minute:5.1f} min  RSS {samples[-1][1]:.0f} MiB  PSS {samples[-1][2]:.0f} "
                      f"MiB  processes {samples[-1][3]}", flush=True)  # fmt: skip
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            time.sleep(3.0)
            daemon.terminate()
            daemon.wait(timeout=60)
        left = sum(len(list((root / f"p{i}").glob("*.png"))) for i in range(PROBES))
    steady = [s for s in samples if 2.0 <= s[0] <= 4.0] or samples[:3]
    end = samples[-3:]
    rss0, pss0 = (sum(s[i] for s in steady) / len(steady) for i in (1, 2))
    rss1, pss1 = (sum(s[i] for s in end) / len(end) for i in (1, 2))
    lines = [
        "| measurement | RSS summed | PSS summed |",
        "|---|---:|---:|",
        f"| steady state (minutes 2-4) | {rss0:.0f} MiB | {pss0:.0f} MiB |",
        f"| after {args.minutes:.0f} minutes (last 3 samples) | {rss1:.0f} MiB | {pss1:.0f} MiB |",
        f"| growth | {100 * (rss1 / rss0 - 1):+.1f} % | {100 * (pss1 / pss0 - 1):+.1f} % |",
        "",
        f"{samples[-1][3]} processes (the daemon, its forkserver, resource tracker and worker "
        f"processes); {sum(written)} files written at {PROBES} probes x {FPS:.0f}/s, "
        f"{left} not yet deleted at the end.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        command = "python -m bench.memory_soak " + " ".join(sys.argv[1:])
        body = f"{machine_line()}.\n\nCommand: `{command}`\n\n{table}\n"
        replace_section(Path("BENCHMARKS.md"), "memory: daemon and worker processes", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
