"""What the plant reads, at the daemon level: every MQTT message a running daemon
publishes follows its JSON Schema, times are ISO 8601 UTC, no NaN anywhere, an alarm's
raise time survives an acknowledge, an operator action shows on every interface at once,
retained alarm states go out only when they change and are marked not current after a
clean stop, a second StartBatch is refused, and OPC UA NodeIds survive a restart.

A real mosquitto on a free port, the real daemon with its real MQTT, OPC UA and HTTP
servers, a real paho subscriber, a real asyncua client and plain HTTP requests. The
publish cycle is stepped by the test (ManualSchedule), so a retained alarm message that
arrives between two steps can only come from the operator action, not the next publish.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua

from monitor.config.settings import Settings, load_settings
from monitor.daemon import Daemon
from monitor.publishers.factory import create_publishers
from monitor.runtime.publish_cycle import ManualSchedule
from tests.mosquitto import Received, Subscriber, free_port, running_mosquitto
from tests.schemas import errors, schema_for_topic

PREFIX = "cm-out"
ISO = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"


def _settings(state: Path, broker_port: int, opcua_port: int, http_port: int) -> Settings:
    return load_settings(
        data={
            "daemon": {"state_dir": str(state), "shutdown_grace": "5s"},
            "aggregation": {"windows": ["10s", "30s"], "publish_interval": "1s"},
            "mqtt": {
                "enabled": True,
                "port": broker_port,
                "topic_prefix": PREFIX,
                "results": True,
                "commands": True,
                "reconnect_min": "1s",
                "reconnect_max": "1s",
            },
            "opcua": {
                "enabled": True,
                "security_profile": "demo",
                "endpoint": f"opc.tcp://127.0.0.1:{opcua_port}/crystal-monitor",
            },
            "http": {"enabled": True, "port": http_port},
            "alarms": {
                "definitions": [
                    {
                        "id": "pg_high",
                        "kind": "fraction_high",
                        "priority": "high",
                        "message": "PG {value:.0%} above {limit:.0%}",
                        "class_name": "PG",
                        "window": "10s",
                        "limit": 0.3,
                        "deadband": 0.05,
                        "min_count": 20,
                    },
                    {
                        # No trend in the first seconds: its value is null with a reason.
                        "id": "pg_rising",
                        "kind": "rate_of_change",
                        "priority": "medium",
                        "message": "PG share rising {value:.1%}/min",
                        "class_name": "PG",
                        "limit_per_min": 0.5,
                        "direction": "rising",
                    },
                ]
            },
            "probes": [
                {
                    "id": "R1",
                    "source": {
                        "type": "simulated",
                        "mode": "crop",
                        "fps": 20,
                        # PG well above the limit, then none: raised, then back to normal.
                        "profile": "step:0.7:0.0@25",
                        "seed": 3,
                    },
                }
            ],
        }
    )


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def _tick_until(
    schedule: ManualSchedule, condition: Callable[[], bool], timeout: float, every: float = 0.5
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        schedule.tick()
        if condition():
            return True
        time.sleep(every)
    return condition()


def _alarm_messages(sub: Subscriber, alarm_id: str) -> list[dict[str, Any]]:
    return [m.json() for m in sub.on(f"{PREFIX}/R1/alarms/{alarm_id}")]


def _latest_alarm(sub: Subscriber, alarm_id: str) -> dict[str, Any] | None:
    messages = _alarm_messages(sub, alarm_id)
    return messages[-1] if messages else None


def _check_every_message(messages: list[Received]) -> None:
    """Each payload valid against its topic's schema, with an ISO `ts`, and no NaN."""
    problems = []
    for message in messages:
        text = message.payload.decode()
        assert "nan" not in text.lower().replace("nanoparticle", ""), (message.topic, text)
        document = json.loads(text)
        name = schema_for_topic(PREFIX, message.topic)
        problems += [f"{message.topic}: {e}" for e in errors(name, document)]
        if "/cmd/" not in message.topic or message.topic.endswith("/reply"):
            assert "ts" in document, message.topic  # commands are the test's own, not ours
    assert not problems, problems[:10]


async def _acknowledge_over_opcua(url: str, alarm_id: str) -> dict[str, Any]:
    """Call Acknowledge and read the alarm's variables right after the call returns."""
    async with Client(url) as client:
        ns = await client.get_namespace_index("urn:crystal-monitor")
        probe = client.get_node(ua.NodeId("CrystalMonitor.R1", ns))
        await probe.call_method(ua.QualifiedName("Acknowledge", ns), alarm_id, "lab sample")
        base = f"CrystalMonitor.R1.Alarms.{alarm_id}"
        names = ("State", "Acknowledged", "AcknowledgedBy", "AcknowledgedAt", "ActiveSince")
        values = {}
        for name in names:
            values[name] = await client.get_node(ua.NodeId(f"{base}.{name}", ns)).read_value()
        return values


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Any]:
    with running_mosquitto(tmp_path / "broker") as running:
        yield running


def test_a_demo_like_run_publishes_only_valid_messages_and_keeps_the_raise_time(
    tmp_path: Path, broker: Any
) -> None:
    opcua_port, http_port = free_port(), free_port()
    settings = _settings(tmp_path / "state", broker.port, opcua_port, http_port)
    schedule = ManualSchedule()
    daemon = Daemon(settings, publishers=create_publishers(settings), publish_schedule=schedule)
    http = f"http://127.0.0.1:{http_port}"
    with Subscriber(broker.port, [f"{PREFIX}/#"]) as sub:
        daemon.start()
        try:
            # Before any frame: windows empty, no trend; nothing may say NaN.
            schedule.tick()
            for path in ("/api/state", "/api/alarms"):
                status, body = _get(http + path)
                assert status == 200 and "nan" not in body.lower(), body[:500]
            rising = next(
                a
                for a in json.loads(_get(http + "/api/alarms")[1])["states"]["R1"]
                if a["alarm_id"] == "pg_rising"
            )
            assert rising["value"] is None and rising["value_reason"]
            assert rising["message"] == "normal"

            # Raised: the retained alarm says so, with its raise time and trip text.
            assert _tick_until(
                schedule,
                lambda: (
                    (_latest_alarm(sub, "pg_high") or {}).get("state") == "active_unacknowledged"
                ),
                timeout=40,
            ), daemon.view.alarm_states("R1")
            raised = _latest_alarm(sub, "pg_high")
            assert raised is not None
            assert raised["current"] is True and raised["run_id"] and raised["unit"] == "fraction"
            assert raised["active_since"] == raised["state_since"]
            assert raised["message"] == raised["trip_message"]
            assert raised["message"].startswith("PG ") and raised["message"].endswith("above 30%")

            # Retained only on change: more ticks, values move, the alarm does not.
            count = len(_alarm_messages(sub, "pg_high"))
            for _ in range(4):
                schedule.tick()
                time.sleep(0.3)
            assert len(_alarm_messages(sub, "pg_high")) == count

            # Acknowledged over OPC UA, between two ticks: every interface shows it at once.
            before_ack = time.time()
            opcua = asyncio.run(
                _acknowledge_over_opcua(
                    f"opc.tcp://127.0.0.1:{opcua_port}/crystal-monitor", "pg_high"
                )
            )
            assert opcua["State"] == "active_acknowledged" and opcua["Acknowledged"] is True
            assert opcua["AcknowledgedBy"] == "anonymous"
            assert abs(opcua["ActiveSince"].timestamp() - _epoch(raised["active_since"])) < 0.002
            assert sub.wait_for(
                lambda _: (
                    (_latest_alarm(sub, "pg_high") or {}).get("state") == "active_acknowledged"
                ),
                timeout=5,
            )
            acked = _latest_alarm(sub, "pg_high")
            assert acked is not None
            assert acked["active_since"] == raised["active_since"]  # the raise time stays
            assert acked["acknowledged_by"] == "anonymous"
            assert _epoch(acked["acknowledged_at"]) >= before_ack - 0.01
            assert acked["state_since"] == acked["acknowledged_at"]
            assert acked["message"] == raised["message"]
            via_http = next(
                a
                for a in json.loads(_get(http + "/api/alarms")[1])["states"]["R1"]
                if a["alarm_id"] == "pg_high"
            )
            assert via_http["acknowledged"] is True
            assert via_http["active_since"] == raised["active_since"]
            assert via_http["acknowledged_at"] == acked["acknowledged_at"]

            # Back to normal once PG is gone: its own wording, the occurrence's times cleared.
            assert _tick_until(
                schedule,
                lambda: (_latest_alarm(sub, "pg_high") or {}).get("state") == "normal",
                timeout=60,
            ), daemon.view.alarm_states("R1")
            normal = _latest_alarm(sub, "pg_high")
            assert normal is not None and normal["message"] == "normal"
            assert normal["active_since"] is None and normal["acknowledged_at"] is None

            # A second StartBatch is refused with a reason, unless it ends the running one.
            replies = f"{PREFIX}/R1/cmd/reply"
            for request_id, body in (
                (1, {"action": "start", "batch_id": "B-1"}),
                (2, {"action": "start", "batch_id": "B-2"}),
                (3, {"action": "start", "batch_id": "B-2", "end_running": True}),
            ):
                command = {"who": "op-ana", "request_id": request_id, **body}
                assert not errors("cmd-batch.json", command)
                sub.client.publish(f"{PREFIX}/R1/cmd/batch", json.dumps(command), qos=1)
                assert sub.wait_for(
                    lambda _, r=request_id: any(
                        m.json()["request_id"] == r for m in sub.on(replies)
                    ),
                    timeout=10,
                )
            answers = {m.json()["request_id"]: m.json() for m in sub.on(replies)}
            assert answers[1]["accepted"] and answers[3]["accepted"]
            assert not answers[2]["accepted"]
            assert "B-1" in answers[2]["reason"] and "end_running" in answers[2]["reason"]
            assert daemon.probes["R1"].aggregator.batch == "B-2"
            assert sub.wait_for(
                lambda _: (
                    sum(1 for m in sub.on(f"{PREFIX}/R1/events") if m.json()["type"] == "batch")
                    >= 3
                ),
                timeout=10,
            )
            schedule.tick()
        finally:
            daemon.stop()

        # The events tell the occurrence: raised, acknowledged (raise time kept), cleared.
        events = [m.json() for m in sub.on(f"{PREFIX}/R1/events")]
        pg = [e for e in events if e.get("alarm_id") == "pg_high"]
        assert [e["to_state"] for e in pg] == [
            "active_unacknowledged",
            "active_acknowledged",
            "normal",
        ]
        assert pg[0]["active_since"] == pg[1]["active_since"] == raised["active_since"]
        assert pg[1]["who"] == "anonymous" and pg[2]["message"].startswith("back to normal")
        batches = [(e["action"], e["batch"]) for e in events if e["type"] == "batch"]
        assert batches == [("start", "B-1"), ("stop", "B-1"), ("start", "B-2")]
        assert sub.wait_for(
            lambda _: any(
                m.json().get("current") is False for m in sub.on(f"{PREFIX}/R1/alarms/pg_high")
            ),
            timeout=5,
        )
        _check_every_message(sub.received)
        topics = {m.topic for m in sub.received}
        assert {f"{PREFIX}/R1/results", f"{PREFIX}/R1/fractions", f"{PREFIX}/status"} <= topics
        # The schema check above saw size distributions with particles in them (crop mode:
        # each crop's main object; no pixel size, so in px).
        sized = [
            window["sizes"]
            for m in sub.on(f"{PREFIX}/R1/fractions")
            for window in m.json()["windows"].values()
            if window["sizes"]["classes"]["PG"]["count"] > 0
        ]
        assert sized and {s["unit"] for s in sized} == {"px"}
        assert all(s["classes"]["PG"]["d50"] > 0 for s in sized)

    # After the clean stop a newcomer reads the retained alarms as not current.
    with Subscriber(broker.port, [f"{PREFIX}/#"]) as late:
        assert late.wait_for(
            lambda m: (
                {x.topic for x in m}
                >= {
                    f"{PREFIX}/status",
                    f"{PREFIX}/R1/alarms/pg_high",
                    f"{PREFIX}/R1/alarms/pg_rising",
                }
            ),
            timeout=5,
        )
        status = late.on(f"{PREFIX}/status")[-1].json()
        assert status["state"] == "offline"
        for alarm_id in ("pg_high", "pg_rising"):
            retained = late.on(f"{PREFIX}/R1/alarms/{alarm_id}")[-1].json()
            assert retained["current"] is False and retained["run_id"] == raised["run_id"]
        _check_every_message(late.received)


async def _browse_ids(url: str) -> dict[str, ua.NodeId]:
    """Browse path -> NodeId of every node under Objects/CrystalMonitor and of our event
    type (with its fields)."""
    found: dict[str, ua.NodeId] = {}
    async with Client(url) as client:
        ns = await client.get_namespace_index("urn:crystal-monitor")

        async def walk(node: Any, path: str) -> None:
            found[path] = node.nodeid
            for child in await node.get_children():
                if child.nodeid.NamespaceIndex != ns:
                    continue  # standard nodes (types, modelling rules) are not ours
                name = (await child.read_browse_name()).Name
                await walk(child, f"{path}/{name}")

        await walk(await client.nodes.objects.get_child(f"{ns}:CrystalMonitor"), "CrystalMonitor")
        event_type = await client.nodes.base_event_type.get_child(f"{ns}:CrystalMonitorEventType")
        await walk(event_type, "CrystalMonitorEventType")
    return found


def test_opcua_node_ids_are_strings_and_the_same_after_a_restart(
    tmp_path: Path, broker: Any
) -> None:
    opcua_port = free_port()
    url = f"opc.tcp://127.0.0.1:{opcua_port}/crystal-monitor"
    browsed = []
    for _ in range(2):
        settings = _settings(tmp_path / "state", broker.port, opcua_port, free_port())
        schedule = ManualSchedule()
        daemon = Daemon(settings, publishers=create_publishers(settings), publish_schedule=schedule)
        daemon.start()
        try:
            schedule.tick()  # creates the probe's nodes
            browsed.append(asyncio.run(_browse_ids(url)))
        finally:
            daemon.stop()
    first, second = browsed
    assert first == second
    fraction = first["CrystalMonitor/R1/Fractions/PG/Fraction"]
    assert fraction.Identifier == "CrystalMonitor.R1.Fractions.PG.Fraction"
    assert "CrystalMonitor/R1/Alarms/pg_high/ActiveSince" in first
    assert "CrystalMonitor/R1/Fractions/PG/Fraction/EURange" in first
    assert "CrystalMonitor/R1/StartBatch/InputArguments" in first
    numeric = {
        path: node
        for path, node in first.items()
        if node.NodeIdType in (ua.NodeIdType.Numeric, ua.NodeIdType.TwoByte, ua.NodeIdType.FourByte)
    }
    assert not numeric, numeric
    assert len(first) > 60
