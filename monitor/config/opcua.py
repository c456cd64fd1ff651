"""Configuration of the OPC UA server (the `[opcua]` section).

Validation is pure: the endpoint's form, the demo profile's loopback rule, paths that
must come in pairs. Whether the files exist is checked when the server starts
(`check_opcua_environment`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from monitor.config.durations import Duration
from monitor.config.network import is_loopback_host
from monitor.config.secrets import CREDENTIALS_DIRECTORY, SecretError, credential_path

DEFAULT_ENDPOINT = "opc.tcp://0.0.0.0:4840/crystal-monitor"


def endpoint_host(endpoint: str) -> str:
    """The host part of an `opc.tcp://host:port/path` URL ('' when there is none)."""
    return urlparse(endpoint).hostname or ""


class OpcUaConfig(BaseModel):
    """The OPC UA server: address space of probe values, alarms as events, operator methods."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=False, description="Run the OPC UA server.")
    endpoint: str = Field(
        default=DEFAULT_ENDPOINT,
        description="opc.tcp://HOST:PORT/PATH the server listens on; host 0.0.0.0 = all "
        "interfaces (production profile only).",
    )
    namespace_uri: str = Field(
        default="urn:crystal-monitor",
        min_length=1,
        description="Namespace URI of the CrystalMonitor nodes.",
    )
    security_profile: Literal["production", "demo"] = Field(
        default="production",
        description="production: Basic256Sha256 SignAndEncrypt only, user names and "
        "passwords from users_file, client certificates from trust_dir. demo: no "
        "security and anonymous login, allowed on a loopback endpoint only.",
    )
    users_file: Path | None = Field(
        default=None,
        description="User file, one `name:role:scrypt$...` line per user, written by "
        "`crystal-monitor opcua-user add|remove`; required by the production profile "
        "(or users_credential), optional in demo.",
    )
    users_credential: str | None = Field(
        default=None,
        description="Read the users file as this systemd credential instead "
        "($CREDENTIALS_DIRECTORY/NAME, from LoadCredential=NAME:<users_file> in the unit): "
        "the units' DynamicUser cannot read a root-only file. opcua-user still writes "
        "users_file; restart the service after a change.",
    )
    certificate: Path | None = Field(
        default=None,
        description="Server certificate (DER or PEM). Empty: a self-signed one is "
        "generated into <state_dir>/opcua/ on first start.",
    )
    private_key: Path | None = Field(
        default=None,
        description="Private key of the server certificate (PEM or DER, unencrypted).",
    )
    trust_dir: Path | None = Field(
        default=None,
        description="Folder of trusted client certificates or their CA certificates "
        "(.der/.pem), re-read at every connection. Empty: <state_dir>/opcua/trusted. "
        "Refused certificates are saved to <state_dir>/opcua/rejected.",
    )
    rejected_max_files: int = Field(
        default=100,
        ge=0,
        description="How many refused client certificates <state_dir>/opcua/rejected "
        "keeps for the admin (the newest; older ones are deleted). 0 keeps none.",
    )
    login_max_failures: int = Field(
        default=5,
        ge=1,
        description="Failed user name/password logins in a row from one address before "
        "that address is locked out (even the right password is refused then).",
    )
    login_lockout: Duration = Field(
        default=2.0,
        gt=0,
        description="The first lockout (e.g. '2s'); each further failure after a lockout "
        "doubles it, up to login_lockout_max. A successful login resets it.",
    )
    login_lockout_max: Duration = Field(
        default=300.0,
        gt=0,
        description="The longest lockout (e.g. '5m'); an address quiet for this long "
        "after its last failure or lockout starts from zero failures again.",
    )
    history_retention: Duration = Field(
        default=30 * 86400.0,
        gt=0,
        description="How long the historized 5-minute fractions stay readable by "
        "HistoryRead (e.g. '30d').",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_form(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme != "opc.tcp":
            raise ValueError(
                f"must start with opc.tcp://, got {value!r} (e.g. {DEFAULT_ENDPOINT!r})"
            )
        if not parsed.hostname:
            raise ValueError(f"has no host: {value!r} (e.g. {DEFAULT_ENDPOINT!r})")
        try:
            port = parsed.port
        except ValueError as exc:
            raise ValueError(f"has an invalid port: {value!r}") from exc
        if port is None:
            raise ValueError(f"needs a port, e.g. opc.tcp://{parsed.hostname}:4840{parsed.path}")
        return value

    @model_validator(mode="after")
    def _profile_rules(self) -> OpcUaConfig:
        host = endpoint_host(self.endpoint)
        if self.security_profile == "demo" and not is_loopback_host(host):
            raise ValueError(
                f"security_profile 'demo' (no encryption, anonymous login) only listens on "
                f"loopback, but endpoint host is {host!r}: use opc.tcp://127.0.0.1:PORT/... "
                "or set security_profile = 'production'"
            )
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError(
                "certificate and private_key go together: set both, or neither to have a "
                "self-signed certificate generated"
            )
        if self.login_lockout_max < self.login_lockout:
            raise ValueError(
                f"login_lockout_max ({self.login_lockout_max:g} s) must not be shorter than "
                f"login_lockout ({self.login_lockout:g} s)"
            )
        if (
            self.enabled
            and self.security_profile == "production"
            and self.users_file is None
            and self.users_credential is None
        ):
            raise ValueError(
                "the production profile needs users_file: set it, e.g. users_file = "
                "'/etc/crystal-monitor/credentials/opcua-users' (with users_credential under "
                "the systemd units), and add its users with `crystal-monitor "
                "opcua-user add NAME --config FILE`; or use security_profile = 'demo' on a "
                "loopback endpoint"
            )
        return self


def users_path(config: OpcUaConfig, environ: Mapping[str, str] | None = None) -> Path | None:
    """The users file the server reads: the credential's copy when users_credential is
    set (SecretError when systemd gave none), else users_file."""
    if config.users_credential is not None:
        return credential_path(
            config.users_credential, key="opcua.users_credential", environ=environ
        )
    return config.users_file


def check_opcua_environment(
    config: OpcUaConfig, environ: Mapping[str, str] | None = None, *, starting: bool = False
) -> list[str]:
    """Start-up checks that touch the file system; each problem names its key.

    `starting`: the server is about to start, so a users_credential must be there.
    Otherwise (validate-config, doctor from a shell, outside the service) its source,
    users_file, is checked instead when systemd has given no credentials."""
    problems: list[str] = []
    env = os.environ if environ is None else environ
    from_systemd = starting or bool(env.get(CREDENTIALS_DIRECTORY))
    if config.users_credential is not None and from_systemd:
        try:
            path = users_path(config, environ)
        except SecretError as exc:
            problems.append(str(exc))
        else:
            if path is not None and not path.is_file():
                problems.append(
                    f"opcua.users_credential: credential file {path} not found (add "
                    f"LoadCredential={config.users_credential}:"
                    f"{config.users_file or '/path/to/opcua-users'} to the systemd unit)"
                )
    elif config.users_file is not None and not config.users_file.is_file():
        problems.append(f"opcua.users_file: not found: {config.users_file}")
    missing = False
    for key, path in (("certificate", config.certificate), ("private_key", config.private_key)):
        if path is not None and not path.is_file():
            problems.append(f"opcua.{key}: not found: {path}")
            missing = True
    if config.certificate is not None and config.private_key is not None and not missing:
        # Only when configured: cryptography is not needed by a config without one.
        from monitor.config.certificates import check_configured_pair  # noqa: PLC0415

        problems += check_configured_pair(config.certificate, config.private_key)
    if config.trust_dir is not None and not config.trust_dir.is_dir():
        problems.append(
            f"opcua.trust_dir: not a folder: {config.trust_dir} (create it and copy the "
            "trusted client certificates into it)"
        )
    return problems
