"""MQTT publisher: retained probe state, ordered events that survive outages, operator commands.

Topics (all under `{prefix}` = `mqtt.topic_prefix`):

- `{prefix}/status`: retained `{"state": "online"|"offline", "ts", "version", "run_id"}`.
  "offline" is the Last Will and is also published on a clean stop.
- `{prefix}/{probe}/fractions`: retained, the window statistics of every publish interval,
  each window with each class's size distribution (`sizes`: D10/D50/D90 number- and
  square-weighted, mean aspect ratio, a histogram on fixed log-spaced bins).
- `{prefix}/{probe}/alarms/{alarm_id}`: retained, the alarm's state, published when it
  changes and at every (re)connect, with `ts`, the daemon's `run_id` (its start time)
  and `current`. On a clean stop each is published once more with `current: false`; a
  consumer treats an alarm message as current only while `current` is true and the
  status topic says "online" with the same `run_id`.
- `{prefix}/{probe}/events`: alarm transitions and batch start/stop, each with a
  per-probe `seq` that increases by one and is never reused (persisted).
- `{prefix}/{probe}/results`: per-frame results (`mqtt.results`), with their own `seq`.
- `{prefix}/{probe}/cmd/{ack|shelve|batch}` in, `{prefix}/{probe}/cmd/reply` out
  (`mqtt.commands`).

Every payload follows `monitor/schemas/` (times ISO 8601 UTC, numbers as `monitor.wire`
rounds them).

Delivery. Every event and result goes into the SQLite outbox first (`outbox.py`) and
leaves it only when the broker acknowledges it (QoS 1 PUBACK, paho's `on_publish`). One
feeder thread hands at most `max_inflight` outbox messages at a time to paho, in outbox
order, and only while connected. On every (re)connect, `on_connect` drops whatever paho
still holds from the previous connection (`drop_out_messages`), publishes the birth
("online") and every retained value, and only then lets the feeder replay the outbox
from its oldest row. Hence, per topic: in order, at least once, across broker outages
and daemon restarts; after a reconnect a consumer may see a run of messages again and
drops every `seq` not greater than the last it kept.

Threads: paho's network loop runs the callbacks; they never block on our SQLite work
(acks go through a queue to the feeder) and never raise. Every publish of ours holds
`_feed_lock`, which `on_connect` takes too, so nothing from an old connection slips in
before the birth message.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from monitor.config.mqtt import MqttConfig
from monitor.config.secrets import resolve_password
from monitor.config.startup_error import StartupError
from monitor.log_limit import RepeatLimiter
from monitor.publishers.base import CommandHandler, CommandResult, ProbeUpdate
from monitor.publishers.outbox import Outbox, OutboxStats, Stream, encode_json
from monitor.store import StoreTransaction
from monitor.timestamps import iso_utc
from monitor.wire import snapshot_on_wire, to_wire

log = structlog.get_logger(__name__)

MAX_COMMAND_BYTES = 64 * 1024
COMMAND_QUEUE_SIZE = 256
_REASON_MAX = 400
_FORBIDDEN_IN_LEVEL = ("/", "+", "#", "\x00")


class MqttSetupError(Exception):
    """The publisher cannot be built from its configuration; the message names the fix."""


def _valid_level(value: str) -> bool:
    return bool(value) and not any(char in value for char in _FORBIDDEN_IN_LEVEL)


class MqttTopics:
    """Every topic name the publisher uses, built from the prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.status = f"{prefix}/status"
        self.command_filter = f"{prefix}/+/cmd/+"

    def fractions(self, probe: str) -> str:
        return f"{self.prefix}/{probe}/fractions"

    def alarm(self, probe: str, alarm_id: str) -> str:
        return f"{self.prefix}/{probe}/alarms/{alarm_id}"

    def stream(self, probe: str, stream: Stream) -> str:
        return f"{self.prefix}/{probe}/{stream}"

    def reply(self, probe: str) -> str:
        return f"{self.prefix}/{probe}/cmd/reply"

    def parse_command(self, topic: str) -> tuple[str, str] | None:
        """'{prefix}/{probe}/cmd/{command}' -> (probe, command); None for any other topic."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 3 or parts[1] != "cmd":
            return None
        return parts[0], parts[2]


# -- payloads ----------------------------------------------------------------------------


def status_payload(state: Literal["online", "offline"], version: str, **extra: Any) -> bytes:
    return encode_json({"state": state, "ts": iso_utc(time.time()), "version": version, **extra})


def fractions_payload(update: ProbeUpdate) -> dict[str, Any]:
    """The retained `fractions` document: the snapshot's windows and trend plus context
    (schemas/fractions.json)."""
    snapshot = snapshot_on_wire(update.snapshot)
    return {
        "ts": iso_utc(update.ts),
        "probe": update.probe,
        "batch": update.batch,
        "model": update.model.to_json(),
        "quality": update.quality,
        "classes": list(update.classes),
        "last_frame_ts": None if update.last_frame_ts is None else iso_utc(update.last_frame_ts),
        "windows": snapshot["windows"],
        "trend": snapshot["trend"],
        "units": snapshot["units"],
    }


RETAINED_ALARM_FIELDS = (
    "probe",
    "alarm_id",
    "kind",
    "category",
    "priority",
    "severity",
    "state",
    "active",
    "acknowledged",
    "latched",
    "shelved",
    "shelved_until",
    "shelved_by",
    "suppressed",
    "message",
    "trip_message",
    "trip_value",
    "limit",
    "unit",
    "active_since",
    "state_since",
    "acknowledged_at",
    "acknowledged_by",
)
"""What a retained `alarms/{id}` message says: the alarm's state, not its live value
(which moves every interval and is in `fractions`), so the topic changes only when the
alarm does."""


def alarm_payload(status: Mapping[str, Any], *, run_id: float, current: bool) -> dict[str, Any]:
    """The retained `alarms/{id}` document without its `ts` (schemas/alarm.json).

    `run_id` is the publishing daemon's start time; `current` is False once that daemon
    stopped cleanly (the status topic's Last Will says so after a crash)."""
    body = {key: status.get(key) for key in RETAINED_ALARM_FIELDS}
    return dict(to_wire({**body, "run_id": run_id, "current": current}))


# -- commands ----------------------------------------------------------------------------


class _Command(BaseModel):
    # strict: "5" is not a number of minutes, 1 is not a string; forbid: typos are refused.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    request_id: str | int | None = Field(
        default=None, description="Echoed in the reply so a client can match it."
    )
    who: str = Field(min_length=1, max_length=128, description="Operator name, for the journal.")


class AckCommand(_Command):
    """`cmd/ack`: acknowledge an alarm."""

    alarm_id: str = Field(min_length=1, max_length=128, description="Alarm to acknowledge.")
    comment: str = Field(default="", max_length=2000, description="Operator's comment.")


class ShelveCommand(_Command):
    """`cmd/shelve`: shelve an alarm for some minutes."""

    alarm_id: str = Field(min_length=1, max_length=128, description="Alarm to shelve.")
    minutes: float = Field(
        gt=0, le=7 * 24 * 60, allow_inf_nan=False, description="How long, at most 7 days."
    )
    comment: str = Field(default="", max_length=2000, description="Operator's comment.")


class BatchCommand(_Command):
    """`cmd/batch`: start or stop a batch on the probe."""

    action: Literal["start", "stop"] = Field(description="start or stop.")
    batch_id: str | None = Field(
        default=None, min_length=1, max_length=128, description="Batch id; needed to start."
    )
    end_running: bool = Field(
        default=False,
        description="start only: end a running batch first (refused otherwise).",
    )

    @model_validator(mode="after")
    def _start_needs_id(self) -> BatchCommand:
        if self.action == "start" and self.batch_id is None:
            raise ValueError("action 'start' needs batch_id")
        return self


COMMAND_MODELS: dict[str, type[_Command]] = {
    "ack": AckCommand,
    "shelve": ShelveCommand,
    "batch": BatchCommand,
}


def _request_id(document: object) -> str | int | None:
    """The request_id to echo, if the body has a usable one (never fails)."""
    if not isinstance(document, dict):
        return None
    value = document.get("request_id")
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and len(value) <= 256:
        return value
    if isinstance(value, int) and abs(value) < 2**63:
        return value
    return None


def _describe_validation(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        location = ".".join(str(item) for item in error["loc"]) or "body"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


def _loads_or_none(payload: bytes) -> object:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return None


def _clip(text: str, limit: int = _REASON_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the publisher -----------------------------------------------------------------------


class MqttPublisher:
    """The `Publisher` for MQTT; see the module docstring for topics and delivery."""

    name = "mqtt"
    # The daemon sets this: its start fails when the broker refuses our login (a person
    # must fix the user or password); a publisher used alone reports it in health().
    refused_login_fails_start = False
    # How long start() then waits for the broker's first answer: long enough for a broker
    # that is up to refuse our login, short enough not to hold up start-up on one that is
    # down.
    first_answer_wait_s = 3.0

    def __init__(
        self,
        config: MqttConfig,
        state_dir: Path,
        *,
        version: str,
        probes: Iterable[str] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Read the password (SecretError names the fix) and open the outbox; no network yet.

        `probes` are the configured probe ids; commands for any other probe are refused
        (probes seen in `publish_update` are accepted too).
        """
        self.config = config
        self.version = version
        self.topics = MqttTopics(config.topic_prefix)
        self._password = resolve_password(
            env_var=config.password_env,
            credential=config.password_credential,
            section="mqtt",
            environ=environ,
        )
        self._client = self._create_client()  # before the outbox: a TLS error leaks nothing
        self._outbox = Outbox(state_dir, max_events=config.outbox_max_events)

        self._lock = threading.Lock()  # the small shared fields below
        self._feed_lock = threading.Lock()  # every publish of ours; see module docstring
        self._connected = False
        self._generation = 0
        self._reason = "not started"
        self._connects = 0
        self._dirty: set[str] = set()  # retained topics changed since last published
        self._alarm_bodies: dict[str, dict[str, Any]] = {}  # alarm topic -> body without ts
        self._run_id = time.time()  # this run's start: retained alarms say which run set them
        self._known_probes = set(probes)
        self._bad_ids_logged: set[str] = set()
        self._stop_feeding = False
        self._last_drop_log = 0.0
        self._dropped_logged = sum(self._outbox.stats().dropped.values())
        self._delivered = 0
        self._inflight_count = 0

        self._acks: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._worker_stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._commands: CommandHandler | None = None
        self._command_queue: queue.Queue[tuple[str, str, _Command, str | int | None] | None] = (
            queue.Queue(maxsize=COMMAND_QUEUE_SIZE)
        )
        self._command_thread: threading.Thread | None = None
        self._started = False
        self._stopped = False
        self._final_stats: OutboxStats | None = None
        self._first_answer = threading.Event()  # a CONNACK or a failed connect
        self._login_refused: str | None = None  # the problem, when the broker refused us

    # -- set-up ------------------------------------------------------------------------

    def _create_client(self) -> mqtt.Client:
        config = self.config
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            clean_session=True,  # the outbox, not the broker session, holds what is unsent
            protocol=mqtt.MQTTv311,
        )
        # Our feeder bounds what paho holds; paho's own window matches it.
        client.max_inflight_messages_set(config.max_inflight)
        # paho sleeps whole seconds here; round up so a '500ms' minimum is not 0.
        client.reconnect_delay_set(
            max(1, math.ceil(config.reconnect_min)), max(1, math.ceil(config.reconnect_max))
        )
        if config.username is not None:
            client.username_pw_set(config.username, self._password)
        tls = config.tls
        if tls.enabled:
            for key, path in (
                ("ca_file", tls.ca_file),
                ("cert_file", tls.cert_file),
                ("key_file", tls.key_file),
            ):
                if path is not None and not path.is_file():
                    raise MqttSetupError(f"mqtt.tls.{key}: file not found: {path}")
            try:
                client.tls_set(
                    ca_certs=None if tls.ca_file is None else str(tls.ca_file),
                    certfile=None if tls.cert_file is None else str(tls.cert_file),
                    keyfile=None if tls.key_file is None else str(tls.key_file),
                )
            except (OSError, ValueError) as exc:
                raise MqttSetupError(f"mqtt.tls: cannot load certificates or key: {exc}") from exc
            if tls.insecure:
                client.tls_insecure_set(True)
        self._set_will(client)
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _set_will(self, client: mqtt.Client) -> None:
        client.will_set(
            self.topics.status,
            status_payload("offline", self.version, reason="connection lost"),
            qos=1,
            retain=True,
        )

    # -- Publisher ---------------------------------------------------------------------

    def start(self, commands: CommandHandler) -> None:
        """Connect in the background; returns at once even if the broker is down.

        With `refused_login_fails_start`, returns once the broker answered (or after
        `first_answer_wait_s` if it is down: the outbox keeps everything meanwhile), and
        a broker refusing our user name or password stops the publisher and raises
        StartupError naming mqtt.username and where the password comes from.
        """
        if self._started:
            raise RuntimeError("MqttPublisher.start() called twice")
        self._started = True
        self._commands = commands
        self._set_reason(f"connecting to {self._address}")
        self._worker = threading.Thread(target=self._run_feeder, name="mqtt-outbox", daemon=True)
        self._worker.start()
        if self.config.commands:
            self._command_thread = threading.Thread(
                target=self._run_commands, name="mqtt-commands", daemon=True
            )
            self._command_thread.start()
        self._client.connect_async(
            self.config.host, self.config.port, keepalive=round(self.config.keepalive)
        )
        self._client.loop_start()
        if self.refused_login_fails_start:
            self._first_answer.wait(self.first_answer_wait_s)
            if self._login_refused is not None:
                self.stop()
                raise StartupError("mqtt.username", self._login_refused)
        log.info(
            "mqtt_starting",
            broker=self._address,
            client_id=self.config.client_id,
            tls=self.config.tls.enabled,
            backlog=self._outbox.stats().backlog,
        )

    def publish_update(self, update: ProbeUpdate) -> None:
        """Store the probe's fractions and changed alarm states as retained values."""
        probe = update.probe
        if self._stopped or not self._check_level("probe", probe):
            return
        with self._lock:
            self._known_probes.add(probe)
        topic = self.topics.fractions(probe)
        if self._outbox.put_retained(topic, encode_json(fractions_payload(update))):
            self._mark_dirty([topic])
        self.publish_alarms(probe, update.alarms)

    def publish_alarms(self, probe: str, alarms: Sequence[Mapping[str, Any]]) -> None:
        """Retain the alarms whose state changed (not those whose value only moved)."""
        if self._stopped or not self._check_level("probe", probe):
            return
        changed = []
        for alarm in alarms:
            alarm_id = str(alarm.get("alarm_id", ""))
            if not self._check_level("alarm id", alarm_id):
                continue
            topic = self.topics.alarm(probe, alarm_id)
            body = alarm_payload(
                {**alarm, "probe": probe, "alarm_id": alarm_id}, run_id=self._run_id, current=True
            )
            with self._lock:
                if self._alarm_bodies.get(topic) == body:
                    continue
                self._alarm_bodies[topic] = body
            if self._outbox.put_retained(topic, encode_json({**body, "ts": iso_utc(time.time())})):
                changed.append(topic)
        self._mark_dirty(changed)

    def _mark_dirty(self, topics: Sequence[str]) -> None:
        if topics:
            with self._lock:
                self._dirty.update(topics)
            self._wake.set()

    def publish_event(self, probe: str, event: dict[str, Any]) -> None:
        """Queue an alarm transition or batch event; it is delivered even across outages."""
        self._append(probe, "events", event)

    def publish_result(self, probe: str, result: dict[str, Any]) -> None:
        """Queue one frame's result when `mqtt.results` is on; otherwise do nothing."""
        if self.config.results:
            self._append(probe, "results", result)

    def stage_result(self, tx: StoreTransaction, probe: str, result: dict[str, Any]) -> None:
        """`publish_result` inside the store transaction that records the frame
        (DurableResults): the message and its seq exist only if the frame row does."""
        if self.config.results:
            self._append(probe, "results", result, tx=tx)

    def health(self) -> tuple[bool, str]:
        with self._lock:
            return self._connected, self._reason

    def diagnostics(self) -> dict[str, Any]:
        """Numbers for a diagnostic alarm and `doctor`: connection, backlog, drops."""
        stats = self._stats()
        with self._lock:
            return {
                "connected": self._connected,
                "reason": self._reason,
                "connects": self._connects,
                "backlog": stats.backlog,
                "inflight": self._inflight_count,
                "delivered": self._delivered,
                "dropped": stats.dropped,
                "dropped_total": sum(stats.dropped.values()),
                "retained_topics": stats.retained_topics,
                "outbox_max_events": self._outbox.max_events,
            }

    def last_seq(self, probe: str, stream: Stream) -> int:
        """The last seq given to a message of (probe, stream), persisted across restarts."""
        return self._outbox.last_seq(probe, stream)

    def stop(self) -> None:
        """Deliver what can be delivered in `stop_timeout`, publish 'offline', disconnect."""
        if self._stopped:
            return
        self._stopped = True
        if self._started:
            self._stop_network()
        self._final_stats = self._outbox.stats()
        self._outbox.close()

    def _not_current_alarms(self) -> dict[str, bytes]:
        """This run's retained alarm states, marked not current: a consumer reading them
        after a clean stop can tell the values are no longer maintained. Kept in the
        outbox so the next run's first connect repeats them until it publishes its own."""
        with self._lock:
            bodies = dict(self._alarm_bodies)
        stamp = iso_utc(time.time())
        marked = {}
        for topic, body in bodies.items():
            payload = encode_json({**body, "current": False, "ts": stamp})
            self._outbox.put_retained(topic, payload)
            marked[topic] = payload
        return marked

    def _stats(self) -> OutboxStats:
        return self._final_stats if self._final_stats is not None else self._outbox.stats()

    # -- internals: publishing ---------------------------------------------------------

    @property
    def _address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def _set_reason(self, reason: str) -> None:
        with self._lock:
            self._reason = reason

    def _check_level(self, what: str, value: str) -> bool:
        if _valid_level(value):
            return True
        if value not in self._bad_ids_logged:
            self._bad_ids_logged.add(value)
            log.error("mqtt_bad_topic_level", what=what, value=value[:80])
        return False

    def _append(
        self,
        probe: str,
        stream: Stream,
        body: dict[str, Any],
        *,
        tx: StoreTransaction | None = None,
    ) -> None:
        if self._stopped:
            log.warning("mqtt_publish_after_stop", probe=probe, stream=stream)
            return
        if not self._check_level("probe", probe):
            return
        document = to_wire(body)
        document.setdefault("ts", iso_utc(time.time()))
        self._outbox.append(probe, stream, self.topics.stream(probe, stream), document, tx=tx)
        if tx is None:
            self._after_append()
        else:
            tx.after_commit(self._after_append)

    def _after_append(self) -> None:
        self._log_drops()
        self._wake.set()

    def _log_drops(self) -> None:
        dropped = self._outbox.stats().dropped
        total = sum(dropped.values())
        now = time.monotonic()
        if total > self._dropped_logged and now - self._last_drop_log > 60:
            log.warning(
                "mqtt_outbox_full",
                dropped=dropped,
                max_events=self._outbox.max_events,
                broker=self._address,
            )
            self._dropped_logged = total
            self._last_drop_log = now

    def _run_feeder(self) -> None:
        """Hand outbox messages to paho in order, a bounded window at a time; apply acks."""
        inflight: dict[int, int] = {}  # paho mid -> outbox row id, this connection only
        generation = -1
        last_fed = 0
        feeder_failures = RepeatLimiter(60.0)
        while not self._worker_stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                acked: list[int] = []
                while True:
                    try:
                        ack_generation, mid = self._acks.get_nowait()
                    except queue.Empty:
                        break
                    if ack_generation == generation and mid in inflight:
                        acked.append(inflight.pop(mid))
                if acked:
                    self._outbox.acknowledge(acked)
                with self._feed_lock:
                    with self._lock:
                        current, connected = self._generation, self._connected
                        dirty: set[str] = set()
                        if connected:
                            dirty, self._dirty = self._dirty, set()
                    if current != generation:
                        # A new connection: paho holds nothing of ours; replay from the oldest.
                        inflight.clear()
                        generation, last_fed = current, 0
                    if connected and not self._stop_feeding:
                        self._publish_retained(dirty)
                        last_fed = self._feed(inflight, last_fed)
                with self._lock:
                    self._delivered += len(acked)
                    self._inflight_count = len(inflight)
            except Exception as exc:
                # A locked or full store repeats this every turn: rate-limit the line.
                count = feeder_failures.due(str(exc)[:80] or type(exc).__name__)
                if count:
                    log.error("mqtt_feeder_failed", error=str(exc)[:200], failures=count)
                time.sleep(0.5)

    def _publish_retained(self, topics: Iterable[str]) -> None:
        for topic in sorted(topics):
            payload = self._outbox.retained_value(topic)
            if payload is not None:
                self._client.publish(topic, payload, qos=1, retain=True)

    def _feed(self, inflight: dict[int, int], last_fed: int) -> int:
        for message in self._outbox.pending(last_fed, self.config.max_inflight - len(inflight)):
            with self._lock:
                if not self._connected:
                    break
            info = self._client.publish(message.topic, message.payload, qos=1, retain=False)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning("mqtt_publish_failed", topic=message.topic, rc=str(info.rc))
                break
            inflight[info.mid] = message.id
            last_fed = message.id
        return last_fed

    def _stop_network(self) -> None:
        deadline = time.monotonic() + self.config.stop_timeout
        while time.monotonic() < deadline:
            connected, _ = self.health()
            if not connected or self._outbox.stats().backlog == 0:
                break
            self._wake.set()
            time.sleep(0.05)
        info = None
        with self._feed_lock:
            self._stop_feeding = True
            connected, _ = self.health()
            for topic, payload in self._not_current_alarms().items():
                if connected:
                    self._client.publish(topic, payload, qos=1, retain=True)
            if connected:
                info = self._client.publish(
                    self.topics.status,
                    status_payload("offline", self.version, reason="stopped"),
                    qos=1,
                    retain=True,
                )
        if info is not None:
            try:
                info.wait_for_publish(timeout=max(1.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                log.warning("mqtt_offline_not_confirmed", error=str(exc))
        stats = self._outbox.stats()
        # DISCONNECT follows the 'offline' PUBLISH on the same stream: the broker sees it first.
        self._client.disconnect()
        self._client.loop_stop()
        self._worker_stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=5)
        if self._command_thread is not None:
            with contextlib.suppress(queue.Full):
                self._command_queue.put(None, timeout=1)
            self._command_thread.join(timeout=5)
        with self._lock:
            self._connected = False
            self._reason = "stopped"
        log.info("mqtt_stopped", backlog=stats.backlog, dropped=stats.dropped)

    # -- paho callbacks (network thread; must not raise) --------------------------------

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            self._set_will(client)  # a fresh timestamp for each connection's will
        except Exception:
            log.exception("mqtt_will_failed")

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        try:
            if reason_code.is_failure:
                hint = ""
                if reason_code.value in (0x86, 0x87, 4, 5):  # bad login, not authorized
                    hint = f" ({self._login_fix()})"
                    if not self._first_answer.is_set():
                        self._login_refused = (
                            f"broker {self._address} refused the login ({reason_code}): "
                            f"{self._login_fix()}"
                        )
                reason = f"broker {self._address} refused the connection: {reason_code}{hint}"
                with self._lock:
                    repeated, self._reason = self._reason == reason, reason
                if not repeated:  # once per cause, not at every retry
                    log.warning(
                        "mqtt_connect_refused", broker=self._address, reason=str(reason_code)
                    )
                return
            with self._feed_lock:
                # What paho still holds is from the old connection; the outbox replays it
                # after the birth, in order.
                client.drop_out_messages()
                with self._lock:
                    self._generation += 1
                    self._dirty.clear()
                client.publish(
                    self.topics.status,
                    status_payload("online", self.version, run_id=iso_utc(self._run_id)),
                    qos=1,
                    retain=True,
                )
                for topic, payload in sorted(self._outbox.retained().items()):
                    client.publish(topic, payload, qos=1, retain=True)
                with self._lock:
                    self._connected = True
                    self._connects += 1
                    self._reason = f"connected to {self._address}"
                    connects = self._connects
            if self.config.commands:
                client.subscribe(self.topics.command_filter, qos=1)
            log.info(
                "mqtt_connected" if connects == 1 else "mqtt_reconnected",
                broker=self._address,
                backlog=self._outbox.stats().backlog,
            )
        except Exception:
            log.exception("mqtt_on_connect_failed")
        finally:
            self._first_answer.set()
            self._wake.set()

    def _login_fix(self) -> str:
        """What to check when the broker refuses our login: the user and where the
        password comes from, each by its key."""
        config = self.config
        if config.username is None:
            return (
                "it wants a login: set mqtt.username and mqtt.password_env or "
                "mqtt.password_credential"
            )
        if config.password_env is not None:
            source = f"environment variable {config.password_env} (mqtt.password_env)"
        elif config.password_credential is not None:
            source = f"credential {config.password_credential} (mqtt.password_credential)"
        else:
            source = "mqtt.password_env or mqtt.password_credential (none is set)"
        return (
            f"check mqtt.username {config.username!r} and the password in {source} "
            "against the broker's users"
        )

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        tls = ", or the TLS handshake failed" if self.config.tls.enabled else ""
        reason = f"cannot reach broker {self._address}{tls} (retrying)"
        with self._lock:
            repeated, self._reason = self._reason == reason, reason
        self._first_answer.set()  # down is not a start-up failure: the outbox keeps it all
        if not repeated:
            log.warning("mqtt_unreachable", broker=self._address)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        with self._lock:
            was_connected = self._connected
            self._connected = False
            # After a refused CONNACK, keep the refusal as the reason: it names the fix.
            if was_connected and not self._stop_feeding:
                self._reason = f"connection to {self._address} lost: {reason_code} (reconnecting)"
        if was_connected and not self._stop_feeding:
            log.warning("mqtt_disconnected", broker=self._address, reason=str(reason_code))

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        # Runs under paho's message lock: only hand the ack over, never touch SQLite here.
        with self._lock:
            generation = self._generation
        self._acks.put((generation, mid))
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._receive_command(message.topic, bytes(message.payload), retained=message.retain)
        except Exception:
            log.exception("mqtt_command_failed")

    # -- commands ----------------------------------------------------------------------

    def _receive_command(self, topic: str, payload: bytes, *, retained: bool = False) -> None:
        """Validate a command message; refuse it with a reply or queue it for the handler."""
        parsed = self.topics.parse_command(topic)
        if parsed is None:
            return
        probe, command = parsed
        if command == "reply":
            return  # our own replies match the command filter too
        if retained:
            # The broker replays a retained message at every subscribe: executing it would
            # repeat the action (restart a batch) at each reconnect and daemon restart.
            if not payload:
                return  # an empty retained message is how that retained value is cleared
            self._refuse(
                probe,
                command,
                _request_id(_loads_or_none(payload)),
                "retained command ignored: commands must be published without the retain"
                f" flag; clear this one with: mosquitto_pub -r -n -t '{_clip(topic, 200)}'",
            )
            return
        if len(payload) > MAX_COMMAND_BYTES:
            self._refuse(
                probe,
                command,
                None,
                f"payload of {len(payload)} bytes is over the {MAX_COMMAND_BYTES}-byte limit",
            )
            return
        try:
            document = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            self._refuse(probe, command, None, f"body is not valid UTF-8 JSON: {exc}")
            return
        request_id = _request_id(document)
        if not isinstance(document, dict):
            self._refuse(probe, command, None, "body must be a JSON object")
            return
        model = COMMAND_MODELS.get(command)
        if model is None:
            known = ", ".join(sorted(COMMAND_MODELS))
            self._refuse(probe, command, request_id, f"unknown command (expected one of {known})")
            return
        with self._lock:
            known_probe = probe in self._known_probes
        if not known_probe:
            self._refuse(probe, command, request_id, f"unknown probe {probe!r}")
            return
        try:
            body = model.model_validate(document)
        except ValidationError as exc:
            self._refuse(probe, command, request_id, f"invalid body: {_describe_validation(exc)}")
            return
        try:
            self._command_queue.put_nowait((probe, command, body, request_id))
        except queue.Full:
            self._refuse(probe, command, request_id, "busy: too many commands waiting, retry")

    def _run_commands(self) -> None:
        while True:
            item = self._command_queue.get()
            if item is None:
                return
            probe, command, body, request_id = item
            try:
                result = self._dispatch(probe, body)
            except Exception as exc:
                log.exception("mqtt_command_handler_failed", probe=probe, command=command)
                result = CommandResult(False, f"internal error: {exc}")
            if result.accepted:
                log.info(
                    "mqtt_command_accepted",
                    probe=probe,
                    command=command,
                    who=body.who,
                    request_id=request_id,
                )
                self._reply(probe, command, request_id, True, result.reason)
            else:
                self._refuse(probe, command, request_id, result.reason or "refused")

    def _dispatch(self, probe: str, body: _Command) -> CommandResult:
        handler = self._commands
        if handler is None:
            return CommandResult(False, "commands are not being handled yet")
        if isinstance(body, AckCommand):
            return handler.acknowledge(probe, body.alarm_id, body.who, body.comment)
        if isinstance(body, ShelveCommand):
            return handler.shelve(probe, body.alarm_id, body.minutes, body.who, body.comment)
        if isinstance(body, BatchCommand):
            if body.action == "start":
                assert body.batch_id is not None  # the model's validator guarantees it
                return handler.start_batch(
                    probe, body.batch_id, body.who, end_running=body.end_running
                )
            return handler.stop_batch(probe, body.who)
        return CommandResult(False, f"unhandled command body {type(body).__name__}")

    def _refuse(self, probe: str, command: str, request_id: str | int | None, reason: str) -> None:
        reason = _clip(reason)
        log.warning(
            "mqtt_command_refused",
            probe=probe[:80],
            command=command[:80],
            request_id=request_id,
            reason=reason,
        )
        self._reply(probe, command, request_id, False, reason)

    def _reply(
        self,
        probe: str,
        command: str,
        request_id: str | int | None,
        accepted: bool,
        reason: str | None,
    ) -> None:
        document = {
            "request_id": request_id,
            "command": _clip(command, 80),
            "accepted": accepted,
            "reason": reason,
            "probe": probe,
            "ts": iso_utc(time.time()),
        }
        try:
            self._client.publish(self.topics.reply(probe), encode_json(document), qos=1)
        except ValueError as exc:  # a topic paho will not publish to
            log.warning("mqtt_reply_failed", probe=probe[:80], error=str(exc))
