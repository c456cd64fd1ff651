"""The OPC UA server's certificate and key files: read them, check they belong together,
write them so that a crash never leaves half a file.

Only `cryptography` is imported here (no asyncua), so the configuration check can read an
operator's certificate without loading the OPC UA stack. PEM or DER is told from the
content, not the file name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
PEM_MARKER = b"-----BEGIN"
TEMPORARY_SUFFIX = ".tmp"


class CertificateFileError(ValueError):
    """A certificate or key file that cannot be read or is not what it should be."""


def read_certificate(path: Path) -> x509.Certificate:
    """The X.509 certificate in `path` (DER or PEM); CertificateFileError if unreadable."""
    try:
        data = path.read_bytes()
        if PEM_CERTIFICATE in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except (OSError, ValueError) as exc:
        raise CertificateFileError(f"cannot read certificate {path}: {exc}") from exc


def read_private_key(path: Path) -> rsa.RSAPrivateKey:
    """The unencrypted RSA key in `path` (PEM or DER); CertificateFileError otherwise."""
    try:
        data = path.read_bytes()
        key: PrivateKeyTypes
        if PEM_MARKER in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as exc:  # TypeError: encrypted, no password
        raise CertificateFileError(f"cannot read private key {path}: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CertificateFileError(
            f"private key {path} is not an RSA key (Basic256Sha256 needs RSA)"
        )
    return key


def key_matches(certificate: x509.Certificate, key: rsa.RSAPrivateKey) -> bool:
    """True when `key` is the private half of the certificate's public key."""
    return certificate.public_key() == key.public_key()


def check_configured_pair(cert_path: Path, key_path: Path) -> list[str]:
    """Problems of an operator's certificate and key, each naming its key and the fix."""
    fix = (
        "replace it with a valid file, or remove opcua.certificate and opcua.private_key "
        "to have a self-signed certificate generated"
    )
    problems: list[str] = []
    certificate: x509.Certificate | None = None
    key: rsa.RSAPrivateKey | None = None
    try:
        certificate = read_certificate(cert_path)
    except CertificateFileError as exc:
        problems.append(f"opcua.certificate: {exc} ({fix})")
    try:
        key = read_private_key(key_path)
    except CertificateFileError as exc:
        problems.append(f"opcua.private_key: {exc} ({fix})")
    if certificate is not None and key is not None and not key_matches(certificate, key):
        problems.append(
            f"opcua.private_key: {key_path} is not the key of opcua.certificate {cert_path} "
            "(replace one of them so that both are the same pair)"
        )
    return problems


# -- writing ------------------------------------------------------------------------------


def temporary_path(path: Path) -> Path:
    """Where `path` is staged before it is renamed into place (hidden, same folder)."""
    return path.with_name(f".{path.name}{TEMPORARY_SUFFIX}")


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """Write `data` fully to the temporary name of `path` and fsync it."""
    temporary = temporary_path(path)
    temporary.unlink(missing_ok=True)  # a leftover from a crash may have another mode
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)  # the umask may have narrowed or the owner widened it
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def fsync_directory(folder: Path) -> None:
    """Make renames in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files_atomically(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write each (path, data, mode): all staged and fsynced first, then renamed over the
    old files, then the folders fsynced. A crash leaves every file whole, either old or
    new; between two renames the pair may mix old and new, which the reader detects
    (`key_matches`)."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            staged.append((_stage(path, data, mode), path))
    except BaseException:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    for temporary, path in staged:
        os.replace(temporary, path)
    for folder in dict.fromkeys(path.parent for _, path in staged):
        fsync_directory(folder)


def remove_leftovers(paths: Sequence[Path]) -> None:
    """Delete temporary files a crash during `write_files_atomically` left behind."""
    for path in paths:
        temporary_path(path).unlink(missing_ok=True)
