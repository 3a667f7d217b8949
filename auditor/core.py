"""The auditor's core: judge one adapter against a document's held-out questions τ.

SEAL's reward for a self-edit is the accuracy gain on τ of the model updated on it. This module
computes that gain, runs the guardrails, and returns an unsigned `Verdict`; the servicer signs it.
It imports no protobuf.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from auditor.evaluation import anchor_accuracy, evaluate_document, load_adapter, unload_adapter
from auditor.grading import accuracy, reward
from auditor.guardrails import CheckResult, run_guardrails
from seal.digests import directory_manifest, document_sha256, manifest_sha256, self_edit_sha256
from seal.records import Document, QuestionScore, SelfEdit, Verdict


class AdapterMismatchError(ValueError):
    """The adapter on disk is not the one the verdict would name."""


def audit(
    base_model: Any,
    tokenizer: Any,
    doc: Document,
    self_edit: SelfEdit,
    adapter_dir: Path,
    adapter_sha256: str,
    base_fingerprint: str,
    job_id: str,
    baseline_scores: list[QuestionScore] | None = None,
    metric: str = "contains",
    max_forgetting: float = 0.2,
    check_forgetting: bool = True,
    max_new_tokens: int = 48,
    anchor_before: float | None = None,
) -> Verdict:
    """Evaluate `doc`'s τ before and after the adapter; an unsigned verdict of reward and checks.

    `baseline_scores` and `anchor_before` depend only on the base model (and document), so callers
    cache them; they are computed here when missing. The base model is restored even on error.
    """
    started = time.perf_counter()
    # Sign only for the files we actually evaluate (weights and config alike): a swapped or edited
    # file must not inherit a verdict.
    actual_sha = manifest_sha256(directory_manifest(Path(adapter_dir)))
    if actual_sha != adapter_sha256:
        raise AdapterMismatchError(
            f"adapter in {adapter_dir} has manifest sha256 {actual_sha}, but the request names {adapter_sha256}"
        )
    if baseline_scores is None:
        baseline_scores = evaluate_document(base_model, tokenizer, doc, metric, max_new_tokens)
    if check_forgetting and anchor_before is None:
        anchor_before = anchor_accuracy(base_model, tokenizer, max_new_tokens)

    peft_model = load_adapter(base_model, Path(adapter_dir))
    try:
        adapted_scores = evaluate_document(peft_model, tokenizer, doc, metric, max_new_tokens)
        anchor_after = anchor_accuracy(peft_model, tokenizer, max_new_tokens) if check_forgetting else None
    finally:
        unload_adapter(peft_model)

    training_text = "\n".join((self_edit.text, *self_edit.lines))
    checks = run_guardrails(
        training_text,
        doc.questions,
        anchor_before,
        anchor_after,
        max_forgetting,
    )
    baseline_acc = accuracy(baseline_scores)
    adapted_acc = accuracy(adapted_scores)
    gain = reward(baseline_acc, adapted_acc)
    return Verdict(
        job_id=job_id,
        doc_index=self_edit.doc_index,
        self_edit_id=self_edit.id,
        adapter_sha256=adapter_sha256,
        base_fingerprint=base_fingerprint,
        baseline_accuracy=baseline_acc,
        adapted_accuracy=adapted_acc,
        reward=gain,
        baseline_scores=tuple(baseline_scores),
        adapted_scores=tuple(adapted_scores),
        eval_seconds=time.perf_counter() - started,
        passed=gain > 0 and all(c.passed for c in checks),
        checks=tuple(format_check(c) for c in checks),
        self_edit_sha256=self_edit_sha256(self_edit),
        document_sha256=document_sha256(doc),
        teacher_model=self_edit.teacher_model,
        grading_metric=metric,
    )


def format_check(check: CheckResult) -> str:
    """A check as the verdict records it: "name:pass" or "name:fail:detail"."""
    return f"{check.name}:pass" if check.passed else f"{check.name}:fail:{check.detail}"
