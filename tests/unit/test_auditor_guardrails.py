"""Guardrails: τ leak detection, the retention and KL bounds, and the anchor set."""

from __future__ import annotations

import pytest

from auditor.grading import answer_contained, normalize_answer
from auditor.guardrails import ANCHOR_SET, CheckResult, retention_kept, run_guardrails, tau_leak
from seal.records import QA

_QUESTIONS = (
    QA("Where does the Zorbian council meet every spring?", "Velmora"),
    QA("Who founded Velmora?", "Queen Ilsa"),
)


@pytest.mark.parametrize(
    ("self_edit", "leaked"),
    [
        ("The council of Zorbia gathers in Velmora.", []),
        # Case, punctuation and articles do not hide a verbatim question.
        ("Q: WHERE does Zorbian council meet, every spring? A: Velmora", [_QUESTIONS[0].question]),
        ("who founded velmora queen ilsa", [_QUESTIONS[1].question]),
        # Both leaked: reported in τ order, not in the order they appear.
        (
            "Who founded Velmora? ... Where does the Zorbian council meet every spring?",
            [q.question for q in _QUESTIONS],
        ),
        # The passage itself shares long runs of words with the question; that is not a leak.
        ("The Zorbian council meet every spring in the city of Velmora.", []),
        # Token boundaries: "who founded velmoran" is a different word.
        ("We asked who founded Velmorans.", []),
        ("", []),
    ],
)
def test_tau_leak(self_edit: str, leaked: list[str]) -> None:
    assert tau_leak(self_edit, _QUESTIONS) == leaked


def test_tau_leak_ignores_questions_that_normalize_to_nothing() -> None:
    assert tau_leak("the a an", [QA("The?", "x")]) == []


@pytest.mark.parametrize(
    ("before", "after", "max_drop", "passes"),
    [
        (0.5, 0.5, 0.2, True),
        (0.2, 0.9, 0.0, True),  # improving always passes
        (0.875, 0.625, 0.25, True),  # a drop of exactly max_drop passes
        (0.9, 0.7, 0.2, True),  # ... even when float subtraction gives 0.20000000000000007
        (0.5, 0.25, 0.2, False),
        (1.0, 0.0, 0.99, False),
        (0.5, 0.49, 0.0, False),
    ],
)
def test_retention_kept(before: float, after: float, max_drop: float, passes: bool) -> None:
    assert retention_kept(before, after, max_drop) is passes


def test_run_guardrails_without_figures_only_checks_tau() -> None:
    results = run_guardrails("clean text", _QUESTIONS)
    assert [r.name for r in results] == ["tau_leak"]
    assert results[0].passed
    # One retention figure alone is not enough to judge a drop.
    assert [r.name for r in run_guardrails("clean", _QUESTIONS, retention_before=0.5)] == ["tau_leak"]


def test_run_guardrails_reports_failures_with_details() -> None:
    results = run_guardrails(
        "Who founded Velmora?",
        _QUESTIONS,
        retention_before=0.75,
        retention_after=0.25,
        max_retention_drop=0.2,
        kl=0.5,
        max_kl=0.05,
    )
    by_name = {r.name: r for r in results}
    assert list(by_name) == ["tau_leak", "retention", "kl_shift"]
    assert not by_name["tau_leak"].passed and "Who founded Velmora?" in by_name["tau_leak"].detail
    assert not by_name["retention"].passed and "0.750 -> 0.250" in by_name["retention"].detail
    assert not by_name["kl_shift"].passed and "0.5000" in by_name["kl_shift"].detail


def test_run_guardrails_passes_a_clean_edit() -> None:
    results = run_guardrails(
        "Velmora hosts the council.", _QUESTIONS, retention_before=0.5, retention_after=0.45, kl=0.0
    )
    assert results == [
        CheckResult("tau_leak", True, results[0].detail),
        CheckResult("retention", True, results[1].detail),
        CheckResult("kl_shift", True, results[2].detail),
    ]


def test_anchor_set_is_well_formed() -> None:
    assert 6 <= len(ANCHOR_SET) <= 12
    assert len({qa.question for qa in ANCHOR_SET}) == len(ANCHOR_SET)
    for qa in ANCHOR_SET:
        assert normalize_answer(qa.answer), qa
        # A right answer in a sentence is graded correct; the question alone does not give it away.
        assert answer_contained(f"I think it is {qa.answer}.", qa.answer), qa
        assert not answer_contained(qa.question, qa.answer), qa
