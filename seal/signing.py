"""Signed verdicts: what the auditor signs, and what any service checks before trusting one.

The auditor signs a `VerdictStatement` (proto), serialized deterministically, that names the job, the
self-edit and the digest of its text, the digest of the questions scored, the adapter's manifest
digest, the base model, the teacher policy, every score and guardrail result, the key id, and when
it was issued and expires. The bytes travel in the verdict beside the signature, so a verifier in any
language checks the signature over the bytes it received, then parses them. A verifier also checks
that the verdict's readable fields equal the signed statement, and (`check_verdict`) that the
statement names what the verifier itself recorded: a verdict for another job, self-edit, adapter,
base or question set is refused, and so is an expired one or one under a key it does not trust.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError, Message

from seal import convert
from seal.errors import PermanentError
from seal.records import Certificate, Verdict
from seal.v1 import types_pb2

_RAW_KEY_BYTES = 32
R = TypeVar("R", Verdict, Certificate)


class VerdictRejected(PermanentError):
    """A verdict that must not be trusted; `code` says which check refused it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def statement_of(verdict: Verdict) -> types_pb2.VerdictStatement:
    """The statement a verdict's readable fields describe (what the signature must cover)."""
    return convert.to_pb(verdict, types_pb2.VerdictStatement)


class VerdictSigner:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._public_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> VerdictSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, key_path: Path) -> VerdictSigner:
        """The signer whose private key lives at `key_path`, creating it (mode 0600) if missing."""
        key_path = Path(key_path)
        if not key_path.exists():
            _create_key_file(key_path)
        return cls(_parse_private_key(key_path.read_bytes(), key_path))

    def public_key_bytes(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._public_bytes

    @property
    def key_id(self) -> str:
        return key_id_of(self._public_bytes)

    def sign(self, verdict: Verdict, ttl_s: float = 30 * 24 * 3600.0, now: float | None = None) -> Verdict:
        """`verdict` stamped with this key's id, issue and expiry times, its statement and signature."""
        return self._sign(verdict, types_pb2.VerdictStatement, ttl_s, now)

    def sign_certificate(
        self, certificate: Certificate, ttl_s: float = 30 * 24 * 3600.0, now: float | None = None
    ) -> Certificate:
        """A deployment version's certificate, stamped and signed the same way as a verdict."""
        return self._sign(certificate, types_pb2.CertificateStatement, ttl_s, now)

    def _sign(self, record: R, statement_cls: type[Message], ttl_s: float, now: float | None) -> R:
        issued = time.time() if now is None else now
        stamped = dataclasses.replace(
            record,  # type: ignore[type-var]
            auditor_key_id=self.key_id,
            issued_at=issued,
            expires_at=issued + ttl_s,
            signature="",
            statement="",
        )
        statement = convert.to_pb(stamped, statement_cls).SerializeToString(deterministic=True)
        return dataclasses.replace(
            stamped,
            statement=base64.b64encode(statement).decode(),
            signature=self._private_key.sign(statement).hex(),
        )


def version_fingerprint(
    base_fingerprint: str, adapter_sha256s: Sequence[str], gate_sha256s: Sequence[str] = ()
) -> str:
    """The identity of a deployment version: its base and its adapters, in the order they are merged,
    and each layer's gate digest ("" for an ungated layer; a version without gates keeps the identity
    it had before gates existed)."""
    lines = [base_fingerprint, *adapter_sha256s]
    if any(gate_sha256s):
        lines += [f"gate {sha}" for sha in gate_sha256s]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def layer_gate_sha256s(layers: Sequence[Any]) -> list[str]:
    """The gate digests `version_fingerprint` takes, of a version's layers (seal.records.Layer)."""
    gates = [
        layer.document.gate() if layer.document is not None else None
        for layer in layers
        if layer.adapter is not None
    ]
    return [gate.sha256() if gate is not None else "" for gate in gates]


def key_id_of(public_key: bytes) -> str:
    """A short, stable name for a public key: the first 16 hex chars of its sha256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


@dataclass(frozen=True)
class TrustedKeys:
    """The auditor public keys a verifier trusts, by key id. Keep retired keys listed to keep their
    verdicts verifiable; remove a key to stop trusting everything it signed."""

    keys: dict[str, bytes]

    @classmethod
    def of(cls, *public_keys: bytes) -> TrustedKeys:
        return cls({key_id_of(k): k for k in public_keys})

    def verify(self, verdict: Verdict) -> types_pb2.VerdictStatement:
        """The signed statement of `verdict`; VerdictRejected unless it verifies and matches the fields."""
        return self._verify(verdict, types_pb2.VerdictStatement, "verdict")  # type: ignore[return-value]

    def verify_certificate(self, certificate: Certificate) -> types_pb2.CertificateStatement:
        """The signed statement of a deployment version's certificate, checked as `verify` checks a verdict."""
        return self._verify(certificate, types_pb2.CertificateStatement, "certificate")  # type: ignore[return-value]

    def _verify(self, record: Verdict | Certificate, statement_cls: type[Message], what: str) -> Message:
        key = self.keys.get(record.auditor_key_id)
        if key is None:
            raise VerdictRejected(
                "unknown_key", f"{what} is signed by key {record.auditor_key_id!r}, which is not trusted"
            )
        try:
            statement = base64.b64decode(record.statement, validate=True)
            Ed25519PublicKey.from_public_bytes(key).verify(bytes.fromhex(record.signature), statement)
            signed = statement_cls.FromString(statement)
        except (InvalidSignature, ValueError, TypeError, binascii.Error, DecodeError):
            raise VerdictRejected("bad_signature", f"the {what}'s signature does not verify") from None
        if signed != convert.to_pb(record, statement_cls):
            raise VerdictRejected("altered", f"the {what}'s fields differ from the statement that was signed")
        return signed


def verify_verdict(verdict: Verdict, public_key: bytes) -> bool:
    """Whether `verdict` was signed by `public_key` and not changed since; never raises."""
    try:
        TrustedKeys.of(public_key).verify(verdict)
    except VerdictRejected:
        return False
    return True


@dataclass(frozen=True)
class Expected:
    """What a verifier recorded itself, that a verdict must name to be accepted."""

    job_id: str
    doc_index: int
    self_edit_id: str
    self_edit_sha256: str
    document_sha256: str
    adapter_sha256: str
    base_fingerprint: str


def check_verdict(
    verdict: Verdict, keys: TrustedKeys, expected: Expected, now: float | None = None
) -> types_pb2.VerdictStatement:
    """Verify the signature, then every binding field against `expected`, then the expiry.

    Raises VerdictRejected with a code per failed check (wrong_job, wrong_self_edit, wrong_adapter,
    wrong_base, wrong_questions, expired, and those of TrustedKeys.verify).
    """
    statement = keys.verify(verdict)
    bindings = (
        ("wrong_job", "job_id", expected.job_id),
        ("wrong_job", "doc_index", expected.doc_index),
        ("wrong_self_edit", "self_edit_id", expected.self_edit_id),
        ("wrong_self_edit", "self_edit_sha256", expected.self_edit_sha256),
        ("wrong_questions", "document_sha256", expected.document_sha256),
        ("wrong_adapter", "adapter_sha256", expected.adapter_sha256),
        ("wrong_base", "base_fingerprint", expected.base_fingerprint),
    )
    for code, name, want in bindings:
        got = getattr(statement, name)
        if got != want:
            raise VerdictRejected(code, f"verdict names {name} {got!r}, expected {want!r}")
    if (time.time() if now is None else now) > statement.expires_at:
        raise VerdictRejected("expired", f"verdict expired at {statement.expires_at:.0f}")
    return statement


def load_trusted_keys(path: str | os.PathLike[str]) -> TrustedKeys:
    """Trusted keys from a JSON file {"keys": [{"key_id", "public_key" (base64 raw Ed25519)}]}."""
    try:
        entries = json.loads(Path(path).read_text())["keys"]
        keys = {e["key_id"]: base64.b64decode(e["public_key"], validate=True) for e in entries}
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ValueError(
            f"trusted keys file {path} is unreadable or malformed ({exc}); it must be JSON "
            '{"keys": [{"key_id": ..., "public_key": <base64>}]} as `seal keys` writes it'
        ) from None
    for key_id, key in keys.items():
        if len(key) != _RAW_KEY_BYTES or key_id_of(key) != key_id:
            raise ValueError(f"trusted keys file {path}: key {key_id!r} is not a 32-byte key with that id")
    if not keys:
        raise ValueError(f"trusted keys file {path} lists no keys")
    return TrustedKeys(keys)


def trust_key(path: str | os.PathLike[str], public_key: bytes) -> None:
    """Add `public_key` to the trusted keys file at `path` (created if missing), written atomically."""
    path = Path(path)
    entries = json.loads(path.read_text())["keys"] if path.exists() else []
    key_id = key_id_of(public_key)
    if all(e["key_id"] != key_id for e in entries):
        entries.append({"key_id": key_id, "public_key": base64.b64encode(public_key).decode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"keys": entries}, indent=2) + "\n")
    os.replace(tmp, path)


def _parse_private_key(data: bytes, key_path: Path) -> Ed25519PrivateKey:
    if len(data) == _RAW_KEY_BYTES:
        return Ed25519PrivateKey.from_private_bytes(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise ValueError(
            f"{key_path} is neither a raw 32-byte Ed25519 key nor an unencrypted PEM private key; "
            "move it away to let the auditor create a fresh one"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{key_path} holds a {type(key).__name__}, but verdicts are signed with Ed25519")
    return key


def _create_key_file(key_path: Path) -> None:
    """Write a fresh PEM key at `key_path` without ever exposing it or clobbering a concurrent one.

    The key is written to a 0600 temp file first and then hard-linked into place: the link fails if
    another process created the key meanwhile, and then both processes use that one.
    """
    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = key_path.with_name(f".{key_path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, key_path)
    finally:
        tmp.unlink(missing_ok=True)
