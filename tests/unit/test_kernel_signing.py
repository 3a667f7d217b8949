"""Verdict signing: sign/verify round trip, tamper evidence, binding to what was judged, trusted keys, key files."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from seal.records import QuestionScore, Verdict, from_json, to_json
from seal.signing import (
    Expected,
    TrustedKeys,
    VerdictRejected,
    VerdictSigner,
    check_verdict,
    key_id_of,
    load_trusted_keys,
    trust_key,
    verify_verdict,
)
from seal.v1 import types_pb2

NOW = 1_800_000_000.0


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
        self_edit_sha256="11" * 32,
        document_sha256="22" * 32,
        teacher_model="smollm2-135m@abc",
        grading_metric="contains",
    )


def _expected(**overrides) -> Expected:
    values = dict(
        job_id="job-1",
        doc_index=0,
        self_edit_id="edit-1",
        self_edit_sha256="11" * 32,
        document_sha256="22" * 32,
        adapter_sha256="ab" * 32,
        base_fingerprint="cd" * 32,
    )
    return Expected(**{**values, **overrides})


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
    signed = signer.sign(verdict, now=NOW)
    assert verdict.signature == "" and verdict.auditor_key_id == ""
    assert signer.sign(verdict, now=NOW) == signed  # Ed25519 signatures are deterministic
    assert signer.sign(signed, now=NOW) == signed  # re-signing a signed verdict ignores the old signature


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
        lambda v: dataclasses.replace(v, self_edit_sha256="33" * 32),
        lambda v: dataclasses.replace(v, document_sha256="44" * 32),
        lambda v: dataclasses.replace(v, expires_at=v.expires_at + 1e9),
        lambda v: dataclasses.replace(v, teacher_model="someone-else"),
        _replace_response,
    ],
    ids=[
        "reward",
        "adapted_accuracy",
        "baseline_accuracy",
        "passed",
        "adapter",
        "checks",
        "job",
        "self_edit_text",
        "questions",
        "expiry",
        "teacher",
        "response",
    ],
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


def test_statement_is_the_signed_proto_a_verifier_in_any_language_parses(signer: VerdictSigner) -> None:
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    signed = signer.sign(_verdict(), ttl_s=60, now=NOW)
    statement = base64.b64decode(signed.statement)
    # What any verifier does: check the signature over the bytes it received, then parse them.
    Ed25519PublicKey.from_public_bytes(signer.public_key_bytes()).verify(
        bytes.fromhex(signed.signature), statement
    )
    parsed = types_pb2.VerdictStatement.FromString(statement)
    assert (parsed.job_id, parsed.self_edit_id, parsed.adapter_sha256) == ("job-1", "edit-1", "ab" * 32)
    assert (parsed.self_edit_sha256, parsed.document_sha256) == ("11" * 32, "22" * 32)
    assert (parsed.issued_at, parsed.expires_at) == (NOW, NOW + 60)
    assert list(parsed.checks) == ["tau_leak:pass"] and parsed.auditor_key_id == signer.key_id
    assert parsed.SerializeToString(deterministic=True) == statement


def test_check_verdict_accepts_only_what_the_verifier_recorded(signer: VerdictSigner) -> None:
    signed = signer.sign(_verdict(), ttl_s=60, now=NOW)
    keys = TrustedKeys.of(signer.public_key_bytes())
    assert check_verdict(signed, keys, _expected(), now=NOW + 1).reward == 1.0
    cases = {
        "wrong_job": _expected(job_id="job-2"),
        "wrong_self_edit": _expected(self_edit_sha256="99" * 32),
        "wrong_questions": _expected(document_sha256="99" * 32),
        "wrong_adapter": _expected(adapter_sha256="99" * 32),
        "wrong_base": _expected(base_fingerprint="99" * 32),
    }
    for code, expected in cases.items():
        with pytest.raises(VerdictRejected) as info:
            check_verdict(signed, keys, expected, now=NOW + 1)
        assert info.value.code == code
    with pytest.raises(VerdictRejected) as info:
        check_verdict(signed, keys, _expected(), now=NOW + 61)
    assert info.value.code == "expired"


def test_unknown_keys_are_refused_and_rotated_keys_stay_verifiable(tmp_path: Path) -> None:
    old, new, stranger = VerdictSigner.generate(), VerdictSigner.generate(), VerdictSigner.generate()
    trusted = tmp_path / "trusted.json"
    trust_key(trusted, old.public_key_bytes())
    old_verdict = old.sign(_verdict(), now=NOW)
    trust_key(trusted, new.public_key_bytes())  # rotation: the new key joins, the old one stays
    trust_key(trusted, new.public_key_bytes())  # idempotent
    keys = load_trusted_keys(trusted)
    assert sorted(keys.keys) == sorted([old.key_id, new.key_id])
    assert keys.verify(old_verdict).job_id == "job-1"
    assert keys.verify(new.sign(_verdict(), now=NOW)).job_id == "job-1"
    with pytest.raises(VerdictRejected) as info:
        keys.verify(stranger.sign(_verdict(), now=NOW))
    assert info.value.code == "unknown_key"


def test_altered_readable_fields_are_refused_even_with_a_valid_statement(signer: VerdictSigner) -> None:
    signed = signer.sign(_verdict(), now=NOW)
    keys = TrustedKeys.of(signer.public_key_bytes())
    with pytest.raises(VerdictRejected) as info:
        keys.verify(dataclasses.replace(signed, reward=0.9))
    assert info.value.code == "altered"
    # Another verdict's valid statement and signature do not carry over to these fields.
    other = signer.sign(dataclasses.replace(_verdict(), job_id="job-9"), now=NOW)
    with pytest.raises(VerdictRejected):
        keys.verify(dataclasses.replace(signed, statement=other.statement, signature=other.signature))


@pytest.mark.parametrize(
    "content",
    ["not json", "{}", '{"keys": []}', '{"keys": [{"key_id": "x", "public_key": "AAAA"}]}'],
    ids=["text", "no-keys-field", "empty", "bad-key"],
)
def test_malformed_trusted_keys_files_are_refused_with_the_fix(tmp_path: Path, content: str) -> None:
    path = tmp_path / "trusted.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="trusted keys file"):
        load_trusted_keys(path)
