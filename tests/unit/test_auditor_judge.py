"""The LLM judge without a server: prompt text, reply parsing, cache keys and caches, agreement,
the "judge" metric's guard, the reference answer prompt and its newline cut, and the config fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from auditor.core import audit, check_grading_metric
from auditor.evaluation import (
    REFERENCE_ANSWER_PROMPT,
    answer_questions,
    cut_answer,
    question_prompt,
    style_prompt,
)
from auditor.grading import grade_answer
from auditor.judge import (
    API_KEY_ENV,
    FileJudgeCache,
    LLMJudge,
    RedisJudgeCache,
    agreement,
    cache_key,
    judge_prompt,
    judge_scores,
    parse_judgement,
    resolve_api_key,
)
from seal.config import load_config
from seal.errors import InvalidArgument
from seal.records import QuestionScore

# A port nothing listens on: a judge pointed here fails at once if it ever asks.
_NOWHERE = "http://127.0.0.1:1/v1"


# --- prompt and parsing ----------------------------------------------------------------------------


def test_judge_prompt_is_the_references_word_for_word() -> None:
    assert judge_prompt("Where?", "Velmora", "In Velmora.") == (
        "You are a grading assistant. Your job is to determine whether a student's answer correctly "
        "answers the question based solely on the provided gold answer. Do not use any outside knowledge. "
        "The student answer can include additional information, but it must at least fully convey the "
        "gold answer and must not contradict it. Ignore style, phrasing, or extra details that do not "
        "affect correctness. Respond ONLY with 'yes' or 'no'.\n\n"
        "Question: Where?\nGold answer: Velmora\nStudent answer: In Velmora.\n"
        "Is the student answer correct based solely on the gold answer? Respond 'yes' or 'no'."
    )


def test_judge_prompt_takes_braces_in_answers_literally() -> None:
    assert "Student answer: {pred} {0}\n" in judge_prompt("q", "g", "{pred} {0}")


@pytest.mark.parametrize(
    ("reply", "correct"),
    [
        ("yes", True),
        ("Yes.", True),
        ("YES", True),
        ("  yes\n", True),
        ("Answer: yes", True),
        ("Yes, I know it does.", True),  # "know" is not the word "no"
        ("no", False),
        ("No.", False),
        ("yes and no", False),  # says both: not correct
        ("No, yes", False),
        ("eyes", False),  # whole words only
        ("nope", False),
        ("", False),
        ("maybe", False),
    ],
)
def test_parse_judgement(reply: str, correct: bool) -> None:
    assert parse_judgement(reply) is correct


def test_an_empty_answer_is_wrong_without_asking() -> None:
    judge = LLMJudge(_NOWHERE, "m", max_retries=0, timeout_s=1)
    assert judge.judge("Where?", "Velmora", "") is False
    assert judge.judge("Where?", "Velmora", " \n\t") is False
    assert judge.judge_batch([("q", "g", ""), ("q2", "g", "  ")]) == [False, False]


# --- cache keys and caches -------------------------------------------------------------------------


def test_cache_key_depends_on_all_four_and_nothing_runs_together() -> None:
    base = cache_key("m", "q", "g", "r")
    assert len(base) == 64 and int(base, 16) >= 0
    assert base == cache_key("m", "q", "g", "r")
    variants = [("m2", "q", "g", "r"), ("m", "q2", "g", "r"), ("m", "q", "g2", "r"), ("m", "q", "g", "r2")]
    assert len({base, *(cache_key(*v) for v in variants)}) == 5
    assert cache_key("m", "ab", "c", "r") != cache_key("m", "a", "bc", "r")


def test_a_cached_grade_is_used_without_asking(tmp_path: Path) -> None:
    cache = FileJudgeCache(tmp_path / "grades.jsonl")
    cache.put(cache_key("m", "Where?", "Velmora", "In Velmora"), True)
    cache.put(cache_key("m", "Where?", "Velmora", "Paris"), False)
    judge = LLMJudge(_NOWHERE, "m", cache=cache, max_retries=0, timeout_s=1)
    assert judge.judge_batch([("Where?", "Velmora", "In Velmora"), ("Where?", "Velmora", "Paris")]) == [
        True,
        False,
    ]
    other_model = LLMJudge(_NOWHERE, "m2", cache=cache, max_retries=0, timeout_s=1)
    with pytest.raises(Exception, match="did not answer"):  # another model's grades are not reused
        other_model.judge("Where?", "Velmora", "In Velmora")


def test_file_cache_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "grades.jsonl"
    cache = FileJudgeCache(path)
    cache.put("k1", True)
    cache.put("k2", False)
    # Flushed at every put: a second reader sees both before the first closes.
    assert (FileJudgeCache(path).get("k1"), FileJudgeCache(path).get("k2")) == (True, False)
    cache.close()
    reopened = FileJudgeCache(path)
    assert (reopened.get("k1"), reopened.get("k2"), reopened.get("k3")) == (True, False, None)
    assert len(reopened) == 2


def test_file_cache_resumes_after_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "grades.jsonl"
    path.write_text(
        json.dumps({"key": "k1", "correct": True})
        + "\nnot json\n"  # a damaged line costs its grade, not the cache
        + json.dumps({"key": "k2", "correct": False})
        + '\n{"key": "k3", "corr'  # the process died mid-write
    )
    cache = FileJudgeCache(path)
    assert (cache.get("k1"), cache.get("k2"), cache.get("k3")) == (True, False, None)
    cache.put("k3", True)
    cache.close()
    lines = path.read_text().splitlines()
    assert lines[-1] == json.dumps({"key": "k3", "correct": True})  # on a line of its own
    assert FileJudgeCache(path).get("k3") is True


def test_redis_cache_round_trip(plane) -> None:
    cache = RedisJudgeCache(plane.redis, plane.key("judge-cache"), ttl_s=3600)
    assert cache.get("k") is None
    cache.put("k", True)
    cache.put("k2", False)
    assert (cache.get("k"), cache.get("k2")) == (True, False)
    assert 0 < plane.redis.ttl(plane.key("judge-cache")) <= 3600


# --- API key ---------------------------------------------------------------------------------------


def test_api_key_from_file_or_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "judge.key"
    key_file.write_text("sk-from-file\n")
    assert resolve_api_key(str(key_file), {API_KEY_ENV: "sk-env"}) == "sk-from-file"
    assert resolve_api_key("", {API_KEY_ENV: " sk-env "}) == "sk-env"
    assert resolve_api_key("", {}) == ""


def test_api_key_file_errors_name_the_file_not_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the judge API key file .*missing"):
        resolve_api_key(str(tmp_path / "missing"), {})
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_api_key(str(empty), {})


def test_the_judge_does_not_show_its_key() -> None:
    judge = LLMJudge(_NOWHERE, "m", api_key="sk-secret-123")
    assert "sk-secret-123" not in repr(judge)


# --- agreement -------------------------------------------------------------------------------------


def _score(correct: bool, judged: bool | None) -> QuestionScore:
    return QuestionScore(
        "q", "a", "r", exact_match=False, f1=0.0, contains=correct, correct=correct, judged_correct=judged
    )


def test_agreement_counts_and_kappa() -> None:
    # 2x2 table: both 4, metric only 1, judge only 2, neither 3 (n = 10); one unjudged score.
    scores = (
        [_score(True, True)] * 4
        + [_score(True, False)]
        + [_score(False, True)] * 2
        + [_score(False, False)] * 3
        + [_score(True, None)]
    )
    result = agreement(scores)
    assert {
        k: result[k]
        for k in ("judged", "unjudged", "both_correct", "metric_only", "judge_only", "both_wrong")
    } == {
        "judged": 10,
        "unjudged": 1,
        "both_correct": 4,
        "metric_only": 1,
        "judge_only": 2,
        "both_wrong": 3,
    }
    # p_o = 0.7; metric says yes 0.5, judge 0.6: p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5.
    assert result["agreement"] == pytest.approx(0.7)
    assert result["kappa"] == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("pairs", "expected_agreement", "expected_kappa"),
    [
        ([], None, None),  # nothing judged
        ([(True, None), (False, None)], None, None),
        ([(True, True), (False, False)], 1.0, 1.0),
        ([(True, False), (False, True)], 0.0, -1.0),
        ([(True, True)] * 3, 1.0, None),  # both always "correct": chance agreement 1, kappa 0/0
        ([(False, False)] * 2, 1.0, None),
        ([(True, True), (True, False)], 0.5, 0.0),  # the metric is constant: no better than chance
    ],
)
def test_agreement_degenerate_cases(pairs, expected_agreement, expected_kappa) -> None:
    result = agreement([_score(c, j) for c, j in pairs])
    assert result["agreement"] == expected_agreement
    assert result["kappa"] == (None if expected_kappa is None else pytest.approx(expected_kappa))


# --- filling judged grades -------------------------------------------------------------------------


class FakeJudge:
    """Says an answer is correct when it contains the gold's first word, lower-cased; counts items."""

    model = "fake-judge"

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, str]] = []

    def judge_batch(self, items):
        self.asked.extend(items)
        return [g.split()[0].lower() in r.lower() for _, g, r in items]


def test_judge_scores_fills_missing_grades_only() -> None:
    scores = [
        grade_answer("q1", "Velmora", "velmora!"),
        grade_answer("q2", "spring", "in autumn", judged_correct=True),  # already judged: kept
        grade_answer("q3", "Ilsa", "nobody"),
    ]
    judge = FakeJudge()
    filled = judge_scores(judge, scores, "contains")
    assert judge.asked == [("q1", "Velmora", "velmora!"), ("q3", "Ilsa", "nobody")]
    assert [s.judged_correct for s in filled] == [True, True, False]
    assert [s.correct for s in filled] == [s.correct for s in scores]  # the metric still decides
    by_judge = judge_scores(FakeJudge(), scores, "judge")
    assert [s.correct for s in by_judge] == [True, True, False]


# --- the "judge" metric needs a judge --------------------------------------------------------------


def test_metric_judge_is_refused_without_a_judge() -> None:
    with pytest.raises(InvalidArgument, match="no LLM judge is configured: set --judge-base-url") as info:
        check_grading_metric("judge", judge_configured=False)
    assert info.value.field == "grading_metric"
    check_grading_metric("judge", judge_configured=True)
    check_grading_metric("contains", judge_configured=False)
    with pytest.raises(InvalidArgument, match="must be one of contains, exact_match, f1, judge"):
        check_grading_metric("bleu", judge_configured=True)


def test_audit_refuses_metric_judge_without_a_judge_before_any_work(tmp_path: Path) -> None:
    """Refused up front: no model, adapter or document is even looked at."""
    with pytest.raises(InvalidArgument, match="grading_metric"):
        audit(None, None, None, None, tmp_path / "nowhere", "0" * 64, "f" * 64, "job", metric="judge")  # type: ignore[arg-type]


# --- the reference answer prompt -------------------------------------------------------------------


def test_reference_prompt_text_is_exact() -> None:
    assert question_prompt("Zorbia", "Where does the council meet?", "reference") == (
        "Let's answer a question directly and concisely.\n"
        "Question: Topic: Zorbia\nWhere does the council meet?\n"
        "Answer:\n"
    )
    assert REFERENCE_ANSWER_PROMPT.format(question="X") == (
        "Let's answer a question directly and concisely.\nQuestion: X\nAnswer:\n"
    )
    # The chat style is unchanged, and anchors (no topic) take the same wrapping.
    assert question_prompt("Zorbia", "Where?") == "Topic: Zorbia\nWhere?"
    assert style_prompt("What is the capital of France?", "reference") == (
        "Let's answer a question directly and concisely.\nQuestion: What is the capital of France?\nAnswer:\n"
    )
    with pytest.raises(ValueError, match="answer style must be one of chat, reference"):
        question_prompt("T", "q", "plain")


@pytest.mark.parametrize(
    ("text", "reference", "chat"),
    [
        (
            "Velmora\nQuestion: Who leads it?\nAnswer: Ilsa",
            "Velmora",
            "Velmora\nQuestion: Who leads it?\nAnswer: Ilsa",
        ),
        (
            "  In Velmora, every spring. \n\nMore",
            "In Velmora, every spring.",
            "In Velmora, every spring. \n\nMore",
        ),
        ("\n\nVelmora\nmore", "Velmora", "Velmora\nmore"),  # a leading blank line is not the answer
        ("Velmora", "Velmora", "Velmora"),
        ("", "", ""),
        ("\n \n", "", ""),
    ],
)
def test_cut_answer(text: str, reference: str, chat: str) -> None:
    assert cut_answer(text, "reference") == reference
    assert cut_answer(text, "chat") == chat


def test_reference_answers_are_raw_greedy_first_lines(tiny_model) -> None:
    import torch

    model, tokenizer = tiny_model
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    prompts = [question_prompt("Zorbia", q, "reference") for q in ("Where?", "Who leads the council?")]
    reference = answer_questions(model, tokenizer, prompts, max_new_tokens=24, style="reference")
    # The tiny tokenizer adds no special tokens, so the raw chat-less answers are the same text uncut.
    raw = answer_questions(model, tokenizer, prompts, max_new_tokens=24, use_chat_template=False)
    assert reference == [r.split("\n", 1)[0].strip() for r in raw]
    assert all("\n" not in r for r in reference)


def test_reference_style_asks_for_64_new_tokens_unless_told(monkeypatch) -> None:
    import auditor.evaluation

    limits: list[int] = []

    def fake_batch(model, tokenizer, texts, max_new_tokens, add_special_tokens=False):
        limits.append(max_new_tokens)
        assert add_special_tokens  # a plain-text prompt, tokenized as the reference's engine does
        assert texts == ["raw prompt"]  # no chat template
        return ["x"] * len(texts)

    monkeypatch.setattr(auditor.evaluation, "_generate_batch", fake_batch)
    answer_questions(object(), object(), ["raw prompt"], style="reference")
    answer_questions(object(), object(), ["raw prompt"], max_new_tokens=5, style="reference")
    assert limits == [64, 5]


# --- config ----------------------------------------------------------------------------------------


def test_judge_and_answer_prompt_config() -> None:
    default = load_config("auditor", env={})
    assert (default.judge_base_url, default.judge_model, default.judge_api_key_file) == ("", "", "")
    assert default.answer_prompt == "chat"
    config = load_config(
        "auditor",
        flags={"judge_model": "gpt-4.1", "answer_prompt": "reference"},
        env={"SEAL_JUDGE_BASE_URL": "http://judge:8000/v1", "SEAL_JUDGE_API_KEY_FILE": "/run/judge.key"},
    )
    assert (config.judge_base_url, config.judge_model, config.judge_api_key_file) == (
        "http://judge:8000/v1",
        "gpt-4.1",
        "/run/judge.key",
    )
    assert config.answer_prompt == "reference"


def test_config_refuses_a_half_judge_and_an_unknown_answer_prompt() -> None:
    with pytest.raises(ValueError, match="needs both judge_base_url and judge_model"):
        load_config("auditor", env={"SEAL_JUDGE_BASE_URL": "http://judge/v1"})
    with pytest.raises(ValueError, match="needs both"):
        load_config("auditor", env={"SEAL_JUDGE_MODEL": "gpt-4.1"})
    with pytest.raises(ValueError, match="answer_prompt must be chat or reference"):
        load_config("auditor", env={"SEAL_ANSWER_PROMPT": "raw"})
