"""Configuration of the HTTP server (the `[http]` section): health, metrics, API, dashboard.

Validation is pure: ports, the token's source, and the loopback rule (a server reachable
beyond this host must ask for a token). The token itself is never a config value:
`token_env` or `token_credential` names where it lives, and `resolve_token` reads it
with the same helpers as the MQTT password.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from monitor.config.durations import Duration
from monitor.config.network import is_loopback_host
from monitor.config.secrets import SecretError, read_credential, read_env_secret

MIN_TOKEN_CHARS = 16
MIN_TOKEN_DISTINCT_CHARS = 8
MIN_TOKEN_BITS = 64
TOKEN_FIX = "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
# Sizes of the character classes a token's characters are drawn from, for the estimate.
_CHARACTER_CLASSES: tuple[tuple[str, int], ...] = (
    ("lower", 26),
    ("upper", 26),
    ("digit", 10),
    ("other", 33),
)


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
    max_connections: int = Field(
        default=256,
        ge=1,
        le=65536,
        description="Most HTTP connections open at once. At the limit a new connection "
        "closes the one that has waited longest for a request; when every connection is "
        "busy with a request the new one is closed at once. Keep it well below the "
        "descriptor limit (LimitNOFILE= in the systemd units).",
    )
    header_timeout: Duration = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Time a client has to send a request's headers (counted from its "
        "first byte) and a POST's body; the connection is closed after it.",
    )
    idle_timeout: Duration = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="A connection that sends no request for this long (a new one, or a "
        "kept-alive one after its last answer) is closed.",
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
    or when the token is too weak to resist guessing (`token_weakness`).
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
    problem = token_weakness(token)
    if problem is not None:
        raise SecretError(f"{key}: {problem} ({TOKEN_FIX})")
    return token


def estimate_token_bits(token: str) -> float:
    """A deliberately rough upper estimate of a token's entropy, in bits.

    Length times log2 of the pool its character classes span (lower case, upper case,
    digits, anything else), with the length cut to the token's shortest repeating
    period ("abcabcabc..." counts as "abc"). Random tokens score close to their true
    entropy; a word or a pattern scores too high, so this only rejects the obviously
    weak, which is what a start-up check can do.
    """
    unit = token[: _shortest_period(token)]
    present = {
        "lower": any(c.isascii() and c.islower() for c in unit),
        "upper": any(c.isascii() and c.isupper() for c in unit),
        "digit": any(c.isascii() and c.isdigit() for c in unit),
        "other": any(not (c.isascii() and c.isalnum()) for c in unit),
    }
    pool = sum(size for name, size in _CHARACTER_CLASSES if present[name])
    return len(unit) * math.log2(pool) if pool > 1 else 0.0


def _shortest_period(text: str) -> int:
    """The least p with text[i] == text[i % p] for every i (Knuth-Morris-Pratt's border)."""
    border = [0] * len(text)
    for i in range(1, len(text)):
        k = border[i - 1]
        while k and text[i] != text[k]:
            k = border[k - 1]
        border[i] = k + 1 if text[i] == text[k] else 0
    return len(text) - (border[-1] if text else 0)


def token_weakness(token: str) -> str | None:
    """Why `token` is too weak to guard the server (None when it is strong enough):
    fewer than 16 characters, fewer than 8 distinct ones, or under 64 estimated bits."""
    if len(token) < MIN_TOKEN_CHARS:
        return f"the token has {len(token)} characters, fewer than {MIN_TOKEN_CHARS}"
    distinct = len(set(token))
    if distinct < MIN_TOKEN_DISTINCT_CHARS:
        return (
            f"the token has only {distinct} distinct characters, fewer than "
            f"{MIN_TOKEN_DISTINCT_CHARS}"
        )
    bits = estimate_token_bits(token)
    if bits < MIN_TOKEN_BITS:
        return (
            f"the token is too easy to guess (about {bits:.0f} bits of entropy, fewer "
            f"than {MIN_TOKEN_BITS})"
        )
    return None


def check_http_environment(config: HttpConfig) -> list[str]:
    """Start-up checks: the configured token can be read. Each problem names its key."""
    if not config.enabled:
        return []
    try:
        resolve_token(config)
    except SecretError as exc:
        return [str(exc)]
    return []
