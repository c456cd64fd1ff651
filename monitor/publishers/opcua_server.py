"""The monitor's OPC UA address space, filled from ProbeUpdates (asyncua, one event loop).

Layout (namespace `namespace_uri`; string NodeIds `CrystalMonitor.<probe>.<path>`):

    Objects/CrystalMonitor/
      <probe>/                            created on the first update or event of a probe
        Status           String   ok | uncertain | no data | stale | bad images |
                                  uncertain particles | bad input
        LastFrameTime    DateTime
        Batch            String   '' when no batch runs
        Model            String   name:version:sha12 of the model behind the numbers
        ParticlesPerMinute, FramesPerMinute      AnalogUnitType, 1/min (UNECE C94)
        RejectedFrameShare, UncertainShare       AnalogItemType, % 0..100 (UNECE P1)
        OutOfDistributionShare                   AnalogItemType, % of particles not crystals
        Fractions/<class>/
          Fraction       AnalogItemType, %, EURange 0..100, historized (HistoryRead raw)
          CI95Low, CI95High, Adjusted            AnalogItemType, %
          Count          Int32    confident particles of the class
        Sizes/<class>/
          D10, D50, D90  AnalogItemType, µm (UNECE 4H), EURange 0..10000: quantiles of the
                         equivalent circle diameter, number-weighted
          Count          Int32    confident particles of the class with a measured size
        Alarms/<alarm_id>/                       created on first sight of the alarm
          State String, Active Boolean, Acknowledged Boolean, Shelved Boolean,
          Suppressed Boolean, Severity UInt16, Message String
        Acknowledge(AlarmId String, Comment String) -> Reason String
        Shelve(AlarmId String, Minutes Double, Comment String) -> Reason String
        StartBatch(BatchId String) -> Reason String
        StopBatch() -> Reason String

Fractions, rates, shares and sizes come from the 5-minute window. Measured values carry the
StatusCode of the update's quality (GOOD -> Good, UNCERTAIN -> UncertainSubNormal,
BAD -> BadNoCommunication for a stale probe, BadSensorFailure otherwise) and the
update's time as SourceTimestamp; a value that does not exist yet (no particles in
the window) is null with BadWaitingForInitialData. Sizes are only ever served in
micrometres: a probe without `probes.pixel_size_um` measures in pixels, and its D10, D50
and D90 are null with BadConfigurationError (set the pixel size; MQTT and the export
carry the pixel values, said to be px). Status, Batch, Model, LastFrameTime
and the alarm variables are facts about the monitor and stay Good.

Methods call the CommandHandler with the session's user name; a refused command
returns BadRequestNotAllowed with the reason as its output argument.

Alarm transitions and batch start/stop are events of type CrystalMonitorEventType,
emitted by the Server object (subscribe to Server to receive them) with SourceName =
the probe and SourceNode = the probe's object. Each alarm is also an OPC UA Part 9
condition under its probe, with the standard events, ConditionRefresh, Acknowledge,
AddComment and shelving (`monitor.publishers.opcua_conditions`).

Every node we create has a string NodeId derived from its path (the event type
`CrystalMonitor.CrystalMonitorEventType` and its fields, the probes' variables, their
EURange and EngineeringUnits properties, the methods and their arguments), so a client
configured once reads the same NodeIds after any restart. History is kept in tables
named from a digest of the NodeId (`StringIdHistory`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import structlog
from asyncua import ua
from asyncua.common.instantiate_util import instantiate
from asyncua.common.node import Node
from asyncua.server.event_generator import EventGenerator
from asyncua.server.history_sql import HistorySQLite
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError
from cryptography.hazmat.primitives import serialization

from monitor import __version__
from monitor.alarms import Quality
from monitor.config.certificates import (
    CertificateFileError,
    key_matches,
    read_certificate,
    read_private_key,
)
from monitor.config.opcua import OpcUaConfig, endpoint_host, users_path
from monitor.publishers.base import CommandHandler, CommandResult, ProbeUpdate
from monitor.publishers.opcua_conditions import ConditionSpace
from monitor.publishers.opcua_security import (
    CallerAwareInternalServer,
    ClientTrust,
    CrystalMonitorUserManager,
    certificate_uri,
    current_caller,
    default_application_uri,
    ensure_server_certificate,
)
from monitor.publishers.opcua_users import LoginThrottle, UsersFile

log = structlog.get_logger(__name__)

WINDOW_S = 300
ROOT = "CrystalMonitor"
EVENT_TYPE = "CrystalMonitorEventType"
BATCH_EVENT_SEVERITY = 100
COMMAND_TIMEOUT_S = 10.0
UNECE_UNITS = "http://www.opcfoundation.org/UA/units/un/cefact"

SC = StatusCodes
NEVER = dt.datetime(1601, 1, 1, tzinfo=dt.UTC)
"""OPC UA's minimum DateTime: the initial value of a time that has not happened yet."""
NOT_YET = SC.BadWaitingForInitialData
"""A value that does not exist yet (e.g. a fraction with no particles in the window)."""

_DIAGNOSTIC_STATUS = {
    "probe_stale": ("stale", SC.BadNoCommunication),
    "image_quality": ("bad images", SC.BadSensorFailure),
    "uncertain_high": ("uncertain particles", SC.BadSensorFailure),
    "out_of_distribution": ("not crystals", SC.BadSensorFailure),
}


def unece_unit_id(code: str) -> int:
    """OPC UA UnitId of a UN/CEFACT common code (Part 8: one byte per character)."""
    unit_id = 0
    for char in code.upper():
        unit_id = (unit_id << 8) | ord(char)
    return unit_id


def engineering_units(code: str, symbol: str, description: str) -> ua.EUInformation:
    return ua.EUInformation(
        NamespaceUri=UNECE_UNITS,
        UnitId=unece_unit_id(code),
        DisplayName=ua.LocalizedText(symbol),
        Description=ua.LocalizedText(description),
    )


PERCENT = engineering_units("P1", "%", "percent")
PER_MINUTE = engineering_units("C94", "min⁻¹", "reciprocal minute")
MICROMETRE = engineering_units("4H", "µm", "micrometre (micron)")
SIZE_RANGE_UM = (0.0, 10_000.0)
"""EURange of the size quantiles: the size histogram's range (up to 10 mm)."""
SIZE_QUANTILES = (("D10", "d10", "10 %"), ("D50", "d50", "50 %"), ("D90", "d90", "90 %"))
"""Node name, key in the window's `sizes`, and what the display name says."""


@dataclass(frozen=True)
class ProbeStatus:
    """What the Status variable says and the StatusCode the measured values carry."""

    text: str
    code: int


def probe_status(update: ProbeUpdate) -> ProbeStatus:
    """Status text and value StatusCode of one update (see the module docstring)."""
    quality: Quality = update.quality
    if quality == "GOOD":
        return ProbeStatus("ok", SC.Good)
    if quality == "UNCERTAIN":
        text = "no data" if update.last_frame_ts is None else "uncertain"
        return ProbeStatus(text, SC.UncertainSubNormal)
    for alarm in update.alarms:
        found = _DIAGNOSTIC_STATUS.get(str(alarm.get("kind")))
        if found is not None and alarm.get("active") and not alarm.get("suppressed"):
            return ProbeStatus(*found)
    if update.last_frame_ts is None:
        return ProbeStatus("no data", SC.BadNoCommunication)
    return ProbeStatus("bad input", SC.BadSensorFailure)


def window_stats(snapshot: dict[str, Any], seconds: int = WINDOW_S) -> dict[str, Any]:
    """The snapshot's window of `seconds`, else the one nearest to it ({} when none)."""
    windows: dict[str, Any] = snapshot.get("windows") or {}
    if str(seconds) in windows:
        return dict(windows[str(seconds)])
    if not windows:
        return {}
    nearest = min(windows, key=lambda key: abs(float(key) - seconds))
    return dict(windows[nearest])


class StringIdHistory(HistorySQLite):
    """HistorySQLite whose tables are named from a digest of the NodeId: asyncua names a
    table after repr() of the identifier and then refuses the quotes in it, so string
    NodeIds (ours, all of them) could not be historized."""

    def _get_table_name(self, node_id: ua.NodeId) -> str:
        digest = hashlib.blake2b(str(node_id.Identifier).encode(), digest_size=12).hexdigest()
        return f"{node_id.NamespaceIndex}_h{digest}"


def _percent(value: Any) -> float | None:
    return None if value is None else float(value) * 100.0


def _utc(epoch_s: float) -> ua.DateTime:
    # A plain datetime typed as asyncua's annotation wants: HistorySQLite hands it to
    # sqlite3, whose adapters reject the ua.DateTime subclass.
    return cast(ua.DateTime, dt.datetime.fromtimestamp(epoch_s, dt.UTC))


def _time_or_never(epoch_s: Any) -> ua.DateTime:
    """A time, or OPC UA's null DateTime (its minimum, 1601-01-01) for one that has not
    happened (asyncua refuses a Null variant for a DateTime variable)."""
    return cast(ua.DateTime, NEVER) if epoch_s is None else _utc(float(epoch_s))


def _now() -> ua.DateTime:
    return _utc(time.time())


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def _node_id(identifier: str | int, namespace: int) -> ua.NodeId:
    """A string or numeric NodeId (asyncua's annotations want its own int/str subclasses)."""
    value = ua.String(identifier) if isinstance(identifier, str) else ua.Int32(identifier)
    return ua.NodeId(value, ua.Int16(namespace))


@dataclass
class _ProbeNodes:
    node: Node
    fractions: Node
    alarms: Node
    sizes: Node
    classes: set[str] = field(default_factory=set)
    alarm_ids: set[str] = field(default_factory=set)


class _BadArgumentError(Exception):
    pass


class _QuietBindFailure(logging.Filter):
    """Drops asyncua's own traceback of an endpoint it cannot bind: the publisher
    reports that as one line naming opcua.endpoint. Kept at log_level = "debug"."""

    def filter(self, record: logging.LogRecord) -> bool:
        failure = record.exc_info[1] if record.exc_info else None
        debug = logging.getLogger().isEnabledFor(logging.DEBUG)
        return debug or not isinstance(failure, OSError)


_QUIET_BIND_FAILURE = _QuietBindFailure()


class CrystalMonitorServer:
    """The asyncua server with the CrystalMonitor address space; use from one event loop."""

    def __init__(self, config: OpcUaConfig, state_dir: Path, commands: CommandHandler) -> None:
        self.config = config
        self.state_dir = state_dir
        self.commands = commands
        self.pki_dir = state_dir / "opcua"
        self.server: Server | None = None
        self.idx = 0
        self.root: Node | None = None
        self.trust: ClientTrust | None = None
        self.users: CrystalMonitorUserManager | None = None
        self._events: EventGenerator | None = None
        self.conditions: ConditionSpace | None = None
        """Each alarm as a Part 9 condition (`monitor.publishers.opcua_conditions`)."""
        self._probes: dict[str, _ProbeNodes] = {}
        self._probe_of_node: dict[ua.NodeId, str] = {}
        self.after_command: Callable[[], Awaitable[None]] | None = None
        """Awaited after an accepted method call (the publisher applies what it caused)."""
        self._vars: dict[tuple[str, str], ua.NodeId] = {}
        self._historized: set[ua.NodeId] = set()
        self._pending_history: list[ua.NodeId] = []

    @property
    def endpoint_url(self) -> str:
        return self.config.endpoint

    # -- start and stop ---------------------------------------------------------------

    def _users(self) -> UsersFile | None:
        path = users_path(self.config)  # checked by check_opcua_environment before start
        return None if path is None else UsersFile(path)

    async def start(self) -> None:
        """Build the address space and listen; raises when the endpoint cannot be bound."""
        config = self.config
        # asyncua warns about every optional attribute its type nodes lack on each
        # instantiate (dozens per probe); that is not news to an operator.
        logging.getLogger("asyncua.common.copy_node_util").setLevel(logging.ERROR)
        logging.getLogger("asyncua.server.server").addFilter(_QUIET_BIND_FAILURE)
        self.pki_dir.mkdir(parents=True, exist_ok=True)
        production = config.security_profile == "production"
        application_uri = default_application_uri()
        users = self._users()
        throttle = LoginThrottle(
            max_failures=config.login_max_failures,
            lockout_s=config.login_lockout,
            lockout_max_s=config.login_lockout_max,
        )
        if production:
            trust_dir = config.trust_dir or self.pki_dir / "trusted"
            trust_dir.mkdir(parents=True, exist_ok=True)
            self.trust = ClientTrust(
                trust_dir, self.pki_dir / "rejected", max_rejected_files=config.rejected_max_files
            )
            await self.trust.reload()
            await asyncio.to_thread(self.trust.prune_rejected)
            user_manager = CrystalMonitorUserManager(
                users,
                allow_anonymous=False,
                channel_trusted=self.trust.is_trusted_der,
                throttle=throttle,
            )
        else:
            user_manager = CrystalMonitorUserManager(users, allow_anonymous=True, throttle=throttle)
        self.users = user_manager

        server = Server(iserver=CallerAwareInternalServer(user_manager=user_manager))
        self.server = server
        server.name = "Crystal Monitor"
        server.manufacturer_name = "crystal-monitor"
        server.product_uri = "urn:crystal-monitor"
        server.set_endpoint(config.endpoint)
        server.allow_remote_admin(False)
        history_path = self.state_dir / "opcua_history.sqlite"
        server.iserver.history_manager.set_storage(StringIdHistory(str(history_path)))
        await server.init()

        if production:
            cert_path, key_path = await self._server_certificate(application_uri)
            # Read here (PEM or DER told from the content, errors naming the file), then
            # handed over as bytes: asyncua would guess the format from the file name.
            certificate, key = await asyncio.to_thread(_read_pair, cert_path, key_path)
            await server.load_certificate(certificate, format="der")
            await server.load_private_key(key, format="pem")
            if server.iserver.certificate is not None:
                application_uri = certificate_uri(server.iserver.certificate) or application_uri
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            server.set_identity_tokens([ua.UserNameIdentityToken])
            assert self.trust is not None
            server.set_certificate_validator(self.trust.validate)
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            tokens: list[type] = [ua.AnonymousIdentityToken]
            if users is not None:
                tokens.append(ua.UserNameIdentityToken)
            server.set_identity_tokens(tokens)
        await server.set_application_uri(application_uri)
        await server.set_build_info(
            server.product_uri,
            server.manufacturer_name,
            server.name,
            __version__,
            "0",
            dt.datetime.now(dt.UTC),
        )

        self.idx = await server.register_namespace(config.namespace_uri)
        self.root = await server.nodes.objects.add_object(
            _node_id(ROOT, self.idx), ua.QualifiedName(ROOT, self.idx)
        )
        event_type = await self._create_event_type(
            [
                ("Category", ua.VariantType.String),
                ("AlarmId", ua.VariantType.String),
                ("AlarmKind", ua.VariantType.String),
                ("FromState", ua.VariantType.String),
                ("ToState", ua.VariantType.String),
                ("Priority", ua.VariantType.String),
                ("Cause", ua.VariantType.String),
                ("Batch", ua.VariantType.String),
                ("Who", ua.VariantType.String),
                ("Value", ua.VariantType.Double),
                ("Limit", ua.VariantType.Double),
                ("Unit", ua.VariantType.String),
                ("ActiveSince", ua.VariantType.DateTime),
            ],
        )
        self._events = await server.get_event_generator(event_type, ObjectIds.Server)
        self.conditions = ConditionSpace(
            server, self.idx, ROOT, self.commands, lambda: self.after_command
        )
        await self.conditions.bind_methods()
        await server.start()
        log.info(
            "opcua_listening",
            endpoint=config.endpoint,
            profile=config.security_profile,
            application_uri=application_uri,
        )

    async def _create_event_type(self, fields: list[tuple[str, ua.VariantType]]) -> Node:
        """CrystalMonitorEventType under BaseEventType, with string NodeIds (asyncua's
        create_custom_event_type numbers them in creation order)."""
        assert self.server is not None
        type_id = f"{ROOT}.{EVENT_TYPE}"
        base = self.server.get_node(ObjectIds.BaseEventType)
        event_type = await base.add_object_type(
            _node_id(type_id, self.idx), ua.QualifiedName(EVENT_TYPE, self.idx)
        )
        for name, vtype in fields:
            prop = await event_type.add_property(
                _node_id(f"{type_id}.{name}", self.idx),
                ua.QualifiedName(name, self.idx),
                ua.Variant(ua.get_default_value(vtype), vtype),
                varianttype=vtype,
            )
            await prop.set_modelling_rule(True)
        return event_type

    async def _server_certificate(self, application_uri: str) -> tuple[Path, Path]:
        if self.config.certificate is not None and self.config.private_key is not None:
            return self.config.certificate, self.config.private_key
        cert_path = self.pki_dir / "server_cert.der"
        key_path = self.pki_dir / "server_key.pem"
        host = endpoint_host(self.config.endpoint)
        hostnames = [socket.gethostname(), socket.getfqdn()]
        if host not in {"0.0.0.0", "::"}:
            hostnames.append(host)
        change = await asyncio.to_thread(
            ensure_server_certificate, cert_path, key_path, application_uri, hostnames
        )
        if change is not None and change.damaged:
            log.warning(
                "opcua_server_cert_regenerated",
                path=str(cert_path),
                key=str(key_path),
                reason=change.reason,
                effect="clients that trusted the old server certificate must trust the new one",
            )
        elif change is not None:
            log.info("opcua_server_cert_generated", path=str(cert_path), reason=change.reason)
        return cert_path, key_path

    def security_counters(self) -> dict[str, int]:
        """Refused logins and client certificates since start (read from any thread)."""
        users, trust = self.users, self.trust
        return {
            "logins_failed": users.logins_failed if users else 0,
            "login_lockouts": users.login_lockouts if users else 0,
            "logins_refused_locked_out": users.logins_refused_locked_out if users else 0,
            "client_certs_rejected": trust.rejected if trust else 0,
            "rejected_files_deleted": trust.rejected_files_deleted if trust else 0,
        }

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    # -- nodes ------------------------------------------------------------------------

    def _nodeid(self, probe: str, path: str) -> ua.NodeId:
        """`CrystalMonitor.<probe>[.<path with dots>]` in our namespace."""
        suffix = f".{path.replace('/', '.')}" if path else ""
        return _node_id(f"{ROOT}.{probe}{suffix}", self.idx)

    def _qname(self, name: str) -> ua.QualifiedName:
        return ua.QualifiedName(name, self.idx)

    async def _add_object(self, parent: Node, probe: str, path: str, name: str) -> Node:
        return await parent.add_object(self._nodeid(probe, path), self._qname(name))

    async def _add_variable(
        self, parent: Node, probe: str, path: str, value: Any, vtype: ua.VariantType
    ) -> None:
        name = path.rsplit("/", 1)[-1]
        node = await parent.add_variable(
            self._nodeid(probe, path), self._qname(name), ua.Variant(value, vtype)
        )
        self._vars[(probe, path)] = node.nodeid

    async def _add_analog(
        self,
        parent: Node,
        probe: str,
        path: str,
        display: str,
        *,
        units: ua.EUInformation,
        eu_range: tuple[float, float] | None,
    ) -> Node:
        """An AnalogItemType (with EURange) or AnalogUnitType (without) Double variable."""
        name = path.rsplit("/", 1)[-1]
        type_id = ObjectIds.AnalogItemType if eu_range else ObjectIds.AnalogUnitType
        assert self.server is not None
        created = await instantiate(
            parent,
            self.server.get_node(type_id),
            nodeid=self._nodeid(probe, path),
            bname=self._qname(name),
            dname=ua.LocalizedText(display),
            idx=self.idx,
            instantiate_optional=False,
        )
        node: Node = created[0]
        await node.write_attribute(
            AttributeIds.DataType, ua.DataValue(ua.Variant(_node_id(ObjectIds.Double, 0)))
        )
        await node.write_attribute(
            AttributeIds.ValueRank, ua.DataValue(ua.Variant(-1, ua.VariantType.Int32))
        )
        if eu_range is not None:
            eu_node = await node.get_child(ua.QualifiedName("EURange", 0))
            low, high = eu_range
            await eu_node.write_value(ua.Variant(ua.Range(Low=low, High=high)))
        units_name = ua.QualifiedName("EngineeringUnits", 0)
        try:
            units_node = await node.get_child(units_name)
        except UaError:
            units_node = await node.add_property(
                _node_id(str(node.nodeid.Identifier) + ".EngineeringUnits", self.idx),
                units_name,
                units,
                ua.VariantType.ExtensionObject,
                ObjectIds.EUInformation,
            )
        else:
            await units_node.write_value(ua.Variant(units))
        self._vars[(probe, path)] = node.nodeid
        return node

    async def _ensure_probe(self, probe: str) -> _ProbeNodes:
        existing = self._probes.get(probe)
        if existing is not None:
            return existing
        assert self.root is not None
        node = await self._add_object(self.root, probe, "", probe)
        await self._add_variable(node, probe, "Status", "no data", ua.VariantType.String)
        await self._add_variable(
            node,
            probe,
            "LastFrameTime",
            NEVER,
            ua.VariantType.DateTime,
        )
        await self._add_variable(node, probe, "Batch", "", ua.VariantType.String)
        await self._add_variable(node, probe, "Model", "", ua.VariantType.String)
        await self._add_analog(
            node,
            probe,
            "ParticlesPerMinute",
            f"{probe} particles per minute (5 min)",
            units=PER_MINUTE,
            eu_range=None,
        )
        await self._add_analog(
            node,
            probe,
            "FramesPerMinute",
            f"{probe} frames per minute (5 min)",
            units=PER_MINUTE,
            eu_range=None,
        )
        await self._add_analog(
            node,
            probe,
            "RejectedFrameShare",
            f"{probe} rejected frames (5 min)",
            units=PERCENT,
            eu_range=(0.0, 100.0),
        )
        await self._add_analog(
            node,
            probe,
            "UncertainShare",
            f"{probe} uncertain particles (5 min)",
            units=PERCENT,
            eu_range=(0.0, 100.0),
        )
        await self._add_analog(
            node,
            probe,
            "OutOfDistributionShare",
            f"{probe} particles out of the model's distribution (5 min)",
            units=PERCENT,
            eu_range=(0.0, 100.0),
        )
        fractions = await self._add_object(node, probe, "Fractions", "Fractions")
        alarms = await self._add_object(node, probe, "Alarms", "Alarms")
        sizes = await self._add_object(node, probe, "Sizes", "Sizes")
        await self._add_methods(node, probe)
        nodes = _ProbeNodes(node, fractions, alarms, sizes)
        self._probes[probe] = nodes
        self._probe_of_node[node.nodeid] = probe
        log.info("opcua_probe_added", probe=probe)
        return nodes

    async def _ensure_class(self, probe: str, nodes: _ProbeNodes, name: str) -> None:
        if name in nodes.classes:
            return
        base = f"Fractions/{name}"
        folder = await self._add_object(nodes.fractions, probe, base, name)
        assert self.server is not None
        fraction = await self._add_analog(
            folder,
            probe,
            f"{base}/Fraction",
            f"{probe} {name} fraction (5 min)",
            units=PERCENT,
            eu_range=(0.0, 100.0),
        )
        self._pending_history.append(fraction.nodeid)
        for part, label in (
            ("CI95Low", "95 % interval low"),
            ("CI95High", "95 % interval high"),
            ("Adjusted", "confusion-adjusted fraction"),
        ):
            await self._add_analog(
                folder,
                probe,
                f"{base}/{part}",
                f"{probe} {name} {label} (5 min)",
                units=PERCENT,
                eu_range=(0.0, 100.0),
            )
        await self._add_variable(folder, probe, f"{base}/Count", 0, ua.VariantType.Int32)
        sizes_base = f"Sizes/{name}"
        sizes = await self._add_object(nodes.sizes, probe, sizes_base, name)
        for part, _, label in SIZE_QUANTILES:
            await self._add_analog(
                sizes,
                probe,
                f"{sizes_base}/{part}",
                f"{probe} {name} {part}: {label} of particles smaller, equivalent circle"
                " diameter (5 min)",
                units=MICROMETRE,
                eu_range=SIZE_RANGE_UM,
            )
        await self._add_variable(sizes, probe, f"{sizes_base}/Count", 0, ua.VariantType.Int32)
        nodes.classes.add(name)

    async def _ensure_alarm(self, probe: str, nodes: _ProbeNodes, alarm_id: str) -> None:
        if alarm_id in nodes.alarm_ids:
            return
        base = f"Alarms/{alarm_id}"
        folder = await self._add_object(nodes.alarms, probe, base, alarm_id)
        for name, value, vtype in (
            ("State", "normal", ua.VariantType.String),
            ("Active", False, ua.VariantType.Boolean),
            ("Acknowledged", True, ua.VariantType.Boolean),
            ("Shelved", False, ua.VariantType.Boolean),
            ("Suppressed", False, ua.VariantType.Boolean),
            ("Severity", 0, ua.VariantType.UInt16),
            ("Message", "", ua.VariantType.String),
            ("ActiveSince", NEVER, ua.VariantType.DateTime),
            ("StateSince", NEVER, ua.VariantType.DateTime),
            ("AcknowledgedAt", NEVER, ua.VariantType.DateTime),
            ("AcknowledgedBy", "", ua.VariantType.String),
        ):
            await self._add_variable(folder, probe, f"{base}/{name}", value, vtype)
        nodes.alarm_ids.add(alarm_id)

    # -- values -----------------------------------------------------------------------

    async def _write(
        self,
        probe: str,
        path: str,
        value: Any,
        vtype: ua.VariantType,
        *,
        code: int,
        ts: ua.DateTime,
        pending_when_null: bool = True,
    ) -> None:
        """`pending_when_null`: a null measured value is BadWaitingForInitialData; a null
        fact (an alarm not acknowledged yet) stays Good."""
        assert self.server is not None
        nodeid = self._vars[(probe, path)]
        if value is None:
            variant = ua.Variant(None, ua.VariantType.Null)
            if pending_when_null:
                code = code if _status(code).is_bad() else NOT_YET
        else:
            variant = ua.Variant(value, vtype)
        await self.server.write_attribute_value(
            nodeid,
            ua.DataValue(
                variant,
                StatusCode=_status(code),
                SourceTimestamp=ts,
                ServerTimestamp=_now(),
            ),
        )

    async def apply_update(self, update: ProbeUpdate) -> None:
        """Create the probe's missing nodes and write every value of the update."""
        probe = update.probe
        nodes = await self._ensure_probe(probe)
        for name in update.classes:
            await self._ensure_class(probe, nodes, name)
        for alarm in update.alarms:
            await self._ensure_alarm(probe, nodes, str(alarm["alarm_id"]))

        status = probe_status(update)
        ts = _utc(update.ts)
        good = SC.Good
        string, double = ua.VariantType.String, ua.VariantType.Double
        await self._write(probe, "Status", status.text, string, code=good, ts=ts)
        await self._write(probe, "Batch", update.batch or "", string, code=good, ts=ts)
        await self._write(probe, "Model", update.model.label, string, code=good, ts=ts)
        last_frame = None if update.last_frame_ts is None else _utc(update.last_frame_ts)
        await self._write(
            probe, "LastFrameTime", last_frame, ua.VariantType.DateTime, code=good, ts=ts
        )

        window = window_stats(update.snapshot)
        code = status.code
        for path, key, scale in (
            ("ParticlesPerMinute", "particles_per_min", 1.0),
            ("FramesPerMinute", "frames_per_min", 1.0),
            ("RejectedFrameShare", "rejected_share", 100.0),
            ("UncertainShare", "uncertain_share", 100.0),
            ("OutOfDistributionShare", "ood_share", 100.0),
        ):
            raw = window.get(key)
            await self._write(
                probe, path, None if raw is None else raw * scale, double, code=code, ts=ts
            )
        classes: dict[str, Any] = window.get("classes") or {}
        for name in update.classes:
            stats = classes.get(name) or {}
            ci95 = stats.get("ci95") or (None, None)
            base = f"Fractions/{name}"
            for part, value in (
                ("Fraction", stats.get("fraction")),
                ("CI95Low", ci95[0]),
                ("CI95High", ci95[1]),
                ("Adjusted", stats.get("adjusted")),
            ):
                await self._write(
                    probe, f"{base}/{part}", _percent(value), double, code=code, ts=ts
                )
            count = stats.get("n")
            await self._write(
                probe,
                f"{base}/Count",
                None if count is None else int(count),
                ua.VariantType.Int32,
                code=code,
                ts=ts,
            )
        await self._write_sizes(update, window.get("sizes") or {}, code=code, ts=ts)

        await self.apply_alarms(probe, update.alarms, ts=update.ts)
        await self._historize_new()

    async def _write_sizes(
        self, update: ProbeUpdate, sizes: dict[str, Any], *, code: int, ts: ua.DateTime
    ) -> None:
        """Each class's D10/D50/D90 in micrometres; BadConfigurationError (null) for a
        probe measured in pixels, which has no pixel size to give micrometres."""
        probe = update.probe
        in_pixels = sizes.get("unit") != "um"
        quantile_code = (
            SC.BadConfigurationError if in_pixels and not _status(code).is_bad() else code
        )
        classes: dict[str, Any] = sizes.get("classes") or {}
        for name in update.classes:
            stats = classes.get(name) or {}
            base = f"Sizes/{name}"
            for part, key, _ in SIZE_QUANTILES:
                value = None if in_pixels else stats.get(key)
                await self._write(
                    probe,
                    f"{base}/{part}",
                    None if value is None else float(value),
                    ua.VariantType.Double,
                    code=quantile_code,
                    ts=ts,
                )
            count = stats.get("count")
            await self._write(
                probe,
                f"{base}/Count",
                None if count is None else int(count),
                ua.VariantType.Int32,
                code=code,
                ts=ts,
            )

    async def apply_alarms(
        self, probe: str, alarms: list[dict[str, Any]], *, ts: float | None = None
    ) -> None:
        """Write the alarm variables of `probe` (every update, and at once after an
        operator action)."""
        nodes = await self._ensure_probe(probe)
        stamp = _now() if ts is None else _utc(ts)
        string, boolean, date = (
            ua.VariantType.String,
            ua.VariantType.Boolean,
            ua.VariantType.DateTime,
        )
        for alarm in alarms:
            await self._ensure_alarm(probe, nodes, str(alarm["alarm_id"]))
            base = f"Alarms/{alarm['alarm_id']}"
            for name, value, vtype in (
                ("State", alarm.get("state"), string),
                ("Active", alarm.get("active"), boolean),
                ("Acknowledged", alarm.get("acknowledged"), boolean),
                ("Shelved", alarm.get("shelved"), boolean),
                ("Suppressed", alarm.get("suppressed"), boolean),
                ("Severity", alarm.get("severity"), ua.VariantType.UInt16),
                ("Message", alarm.get("message"), string),
                ("ActiveSince", _time_or_never(alarm.get("active_since")), date),
                ("StateSince", _time_or_never(alarm.get("state_since")), date),
                ("AcknowledgedAt", _time_or_never(alarm.get("acknowledged_at")), date),
                ("AcknowledgedBy", alarm.get("acknowledged_by") or "", string),
            ):
                await self._write(
                    probe,
                    f"{base}/{name}",
                    value,
                    vtype,
                    code=SC.Good,
                    ts=stamp,
                    pending_when_null=False,
                )
        if self.conditions is not None:
            await self.conditions.apply(probe, nodes.node, alarms)

    async def _historize_new(self) -> None:
        """Historize new Fraction nodes once they hold their first real value."""
        assert self.server is not None
        retention = dt.timedelta(seconds=self.config.history_retention)
        while self._pending_history:
            nodeid = self._pending_history.pop()
            await self.server.historize_node_data_change(
                self.server.get_node(nodeid), period=retention
            )
            self._historized.add(nodeid)

    # -- events -----------------------------------------------------------------------

    async def emit_event(self, probe: str, event: dict[str, Any]) -> None:
        """One alarm transition or batch start/stop as an event of the Server object."""
        assert self._events is not None
        nodes = await self._ensure_probe(probe)
        payload = self._events.event
        is_batch = event.get("type") == "batch"
        payload.SourceNode = nodes.node.nodeid
        payload.SourceName = probe
        payload.Category = "batch" if is_batch else "alarm"
        payload.AlarmId = event.get("alarm_id")
        payload.AlarmKind = event.get("kind")
        payload.FromState = _text_or_none(event.get("from_state"))
        payload.ToState = _text_or_none(event.get("to_state"))
        payload.Priority = event.get("priority")
        payload.Cause = event.get("cause")
        payload.Batch = event.get("batch")
        payload.Who = event.get("who")
        payload.Value = _float_or_none(event.get("value"))
        payload.Limit = _float_or_none(event.get("limit"))
        payload.Unit = event.get("unit")
        active_since = event.get("active_since")
        payload.ActiveSince = _time_or_never(active_since)
        payload.Severity = _event_severity(event, is_batch)
        if is_batch:
            message = f"batch {event.get('batch')} {event.get('action')}"
            if event.get("who"):
                message += f" by {event['who']}"
        else:
            message = str(
                event.get("message") or f"{event.get('alarm_id')}: {event.get('to_state')}"
            )
        ts = event.get("ts")
        when = _utc(float(ts)) if isinstance(ts, int | float) else None
        await self._events.trigger(time_attr=when, message=message)

    # -- methods ----------------------------------------------------------------------

    async def _add_methods(self, node: Node, probe: str) -> None:
        def argument(name: str, type_id: int, text: str) -> ua.Argument:
            return ua.Argument(
                Name=name,
                DataType=_node_id(type_id, 0),
                ValueRank=-1,
                Description=ua.LocalizedText(text),
            )

        alarm_id = argument("AlarmId", ObjectIds.String, "Alarm id, e.g. pg_high")
        comment = argument("Comment", ObjectIds.String, "Why (kept in the alarm journal)")
        reason = [argument("Reason", ObjectIds.String, "Empty when done, else why not")]
        methods: list[tuple[str, Callable[..., Awaitable[Any]], list[ua.Argument]]] = [
            ("Acknowledge", self._call_acknowledge, [alarm_id, comment]),
            (
                "Shelve",
                self._call_shelve,
                [alarm_id, argument("Minutes", ObjectIds.Double, "How long"), comment],
            ),
            (
                "StartBatch",
                self._call_start_batch,
                [
                    argument("BatchId", ObjectIds.String, "Batch id, 1-128 characters"),
                    argument(
                        "EndRunning",
                        ObjectIds.Boolean,
                        "True ends a running batch first; false (default) refuses then",
                    ),
                ],
            ),
            ("StopBatch", self._call_stop_batch, []),
        ]
        for name, callback, inputs in methods:
            # No arguments through add_method: it would give them numbered NodeIds.
            method = await node.add_method(
                self._nodeid(probe, name), self._qname(name), callback, [], []
            )
            for label, arguments in (("InputArguments", inputs), ("OutputArguments", reason)):
                if not arguments:
                    continue
                prop = await method.add_property(
                    _node_id(str(method.nodeid.Identifier) + f".{label}", self.idx),
                    ua.QualifiedName(label, 0),
                    arguments,
                    varianttype=ua.VariantType.ExtensionObject,
                    datatype=ObjectIds.Argument,
                )
                await prop.set_modelling_rule(True)

    async def _command(
        self, name: str, parent: ua.NodeId, call: Callable[[str, str], CommandResult]
    ) -> ua.CallMethodResult:
        """Run one CommandHandler call off the loop and turn its answer into a result."""
        probe = self._probe_of_node.get(parent)
        result = ua.CallMethodResult()
        if probe is None:
            result.StatusCode = _status(SC.BadNodeIdInvalid)
            return result
        who = current_caller()
        try:
            answer = await asyncio.wait_for(
                asyncio.to_thread(call, probe, who), timeout=COMMAND_TIMEOUT_S
            )
        except TimeoutError:
            log.error("opcua_command_timeout", command=name, probe=probe, who=who)
            result.StatusCode = _status(SC.BadTimeout)
            result.OutputArguments = [ua.Variant("the monitor did not answer in time")]
            return result
        except Exception as exc:
            log.exception("opcua_command_failed", command=name, probe=probe, who=who)
            result.StatusCode = _status(SC.BadInternalError)
            result.OutputArguments = [ua.Variant(f"internal error: {exc}")]
            return result
        log.info(
            "opcua_command",
            command=name,
            probe=probe,
            who=who,
            accepted=answer.accepted,
            reason=answer.reason,
        )
        if not answer.accepted:
            result.StatusCode = _status(SC.BadRequestNotAllowed)
        elif self.after_command is not None:
            await self.after_command()
        result.OutputArguments = [
            ua.Variant("" if answer.accepted else answer.reason or "refused", ua.VariantType.String)
        ]
        return result

    async def _call_acknowledge(self, parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
        try:
            alarm_id, comment = _text(args, 0, "AlarmId"), _text(args, 1, "Comment", "")
        except _BadArgumentError as exc:
            return _bad_argument(exc)
        return await self._command(
            "Acknowledge",
            parent,
            lambda probe, who: self.commands.acknowledge(probe, alarm_id, who, comment),
        )

    async def _call_shelve(self, parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
        try:
            alarm_id = _text(args, 0, "AlarmId")
            minutes = _number(args, 1, "Minutes")
            comment = _text(args, 2, "Comment", "")
        except _BadArgumentError as exc:
            return _bad_argument(exc)
        return await self._command(
            "Shelve",
            parent,
            lambda probe, who: self.commands.shelve(probe, alarm_id, minutes, who, comment),
        )

    async def _call_start_batch(self, parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
        try:
            batch_id = _text(args, 0, "BatchId")
            end_running = _flag(args, 1, "EndRunning")
        except _BadArgumentError as exc:
            return _bad_argument(exc)
        return await self._command(
            "StartBatch",
            parent,
            lambda probe, who: self.commands.start_batch(
                probe, batch_id, who, end_running=end_running
            ),
        )

    async def _call_stop_batch(self, parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
        return await self._command("StopBatch", parent, self.commands.stop_batch)


def _read_pair(cert_path: Path, key_path: Path) -> tuple[bytes, bytes]:
    """The server certificate as DER and its key as PEM; CertificateFileError if bad."""
    certificate = read_certificate(cert_path)
    key = read_private_key(key_path)
    if not key_matches(certificate, key):
        raise CertificateFileError(f"{key_path} is not the key of the certificate {cert_path}")
    return (
        certificate.public_bytes(serialization.Encoding.DER),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _event_severity(event: dict[str, Any], is_batch: bool) -> int:
    severity = event.get("severity")
    if isinstance(severity, int | float) and not isinstance(severity, bool):
        return max(1, min(1000, int(severity)))
    priority = {"low": 250, "medium": 500, "high": 750, "critical": 1000}
    return priority.get(str(event.get("priority")), BATCH_EVENT_SEVERITY if is_batch else 500)


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _argument(args: tuple[ua.Variant, ...], index: int, name: str, default: Any) -> Any:
    if index >= len(args):
        if default is None:
            raise _BadArgumentError(f"missing argument {name}")
        return default
    variant = args[index]
    return variant.Value if isinstance(variant, ua.Variant) else variant


def _text(args: tuple[ua.Variant, ...], index: int, name: str, default: str | None = None) -> str:
    value = _argument(args, index, name, default)
    if value is None:
        value = default if default is not None else ""
    if not isinstance(value, str):
        raise _BadArgumentError(f"{name} must be a String")
    return value


def _number(args: tuple[ua.Variant, ...], index: int, name: str) -> float:
    value = _argument(args, index, name, None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadArgumentError(f"{name} must be a number")
    return float(value)


def _flag(args: tuple[ua.Variant, ...], index: int, name: str) -> bool:
    """An optional Boolean argument (False when left out)."""
    value = _argument(args, index, name, False)
    if not isinstance(value, bool):
        raise _BadArgumentError(f"{name} must be a Boolean")
    return value


def _bad_argument(exc: _BadArgumentError) -> ua.CallMethodResult:
    result = ua.CallMethodResult()
    result.StatusCode = _status(SC.BadInvalidArgument)
    result.OutputArguments = [ua.Variant(str(exc), ua.VariantType.String)]
    return result
