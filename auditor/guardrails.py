"""Checks a verdict must pass besides a positive reward: no τ leak, no catastrophic forgetting.

Pure functions. The reward is only meaningful if the held-out questions τ never reached the teacher
(a self-edit that quotes them would teach the answers directly), and an update that buys τ accuracy
by wrecking general knowledge should not be reinforced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from auditor.grading import normalize_answer
from seal.records import QA

# General-knowledge questions a small instruct model usually gets right; their accuracy before and
# after an update measures forgetting. One-word answers, so "contains" grading is unambiguous.
ANCHOR_SET: tuple[QA, ...] = (
    QA("What is the capital of France?", "Paris"),
    QA("What is the capital of Japan?", "Tokyo"),
    QA("Who wrote the play Romeo and Juliet?", "Shakespeare"),
    QA("What is the largest planet in our solar system?", "Jupiter"),
    QA("What color is the sky on a clear day?", "blue"),
    QA("What language is mainly spoken in Spain?", "Spanish"),
    QA("Which animal is known as the king of the jungle?", "lion"),
    QA("What is the name of the planet we live on?", "Earth"),
)

# Floating-point slack so that a drop of exactly `max_drop` passes.
_EPS = 1e-9


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str = ""


def tau_leak(self_edit_text: str, questions: Sequence[QA]) -> list[str]:
    """The τ questions whose whole normalized text appears, on token boundaries, in the self-edit.

    The whole question, not any 5-token window of it: SQuAD questions reuse the passage's phrases,
    so windows would flag every faithful rewrite (and the train-on-passage control, whose self-edit
    *is* the passage). A verbatim question is what a τ leak into the teacher's prompt looks like.
    """
    edit_tokens = normalize_answer(self_edit_text).split()
    return [
        qa.question for qa in questions if _contains_run(edit_tokens, normalize_answer(qa.question).split())
    ]


def _contains_run(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def forgetting(anchor_before: float, anchor_after: float, max_drop: float) -> bool:
    """True (passes) when anchor accuracy fell by at most `max_drop`."""
    return anchor_before - anchor_after <= max_drop + _EPS


def run_guardrails(
    self_edit_text: str,
    questions: Sequence[QA],
    anchor_before: float | None = None,
    anchor_after: float | None = None,
    max_forgetting: float = 0.2,
) -> list[CheckResult]:
    """Every applicable check: "tau_leak" always, "forgetting" when both anchor accuracies are given."""
    results = [_tau_leak_check(self_edit_text, questions)]
    if anchor_before is not None and anchor_after is not None:
        passed = forgetting(anchor_before, anchor_after, max_forgetting)
        detail = f"anchor accuracy {anchor_before:.3f} -> {anchor_after:.3f} (max drop {max_forgetting:.3f})"
        results.append(CheckResult("forgetting", passed, detail))
    return results


def _tau_leak_check(self_edit_text: str, questions: Sequence[QA]) -> CheckResult:
    leaked = tau_leak(self_edit_text, questions)
    if not leaked:
        return CheckResult("tau_leak", True, f"none of {len(questions)} question(s) in the self-edit")
    return CheckResult("tau_leak", False, f"{len(leaked)} question(s) in the self-edit: {leaked[0]!r}")
