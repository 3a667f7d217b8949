"""Checks a verdict must pass besides a positive reward: no τ leak, no forgetting, no drift.

Pure functions. The reward is only meaningful if the held-out questions τ never reached the teacher
(a self-edit that quotes them would teach the answers directly), and an update that buys τ accuracy
by wrecking general knowledge or behaviour should not be reinforced. The figures the last two checks
judge are measured by auditor.retention: accuracy on the retention set before and after the adapter,
and the KL shift on the auditor's general prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from auditor.grading import normalize_answer
from seal.records import QA

# Eight general-knowledge questions, the forgetting yardstick before the retention set
# (auditor.retention); kept while auditor.evaluation.anchor_accuracy still has callers.
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

# Floating-point slack so that a figure exactly at its bound passes.
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


# Thresholds, placed by `seal bench retention`'s calibration updates on the default model
# (docs/results/retention/). Greedy decoding gives the base itself zero noise, but any update moves
# greedy near-ties: a single step on one neutral sentence already costs 2 of the 104 retention
# answers (drop 0.019) at a KL of 0.002. Ten epochs of the default recipe on that same harmless
# sentence change the model's manner ("Bonjour! Welcome to my humble abode...") and cost 0.173 at a
# KL of 0.090; repetitive nonsense at lr 1e-2 costs everything (1.0, KL 20).
MAX_RETENTION_DROP = 0.10
"""At most 10 of the 104 retention answers lost: five times what the smallest update loses to
near-ties, and below what ten epochs on a neutral sentence cost."""
MAX_KL = 0.05
"""Nats per token on the auditor's prompts: 25 times the smallest update's shift, about half of
what ten epochs on a neutral sentence cause."""


def retention_kept(before: float, after: float, max_drop: float) -> bool:
    """True (passes) when retention accuracy fell by at most `max_drop`."""
    return before - after <= max_drop + _EPS


def run_guardrails(
    self_edit_text: str,
    questions: Sequence[QA],
    retention_before: float | None = None,
    retention_after: float | None = None,
    max_retention_drop: float = MAX_RETENTION_DROP,
    kl: float | None = None,
    max_kl: float = MAX_KL,
    retention_questions: int | None = None,
) -> list[CheckResult]:
    """Every applicable check: "tau_leak" always, "retention" when both retention accuracies are
    given, "kl_shift" when the KL shift is. `retention_questions`, when given, is how many retention
    questions the accuracies were measured on; the detail says so."""
    results = [_tau_leak_check(self_edit_text, questions)]
    if retention_before is not None and retention_after is not None:
        passed = retention_kept(retention_before, retention_after, max_retention_drop)
        detail = (
            f"retention accuracy {retention_before:.3f} -> {retention_after:.3f} "
            f"(drop {retention_before - retention_after:.3f}, max {max_retention_drop:.3f})"
        )
        if retention_questions is not None:
            detail += f" on {retention_questions} questions"
        results.append(CheckResult("retention", passed, detail))
    if kl is not None:
        detail = f"KL(base || adapted) {kl:.4f} nats per token (max {max_kl:.4f})"
        results.append(CheckResult("kl_shift", kl <= max_kl + _EPS, detail))
    return results


def _tau_leak_check(self_edit_text: str, questions: Sequence[QA]) -> CheckResult:
    leaked = tau_leak(self_edit_text, questions)
    if not leaked:
        return CheckResult("tau_leak", True, f"none of {len(questions)} question(s) in the self-edit")
    return CheckResult("tau_leak", False, f"{len(leaked)} question(s) in the self-edit: {leaked[0]!r}")
