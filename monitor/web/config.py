"""Configuration of the HTTP server (the `[http]` section): health, metrics, API, dashboard.

Validation is pure: ports, the token's source, and the loopback rule (a server reachable
beyond this host must ask for a token). The token itself is never a config value:
`token_env` or `token_credential` names where it lives, and `resolve_token` reads it
with the same helpers as the MQTT password.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from monitor.durations import Duration
from monitor.publishers.opcua_config import is_loopback_host
from monitor.publishers.secrets import SecretError, read_credential, read_env_secret

MIN_TOKEN_CHARS = 16


class HttpConfig(BaseModel):
    """The HTTP server: /healthz, /readyz, /metrics, the JSON API and the dashboard."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=False, description="Serve health, metrics, API and dashboard.")
    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address to listen on. Anything beyond loopback (e.g. 0.0.0.0) needs a "
        "token (token_env or token_credential).",
    )
    port: int = Field(default=8080, ge=1, le=65535, description="TCP port.")
    token_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable that holds the access token. With a "
        "token, every path but /healthz needs `Authorization: Bearer TOKEN` or the "
        "dashboard's login cookie.",
    )
    token_credential: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.@-]+$",
        description="Name of a systemd credential (a file in $CREDENTIALS_DIRECTORY, e.g. "
        "from LoadCredential=) that holds the access token.",
    )
    history: Duration = Field(
        default=3600.0,
        gt=0,
        le=7 * 86400.0,
        description="How far back the dashboard's trend reaches outside a batch; during a "
        "batch it shows the batch from its start (at most history_max).",
    )
    history_max: Duration = Field(
        default=86400.0,
        gt=0,
        le=30 * 86400.0,
        description="Longest span the trend shows for a long batch.",
    )
    refresh: Duration = Field(
        default=2.0, ge=0.5, le=60, description="How often the dashboard polls the daemon."
    )
    frame_width: int = Field(
        default=960,
        ge=64,
        le=4096,
        description="Width the latest frame is scaled down to for the dashboard, px.",
    )

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> HttpConfig:
        if self.token_env is not None and self.token_credential is not None:
            raise ValueError("set token_env or token_credential, not both")
        if self.history_max < self.history:
            raise ValueError("history_max must not be shorter than history")
        tokenless = self.token_env is None and self.token_credential is None
        if self.enabled and tokenless and not is_loopback_host(self.host):
            raise ValueError(
                f"host {self.host!r} is reachable beyond this machine and no token is set: "
                "set http.token_env (an environment variable) or http.token_credential "
                "(a systemd credential) to require a token, or bind http.host to 127.0.0.1"
            )
        return self


def resolve_token(config: HttpConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The token named by the config (None when none is configured).

    Raises SecretError naming the fix when the named variable or credential is missing,
    or when the token is too short to resist guessing.
    """
    if config.token_env is not None:
        key = "http.token_env"
        token = read_env_secret(config.token_env, key=key, environ=environ)
    elif config.token_credential is not None:
        key = "http.token_credential"
        token = read_credential(config.token_credential, key=key, environ=environ)
    else:
        return None
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise SecretError(
            f"{key}: the token has {len(token)} characters, fewer than {MIN_TOKEN_CHARS} "
            "(make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def check_http_environment(config: HttpConfig) -> list[str]:
    """Start-up checks: the configured token can be read. Each problem names its key."""
    if not config.enabled:
        return []
    try:
        resolve_token(config)
    except SecretError as exc:
        return [str(exc)]
    return []
