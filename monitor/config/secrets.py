"""Secrets that must not live in the config file: an environment variable or a systemd credential.

The config names where a secret is (`password_env = "MQTT_PASSWORD"` or
`password_credential = "mqtt-password"`); this module reads it once, when the publisher
is built, and fails with an error that says how to provide it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"


class SecretError(Exception):
    """A configured secret could not be read; the message names the fix."""


def read_env_secret(variable: str, *, key: str, environ: Mapping[str, str] | None = None) -> str:
    """The value of environment variable `variable`; `key` is the config key that named it."""
    env = os.environ if environ is None else environ
    value = env.get(variable)
    if value is None or value == "":
        raise SecretError(
            f"{key}: environment variable {variable} is not set or empty (export "
            f"{variable}=..., or in the systemd unit add Environment={variable}=... or an "
            f"EnvironmentFile=; or use a credential instead)"
        )
    return value


def credential_path(name: str, *, key: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where systemd put credential `name`: $CREDENTIALS_DIRECTORY/name (not checked)."""
    env = os.environ if environ is None else environ
    if "/" in name or name in {"", ".", ".."}:
        raise SecretError(f"{key}: credential name {name!r} must be a plain file name")
    directory = env.get(CREDENTIALS_DIRECTORY)
    if not directory:
        raise SecretError(
            f"{key}: credential {name!r} needs ${CREDENTIALS_DIRECTORY}, which is not set "
            f"(run under systemd with LoadCredential={name}:/path/to/file or "
            f"SetCredentialEncrypted={name}:..., or use an environment variable instead)"
        )
    return Path(directory) / name


def read_credential(name: str, *, key: str, environ: Mapping[str, str] | None = None) -> str:
    """The systemd credential `name` ($CREDENTIALS_DIRECTORY/name), one trailing newline removed."""
    path = credential_path(name, key=key, environ=environ)
    try:
        value = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SecretError(
            f"{key}: credential file {path} not found (add LoadCredential={name}:/path/to/file "
            "to the systemd unit)"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(f"{key}: cannot read credential file {path}: {exc}") from exc
    value = value.removesuffix("\n")
    if value == "":
        raise SecretError(f"{key}: credential file {path} is empty")
    return value


def resolve_password(
    *,
    env_var: str | None,
    credential: str | None,
    section: str,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The password named by `{section}.password_env` or `{section}.password_credential`.

    None when neither is set (no password); raises SecretError when the named one is missing.
    """
    if env_var is not None:
        return read_env_secret(env_var, key=f"{section}.password_env", environ=environ)
    if credential is not None:
        return read_credential(credential, key=f"{section}.password_credential", environ=environ)
    return None
