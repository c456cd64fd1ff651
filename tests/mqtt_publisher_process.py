"""The MQTT publisher alone in a process, so tests can SIGKILL it like a crashed daemon.

    python -m tests.mqtt_publisher_process --port P --state-dir D --probes R1,R2 \
        --rate 10 --count 200 [--results] [--updates]

Prints JSON lines on stdout: {"event": "started", "last_seq": {...}} before connecting
(what the outbox already numbered), {"event": "generated", ...} once `count` ticks are
published, and {"event": "stopped", "diagnostics": {...}} after a SIGTERM (clean stop).
Each tick publishes one event (and one result with --results) per probe.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from monitor.config.mqtt import MqttConfig
from monitor.logs import configure_logging
from monitor.manifest import ModelIdentity
from monitor.publishers.base import CommandResult, ProbeUpdate
from monitor.publishers.mqtt import MqttPublisher

PREFIX = "crystal-monitor"
CLASSES = ("CEX", "PG")


class RefusingHandler:
    def acknowledge(self, probe: str, alarm_id: str, who: str, comment: str) -> CommandResult:
        return CommandResult(False, "test process")

    def shelve(
        self, probe: str, alarm_id: str, minutes: float, who: str, comment: str
    ) -> CommandResult:
        return CommandResult(False, "test process")

    def start_batch(
        self, probe: str, batch_id: str, who: str, *, end_running: bool = False
    ) -> CommandResult:
        return CommandResult(False, "test process")

    def stop_batch(self, probe: str, who: str) -> CommandResult:
        return CommandResult(False, "test process")


def make_update(probe: str, tick: int, now: float) -> ProbeUpdate:
    """A ProbeUpdate shaped like the daemon's, with values that identify the tick."""
    pg = round(0.01 * (tick % 50), 4)
    windows: dict[str, Any] = {}
    for window in ("60", "300", "900"):
        n = 100 + tick
        windows[window] = {
            "n": n,
            "n_uncertain": 3,
            "frames": 10,
            "rejected_frames": 1,
            "rejected_by_reason": {"blur": 1},
            "rejected_share": 0.0909,
            "uncertain_share": 0.03,
            "particles_per_min": 50.0,
            "frames_per_min": 11.0,
            "classes": {
                "CEX": {
                    "n": n - 5,
                    "fraction": 1 - pg,
                    "ci95": [0.9, 1.0],
                    "adjusted": 1 - pg,
                    "effective_n": 80.0,
                },
                "PG": {
                    "n": 5,
                    "fraction": pg,
                    "ci95": [0.0, 0.1],
                    "adjusted": pg,
                    "effective_n": 80.0,
                },
            },
        }
    alarms = [
        {"alarm_id": "pg_high", "state": "normal", "active": False, "value": pg, "limit": 0.05},
        {"alarm_id": "probe_blind", "state": "normal", "active": False, "value": None},
    ]
    return ProbeUpdate(
        probe=probe,
        ts=now,
        batch="B-1",
        quality="GOOD",
        model=ModelIdentity("resnet18", "1", "ab" * 32),
        classes=CLASSES,
        snapshot={"ts": now, "batch": "B-1", "windows": windows, "trend": {"PG": {"ewma": pg}}},
        last_frame_ts=now - 0.5,
        alarms=alarms,
    )


def emit(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--probes", default="R1")
    parser.add_argument("--rate", type=float, default=10.0, help="ticks per second")
    parser.add_argument("--count", type=int, default=0, help="ticks to publish")
    parser.add_argument("--results", action="store_true")
    parser.add_argument("--updates", action="store_true", help="a ProbeUpdate every 0.5 s")
    parser.add_argument("--client-id", default="crystal-monitor-test")
    args = parser.parse_args()
    configure_logging("info", "json")  # stderr: stdout carries the JSON lines for the test

    probes = args.probes.split(",")
    config = MqttConfig(
        enabled=True,
        port=args.port,
        client_id=args.client_id,
        topic_prefix=PREFIX,
        results=args.results,
        reconnect_min=1,
        reconnect_max=1,
        stop_timeout=3,
    )
    publisher = MqttPublisher(config, args.state_dir, version="test-1", probes=probes)
    emit(
        {
            "event": "started",
            "last_seq": {
                probe: {
                    stream: publisher.last_seq(probe, stream) for stream in ("events", "results")
                }
                for probe in probes
            },
        }
    )
    # A plain flag: Event.set() inside a signal handler can deadlock against the main
    # thread's own Event.wait() on the same event.
    stopping: list[bool] = []

    def on_term(signum: int, frame: FrameType | None) -> None:
        stopping.append(True)

    signal.signal(signal.SIGTERM, on_term)
    publisher.start(RefusingHandler())

    interval = 1.0 / args.rate
    next_tick = time.monotonic()
    next_update = time.monotonic()
    tick = 0
    update_tick = 0
    while not stopping:
        now = time.monotonic()
        if args.updates and now >= next_update:
            update_tick += 1
            for probe in probes:
                publisher.publish_update(make_update(probe, update_tick, time.time()))
            next_update += 0.5
        if tick < args.count and now >= next_tick:
            tick += 1
            for probe in probes:
                publisher.publish_event(probe, {"type": "test", "tick": tick})
                if args.results:
                    publisher.publish_result(probe, {"tick": tick, "counts": {"CEX": 3, "PG": 0}})
            next_tick += interval
            if tick == args.count:
                emit({"event": "generated", "ticks": tick})
        time.sleep(0.01)
    faulthandler.dump_traceback_later(8, exit=False)  # a hung stop shows its threads
    publisher_diag = publisher.diagnostics()
    publisher.stop()
    faulthandler.cancel_dump_traceback_later()
    emit({"event": "stopped", "diagnostics": publisher_diag})
    return 0


if __name__ == "__main__":
    sys.exit(main())
