"""The OPC UA users file: one `name:role:scrypt$N$r$p$salt$hash` line per user.

The role is one of `ROLES` (what the production profile grants, see
`opcua_security`); a line without one (`name:scrypt$...`, the format before roles)
is an operator. Salt and hash are unpadded URL-safe base64; `#` starts a comment
line. Passwords are stored only as salted scrypt hashes and compared in constant time.
`UsersFile` re-reads the file when it changes, so adding a user needs no restart.
Users are managed with `crystal-monitor opcua-user add|list|remove`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import tempfile
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
USER_NAME_RULE = "must be 1-64 letters, digits, '_', '.', '@' or '-'"

OPERATOR = "operator"
VIEWER = "viewer"
ROLES: tuple[str, ...] = (OPERATOR, VIEWER)
"""The roles the production profile grants: an operator reads, browses, subscribes and
calls the operator methods (Acknowledge, Shelve, StartBatch, StopBatch); a viewer only
reads, browses and subscribes (`opcua_security.VIEWER_METHODS` lists what it may call)."""
DEFAULT_ROLE = OPERATOR
"""The role of a line that names none: every user had the operator's rights before roles."""


class UsersFileError(ValueError):
    """A users file that cannot be read or has a malformed line (names file and line)."""


class UserExistsError(UsersFileError):
    """Adding a user that the file already has, without asking to replace it."""


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


@dataclass(frozen=True)
class UserEntry:
    """One user of the file: the role granted and the encoded password hash."""

    role: str
    password_hash: str


def _parse_line(line: str, where: str) -> tuple[str, UserEntry]:
    fields = line.split(":")
    if len(fields) == 2:
        name, role, encoded = fields[0], DEFAULT_ROLE, fields[1]
    elif len(fields) == 3:
        name, role, encoded = fields
    else:
        raise UsersFileError(f"{where}: expected name:role:{SCHEME}$N$r$p$salt$hash")
    if not USER_NAME.match(name):
        raise UsersFileError(f"{where}: user name {name!r} {USER_NAME_RULE}")
    if role not in ROLES:
        raise UsersFileError(
            f"{where}: user {name!r} has role {role!r}; the roles are {', '.join(ROLES)}"
        )
    try:
        _parse_hash(encoded)
    except ValueError as exc:
        raise UsersFileError(f"{where}: bad hash for user {name!r}: {exc}") from exc
    return name, UserEntry(role, encoded)


def parse_user_entries(text: str, source: str = "<users>") -> dict[str, UserEntry]:
    """name -> role and hash from the text of a users file; raises UsersFileError."""
    users: dict[str, UserEntry] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        name, entry = _parse_line(line, where)
        if name in users:
            raise UsersFileError(f"{where}: user {name!r} appears twice")
        users[name] = entry
    return users


def parse_users(text: str, source: str = "<users>") -> dict[str, str]:
    """name -> encoded hash from the text of a users file; raises UsersFileError."""
    return {name: entry.password_hash for name, entry in parse_user_entries(text, source).items()}


def load_user_entries(path: Path) -> dict[str, UserEntry]:
    """name -> role and hash from a users file; raises UsersFileError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersFileError(f"cannot read users file {path}: {exc}") from exc
    return parse_user_entries(text, str(path))


def check_user_name(name: str) -> None:
    """Raise ValueError unless `name` may stand in a users file."""
    if not USER_NAME.match(name):
        raise ValueError(f"user name {name!r} {USER_NAME_RULE}")


def check_role(role: str) -> None:
    """Raise ValueError unless `role` is one of `ROLES`."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")


def format_user_line(name: str, password: str, role: str = DEFAULT_ROLE) -> str:
    """One users-file line for `name` with `role` and a fresh hash of `password`."""
    check_user_name(name)
    check_role(role)
    return f"{name}:{role}:{hash_password(password)}"


def write_user_entries(path: Path, users: dict[str, UserEntry]) -> None:
    """Write the whole users file atomically (temporary file, fsync, rename), mode 0600.

    A reader (the running server re-reads the file when it changes) sees the old file or
    the new one, never half of one. The owner and group of a file being replaced are
    kept where this process may set them (e.g. run by root for a service's file).
    """
    lines = [f"# crystal-monitor OPC UA users: name:role:{SCHEME}$N$r$p$salt$hash"]
    lines += [f"{name}:{entry.role}:{entry.password_hash}" for name, entry in users.items()]
    try:
        previous: os.stat_result | None = path.stat()
    except FileNotFoundError:
        previous = None
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fchmod(handle.fileno(), 0o600)  # mkstemp's mode already, stated for the reader
            if previous is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(handle.fileno(), previous.st_uid, previous.st_gid)
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def write_user(
    path: Path, name: str, password: str, role: str = DEFAULT_ROLE, *, replace: bool = True
) -> None:
    """Add `name` to the users file (created when missing), or replace its password and
    role; with `replace=False` an existing user is refused (UserExistsError)."""
    line = format_user_line(name, password, role)
    users = load_user_entries(path) if path.exists() else {}
    if name in users and not replace:
        raise UserExistsError(f"user {name!r} is already in {path}")
    users[name] = UserEntry(role, line.rsplit(":", 1)[1])
    write_user_entries(path, users)


def remove_user(path: Path, name: str) -> None:
    """Remove `name` from the users file; raises UsersFileError when it is not there."""
    users = load_user_entries(path)
    if name not in users:
        raise UsersFileError(f"no user {name!r} in {path}")
    del users[name]
    write_user_entries(path, users)


class UsersFile:
    """Checks user names and passwords against a users file, re-read when it changes.

    A file that turns unreadable or malformed after start keeps the last good users
    (and `authenticate` reports nothing new); the error is available as `last_error`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, UserEntry] = {}
        self.last_error: str | None = None
        self._users = load_user_entries(path)  # fail at start-up with the file's own message
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        # The inode too: a rewrite is a rename of a new file, and a changed password has
        # the same size and, on a file system with coarse times, the same mtime.
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def _refresh(self) -> None:
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return
        try:
            self._users = load_user_entries(self.path)
            self.last_error = None
        except UsersFileError as exc:
            self.last_error = str(exc)
        self._stamp = stamp

    def authenticate(self, name: str | None, password: str | None) -> str | None:
        """The role of `name` when it is in the file and `password` matches its hash."""
        with self._lock:
            self._refresh()
            entry = self._users.get(name or "")
        if entry is None or not password:
            verify_password(password or "", _DUMMY_HASH)
            return None
        return entry.role if verify_password(password, entry.password_hash) else None

    def check(self, name: str | None, password: str | None) -> bool:
        """True when `name` is in the file and `password` matches its hash."""
        return self.authenticate(name, password) is not None


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
