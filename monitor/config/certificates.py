"""Reading the OPC UA server's certificate and key files and checking they belong
together: the configuration check does this before start-up, the server at start.

Only `cryptography` is imported here (no asyncua), so the configuration check can read an
operator's certificate without loading the OPC UA stack. PEM or DER is told from the
content, not the file name.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
PEM_MARKER = b"-----BEGIN"


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


def check_tls_client_files(
    section: str, *, ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> list[str]:
    """Problems of a TLS client's PEM files (`{section}.ca_file`, `.cert_file`,
    `.key_file`: what `ssl` loads when connecting), each naming its key and the fix."""
    fix = "it must be a PEM file the daemon's user can read"
    problems: list[str] = []
    for key, path, read in (
        ("ca_file", ca_file, _read_pem_certificates),
        ("cert_file", cert_file, _read_pem_certificates),
        ("key_file", key_file, _read_pem_private_key),
    ):
        if path is None:
            continue
        try:
            read(path)
        except CertificateFileError as exc:
            problems.append(f"{section}.{key}: {exc} ({fix})")
    return problems


def _read_pem_certificates(path: Path) -> None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateFileError(f"no PEM certificate in {path}") from exc


def _read_pem_private_key(path: Path) -> None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted: the daemon has no passphrase to give
        raise CertificateFileError(f"{path} is encrypted; store the key unencrypted") from exc
    except ValueError as exc:
        raise CertificateFileError(f"no PEM private key in {path}") from exc
