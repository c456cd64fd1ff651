"""Security of the OPC UA server: certificates, client trust, users, the caller's name.

asyncua's defaults are wide open (NoSecurity endpoint, any user name accepted, "admin"
with any password gets the admin role). What replaces them here:

- `ensure_server_certificate`: the server's application instance certificate, a
  self-signed one generated on first start when none is configured, and again when
  the files turn out damaged.
- `ClientTrust`: client certificates are accepted when the certificate itself (pinned)
  or its issuing CA is in the trust folder; the newest refused ones are saved for the
  admin (a bounded number).
- `CrystalMonitorUserManager`: user names, passwords and roles from our users file;
  everyone who authenticates gets asyncua's UserRole.User, never Admin (so no one can
  write values or add and delete nodes through the network), plus the file's role
  (`MonitorUser.monitor_role`). An address that keeps guessing passwords is locked out
  for a growing time (`LoginThrottle`).
- `CallerAwareInternalServer`: asyncua calls a method without the session and checks a
  user without the peer's address; this server's sessions record the calling user
  (`current_caller`) and the peer being logged in (`current_peer`) in context variables,
  and refuse a viewer every method but the standard read-only ones (`VIEWER_METHODS`).

Refusals repeat at an attacker's pace, so they are counted and logged once per kind
per minute (`RepeatedLog`).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import hashlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen, uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession
from asyncua.server.user_managers import UserManager
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from monitor.config.certificates import (
    CertificateFileError,
    key_matches,
    read_certificate,
    read_private_key,
)
from monitor.publishers.opcua_certificates import remove_leftovers, write_files_atomically
from monitor.publishers.opcua_users import OPERATOR, VIEWER, LoginThrottle, UsersFile

log = structlog.get_logger(__name__)

ANONYMOUS = "anonymous"
SERVER_CERT_DAYS = 5 * 365
CERT_SUFFIXES = (".der", ".pem")  # what asyncua's TrustStore reads as well

LOG_INTERVAL_S = 60.0
"""A repeating refusal (wrong password, untrusted certificate) is logged once per this."""

_caller: contextvars.ContextVar[str | None] = contextvars.ContextVar("opcua_caller", default=None)
_peer: contextvars.ContextVar[str | None] = contextvars.ContextVar("opcua_peer", default=None)
_session: contextvars.ContextVar[ua.NodeId | None] = contextvars.ContextVar(
    "opcua_session", default=None
)


def current_caller() -> str:
    """The user name of the session whose method call is running ('anonymous' if none)."""
    return _caller.get() or ANONYMOUS


def current_session() -> ua.NodeId | None:
    """The SessionId of the network session whose method call is running (None if none):
    ConditionRefresh may only refresh that session's own subscriptions."""
    return _session.get()


def current_peer() -> str:
    """The network address of the session being activated ('unknown' outside one)."""
    return _peer.get() or "unknown"


class RepeatedLog:
    """One log line per kind of repeating event per interval, with a count of the rest.

    `due(kind)` says whether a line for `kind` should be written now and returns how many
    were held back since the previous one (None: hold this one back too). Meant for a
    few fixed kinds (reasons), not per-address keys.
    """

    def __init__(
        self, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def due(self, kind: str) -> int | None:
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._held.pop(kind, 0)


# -- server certificate ---------------------------------------------------------------


def default_application_uri() -> str:
    return f"urn:{socket.gethostname()}:crystal-monitor"


def certificate_uri(certificate: x509.Certificate) -> str | None:
    """The first URI in the certificate's subjectAltName (the OPC UA application URI)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _needs_new_certificate(certificate: x509.Certificate, application_uri: str) -> str | None:
    now = dt.datetime.now(dt.UTC)
    if certificate.not_valid_after_utc <= now + dt.timedelta(days=1):
        return "expired"
    if certificate_uri(certificate) != application_uri:
        return "application URI changed"
    return None


@dataclass(frozen=True)
class CertificateChange:
    """Why `ensure_server_certificate` made a new certificate.

    `damaged`: the old files were unreadable or did not belong together (a crash while
    they were written, a full disk, an edit by hand): worth a warning, unlike a first
    start or a routine renewal.
    """

    reason: str
    damaged: bool


def _check_existing(
    cert_path: Path, key_path: Path, application_uri: str
) -> tuple[CertificateChange | None, rsa.RSAPrivateKey | None]:
    """What is wrong with the pair on disk (None: keep it) and the key worth keeping."""
    have_cert, have_key = cert_path.is_file(), key_path.is_file()
    if not have_cert and not have_key:
        return CertificateChange("missing", damaged=False), None
    if not have_cert or not have_key:
        missing = cert_path if not have_cert else key_path
        return CertificateChange(f"{missing} is missing", damaged=True), None
    try:
        key = read_private_key(key_path)
        certificate = read_certificate(cert_path)
    except CertificateFileError as exc:
        return CertificateChange(f"unreadable: {exc}", damaged=True), None
    if not key_matches(certificate, key):
        return CertificateChange(
            f"key does not match the certificate: {key_path} and {cert_path}", damaged=True
        ), None
    routine = _needs_new_certificate(certificate, application_uri)
    return (None if routine is None else CertificateChange(routine, damaged=False)), key


def ensure_server_certificate(
    cert_path: Path, key_path: Path, application_uri: str, hostnames: list[str]
) -> CertificateChange | None:
    """Generate a self-signed server certificate (DER) and key (PEM, 0600) when needed.

    An existing pair is kept unless it expired or names another application URI (then
    its key is reused), or is damaged (then a new key is made as well). Both files are
    written with write-to-temporary, fsync and rename, so a crash never leaves half a
    file. Returns why a new certificate was made, or None when the existing one was kept.
    """
    remove_leftovers([cert_path, key_path])
    change, key = _check_existing(cert_path, key_path, application_uri)
    if change is None:
        return None
    if key is None:
        key = cert_gen.generate_private_key()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    names += [x509.DNSName(host) for host in dict.fromkeys(hostnames) if host]
    certificate = cert_gen.generate_self_signed_app_certificate(
        key,
        "crystal-monitor",
        {"organizationName": "crystal-monitor"},
        names,
        extended=[ExtendedKeyUsageOID.SERVER_AUTH],
        days=SERVER_CERT_DAYS,
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    write_files_atomically(
        [
            (key_path, cert_gen.dump_private_key_as_pem(key), 0o600),
            (cert_path, certificate.public_bytes(serialization.Encoding.DER), 0o644),
        ]
    )
    return change


# -- client certificates --------------------------------------------------------------


def _thumbprint(der: bytes) -> str:
    return hashlib.sha1(der, usedforsecurity=False).hexdigest()


def _load_certificate_file(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


class ClientTrust:
    """Which client application certificates may open a session.

    Trusted: the certificate itself is in `trust_dir` (how self-signed client
    certificates are trusted), or asyncua's TrustStore chains it to a CA certificate
    in `trust_dir`. Validity period, application URI and key usage are checked by
    asyncua's CertificateValidator first. Refused certificates are written to
    `rejected_dir` as <sha1>.der so an admin can move one into `trust_dir`; only the
    newest `max_rejected_files` are kept, since anyone who can reach the port can present
    a new certificate each time. Refusals are counted and logged rate-limited.
    """

    def __init__(
        self,
        trust_dir: Path,
        rejected_dir: Path,
        *,
        max_rejected_files: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.trust_dir = trust_dir
        self.rejected_dir = rejected_dir
        self.max_rejected_files = max_rejected_files
        self.rejected = 0
        """Client certificates refused since start."""
        self.rejected_files_deleted = 0
        """Files of refused certificates deleted to keep the folder bounded."""
        self._saved_order: dict[str, int] = {}
        self._repeated = RepeatedLog(clock=clock)
        self._pinned: set[bytes] = set()
        self._stamp: tuple[tuple[str, int, int], ...] | None = None
        self._store = TrustStore([trust_dir], [])
        # URI, validity and key usage; trust is decided here, not by the validator.
        self._checks = CertificateValidator(
            CertificateValidatorOptions.EXT_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
        )

    def _dir_stamp(self) -> tuple[tuple[str, int, int], ...]:
        entries = []
        for path in sorted(self.trust_dir.glob("*")):
            if path.suffix.lower() in CERT_SUFFIXES and path.is_file():
                stat = path.stat()
                entries.append((path.name, stat.st_mtime_ns, stat.st_size))
        return tuple(entries)

    async def reload(self) -> None:
        """Re-read the trust folder when a file was added, removed or changed."""
        stamp = self._dir_stamp()
        if stamp == self._stamp:
            return
        pinned: set[bytes] = set()
        for name, _, _ in stamp:
            path = self.trust_dir / name
            try:
                certificate = _load_certificate_file(path)
            except (OSError, ValueError) as exc:
                log.warning("opcua_trusted_cert_unreadable", path=str(path), error=str(exc))
                continue
            pinned.add(certificate.public_bytes(serialization.Encoding.DER))
        self._pinned = pinned
        try:
            await self._store.load()
        except Exception as exc:  # one bad file makes asyncua's whole store fail
            log.warning(
                "opcua_trust_store_unreadable",
                folder=str(self.trust_dir),
                error=str(exc),
                effect="only certificates placed in the folder itself are trusted, no CAs",
            )
            self._store = TrustStore([self.trust_dir], [])
        self._stamp = stamp
        log.info("opcua_trust_loaded", folder=str(self.trust_dir), certificates=len(pinned))

    def is_trusted(self, certificate: x509.Certificate) -> bool:
        if certificate.public_bytes(serialization.Encoding.DER) in self._pinned:
            return True
        if _is_self_signed(certificate):
            return False  # only pinning trusts a self-signed certificate
        return self._store.validate(certificate)

    def is_trusted_der(self, der: bytes | None) -> bool:
        """The same decision for the raw certificate of a secure channel."""
        if not der:
            return False
        try:
            certificate = uacrypto.x509_from_der(der)  # type: ignore[no-untyped-call]
        except ValueError:
            return False
        return certificate is not None and self.is_trusted(certificate)

    def _save_rejected(self, der: bytes) -> Path | None:
        """Keep the refused certificate for the admin; None when not kept."""
        if self.max_rejected_files == 0:
            return None
        path = self.rejected_dir / f"{_thumbprint(der)}.der"
        try:
            self.rejected_dir.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                os.utime(path)  # seen again: now among the newest
            else:
                path.write_bytes(der)
        except OSError as exc:
            log.debug("opcua_rejected_cert_not_saved", path=str(path), error=str(exc))
            return None
        self._saved_order[path.name] = len(self._saved_order)
        if len(self._saved_order) > 4 * self.max_rejected_files:
            self._saved_order = {}  # only breaks ties of equal mtimes; stays small
        self.prune_rejected()
        return path

    def prune_rejected(self) -> int:
        """Delete the oldest refused certificates beyond `max_rejected_files`."""
        try:
            entries = [
                (entry.stat().st_mtime_ns, self._saved_order.get(entry.name, -1), entry.path)
                for entry in os.scandir(self.rejected_dir)
                if entry.name.endswith(".der") and entry.is_file(follow_symlinks=False)
            ]
        except OSError:
            return 0  # no folder yet
        excess = len(entries) - self.max_rejected_files
        if excess <= 0:
            return 0
        deleted = 0
        for _, _, name in sorted(entries)[:excess]:
            try:
                os.unlink(name)
            except OSError:
                continue
            deleted += 1
            self._saved_order.pop(os.path.basename(name), None)
        self.rejected_files_deleted += deleted
        return deleted

    def _reject(self, certificate: x509.Certificate, why: str) -> None:
        self.rejected += 1
        saved = self._save_rejected(certificate.public_bytes(serialization.Encoding.DER))
        held = self._repeated.due(why)
        if held is None:
            return
        log.warning(
            "opcua_client_cert_rejected",
            why=why,
            subject=certificate.subject.rfc4514_string(),
            saved=str(saved) if saved is not None else "(not saved)",
            fix=f"to trust it, copy {saved or 'its file'} into {self.trust_dir}",
            not_logged=held,  # refusals since the previous line that had none of their own
            rejected_total=self.rejected,
            kept_newest=self.max_rejected_files,
        )

    async def validate(self, certificate: x509.Certificate, app: ua.ApplicationDescription) -> None:
        """asyncua certificate validator: raises ServiceError(Bad...) to refuse a client."""
        await self.reload()
        try:
            await self._checks.validate(certificate, app)
        except ServiceError as exc:
            self._reject(certificate, ua.StatusCode(ua.UInt32(exc.code)).name)
            raise
        if not self.is_trusted(certificate):
            self._reject(certificate, "BadCertificateUntrusted")
            raise ServiceError(StatusCodes.BadCertificateUntrusted)


def _is_self_signed(certificate: x509.Certificate) -> bool:
    return certificate.issuer == certificate.subject


# -- users ----------------------------------------------------------------------------


@dataclass
class MonitorUser(User):
    """An asyncua User (role UserRole.User) with its role from our users file."""

    monitor_role: str = OPERATOR
    """'operator' or 'viewer' (`opcua_users.ROLES`): whether it may call our methods."""


VIEWER_METHODS: frozenset[ua.NodeId] = frozenset(
    ua.NodeId(ua.Int32(identifier))
    for identifier in (
        ObjectIds.ConditionType_ConditionRefresh,
        ObjectIds.ConditionType_ConditionRefresh2,
        ObjectIds.Server_GetMonitoredItems,
    )
)
"""The methods a viewer may call: standard ones that only re-send what a client reads.
Every other method (Acknowledge, Shelve, StartBatch, StopBatch) changes the plant's
record, so a viewer gets BadUserAccessDenied for it."""


def may_call(user: User | None, method: ua.NodeId) -> bool:
    """Whether `user` may call `method`: a viewer only the `VIEWER_METHODS`."""
    if isinstance(user, MonitorUser) and user.monitor_role == VIEWER:
        return method in VIEWER_METHODS
    return True


class CrystalMonitorUserManager(UserManager):
    """Users from our users file; every authenticated user gets UserRole.User and its
    role from the file (`MonitorUser`).

    `allow_anonymous` (demo profile) maps an anonymous session to an operator named
    'anonymous'. `channel_trusted`, when given, must accept the secure channel's client
    certificate as well: asyncua validates only the certificate a client repeats in
    CreateSession, so this closes the gap of a client that leaves it out there.
    `throttle`, when given, locks out an address after repeated wrong passwords
    (the address comes from `CallerAwareInternalServer`'s sessions). Refusals are
    counted and logged once per kind per minute.
    """

    def __init__(
        self,
        users: UsersFile | None,
        *,
        allow_anonymous: bool,
        channel_trusted: Callable[[bytes | None], bool] | None = None,
        throttle: LoginThrottle | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.users = users
        self.allow_anonymous = allow_anonymous
        self.channel_trusted = channel_trusted
        self.throttle = throttle
        self.logins_failed = 0
        """Wrong user name or password."""
        self.login_lockouts = 0
        """Lockouts started."""
        self.logins_refused_locked_out = 0
        """Attempts refused unchecked because their address was locked out."""
        self._repeated = RepeatedLog(clock=clock)

    def _refused(self, why: str, **context: Any) -> None:
        held = self._repeated.due(why)
        if held is not None:
            log.warning("opcua_login_refused", why=why, not_logged=held, **context)

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        peer = current_peer()
        if self.channel_trusted is not None and not self.channel_trusted(certificate):
            self._refused("untrusted channel certificate", user=username, peer=peer)
            return None
        if username is None:
            if self.allow_anonymous:
                return MonitorUser(role=UserRole.User, name=ANONYMOUS, monitor_role=OPERATOR)
            self._refused("anonymous login is disabled", peer=peer)
            return None
        if self.throttle is not None:
            wait = self.throttle.locked_for(peer)
            if wait > 0:
                self.logins_refused_locked_out += 1
                self._refused(
                    "address locked out after failed logins",
                    user=username,
                    peer=peer,
                    retry_in_s=round(wait, 1),
                    refused_total=self.logins_refused_locked_out,
                )
                return None
        role = None if self.users is None else self.users.authenticate(username, password)
        if role is not None:
            if self.throttle is not None:
                self.throttle.succeeded(peer)
            log.info("opcua_login", user=username, role=role, peer=peer)
            return MonitorUser(role=UserRole.User, name=username, monitor_role=role)
        self.logins_failed += 1
        self._refused(
            "unknown user or wrong password",
            user=username,
            peer=peer,
            failed_total=self.logins_failed,
        )
        lockout = 0.0 if self.throttle is None else self.throttle.failed(peer)
        if lockout > 0:
            self.login_lockouts += 1
            log.warning(
                "opcua_login_locked_out",
                peer=peer,
                seconds=lockout,
                user=username,
                fix="wait, then log in with the right password (it resets the count)",
            )
        return None


# -- the calling user of a method -----------------------------------------------------


def _peer_host(name: Any) -> str:
    """The address of a session named by asyncua after the socket's peername."""
    if isinstance(name, tuple) and name:
        return str(name[0])
    return str(name)


class _CallerAwareSession(InternalSession):
    def activate_session(
        self, params: ua.ActivateSessionParameters, peer_certificate: bytes | None
    ) -> ua.ActivateSessionResult:
        token = _peer.set(_peer_host(self.name))
        try:
            return super().activate_session(params, peer_certificate)
        finally:
            _peer.reset(token)

    async def call(self, params: list[ua.CallMethodRequest]) -> list[ua.CallMethodResult]:
        name = self.user.name if self.user is not None and self.user.name else ANONYMOUS
        allowed = [request for request in params if may_call(self.user, request.MethodId)]
        if len(allowed) < len(params):
            log.warning(
                "opcua_call_refused",
                user=name,
                why="a viewer may not call this method",
                methods=[
                    request.MethodId.to_string()
                    for request in params
                    if not may_call(self.user, request.MethodId)
                ],
            )
        token = _caller.set(name)
        session_token = _session.set(self.session_id)
        try:
            answers = iter(await super().call(allowed) if allowed else [])
        finally:
            _session.reset(session_token)
            _caller.reset(token)
        # One result per request, in the order asked; a refused one is BadUserAccessDenied.
        return [
            next(answers)
            if may_call(self.user, request.MethodId)
            else ua.CallMethodResult(
                StatusCode=ua.StatusCode(ua.UInt32(StatusCodes.BadUserAccessDenied))
            )
            for request in params
        ]


class CallerAwareInternalServer(InternalServer):
    """An InternalServer whose network sessions expose the caller to method callbacks
    and the peer address to the user manager.

    Method callbacks must be coroutine functions: asyncua runs plain functions in an
    executor, where the context variable is not set.
    """

    def create_session(
        self, name: str, user: User | None = None, external: bool = False
    ) -> InternalSession:
        return _CallerAwareSession(
            self,
            self.aspace,
            self.subscription_service,
            name,
            user=user if user is not None else User(role=UserRole.Anonymous),
            external=external,
        )
