"""OPC UA Alarms and Conditions (Part 9) on the real asyncua server started by
OpcUaPublisher, read and driven by a real asyncua Client: condition instances of the
standard types, their events, ConditionRefresh, Acknowledge / AddComment / shelving
into the CommandHandler, and the production profile's roles.

The whole path through the daemon (engine, journal, MQTT) is in
tests/test_opcua_conditions_daemon.py."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.ua.uaerrors import UaStatusCodeError

from monitor.alarms import AlarmEngine
from monitor.config.opcua import OpcUaConfig
from monitor.publishers.base import CommandResult
from monitor.publishers.opcua import OpcUaPublisher
from monitor.publishers.opcua_users import write_user
from tests.test_alarms import PROBE, RETURNED, T0, high, run
from tests.test_opcua import (
    NS,
    alarm_status,
    free_port,
    make_client_certificate,
    make_update,
    secure_client,
)

SC = ua.StatusCodes
OI = ua.ObjectIds


class StatefulCommands:
    """A CommandHandler over alarm statuses held here: an accepted acknowledge, shelve
    or unshelve changes the status and announces it as OperatorCommands does
    (publish_alarms before returning). Every call is recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.publisher: OpcUaPublisher | None = None
        self.statuses: dict[str, list[dict[str, Any]]] = {}

    def _alarm(self, probe: str, alarm_id: str) -> dict[str, Any] | None:
        for status in self.statuses.get(probe, []):
            if status["alarm_id"] == alarm_id:
                return status
        return None

    @staticmethod
    def _acted(alarm: dict[str, Any], who: str, comment: str) -> None:
        """Who acted last and the last non-empty comment, as the engine keeps them."""
        alarm["operator"] = who
        if comment.strip():
            alarm["comment"] = comment

    def _announce(self, probe: str) -> None:
        assert self.publisher is not None
        self.publisher.publish_alarms(probe, copy.deepcopy(self.statuses[probe]))

    def acknowledge(self, probe: str, alarm_id: str, who: str, comment: str) -> CommandResult:
        self.calls.append(("acknowledge", probe, alarm_id, who, comment))
        alarm = self._alarm(probe, alarm_id)
        if alarm is None or alarm["acknowledged"]:
            return CommandResult(False, "only an unacknowledged alarm can be acknowledged")
        alarm.update(
            acknowledged=True,
            state="active_acknowledged" if alarm["active"] else "normal",
            acknowledged_by=who,
            acknowledged_at=time.time(),
            state_since=time.time(),
        )
        self._acted(alarm, who, comment)
        self._announce(probe)
        return CommandResult(True)

    def shelve(
        self,
        probe: str,
        alarm_id: str,
        minutes: float,
        who: str,
        comment: str,
        *,
        one_shot: bool = False,
    ) -> CommandResult:
        self.calls.append(("shelve", probe, alarm_id, minutes, who, comment, one_shot))
        alarm = self._alarm(probe, alarm_id)
        if alarm is None:
            return CommandResult(False, "unknown alarm")
        if one_shot and not alarm["active"]:
            return CommandResult(False, "only an active alarm can be shelved until it clears")
        if one_shot:
            minutes = min(minutes, 60)
        if minutes > 60:
            return CommandResult(False, "shelve for 1e+06s refused: the longest allowed is 1 h")
        alarm.update(
            shelved=True,
            shelved_until=time.time() + minutes * 60,
            shelved_by=who,
            shelved_one_shot=one_shot,
        )
        self._acted(alarm, who, comment)
        self._announce(probe)
        return CommandResult(True)

    def unshelve(self, probe: str, alarm_id: str, who: str, comment: str) -> CommandResult:
        self.calls.append(("unshelve", probe, alarm_id, who, comment))
        alarm = self._alarm(probe, alarm_id)
        if alarm is None or not alarm["shelved"]:
            return CommandResult(False, f"alarm {alarm_id!r} is not shelved")
        alarm.update(shelved=False, shelved_until=None, shelved_by=None, shelved_one_shot=False)
        self._acted(alarm, who, comment)
        self._announce(probe)
        return CommandResult(True)

    def add_comment(self, probe: str, alarm_id: str, who: str, comment: str) -> CommandResult:
        self.calls.append(("add_comment", probe, alarm_id, who, comment))
        if not comment.strip():
            return CommandResult(False, "the comment is empty: write what should go on record")
        alarm = self._alarm(probe, alarm_id)
        if alarm is None:
            return CommandResult(False, "unknown alarm")
        self._acted(alarm, who, comment)
        self._announce(probe)
        return CommandResult(True)

    def start_batch(
        self, probe: str, batch_id: str, who: str, *, end_running: bool = False
    ) -> CommandResult:
        return CommandResult(False, "not here")

    def stop_batch(self, probe: str, who: str) -> CommandResult:
        return CommandResult(False, "not here")


@dataclass
class Served:
    publisher: OpcUaPublisher
    commands: StatefulCommands
    url: str

    def show(self, probe: str, alarms: list[dict[str, Any]]) -> None:
        """The engine's statuses of `probe` as the publish cycle hands them over."""
        self.commands.statuses[probe] = alarms
        self.publisher.publish_update(make_update(probe, ts=time.time(), alarms=alarms))


def status(
    probe: str,
    alarm_id: str,
    kind: str,
    *,
    active: bool,
    category: str = "process",
    priority: str = "high",
    severity: int = 750,
) -> dict[str, Any]:
    alarm = alarm_status(alarm_id, kind=kind, active=active)
    alarm.update(
        probe=probe,
        category=category,
        priority=priority,
        severity=severity,
        unit="fraction" if kind.startswith("fraction") else "s",
        acknowledged_by=None,
        acknowledged_at=None,
        state_since=time.time() if active else None,
        message="PG above 3 %" if active else "normal",
    )
    return alarm


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    state_dir = tmp_path_factory.mktemp("conditions")
    url = f"opc.tcp://127.0.0.1:{free_port()}/crystal-monitor"
    config = OpcUaConfig(enabled=True, endpoint=url, namespace_uri=NS, security_profile="demo")
    publisher = OpcUaPublisher(config, state_dir)
    commands = StatefulCommands()
    commands.publisher = publisher
    publisher.start(commands)
    try:
        yield Served(publisher, commands, url)
    finally:
        publisher.stop()


class Collector:
    """Event notifications in arrival order, as dicts of the selected fields."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.item: Any = None
        """The server's MonitoredItemId of the event item."""

    def event_notification(self, event: Any) -> None:
        fields = {
            name: value.Value for name, value in event.get_event_props_as_fields_dict().items()
        }
        self.queue.put_nowait(fields)

    async def next(self, check: Any = lambda _: True, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no matching event in time")
            event = await asyncio.wait_for(self.queue.get(), timeout=left)
            if check(event):
                return event

    def drain(self) -> list[dict[str, Any]]:
        events = []
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events


async def subscribe_alarms(client: Client, node: Any = None) -> tuple[Any, Collector]:
    """Subscribe like a SCADA alarm list: AlarmConditionType and its subtypes plus the
    refresh markers, from the Server object (or `node`)."""
    collector = Collector()
    subscription = await client.create_subscription(50, collector)
    collector.item = await subscription.subscribe_events(
        node or client.nodes.server,
        [
            client.get_node(OI.AlarmConditionType),
            client.get_node(OI.RefreshStartEventType),
            client.get_node(OI.RefreshEndEventType),
        ],
    )
    return subscription, collector


async def refresh(client: Client, subscription: Any, collector: Collector) -> list[dict[str, Any]]:
    """ConditionRefresh on the ConditionType; the condition events between the markers."""
    collector.drain()
    await client.get_node(OI.ConditionType).call_method(
        ua.NodeId(OI.ConditionType_ConditionRefresh),
        ua.Variant(subscription.subscription_id, ua.VariantType.UInt32),
    )
    start = await collector.next(lambda e: e["EventType"] == ua.NodeId(OI.RefreshStartEventType))
    assert start is not None
    conditions = []
    while True:
        event = await collector.next()
        if event["EventType"] == ua.NodeId(OI.RefreshEndEventType):
            return conditions
        conditions.append(event)


def condition_id(client: Client, probe: str, alarm_id: str, idx: int) -> ua.NodeId:
    return ua.NodeId(f"CrystalMonitor.{probe}.Conditions.{alarm_id}", idx)


async def call(client: Client, obj: ua.NodeId, method: int, *args: ua.Variant) -> int:
    """The status code of one method call (asyncua raises on Bad; we want the code)."""
    request = ua.CallMethodRequest()
    request.ObjectId = obj
    request.MethodId = ua.NodeId(method)
    request.InputArguments = list(args)
    [result] = await client.uaclient.call([request])
    return int(result.StatusCode.value)


def ack_args(event_id: bytes, comment: str) -> tuple[ua.Variant, ua.Variant]:
    return (
        ua.Variant(event_id, ua.VariantType.ByteString),
        ua.Variant(ua.LocalizedText(comment, "en"), ua.VariantType.LocalizedText),
    )


def test_each_alarm_is_a_condition_of_its_standard_type_under_its_probe(served: Served) -> None:
    """fraction_high -> ExclusiveLevelAlarmType, probe_stale -> OffNormalAlarmType, shift
    -> AlarmConditionType; each a HasComponent and HasCondition of the probe, the probe an
    event notifier; the state variables (with Id), Severity, Retain, Message, Quality
    follow the status; HighLimit is the limit in percent."""
    served.show(
        "C1",
        [
            status("C1", "pg_high", "fraction_high", active=True),
            status("C1", "stale", "probe_stale", active=False, category="diagnostic"),
            status("C1", "pg_shift", "shift", active=False, priority="low", severity=250),
        ],
    )

    async def scenario() -> None:
        async with Client(served.url, timeout=10) as client:
            idx = await client.get_namespace_index(NS)
            probe = client.get_node(ua.NodeId("CrystalMonitor.C1", idx))
            level = client.get_node(condition_id(client, "C1", "pg_high", idx))

            async def ready() -> Any:
                return await (await level.get_child("0:ActiveState")).get_child("0:Id")

            active_id = None
            for _ in range(100):
                try:
                    active_id = await ready()
                    if await active_id.read_value():
                        break
                except UaStatusCodeError:
                    pass
                await asyncio.sleep(0.05)
            assert active_id is not None and await active_id.read_value() is True
            types = {}
            for alarm_id in ("pg_high", "stale", "pg_shift"):
                node = client.get_node(condition_id(client, "C1", alarm_id, idx))
                types[alarm_id] = await node.read_type_definition()
            assert types == {
                "pg_high": ua.NodeId(OI.ExclusiveLevelAlarmType),
                "stale": ua.NodeId(OI.OffNormalAlarmType),
                "pg_shift": ua.NodeId(OI.AlarmConditionType),
            }
            conditions = await probe.get_referenced_nodes(OI.HasCondition)
            assert {n.nodeid for n in conditions} == {
                condition_id(client, "C1", a, idx) for a in ("pg_high", "stale", "pg_shift")
            }
            components = await probe.get_children(refs=OI.HasComponent)
            assert level.nodeid in {n.nodeid for n in components}
            notifier = await probe.read_event_notifier()
            assert ua.EventNotifier.SubscribeToEvents in notifier

            async def value(node: Any, *path: str) -> Any:
                return await (await node.get_child([f"0:{p}" for p in path])).read_value()

            assert (await value(level, "ActiveState")).Text == "Active"
            assert await value(level, "AckedState", "Id") is False
            assert await value(level, "ConfirmedState", "Id") is False
            assert await value(level, "EnabledState", "Id") is True
            assert await value(level, "SuppressedState", "Id") is False
            assert await value(level, "Retain") is True
            assert await value(level, "Severity") == 750
            assert await value(level, "ConditionName") == "pg_high"
            assert await value(level, "SourceName") == "C1"
            assert (await value(level, "Message")).Text == "PG above 3 %"
            assert await value(level, "HighLimit") == pytest.approx(3.0)
            assert (await value(level, "LimitState", "CurrentState")).Text == "High"
            shelving = await value(level, "ShelvingState", "CurrentState", "Id")
            assert shelving == ua.NodeId(OI.ShelvedStateMachineType_Unshelved)
            quality = await (await level.get_child("0:Quality")).read_value()
            assert quality.is_good()
            stale = client.get_node(condition_id(client, "C1", "stale", idx))
            assert await value(stale, "ActiveState", "Id") is False
            assert await value(stale, "Retain") is False
            assert await value(stale, "ConditionClassId") == ua.NodeId(
                OI.MaintenanceConditionClassType
            )

    asyncio.run(scenario())


def test_refresh_resends_retained_conditions_and_acknowledge_goes_to_the_handler(
    served: Served,
) -> None:
    """A late client: ConditionRefresh on the ConditionType re-sends the retained
    conditions (not the normal one) between RefreshStart and RefreshEnd; Acknowledge with
    the refreshed EventId and a comment reaches the handler as the session's user, and
    the next event (new EventId) says acknowledged with the comment and user; acking
    again is BadConditionBranchAlreadyAcked, an unknown EventId BadEventIdUnknown."""
    served.show(
        "C2",
        [
            status("C2", "pg_high", "fraction_high", active=True),
            status("C2", "stale", "probe_stale", active=True, category="diagnostic"),
            status("C2", "pg_low", "fraction_low", active=False),
        ],
    )
    time.sleep(0.5)

    async def scenario() -> None:
        async with Client(served.url, timeout=10) as client:
            idx = await client.get_namespace_index(NS)
            subscription, collector = await subscribe_alarms(client)
            listed = await refresh(client, subscription, collector)
            mine = {e["ConditionName"]: e for e in listed if e["SourceName"] == "C2"}
            assert set(mine) == {"pg_high", "stale"}
            high = mine["pg_high"]
            assert high["EventType"] == ua.NodeId(OI.ExclusiveLevelAlarmType)
            assert mine["stale"]["EventType"] == ua.NodeId(OI.OffNormalAlarmType)
            assert high["ActiveState/Id"] is True and high["AckedState/Id"] is False
            assert high["Retain"] is True and high["Severity"] == 750
            assert high["SourceNode"] == ua.NodeId("CrystalMonitor.C2", idx)
            assert high["NodeId"] == condition_id(client, "C2", "pg_high", idx)
            assert high["Message"].Text == "PG above 3 %"
            assert high["Time"] is not None and high["ReceiveTime"] is not None
            event_ids = [e["EventId"] for e in listed]
            assert len(set(event_ids)) == len(event_ids)

            node = condition_id(client, "C2", "pg_high", idx)
            unknown = await call(
                client,
                node,
                OI.AcknowledgeableConditionType_Acknowledge,
                *ack_args(b"not-an-event", "x"),
            )
            assert unknown == SC.BadEventIdUnknown
            started = time.monotonic()
            code = await call(
                client,
                node,
                OI.AcknowledgeableConditionType_Acknowledge,
                *ack_args(high["EventId"], "checked the probe window"),
            )
            assert code == SC.Good
            acked = await collector.next(
                lambda e: e.get("NodeId") == node and e["AckedState/Id"] is True, timeout=5
            )
            assert time.monotonic() - started < 2.0
            assert acked["EventId"] != high["EventId"]
            assert acked["Comment"].Text == "checked the probe window"
            assert acked["ClientUserId"] == "anonymous"
            assert acked["ActiveState/Id"] is True and acked["Retain"] is True
            assert acked["ConfirmedState/Id"] is True
            again = await call(
                client,
                node,
                OI.AcknowledgeableConditionType_Acknowledge,
                *ack_args(acked["EventId"], "twice"),
            )
            assert again == SC.BadConditionBranchAlreadyAcked

            comment = await call(
                client,
                node,
                OI.ConditionType_AddComment,
                *ack_args(acked["EventId"], "PG sample sent to the lab"),
            )
            assert comment == SC.Good
            commented = await collector.next(
                lambda e: e.get("NodeId") == node and e["Comment"].Text.startswith("PG sample")
            )
            assert commented["AckedState/Id"] is True
            empty = await call(
                client, node, OI.ConditionType_AddComment, *ack_args(acked["EventId"], " ")
            )
            assert empty == SC.BadInvalidArgument
            await subscription.delete()

    asyncio.run(scenario())
    calls = served.commands.calls
    assert ("acknowledge", "C2", "pg_high", "anonymous", "checked the probe window") in calls
    assert ("add_comment", "C2", "pg_high", "anonymous", "PG sample sent to the lab") in calls
    assert not any(c[0] == "acknowledge" and c[4] in {"x", "twice"} for c in calls)


def test_refresh_from_the_probe_and_refresh2_for_one_item(served: Served) -> None:
    """Subscribed to the probe's object (its event notifier): the events come from it, a
    refresh re-sends only that probe's conditions; ConditionRefresh2 names one item; a
    wrong subscription id, or another session's, is BadSubscriptionIdInvalid."""
    served.show("C3", [status("C3", "pg_high", "fraction_high", active=True)])
    served.show("C4", [status("C4", "pg_high", "fraction_high", active=True)])
    time.sleep(0.5)

    async def scenario() -> None:
        async with Client(served.url, timeout=10) as client:
            idx = await client.get_namespace_index(NS)
            probe = client.get_node(ua.NodeId("CrystalMonitor.C3", idx))
            subscription, collector = await subscribe_alarms(client, probe)
            listed = await refresh(client, subscription, collector)
            assert {(e["SourceName"], e["ConditionName"]) for e in listed} == {("C3", "pg_high")}
            mid = collector.item
            collector.drain()
            code = await call(
                client,
                ua.NodeId(OI.Server),
                OI.ConditionType_ConditionRefresh2,
                ua.Variant(subscription.subscription_id, ua.VariantType.UInt32),
                ua.Variant(mid, ua.VariantType.UInt32),
            )
            assert code == SC.Good
            refreshed = await collector.next(lambda e: e.get("ConditionName") == "pg_high")
            assert refreshed["SourceName"] == "C3"
            wrong = await call(
                client,
                ua.NodeId(OI.ConditionType),
                OI.ConditionType_ConditionRefresh,
                ua.Variant(987654, ua.VariantType.UInt32),
            )
            assert wrong == SC.BadSubscriptionIdInvalid
            async with Client(served.url, timeout=10) as other:
                foreign = await call(
                    other,
                    ua.NodeId(OI.ConditionType),
                    OI.ConditionType_ConditionRefresh,
                    ua.Variant(subscription.subscription_id, ua.VariantType.UInt32),
                )
                assert foreign == SC.BadSubscriptionIdInvalid  # not that session's
            await subscription.delete()

    asyncio.run(scenario())


def test_an_event_of_an_earlier_occurrence_does_not_acknowledge_a_new_one(
    served: Served,
) -> None:
    """Raised, returned unacknowledged, raised again: Acknowledge with an EventId of the
    first occurrence is BadEventIdUnknown (the operator saw the old one); with the new
    occurrence's EventId it is accepted. Every event has a new EventId and LastSeverity
    keeps the severity before the change."""
    first = status("C6", "pg_high", "fraction_high", active=True)

    async def scenario() -> None:
        async with Client(served.url, timeout=10) as client:
            idx = await client.get_namespace_index(NS)
            node = condition_id(client, "C6", "pg_high", idx)
            subscription, collector = await subscribe_alarms(client)
            served.show("C6", [first])
            raised = await collector.next(lambda e: e.get("NodeId") == node)
            returned = dict(first, active=False, state="returned_unacknowledged")
            returned["message"] = "returned to normal, not acknowledged (was: PG above 3 %)"
            served.show("C6", [returned])
            back = await collector.next(lambda e: e.get("NodeId") == node)
            assert back["ActiveState/Id"] is False and back["Retain"] is True
            again = dict(first, severity=1000, priority="critical", state_since=time.time())
            served.show("C6", [again])
            second = await collector.next(lambda e: e.get("NodeId") == node)
            assert second["ActiveState/Id"] is True
            assert (second["Severity"], second["LastSeverity"]) == (1000, 750)
            ids = {raised["EventId"], back["EventId"], second["EventId"]}
            assert len(ids) == 3
            ack = OI.AcknowledgeableConditionType_Acknowledge
            old = await call(client, node, ack, *ack_args(raised["EventId"], "old"))
            assert old == SC.BadEventIdUnknown
            new = await call(client, node, ack, *ack_args(second["EventId"], "new"))
            assert new == SC.Good
            await subscription.delete()

    asyncio.run(scenario())


def test_shelving_methods_follow_the_engine_and_refuse_with_part_9_codes(served: Served) -> None:
    """TimedShelve (ms) on ShelvingState reaches shelve() in minutes and shows
    TimedShelved with SuppressedOrShelved; a second TimedShelve is
    BadConditionAlreadyShelved; Unshelve ends it (a second one BadConditionNotShelved);
    too long a time is BadShelvingTimeOutOfRange; OneShotShelve shows OneShotShelved (a
    second one BadConditionAlreadyShelved) and is refused for an inactive alarm."""
    served.show("C5", [status("C5", "pg_high", "fraction_high", active=True)])
    time.sleep(0.5)

    async def scenario() -> None:
        async with Client(served.url, timeout=10) as client:
            idx = await client.get_namespace_index(NS)
            condition = condition_id(client, "C5", "pg_high", idx)
            shelving = ua.NodeId(f"{condition.Identifier}.ShelvingState", idx)
            subscription, collector = await subscribe_alarms(client)
            timed = OI.ShelvedStateMachineType_TimedShelve
            minutes_30 = ua.Variant(30 * 60_000.0, ua.VariantType.Double)
            assert await call(client, shelving, timed, minutes_30) == SC.Good
            event = await collector.next(lambda e: e.get("NodeId") == condition)
            assert event["ShelvingState/CurrentState/Id"] == ua.NodeId(
                OI.ShelvedStateMachineType_TimedShelved
            )
            assert event["SuppressedOrShelved"] is True
            left = await client.get_node(
                ua.NodeId(f"{condition.Identifier}.ShelvingState.UnshelveTime", idx)
            ).read_value()
            assert 29 * 60_000 < left <= 30 * 60_000
            assert await call(client, shelving, timed, minutes_30) == SC.BadConditionAlreadyShelved
            unshelve = OI.ShelvedStateMachineType_Unshelve
            assert await call(client, shelving, unshelve) == SC.Good
            event = await collector.next(lambda e: e.get("NodeId") == condition)
            assert event["SuppressedOrShelved"] is False
            assert await call(client, shelving, unshelve) == SC.BadConditionNotShelved
            too_long = ua.Variant(1e9, ua.VariantType.Double)
            assert await call(client, shelving, timed, too_long) == SC.BadShelvingTimeOutOfRange
            one_shot = OI.ShelvedStateMachineType_OneShotShelve
            assert await call(client, shelving, one_shot) == SC.Good
            event = await collector.next(lambda e: e.get("NodeId") == condition)
            assert event["ShelvingState/CurrentState/Id"] == ua.NodeId(
                OI.ShelvedStateMachineType_OneShotShelved
            )
            assert event["ShelvingState/CurrentState"].Text == "OneShotShelved"
            assert await call(client, shelving, one_shot) == SC.BadConditionAlreadyShelved
            assert await call(client, shelving, unshelve) == SC.Good
            await collector.next(lambda e: e.get("NodeId") == condition)
            served.commands.statuses["C5"][0].update(active=False, state="returned_unacknowledged")
            assert await call(client, shelving, one_shot) == SC.BadRequestNotAllowed
            await subscription.delete()

    asyncio.run(scenario())
    calls = served.commands.calls
    assert ("shelve", "C5", "pg_high", 30.0, "anonymous", "TimedShelve (OPC UA)", False) in calls
    one_shots = [c for c in calls if c[0] == "shelve" and c[6]]
    assert [c[5] for c in one_shots] == ["OneShotShelve (OPC UA)"] * 2
    assert ("unshelve", "C5", "pg_high", "anonymous", "Unshelve (OPC UA)") in calls


# -- production profile -------------------------------------------------------------------


@dataclass
class Secured:
    publisher: OpcUaPublisher
    commands: StatefulCommands
    url: str
    state_dir: Path
    trusted: tuple[Path, Path]

    @property
    def server_certificate(self) -> Path:
        return self.state_dir / "opcua" / "server_cert.der"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    base = tmp_path_factory.mktemp("conditions-production")
    state_dir, trust_dir = base / "state", base / "trusted"
    trusted = make_client_certificate(base / "client", "trusted-client")
    trust_dir.mkdir()
    (trust_dir / "trusted-client.der").write_bytes(trusted[0].read_bytes())
    users = base / "users"
    write_user(users, "anna", "anna-pass-1")
    write_user(users, "vic", "vic-pass-1", role="viewer")
    url = f"opc.tcp://127.0.0.1:{free_port()}/crystal-monitor"
    config = OpcUaConfig(
        enabled=True, endpoint=url, namespace_uri=NS, users_file=users, trust_dir=trust_dir
    )
    publisher = OpcUaPublisher(config, state_dir)
    commands = StatefulCommands()
    commands.publisher = publisher
    publisher.start(commands)
    alarms = [status("S1", "pg_high", "fraction_high", active=True)]
    commands.statuses["S1"] = alarms
    publisher.publish_update(make_update("S1", ts=time.time(), alarms=alarms))
    try:
        yield Secured(publisher, commands, url, state_dir, trusted)
    finally:
        publisher.stop()


def test_production_viewer_may_refresh_but_not_acknowledge_and_operator_may(
    secured: Secured,
) -> None:
    """A viewer's ConditionRefresh works, its Acknowledge / AddComment / TimedShelve are
    BadUserAccessDenied and never reach the handler; an operator's Acknowledge is
    journalled under its own user name; an anonymous session is refused outright."""

    async def session(user: str | None, password: str | None) -> Client:
        return await secure_client(secured, user, password)  # type: ignore[arg-type]

    async def scenario() -> None:
        viewer = await session("vic", "vic-pass-1")
        async with viewer:
            idx = await viewer.get_namespace_index(NS)
            subscription, collector = await subscribe_alarms(viewer)
            listed = await refresh(viewer, subscription, collector)
            [high] = [e for e in listed if e["SourceName"] == "S1"]
            node = condition_id(viewer, "S1", "pg_high", idx)
            for method, args in (
                (OI.AcknowledgeableConditionType_Acknowledge, ack_args(high["EventId"], "v")),
                (OI.ConditionType_AddComment, ack_args(high["EventId"], "v")),
            ):
                assert await call(viewer, node, method, *args) == SC.BadUserAccessDenied
            shelving = ua.NodeId(f"{node.Identifier}.ShelvingState", idx)
            minutes = ua.Variant(60_000.0, ua.VariantType.Double)
            timed = OI.ShelvedStateMachineType_TimedShelve
            assert await call(viewer, shelving, timed, minutes) == SC.BadUserAccessDenied
            await subscription.delete()
            event_id = high["EventId"]

        operator = await session("anna", "anna-pass-1")
        async with operator:
            node = condition_id(operator, "S1", "pg_high", idx)
            ack = OI.AcknowledgeableConditionType_Acknowledge
            assert await call(operator, node, ack, *ack_args(event_id, "on it")) == SC.Good

        anonymous = await session(None, None)
        with pytest.raises(UaStatusCodeError) as refused:
            await anonymous.connect()
        assert refused.value.code == SC.BadIdentityTokenRejected

    asyncio.run(scenario())
    calls = secured.commands.calls
    assert not any(c[3] == "vic" for c in calls if c[0] in {"acknowledge", "add_comment"})
    assert not any(c[0] == "shelve" for c in calls)
    assert ("acknowledge", "S1", "pg_high", "anna", "on it") in calls


def test_engine_add_comment_is_journalled_with_who_and_changes_no_state() -> None:
    """AddComment's engine side: accepted comments are journal entries 'comment' with the
    operator; an empty comment, no operator or an unknown alarm is refused and journalled
    as refused; the alarm's state is untouched but for its `operator` and `comment`, which
    an acknowledge without a comment leaves in place."""
    engine = AlarmEngine([high()])
    run(engine, [0.12], start=T0)
    before = [s.to_json() for s in engine.alarm_states(PROBE)]
    engine.drain_journal()
    assert engine.add_comment(PROBE, "pg_high", "anna", "lab sample taken", T0 + 50).accepted
    empty = engine.add_comment(PROBE, "pg_high", "anna", "  ", T0 + 51)
    nobody = engine.add_comment(PROBE, "pg_high", "", "x", T0 + 52)
    unknown = engine.add_comment(PROBE, "nope", "anna", "x", T0 + 53)
    assert not (empty.accepted or nobody.accepted or unknown.accepted)
    assert empty.reason is not None and "empty" in empty.reason
    journal = [(e.event, e.accepted, e.who, e.comment) for e in engine.drain_journal()]
    assert journal == [
        ("comment", True, "anna", "lab sample taken"),
        ("comment", False, "anna", "  "),
        ("comment", False, "", "x"),
        ("comment", False, "anna", "x"),
    ]
    after = [s.to_json() for s in engine.alarm_states(PROBE)]
    for status_json in (*before, *after):
        for key in ("operator", "comment", "comment_at"):
            status_json.pop(key)
    assert after == before
    [commented] = engine.alarm_states(PROBE)
    assert (commented.operator, commented.comment, commented.comment_at) == (
        "anna",
        "lab sample taken",
        T0 + 50,
    )
    engine.acknowledge(PROBE, "pg_high", "ben", "", T0 + 60)
    [acked] = engine.alarm_states(PROBE)
    assert (acked.operator, acked.comment) == ("ben", "lab sample taken")  # empty: kept


def test_engine_one_shot_shelve_ends_when_the_alarm_is_no_longer_active() -> None:
    """OneShotShelve's engine side: only an active alarm; its return is journalled but not
    announced, and the shelve ends then with an announced 'unshelve' marker; the limit is
    capped at max_shelve_s; the flag survives a restart."""
    engine = AlarmEngine([high()], max_shelve_s=3600)
    run(engine, [0.05], start=T0 - 10)
    refused = engine.shelve(PROBE, "pg_high", 1e9, "anna", "x", T0, one_shot=True)
    assert not refused.accepted and refused.reason and "only an active alarm" in refused.reason
    run(engine, [0.12], start=T0)
    assert engine.shelve(PROBE, "pg_high", 1e9, "anna", "known", T0 + 5, one_shot=True).accepted
    [shelved] = engine.alarm_states(PROBE)
    assert shelved.shelved and shelved.shelved_one_shot
    assert shelved.shelved_until == T0 + 5 + 3600
    restored = AlarmEngine([high()], state=engine.export_state(), max_shelve_s=3600)
    assert restored.alarm_states(PROBE)[0].to_json()["shelved_one_shot"] is True
    assert run(restored, [0.12], start=T0 + 10) == []  # still active: stays shelved
    [marker] = run(restored, [0.05], start=T0 + 20)
    assert (marker.cause, marker.to_state, marker.announced) == ("unshelve", RETURNED, True)
    [after] = restored.alarm_states(PROBE)
    assert not after.shelved and not after.shelved_one_shot
