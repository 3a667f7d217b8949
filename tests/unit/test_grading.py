"""Grading: SQuAD v1.1 normalization, EM, token F1, containment, accuracy and reward."""

from __future__ import annotations

import itertools

import pytest

from auditor.grading import (
    GRADING_METRICS,
    accuracy,
    answer_contained,
    exact_match,
    grade_answer,
    normalize_answer,
    reward,
    token_f1,
)
from seal.records import QuestionScore


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Cat!", "cat"),
        ("  A  quick, brown\tfox. ", "quick brown fox"),
        ("An apple", "apple"),
        ("theater atheist", "theater atheist"),  # articles only as whole words
        ("Hello-World", "helloworld"),  # SQuAD deletes punctuation, it does not split on it
        ("U.S.A.", "usa"),
        ("THE", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("Paris", "paris.", True),
        ("the Paris", "Paris", True),
        ("Paris, France", "Paris", False),
        ("", "", True),
        ("", "Paris", False),
    ],
)
def test_exact_match(prediction: str, gold: str, expected: bool) -> None:
    assert exact_match(prediction, gold) is expected


@pytest.mark.parametrize(
    ("prediction", "gold", "f1"),
    [
        # pred [cat sat on mat], gold [cat on mat]: P = 3/4, R = 1, F1 = 2PR/(P+R) = 6/7.
        ("the cat sat on the mat", "cat on mat", 6 / 7),
        # Overlap counts multiplicity: common {red: 1}; P = 1/3, R = 1/2, F1 = 2/5.
        ("red red blue", "red green", 0.4),
        ("Paris", "paris", 1.0),
        ("London", "Paris", 0.0),
        ("", "the", 1.0),  # both normalize to nothing
        ("", "Paris", 0.0),
        ("Paris", "", 0.0),
    ],
)
def test_token_f1_matches_squad_formula(prediction: str, gold: str, f1: float) -> None:
    assert token_f1(prediction, gold) == pytest.approx(f1)


@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        ("I went to the party", "art", False),  # substring, not a token
        ("the modern art museum", "art", True),
        ("The answer is Paris.", "paris", True),
        ("Paris", "The Paris", True),
        ("san francisco bay", "San Francisco", True),
        ("san diego francisco", "San Francisco", False),  # tokens must be contiguous
        ("New York City", "York New", False),  # and in order
        ("anything at all", "The.", False),  # empty gold is never contained
        ("", "Paris", False),
    ],
)
def test_answer_contained(response: str, gold: str, expected: bool) -> None:
    assert answer_contained(response, gold) is expected


@pytest.mark.parametrize(
    ("metric", "threshold", "correct"),
    [("contains", 0.5, True), ("exact_match", 0.5, False), ("f1", 0.5, True), ("f1", 0.6, False)],
)
def test_grade_answer_decides_by_metric(metric: str, threshold: float, correct: bool) -> None:
    # pred [capital is paris] vs gold [paris]: P = 1/3, R = 1, F1 = 0.5.
    score = grade_answer("Capital of France?", "Paris", "The capital is Paris", metric, threshold)
    assert score == QuestionScore(
        question="Capital of France?",
        answer="Paris",
        response="The capital is Paris",
        exact_match=False,
        f1=pytest.approx(0.5),
        contains=True,
        correct=correct,
    )


def test_grade_answer_rejects_unknown_metric() -> None:
    with pytest.raises(ValueError, match="unknown grading metric"):
        grade_answer("q", "a", "a", metric="bleu")


_TEXTS = ["Paris", "the city of Paris", "red red blue", "", "The.", "art", "party time", "Paris France"]


@pytest.mark.parametrize(("a", "b"), list(itertools.product(_TEXTS, repeat=2)))
def test_metric_invariants(a: str, b: str) -> None:
    f1 = token_f1(a, b)
    assert 0.0 <= f1 <= 1.0
    assert f1 == token_f1(b, a)
    if exact_match(a, b):
        assert f1 == 1.0
        assert answer_contained(a, b) or not normalize_answer(b)
    if answer_contained(a, b):
        assert f1 > 0.0
    for metric in GRADING_METRICS:
        assert grade_answer("q", b, a, metric, judged_correct=False).correct in (True, False)


@pytest.mark.parametrize("judged", [True, False])
def test_the_judges_grade_is_recorded_and_counts_only_under_judge(judged: bool) -> None:
    """ "Paris" is contained in the response either way; only metric "judge" follows the judge."""
    by_contains = grade_answer("q", "Paris", "It is Paris", "contains", judged_correct=judged)
    by_judge = grade_answer("q", "Paris", "It is Paris", "judge", judged_correct=judged)
    assert (by_contains.correct, by_contains.judged_correct) == (True, judged)
    assert (by_judge.correct, by_judge.judged_correct) == (judged, judged)
    assert by_judge.contains and by_judge.f1 == by_contains.f1  # the deterministic metrics stay recorded
    assert grade_answer("q", "Paris", "It is Paris").judged_correct is None  # no judge, no grade


def test_metric_judge_without_the_judges_grade_is_refused() -> None:
    with pytest.raises(ValueError, match="'judge' needs the judge's grade"):
        grade_answer("q", "a", "a", metric="judge")


def _score(correct: bool) -> QuestionScore:
    return QuestionScore(
        "q", "a", "r", exact_match=correct, f1=float(correct), contains=correct, correct=correct
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], 0.0),
        ([True], 1.0),
        ([False], 0.0),
        ([True, False, True, False], 0.5),
        ([True, True, False], 2 / 3),
    ],
)
def test_accuracy(flags: list[bool], expected: float) -> None:
    assert accuracy([_score(f) for f in flags]) == pytest.approx(expected)


@pytest.mark.parametrize(("baseline", "adapted"), list(itertools.product([0.0, 0.25, 0.5, 1.0], repeat=2)))
def test_reward_invariants(baseline: float, adapted: float) -> None:
    assert reward(baseline, adapted) == adapted - baseline
    assert reward(baseline, adapted) == -reward(adapted, baseline)
    assert -1.0 <= reward(baseline, adapted) <= 1.0
    assert (reward(baseline, adapted) > 0) is (adapted > baseline)
