"""The daemon as the plant sees it: MQTT through a broker outage and a SIGKILL, retained
state and the Last Will, and an alarm reaching MQTT and OPC UA in time.

A real mosquitto started on a free port, the real daemon in a subprocess, a real paho
subscriber and a real asyncua client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client

from tests.mosquitto import Subscriber, free_port, running_mosquitto

PREFIX = "cm-test"


def _config(tmp_path: Path, broker_port: int, body: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
log_format = "json"
shutdown_grace = "5s"

[aggregation]
windows = ["10s", "30s", "60s"]
publish_interval = "1s"

[mqtt]
enabled = true
port = {broker_port}
topic_prefix = "{PREFIX}"
results = true
commands = true
reconnect_min = "1s"
reconnect_max = "2s"
{body}
"""
    )
    return path


class Daemon:
    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "--config", str(self.config)],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        """Never leave a daemon running after a test, passed or failed."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def _seq_by_probe(messages: list[Any], stream: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for message in messages:
        parts = message.topic.split("/")
        if len(parts) == 3 and parts[2] == stream:
            out.setdefault(parts[1], []).append(message.json()["seq"])
    return out


def _assert_no_gap(seqs: list[int]) -> None:
    """Every seq from 1 to the last, in order; a repeat after a reconnect is allowed."""
    kept = 0
    for seq in seqs:
        if seq <= kept:
            continue  # at-least-once: a redelivered message, dropped by seq
        assert seq == kept + 1, f"gap: {kept} then {seq}"
        kept = seq
    assert kept == max(seqs)


PROBES_2_AT_10_FPS = """
[[alarms.definitions]]
id = "pg_high"
kind = "fraction_high"
priority = "high"
message = "PG {value:.0%}"
class_name = "PG"
window = "10s"
limit = 0.3
min_count = 20

[[probes]]
id = "R1"
source = { type = "simulated", mode = "crop", fps = 10, profile = "constant:0.5", seed = 1 }

[[probes]]
id = "R2"
source = { type = "simulated", mode = "crop", fps = 10, profile = "constant:0.5", seed = 2 }
"""


@pytest.mark.slow
def test_results_and_events_survive_a_60s_outage_and_a_sigkill_during_it(tmp_path: Path) -> None:
    outage_s = float(os.environ.get("CRYSTAL_MONITOR_DAEMON_OUTAGE_S", "60"))
    with (
        contextlib.ExitStack() as stack,
        running_mosquitto(tmp_path / "broker", persistence=True) as broker,
    ):
        config = _config(tmp_path, broker.port, PROBES_2_AT_10_FPS)
        topics = [f"{PREFIX}/+/results", f"{PREFIX}/+/events"]
        with Subscriber(broker.port, topics, client_id="plant-historian", clean=False) as sub:
            daemon = Daemon(config, tmp_path / "daemon.log")
            stack.enter_context(daemon)
            daemon.start()
            assert sub.wait_for(lambda m: len(m) >= 50, timeout=60), daemon.log.read_text()[-3000:]
            time.sleep(3)
            broker.stop()
            time.sleep(outage_s / 2)
            daemon.kill()  # killed while the broker is down: the outbox must carry on
            daemon.start()
            time.sleep(outage_s / 2)
            broker.start()
            time.sleep(5)
            assert daemon.terminate() == 0
            time.sleep(2)
            results = _seq_by_probe(sub.received, "results")
            events = _seq_by_probe(sub.received, "events")
    assert set(results) == {"R1", "R2"}
    for probe, seqs in results.items():
        _assert_no_gap(seqs)
        # 10 frames/s for the whole run, minus the restart: most of the outage was measured.
        assert max(seqs) >= 10 * outage_s * 0.6, (probe, max(seqs))
    assert set(events) == {"R1", "R2"}  # pg_high fired on both (PG 50 % > 30 %)
    for seqs in events.values():
        _assert_no_gap(seqs)


RAMP_PROBE = """
[opcua]
enabled = true
security_profile = "demo"
endpoint = "opc.tcp://127.0.0.1:{opcua_port}/crystal-monitor"

[[alarms.definitions]]
id = "pg_high"
kind = "fraction_high"
priority = "high"
message = "PG {{value:.0%}} above {{limit:.0%}}"
class_name = "PG"
window = "30s"
limit = 0.15
deadband = 0.02
on_delay = "3s"
min_count = 50

[[probes]]
id = "R1"
source = {{ type = "simulated", mode = "crop", fps = 20, profile = "ramp:0:0.4@0-60", seed = 4 }}
"""


async def _opcua_watch(url: str, deadline: float) -> dict[str, Any]:
    """Subscribe to events on the Server object; return the first pg_high activation."""
    found: dict[str, Any] = {}

    class Handler:
        def event_notification(self, event: Any) -> None:
            fields = event.get_event_props_as_fields_dict()
            alarm = fields.get("AlarmId")
            if alarm is not None and alarm.Value == "pg_high" and "at" not in found:
                found.update(
                    at=time.time(),
                    severity=fields["Severity"].Value,
                    source=fields["SourceName"].Value,
                )

    async with Client(url) as client:
        namespace = await client.get_namespace_index("urn:crystal-monitor")
        event_type = await client.nodes.base_event_type.get_child(
            f"{namespace}:CrystalMonitorEventType"
        )
        subscription = await client.create_subscription(200, Handler())
        await subscription.subscribe_events(client.nodes.server, event_type)
        while time.time() < deadline and "at" not in found:
            await asyncio.sleep(0.2)
    return found


@pytest.mark.slow
def test_pg_ramp_raises_pg_high_on_mqtt_and_opcua_in_time_then_last_will(tmp_path: Path) -> None:
    opcua_port = free_port()
    with running_mosquitto(tmp_path / "broker") as broker:
        config = _config(tmp_path, broker.port, RAMP_PROBE.format(opcua_port=opcua_port))
        topics = [f"{PREFIX}/#"]
        daemon = Daemon(config, tmp_path / "daemon.log")
        with daemon:
            _check_alarm_timing_and_last_will(daemon, broker.port, topics, opcua_port)


def _check_alarm_timing_and_last_will(
    daemon: Daemon, broker_port: int, topics: list[str], opcua_port: int
) -> None:
    with Subscriber(broker_port, topics) as sub:
        daemon.start()
        assert sub.wait_for(
            lambda m: any(x.topic == f"{PREFIX}/R1/fractions" for x in m), timeout=60
        ), daemon.log.read_text()[-3000:]
        opcua = asyncio.run(
            _opcua_watch(f"opc.tcp://127.0.0.1:{opcua_port}/crystal-monitor", time.time() + 90)
        )
        assert sub.wait_for(lambda m: any(x.topic == f"{PREFIX}/R1/events" for x in m), timeout=30)
        fractions = [m.json() for m in sub.on(f"{PREFIX}/R1/fractions")]
        events = [m.json() for m in sub.on(f"{PREFIX}/R1/events")]
    # When did the 30 s window first cross the limit, by the daemon's own numbers?
    crossed = next(
        f["ts"]
        for f in fractions
        if (f["windows"]["30s"]["classes"]["PG"]["fraction"] or 0) > 0.15
        and f["windows"]["30s"]["n"] >= 50
    )
    raised = next(
        e
        for e in events
        if e.get("alarm_id") == "pg_high" and e.get("to_state") == "active_unacknowledged"
    )
    delay = _epoch(raised["ts"]) - _epoch(crossed)
    assert 0 <= delay <= 3.0 + 2 * 1.0 + 0.5, delay  # on-delay + 2 publish intervals
    assert opcua and opcua["source"] == "R1" and opcua["severity"] == 750
    assert abs(opcua["at"] - _epoch(raised["ts"])) <= 2.0

    # An operator acknowledges over MQTT: the daemon answers and the alarm state follows.
    with Subscriber(broker_port, [f"{PREFIX}/R1/cmd/reply", f"{PREFIX}/R1/alarms/pg_high"]) as op:
        body = {"alarm_id": "pg_high", "who": "op-ben", "comment": "lab sample", "request_id": 7}
        op.client.publish(f"{PREFIX}/R1/cmd/ack", json.dumps(body), qos=1)
        assert op.wait_for(
            lambda m: any(x.topic.endswith("cmd/reply") and x.json()["accepted"] for x in m),
            timeout=10,
        ), [x.payload for x in op.received]
        assert op.wait_for(
            lambda m: any(
                x.topic.endswith("pg_high") and x.json()["state"] == "active_acknowledged"
                for x in m
            ),
            timeout=10,
        )

    # A late subscriber gets the whole current state at once, then the Last Will.
    with Subscriber(broker_port, topics) as late:
        assert late.wait_for(
            lambda m: (
                {x.topic for x in m}
                >= {f"{PREFIX}/status", f"{PREFIX}/R1/fractions", f"{PREFIX}/R1/alarms/pg_high"}
            ),
            timeout=5,
        )
        assert late.on(f"{PREFIX}/status")[0].json()["state"] == "online"
        assert late.on(f"{PREFIX}/R1/alarms/pg_high")[0].json()["state"] != "normal"
        daemon.kill()
        assert late.wait_for(
            lambda m: any(
                x.topic == f"{PREFIX}/status" and x.json()["state"] == "offline" for x in m
            ),
            timeout=30,
        )


def _epoch(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    from datetime import datetime

    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
