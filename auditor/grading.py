"""Grading τ answers: SQuAD v1.1 normalization, exact match, token F1, containment, reward.

Pure functions. The SEAL paper grades free-form answers to held-out questions; a small model's
answers are rarely verbatim, so the default metric is "contains" (the gold answer appears, on token
boundaries, inside the response) with exact match and F1 recorded beside it. The paper grades with an
LLM judge instead (auditor.judge): its grade is recorded beside these, and counts under "judge".
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

from seal.records import QuestionScore

DETERMINISTIC_METRICS = ("contains", "exact_match", "f1")
JUDGE_METRIC = "judge"
"""`correct` follows the LLM judge (auditor.judge); allowed only where a judge is configured."""
GRADING_METRICS = (*DETERMINISTIC_METRICS, JUDGE_METRIC)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's official normalization: lowercase, drop punctuation and articles, squash spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 over normalized tokens (both empty counts as a perfect match)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens and not gold_tokens:
        return 1.0
    if not pred_tokens or not gold_tokens:
        return 0.0
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def answer_contained(response: str, gold: str) -> bool:
    """Whether the normalized gold is a contiguous run of whole tokens of the normalized response.

    Whole tokens, so that gold "art" is not found in "party"; an answer that normalizes to nothing
    (e.g. "The.") can never be contained, or every response would be graded correct.
    """
    gold_tokens = normalize_answer(gold).split()
    if not gold_tokens:
        return False
    resp_tokens = normalize_answer(response).split()
    n = len(gold_tokens)
    return any(resp_tokens[i : i + n] == gold_tokens for i in range(len(resp_tokens) - n + 1))


def grade_answer(
    question: str,
    gold: str,
    response: str,
    metric: str = "contains",
    f1_threshold: float = 0.5,
    judged_correct: bool | None = None,
) -> QuestionScore:
    """Score one response with every metric; `correct` follows the chosen `metric`.

    `judged_correct` is the LLM judge's grade, recorded when given; the metric "judge" needs it.
    """
    if metric not in GRADING_METRICS:
        raise ValueError(f"unknown grading metric {metric!r}; choose one of {', '.join(GRADING_METRICS)}")
    if metric == JUDGE_METRIC and judged_correct is None:
        raise ValueError("grading metric 'judge' needs the judge's grade, and none was given")
    em = exact_match(response, gold)
    f1 = token_f1(response, gold)
    contains = answer_contained(response, gold)
    by_metric = {
        "contains": contains,
        "exact_match": em,
        "f1": f1 >= f1_threshold,
        JUDGE_METRIC: judged_correct,
    }
    correct = bool(by_metric[metric])
    return QuestionScore(
        question=question,
        answer=gold,
        response=response,
        exact_match=em,
        f1=f1,
        contains=contains,
        correct=correct,
        judged_correct=judged_correct,
    )


def accuracy(scores: Sequence[QuestionScore]) -> float:
    """Fraction of scores marked correct (no questions counts as 0.0, not a division by zero)."""
    if not scores:
        return 0.0
    return sum(s.correct for s in scores) / len(scores)


def reward(baseline_accuracy: float, adapted_accuracy: float) -> float:
    """SEAL's reward signal: how much the self-edit's update improved accuracy on τ."""
    return adapted_accuracy - baseline_accuracy
