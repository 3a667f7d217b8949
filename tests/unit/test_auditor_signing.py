"""Verdict signing: sign/verify round trip, tamper evidence, key files."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from auditor.signing import VerdictSigner, key_id_of, verify_verdict
from seal.records import QuestionScore, Verdict, from_json, to_json


def _verdict() -> Verdict:
    base = QuestionScore("Where?", "Velmora", "I do not know", False, 0.0, False, False)
    adapted = QuestionScore("Where?", "Velmora", "In Velmora", False, 2 / 3, True, True)
    return Verdict(
        job_id="job-1",
        doc_index=0,
        self_edit_id="edit-1",
        adapter_sha256="ab" * 32,
        base_fingerprint="cd" * 32,
        baseline_accuracy=0.0,
        adapted_accuracy=1.0,
        reward=1.0,
        baseline_scores=(base,),
        adapted_scores=(adapted,),
        eval_seconds=1.5,
        passed=True,
        checks=("tau_leak:pass",),
    )


@pytest.fixture(scope="module")
def signer() -> VerdictSigner:
    return VerdictSigner.generate()


def test_sign_then_verify(signer: VerdictSigner) -> None:
    signed = signer.sign(_verdict())
    assert signed.auditor_key_id == signer.key_id
    assert len(bytes.fromhex(signed.signature)) == 64
    assert verify_verdict(signed, signer.public_key_bytes())
    # Survives the JSON round trip the work plane puts it through.
    assert verify_verdict(from_json(Verdict, to_json(signed)), signer.public_key_bytes())


def test_sign_leaves_the_input_alone_and_is_deterministic(signer: VerdictSigner) -> None:
    verdict = _verdict()
    signed = signer.sign(verdict)
    assert verdict.signature == "" and verdict.auditor_key_id == ""
    assert signer.sign(verdict) == signed  # Ed25519 signatures are deterministic
    assert signer.sign(signed) == signed  # re-signing a signed verdict ignores the old signature


def _replace_response(v: Verdict) -> Verdict:
    tampered = dataclasses.replace(v.adapted_scores[0], response="Velmora, obviously")
    return dataclasses.replace(v, adapted_scores=(tampered,))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda v: dataclasses.replace(v, reward=0.5),
        lambda v: dataclasses.replace(v, adapted_accuracy=0.5),
        lambda v: dataclasses.replace(v, baseline_accuracy=-0.0001),
        lambda v: dataclasses.replace(v, passed=False),
        lambda v: dataclasses.replace(v, adapter_sha256="00" * 32),
        lambda v: dataclasses.replace(v, checks=()),
        lambda v: dataclasses.replace(v, job_id="job-2"),
        _replace_response,
    ],
    ids=["reward", "adapted_accuracy", "baseline_accuracy", "passed", "adapter", "checks", "job", "response"],
)
def test_any_tampered_field_fails_verification(signer: VerdictSigner, tamper) -> None:
    signed = signer.sign(_verdict())
    assert not verify_verdict(tamper(signed), signer.public_key_bytes())


@pytest.mark.parametrize(
    "signature",
    ["", "zz", "00" * 64, "ab" * 63, "not hex at all"],
    ids=["empty", "bad-hex", "zeros", "short", "text"],
)
def test_malformed_signatures_fail_without_raising(signer: VerdictSigner, signature: str) -> None:
    signed = dataclasses.replace(signer.sign(_verdict()), signature=signature)
    assert not verify_verdict(signed, signer.public_key_bytes())


def test_wrong_key_fails(signer: VerdictSigner) -> None:
    other = VerdictSigner.generate()
    signed = signer.sign(_verdict())
    assert not verify_verdict(signed, other.public_key_bytes())
    # Relabelling the key id does not help: the id is inside the signed payload.
    relabelled = dataclasses.replace(signed, auditor_key_id=other.key_id)
    assert not verify_verdict(relabelled, other.public_key_bytes())
    assert not verify_verdict(signed, b"short key")


def test_key_file_is_created_private_and_reloads_the_same_key(tmp_path: Path) -> None:
    key_path = tmp_path / "keys" / "auditor.key"
    first = VerdictSigner.load_or_create(key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert list(key_path.parent.iterdir()) == [key_path]  # no temp file left behind
    second = VerdictSigner.load_or_create(key_path)
    assert second.key_id == first.key_id
    assert second.public_key_bytes() == first.public_key_bytes()
    assert verify_verdict(first.sign(_verdict()), second.public_key_bytes())


def test_key_id_is_a_prefix_of_the_public_key_sha256(signer: VerdictSigner) -> None:
    import hashlib

    assert len(signer.public_key_bytes()) == 32
    assert signer.key_id == key_id_of(signer.public_key_bytes())
    assert signer.key_id == hashlib.sha256(signer.public_key_bytes()).hexdigest()[:16]


def test_loads_raw_and_pem_private_keys(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raw = tmp_path / "raw.key"
    raw.write_bytes(
        key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
    )
    pem = tmp_path / "pem.key"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert VerdictSigner.load_or_create(raw).public_key_bytes() == public
    assert VerdictSigner.load_or_create(pem).public_key_bytes() == public


def test_rejects_key_files_that_are_not_ed25519(tmp_path: Path) -> None:
    ec = tmp_path / "ec.key"
    ec.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ValueError, match="Ed25519"):
        VerdictSigner.load_or_create(ec)
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key")
    with pytest.raises(ValueError, match="neither"):
        VerdictSigner.load_or_create(junk)
