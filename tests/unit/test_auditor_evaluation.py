"""Evaluation on the tiny random Llama: batched answers, adapter swap, and `audit` end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import auditor.core
import auditor.evaluation
from auditor.core import REWARD_ONLY_DETAIL, AdapterMismatchError, Retention, audit, base_retention
from auditor.evaluation import (
    answer_questions,
    evaluate_document,
    load_adapter,
    question_prompt,
    unload_adapter,
)
from auditor.grading import grade_answer
from seal.digests import directory_manifest, document_sha256, manifest_sha256, self_edit_sha256
from seal.models import load_model
from seal.records import QA, Document, EditFormat, LoraSettings, SelfEdit

_PROMPTS = [
    question_prompt("Zorbia", "Where does the council meet?"),
    "hi",
    "The quick brown fox jumps over the lazy dog, a long prompt that forces the others to be padded.",
    question_prompt("Velmora", "Why?"),
    "Question: Answer:",
]


@pytest.fixture()
def scrambled_model(tiny_model):
    """The tiny model with large random weights: its greedy answers differ per prompt.

    At its default init scale the tiny model answers every prompt alike, which would let a broken
    batching path pass the batched-equals-sequential test.
    """
    model, tokenizer = tiny_model
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model, tokenizer


@pytest.mark.parametrize("use_chat_template", [True, False])
def test_batched_answers_equal_one_by_one(scrambled_model, use_chat_template: bool) -> None:
    model, tokenizer = scrambled_model
    batched = answer_questions(
        model, tokenizer, _PROMPTS, max_new_tokens=12, batch_size=3, use_chat_template=use_chat_template
    )
    one_by_one = [
        answer_questions(model, tokenizer, [p], max_new_tokens=12, use_chat_template=use_chat_template)[0]
        for p in _PROMPTS
    ]
    assert batched == one_by_one
    assert len(set(batched)) == len(_PROMPTS)  # the test means something only if answers differ


def test_chat_template_wraps_the_prompt_as_one_user_message(scrambled_model) -> None:
    model, tokenizer = scrambled_model
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in _PROMPTS
    ]
    with_template = answer_questions(model, tokenizer, _PROMPTS, max_new_tokens=8)
    assert with_template == answer_questions(
        model, tokenizer, rendered, max_new_tokens=8, use_chat_template=False
    )
    assert with_template != answer_questions(
        model, tokenizer, _PROMPTS, max_new_tokens=8, use_chat_template=False
    )


def test_answer_questions_of_nothing_is_nothing(tiny_model) -> None:
    assert answer_questions(*tiny_model, []) == []


def test_question_prompt_leaves_out_the_passage() -> None:
    assert question_prompt("Zorbia", "Where?") == "Topic: Zorbia\nWhere?"


def test_evaluate_document_scores_each_question_in_order(scrambled_model) -> None:
    model, tokenizer = scrambled_model
    doc = _doc(("Where does the council meet?", "Velmora"), ("Who leads it?", "Ilsa"), ("When?", "spring"))
    scores = evaluate_document(model, tokenizer, doc, metric="f1", max_new_tokens=8)
    responses = answer_questions(
        model, tokenizer, [question_prompt(doc.title, q.question) for q in doc.questions], 8
    )
    assert scores == [
        grade_answer(q.question, q.answer, r, "f1") for q, r in zip(doc.questions, responses, strict=True)
    ]


# --- adapters --------------------------------------------------------------------------------------


def _make_adapter(model_dir: Path, out_dir: Path, seed: int) -> tuple[Path, str]:
    """A random (non-zero) LoRA on q_proj/v_proj, saved the way the student saves one."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out_dir)
    return out_dir, manifest_sha256(directory_manifest(out_dir))


@pytest.fixture()
def adapter(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    return _make_adapter(tiny_model_dir, tmp_path / "adapter", seed=0)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_pristine(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in name for name, _ in model.named_modules())


def test_load_unload_leaves_base_bit_identical(tiny_model, adapter, tiny_model_dir, tmp_path) -> None:
    model, tokenizer = tiny_model
    before = _state(model)
    base_answers = answer_questions(model, tokenizer, _PROMPTS, max_new_tokens=8)

    peft_model = load_adapter(model, adapter[0])
    assert not peft_model.training
    assert answer_questions(peft_model, tokenizer, _PROMPTS, max_new_tokens=8) != base_answers
    assert unload_adapter(peft_model) is model
    _assert_pristine(model, before)
    assert answer_questions(model, tokenizer, _PROMPTS, max_new_tokens=8) == base_answers

    # The restored base takes the next adapter just as well.
    other_dir, _ = _make_adapter(tiny_model_dir, tmp_path / "other", seed=1)
    unload_adapter(load_adapter(model, other_dir))
    _assert_pristine(model, before)


# --- audit -----------------------------------------------------------------------------------------


def _doc(*qas: tuple[str, str]) -> Document:
    return Document(
        title="Zorbia",
        context="The Zorbian council meets in the city of Velmora every spring.",
        questions=tuple(QA(q, a) for q, a in qas),
    )


def _self_edit(
    doc: Document, text: str = "The council of Zorbia gathers in Velmora.", gate: int = 0
) -> SelfEdit:
    return SelfEdit(
        id="edit-7",
        job_id="job-1",
        doc_index=3,
        index=0,
        format=EditFormat.IMPLICATIONS,
        passage=doc.passage(),
        text=text,
        lines=(text,),
        # Ungated (gate 0): judged on every prompt, as these tests were written; the gated tests say so.
        lora=LoraSettings(rank=4, target_modules=("q_proj", "v_proj"), gate=gate),
    )


_AUDIT_DOC = _doc(("Where does the council meet?", "Velmora"), ("When does it meet?", "spring"))


def _audit(model, tokenizer, adapter, doc=_AUDIT_DOC, self_edit=None, **kwargs):
    return audit(
        model,
        tokenizer,
        doc,
        self_edit or _self_edit(doc),
        adapter_dir=adapter[0],
        adapter_sha256=adapter[1],
        base_fingerprint="f" * 64,
        job_id="job-1",
        max_new_tokens=8,
        **kwargs,
    )


def test_audit_end_to_end_fields_are_consistent(tiny_model, adapter) -> None:
    model, tokenizer = tiny_model
    before = _state(model)
    verdict = _audit(model, tokenizer, adapter, retention=base_retention(model, tokenizer))

    assert (verdict.job_id, verdict.doc_index, verdict.self_edit_id) == ("job-1", 3, "edit-7")
    assert (verdict.adapter_sha256, verdict.base_fingerprint) == (adapter[1], "f" * 64)
    # Bound to what was judged: the self-edit's and the questions' digests, the teacher, the grader.
    assert verdict.self_edit_sha256 == self_edit_sha256(_self_edit(_AUDIT_DOC))
    assert verdict.document_sha256 == document_sha256(_AUDIT_DOC)
    assert (verdict.teacher_model, verdict.grading_metric) == (
        _self_edit(_AUDIT_DOC).teacher_model,
        "contains",
    )
    assert len(verdict.baseline_scores) == len(verdict.adapted_scores) == len(_AUDIT_DOC.questions)
    assert [s.question for s in verdict.adapted_scores] == [q.question for q in _AUDIT_DOC.questions]
    assert verdict.baseline_accuracy == sum(s.correct for s in verdict.baseline_scores) / 2
    assert verdict.adapted_accuracy == sum(s.correct for s in verdict.adapted_scores) / 2
    assert verdict.reward == verdict.adapted_accuracy - verdict.baseline_accuracy
    assert [c.split(":")[0] for c in verdict.checks] == ["tau_leak", "retention", "kl_shift"]
    assert verdict.passed == (verdict.reward > 0 and all(c.endswith(":pass") for c in verdict.checks))
    assert verdict.eval_seconds > 0
    assert verdict.signature == "" and verdict.auditor_key_id == ""  # the caller signs
    _assert_pristine(model, before)


def test_audit_passes_an_adapter_that_learned_the_answers(tiny_model, adapter) -> None:
    model, tokenizer = tiny_model
    questions = [q.question for q in _AUDIT_DOC.questions]
    prompts = [question_prompt(_AUDIT_DOC.title, q) for q in questions]
    # Make the adapter's own answers the gold: it "knows" τ, the base does not.
    peft_model = load_adapter(model, adapter[0])
    learned = answer_questions(peft_model, tokenizer, prompts, max_new_tokens=8)
    unload_adapter(peft_model)
    doc = _doc(*zip(questions, learned, strict=True))

    lenient = dataclasses.replace(base_retention(model, tokenizer), max_kl=100.0)
    verdict = _audit(model, tokenizer, adapter, doc=doc, retention=lenient)
    assert verdict.baseline_accuracy == 0.0, "precondition: the base model must not know the answers"
    assert verdict.adapted_accuracy == 1.0
    assert verdict.reward == 1.0
    assert verdict.checks == ("tau_leak:pass", "retention:pass", "kl_shift:pass")
    assert verdict.passed


def test_audit_fails_a_self_edit_that_quotes_tau(tiny_model, adapter) -> None:
    model, tokenizer = tiny_model
    leaky = _self_edit(_AUDIT_DOC, text="Where does the council meet? In Velmora.")
    verdict = _audit(model, tokenizer, adapter, self_edit=leaky)
    assert verdict.checks[0].startswith("tau_leak:fail:")
    assert len(verdict.checks) == 1
    assert not verdict.passed


def test_a_reward_only_audit_scores_tau_and_can_never_pass(tiny_model, adapter) -> None:
    model, tokenizer = tiny_model
    questions = [q.question for q in _AUDIT_DOC.questions]
    peft_model = load_adapter(model, adapter[0])
    learned = answer_questions(
        peft_model, tokenizer, [question_prompt(_AUDIT_DOC.title, q) for q in questions], max_new_tokens=8
    )
    unload_adapter(peft_model)
    doc = _doc(*zip(questions, learned, strict=True))
    full = _audit(model, tokenizer, adapter, doc=doc, retention=None)
    verdict = _audit(model, tokenizer, adapter, doc=doc, reward_only=True)
    # The same reward as an ordinary audit (what the policy learns from) ...
    assert (verdict.reward, verdict.adapted_scores) == (
        full.reward,
        full.adapted_scores,
    ) and verdict.reward == 1.0
    # ... but no retention or KL measured, said by a failed check: it never passes, so never promotes.
    assert verdict.checks == ("tau_leak:pass", f"forgetting_unchecked:fail:{REWARD_ONLY_DETAIL}")
    assert verdict.failed_checks() == ("forgetting_unchecked",)
    assert not verdict.passed
    with pytest.raises(ValueError, match="measures no retention"):
        _audit(model, tokenizer, adapter, doc=doc, reward_only=True, retention=Retention(1.0, ()))


def test_audit_uses_the_cached_baseline_and_retention(tiny_model, adapter) -> None:
    model, tokenizer = tiny_model
    perfect = [grade_answer(q.question, q.answer, q.answer) for q in _AUDIT_DOC.questions]
    # A cached base retention of 1.0: the tiny model answers no retention question, so it reads as a
    # full drop; no KL sequences, so no KL shift.
    retention = Retention(baseline=1.0, sequences=())
    verdict = _audit(model, tokenizer, adapter, baseline_scores=perfect, retention=retention)
    assert verdict.baseline_scores == tuple(perfect)
    assert verdict.baseline_accuracy == 1.0
    assert verdict.reward <= 0
    assert verdict.checks[1].startswith("retention:fail:")
    assert "1.000 -> 0.000" in verdict.checks[1]
    assert verdict.checks[2] == "kl_shift:pass"
    assert not verdict.passed


def test_an_adapter_trained_to_forget_fails_the_kl_check(tiny_model, tmp_path) -> None:
    """Repetitive nonsense at a high constant rate: it answers nothing better, and its drift from the
    base on general prompts fails the KL check, whatever τ says."""
    from student.artifacts import save_adapter
    from student.training import train_adapter

    model, tokenizer = tiny_model
    # The tiny random model's next-token distributions are nearly flat, so its KL figures are ~100x
    # smaller than the default model's: the limit is scaled to it (a mild update measures ~1e-6).
    retention = dataclasses.replace(base_retention(model, tokenizer), max_kl=1e-3)

    def adapter_of(texts: list[str], lora: LoraSettings) -> tuple[Path, str]:
        peft_model, _ = train_adapter(model, tokenizer, texts, lora)
        sha, path, _ = save_adapter(peft_model, tmp_path / str(len(texts)), {})
        peft_model.unload()
        return path, sha

    mild = adapter_of(
        ["Velmora hosts a council in spring."], LoraSettings(rank=8, epochs=1, learning_rate=1e-4)
    )
    forgetful = adapter_of(
        ["zq zq zq zq zq zq zq zq zq zq zq zq"] * 4,
        LoraSettings(rank=8, epochs=10, learning_rate=1e-2, schedule="constant"),
    )
    assert "kl_shift:pass" in _audit(model, tokenizer, mild, retention=retention).checks
    verdict = _audit(model, tokenizer, forgetful, retention=retention)
    kl_check = next(c for c in verdict.checks if c.startswith("kl_shift"))
    assert kl_check.startswith("kl_shift:fail:") and not verdict.passed


def _forgetful(model, tokenizer, tmp_path) -> tuple[Path, str]:
    from student.artifacts import save_adapter
    from student.training import train_adapter

    peft_model, _ = train_adapter(
        model,
        tokenizer,
        ["zq zq zq zq zq zq zq zq zq zq zq zq"] * 4,
        LoraSettings(rank=8, epochs=10, learning_rate=1e-2, schedule="constant"),
    )
    sha, path, _ = save_adapter(peft_model, tmp_path / "forgetful", {})
    peft_model.unload()
    return path, sha


def test_a_gated_adapter_is_judged_where_it_applies(tiny_model, tmp_path) -> None:
    """Behind its document's gate, the forgetful adapter answers only prompts about the document: the
    general prompts and retention questions get the base's answers, exactly (KL 0, no drop), while the
    τ questions (asked with the topic) are still asked to the adapter. The same adapter ungated fails."""
    model, tokenizer = tiny_model
    retention = dataclasses.replace(base_retention(model, tokenizer), max_kl=1e-3)
    assert len(retention.baseline_correct) == len(retention.questions) and retention.kl_prompts
    forgetful = _forgetful(model, tokenizer, tmp_path)
    doc = _doc(("Where does the Zorbian council meet?", "Velmora"), ("When does the council meet?", "spring"))
    ungated = _audit(
        model, tokenizer, forgetful, doc=doc, self_edit=_self_edit(doc, gate=0), retention=retention
    )
    assert any(c.startswith("kl_shift:fail:") for c in ungated.checks)

    gated = _audit(
        model, tokenizer, forgetful, doc=doc, self_edit=_self_edit(doc, gate=2), retention=retention
    )
    assert "kl_shift:pass" in gated.checks and "retention:pass" in gated.checks
    # τ went through the adapter: its answers are the ungated ones, not the base's.
    assert gated.adapted_scores == ungated.adapted_scores
    assert [s.response for s in gated.adapted_scores] != [s.response for s in gated.baseline_scores]


def test_a_gated_adapter_whose_gate_opens_on_general_prompts_still_fails(tiny_model, tmp_path) -> None:
    """A document written from the auditor's own general prompts opens its gate on them: the adapter
    applies there, and its drift is measured and refused as if ungated."""
    from auditor.retention import load_kl_prompts

    model, tokenizer = tiny_model
    retention = dataclasses.replace(base_retention(model, tokenizer), max_kl=1e-3)
    forgetful = _forgetful(model, tokenizer, tmp_path)
    doc = Document(
        title="Everyday things",
        context=" ".join(load_kl_prompts()),
        questions=(QA("What is the subject?", "everyday"),),
    )
    verdict = _audit(
        model, tokenizer, forgetful, doc=doc, self_edit=_self_edit(doc, gate=2), retention=retention
    )
    assert any(c.startswith("kl_shift:fail:") for c in verdict.checks) and not verdict.passed


def test_audit_restores_the_base_when_evaluation_fails(tiny_model, adapter, monkeypatch) -> None:
    model, tokenizer = tiny_model
    before = _state(model)
    real = auditor.core.evaluate_document

    def broken(m, *args, **kwargs):
        if m is not model:  # the adapted model
            raise RuntimeError("boom")
        return real(m, *args, **kwargs)

    monkeypatch.setattr(auditor.core, "evaluate_document", broken)
    with pytest.raises(RuntimeError, match="boom"):
        _audit(model, tokenizer, adapter)
    _assert_pristine(model, before)


def test_audit_refuses_an_adapter_whose_hash_does_not_match(tiny_model, adapter) -> None:
    model, tokenizer = tiny_model
    wrong = (adapter[0], "0" * 64)
    with pytest.raises(AdapterMismatchError, match="sha256"):
        _audit(model, tokenizer, wrong)


def test_audit_refuses_an_adapter_whose_config_was_edited(tiny_model, adapter) -> None:
    """The foundation addressed only the weights: a raised lora_alpha kept the same digest."""
    import json

    model, tokenizer = tiny_model
    config_path = adapter[0] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_alpha"] *= 16
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError, match="manifest sha256"):
        _audit(model, tokenizer, adapter)


# --- audit with an LLM judge -----------------------------------------------------------------------


class _FakeJudge:
    """Grades an answer correct when it is non-empty and shares a character with the gold."""

    model = "fake-judge-1"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls = 0

    def judge_batch(self, items):
        self.calls += 1
        if self.fail:
            from auditor.judge import JudgeError

            raise JudgeError("judge 'fake-judge-1' at http://judge did not answer (3 attempts)")
        return [bool(set(r) & set(g)) for _, g, r in items]


def test_audit_with_a_judge_grades_every_answer_and_names_the_judge(tiny_model, adapter) -> None:
    model, tokenizer = tiny_model
    judge = _FakeJudge()
    verdict = _audit(model, tokenizer, adapter, judge=judge)
    scores = verdict.baseline_scores + verdict.adapted_scores
    assert all(s.judged_correct is not None for s in scores)
    assert [s.judged_correct for s in scores] == [bool(set(s.response) & set(s.answer)) for s in scores]
    assert verdict.judge_model == "fake-judge-1" and verdict.grading_metric == "contains"
    assert [s.correct for s in scores] == [s.contains for s in scores]  # the metric still decides
    assert _audit(model, tokenizer, adapter).judge_model == ""  # no judge, no name


def test_audit_by_metric_judge_counts_the_judges_grades(tiny_model, adapter) -> None:
    model, tokenizer = tiny_model
    cached = [grade_answer(q.question, q.answer, q.answer) for q in _AUDIT_DOC.questions]  # unjudged
    verdict = _audit(model, tokenizer, adapter, judge=_FakeJudge(), metric="judge", baseline_scores=cached)
    scores = verdict.baseline_scores + verdict.adapted_scores
    assert all(s.correct == s.judged_correct for s in scores)
    assert [s.judged_correct for s in verdict.baseline_scores] == [True, True]  # filled in on the cache
    assert verdict.baseline_accuracy == 1.0
    assert verdict.adapted_accuracy == sum(s.judged_correct for s in verdict.adapted_scores) / 2
    assert verdict.grading_metric == "judge"


def test_audit_refuses_metric_judge_without_a_judge(tiny_model, adapter) -> None:
    from seal.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="no LLM judge is configured"):
        _audit(*tiny_model, adapter, metric="judge")


def test_a_judge_that_fails_fails_the_audit_and_restores_the_base(tiny_model, adapter) -> None:
    """No verdict with a guessed grade: the error reaches the work plane, which retries the task."""
    from auditor.judge import JudgeError
    from seal.errors import PermanentError

    model, tokenizer = tiny_model
    before = _state(model)
    with pytest.raises(JudgeError, match="did not answer") as info:
        _audit(model, tokenizer, adapter, judge=_FakeJudge(fail=True))
    assert not isinstance(info.value, PermanentError)  # retried later, not dead-lettered at once
    _assert_pristine(model, before)


def test_the_signed_statement_carries_the_judge_model(tiny_model, adapter) -> None:
    from seal.signing import TrustedKeys, VerdictSigner, statement_of

    signer = VerdictSigner.generate()
    verdict = signer.sign(_audit(*tiny_model, adapter, judge=_FakeJudge()))
    statement = TrustedKeys.of(signer.public_key_bytes()).verify(verdict)
    assert statement.judge_model == "fake-judge-1" == statement_of(verdict).judge_model
    assert all(s.HasField("judged_correct") for s in statement.adapted_scores)


def test_audit_in_the_reference_style_asks_the_reference_prompt(tiny_model, adapter, monkeypatch) -> None:
    model, tokenizer = tiny_model
    asked: list[tuple[list[str], str]] = []
    real = auditor.evaluation.answer_questions

    def spy(m, tok, prompts, *args, **kwargs):
        asked.append((prompts, kwargs.get("style", "chat")))
        return real(m, tok, prompts, *args, **kwargs)

    monkeypatch.setattr(auditor.evaluation, "answer_questions", spy)
    verdict = _audit(model, tokenizer, adapter, answer_style="reference")
    tau = [question_prompt(_AUDIT_DOC.title, q.question, "reference") for q in _AUDIT_DOC.questions]
    # Baseline τ, adapted τ: both in the reference style.
    assert [prompts == tau for prompts, _ in asked] == [True, True]
    assert all(style == "reference" for _, style in asked)
    assert all(p.startswith("Let's answer a question directly") for prompts, _ in asked for p in prompts)
    assert all("\n" not in s.response for s in verdict.baseline_scores + verdict.adapted_scores)


def test_an_auditor_asked_for_fewer_retention_questions_asks_the_same_ones_before_and_after(
    tiny_model, adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    import auditor.core
    from auditor.retention import load_retention_set, retention_correct

    asked: list[tuple[str, ...]] = []

    def recording(model, tokenizer, questions, *args, **kwargs):  # noqa: ANN001, ANN202
        asked.append(tuple(qa.question for qa in questions))
        return retention_correct(model, tokenizer, questions, *args, **kwargs)

    monkeypatch.setattr(auditor.core, "retention_correct", recording)
    model, tokenizer = tiny_model
    first3 = tuple(qa.question for qa in load_retention_set()[:3])
    retention = base_retention(model, tokenizer, questions=3)
    assert retention.questions == load_retention_set()[:3] and asked == [first3]
    _audit(model, tokenizer, adapter, retention=retention)
    assert asked == [first3, first3]  # the adapted model is asked the very same three
    assert base_retention(model, tokenizer).questions == load_retention_set()  # 0: the whole set
    assert len(asked[-1]) == len(load_retention_set()) == 104
