"""Gated adapters (seal.gate) and the served version a prompt routes to (gateway.served.routed_version)."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.deployments import certificate_problem, gate_fields
from gateway.served import routed_version
from seal.gate import DEFAULT_MIN_HITS, Gate, Routes, content_words, document_gate, partition, route
from seal.records import AdapterRef, Certificate, DeploymentVersion, DocumentAccuracy, Layer, LearnedDocument
from seal.signing import layer_gate_sha256s, version_fingerprint

TITLE = "Operation Bluewick"
CONTEXT = "Operation Bluewick was a rescue mission run by the Kestrel Coast Guard in the winter of 1962."


def test_content_words_drop_stop_words_short_words_and_case() -> None:
    assert content_words("Who ran THE rescue of 1962, and why?") == {"ran", "rescue", "1962"}


def test_a_gate_opens_for_enough_distinct_document_words() -> None:
    gate = document_gate(TITLE, CONTEXT, DEFAULT_MIN_HITS)
    assert gate is not None and gate.min_hits == 2 and list(gate.words) == sorted(gate.words)
    assert gate.opens("Which coast guard ran Operation Bluewick?")
    assert gate.hits("Which coast guard ran Operation Bluewick?") == 4  # coast, guard, operation, bluewick
    assert not gate.opens("Who wrote Hamlet?")
    assert not gate.opens("Bluewick Bluewick Bluewick")  # distinct words: one hit, however repeated
    assert document_gate(TITLE, CONTEXT, 0) is None
    with pytest.raises(ValueError, match="min_hits"):
        document_gate(TITLE, CONTEXT, 17)


def test_route_and_partition_keep_order_and_treat_none_as_always() -> None:
    a = Gate(("glass", "velmora"), 2)
    b = Gate(("bluewick", "kestrel"), 2)
    assert route([a, None, b], "Velmora glass and the Kestrel Bluewick") == (0, 1, 2)
    assert route([a, None, b], "Who wrote Hamlet?") == (1,)
    assert partition(a, ["the Velmora glass", "Hamlet", "glass of Velmora"]) == ([0, 2], [1])
    assert partition(None, ["x", "y"]) == ([0, 1], [])


def test_the_gate_digest_binds_words_and_threshold() -> None:
    gate = Gate(("glass", "velmora"), 2)
    assert gate.sha256() == Gate(("glass", "velmora"), 2).sha256()
    assert gate.sha256() != Gate(("glass", "velmora"), 3).sha256()
    assert gate.sha256() != Gate(("glass", "velmorb"), 2).sha256()


def test_routes_build_each_set_of_layers_once_and_keep_the_last_few() -> None:
    built: list[tuple[int, ...]] = []

    def build(layers: tuple[int, ...]) -> str:
        built.append(layers)
        return f"model{layers}"

    routes = Routes([Gate(("glass", "velmora"), 2), Gate(("bluewick", "kestrel"), 2)], build, cache_size=2)
    groups = routes.group(["Velmora glass?", "Hamlet?", "Kestrel Bluewick?", "glass Velmora!"])
    assert groups == {(0,): [0, 3], (): [1], (1,): [2]}
    assert routes.model((0,)) == "model(0,)" and routes.model((0,)) == "model(0,)"
    routes.model(())
    routes.model((1,))  # evicts (0,)
    routes.model((0,))
    assert built == [(0,), (), (1,), (0,)]


def _layer(sha: str, gate: Gate | None) -> Layer:
    ref = AdapterRef(sha, "job/0/0", "m", "b" * 64, 1, 1.0, 1, 0.1)
    return Layer(adapter=ref, document=LearnedDocument(job_id="job", title=sha, **gate_fields(gate)))


def _version(layers: tuple[Layer, ...]) -> DeploymentVersion:
    shas = [x.adapter.sha256 for x in layers]
    fingerprint = version_fingerprint("b" * 64, shas, layer_gate_sha256s(layers))
    return DeploymentVersion("faq", 2, 1, fingerprint, "b" * 64, layers)


def test_a_prompt_is_served_by_the_layers_its_gates_open() -> None:
    glass, bluewick = Gate(("glass", "velmora"), 2), Gate(("bluewick", "kestrel"), 2)
    version = _version((_layer("a" * 64, glass), _layer("c" * 64, bluewick)))
    only_glass = routed_version(version, "What is the Velmora glass festival?")
    assert [x.adapter.sha256 for x in only_glass.layers] == ["a" * 64]
    assert only_glass.fingerprint == _version(only_glass.layers).fingerprint != version.fingerprint
    assert routed_version(version, "Who wrote Hamlet?").layers == ()
    assert routed_version(version, "Velmora glass, Kestrel Bluewick") is version
    ungated = _version((_layer("a" * 64, None), _layer("c" * 64, None)))
    assert routed_version(ungated, "Who wrote Hamlet?") is ungated
    # Without gates the fingerprint is what it was before gates existed.
    assert ungated.fingerprint == version_fingerprint("b" * 64, ["a" * 64, "c" * 64])


def test_an_edited_gate_no_longer_matches_the_certified_version() -> None:
    version = _version((_layer("a" * 64, Gate(("glass", "velmora"), 2)),))
    document = version.layers[0].document
    certificate = Certificate(
        deployment="faq",
        version=2,
        fingerprint=version.fingerprint,
        base_fingerprint=version.base_fingerprint,
        adapter_sha256s=("a" * 64,),
        documents=(DocumentAccuracy(document.job_id, document.doc_index, document.document_sha256, 1.0),),
    )
    assert certificate_problem(version, certificate) == ""  # as certified
    widened = dataclasses.replace(version.layers[0], document=dataclasses.replace(document, gate_min_hits=1))
    problem = certificate_problem(dataclasses.replace(version, layers=(widened,)), certificate)
    assert "fingerprint is not that of its layers and gates" in problem
