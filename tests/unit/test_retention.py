"""Retention and KL shift: the data files, the KL maths, the measurements on a tiny random Llama, the
guardrail checks, and `seal bench retention` end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from auditor.grading import answer_contained, normalize_answer
from auditor.guardrails import MAX_KL, MAX_RETENTION_DROP, CheckResult, run_guardrails
from auditor.retention import (
    RETENTION_FILE,
    RETENTION_MAX_NEW_TOKENS,
    Continuation,
    answer_until_gold,
    answered,
    base_continuations,
    continuation_batch,
    kl_shift,
    load_candidates,
    load_kl_prompts,
    load_retention_set,
    retention_accuracy,
    round_robin,
    token_kl,
)
from seal.records import QA, LoraSettings
from student.general import load_general_prompts, mean_kl
from student.training import lora_config, release_adapter, train_adapter

ROOT = Path(__file__).resolve().parents[2]

# --- the data ------------------------------------------------------------------------------------------


def test_the_retention_set_has_over_100_well_formed_questions() -> None:
    questions = load_retention_set()
    assert len(questions) >= 100
    assert len({qa.question for qa in questions}) == len(questions)
    for qa in questions:
        assert len(normalize_answer(qa.answer)) > 1, qa
        # The question alone never gives its answer away; a right answer in a sentence is graded right.
        assert not answer_contained(qa.question, qa.answer), qa
        assert answer_contained(f"I think it is {qa.answer}.", qa.answer), qa


def test_the_retention_file_says_how_and_on_what_it_was_filtered() -> None:
    data = json.loads(RETENTION_FILE.read_text())
    assert data["model"] == "smollm2-135m" and len(data["fingerprint"]) == 64
    assert (data["style"], data["metric"], data["max_new_tokens"]) == (
        "chat",
        "contains",
        RETENTION_MAX_NEW_TOKENS,
    )
    assert data["candidates"] >= 3 * len(data["questions"])  # several hundred candidates, filtered


def test_prompt_sets_are_large_enough_distinct_and_disjoint() -> None:
    auditor_prompts = load_kl_prompts()
    student_prompts = load_general_prompts()
    assert len(auditor_prompts) >= 24 and len(set(auditor_prompts)) == len(auditor_prompts)
    assert len(student_prompts) >= 64 and len(set(student_prompts)) == len(student_prompts)

    def norm(texts) -> set[str]:
        return {normalize_answer(t) for t in texts}

    # An update never trains on what the auditor measures with.
    assert not norm(student_prompts) & norm(auditor_prompts)
    assert not norm(student_prompts) & norm(qa.question for qa in load_retention_set())


def test_the_data_files_ship_with_the_package() -> None:
    # pyproject's package-data (read as text: tomllib is not in Python 3.10).
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'auditor = ["data/*.json"]' in pyproject and 'student = ["data/*.json"]' in pyproject
    assert (ROOT / "auditor" / "data" / "retention.json").is_file()
    assert (ROOT / "student" / "data" / "general_prompts.json").is_file()


def test_candidates_drop_golds_the_question_already_gives(tmp_path: Path) -> None:
    path = tmp_path / "candidates.json"
    rows = [
        {
            "question": "Is the Berlin Wall the wall that divided Berlin?",
            "answers": ["Berlin Wall"],
            "topic": "t",
        },
        {"question": "What is the symbol for oxygen?", "answers": ["O", "oxygen", "Ox"], "topic": "t"},
        {"question": "What is the capital of Peru?", "answers": ["Lima"], "topic": "u"},
    ]
    path.write_text(json.dumps({"questions": rows, "kl_prompts": []}))
    kept = load_candidates(path)
    assert [(c.question, c.answers) for c in kept] == [
        ("What is the symbol for oxygen?", ("Ox",)),
        ("What is the capital of Peru?", ("Lima",)),
    ]


def test_round_robin_spreads_the_set_over_topics() -> None:
    questions = [QA(f"capital {i}?", "x") for i in range(5)] + [QA("author?", "y"), QA("river?", "z")]
    topics = {q.question: "capitals" for q in questions[:5]} | {"author?": "authors", "river?": "rivers"}
    picked = round_robin(questions, topics, 4)
    assert [q.question for q in picked] == ["capital 0?", "author?", "river?", "capital 1?"]


# --- the KL maths ------------------------------------------------------------------------------------------


def test_token_kl_matches_the_formula_and_is_zero_on_itself() -> None:
    torch.manual_seed(0)
    base, adapted = torch.randn(4, 7), torch.randn(4, 7)
    p, q = base.softmax(-1), adapted.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(token_kl(base, adapted), expected, atol=1e-6)
    assert (token_kl(base, adapted) > 0).all()
    assert torch.allclose(token_kl(base, base), torch.zeros(4), atol=1e-6)
    # KL is not symmetric: the direction is KL(base || adapted).
    assert not torch.allclose(token_kl(base, adapted), token_kl(adapted, base))


def test_the_student_and_the_auditor_compute_the_same_kl_independently() -> None:
    torch.manual_seed(1)
    base, adapted = torch.randn(6, 11), torch.randn(6, 11)
    assert mean_kl(base, adapted).item() == pytest.approx(token_kl(base, adapted).mean().item(), abs=1e-6)
    assert mean_kl(base[:0], adapted[:0]).item() == 0.0


def test_continuation_batch_targets_the_positions_that_predict_the_continuation() -> None:
    batch = [Continuation((5, 6, 7, 8, 9), prompt_len=3), Continuation((5, 6, 7), prompt_len=2)]
    ids, attention, targets = continuation_batch(batch, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # Position t predicts token t + 1: 8 and 9 are predicted at 2 and 3; 7 at 1.
    assert targets.tolist() == [[False, False, True, True, False], [False, True, False, False, False]]
    # With a shared prefix of 1 token, the same positions, shifted; the mask still covers the prefix.
    ids, attention, targets = continuation_batch(batch, pad_id=0, shared=1)
    assert ids.tolist() == [[6, 7, 8, 9], [6, 7, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert targets.tolist() == [[False, True, True, False], [True, False, False, False]]


# --- measurements on the tiny model ------------------------------------------------------------------------


def test_base_continuations_are_the_prompt_then_the_greedy_answer(tiny_model) -> None:
    model, tokenizer = tiny_model
    prompts = ["Explain how rain forms.", "Hi"]
    continuations = base_continuations(model, tokenizer, prompts, max_new_tokens=6)
    for prompt, c in zip(prompts, continuations, strict=True):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        assert list(c.ids[: c.prompt_len]) == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        answer = c.ids[c.prompt_len :]
        assert 1 <= len(answer) <= 6
        # Either it ran to the budget or it stopped at (and kept) its end token, never padding after.
        assert len(answer) == 6 or answer[-1] == tokenizer.eos_token_id


def test_kl_shift_is_zero_for_a_fresh_lora_and_positive_after_a_destructive_update(tiny_model) -> None:
    model, tokenizer = tiny_model
    sequences = base_continuations(model, tokenizer, list(load_kl_prompts()[:4]), max_new_tokens=6)
    fresh = get_peft_model(model, lora_config(model, LoraSettings()))
    assert kl_shift(fresh, tokenizer, sequences) == 0.0  # B = 0: the adapter is the identity
    model = release_adapter(fresh)

    lora = LoraSettings(epochs=5, learning_rate=1e-2, schedule="constant")
    wrecked, _ = train_adapter(model, tokenizer, ["zint quax zint quax zint quax"] * 4, lora)
    shift = kl_shift(wrecked, tokenizer, sequences)
    assert shift > 1e-3
    # Batching does not change the figure (right padding, masked positions).
    assert kl_shift(wrecked, tokenizer, sequences, batch_size=1) == pytest.approx(shift, rel=1e-4)
    assert kl_shift(wrecked, tokenizer, []) == 0.0


@pytest.fixture()
def scrambled_model(tiny_model):
    """The tiny model with large random weights, so that it answers something (at its default init
    scale it answers nothing)."""
    model, tokenizer = tiny_model
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model, tokenizer


def test_retention_accuracy_grades_by_containment(scrambled_model) -> None:
    model, tokenizer = scrambled_model
    questions = [QA("What is the capital of France?", "Paris"), QA("Who wrote Hamlet?", "Shakespeare")]
    assert retention_accuracy(model, tokenizer, questions) == 0.0
    # Make the tiny model's own answers the golds: then it "knows" them all.
    answers = _answers(model, tokenizer, questions)
    assert all(normalize_answer(a) for a in answers), "precondition: the scrambled model answers"
    learned = [QA(qa.question, a) for qa, a in zip(questions, answers, strict=True)]
    assert retention_accuracy(model, tokenizer, learned) == 1.0
    assert retention_accuracy(model, tokenizer, [learned[0], questions[1]]) == 0.5


def _answers(model, tokenizer, questions) -> list[str]:
    from auditor.evaluation import answer_questions

    return answer_questions(model, tokenizer, [q.question for q in questions], RETENTION_MAX_NEW_TOKENS)


_PROMPTS = [
    "Where does the council meet?",
    "hi",
    "The quick brown fox jumps over the lazy dog, a long prompt that forces the others to be padded.",
    "Why?",
    "Question: Answer:",
]


@pytest.mark.parametrize("style", ["chat", "reference"])
def test_answers_until_gold_are_answer_questions_answers_when_no_gold_is_said(scrambled_model, style) -> None:
    from auditor.evaluation import answer_questions, style_prompt

    model, tokenizer = scrambled_model
    prompts = [style_prompt(p, style) for p in _PROMPTS]
    expected = answer_questions(model, tokenizer, prompts, max_new_tokens=12, batch_size=3, style=style)
    never = [("never said anywhere",)] * len(prompts)
    assert answer_until_gold(model, tokenizer, prompts, never, 12, batch_size=3, style=style) == expected
    assert any(expected), "precondition: the scrambled model answers"


def test_an_answer_stops_once_it_contains_its_gold(scrambled_model) -> None:
    from auditor.evaluation import answer_questions

    model, tokenizer = scrambled_model
    full = answer_questions(model, tokenizer, _PROMPTS, max_new_tokens=12, batch_size=5)
    words = [a.split() for a in full]
    # A gold from the middle of each answer that has one; the others never settle.
    golds = [(w[len(w) // 2],) if len(w) > 2 else ("never said anywhere",) for w in words]
    stopped = answer_until_gold(model, tokenizer, _PROMPTS, golds, 12, batch_size=5)
    for answer, whole, gold in zip(stopped, full, golds, strict=True):
        assert whole.startswith(answer)
        if answer_contained(whole, gold[0]):
            assert answer_contained(answer, gold[0]) and len(answer) <= len(whole)
        else:
            assert answer == whole


def test_answered_keeps_the_alias_the_answer_contains(scrambled_model) -> None:
    from auditor.retention import Candidate

    model, tokenizer = scrambled_model
    (response,) = _answers(model, tokenizer, [QA("Say something.", "")])
    assert normalize_answer(response), "precondition: the scrambled model answers"
    candidates = [
        Candidate("Say something.", ("nowhere to be seen", response), "t"),
        Candidate("Say something else.", ("nowhere to be seen",), "t"),
    ]
    assert answered(model, tokenizer, candidates) == [QA("Say something.", response)]


# --- the guardrail checks ------------------------------------------------------------------------------------


_QUESTIONS = (QA("Where does the Zorbian council meet every spring?", "Velmora"),)


def test_retention_and_kl_checks_run_only_when_their_figures_are_given() -> None:
    assert [c.name for c in run_guardrails("clean", _QUESTIONS)] == ["tau_leak"]
    assert [c.name for c in run_guardrails("clean", _QUESTIONS, retention_before=1.0)] == ["tau_leak"]
    both = run_guardrails("clean", _QUESTIONS, retention_before=1.0, retention_after=1.0, kl=0.0)
    assert [c.name for c in both] == ["tau_leak", "retention", "kl_shift"]
    assert all(c.passed for c in both)
    assert [c.name for c in run_guardrails("clean", _QUESTIONS, kl=0.01)] == ["tau_leak", "kl_shift"]


def test_retention_check_fails_a_drop_beyond_the_bound_and_says_the_figures() -> None:
    (_, failed) = run_guardrails(
        "clean", _QUESTIONS, retention_before=1.0, retention_after=0.9, max_retention_drop=0.05
    )
    assert failed == CheckResult(
        "retention", False, "retention accuracy 1.000 -> 0.900 (drop 0.100, max 0.050)"
    )
    (_, at_bound) = run_guardrails(
        "clean", _QUESTIONS, retention_before=0.9, retention_after=0.85, max_retention_drop=0.05
    )
    assert at_bound.passed  # exactly the bound passes, whatever float subtraction says
    (_, coarse) = run_guardrails(
        "clean", _QUESTIONS, retention_before=1.0, retention_after=0.75, retention_questions=32
    )
    # An auditor that asks part of the set says on how many questions its verdict rests.
    assert coarse.detail == "retention accuracy 1.000 -> 0.750 (drop 0.250, max 0.100) on 32 questions"


def test_kl_check_fails_a_shift_beyond_the_bound_and_says_the_figures() -> None:
    (_, failed) = run_guardrails("clean", _QUESTIONS, kl=0.25, max_kl=0.1)
    assert failed == CheckResult("kl_shift", False, "KL(base || adapted) 0.2500 nats per token (max 0.1000)")
    (_, passed) = run_guardrails("clean", _QUESTIONS, kl=0.1, max_kl=0.1)
    assert passed.passed


def test_default_thresholds_pass_an_untouched_model_and_are_positive() -> None:
    assert 0 < MAX_RETENTION_DROP < 0.5 and 0 < MAX_KL
    checks = run_guardrails("clean", _QUESTIONS, retention_before=1.0, retention_after=1.0, kl=0.0)
    assert all(c.passed for c in checks)


# --- `seal bench retention` on the tiny model ----------------------------------------------------------------


def test_the_bench_writes_rows_resumes_and_tabulates(tiny_model, tmp_path: Path) -> None:
    from seal.bench.retention import demo_passages, retention_settings, run_retention_bench

    model, tokenizer = tiny_model
    settings = [
        s
        for s in retention_settings(LoraSettings(epochs=1, rank=2, alpha=4.0))
        if s.name in ("default", "replay-8", "gated-2")
    ]
    written: list[str] = []

    def writer(passage):
        written.append(passage.key)
        return [f"{passage.doc.title}\n{passage.doc.context}"], passage.doc.context

    passages = demo_passages()[:1]
    summary = run_retention_bench(
        model, tokenizer, passages, settings, tmp_path, writer, "tiny", log=lambda m: None
    )
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["setting"] for r in rows) == sorted(
        ["base", "default", "replay-8", "gated-2"]
        + [f"calibration:{n}" for n in ("neutral-1-step", "harmless", "destructive")]
    )
    trained = {r["setting"]: r for r in rows if r["setting"] in ("default", "replay-8", "gated-2")}
    assert trained["replay-8"]["steps"] == trained["default"]["steps"] + 8
    assert all(r["gain"] == r["accuracy_after"] - r["accuracy_before"] for r in trained.values())
    assert [s["passages"] for s in summary["settings"]] == [1, 1, 1]
    # Gated: the same update, but no general prompt names the passage: the base answers them all.
    assert trained["default"]["kl"] > 0 and trained["gated-2"]["kl"] == 0.0
    assert trained["gated-2"]["steps"] == trained["default"]["steps"]
    from seal.bench.retention import summarize

    assert [s["passages"] for s in summarize(settings, rows, "tiny", passages=["demo:1"])] == [0, 0, 0]

    lines_before = (tmp_path / "results.jsonl").read_text()
    run_retention_bench(model, tokenizer, passages, settings, tmp_path, writer, "tiny", log=lambda m: None)
    assert (tmp_path / "results.jsonl").read_text() == lines_before  # resumed: nothing redone
    assert written == ["demo:0"]  # the self-edit was written once and cached
    table = (tmp_path / "table.md").read_text()
    assert "| unmitigated default | 1 |" in table and "| replay 8 | 1 |" in table
    assert "| default, gated (2 document words) | 1 |" in table
    assert "Calibration" in table
