"""Issue 17's acceptance through the real daemon, with two independent client stacks: an
asyncua client and a node-opcua client (tests/node, run with the machine's Node.js) each
build their alarm list from ConditionRefresh and events and see the engine's active
alarms (as the retained MQTT alarm topics say them); each acknowledges one with a comment
as a named operator, and the engine's state (MQTT alarm topic and the condition) and the
alarm journal (with the user and comment) follow within one publish interval.

A real mosquitto on a free port, the daemon in a subprocess (simulated probes), a real
paho subscriber. `make test` installs node-opcua into tests/node (npm ci)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

from asyncua import Client, ua
from paho.mqtt import publish

from monitor.publishers.opcua_users import write_user
from monitor.store import DB_FILE
from tests.mosquitto import Subscriber, free_port, running_mosquitto
from tests.test_daemon_interfaces import Daemon
from tests.test_opcua_conditions import ack_args, call, refresh, subscribe_alarms

NODE_CLIENT = Path(__file__).parent / "node" / "alarm_client.js"
PREFIX = "cm-a-and-c"
PUBLISH_INTERVAL_S = 1.0
OI = ua.ObjectIds
SC = ua.StatusCodes


def _config(tmp_path: Path, broker_port: int, opcua_port: int, users: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
log_format = "json"
shutdown_grace = "5s"

[aggregation]
windows = ["10s", "30s"]
publish_interval = "{PUBLISH_INTERVAL_S:g}s"

[mqtt]
enabled = true
port = {broker_port}
topic_prefix = "{PREFIX}"
commands = true

[opcua]
enabled = true
security_profile = "demo"
endpoint = "opc.tcp://127.0.0.1:{opcua_port}/crystal-monitor"
users_file = "{users}"

[[alarms.definitions]]
id = "pg_high"
kind = "fraction_high"
priority = "high"
message = "PG {{value:.0%}} above {{limit:.0%}}"
class_name = "PG"
window = "10s"
limit = 0.3
min_count = 20

[[alarms.definitions]]
id = "cex_low"
kind = "fraction_low"
priority = "medium"
message = "CEX {{value:.0%}} below {{limit:.0%}}"
class_name = "CEX"
window = "10s"
limit = 0.1
min_count = 20

[[probes]]
id = "R1"
source = {{ type = "simulated", mode = "crop", fps = 10, profile = "constant:0.5", seed = 3 }}

[[probes]]
id = "R2"
source = {{ type = "simulated", mode = "crop", fps = 10, profile = "constant:0.5", seed = 4 }}
"""
    )
    return path


def _retained_alarms(sub: Subscriber) -> dict[tuple[str, str], dict[str, Any]]:
    """The newest alarm message per (probe, alarm id)."""
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for message in sub.received:
        parts = message.topic.split("/")
        if len(parts) == 4 and parts[2] == "alarms":
            newest[(parts[1], parts[3])] = message.json()
    return newest


def _journal(state_dir: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{state_dir / DB_FILE}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT entry FROM alarm_journal ORDER BY id").fetchall()
    return [json.loads(entry) for (entry,) in rows]


def test_alarm_list_from_refresh_matches_the_engine_and_an_ack_reaches_mqtt_and_journal(
    tmp_path: Path,
) -> None:
    users = tmp_path / "users"
    write_user(users, "anna", "anna-pass-1")
    opcua_port = free_port()
    url = f"opc.tcp://127.0.0.1:{opcua_port}/crystal-monitor"
    with running_mosquitto(tmp_path / "broker") as broker:
        config = _config(tmp_path, broker.port, opcua_port, users)
        sub = Subscriber(broker.port, [f"{PREFIX}/+/alarms/#"])
        daemon = Daemon(config, tmp_path / "daemon.log")
        with daemon, sub:
            daemon.start()
            raised = sub.wait_for(
                lambda _: all(
                    _retained_alarms(sub).get((probe, "pg_high"), {}).get("state")
                    == "active_unacknowledged"
                    for probe in ("R1", "R2")
                ),
                timeout=90,
            )
            assert raised, daemon.log.read_text()[-3000:]
            assert sub.wait_for(lambda _: len(_retained_alarms(sub)) == 4, timeout=20)
            engine_active = {key for key, alarm in _retained_alarms(sub).items() if alarm["active"]}
            assert engine_active == {("R1", "pg_high"), ("R2", "pg_high")}
            outcome = asyncio.run(_operator_session(url, sub))
            node = _node_session(url, sub, tmp_path / "node-pki")
            from_mqtt = asyncio.run(_shelved_over_mqtt(url, broker.port))
            state_dir = tmp_path / "state"
            journal = _journal(state_dir)
            assert daemon.terminate() == 0

    listed, ack_arrived_s = outcome["listed"], outcome["ack_arrived_s"]
    assert {key for key, event in listed.items() if event["ActiveState/Id"]} == engine_active
    assert set(listed) == engine_active  # only retained conditions are refreshed
    high = listed[("R1", "pg_high")]
    assert high["EventType"] == ua.NodeId(OI.ExclusiveLevelAlarmType)
    assert high["Severity"] == 750 and high["Retain"] is True
    assert high["Message"].Text.startswith("PG ")
    assert ack_arrived_s <= PUBLISH_INTERVAL_S, ack_arrived_s

    acked = outcome["acked_message"]
    assert acked["state"] == "active_acknowledged"
    assert acked["acknowledged_by"] == "anna"
    acknowledged = [e for e in journal if e["event"] == "acknowledge" and e["probe"] == "R1"]
    assert [(e["who"], e["comment"], e["accepted"]) for e in acknowledged] == [
        ("anna", "PG confirmed by the lab", True)
    ]
    comments = [e for e in journal if e["event"] == "comment"]
    assert [(e["probe"], e["who"], e["comment"]) for e in comments] == [
        ("R1", "anna", "batch to be filtered twice")
    ]
    event = outcome["acked_event"]
    assert event["AckedState/Id"] is True and event["ActiveState/Id"] is True
    assert event["ClientUserId"] == "anna"
    assert event["Comment"].Text == "PG confirmed by the lab"
    assert outcome["acked_variable"] is True
    assert outcome["again"] == SC.BadConditionBranchAlreadyAcked

    # node-opcua: the same list (R1 acknowledged by now, R2 not), then R2 acknowledged.
    report, node_arrival_s, node_message = node
    node_list = {(a["SourceName"], a["ConditionName"]): a for a in report["alarms"]}
    assert {key for key, a in node_list.items() if a["ActiveState.Id"]} == engine_active
    assert node_list[("R1", "pg_high")]["AckedState.Id"] is True
    assert node_list[("R1", "pg_high")]["ClientUserId"] == "anna"
    assert node_list[("R2", "pg_high")]["AckedState.Id"] is False
    assert node_list[("R2", "pg_high")]["EventType"] == "ns=0;i=9482"
    assert report["ackStatus"] == "Good"
    assert report["unknownEventStatus"] == "BadEventIdUnknown"
    assert report["ackedEvent"]["Comment"] == "acknowledged from node-opcua"
    assert report["ackedEvent"]["ClientUserId"] == "anna"
    assert node_arrival_s <= PUBLISH_INTERVAL_S, node_arrival_s
    assert node_message["acknowledged_by"] == "anna"
    from_node = [
        (e["probe"], e["who"], e["comment"])
        for e in journal
        if e["event"] == "acknowledge" and e["probe"] == "R2"
    ]
    assert from_node == [("R2", "anna", "acknowledged from node-opcua")]

    # The dashboard's and MQTT's path is the same engine: a shelve by MQTT shows on the
    # condition with its operator and comment.
    assert from_mqtt == ("TimedShelved", "ben", "flushing the line", True)


async def _operator_session(url: str, sub: Subscriber) -> dict[str, Any]:
    client = Client(url, timeout=10)
    client.set_user("anna")
    client.set_password("anna-pass-1")
    async with client:
        idx = await client.get_namespace_index("urn:crystal-monitor")
        subscription, collector = await subscribe_alarms(client)
        events = await refresh(client, subscription, collector)
        listed = {(e["SourceName"], e["ConditionName"]): e for e in events}
        high = listed[("R1", "pg_high")]
        node = ua.NodeId("CrystalMonitor.R1.Conditions.pg_high", idx)
        before = len(sub.received)
        started = time.monotonic()
        code = await call(
            client,
            node,
            OI.AcknowledgeableConditionType_Acknowledge,
            *ack_args(high["EventId"], "PG confirmed by the lab"),
        )
        assert code == SC.Good
        acked_variable = await client.get_node(
            ua.NodeId("CrystalMonitor.R1.Conditions.pg_high.AckedState.Id", idx)
        ).read_value()

        def ack_on_mqtt(received: list[Any]) -> bool:
            return any(
                m.topic == f"{PREFIX}/R1/alarms/pg_high" and m.json()["acknowledged"]
                for m in received[before:]
            )

        assert sub.wait_for(ack_on_mqtt, timeout=10)
        arrival = next(
            m
            for m in sub.received[before:]
            if m.topic == f"{PREFIX}/R1/alarms/pg_high" and m.json()["acknowledged"]
        )
        acked_event = await collector.next(
            lambda e: e.get("NodeId") == node and e["AckedState/Id"] is True
        )
        again = await call(
            client,
            node,
            OI.AcknowledgeableConditionType_Acknowledge,
            *ack_args(acked_event["EventId"], "again"),
        )
        comment = await call(
            client,
            node,
            OI.ConditionType_AddComment,
            *ack_args(acked_event["EventId"], "batch to be filtered twice"),
        )
        assert comment == SC.Good
        await subscription.delete()
    return {
        "listed": listed,
        "ack_arrived_s": arrival.at - started,
        "acked_message": arrival.json(),
        "acked_event": acked_event,
        "acked_variable": acked_variable,
        "again": again,
    }


def _node_session(url: str, sub: Subscriber, pki: Path) -> tuple[dict[str, Any], float, Any]:
    """Run the node-opcua client; (its report, seconds from its Acknowledge call to the
    acknowledged MQTT alarm message, that message)."""
    node = shutil.which("node")
    assert node, "Node.js is missing: install nodejs (20 or newer)"
    assert (NODE_CLIENT.parent / "node_modules" / "node-opcua").is_dir(), (
        "node-opcua is missing: run `make node-opcua` (npm ci in tests/node)"
    )
    before = len(sub.received)
    done = subprocess.run(
        [
            node,
            str(NODE_CLIENT),
            url,
            "anna",
            "anna-pass-1",
            "R2",
            "pg_high",
            "acknowledged from node-opcua",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "NODE_OPCUA_PKI": str(pki)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    report = json.loads(line.removeprefix("REPORT "))
    topic = f"{PREFIX}/R2/alarms/pg_high"

    def acked(received: list[Any]) -> bool:
        return any(m.topic == topic and m.json()["acknowledged"] for m in received[before:])

    assert sub.wait_for(acked, timeout=10)
    message = next(
        m for m in sub.received[before:] if m.topic == topic and m.json()["acknowledged"]
    )
    # Received.at is this process's monotonic clock; the client says its wall-clock time.
    requested = report["ackRequestedAt"] - (time.time() - time.monotonic())
    return report, message.at - requested, message.json()


async def _shelved_over_mqtt(url: str, broker_port: int) -> tuple[str, str, str, bool]:
    """Shelve R1's pg_high by an MQTT command as 'ben'; the condition's ShelvingState,
    ClientUserId, Comment and SuppressedOrShelved once it shows."""
    publish.single(
        f"{PREFIX}/R1/cmd/shelve",
        json.dumps(
            {"alarm_id": "pg_high", "minutes": 20, "who": "ben", "comment": "flushing the line"}
        ),
        qos=1,
        hostname="127.0.0.1",
        port=broker_port,
    )
    async with Client(url, timeout=10) as client:
        idx = await client.get_namespace_index("urn:crystal-monitor")
        base = "CrystalMonitor.R1.Conditions.pg_high"

        async def read(path: str) -> Any:
            return await client.get_node(ua.NodeId(f"{base}.{path}", idx)).read_value()

        deadline = time.monotonic() + 10
        while (await read("ShelvingState.CurrentState")).Text != "TimedShelved":
            assert time.monotonic() < deadline, "the MQTT shelve never reached the condition"
            await asyncio.sleep(0.1)
        return (
            (await read("ShelvingState.CurrentState")).Text,
            await read("ClientUserId"),
            (await read("Comment")).Text,
            await read("SuppressedOrShelved"),
        )
