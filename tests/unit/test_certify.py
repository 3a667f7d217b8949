"""Certifying a version whose layers sit behind gates (auditor.certify), on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from auditor.certify import RetentionProbe, certify, routed_scores
from auditor.core import base_retention
from auditor.evaluation import question_prompt
from seal.gate import Gate, Routes
from seal.models import merge_adapters
from seal.records import QA, Document, LearnedDocument, LoraSettings


@pytest.fixture()
def forgetful(tiny_model, tmp_path: Path) -> Path:
    """An adapter of repetitive nonsense at a high rate: it moves every distribution of the tiny model."""
    from student.training import train_adapter

    model, tokenizer = tiny_model
    peft_model, _ = train_adapter(
        model,
        tokenizer,
        ["zq zq zq zq zq zq zq zq zq zq zq zq"] * 4,
        LoraSettings(rank=8, epochs=10, learning_rate=1e-2, schedule="constant"),
    )
    peft_model.save_pretrained(str(tmp_path / "forgetful"))
    peft_model.unload()
    return tmp_path / "forgetful"


DOC = LearnedDocument(
    job_id="job",
    title="Zorbia",
    document_sha256="d" * 64,
    signoff_questions=(QA("Where does the Zorbian council meet?", "Velmora"), QA("Who wrote Hamlet?", "x")),
)


def _certify(model, tokenizer, adapter: Path, gates, retention):  # noqa: ANN001, ANN202
    return certify(
        model,
        tokenizer,
        "faq",
        1,
        "f" * 64,
        "b" * 64,
        [adapter],
        ["a" * 64],
        [DOC],
        retention=RetentionProbe(retention),
        gates=gates,
    )


def test_a_gated_version_is_the_base_wherever_its_gate_stays_closed(tiny_model, forgetful) -> None:
    model, tokenizer = tiny_model
    retention = base_retention(model, tokenizer, questions=16)
    ungated = _certify(model, tokenizer, forgetful, [None], retention)
    assert ungated.kl_shift > 1e-3  # the adapter moves the model wherever it applies

    # A gate no prompt here opens: every answer is the base's, retention kept exactly, no KL at all.
    never = _certify(model, tokenizer, forgetful, [Gate(("quux", "wibble"), 2)], retention)
    assert never.kl_shift == 0.0 and never.retention_accuracy == retention.baseline
    assert "retention:pass" in never.checks and "kl_shift:pass" in never.checks

    # Opening on the document's own questions only: they are the adapter's answers, the rest the base's.
    council = Gate(("council", "zorbia", "zorbian"), 2)
    gated = _certify(model, tokenizer, forgetful, [council], retention)
    assert gated.kl_shift == 0.0 and gated.retention_accuracy == retention.baseline


def test_each_question_is_answered_by_the_layers_its_gate_opens(tiny_model, forgetful) -> None:
    model, tokenizer = tiny_model
    doc = Document(title=DOC.title, questions=DOC.signoff_questions)
    merged = merge_adapters(model, [forgetful])

    def build(layers: tuple[int, ...]):  # noqa: ANN202
        return merged if layers else model

    council = Routes([Gate(("council", "zorbia", "zorbian"), 2)], build)
    assert council.group([question_prompt(doc.title, qa.question) for qa in doc.questions]) == {
        (0,): [0],
        (): [1],
    }
    routed = [s.response for s in routed_scores(council, tokenizer, doc, "contains", "chat")]
    adapted = [s.response for s in routed_scores(Routes([None], build), tokenizer, doc, "contains", "chat")]
    base = [
        s.response
        for s in routed_scores(Routes([Gate(("quux",), 1)], build), tokenizer, doc, "contains", "chat")
    ]
    assert adapted != base  # the adapter changes both answers ...
    assert routed == [adapted[0], base[1]]  # ... but only the council question goes through it


def test_certify_refuses_gates_that_do_not_match_the_layers(tiny_model, forgetful) -> None:
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="2 gates for 1 layers"):
        certify(
            model, tokenizer, "faq", 1, "f" * 64, "b" * 64, [forgetful], ["a" * 64], [DOC], gates=[None, None]
        )
