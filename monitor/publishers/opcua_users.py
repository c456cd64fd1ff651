"""The OPC UA users file: one `name:scrypt$N$r$p$salt$hash` line per user.

Salt and hash are unpadded URL-safe base64; `#` starts a comment line. Passwords are
stored only as salted scrypt hashes and compared in constant time. `UsersFile`
re-reads the file when it changes, so adding a user needs no restart.

    from monitor.publishers.opcua_users import write_user
    write_user(Path("/etc/crystal-monitor/opcua-users"), "operator1", "s3cret-pass")
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SCHEME = "scrypt"
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_SCRYPT_N = 2**20
"""Upper bound on N read from a file, so a corrupt line cannot make a login eat memory."""

USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class UsersFileError(ValueError):
    """A users file that cannot be read or has a malformed line (names file and line)."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, *, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        dklen=length,
        maxmem=256 * r * n + 1024 * 1024,
    )


def hash_password(password: str) -> str:
    """A fresh salted scrypt hash of `password`: `scrypt$N$r$p$salt$hash`."""
    if not password:
        raise ValueError("password must not be empty")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, length=HASH_BYTES)
    return f"{SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64encode(salt)}${_b64encode(digest)}"


@dataclass(frozen=True)
class _ParsedHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _parse_hash(encoded: str) -> _ParsedHash:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise ValueError(f"expected {SCHEME}$N$r$p$salt$hash")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _b64decode(parts[4]), _b64decode(parts[5])
    except ValueError as exc:
        raise ValueError(f"expected {SCHEME}$N$r$p$salt$hash with numbers and base64") from exc
    if n < 2 or n > MAX_SCRYPT_N or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError(f"scrypt parameters out of range (N a power of 2 <= {MAX_SCRYPT_N})")
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("salt or hash too short")
    return _ParsedHash(n, r, p, salt, digest)


def verify_password(password: str, encoded: str) -> bool:
    """True when `password` matches the stored hash (constant-time compare)."""
    try:
        parsed = _parse_hash(encoded)
    except ValueError:
        return False
    candidate = _scrypt(
        password, parsed.salt, n=parsed.n, r=parsed.r, p=parsed.p, length=len(parsed.digest)
    )
    return hmac.compare_digest(candidate, parsed.digest)


_DUMMY_HASH = f"{SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${'A' * 22}${'A' * 43}"
"""Verified against for unknown user names, so a login takes as long either way."""


def parse_users(text: str, source: str = "<users>") -> dict[str, str]:
    """name -> encoded hash from the text of a users file; raises UsersFileError."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, encoded = line.partition(":")
        where = f"{source}:{number}"
        if not sep:
            raise UsersFileError(f"{where}: expected name:{SCHEME}$N$r$p$salt$hash")
        if not USER_NAME.match(name):
            raise UsersFileError(
                f"{where}: user name {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-'"
            )
        if name in users:
            raise UsersFileError(f"{where}: user {name!r} appears twice")
        try:
            _parse_hash(encoded)
        except ValueError as exc:
            raise UsersFileError(f"{where}: bad hash for user {name!r}: {exc}") from exc
        users[name] = encoded
    return users


def load_users(path: Path) -> dict[str, str]:
    """name -> encoded hash from a users file; raises UsersFileError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersFileError(f"cannot read users file {path}: {exc}") from exc
    return parse_users(text, str(path))


def format_user_line(name: str, password: str) -> str:
    """One users-file line for `name` with a fresh hash of `password`."""
    if not USER_NAME.match(name):
        raise ValueError(f"user name {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-'")
    return f"{name}:{hash_password(password)}"


def write_user(path: Path, name: str, password: str) -> None:
    """Add `name` to the users file, or replace its password; the file is kept mode 0600."""
    users = load_users(path) if path.exists() else {}
    users[name] = format_user_line(name, password).partition(":")[2]
    lines = ["# crystal-monitor OPC UA users: name:scrypt$N$r$p$salt$hash"]
    lines += [f"{user}:{encoded}" for user, encoded in users.items()]
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(temporary, path)


class UsersFile:
    """Checks user names and passwords against a users file, re-read when it changes.

    A file that turns unreadable or malformed after start keeps the last good users
    (and `check` reports nothing new); the error is available as `last_error`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, str] = {}
        self.last_error: str | None = None
        self._users = load_users(path)  # fail at start-up with the file's own message
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def _refresh(self) -> None:
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return
        try:
            self._users = load_users(self.path)
            self.last_error = None
        except UsersFileError as exc:
            self.last_error = str(exc)
        self._stamp = stamp

    def check(self, name: str | None, password: str | None) -> bool:
        """True when `name` is in the file and `password` matches its hash."""
        with self._lock:
            self._refresh()
            encoded = self._users.get(name or "")
        if encoded is None or not password:
            verify_password(password or "", _DUMMY_HASH)
            return False
        return verify_password(password, encoded)


@dataclass
class _PeerFailures:
    failures: int = 0
    last_failure: float = 0.0
    locked_until: float = 0.0


class LoginThrottle:
    """Locks an address out after `max_failures` failed logins in a row.

    The lockout starts at `lockout_s` and doubles with each failure after it, up to
    `lockout_max_s`; during it every login from the address is refused unchecked (so
    guessing costs no scrypt time either). A successful login forgets the address, and
    so does `lockout_max_s` of quiet after its last failure or lockout. At most
    `max_peers` addresses are tracked, the least recently failing dropped first. Pure
    logic over an injected clock; not thread-safe (the OPC UA server uses one loop).
    """

    def __init__(
        self,
        *,
        max_failures: int,
        lockout_s: float,
        lockout_max_s: float,
        max_peers: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.lockout_s = lockout_s
        self.lockout_max_s = lockout_max_s
        self.max_peers = max_peers
        self.clock = clock
        self._peers: OrderedDict[str, _PeerFailures] = OrderedDict()

    def _current(self, peer: str, now: float) -> _PeerFailures | None:
        entry = self._peers.get(peer)
        if entry is not None and now >= max(entry.locked_until, entry.last_failure) + (
            self.lockout_max_s
        ):
            del self._peers[peer]
            return None
        return entry

    def locked_for(self, peer: str) -> float:
        """Seconds until `peer` may try again (0 when it may now)."""
        now = self.clock()
        entry = self._current(peer, now)
        return 0.0 if entry is None else max(0.0, entry.locked_until - now)

    def failed(self, peer: str) -> float:
        """Count a failed login; returns the length of the lockout it starts (0: none)."""
        now = self.clock()
        entry = self._current(peer, now) or _PeerFailures()
        entry.failures += 1
        entry.last_failure = now
        self._peers[peer] = entry
        self._peers.move_to_end(peer)
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        beyond = entry.failures - self.max_failures
        if beyond < 0:
            return 0.0
        lockout = min(self.lockout_max_s, self.lockout_s * 2.0 ** min(beyond, 62))
        entry.locked_until = now + lockout
        return lockout

    def succeeded(self, peer: str) -> None:
        self._peers.pop(peer, None)

    def __len__(self) -> int:
        return len(self._peers)
