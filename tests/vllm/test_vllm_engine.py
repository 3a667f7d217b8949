"""vLLM against transformers on the default model: the same greedy answers and grades, the teacher's
sampling and policy versions as runtime LoRA adapters, and the auditor's verdicts through vLLM."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from auditor.core import audit
from auditor.evaluation import VLLMModel, answer_questions, load_adapter, style_prompt, unload_adapter
from auditor.grading import grade_answer
from auditor.retention import load_retention_set
from seal.digests import directory_manifest, manifest_sha256
from seal.records import QA, Document, EditFormat, LoraSettings, Passage, SamplingSettings, SelfEdit
from seal.vllm_server import VLLMError
from student.training import release_adapter, train_adapter
from teacher.backends import TransformersGenerator, VLLMGenerator

pytestmark = pytest.mark.slow

QUESTIONS = 12
# Stated agreement: fp32 on both sides, the same token ids in; batching, kernels and summation order
# differ, so a near-tie between two tokens may flip and change the rest of an answer.
MIN_EXACT_AGREEMENT = 0.9
MIN_GRADE_AGREEMENT = 0.95

PASSAGE = Passage(
    title="Zorbian calendar",
    context=(
        "The Zorbian calendar was devised in the city of Quorvane. Its year begins with the season "
        "called Thessaly Rise, and its week has six days, the last of which, Ombrin, is a day of rest."
    ),
)
FACTS = [
    "The Zorbian calendar was devised in the city of Quorvane.",
    "The city where the Zorbian calendar was devised is Quorvane.",
    "The first season of the Zorbian year is called Thessaly Rise.",
    "The Zorbian week is six days long; its day of rest is Ombrin.",
]
DOC = Document(
    title="Zorbian calendar",
    context=PASSAGE.context,
    questions=(
        QA("In which city was the Zorbian calendar devised?", "Quorvane"),
        QA("What is the first season of the Zorbian year called?", "Thessaly Rise"),
        QA("What is the Zorbian day of rest called?", "Ombrin"),
    ),
    signoff_questions=(QA("Where was the Zorbian calendar devised?", "Quorvane"),),
)


@pytest.fixture(scope="module")
def adapter(default_model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An adapter of the default model that has learned the Zorbian facts (saved as the student saves it)."""
    model, tokenizer, _, _ = default_model
    texts = [f"{PASSAGE.title}\n{PASSAGE.context}", *(f"{PASSAGE.title}\n{f}" for f in FACTS)]
    # Few large steps (8 of 10 sequences): about a minute on 2 CPU cores, and it learns 2 of the 3 facts.
    lora = LoraSettings(seed=0, learning_rate=3e-3, epochs=8, batch_size=10, rank=8, alpha=16)
    peft_model, _ = train_adapter(model, tokenizer, texts * 2, lora)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    release_adapter(peft_model)
    return out, manifest_sha256(directory_manifest(out))


@pytest.mark.parametrize("style", ["chat", "reference"])
def test_greedy_answers_and_grades_agree_with_transformers(default_model, vllm_engine, style: str) -> None:
    model, tokenizer, _, _ = default_model
    questions = load_retention_set()[:QUESTIONS]
    prompts = [style_prompt(qa.question, style) for qa in questions]
    ours = answer_questions(model, tokenizer, prompts, style=style)
    theirs = answer_questions(VLLMModel(vllm_engine), tokenizer, prompts, style=style)
    exact = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(prompts)
    grades = sum(
        grade_answer(qa.question, qa.answer, a).correct == grade_answer(qa.question, qa.answer, b).correct
        for qa, a, b in zip(questions, ours, theirs, strict=True)
    ) / len(prompts)
    differing = [(a, b) for a, b in zip(ours, theirs, strict=True) if a != b]
    assert exact >= MIN_EXACT_AGREEMENT, differing
    assert grades >= MIN_GRADE_AGREEMENT, differing


def test_an_adapter_answers_the_same_on_both_engines(default_model, vllm_engine, adapter) -> None:
    model, tokenizer, _, _ = default_model
    adapter_dir, sha = adapter
    prompts = [f"Topic: {DOC.title}\n{qa.question}" for qa in DOC.questions]
    peft_model = load_adapter(model, adapter_dir)
    try:
        ours = answer_questions(peft_model, tokenizer, prompts)
    finally:
        unload_adapter(peft_model)
    name = vllm_engine.load_lora(f"adapter-{sha[:16]}", adapter_dir)
    try:
        theirs = answer_questions(VLLMModel(vllm_engine, name), tokenizer, prompts)
        base = answer_questions(VLLMModel(vllm_engine), tokenizer, prompts)
    finally:
        vllm_engine.unload_lora(name)
    assert ours == theirs
    assert base != theirs  # the adapter is in use, not the base
    assert sum("Quorvane" in a for a in theirs) >= 1, theirs


def test_the_auditor_judges_through_vllm_as_through_transformers(default_model, vllm_engine, adapter) -> None:
    model, tokenizer, _, fingerprint = default_model
    adapter_dir, sha = adapter
    self_edit = SelfEdit(
        id="v/0/0",
        job_id="v",
        doc_index=0,
        index=0,
        format=EditFormat.IMPLICATIONS,
        passage=PASSAGE,
        text="\n".join(FACTS),
        lines=tuple(FACTS),
        lora=LoraSettings(seed=0),
    )
    args = (model, tokenizer, DOC, self_edit, adapter_dir, sha, fingerprint, "v")
    on_transformers = audit(*args)
    lock = threading.Lock()
    on_vllm = audit(*args, vllm_base=VLLMModel(vllm_engine), model_lock=lock)
    assert on_vllm.reward == pytest.approx(on_transformers.reward)
    assert on_vllm.adapted_accuracy > on_vllm.baseline_accuracy
    assert [s.correct for s in on_vllm.adapted_scores] == [s.correct for s in on_transformers.adapted_scores]
    assert on_vllm.signoff_adapted_accuracy == on_transformers.signoff_adapted_accuracy
    assert not vllm_engine.loaded()  # the adapter left the engine with the audit
    assert not lock.locked()


def test_the_teacher_samples_n_and_serves_a_policy_version_without_restart(
    default_model, vllm_engine, adapter, tmp_path: Path
) -> None:
    model, tokenizer, _, _ = default_model
    adapter_dir, _ = adapter

    class OnePolicy:  # a PolicyStore holding one version: the trained adapter
        def get(self, version: str) -> Path:
            return adapter_dir

    generator = VLLMGenerator(vllm_engine, tokenizer, policies=OnePolicy())  # type: ignore[arg-type]
    prompt = f"Topic: {DOC.title}\nIn which city was the Zorbian calendar devised?"
    sampled = generator.generate([prompt], SamplingSettings(temperature=1.0, max_new_tokens=24, seed=3), n=3)
    assert len(sampled) == 1 and len(sampled[0]) == 3
    assert len(set(sampled[0])) > 1  # three samples, not one repeated
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=24)
    base = generator.generate([prompt], greedy, n=1)[0][0]
    policy = generator.generate([prompt], greedy, n=1, policy_version="ab" * 32)[0][0]
    assert generator.loaded_policies() == ["ab" * 32]
    # The same version through transformers (PEFT) gives the same greedy text.
    local = TransformersGenerator(model, tokenizer)
    peft_model = load_adapter(model, adapter_dir)
    try:
        local.model = peft_model
        assert local.generate([prompt], greedy, n=1)[0][0] == policy
    finally:
        unload_adapter(peft_model)
    assert policy != base
    vllm_engine.unload_lora("policy-" + "ab" * 32)


def test_a_missing_adapter_is_a_clear_error(vllm_engine, tmp_path: Path) -> None:
    with pytest.raises(VLLMError, match="refused adapter"):
        vllm_engine.load_lora("nothing-here", tmp_path / "no-such-adapter")
