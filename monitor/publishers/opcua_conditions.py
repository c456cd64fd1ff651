"""OPC UA Alarms and Conditions (Part 9): the OPC UA face of our alarm engine.

asyncua has no server-side condition logic; the alarm state machine is ours
(`monitor.alarms.engine`). This module shows each alarm of each probe as a condition
instance of a standard type, emits the standard condition events and answers the
standard methods by handing them to the same `CommandHandler` (the daemon's
`OperatorCommands`) as the dashboard and the MQTT commands:

    Objects/CrystalMonitor/<probe>                  event notifier (SubscribeToEvents)
      <alarm_id>    HasComponent and HasCondition of the probe;
                    NodeId CrystalMonitor.<probe>.Conditions.<alarm_id>
        type: ExclusiveLevelAlarmType (fraction_high, fraction_low),
              ExclusiveRateOfChangeAlarmType (rate_of_change),
              OffNormalAlarmType (probe_stale, image_quality, out_of_distribution,
              uncertain_high), AlarmConditionType (shift, publish_overflow)
        EnabledState, ActiveState, AckedState, ConfirmedState, SuppressedState (.Id),
        ShelvingState (CurrentState, UnshelveTime, TimedShelve, OneShotShelve, Unshelve),
        Severity, LastSeverity, Message, Retain, Quality, Comment, ClientUserId, ...

How the engine's state maps: ActiveState = the alarm is active (active_unacknowledged
or active_acknowledged); AckedState = acknowledged (normal or active_acknowledged);
ConfirmedState follows AckedState (the monitor has no separate confirm step);
SuppressedState = suppressed by bad input; ShelvingState = TimedShelved while shelved
for a time, OneShotShelved while shelved until it is no longer active;
Severity = the priority's severity (250/500/750/1000); Retain = not normal; Quality =
the probe's input quality (Good, Uncertain, Bad); ClientUserId and Comment = the
status's `operator` (who acted last on this occurrence: acknowledge, shelve, comment,
from any interface) and `comment` (the last comment given with such an action).

Every change of that state emits one event of the condition's type with a new EventId
from the probe's object and from the Server object (asyncua delivers an event only to
subscribers of the node that emits it; Part 9 clients usually subscribe to Server).
ConditionRefresh / ConditionRefresh2 re-send the newest event of every retained
condition, between a RefreshStartEvent and a RefreshEndEvent, to each event
monitored item of the subscription. Acknowledge and AddComment must name an EventId
the condition has sent (BadEventIdUnknown otherwise).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from asyncua import ua
from asyncua.common import event_objects
from asyncua.common.events import Event
from asyncua.common.instantiate_util import instantiate
from asyncua.common.node import Node
from asyncua.server.server import Server
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes

from monitor.publishers.base import CommandHandler, CommandResult
from monitor.publishers.opcua_security import current_caller, current_session

log = structlog.get_logger(__name__)

SC = StatusCodes
COMMAND_TIMEOUT_S = 10.0
ONE_SHOT_LIMIT_MIN = 7 * 24 * 60.0
"""A one-shot shelve lasts until the alarm clears; the engine caps it at alarms.max_shelve."""
KNOWN_EVENT_IDS = 64
"""EventIds per condition that Acknowledge/AddComment accept (the newest ones): a client
may act on an event a moment older than the newest."""

_OI = ObjectIds
CONDITION_TYPES: dict[str, int] = {
    "fraction_high": _OI.ExclusiveLevelAlarmType,
    "fraction_low": _OI.ExclusiveLevelAlarmType,
    "rate_of_change": _OI.ExclusiveRateOfChangeAlarmType,
    "probe_stale": _OI.OffNormalAlarmType,
    "image_quality": _OI.OffNormalAlarmType,
    "out_of_distribution": _OI.OffNormalAlarmType,
    "uncertain_high": _OI.OffNormalAlarmType,
}
"""The standard condition type of each alarm kind; AlarmConditionType for the others."""

_EVENT_CLASSES: dict[int, type[Event]] = {
    _OI.ExclusiveLevelAlarmType: event_objects.ExclusiveLevelAlarm,
    _OI.ExclusiveRateOfChangeAlarmType: event_objects.ExclusiveRateOfChangeAlarm,
    _OI.OffNormalAlarmType: event_objects.OffNormalAlarm,
    _OI.AlarmConditionType: event_objects.AlarmCondition,
}
_CONDITION_CLASSES = {
    "process": (_OI.ProcessConditionClassType, "Process"),
    "diagnostic": (_OI.MaintenanceConditionClassType, "Maintenance"),
    "system": (_OI.SystemConditionClassType, "System"),
}
_QUALITY = {"GOOD": SC.Good, "UNCERTAIN": SC.Uncertain, "BAD": SC.Bad}

_ACKNOWLEDGE = (_OI.AcknowledgeableConditionType_Acknowledge, "Acknowledge")
_ADD_COMMENT = (_OI.ConditionType_AddComment, "AddComment")
_ENABLE = (_OI.ConditionType_Enable, "Enable")
_DISABLE = (_OI.ConditionType_Disable, "Disable")
_TIMED_SHELVE = (_OI.ShelvedStateMachineType_TimedShelve, "ShelvingState.TimedShelve")
_ONE_SHOT_SHELVE = (_OI.ShelvedStateMachineType_OneShotShelve, "ShelvingState.OneShotShelve")
_UNSHELVE = (_OI.ShelvedStateMachineType_Unshelve, "ShelvingState.Unshelve")


def condition_type_of(kind: str) -> int:
    """The NodeId number of the standard condition type an alarm kind is shown as."""
    return CONDITION_TYPES.get(kind, _OI.AlarmConditionType)


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def _utc(epoch_s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC)


def _node_id(identifier: str | int, namespace: int) -> ua.NodeId:
    value = ua.String(identifier) if isinstance(identifier, str) else ua.Int32(identifier)
    return ua.NodeId(value, ua.Int16(namespace))


def _std(identifier: int) -> ua.NodeId:
    return _node_id(identifier, 0)


def _text(value: str) -> ua.LocalizedText:
    return ua.LocalizedText(value, "en")


@dataclass(frozen=True)
class ConditionState:
    """What a condition shows, derived from one AlarmStatus.to_json(); equal states emit
    no event."""

    active: bool
    acked: bool
    suppressed: bool
    shelved: bool
    one_shot: bool
    severity: int
    message: str
    quality: int
    comment: str
    client_user: str

    @property
    def retain(self) -> bool:
        return self.active or not self.acked


def condition_state(status: dict[str, Any]) -> ConditionState:
    return ConditionState(
        active=bool(status.get("active")),
        acked=bool(status.get("acknowledged")),
        suppressed=bool(status.get("suppressed")),
        shelved=bool(status.get("shelved")),
        one_shot=bool(status.get("shelved") and status.get("shelved_one_shot")),
        severity=max(1, min(1000, int(status.get("severity") or 500))),
        message=str(status.get("message") or ""),
        quality=_QUALITY.get(str(status.get("quality")), SC.Good),
        comment=str(status.get("comment") or ""),
        client_user=str(status.get("operator") or ""),
    )


@dataclass
class _Condition:
    probe: str
    alarm_id: str
    kind: str
    type_id: int
    node: ua.NodeId
    probe_node: ua.NodeId
    category: str
    limit: float | None = None
    unit: str = "fraction"
    state: ConditionState | None = None
    last_severity: int = 0
    status: dict[str, Any] = field(default_factory=dict)
    event: Event | None = None
    """The newest event sent (re-sent as it is by ConditionRefresh)."""
    event_ids: deque[bytes] = field(default_factory=lambda: deque(maxlen=KNOWN_EVENT_IDS))

    def child(self, path: str) -> ua.NodeId:
        base = cast(str, self.node.Identifier)  # ours are all string NodeIds
        return _node_id(f"{base}.{path}", self.node.NamespaceIndex)


class ConditionSpace:
    """The condition instances of one server, their events and methods (one event loop)."""

    def __init__(
        self,
        server: Server,
        namespace: int,
        root: str,
        commands: CommandHandler,
        after_command: Callable[[], Callable[[], Awaitable[None]] | None],
    ) -> None:
        self.server = server
        self.idx = namespace
        self.root = root
        self.commands = commands
        self._after_command = after_command
        self._conditions: dict[tuple[str, str], _Condition] = {}
        self._by_node: dict[ua.NodeId, _Condition] = {}
        self._notifiers: set[ua.NodeId] = set()

    # -- setup ------------------------------------------------------------------------

    async def bind_methods(self) -> None:
        """Answer the standard methods (ConditionRefresh, Acknowledge, AddComment, the
        shelving methods) at their type's NodeIds; instances get theirs on creation."""
        isession = self.server.iserver.isession
        for identifier in (_OI.ConditionType_ConditionRefresh, _OI.ConditionType_ConditionRefresh2):
            isession.add_method_callback(_std(identifier), self._call_refresh)
        for identifier, callback in self._method_callbacks():
            isession.add_method_callback(_std(identifier), callback)

    def _method_callbacks(self) -> list[tuple[int, Callable[..., Awaitable[Any]]]]:
        return [
            (_ACKNOWLEDGE[0], self._call_acknowledge),
            (_ADD_COMMENT[0], self._call_add_comment),
            (_ENABLE[0], self._call_enable),
            (_DISABLE[0], self._call_disable),
            (_TIMED_SHELVE[0], self._call_timed_shelve),
            (_ONE_SHOT_SHELVE[0], self._call_one_shot_shelve),
            (_UNSHELVE[0], self._call_unshelve),
        ]

    async def _create(self, probe: str, probe_node: Node, status: dict[str, Any]) -> _Condition:
        alarm_id = str(status["alarm_id"])
        kind = str(status.get("kind") or "")
        type_id = condition_type_of(kind)
        if probe_node.nodeid not in self._notifiers:
            await probe_node.set_event_notifier([ua.EventNotifier.SubscribeToEvents])
            self._notifiers.add(probe_node.nodeid)
        nodeid = _node_id(f"{self.root}.{probe}.Conditions.{alarm_id}", self.idx)
        created = await instantiate(
            probe_node,
            self.server.get_node(_std(type_id)),
            nodeid=nodeid,
            bname=ua.QualifiedName(alarm_id, self.idx),
            dname=ua.LocalizedText(f"{probe} {alarm_id}"),
            idx=self.idx,
            instantiate_optional=False,
        )
        node: Node = created[0]
        await probe_node.add_reference(node.nodeid, _OI.HasCondition)
        condition = _Condition(
            probe=probe,
            alarm_id=alarm_id,
            kind=kind,
            type_id=type_id,
            node=node.nodeid,
            probe_node=probe_node.nodeid,
            category=str(status.get("category") or "process"),
        )
        # The optional parts this monitor fills: ConfirmedState, SuppressedState and
        # ShelvingState, and the limit of a limit alarm.
        for name, type_node in (
            ("ConfirmedState", _OI.TwoStateVariableType),
            ("SuppressedState", _OI.TwoStateVariableType),
            ("ShelvingState", _OI.ShelvedStateMachineType),
        ):
            await instantiate(
                node,
                self.server.get_node(_std(type_node)),
                nodeid=condition.child(name),
                bname=ua.QualifiedName(name, 0),
                dname=ua.LocalizedText(name),
                idx=self.idx,
                instantiate_optional=False,
            )
        limit_name = self._limit_name(kind)
        if limit_name is not None:
            await node.add_property(
                condition.child(limit_name),
                ua.QualifiedName(limit_name, 0),
                ua.Variant(0.0, ua.VariantType.Double),
                varianttype=ua.VariantType.Double,
            )
        isession = self.server.iserver.isession
        for identifier, callback in self._method_callbacks():
            path = {
                _ACKNOWLEDGE[0]: _ACKNOWLEDGE[1],
                _ADD_COMMENT[0]: _ADD_COMMENT[1],
                _ENABLE[0]: _ENABLE[1],
                _DISABLE[0]: _DISABLE[1],
                _TIMED_SHELVE[0]: _TIMED_SHELVE[1],
                _ONE_SHOT_SHELVE[0]: _ONE_SHOT_SHELVE[1],
                _UNSHELVE[0]: _UNSHELVE[1],
            }[identifier]
            isession.add_method_callback(condition.child(path), callback)
        class_id, class_name = _CONDITION_CLASSES.get(
            condition.category, _CONDITION_CLASSES["process"]
        )
        for path, value, vtype in (
            ("EventType", _std(type_id), ua.VariantType.NodeId),
            ("SourceNode", probe_node.nodeid, ua.VariantType.NodeId),
            ("SourceName", probe, ua.VariantType.String),
            ("ConditionName", alarm_id, ua.VariantType.String),
            ("ConditionClassId", _std(class_id), ua.VariantType.NodeId),
            ("ConditionClassName", _text(class_name), ua.VariantType.LocalizedText),
            ("EnabledState", _text("Enabled"), ua.VariantType.LocalizedText),
            ("EnabledState.Id", True, ua.VariantType.Boolean),
            ("ShelvingState.CurrentState", _text("Unshelved"), ua.VariantType.LocalizedText),
            (
                "ShelvingState.CurrentState.Id",
                _std(_OI.ShelvedStateMachineType_Unshelved),
                ua.VariantType.NodeId,
            ),
        ):
            await self._write(condition.child(path), value, vtype)
        self._conditions[(probe, alarm_id)] = condition
        self._by_node[condition.node] = condition
        self._by_node[condition.child("ShelvingState")] = condition
        log.info("opcua_condition_added", probe=probe, alarm_id=alarm_id, type=type_id)
        return condition

    @staticmethod
    def _limit_name(kind: str) -> str | None:
        if kind == "fraction_low":
            return "LowLimit"
        if condition_type_of(kind) in (
            _OI.ExclusiveLevelAlarmType,
            _OI.ExclusiveRateOfChangeAlarmType,
        ):
            return "HighLimit"
        return None

    # -- state ------------------------------------------------------------------------

    async def apply(self, probe: str, probe_node: Node, alarms: list[dict[str, Any]]) -> None:
        """Follow the engine's statuses of `probe`: write each condition's variables and
        emit an event for every condition whose state changed (or that is first seen in
        a state that needs attention)."""
        for status in alarms:
            key = (probe, str(status["alarm_id"]))
            condition = self._conditions.get(key)
            if condition is None:
                condition = await self._create(probe, probe_node, status)
            await self._follow(condition, status)

    async def _follow(self, condition: _Condition, status: dict[str, Any]) -> None:
        condition.status = status
        limit = status.get("limit")
        condition.limit = None if limit is None else float(limit)
        condition.unit = str(status.get("unit") or "fraction")
        new = condition_state(status)
        old = condition.state
        if old == new:
            await self._write_shelving_time(condition)
            return
        if old is None and not new.retain and not new.shelved and not new.suppressed:
            condition.last_severity = new.severity
            condition.state = new
            await self._write_state(condition, new, event_id=b"", when=time.time())
            return
        condition.last_severity = old.severity if old is not None else new.severity
        condition.state = new
        if old is None or (new.active and not old.active):
            # A new occurrence: an EventId of an earlier one no longer acknowledges it.
            condition.event_ids.clear()
        await self._emit(condition, new)

    async def _emit(self, condition: _Condition, state: ConditionState) -> None:
        """Write the condition's variables and send one event of its type."""
        status = condition.status
        moved = status.get("state_since")
        now = time.time()
        when = float(moved) if isinstance(moved, int | float) and now - moved < 5 else now
        event_id = uuid.uuid4().bytes
        condition.event_ids.append(event_id)
        await self._write_state(condition, state, event_id=event_id, when=when)
        event = self._event(condition, state, event_id=event_id, when=when, received=now)
        condition.event = event
        for notifier in (condition.probe_node, _std(_OI.Server)):
            copied = copy.copy(event)
            copied.emitting_node = notifier
            await self.server.iserver.isession.subscription_service.trigger_event(copied)

    def _event(
        self,
        condition: _Condition,
        state: ConditionState,
        *,
        event_id: bytes,
        when: float,
        received: float,
    ) -> Event:
        event_class = _EVENT_CLASSES.get(condition.type_id, event_objects.AlarmCondition)
        event = event_class()
        class_id, class_name = _CONDITION_CLASSES.get(
            condition.category, _CONDITION_CLASSES["process"]
        )
        time_of, receive = _utc(when), _utc(received)
        shelving, shelving_id = _shelving(state)
        fields: list[tuple[str, Any, ua.VariantType]] = [
            ("EventId", event_id, ua.VariantType.ByteString),
            ("EventType", _std(condition.type_id), ua.VariantType.NodeId),
            ("SourceNode", condition.probe_node, ua.VariantType.NodeId),
            ("SourceName", condition.probe, ua.VariantType.String),
            ("Time", time_of, ua.VariantType.DateTime),
            ("ReceiveTime", receive, ua.VariantType.DateTime),
            ("Message", _text(state.message), ua.VariantType.LocalizedText),
            ("Severity", state.severity, ua.VariantType.UInt16),
            ("NodeId", condition.node, ua.VariantType.NodeId),
            ("ConditionClassId", _std(class_id), ua.VariantType.NodeId),
            ("ConditionClassName", _text(class_name), ua.VariantType.LocalizedText),
            ("ConditionName", condition.alarm_id, ua.VariantType.String),
            ("BranchId", ua.NodeId(), ua.VariantType.NodeId),
            ("Retain", state.retain, ua.VariantType.Boolean),
            ("EnabledState", _text("Enabled"), ua.VariantType.LocalizedText),
            ("EnabledState/Id", True, ua.VariantType.Boolean),
            ("Quality", _status(state.quality), ua.VariantType.StatusCode),
            ("Quality/SourceTimestamp", time_of, ua.VariantType.DateTime),
            ("LastSeverity", condition.last_severity, ua.VariantType.UInt16),
            ("LastSeverity/SourceTimestamp", time_of, ua.VariantType.DateTime),
            ("Comment", _text(state.comment), ua.VariantType.LocalizedText),
            ("Comment/SourceTimestamp", time_of, ua.VariantType.DateTime),
            ("ClientUserId", state.client_user, ua.VariantType.String),
            ("AckedState", _two_state(state.acked, "Acknowledged", "Unacknowledged"), _LT),
            ("AckedState/Id", state.acked, ua.VariantType.Boolean),
            ("ConfirmedState", _two_state(state.acked, "Confirmed", "Unconfirmed"), _LT),
            ("ConfirmedState/Id", state.acked, ua.VariantType.Boolean),
            ("ActiveState", _two_state(state.active, "Active", "Inactive"), _LT),
            ("ActiveState/Id", state.active, ua.VariantType.Boolean),
            ("SuppressedState", _two_state(state.suppressed, "Suppressed", "Unsuppressed"), _LT),
            ("SuppressedState/Id", state.suppressed, ua.VariantType.Boolean),
            ("ShelvingState/CurrentState", _text(shelving), _LT),
            ("ShelvingState/CurrentState/Id", _std(shelving_id), ua.VariantType.NodeId),
            ("SuppressedOrShelved", state.suppressed or state.shelved, ua.VariantType.Boolean),
            ("InputNode", ua.NodeId(), ua.VariantType.NodeId),
        ]
        limit = self._limit_name(condition.kind)
        if limit is not None and condition.limit is not None:
            fields.append((limit, self._shown_limit(condition), ua.VariantType.Double))
            if state.active:
                high = limit == "HighLimit"
                fields.append(("LimitState/CurrentState", _text("High" if high else "Low"), _LT))
                state_id = (
                    _OI.ExclusiveLimitStateMachineType_High
                    if high
                    else _OI.ExclusiveLimitStateMachineType_Low
                )
                fields.append(("LimitState/CurrentState/Id", _std(state_id), ua.VariantType.NodeId))
        if condition.type_id == _OI.OffNormalAlarmType:
            fields.append(("NormalState", ua.NodeId(), ua.VariantType.NodeId))
        for name, value, vtype in fields:
            event.add_property(name, value, vtype)
        event.emitting_node = condition.probe_node
        return event

    @staticmethod
    def _shown_limit(condition: _Condition) -> float:
        """The limit as OPC UA shows the alarm's value: fractions in percent."""
        assert condition.limit is not None
        scale = 100.0 if condition.unit.startswith("fraction") else 1.0
        return condition.limit * scale

    async def _write_state(
        self, condition: _Condition, state: ConditionState, *, event_id: bytes, when: float
    ) -> None:
        stamp = _utc(when)
        string, boolean = ua.VariantType.String, ua.VariantType.Boolean
        text = ua.VariantType.LocalizedText
        shelving, shelving_id = _shelving(state)
        values: list[tuple[str, Any, ua.VariantType]] = [
            ("EventId", event_id or None, ua.VariantType.ByteString),
            ("Time", stamp, ua.VariantType.DateTime),
            ("ReceiveTime", _utc(time.time()), ua.VariantType.DateTime),
            ("Message", _text(state.message), text),
            ("Severity", state.severity, ua.VariantType.UInt16),
            ("LastSeverity", condition.last_severity, ua.VariantType.UInt16),
            ("LastSeverity.SourceTimestamp", stamp, ua.VariantType.DateTime),
            ("Retain", state.retain, boolean),
            ("Quality", _status(state.quality), ua.VariantType.StatusCode),
            ("Quality.SourceTimestamp", stamp, ua.VariantType.DateTime),
            ("Comment", _text(state.comment), text),
            ("Comment.SourceTimestamp", stamp, ua.VariantType.DateTime),
            ("ClientUserId", state.client_user, string),
            ("AckedState", _two_state(state.acked, "Acknowledged", "Unacknowledged"), text),
            ("AckedState.Id", state.acked, boolean),
            ("ConfirmedState", _two_state(state.acked, "Confirmed", "Unconfirmed"), text),
            ("ConfirmedState.Id", state.acked, boolean),
            ("ActiveState", _two_state(state.active, "Active", "Inactive"), text),
            ("ActiveState.Id", state.active, boolean),
            ("SuppressedState", _two_state(state.suppressed, "Suppressed", "Unsuppressed"), text),
            ("SuppressedState.Id", state.suppressed, boolean),
            ("SuppressedOrShelved", state.suppressed or state.shelved, boolean),
            ("ShelvingState.CurrentState", _text(shelving), text),
            ("ShelvingState.CurrentState.Id", _std(shelving_id), ua.VariantType.NodeId),
        ]
        limit = self._limit_name(condition.kind)
        if limit is not None and condition.limit is not None:
            values.append((limit, self._shown_limit(condition), ua.VariantType.Double))
            high = limit == "HighLimit"
            current = _text(("High" if high else "Low") if state.active else "")
            values.append(("LimitState.CurrentState", current, text))
            state_id = (
                _OI.ExclusiveLimitStateMachineType_High
                if high
                else _OI.ExclusiveLimitStateMachineType_Low
            )
            values.append(
                (
                    "LimitState.CurrentState.Id",
                    _std(state_id) if state.active else ua.NodeId(),
                    ua.VariantType.NodeId,
                )
            )
        for path, value, vtype in values:
            await self._write(condition.child(path), value, vtype)
        await self._write_shelving_time(condition)

    async def _write_shelving_time(self, condition: _Condition) -> None:
        """UnshelveTime: milliseconds until the shelve ends (0 when not shelved)."""
        until = condition.status.get("shelved_until")
        left = 0.0 if until is None else max(0.0, (float(until) - time.time()) * 1000.0)
        await self._write(
            condition.child("ShelvingState.UnshelveTime"), left, ua.VariantType.Double
        )

    async def _write(self, nodeid: ua.NodeId, value: Any, vtype: ua.VariantType) -> None:
        variant = (
            ua.Variant(None, ua.VariantType.Null) if value is None else ua.Variant(value, vtype)
        )
        await self.server.write_attribute_value(nodeid, ua.DataValue(variant))

    # -- ConditionRefresh ---------------------------------------------------------------

    async def _call_refresh(self, parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
        """ConditionRefresh(SubscriptionId) and ConditionRefresh2(SubscriptionId,
        MonitoredItemId): RefreshStart, the newest event of every retained condition,
        RefreshEnd, to each event item (or the one named) of the subscription."""
        result = ua.CallMethodResult()
        values = [arg.Value if isinstance(arg, ua.Variant) else arg for arg in args]
        if not values or not isinstance(values[0], int):
            result.StatusCode = _status(SC.BadInvalidArgument)
            return result
        service = self.server.iserver.isession.subscription_service
        subscription = service.subscriptions.get(int(values[0]))
        caller = current_session()
        if subscription is None or (caller is not None and subscription.session_id != caller):
            result.StatusCode = _status(SC.BadSubscriptionIdInvalid)
            return result
        items = subscription.monitored_item_srv
        targets = [(node, mid) for node, mids in items._monitored_events.items() for mid in mids]
        if len(values) > 1:
            wanted = values[1]
            targets = [(node, mid) for node, mid in targets if mid == wanted]
            if not targets:
                result.StatusCode = _status(SC.BadMonitoredItemIdInvalid)
                return result
        retained = [
            condition
            for condition in self._conditions.values()
            if condition.event is not None
            and condition.state is not None
            and condition.state.retain
        ]
        for node, mid in targets:
            await items._trigger_event(_refresh_marker(_OI.RefreshStartEventType, node), mid)
            for condition in retained:
                if condition.event is not None and node in (condition.probe_node, _std(_OI.Server)):
                    event = copy.copy(condition.event)
                    event.emitting_node = node
                    await items._trigger_event(event, mid)
            await items._trigger_event(_refresh_marker(_OI.RefreshEndEventType, node), mid)
        log.info(
            "opcua_condition_refresh",
            who=current_caller(),
            subscription=values[0],
            items=len(targets),
            conditions=len(retained),
        )
        return result

    # -- methods ----------------------------------------------------------------------

    def _target(
        self, parent: ua.NodeId, args: tuple[ua.Variant, ...], *, with_event: bool
    ) -> tuple[_Condition | None, str, int]:
        """(the condition called, the comment, a refusal status code or Good)."""
        condition = self._by_node.get(parent)
        if condition is None:
            return None, "", SC.BadNodeIdInvalid
        values = [arg.Value if isinstance(arg, ua.Variant) else arg for arg in args]
        if not with_event:
            return condition, "", SC.Good
        if len(values) < 2:
            return condition, "", SC.BadArgumentsMissing
        event_id, comment = values[0], values[1]
        if not isinstance(event_id, bytes):
            return condition, "", SC.BadInvalidArgument
        if isinstance(comment, ua.LocalizedText):
            comment = comment.Text or ""
        elif comment is None:
            comment = ""
        if not isinstance(comment, str):
            return condition, "", SC.BadInvalidArgument
        if event_id not in condition.event_ids:
            return condition, comment, SC.BadEventIdUnknown
        return condition, comment, SC.Good

    async def _run(
        self, name: str, condition: _Condition, call: Callable[[str], CommandResult]
    ) -> tuple[CommandResult | None, int]:
        """One CommandHandler call off the loop with the caller's name; (answer, code)."""
        who = current_caller()
        try:
            answer = await asyncio.wait_for(asyncio.to_thread(call, who), COMMAND_TIMEOUT_S)
        except TimeoutError:
            log.error("opcua_command_timeout", command=name, probe=condition.probe, who=who)
            return None, SC.BadTimeout
        except Exception:
            log.exception("opcua_command_failed", command=name, probe=condition.probe, who=who)
            return None, SC.BadInternalError
        log.info(
            "opcua_command",
            command=name,
            probe=condition.probe,
            alarm_id=condition.alarm_id,
            who=who,
            accepted=answer.accepted,
            reason=answer.reason,
        )
        return answer, SC.Good

    async def _apply_now(self) -> None:
        """Let the publisher apply what the action caused before the call returns."""
        after = self._after_command()
        if after is not None:
            await after()

    async def _call_acknowledge(self, parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode:
        condition, comment, code = self._target(parent, args, with_event=True)
        if condition is None or code != SC.Good:
            return _status(code)
        if condition.state is not None and condition.state.acked:
            return _status(SC.BadConditionBranchAlreadyAcked)
        answer, code = await self._run(
            "Acknowledge",
            condition,
            lambda who: self.commands.acknowledge(
                condition.probe, condition.alarm_id, who, comment
            ),
        )
        if answer is None or not answer.accepted:
            if answer is not None:
                reason = answer.reason or ""
                code = (
                    SC.BadConditionBranchAlreadyAcked
                    if "only an unacknowledged" in reason
                    else SC.BadRequestNotAllowed
                )
            return _status(code)
        await self._apply_now()
        return _status(SC.Good)

    async def _call_add_comment(self, parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode:
        condition, comment, code = self._target(parent, args, with_event=True)
        if condition is None or code != SC.Good:
            return _status(code)
        answer, code = await self._run(
            "AddComment",
            condition,
            lambda who: self.commands.add_comment(
                condition.probe, condition.alarm_id, who, comment
            ),
        )
        if answer is None:
            return _status(code)
        if not answer.accepted:
            empty = "empty" in (answer.reason or "")
            return _status(SC.BadInvalidArgument if empty else SC.BadRequestNotAllowed)
        await self._apply_now()
        return _status(SC.Good)

    async def _call_enable(self, parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode:
        condition, _, code = self._target(parent, args, with_event=False)
        if condition is None:
            return _status(code)
        return _status(SC.BadConditionAlreadyEnabled)

    async def _call_disable(self, parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode:
        """Taking an alarm out of service is not offered: shelve it for a time instead."""
        condition, _, code = self._target(parent, args, with_event=False)
        if condition is None:
            return _status(code)
        return _status(SC.BadNotSupported)

    async def _call_timed_shelve(self, parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode:
        """TimedShelve(ShelvingTime in ms): the engine's shelve, at most alarms.max_shelve."""
        condition, _, code = self._target(parent, args, with_event=False)
        if condition is None:
            return _status(code)
        values = [arg.Value if isinstance(arg, ua.Variant) else arg for arg in args]
        if not values:
            return _status(SC.BadArgumentsMissing)
        shelving_ms = values[0]
        if isinstance(shelving_ms, bool) or not isinstance(shelving_ms, int | float):
            return _status(SC.BadInvalidArgument)
        if shelving_ms <= 0:
            return _status(SC.BadShelvingTimeOutOfRange)
        if condition.state is not None and condition.state.shelved:
            return _status(SC.BadConditionAlreadyShelved)
        minutes = float(shelving_ms) / 60_000.0
        answer, code = await self._run(
            "TimedShelve",
            condition,
            lambda who: self.commands.shelve(
                condition.probe, condition.alarm_id, minutes, who, "TimedShelve (OPC UA)"
            ),
        )
        if answer is None:
            return _status(code)
        if not answer.accepted:
            longest = "longest allowed" in (answer.reason or "")
            return _status(SC.BadShelvingTimeOutOfRange if longest else SC.BadRequestNotAllowed)
        await self._apply_now()
        return _status(SC.Good)

    async def _call_one_shot_shelve(self, parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode:
        """OneShotShelve: shelved until the alarm is no longer active (at most
        alarms.max_shelve); only an active alarm."""
        condition, _, code = self._target(parent, args, with_event=False)
        if condition is None:
            return _status(code)
        if condition.state is not None and condition.state.shelved:
            return _status(SC.BadConditionAlreadyShelved)
        answer, code = await self._run(
            "OneShotShelve",
            condition,
            lambda who: self.commands.shelve(
                condition.probe,
                condition.alarm_id,
                ONE_SHOT_LIMIT_MIN,
                who,
                "OneShotShelve (OPC UA)",
                one_shot=True,
            ),
        )
        if answer is None:
            return _status(code)
        if not answer.accepted:
            return _status(SC.BadRequestNotAllowed)
        await self._apply_now()
        return _status(SC.Good)

    async def _call_unshelve(self, parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode:
        condition, _, code = self._target(parent, args, with_event=False)
        if condition is None:
            return _status(code)
        if condition.state is not None and not condition.state.shelved:
            return _status(SC.BadConditionNotShelved)
        answer, code = await self._run(
            "Unshelve",
            condition,
            lambda who: self.commands.unshelve(
                condition.probe, condition.alarm_id, who, "Unshelve (OPC UA)"
            ),
        )
        if answer is None:
            return _status(code)
        if not answer.accepted:
            shelved = "not shelved" in (answer.reason or "")
            return _status(SC.BadConditionNotShelved if shelved else SC.BadRequestNotAllowed)
        await self._apply_now()
        return _status(SC.Good)


_LT = ua.VariantType.LocalizedText


def _refresh_marker(type_id: int, notifier: ua.NodeId) -> Event:
    """A RefreshStartEvent or RefreshEndEvent from the Server object."""
    marker_class = (
        event_objects.RefreshStartEvent
        if type_id == _OI.RefreshStartEventType
        else event_objects.RefreshEndEvent
    )
    marker: Event = cast(Any, marker_class)()
    now = dt.datetime.now(dt.UTC)
    for name, value, vtype in (
        ("EventId", uuid.uuid4().bytes, ua.VariantType.ByteString),
        ("EventType", _std(type_id), ua.VariantType.NodeId),
        ("SourceNode", _std(_OI.Server), ua.VariantType.NodeId),
        ("SourceName", "Server", ua.VariantType.String),
        ("Time", now, ua.VariantType.DateTime),
        ("ReceiveTime", now, ua.VariantType.DateTime),
        ("Message", _text("ConditionRefresh"), ua.VariantType.LocalizedText),
        ("Severity", 1, ua.VariantType.UInt16),
    ):
        marker.add_property(name, value, vtype)
    marker.emitting_node = notifier
    return marker


def _shelving(state: ConditionState) -> tuple[str, int]:
    """ShelvingState's CurrentState text and its state's NodeId number."""
    if not state.shelved:
        return "Unshelved", _OI.ShelvedStateMachineType_Unshelved
    if state.one_shot:
        return "OneShotShelved", _OI.ShelvedStateMachineType_OneShotShelved
    return "TimedShelved", _OI.ShelvedStateMachineType_TimedShelved


def _two_state(value: bool, true_text: str, false_text: str) -> ua.LocalizedText:
    return _text(true_text if value else false_text)
