"""MQTT publisher against a real Mosquitto broker and real paho subscribers.

The outage tests run the publisher in a subprocess (tests/mqtt_publisher_process.py) so
it can be SIGKILLed like a crashed daemon. `CRYSTAL_MONITOR_MQTT_OUTAGE_S` sets the
broker outage (default 20 s; the daemon-level acceptance test uses 60 s).
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from monitor.config.mqtt import MqttConfig
from monitor.config.secrets import SecretError, resolve_password
from monitor.publishers.base import CommandResult
from monitor.publishers.mqtt import MqttPublisher, MqttSetupError
from monitor.publishers.outbox import Outbox
from monitor.timestamps import iso_utc
from tests.mosquitto import (
    Received,
    Subscriber,
    free_port,
    make_client_certificate,
    make_test_certificates,
    running_mosquitto,
)
from tests.mqtt_publisher_process import make_update

PREFIX = "crystal-monitor"
REPO = Path(__file__).resolve().parent.parent
OUTAGE_S = float(os.environ.get("CRYSTAL_MONITOR_MQTT_OUTAGE_S", "20"))


# -- helpers -----------------------------------------------------------------------------


class PublisherProcess:
    """tests/mqtt_publisher_process.py in a subprocess, with its JSON stdout lines."""

    def __init__(self, port: int, state_dir: Path, log_path: Path, *args: str) -> None:
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.mqtt_publisher_process",
                "--port",
                str(port),
                "--state-dir",
                str(state_dir),
                *args,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(b"{"):
                self.lines.put(json.loads(line))

    def wait_event(self, name: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"publisher process never printed {name!r}") from None
            if line.get("event") == name:
                return line

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> dict[str, Any]:
        self.process.send_signal(signal.SIGTERM)
        stopped = self.wait_event("stopped", timeout=15)
        assert self.process.wait(10) == 0
        return stopped

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


@pytest.fixture
def processes() -> Iterator[list[PublisherProcess]]:
    started: list[PublisherProcess] = []
    yield started
    for process in started:
        process.close()


class FakeHandler:
    """Records operator commands; refuses alarm 'unknown_alarm', raises for alarm 'boom'."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def _answer(self, alarm_id: str) -> CommandResult:
        if alarm_id == "boom":
            raise RuntimeError("handler exploded")
        if alarm_id == "unknown_alarm":
            return CommandResult(False, "no such alarm")
        return CommandResult(True)

    def acknowledge(self, probe: str, alarm_id: str, who: str, comment: str) -> CommandResult:
        self.calls.append(("ack", probe, alarm_id, who, comment))
        return self._answer(alarm_id)

    def shelve(
        self, probe: str, alarm_id: str, minutes: float, who: str, comment: str
    ) -> CommandResult:
        self.calls.append(("shelve", probe, alarm_id, minutes, who, comment))
        return self._answer(alarm_id)

    def start_batch(
        self, probe: str, batch_id: str, who: str, *, end_running: bool = False
    ) -> CommandResult:
        self.calls.append(("start_batch", probe, batch_id, who))
        return CommandResult(True)

    def stop_batch(self, probe: str, who: str) -> CommandResult:
        self.calls.append(("stop_batch", probe, who))
        return CommandResult(True)


def make_config(port: int, **overrides: Any) -> MqttConfig:
    values: dict[str, Any] = {
        "enabled": True,
        "port": port,
        "client_id": f"test-pub-{uuid.uuid4().hex[:8]}",
        "topic_prefix": PREFIX,
        "reconnect_min": 1,
        "reconnect_max": 1,
        "stop_timeout": 2,
    }
    values.update(overrides)
    return MqttConfig(**values)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def seqs(messages: list[Received]) -> list[int]:
    return [int(m.json()["seq"]) for m in messages]


def check_in_order_without_gap(received: list[int], last: int) -> int:
    """Every seq 1..last arrives in order; a repeat (QoS 1 redelivery) may only re-send
    seqs already seen, which a consumer drops by keeping seq > the last it kept.
    Returns the number of such duplicates."""
    kept = 0
    duplicates = 0
    for seq in received:
        if seq <= kept:
            duplicates += 1
            continue
        assert seq == kept + 1, f"gap or reordering: after {kept} came {seq}"
        kept = seq
    assert kept == last, f"stream ends at {kept}, expected {last}"
    return duplicates


# -- config and secrets ------------------------------------------------------------------


def test_config_has_no_password_key_and_checks_consistency() -> None:
    """A password can only be named (env or credential), never written in the config."""
    with pytest.raises(ValidationError, match="password"):
        MqttConfig(username="u", password="secret")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="needs username"):
        MqttConfig(password_env="MQTT_PASSWORD")
    with pytest.raises(ValidationError, match="not both"):
        MqttConfig(username="u", password_env="A", password_credential="b")
    with pytest.raises(ValidationError, match="wildcards"):
        MqttConfig(topic_prefix="plant/+")
    config = MqttConfig()
    assert config.client_id.startswith("crystal-monitor-")
    assert (config.port, config.keepalive, config.outbox_max_events) == (1883, 30.0, 100_000)
    assert MqttConfig(keepalive="1m", reconnect_max="5m").reconnect_max == 300.0


def test_password_from_env_and_credentials_directory(tmp_path: Path) -> None:
    """The env var and the systemd credential are read; a missing one names the fix."""
    assert (
        resolve_password(
            env_var="MQTT_PW", credential=None, section="mqtt", environ={"MQTT_PW": "s3cret"}
        )
        == "s3cret"
    )
    with pytest.raises(SecretError, match=r"mqtt\.password_env: environment variable MQTT_PW"):
        resolve_password(env_var="MQTT_PW", credential=None, section="mqtt", environ={})

    (tmp_path / "mqtt-password").write_text("from-credential\n")
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert (
        resolve_password(env_var=None, credential="mqtt-password", section="mqtt", environ=environ)
        == "from-credential"
    )
    with pytest.raises(SecretError, match=r"CREDENTIALS_DIRECTORY.*LoadCredential=mqtt-password"):
        resolve_password(env_var=None, credential="mqtt-password", section="mqtt", environ={})
    with pytest.raises(SecretError, match=r"credential file .*other.* not found"):
        resolve_password(env_var=None, credential="other", section="mqtt", environ=environ)
    assert resolve_password(env_var=None, credential=None, section="mqtt", environ={}) is None
    with pytest.raises(SecretError, match="MQTT_PW"):
        MqttPublisher(
            MqttConfig(username="u", password_env="MQTT_PW"), tmp_path, version="t", environ={}
        )


def test_password_auth_right_password_connects_wrong_one_reports_not_connected(
    tmp_path: Path,
) -> None:
    users = {"monitor": "right-pw", "viewer": "viewer-pw"}
    with running_mosquitto(tmp_path / "broker", users=users) as broker:
        good = MqttPublisher(
            make_config(broker.port, username="monitor", password_env="MQTT_PW"),
            tmp_path / "good",
            version="t",
            environ={"MQTT_PW": "right-pw"},
        )
        bad = MqttPublisher(
            make_config(broker.port, username="monitor", password_credential="mqtt-pw"),
            tmp_path / "bad",
            version="t",
            environ={"CREDENTIALS_DIRECTORY": str(_credential(tmp_path, "wrong-pw"))},
        )
        good.start(FakeHandler())
        bad.start(FakeHandler())
        try:
            assert wait_until(lambda: good.health()[0], 5), good.health()
            with Subscriber(
                broker.port, [f"{PREFIX}/status"], username="viewer", password="viewer-pw"
            ) as sub:
                assert sub.wait_for(lambda ms: any(m.json()["state"] == "online" for m in ms))
            assert wait_until(lambda: "refused" in bad.health()[1], 5), bad.health()
            connected, reason = bad.health()
            assert not connected
            assert "Not authorized" in reason and "password" in reason
        finally:
            good.stop()
            bad.stop()


def test_tls_with_the_configured_ca_connects_and_without_it_does_not(tmp_path: Path) -> None:
    files = make_test_certificates(tmp_path / "certs")
    with running_mosquitto(tmp_path / "broker", tls=files) as broker:
        trusted = MqttPublisher(
            make_config(broker.port, tls={"enabled": True, "ca_file": files.ca_file}),
            tmp_path / "trusted",
            version="t",
        )
        untrusted = MqttPublisher(
            make_config(broker.port, tls={"enabled": True}),  # system CAs only
            tmp_path / "untrusted",
            version="t",
        )
        trusted.start(FakeHandler())
        untrusted.start(FakeHandler())
        try:
            assert wait_until(lambda: trusted.health()[0], 5), trusted.health()
            assert wait_until(lambda: "cannot reach" in untrusted.health()[1], 5)
            assert untrusted.health()[0] is False
        finally:
            trusted.stop()
            untrusted.stop()
    with pytest.raises(MqttSetupError, match=r"mqtt\.tls\.ca_file: file not found"):
        MqttPublisher(
            make_config(1883, tls={"enabled": True, "ca_file": tmp_path / "missing.crt"}),
            tmp_path / "missing",
            version="t",
        )


def test_mutual_tls_needs_the_client_certificate(tmp_path: Path) -> None:
    """A broker that requires client certificates accepts the configured one only."""
    import dataclasses

    files = make_test_certificates(tmp_path / "certs")
    cert, key = make_client_certificate(tmp_path / "certs")
    strict = dataclasses.replace(files, require_client_certificate=True)
    with running_mosquitto(tmp_path / "broker", tls=strict) as broker:
        with_cert = MqttPublisher(
            make_config(
                broker.port,
                tls={"enabled": True, "ca_file": files.ca_file, "cert_file": cert, "key_file": key},
            ),
            tmp_path / "with",
            version="t",
        )
        without_cert = MqttPublisher(
            make_config(broker.port, tls={"enabled": True, "ca_file": files.ca_file}),
            tmp_path / "without",
            version="t",
        )
        with_cert.start(FakeHandler())
        without_cert.start(FakeHandler())
        try:
            assert wait_until(lambda: with_cert.health()[0], 5), with_cert.health()
            time.sleep(2)
            assert without_cert.health()[0] is False
        finally:
            with_cert.stop()
            without_cert.stop()


def _credential(tmp_path: Path, password: str) -> Path:
    directory = tmp_path / "credentials"
    directory.mkdir(exist_ok=True)
    (directory / "mqtt-pw").write_text(password + "\n")
    return directory


# -- outbox --------------------------------------------------------------------------------


def test_outbox_drops_results_before_events_and_persists_seq_counters_and_state(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path, max_events=5)
    for i in range(3):
        outbox.append("R1", "events", "t/R1/events", {"i": i})
    for i in range(4):
        outbox.append("R1", "results", "t/R1/results", {"i": i})
    # 7 messages, bound 5: the two oldest results go first, every event stays.
    pending = outbox.pending(0, 100)
    assert [(m.stream, m.seq) for m in pending] == [
        ("events", 1),
        ("events", 2),
        ("events", 3),
        ("results", 3),
        ("results", 4),
    ]
    assert json.loads(pending[0].payload) == {"i": 0, "probe": "R1", "seq": 1}
    assert outbox.stats().dropped == {"events": 0, "results": 2}
    outbox.acknowledge([pending[0].id, pending[1].id])
    assert outbox.put_retained("t/R1/fractions", b"1") is True
    assert outbox.put_retained("t/R1/fractions", b"2") is True
    assert outbox.put_retained("t/R1/fractions", b"2") is False
    outbox.close()

    reopened = Outbox(tmp_path, max_events=5)
    assert reopened.stats().backlog == 3
    assert reopened.stats().dropped == {"events": 0, "results": 2}
    assert reopened.retained() == {"t/R1/fractions": b"2"}
    assert reopened.append("R1", "events", "t/R1/events", {}) == 4  # never reused
    assert reopened.last_seq("R1", "results") == 4
    reopened.close()


def test_bounded_outbox_drops_oldest_events_and_keeps_only_latest_state(tmp_path: Path) -> None:
    """With the broker down, 80 events into a bound of 50: seq 1-30 are dropped and
    counted, 31-80 arrive in order; five updates leave one retained value per topic."""
    port = free_port()
    publisher = MqttPublisher(
        make_config(port, outbox_max_events=50), tmp_path / "state", version="t", probes=["R1"]
    )
    for i in range(1, 81):
        publisher.publish_event("R1", {"type": "test", "i": i})
    for tick in range(1, 6):
        publisher.publish_update(make_update("R1", tick, 1000.0 + tick))
    diagnostics = publisher.diagnostics()
    assert diagnostics["backlog"] == 50
    assert diagnostics["dropped"] == {"events": 30, "results": 0}
    assert diagnostics["retained_topics"] == 3  # fractions + 2 alarms
    try:
        with (
            running_mosquitto(tmp_path / "broker", port=port),
            Subscriber(port, [f"{PREFIX}/#"]) as sub,
        ):
            publisher.start(FakeHandler())
            events = f"{PREFIX}/R1/events"
            assert sub.wait_for(
                lambda ms: any(m.json().get("seq") == 80 for m in ms if m.topic == events)
            )
            assert seqs(sub.on(events)) == list(range(31, 81))
            assert [m.json()["i"] for m in sub.on(events)] == list(range(31, 81))
            fractions = sub.on(f"{PREFIX}/R1/fractions")
            assert len(fractions) == 1
            assert fractions[0].json()["ts"] == iso_utc(1005.0)
            assert fractions[0].json()["windows"]["60s"]["n"] == 105
            assert len(sub.on(f"{PREFIX}/R1/alarms/pg_high")) == 1
            assert wait_until(lambda: publisher.diagnostics()["backlog"] == 0, 5)
            health = publisher.health()
            assert health == (True, f"connected to 127.0.0.1:{port}")
    finally:
        publisher.stop()
    assert publisher.diagnostics()["dropped_total"] == 30


def test_start_returns_at_once_with_the_broker_down(tmp_path: Path) -> None:
    publisher = MqttPublisher(make_config(free_port()), tmp_path, version="t")
    began = time.monotonic()
    publisher.start(FakeHandler())
    assert time.monotonic() - began < 1.0
    assert wait_until(lambda: "cannot reach broker" in publisher.health()[1], 3)
    assert publisher.health()[0] is False
    publisher.publish_event("R1", {"type": "test"})
    began = time.monotonic()
    publisher.stop()
    assert time.monotonic() - began < 3.0
    assert publisher.diagnostics()["backlog"] == 1  # kept for the next start


# -- retained state, will, clean stop -------------------------------------------------------


def test_late_subscriber_gets_state_at_once_offline_after_kill_and_after_clean_stop(
    tmp_path: Path, processes: list[PublisherProcess]
) -> None:
    status_topic = f"{PREFIX}/status"
    with (
        running_mosquitto(tmp_path / "broker") as broker,
        Subscriber(broker.port, [status_topic]) as watcher,
    ):
        state_dir = tmp_path / "state"
        log_path = tmp_path / "publisher.log"
        first = PublisherProcess(broker.port, state_dir, log_path, "--probes", "R1,R2", "--updates")
        processes.append(first)
        assert watcher.wait_for(lambda ms: any(m.json()["state"] == "online" for m in ms))
        time.sleep(1.2)  # a few publish intervals

        expected = {status_topic} | {
            f"{PREFIX}/{probe}/{leaf}"
            for probe in ("R1", "R2")
            for leaf in ("fractions", "alarms/pg_high", "alarms/probe_blind")
        }
        with Subscriber(broker.port, [f"{PREFIX}/#"]) as late:
            assert late.wait_for(lambda ms: expected <= {m.topic for m in ms}, timeout=3)
            retained = {m.topic: m for m in late.received if m.retain}
            assert expected <= set(retained), "state must arrive as retained messages"
            status = retained[status_topic].json()
            assert status["state"] == "online" and status["version"] == "test-1"
            for probe in ("R1", "R2"):
                fractions = retained[f"{PREFIX}/{probe}/fractions"].json()
                assert fractions["probe"] == probe and fractions["batch"] == "B-1"
                assert fractions["model"] == {
                    "name": "resnet18",
                    "version": "1",
                    "sha256": "ab" * 32,
                }
                assert fractions["quality"] == "GOOD"
                assert fractions["ts"].endswith("Z")
                assert set(fractions["windows"]) == {"60s", "300s", "900s"}
                window = fractions["windows"]["300s"]
                assert window["frames"] == 10 and window["rejected_frames"] == 1
                assert window["n_uncertain"] == 3 and window["n"] >= 101
                pg = window["classes"]["PG"]
                assert set(pg) >= {"n", "fraction", "ci95", "adjusted"}
                assert pg["ci95"] == [0.0, 0.1]
                assert fractions["trend"]["PG"]["ewma"] == pg["fraction"]
                alarm = retained[f"{PREFIX}/{probe}/alarms/pg_high"].json()
                assert alarm["alarm_id"] == "pg_high" and alarm["state"] == "normal"
                assert alarm["probe"] == probe

        first.kill()
        assert watcher.wait_for(lambda ms: ms[-1].json()["state"] == "offline", timeout=5)
        with Subscriber(broker.port, [status_topic]) as after_kill:
            assert after_kill.wait_for(lambda ms: len(ms) > 0)
            will = after_kill.received[0]
            assert will.retain and will.json()["state"] == "offline"
            assert will.json()["reason"] == "connection lost"  # the broker sent the will

        second = PublisherProcess(broker.port, state_dir, log_path, "--probes", "R1,R2")
        processes.append(second)
        assert watcher.wait_for(lambda ms: ms[-1].json()["state"] == "online", timeout=10)
        second.terminate()
        assert watcher.wait_for(lambda ms: ms[-1].json()["state"] == "offline", timeout=5)
        with Subscriber(broker.port, [status_topic]) as after_stop:
            assert after_stop.wait_for(lambda ms: len(ms) > 0)
            offline = after_stop.received[0].json()
            assert offline["state"] == "offline" and offline["reason"] == "stopped"


# -- outages --------------------------------------------------------------------------------


def run_outage(
    tmp_path: Path,
    processes: list[PublisherProcess],
    *,
    outage_s: float,
    kill_during_outage: bool,
    rate: float = 10.0,
    before_s: float = 3.0,
    after_s: float = 1.0,
) -> dict[str, Any]:
    """2 probes, events and results at `rate` msg/s each; the broker goes away for
    `outage_s` and comes back on the same port. Optionally the publisher is SIGKILLed in
    the middle of the outage and restarted on the same state dir. Returns counts."""
    probes = ("R1", "R2")
    topics = [f"{PREFIX}/status", f"{PREFIX}/+/events", f"{PREFIX}/+/results"]
    args = ["--probes", ",".join(probes), "--rate", str(rate), "--results"]
    state_dir = tmp_path / "state"
    log_path = tmp_path / "publisher.log"
    with (
        running_mosquitto(tmp_path / "broker", persistence=True) as broker,
        Subscriber(broker.port, topics, client_id="outage-subscriber", clean=False) as sub,
    ):
        total_ticks = round(rate * (before_s + outage_s + after_s))
        first = PublisherProcess(
            broker.port, state_dir, log_path, *args, "--count", str(total_ticks)
        )
        processes.append(first)
        first.wait_event("started")
        time.sleep(before_s)
        broker.stop()
        outage_began = time.monotonic()
        outage_began_iso = iso_utc(time.time())
        last_tick = total_ticks
        if kill_during_outage:
            time.sleep(outage_s / 2)
            first.kill()
            rest = round(rate * (outage_s / 2 + after_s))
            second = PublisherProcess(broker.port, state_dir, log_path, *args, "--count", str(rest))
            processes.append(second)
            started = second.wait_event("started")
            persisted = {p: started["last_seq"][p]["events"] for p in probes}
            assert min(persisted.values()) >= rate * (before_s + outage_s / 2) * 0.8
            assert all(started["last_seq"][p]["results"] == persisted[p] for p in probes)
            last_tick = persisted["R1"] + rest
            assert persisted["R2"] == persisted["R1"]
        time.sleep(max(0.0, outage_s - (time.monotonic() - outage_began)))
        broker.start()
        back = time.monotonic()

        def complete(messages: list[Received]) -> bool:
            return all(
                any(
                    m.topic == f"{PREFIX}/{probe}/{stream}" and m.json()["seq"] == last_tick
                    for m in messages
                )
                for probe in probes
                for stream in ("events", "results")
            )

        assert sub.wait_for(complete, timeout=60), "not every message arrived after the outage"
        drained_s = time.monotonic() - back
        # Birth before backlog: the live (non-retained) "online" after the outage comes
        # before every message generated during the outage (which only the new connection
        # can have carried). A broker shutdown also sends the will: "offline" before it.
        after = [m for m in sub.received if m.at > outage_began and not m.retain]
        online = next(
            i
            for i, m in enumerate(after)
            if m.topic.endswith("/status") and m.json()["state"] == "online"
        )
        backlog = next(
            i
            for i, m in enumerate(after)
            if not m.topic.endswith("/status") and m.json()["ts"] > outage_began_iso
        )
        assert online < backlog
        counts: dict[str, Any] = {"last_seq": last_tick, "back_to_last_s": round(drained_s, 1)}
        for probe in probes:
            for stream in ("events", "results"):
                received = seqs(sub.on(f"{PREFIX}/{probe}/{stream}"))
                duplicates = check_in_order_without_gap(received, last_tick)
                counts[f"{probe}/{stream}"] = {"received": len(received), "duplicates": duplicates}
        processes[-1].terminate()
    return counts


def test_broker_outage_loses_nothing_and_keeps_order(
    tmp_path: Path, processes: list[PublisherProcess]
) -> None:
    counts = run_outage(tmp_path, processes, outage_s=OUTAGE_S, kill_during_outage=False)
    print("outage:", json.dumps(counts))


def test_publisher_killed_during_outage_delivers_persisted_backlog(
    tmp_path: Path, processes: list[PublisherProcess]
) -> None:
    counts = run_outage(tmp_path, processes, outage_s=OUTAGE_S, kill_during_outage=True)
    print("outage with restart:", json.dumps(counts))


# -- commands --------------------------------------------------------------------------------


def _bad_commands(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """`count` (topic suffix, payload) pairs that must all be refused."""
    valid: dict[str, dict[str, Any]] = {
        "ack": {"alarm_id": "pg_high", "who": "alice", "comment": "ok"},
        "shelve": {"alarm_id": "pg_high", "minutes": 30, "who": "alice", "comment": "ok"},
        "batch": {"action": "start", "batch_id": "B-7", "who": "alice"},
    }
    wrong_types: dict[str, list[tuple[str, Any]]] = {
        "ack": [("alarm_id", 5), ("who", ["a"]), ("comment", 3), ("alarm_id", None), ("who", "")],
        "shelve": [
            ("minutes", "5"),
            ("minutes", True),
            ("minutes", -1),
            ("minutes", 0),
            ("minutes", 10**6),
            ("alarm_id", {"a": 1}),
        ],
        "batch": [("action", "pause"), ("action", 1), ("batch_id", 7), ("who", None)],
    }
    junk = [0, 1.5, "text", None, True, [1, 2], {"nested": {"x": [1]}}, "x" * 300]
    out: list[tuple[str, bytes]] = []
    for i in range(count):
        command = rng.choice(list(valid))
        body = dict(valid[command], request_id=f"fuzz-{i}")
        kind = i % 12
        topic = f"R1/cmd/{command}"
        if kind == 0:
            payload = rng.randbytes(rng.randint(0, 200))
            if payload.lstrip().startswith(b"{"):
                payload = b"\xff" + payload
        elif kind == 1:
            payload = json.dumps(rng.choice(junk)).encode()
        elif kind == 2:
            required = [k for k in body if k not in ("comment", "request_id")]
            for key in rng.sample(required, rng.randint(1, len(required))):
                del body[key]
            payload = json.dumps(body).encode()
        elif kind == 3:
            key, value = rng.choice(wrong_types[command])
            body[key] = value
            payload = json.dumps(body).encode()
        elif kind == 4:
            topic = f"R{rng.randint(2, 99)}/cmd/{command}"  # unknown probe
            payload = json.dumps(body).encode()
        elif kind == 5:
            topic = f"R1/cmd/{rng.choice(['reset', 'delete', 'ACK', 'shelve2'])}"
            payload = json.dumps(body).encode()
        elif kind == 6:
            body["comment"] = "y" * rng.randint(70_000, 90_000)  # over 64 KiB
            payload = json.dumps(body).encode()
        elif kind == 7:
            body["who"] = "w" * rng.randint(200, 5000)  # within 64 KiB, over the field limit
            payload = json.dumps(body).encode()
        elif kind == 8:
            payload = b'{"alarm_id": "pg_high", "who": "a", "minutes": NaN}'
            topic = "R1/cmd/shelve"
        elif kind == 9:
            payload = b"[" * rng.randint(20_000, 60_000)  # deep nesting
        elif kind == 10:
            body[rng.choice(["bogus", "alarm", "minutes_", "id"])] = 1  # unknown field
            payload = json.dumps(body).encode()
        else:
            payload = json.dumps(body)[: rng.randint(1, 20)].encode()  # truncated JSON
        out.append((topic, payload))
    return out


def test_malformed_commands_are_all_refused_and_publishing_goes_on(tmp_path: Path) -> None:
    """1,000 random or malformed command payloads: 1,000 refusals, no handler call, the
    event stream keeps flowing; then valid commands reach the handler and are accepted."""
    with running_mosquitto(tmp_path / "broker") as broker:
        handler = FakeHandler()
        publisher = MqttPublisher(
            make_config(broker.port, commands=True), tmp_path / "state", version="t", probes=["R1"]
        )
        publisher.start(handler)
        reply_topic = f"{PREFIX}/+/cmd/reply"
        events_topic = f"{PREFIX}/R1/events"
        with (
            Subscriber(broker.port, [reply_topic, events_topic]) as sub,
            Subscriber(broker.port, ["unused/#"]) as sender,
        ):
            assert wait_until(lambda: publisher.health()[0], 5)
            time.sleep(0.3)  # the publisher's command subscription
            bad = _bad_commands(random.Random(20240501), 1000)
            for index, (suffix, payload) in enumerate(bad):
                sender.client.publish(f"{PREFIX}/{suffix}", payload, qos=1)
                if index % 10 == 0:
                    publisher.publish_event("R1", {"type": "test", "index": index})

            def replies(ms: list[Received]) -> list[Received]:
                return [m for m in ms if m.topic.endswith("/cmd/reply")]

            assert sub.wait_for(lambda ms: len(replies(ms)) >= 1000, timeout=60), len(
                replies(sub.received)
            )
            answers = [m.json() for m in replies(sub.received)]
            assert len(answers) == 1000
            assert all(a["accepted"] is False and a["reason"] for a in answers)
            assert handler.calls == []
            reasons = " ".join(a["reason"] for a in answers)
            for expected in (
                "not valid UTF-8 JSON",
                "must be a JSON object",
                "unknown probe",
                "unknown command",
                "over the 65536-byte limit",
                "Field required",
                "Extra inputs are not permitted",
            ):
                assert expected in reasons, expected
            echoed = {a["request_id"] for a in answers if a["request_id"] is not None}
            assert len(echoed) > 300 and all(str(r).startswith("fuzz-") for r in echoed)
            assert sub.wait_for(lambda ms: len([m for m in ms if m.topic == events_topic]) >= 100)
            check_in_order_without_gap(seqs(sub.on(events_topic)), 100)

            sub.clear()
            valid = [
                (
                    "ack",
                    {"alarm_id": "pg_high", "who": "alice", "comment": "seen", "request_id": "r-1"},
                ),
                ("shelve", {"alarm_id": "pg_high", "minutes": 15, "who": "bob", "request_id": 2}),
                (
                    "batch",
                    {"action": "start", "batch_id": "B-7", "who": "carol", "request_id": "r-3"},
                ),
                ("batch", {"action": "stop", "who": "carol", "request_id": "r-4"}),
                ("ack", {"alarm_id": "unknown_alarm", "who": "alice", "request_id": "r-5"}),
                ("ack", {"alarm_id": "boom", "who": "alice", "request_id": "r-6"}),
            ]
            for command, body in valid:
                sender.client.publish(f"{PREFIX}/R1/cmd/{command}", json.dumps(body), qos=1)
            assert sub.wait_for(lambda ms: len(ms) >= len(valid), timeout=10)
            answers_by_id = {m.json()["request_id"]: m.json() for m in sub.received}
            assert answers_by_id["r-1"] == {
                "request_id": "r-1",
                "command": "ack",
                "accepted": True,
                "reason": None,
                "probe": "R1",
                "ts": answers_by_id["r-1"]["ts"],
            }
            assert answers_by_id[2]["accepted"] and answers_by_id[2]["command"] == "shelve"
            assert answers_by_id["r-3"]["accepted"] and answers_by_id["r-4"]["accepted"]
            assert answers_by_id["r-5"]["accepted"] is False
            assert answers_by_id["r-5"]["reason"] == "no such alarm"
            assert answers_by_id["r-6"]["accepted"] is False
            assert "internal error" in answers_by_id["r-6"]["reason"]
            assert handler.calls[:4] == [
                ("ack", "R1", "pg_high", "alice", "seen"),
                ("shelve", "R1", "pg_high", 15.0, "bob", ""),
                ("start_batch", "R1", "B-7", "carol"),
                ("stop_batch", "R1", "carol"),
            ]
            assert publisher.health()[0]
        publisher.stop()
