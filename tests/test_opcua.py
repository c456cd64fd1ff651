"""OPC UA server: the real asyncua server started by OpcUaPublisher on a free port, read
by a real asyncua Client. Demo profile: address space, values with quality and time,
methods, events, history. Production profile: who may connect and with which rights."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.uaerrors import UaError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from monitor.config.opcua import OpcUaConfig
from monitor.manifest import ModelIdentity
from monitor.publishers.base import CommandResult, ProbeUpdate
from monitor.publishers.opcua import OpcUaPublisher, OpcUaStartError
from monitor.publishers.opcua_server import probe_status, unece_unit_id
from monitor.publishers.opcua_users import (
    UsersFileError,
    hash_password,
    parse_users,
    verify_password,
    write_user,
)

NS = "urn:crystal-monitor:test"
SC = ua.StatusCodes
CLIENT_URI = "urn:crystal-monitor:test-client"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RecordingCommands:
    """CommandHandler that records every call and refuses the ones listed in `refuse`."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse: dict[str, str] = {}

    def _answer(self, *call: Any) -> CommandResult:
        self.calls.append(call)
        reason = self.refuse.get(call[0])
        return CommandResult(reason is None, reason)

    def acknowledge(self, probe: str, alarm_id: str, who: str, comment: str) -> CommandResult:
        return self._answer("acknowledge", probe, alarm_id, who, comment)

    def shelve(
        self, probe: str, alarm_id: str, minutes: float, who: str, comment: str
    ) -> CommandResult:
        return self._answer("shelve", probe, alarm_id, minutes, who, comment)

    def start_batch(
        self, probe: str, batch_id: str, who: str, *, end_running: bool = False
    ) -> CommandResult:
        return self._answer("start_batch", probe, batch_id, who)

    def stop_batch(self, probe: str, who: str) -> CommandResult:
        return self._answer("stop_batch", probe, who)


def _window(pg: float, n: int, scale: float) -> dict[str, Any]:
    return {
        "n": n,
        "n_uncertain": 12,
        "frames": 290,
        "rejected_frames": 10,
        "rejected_by_reason": {"blur": 10},
        "rejected_share": 10 / 300,
        "uncertain_share": 12 / (n + 12),
        "particles_per_min": 200.0 * scale,
        "frames_per_min": 60.0 * scale,
        "classes": {
            "CEX": {
                "n": n - round(pg * n),
                "fraction": 1 - pg,
                "ci95": [1 - pg - 0.01, 1 - pg + 0.01],
                "adjusted": 1 - pg,
                "effective_n": n / 2,
            },
            "PG": {
                "n": round(pg * n),
                "fraction": pg,
                "ci95": [pg - 0.01, pg + 0.015],
                "adjusted": pg - 0.002,
                "effective_n": n / 2,
            },
        },
    }


def alarm_status(
    alarm_id: str = "pg_high", *, kind: str = "fraction_high", active: bool = True
) -> dict[str, Any]:
    return {
        "probe": "R1",
        "alarm_id": alarm_id,
        "kind": kind,
        "category": "diagnostic" if kind == "probe_stale" else "process",
        "priority": "high",
        "severity": 750,
        "state": "active_unacknowledged" if active else "normal",
        "active": active,
        "acknowledged": not active,
        "latched": False,
        "shelved": False,
        "shelved_until": None,
        "shelved_by": None,
        "suppressed": False,
        "message": "PG above 3 %",
        "value": 0.034,
        "limit": 0.03,
        "since": 1.0,
        "quality": "GOOD",
    }


def make_update(
    probe: str,
    *,
    ts: float,
    pg: float = 0.034,
    quality: str = "GOOD",
    alarms: list[dict[str, Any]] | None = None,
) -> ProbeUpdate:
    """An update whose 300 s window differs from the 60 s and 900 s ones."""
    snapshot = {
        "ts": ts,
        "batch": "B-17",
        "windows": {
            "60": _window(0.2, 300, 2.0),
            "300": _window(pg, 1000, 1.0),
            "900": _window(0.1, 3000, 3.0),
        },
        "trend": {},
    }
    return ProbeUpdate(
        probe=probe,
        ts=ts,
        batch="B-17",
        quality=quality,  # type: ignore[arg-type]
        model=ModelIdentity("default", "1", "0" * 64),
        classes=("CEX", "PG"),
        snapshot=snapshot,
        last_frame_ts=ts - 1.5,
        alarms=[alarm_status()] if alarms is None else alarms,
    )


async def eventually(
    read: Callable[[], Awaitable[Any]], check: Callable[[Any], bool], timeout: float = 10.0
) -> Any:
    """Poll `read` until `check` accepts its value (the publisher applies updates async)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await read()
            if check(last):
                return last
        except UaError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last value: {last!r}")
        await asyncio.sleep(0.05)


def utc(epoch_s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC)


def same_instant(a: dt.datetime | None, b: dt.datetime) -> bool:
    if a is None:
        return False
    if a.tzinfo is None:
        a = a.replace(tzinfo=dt.UTC)
    return abs((a - b).total_seconds()) < 1e-3


# -- demo profile -------------------------------------------------------------------------


@dataclass
class Running:
    publisher: OpcUaPublisher
    commands: RecordingCommands
    url: str
    state_dir: Path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    state_dir = tmp_path_factory.mktemp("demo-state")
    url = f"opc.tcp://127.0.0.1:{free_port()}/crystal-monitor"
    config = OpcUaConfig(enabled=True, endpoint=url, namespace_uri=NS, security_profile="demo")
    publisher = OpcUaPublisher(config, state_dir)
    commands = RecordingCommands()
    publisher.start(commands)
    try:
        yield Running(publisher, commands, url, state_dir)
    finally:
        publisher.stop()


async def probe_node(client: Client, probe: str) -> Any:
    idx = await client.get_namespace_index(NS)
    root = await client.nodes.objects.get_child(f"{idx}:CrystalMonitor")
    return await eventually(lambda: root.get_child(f"{idx}:{probe}"), lambda _: True)


async def child(node: Any, client: Client, *names: str) -> Any:
    idx = await client.get_namespace_index(NS)
    return await node.get_child([f"{idx}:{name}" for name in names])


def test_demo_client_finds_every_node_and_reads_the_5_minute_fraction_with_units(
    demo: Running,
) -> None:
    """Browse R1's whole layout; Fraction is an AnalogItemType in % (EURange 0..100,
    UNECE P1) holding the 300 s PG fraction x 100, Good, stamped with the update time."""
    ts = time.time() - 3
    demo.publisher.publish_update(make_update("R1", ts=ts, pg=0.034))

    async def scenario() -> None:
        async with Client(demo.url, timeout=10) as client:
            probe = await probe_node(client, "R1")
            paths = [
                ("Status",),
                ("LastFrameTime",),
                ("Batch",),
                ("Model",),
                ("ParticlesPerMinute",),
                ("FramesPerMinute",),
                ("RejectedFrameShare",),
                ("UncertainShare",),
                ("Acknowledge",),
                ("Shelve",),
                ("StartBatch",),
                ("StopBatch",),
            ]
            for name in ("CEX", "PG"):
                for leaf in ("Fraction", "CI95Low", "CI95High", "Adjusted", "Count"):
                    paths.append(("Fractions", name, leaf))
            for leaf in ("State", "Active", "Acknowledged", "Shelved", "Severity", "Message"):
                paths.append(("Alarms", "pg_high", leaf))
            for path in paths:
                await child(probe, client, *path)  # raises BadNoMatch when missing

            fraction = await child(probe, client, "Fractions", "PG", "Fraction")
            value = await eventually(
                fraction.read_data_value, lambda dv: dv.Value.Value is not None
            )
            assert value.Value.Value == pytest.approx(3.4)
            assert value.StatusCode.value == SC.Good
            assert same_instant(value.SourceTimestamp, utc(ts))
            assert (await fraction.read_type_definition()) == ua.NodeId(ua.ObjectIds.AnalogItemType)
            assert (await fraction.read_data_type()) == ua.NodeId(ua.ObjectIds.Double)
            assert (await fraction.read_display_name()).Text == "R1 PG fraction (5 min)"
            eu_range = await (await fraction.get_child("0:EURange")).read_value()
            assert (eu_range.Low, eu_range.High) == (0.0, 100.0)
            units = await (await fraction.get_child("0:EngineeringUnits")).read_value()
            assert units.UnitId == unece_unit_id("P1") == 0x5031
            assert units.DisplayName.Text == "%"
            assert units.NamespaceUri == "http://www.opcfoundation.org/UA/units/un/cefact"

            ci_high = await child(probe, client, "Fractions", "PG", "CI95High")
            assert await ci_high.read_value() == pytest.approx(4.9)
            rate = await child(probe, client, "ParticlesPerMinute")
            assert await rate.read_value() == pytest.approx(200.0)  # 300 s window, not 60 s
            count = await child(probe, client, "Fractions", "PG", "Count")
            assert await count.read_value() == 34
            assert await (await child(probe, client, "Status")).read_value() == "ok"
            assert await (await child(probe, client, "Batch")).read_value() == "B-17"
            model = await (await child(probe, client, "Model")).read_value()
            assert model == "default:1:000000000000"
            last_frame = await (await child(probe, client, "LastFrameTime")).read_value()
            assert same_instant(last_frame, utc(ts - 1.5))
            state = await child(probe, client, "Alarms", "pg_high", "State")
            assert await state.read_value() == "active_unacknowledged"
            severity = await child(probe, client, "Alarms", "pg_high", "Severity")
            assert await severity.read_value() == 750

    asyncio.run(scenario())


def test_bad_quality_makes_measured_values_bad_and_status_says_why(demo: Running) -> None:
    """A stale probe (quality BAD, probe_stale alarm active): Fraction reads
    BadNoCommunication with no value, Status reads 'stale', Status itself stays Good."""
    ts = time.time()
    demo.publisher.publish_update(make_update("R2", ts=ts - 10))
    stale = alarm_status("probe_stale", kind="probe_stale")
    demo.publisher.publish_update(make_update("R2", ts=ts, quality="BAD", alarms=[stale]))

    async def scenario() -> None:
        async with Client(demo.url, timeout=10) as client:
            probe = await probe_node(client, "R2")
            fraction = await child(probe, client, "Fractions", "PG", "Fraction")
            value = await eventually(
                lambda: fraction.read_data_value(raise_on_bad_status=False),
                lambda dv: dv.StatusCode.is_bad(),
            )
            assert value.StatusCode.value == SC.BadNoCommunication
            assert value.Value.Value is None
            assert same_instant(value.SourceTimestamp, utc(ts))
            status = await (await child(probe, client, "Status")).read_data_value()
            assert status.Value.Value == "stale"
            assert status.StatusCode.is_good()

    asyncio.run(scenario())


def test_uncertain_quality_maps_to_an_uncertain_status_code() -> None:
    update = make_update("R9", ts=1000.0, quality="UNCERTAIN")
    assert probe_status(update).code == SC.UncertainSubNormal
    assert probe_status(make_update("R9", ts=1000.0, quality="BAD")).text == "bad input"


def call_request(obj: Any, method: Any, *args: ua.Variant) -> ua.CallMethodRequest:
    return ua.CallMethodRequest(
        ObjectId=obj.nodeid, MethodId=method.nodeid, InputArguments=list(args)
    )


def test_methods_reach_the_command_handler_and_a_refusal_is_bad_with_its_reason(
    demo: Running,
) -> None:
    """Acknowledge and StartBatch are accepted (anonymous demo caller); a refused Shelve
    answers BadRequestNotAllowed with the handler's reason as output argument."""
    demo.publisher.publish_update(make_update("R3", ts=time.time()))
    demo.commands.refuse = {"shelve": "alarm pg_high is not active"}

    async def scenario() -> None:
        async with Client(demo.url, timeout=10) as client:
            probe = await probe_node(client, "R3")
            idx = await client.get_namespace_index(NS)
            assert await probe.call_method(f"{idx}:Acknowledge", "pg_high", "seen it") == ""
            assert await probe.call_method(f"{idx}:StartBatch", "B-18") == ""
            shelve = await probe.get_child(f"{idx}:Shelve")
            [refused] = await client.uaclient.call(
                [
                    call_request(
                        probe, shelve, ua.Variant("pg_high"), ua.Variant(30.0), ua.Variant("noisy")
                    )
                ]
            )
            assert refused.StatusCode.value == SC.BadRequestNotAllowed
            assert refused.OutputArguments[0].Value == "alarm pg_high is not active"
            [wrong] = await client.uaclient.call(
                [call_request(probe, shelve, ua.Variant("pg_high"), ua.Variant("soon"))]
            )
            assert wrong.StatusCode.value == SC.BadInvalidArgument

    try:
        asyncio.run(scenario())
    finally:
        demo.commands.refuse = {}
    assert ("acknowledge", "R3", "pg_high", "anonymous", "seen it") in demo.commands.calls
    assert ("start_batch", "R3", "B-18", "anonymous") in demo.commands.calls
    assert ("shelve", "R3", "pg_high", 30.0, "anonymous", "noisy") in demo.commands.calls
    assert sum(call[0] == "shelve" for call in demo.commands.calls) == 1  # bad args: no call


class EventCollector:
    def __init__(self) -> None:
        self.events: asyncio.Queue[Any] = asyncio.Queue()

    def event_notification(self, event: Any) -> None:
        self.events.put_nowait(event)


def test_alarm_event_reaches_subscribers_of_the_server_object(demo: Running) -> None:
    """publish_event -> an event from the Server object with SourceName = probe and the
    alarm's severity, plus our fields (AlarmId, ToState) on CrystalMonitorEventType."""

    async def scenario() -> None:
        async with Client(demo.url, timeout=10) as client:
            idx = await client.get_namespace_index(NS)
            event_type = await client.nodes.base_event_type.get_child(
                f"{idx}:CrystalMonitorEventType"
            )
            collector = EventCollector()
            subscription = await client.create_subscription(50, collector)
            await subscription.subscribe_events(client.nodes.server, event_type)
            ts = time.time()
            demo.publisher.publish_event(
                "R4",
                {
                    "type": "alarm",
                    "probe": "R4",
                    "alarm_id": "pg_high",
                    "kind": "fraction_high",
                    "priority": "critical",
                    "severity": 1000,
                    "from_state": "normal",
                    "to_state": "active_unacknowledged",
                    "value": 0.051,
                    "limit": 0.05,
                    "message": "PG 5.1 % above 5 %",
                    "ts": ts,
                    "cause": "condition",
                    "announced": True,
                    "who": None,
                },
            )
            demo.publisher.publish_event(
                "R4",
                {"type": "batch", "action": "start", "batch": "B-18", "ts": ts, "who": "op"},
            )
            event = await asyncio.wait_for(collector.events.get(), timeout=10)
            batch = await asyncio.wait_for(collector.events.get(), timeout=10)
            assert (batch.SourceName, batch.Category, batch.Batch) == ("R4", "batch", "B-18")
            assert batch.Severity == 100
            assert batch.Message.Text == "batch B-18 start by op"
            assert event.SourceName == "R4"
            assert event.Severity == 1000
            assert event.Message.Text == "PG 5.1 % above 5 %"
            assert event.AlarmId == "pg_high"
            assert event.ToState == "active_unacknowledged"
            assert event.Category == "alarm"
            assert same_instant(event.Time, utc(ts))
            probe = await probe_node(client, "R4")
            assert event.SourceNode == probe.nodeid
            await subscription.delete()

    asyncio.run(scenario())


def test_fraction_history_returns_the_published_values(demo: Running) -> None:
    """Several updates -> HistoryRead raw on the Fraction node returns them in order."""
    start = time.time() - 120
    fractions = [0.01, 0.02, 0.035, 0.05]

    async def scenario() -> None:
        async with Client(demo.url, timeout=10) as client:
            node = None
            for i, pg in enumerate(fractions):
                demo.publisher.publish_update(make_update("R5", ts=start + 10 * i, pg=pg))
                if node is None:
                    probe = await probe_node(client, "R5")
                    node = await child(probe, client, "Fractions", "PG", "Fraction")
                await eventually(node.read_value, lambda v, pg=pg: v == pytest.approx(pg * 100))
                await asyncio.sleep(0.1)  # let the history subscription store it
            assert node is not None
            assert await node.read_attribute(ua.AttributeIds.Historizing)
            history = await eventually(
                lambda: node.read_raw_history(utc(start - 60), utc(time.time() + 60)),
                lambda values: len(values) >= len(fractions),
            )
            assert [dv.Value.Value for dv in history] == pytest.approx(
                [pg * 100 for pg in fractions]
            )
            assert same_instant(history[-1].SourceTimestamp, utc(start + 30))

    asyncio.run(scenario())
    assert (demo.state_dir / "opcua_history.sqlite").is_file()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.10.5", "plant-pc"])
def test_demo_profile_refuses_a_non_loopback_endpoint(host: str) -> None:
    with pytest.raises(ValidationError, match="only listens on loopback"):
        OpcUaConfig(security_profile="demo", endpoint=f"opc.tcp://{host}:4840/x")
    OpcUaConfig(security_profile="demo", endpoint="opc.tcp://[::1]:4840/x")


def test_production_profile_needs_a_users_file_when_enabled() -> None:
    with pytest.raises(ValidationError, match="production profile needs users_file"):
        OpcUaConfig(enabled=True)
    with pytest.raises(ValidationError, match="needs a port"):
        OpcUaConfig(endpoint="opc.tcp://0.0.0.0/x")


def test_start_fails_clearly_when_the_port_is_taken(tmp_path: Path, demo: Running) -> None:
    config = OpcUaConfig(endpoint=demo.url, namespace_uri=NS, security_profile="demo")
    with pytest.raises(OpcUaStartError, match="cannot listen on"):
        OpcUaPublisher(config, tmp_path).start(RecordingCommands())


# -- users file ---------------------------------------------------------------------------


def test_password_hashes_are_salted_and_verified() -> None:
    first, second = hash_password("correct horse"), hash_password("correct horse")
    assert first != second and first.startswith("scrypt$")
    assert verify_password("correct horse", first)
    assert not verify_password("correct hors", first)
    assert not verify_password("correct horse", "plain:text")


def test_users_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    write_user(path, "operator", "pw-1")
    write_user(path, "operator", "pw-2")  # replaces the password
    assert path.stat().st_mode & 0o777 == 0o600
    users = parse_users(path.read_text())
    assert list(users) == ["operator"] and verify_password("pw-2", users["operator"])
    with pytest.raises(UsersFileError, match=r"users:2: bad hash for user 'bob'"):
        parse_users("# comment\nbob:md5$x\n", "users")
    with pytest.raises(UsersFileError, match="appears twice"):
        parse_users(f"a:{users['operator']}\na:{users['operator']}\n")


# -- production profile -------------------------------------------------------------------


def make_ca(directory: Path) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A plant CA certificate, written to `directory` as plant-ca.pem."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plant CA")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "plant-ca.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate, key


def make_client_certificate(
    directory: Path,
    name: str,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None = None,
) -> tuple[Path, Path]:
    """Client application certificate: self-signed and not a CA (as UaExpert makes them),
    or issued by `issuer`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    signer = key if issuer is None else issuer[1]
    builder = x509.CertificateBuilder()
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    certificate = (
        builder.subject_name(subject)
        .issuer_name(subject if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(CLIENT_URI), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.der", directory / f"{name}.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class Production(Running):
    trusted: tuple[Path, Path]
    untrusted: tuple[Path, Path]
    ca_issued: tuple[Path, Path]
    trust_dir: Path
    users: Path

    @property
    def server_certificate(self) -> Path:
        return self.state_dir / "opcua" / "server_cert.der"


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Production]:
    base = tmp_path_factory.mktemp("production")
    state_dir, trust_dir = base / "state", base / "trusted"
    trusted = make_client_certificate(base / "client", "trusted-client")
    untrusted = make_client_certificate(base / "client", "stranger")
    ca_issued = make_client_certificate(base / "client", "ca-client", make_ca(trust_dir))
    (trust_dir / "trusted-client.der").write_bytes(trusted[0].read_bytes())
    users = base / "users"
    write_user(users, "operator", "op-pass-1")
    write_user(users, "admin", "admin-pass-1")
    url = f"opc.tcp://127.0.0.1:{free_port()}/crystal-monitor"
    config = OpcUaConfig(
        enabled=True, endpoint=url, namespace_uri=NS, users_file=users, trust_dir=trust_dir
    )
    publisher = OpcUaPublisher(config, state_dir)
    commands = RecordingCommands()
    publisher.start(commands)
    publisher.publish_update(make_update("P1", ts=time.time()))
    try:
        yield Production(
            publisher, commands, url, state_dir, trusted, untrusted, ca_issued, trust_dir, users
        )
    finally:
        publisher.stop()


async def secure_client(
    env: Production,
    user: str | None,
    password: str | None,
    certificate: tuple[Path, Path] | None = None,
) -> Client:
    client = Client(env.url, timeout=10)
    client.application_uri = CLIENT_URI
    cert, key = certificate or env.trusted
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        certificate=str(cert),
        private_key=str(key),
        server_certificate=str(env.server_certificate),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    if user is not None:
        client.set_user(user)
    if password is not None:
        client.set_password(password)
    return client


def test_production_offers_only_basic256sha256_sign_and_encrypt_with_user_names(
    production: Production,
) -> None:
    async def scenario() -> list[ua.EndpointDescription]:
        return await Client(production.url, timeout=10).connect_and_get_server_endpoints()

    endpoints = asyncio.run(scenario())
    assert endpoints
    generated = production.server_certificate.read_bytes()
    assert all(endpoint.ServerCertificate == generated for endpoint in endpoints)
    key = production.state_dir / "opcua" / "server_key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    for endpoint in endpoints:
        assert endpoint.SecurityPolicyUri == SecurityPolicyBasic256Sha256.URI
        assert endpoint.SecurityMode == ua.MessageSecurityMode.SignAndEncrypt
        tokens = {policy.TokenType for policy in endpoint.UserIdentityTokens}
        assert tokens == {ua.UserTokenType.UserName}


def test_production_user_with_trusted_certificate_reads_and_calls_as_itself(
    production: Production,
) -> None:
    async def scenario() -> None:
        client = await secure_client(production, "operator", "op-pass-1")
        async with client:
            probe = await probe_node(client, "P1")
            fraction = await child(probe, client, "Fractions", "PG", "Fraction")
            value = await eventually(fraction.read_value, lambda v: v is not None)
            assert value == pytest.approx(3.4)
            idx = await client.get_namespace_index(NS)
            assert await probe.call_method(f"{idx}:StopBatch") == ""

    asyncio.run(scenario())
    assert ("stop_batch", "P1", "operator") in production.commands.calls


@pytest.mark.parametrize(
    ("user", "password", "certificate", "code"),
    [
        pytest.param(None, None, "trusted", SC.BadIdentityTokenRejected, id="anonymous"),
        pytest.param(
            "operator", "wrong-pass", "trusted", SC.BadUserAccessDenied, id="wrong password"
        ),
        pytest.param("nobody", "op-pass-1", "trusted", SC.BadUserAccessDenied, id="unknown user"),
        pytest.param(
            "operator", "op-pass-1", "untrusted", SC.BadCertificateUntrusted, id="untrusted cert"
        ),
    ],
)
def test_production_refuses(
    production: Production, user: str | None, password: str | None, certificate: str, code: int
) -> None:
    pair = production.trusted if certificate == "trusted" else production.untrusted

    async def scenario() -> None:
        client = await secure_client(production, user, password, pair)
        with pytest.raises(ua.UaStatusCodeError) as refused:
            await client.connect()
        assert refused.value.code == code

    asyncio.run(scenario())
    if certificate == "untrusted":
        rejected = list((production.state_dir / "opcua" / "rejected").glob("*.der"))
        assert [path.read_bytes() for path in rejected] == [pair[0].read_bytes()]


def test_production_trusts_ca_issued_and_newly_added_client_certificates(
    production: Production, tmp_path: Path
) -> None:
    """A certificate issued by a CA in the trust folder connects; a self-signed one
    copied into the folder while the server runs connects without a restart."""
    latecomer = make_client_certificate(tmp_path, "latecomer")

    async def connect_and_read(pair: tuple[Path, Path]) -> str:
        client = await secure_client(production, "operator", "op-pass-1", pair)
        async with client:
            probe = await probe_node(client, "P1")
            return str(await (await child(probe, client, "Status")).read_value())

    assert asyncio.run(connect_and_read(production.ca_issued)) == "ok"
    (production.trust_dir / "latecomer.der").write_bytes(latecomer[0].read_bytes())
    assert asyncio.run(connect_and_read(latecomer)) == "ok"


def test_production_user_added_to_the_users_file_logs_in_without_restart(
    production: Production,
) -> None:
    write_user(production.users, "shift-b", "shift-b-pass")

    async def scenario() -> None:
        client = await secure_client(production, "shift-b", "shift-b-pass")
        async with client:
            probe = await probe_node(client, "P1")
            assert await (await child(probe, client, "Batch")).read_value() == "B-17"

    asyncio.run(scenario())


def test_production_refuses_a_password_login_over_an_unsecured_channel(
    production: Production,
) -> None:
    """A client that opens a NoSecurity channel anyway (the default policy asyncua keeps
    for discovery) and logs in with a valid password is refused: asyncua validates only
    the client certificate repeated in CreateSession, which this client never sends."""

    async def scenario() -> None:
        client = Client(production.url, timeout=10)
        await client.connect_socket()
        try:
            await client.send_hello()
            await client.open_secure_channel()
            with pytest.raises(UaError, match="No matching endpoints"):
                await client.create_session()  # the server answered; only the client objects
            with pytest.raises(ua.UaStatusCodeError) as refused:
                await client.activate_session(username="operator", password="op-pass-1")
            assert refused.value.code == SC.BadUserAccessDenied
        finally:
            client.disconnect_socket()

    asyncio.run(scenario())


def test_production_user_named_admin_gets_no_admin_rights(production: Production) -> None:
    """asyncua's default manager makes 'admin' an Admin; ours must not: writing a value
    or adding a node is refused with BadUserAccessDenied."""

    async def scenario() -> None:
        client = await secure_client(production, "admin", "admin-pass-1")
        async with client:
            probe = await probe_node(client, "P1")
            fraction = await child(probe, client, "Fractions", "PG", "Fraction")
            with pytest.raises(ua.UaStatusCodeError) as write_error:
                await fraction.write_value(ua.Variant(0.0, ua.VariantType.Double))
            assert write_error.value.code == SC.BadUserAccessDenied
            with pytest.raises(ua.UaStatusCodeError) as add_error:
                await client.nodes.objects.add_object(2, "Injected")
            assert add_error.value.code == SC.BadUserAccessDenied
            assert await fraction.read_value() == pytest.approx(3.4)

    asyncio.run(scenario())
