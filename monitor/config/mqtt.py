"""Configuration of the MQTT publisher (the `[mqtt]` section).

Validation is pure: ranges, topic syntax, keys that only make sense together. The
password is never a config value: `password_env` or `password_credential` names where
it lives, and `monitor.config.secrets` reads it when the publisher is built.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from monitor.config.durations import Duration

_TOPIC_FORBIDDEN = ("+", "#", "\x00")


def default_client_id() -> str:
    """`crystal-monitor-<hostname>`: stable across restarts, distinct per machine."""
    return f"crystal-monitor-{socket.gethostname()}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttTlsConfig(_Section):
    """TLS to the broker; off unless `enabled`."""

    enabled: bool = Field(default=False, description="Connect with TLS (usually port 8883).")
    ca_file: Path | None = Field(
        default=None,
        description="CA certificate(s) that signed the broker's certificate (PEM); "
        "empty = the system trust store.",
    )
    cert_file: Path | None = Field(
        default=None, description="Client certificate (PEM) for mutual TLS; needs key_file."
    )
    key_file: Path | None = Field(
        default=None, description="Private key of cert_file (PEM, unencrypted)."
    )
    insecure: bool = Field(
        default=False,
        description="Skip the broker host name check (testing only: it allows a "
        "man in the middle).",
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> MqttTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together (mutual TLS)")
        return self


class MqttConfig(_Section):
    """The MQTT publisher: retained state, events, optional per-frame results and commands."""

    enabled: bool = Field(default=False, description="Publish to an MQTT broker.")
    host: str = Field(default="127.0.0.1", min_length=1, description="Broker host name or IP.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port.")
    client_id: str = Field(
        default_factory=default_client_id,
        min_length=1,
        max_length=128,
        description="MQTT client id; default crystal-monitor-<hostname>. Two daemons "
        "must not share one: the broker disconnects the older.",
    )
    topic_prefix: str = Field(
        default="crystal-monitor",
        min_length=1,
        description="First topic level(s); every topic is {topic_prefix}/...",
    )
    keepalive: Duration = Field(
        default=30.0, ge=5, le=3600, description="MQTT keepalive (whole seconds)."
    )
    tls: MqttTlsConfig = Field(default_factory=MqttTlsConfig, description="TLS settings.")
    username: str | None = Field(default=None, min_length=1, description="Broker user name.")
    password_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable that holds the broker password.",
    )
    password_credential: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.@-]+$",
        description="Name of a systemd credential (a file in $CREDENTIALS_DIRECTORY, "
        "e.g. from LoadCredential=) that holds the broker password.",
    )
    results: bool = Field(
        default=False, description="Publish every frame's result on {prefix}/{probe}/results."
    )
    commands: bool = Field(
        default=False,
        description="Accept operator commands (ack, shelve, batch) on {prefix}/{probe}/cmd/+.",
    )
    outbox_max_events: int = Field(
        default=100_000,
        ge=1,
        description="Most events and results kept for delivery while the broker is "
        "unreachable; beyond it the oldest are dropped (results before events) and counted.",
    )
    max_inflight: int = Field(
        default=100,
        ge=1,
        le=65_000,
        description="Most outbox messages handed to the MQTT client and not yet "
        "acknowledged by the broker.",
    )
    reconnect_min: Duration = Field(
        default=1.0, gt=0, description="First reconnect delay (rounded up to whole seconds)."
    )
    reconnect_max: Duration = Field(
        default=60.0,
        gt=0,
        description="Longest reconnect delay; the delay doubles from reconnect_min up to it.",
    )
    stop_timeout: Duration = Field(
        default=2.0,
        ge=0,
        le=60,
        description="On a clean stop, how long to try delivering the backlog and the "
        "'offline' status before disconnecting.",
    )

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_a_topic(cls, value: str) -> str:
        if any(char in value for char in _TOPIC_FORBIDDEN):
            raise ValueError("must not contain the wildcards '+' or '#' (or NUL)")
        if value.startswith("/") or value.endswith("/") or "//" in value:
            raise ValueError("must not start or end with '/' nor contain an empty level")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if self.password_env is not None and self.password_credential is not None:
            raise ValueError("set password_env or password_credential, not both")
        if (
            self.password_env is not None or self.password_credential is not None
        ) and self.username is None:
            raise ValueError("a password (password_env / password_credential) needs username")
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        return self
