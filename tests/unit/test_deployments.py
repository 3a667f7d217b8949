"""Pure pieces of promotion: the sign-off split, knowledge losses, certificate binding, model names."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.core import split_signoff
from gateway.deployments import certificate_problem, check_alias, check_name, knowledge_losses
from gateway.served import parse_model_name
from seal.deploy_cli import render_deployment
from seal.errors import InvalidArgument, NotFound
from seal.records import (
    QA,
    AdapterRef,
    Alias,
    Certificate,
    Deployment,
    DeploymentVersion,
    Document,
    DocumentAccuracy,
    JobSpec,
    Layer,
    LearnedDocument,
    VersionState,
)
from seal.signing import VerdictSigner, version_fingerprint
from seal.validation import signoff_count, validate_signoff_split

QUESTIONS = tuple(QA(f"Question {i}?", f"answer {i}") for i in range(6))


def test_the_split_moves_a_fixed_share_chosen_by_text_not_position() -> None:
    doc = Document("T", "ctx", QUESTIONS)
    split = split_signoff(doc, 0.3)
    assert len(split.signoff_questions) == 2 and len(split.questions) == 4
    assert set(split.questions) | set(split.signoff_questions) == set(QUESTIONS)
    assert split_signoff(doc, 0.3) == split  # reproducible
    reordered = split_signoff(dataclasses.replace(doc, questions=QUESTIONS[::-1]), 0.3)
    assert set(reordered.signoff_questions) == set(split.signoff_questions)  # by text, not position
    assert split_signoff(doc, 0.0) == doc
    given = dataclasses.replace(doc, signoff_questions=(QA("Mine?", "yes"),))
    assert split_signoff(given, 0.3) == given  # the submitter's own split is kept


@pytest.mark.parametrize(
    "n, fraction, k", [(1, 0.3, 1), (4, 0.3, 1), (5, 0.3, 2), (6, 0.3, 2), (10, 0.5, 5), (9, 0, 0)]
)
def test_signoff_count(n: int, fraction: float, k: int) -> None:
    assert signoff_count(n, fraction) == k


def test_a_document_too_small_to_split_is_refused_naming_it() -> None:
    spec = JobSpec(documents=(Document("A", "a", QUESTIONS[:2]), Document("B", "b", QUESTIONS[:1])))
    with pytest.raises(InvalidArgument) as refused:
        validate_signoff_split(spec, 0.3)
    assert refused.value.field == "documents[1].questions" and "needs at least 2" in str(refused.value)
    validate_signoff_split(spec, 0.0)  # no split, no refusal


def _cert(rows: dict[str, float]) -> Certificate:
    return Certificate(documents=tuple(DocumentAccuracy(job, 0, "d" + job, acc) for job, acc in rows.items()))


def test_knowledge_losses_compare_each_earlier_document_with_the_parent() -> None:
    before = _cert({"j1": 1.0, "j2": 0.5})
    assert knowledge_losses(None, _cert({"j1": 0.0}), 0.25) == []  # the base: nothing learned before
    assert (
        knowledge_losses(before, _cert({"j1": 0.75, "j2": 0.5, "j3": 1.0}), 0.25) == []
    )  # exactly the limit
    assert knowledge_losses(before, _cert({"j1": 0.5, "j2": 0.5}), 0.25) == ["j1/0 1.00 -> 0.50"]
    assert knowledge_losses(before, _cert({"j1": 1.0}), 0.25) == ["j2/0 was not re-checked"]


def _version() -> DeploymentVersion:
    adapter = AdapterRef("a" * 64, "s", "m", "fp", 1, 1.0, 1, 0.1)
    layer = Layer(adapter=adapter, document=LearnedDocument(job_id="j1", doc_index=0, document_sha256="dj1"))
    return DeploymentVersion(
        deployment="faq",
        version=1,
        fingerprint=version_fingerprint("fp", ["a" * 64]),
        base_fingerprint="fp",
        layers=(layer,),
    )


def test_a_certificate_must_name_exactly_the_version_and_its_documents() -> None:
    version = _version()
    good = Certificate(
        deployment="faq",
        version=1,
        fingerprint=version.fingerprint,
        base_fingerprint="fp",
        adapter_sha256s=("a" * 64,),
        documents=(DocumentAccuracy("j1", 0, "dj1", 1.0),),
    )
    assert certificate_problem(version, good) == ""
    for change in (
        {"version": 2},
        {"fingerprint": "0" * 64},
        {"adapter_sha256s": ("b" * 64,)},
        {"documents": (DocumentAccuracy("j1", 0, "other", 1.0),)},
        {"documents": ()},
        {"deployment": "other"},
    ):
        assert certificate_problem(version, dataclasses.replace(good, **change)), change


def test_a_version_fingerprint_depends_on_the_base_and_the_merge_order() -> None:
    a, b = "a" * 64, "b" * 64
    assert version_fingerprint("fp", [a, b]) != version_fingerprint("fp", [b, a])
    assert version_fingerprint("fp", [a]) != version_fingerprint("fp2", [a])
    assert version_fingerprint("fp", []) != "fp"


def test_certificates_are_signed_and_verified_like_verdicts() -> None:
    from seal.signing import TrustedKeys, VerdictRejected

    signer = VerdictSigner.generate()
    signed = signer.sign_certificate(_cert({"j1": 1.0}), ttl_s=60)
    keys = TrustedKeys.of(signer.public_key_bytes())
    assert keys.verify_certificate(signed).documents[0].accuracy == 1.0
    with pytest.raises(VerdictRejected, match="altered"):
        keys.verify_certificate(dataclasses.replace(signed, retention_accuracy=0.5))
    with pytest.raises(VerdictRejected, match="unknown_key"):
        TrustedKeys.of(VerdictSigner.generate().public_key_bytes()).verify_certificate(signed)


@pytest.mark.parametrize(
    "name, parsed",
    [
        ("faq", ("faq", "production", None)),
        ("faq:shadow", ("faq", "shadow", None)),
        ("faq@3", ("faq", "production", 3)),
    ],
)
def test_model_names(name: str, parsed: tuple) -> None:
    assert parse_model_name(name) == parsed


@pytest.mark.parametrize("name", ["faq@x", "faq:staging", "Faq", "", "faq@"])
def test_a_name_that_cannot_be_a_model_is_not_found(name: str) -> None:
    with pytest.raises(NotFound):
        parse_model_name(name)


def test_names_and_aliases_are_checked() -> None:
    assert check_name("faq-2") == "faq-2"
    with pytest.raises(InvalidArgument):
        check_name("../x")
    with pytest.raises(InvalidArgument, match="base model itself"):
        check_name("base")
    with pytest.raises(InvalidArgument, match="production, candidate, shadow"):
        check_alias("live")


def test_the_matrix_shows_each_versions_accuracy_on_every_document_learned() -> None:
    v1 = _version()
    v1 = dataclasses.replace(
        v1,
        state=VersionState.PROMOTED,
        certificate=dataclasses.replace(_cert({"j1": 0.5}), signature="sig", retention_accuracy=0.9),
    )
    deployment = Deployment(
        name="faq",
        base_fingerprint="fp",
        aliases=(Alias("production", 1),),
        versions=(DeploymentVersion(deployment="faq", version=0, state=VersionState.PROMOTED), v1),
    )
    text = render_deployment(deployment)
    row = next(line for line in text.splitlines() if line.strip().startswith("1 "))
    assert "production" in row and "50%" in row and "90%" in row
    layer = v1.layers[0]
    assert f"(adapter {layer.adapter.sha256[:12]}…): applies to every prompt (ungated)" in text
    gated = dataclasses.replace(
        layer, document=dataclasses.replace(layer.document, gate_words=("glass", "velmora"), gate_min_hits=2)
    )
    text = render_deployment(
        dataclasses.replace(
            deployment, versions=(deployment.versions[0], dataclasses.replace(v1, layers=(gated,)))
        )
    )
    assert "applies to prompts naming >= 2 of its document's 2 words" in text
    refused = dataclasses.replace(
        v1, version=2, state=VersionState.REFUSED, refusal_code="failed_guardrail", message="retention:fail"
    )
    text = render_deployment(dataclasses.replace(deployment, versions=(*deployment.versions, refused)))
    row = next(line for line in text.splitlines() if line.strip().startswith("2 "))
    assert row.split()[1] == "refused" and "(f" not in row  # the state, never a truncated code
    assert text.splitlines()[-1] == "version 2 refused: failed_guardrail: retention:fail"


def test_the_auditors_configured_limits_default_to_the_guardrails_constants() -> None:
    from auditor.guardrails import MAX_KL, MAX_RETENTION_DROP
    from seal.config import ServiceConfig

    config = ServiceConfig(kind="auditor")
    assert (config.max_retention_drop, config.max_kl) == (MAX_RETENTION_DROP, MAX_KL)
