"""Mutual TLS between the services: certificate files from config, gRPC credentials and channels,
the verified peer's service name, and a local certificate authority for `seal certs` and tests.

Every certificate names its service in the subject CN (teacher, student, auditor, gateway, client),
so a server can see which service is calling (`peer_service`) and authorize by it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_SERVICES = ("teacher", "student", "auditor", "gateway", "client")
"""The four services plus `client`, the identity of command-line tools (seal submit, seal status)."""
LOCAL_HOSTS = ("localhost", "127.0.0.1")
CA_NAME = "ca"
CA_VALIDITY = datetime.timedelta(days=3650)
CERT_VALIDITY = datetime.timedelta(days=825)
RENEW_BEFORE = datetime.timedelta(days=30)
"""An existing certificate that expires sooner than this is reissued by make_local_pki."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one service: the CA that signs every peer, its own certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) contents."""
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


class TlsSettings(Protocol):
    """Where the TLS files are: a ServiceConfig, or the flags of a command-line client."""

    tls_ca: str
    tls_cert: str
    tls_key: str


def tls_files(config: TlsSettings) -> TlsFiles | None:
    """The configured TLS files, checked to be readable PEM; None when TLS is off (none set).

    A partial set is an error: a service that silently fell back to plaintext would look secure."""
    given = {"tls_ca": config.tls_ca, "tls_cert": config.tls_cert, "tls_key": config.tls_key}
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ValueError(
            f"mTLS needs tls_ca, tls_cert and tls_key together; missing {flags} "
            f"(or SEAL_{'/SEAL_'.join(m.upper() for m in missing)}); `seal certs --out DIR` makes a set"
        )
    tls = TlsFiles(Path(config.tls_ca), Path(config.tls_cert), Path(config.tls_key))
    _load_certificate("tls_ca", tls.ca)
    cert = _load_certificate("tls_cert", tls.cert)
    if cert.public_key() != _load_private_key("tls_key", tls.key).public_key():
        raise ValueError(f"tls_key: {tls.key} is not the key of the certificate {tls.cert}")
    return tls


def _read(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None


def _load_certificate(name: str, path: Path) -> x509.Certificate:
    data = _read(name, path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ValueError(f"{name}: {path} is not a PEM certificate") from None


def _load_private_key(name: str, path: Path) -> Any:
    data = _read(name, path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{name}: {path} is not an unencrypted PEM private key") from None


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Server side of mTLS: present our certificate, require a client certificate signed by the CA."""
    ca, cert, key = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Client side of mTLS: trust only the CA, present our own certificate."""
    ca, cert, key = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def channel(address: str, tls: TlsFiles | None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to `address`: mutual TLS when `tls` is given, plaintext when TLS is off."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, channel_credentials(tls), options=list(options))


def peer_service(context: grpc.ServicerContext) -> str:
    """The calling service's name (its certificate's CN, verified against the CA by the TLS
    handshake); empty when the call did not come over mTLS."""
    names = context.auth_context().get("x509_common_name", [])
    return names[0].decode() if names else ""


# --- a local certificate authority -----------------------------------------------------------------


def make_local_pki(
    directory: Path,
    services: Iterable[str] = LOCAL_SERVICES,
    hosts: Iterable[str] = LOCAL_HOSTS,
) -> dict[str, TlsFiles]:
    """A CA (`ca.pem`, `ca.key`) and, per service, `<name>.pem` / `<name>.key` under `directory`.

    Each certificate is for both server and client use, with the service name as CN and as a DNS
    SAN beside every host (names become DNS SANs, addresses IP SANs). Idempotent: existing keys are
    kept, and an existing certificate is kept while it is signed by this CA, covers every name asked
    for and is not about to expire; otherwise it is reissued for the same key. Keys are mode 0600."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    hosts = list(hosts)
    ca_key = _load_or_make_key(directory / f"{CA_NAME}.key")
    ca_cert = _load_or_make_ca(directory / f"{CA_NAME}.pem", ca_key)
    issued = {}
    for name in services:
        key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
        key = _load_or_make_key(key_path)
        sans = _subject_alt_names(name, hosts)
        if not _still_good(cert_path, ca_cert, key, sans):
            cert = _issue(name, key.public_key(), sans, ca_cert, ca_key)
            _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        issued[name] = TlsFiles(directory / f"{CA_NAME}.pem", cert_path, key_path)
    return issued


def tls_env(tls: TlsFiles) -> dict[str, str]:
    """The SEAL_TLS_* variables that turn mTLS on for a service (ServiceConfig's tls_* fields)."""
    return {"SEAL_TLS_CA": str(tls.ca), "SEAL_TLS_CERT": str(tls.cert), "SEAL_TLS_KEY": str(tls.key)}


def _write(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode (a key is never readable by others, even for a moment), then renamed
    # into place so a reader never sees half a file.
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(staging, mode)  # the umask may have narrowed it; a key must not be wider either way
    os.replace(staging, path)


def _load_or_make_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        key = _load_private_key(path.name, path)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC private key; remove it to make a new one")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(path, pem, 0o600)
    return key


def _load_or_make_ca(path: Path, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    if path.exists():
        cert = _load_certificate(path.name, path)
        if cert.public_key() != key.public_key():
            raise ValueError(f"{path} does not belong to the CA key beside it; remove both to start over")
        return cert
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seal local CA")])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert


def _subject_alt_names(service: str, hosts: Iterable[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for host in dict.fromkeys([service, *hosts]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return sans


def _issue(
    service: str,
    public_key: ec.EllipticCurvePublicKey,
    sans: list[x509.GeneralName],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    now = _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + CERT_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _still_good(
    path: Path, ca_cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, sans: list[x509.GeneralName]
) -> bool:
    """Whether an existing certificate can be kept: this CA signed it, for this key, for every name."""
    if not path.exists():
        return False
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return (
        cert.public_key() == key.public_key()
        and set(sans) <= have
        and cert.not_valid_after_utc - _now() > RENEW_BEFORE
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
