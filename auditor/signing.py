"""Ed25519 signatures on verdicts, so a reward can be trusted by whoever did not compute it.

The signature covers `Verdict.signing_payload()` (every field but the signature, the key id
included), so changing any score, response or accuracy after signing breaks verification.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from seal.records import Verdict

_RAW_KEY_BYTES = 32


def key_id_of(public_key: bytes) -> str:
    """A short, stable name for a public key: the first 16 hex chars of its sha256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


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
        """The raw 32-byte Ed25519 public key, what `verify_verdict` takes."""
        return self._public_bytes

    @property
    def key_id(self) -> str:
        return key_id_of(self._public_bytes)

    def sign(self, verdict: Verdict) -> Verdict:
        """`verdict` stamped with this key's id and signed over its canonical payload."""
        stamped = dataclasses.replace(verdict, auditor_key_id=self.key_id, signature="")
        signature = self._private_key.sign(stamped.signing_payload())
        return dataclasses.replace(stamped, signature=signature.hex())


def verify_verdict(verdict: Verdict, public_key: bytes) -> bool:
    """Whether `verdict` was signed by `public_key` and not changed since; never raises."""
    if verdict.auditor_key_id != key_id_of(public_key):
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key)
        key.verify(bytes.fromhex(verdict.signature), verdict.signing_payload())
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


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
