"""Certifying a deployment version: the base with every promoted adapter merged, re-checked as a whole.

A promotion adds a layer to what is served, so a verdict about one adapter alone is not enough: the
SEAL paper's continual-learning experiment shows later updates erasing earlier ones. Before an alias
moves, the auditor builds the version exactly as it will be served (each adapter merged into the
weights in order, `seal.models.merge_adapters`), asks it the sign-off questions of every document the
deployment has learned (one row of the documents x versions matrix), and measures retention against
the base; the gateway compares the row with the parent version's. Pure: no Redis, no gRPC.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auditor.evaluation import evaluate_document
from auditor.grading import accuracy
from auditor.guardrails import CheckResult
from auditor.retention import Continuation, continuation_batch, token_kl
from seal.models import merge_adapters
from seal.records import Certificate, Document, DocumentAccuracy, LearnedDocument


def kl_between(
    base_model: Any, model: Any, tokenizer: Any, sequences: Sequence[Continuation], batch_size: int = 8
) -> float:
    """Mean per-token KL(base || model) over the continuation tokens of `sequences`: the KL shift of a
    merged model, whose base is a separate model (auditor.retention.kl_shift is for a PEFT model)."""
    import torch

    total, count = 0.0, 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(sequences), batch_size):
        ids, attention, targets = continuation_batch(
            sequences[start : start + batch_size], pad_id, model.device
        )
        with torch.no_grad():
            base = base_model(input_ids=ids, attention_mask=attention).logits
            other = model(input_ids=ids, attention_mask=attention).logits
        kl = token_kl(base[targets], other[targets])
        total += float(kl.sum())
        count += int(kl.numel())
    return total / count if count else 0.0


@dataclasses.dataclass(frozen=True)
class RetentionProbe:
    """How the merged model's retention is measured, and the limits it must keep."""

    measure: Any
    """(model) -> (retention accuracy, KL shift to the base) on the auditor's retention set."""
    baseline: float
    """The base model's retention accuracy (computed once per auditor)."""
    max_retention_drop: float
    max_kl: float


def certify(
    base_model: Any,
    tokenizer: Any,
    deployment: str,
    version: int,
    fingerprint: str,
    base_fingerprint: str,
    adapter_dirs: Sequence[Path],
    adapter_sha256s: Sequence[str],
    documents: Sequence[LearnedDocument],
    metric: str = "contains",
    answer_style: str = "chat",
    retention: RetentionProbe | None = None,
) -> Certificate:
    """An unsigned certificate of the version made of `adapter_dirs` merged into `base_model` in order.

    `base_model` is left untouched (the merge works on a copy). Every document in `documents` gets its
    sign-off accuracy; with `retention`, the merged model's retention accuracy and KL shift are checked.
    """
    started = time.perf_counter()
    model = merge_adapters(base_model, adapter_dirs)
    try:
        rows = tuple(
            DocumentAccuracy(
                job_id=doc.job_id,
                doc_index=doc.doc_index,
                document_sha256=doc.document_sha256,
                accuracy=accuracy(
                    evaluate_document(
                        model,
                        tokenizer,
                        Document(title=doc.title, questions=doc.signoff_questions),
                        metric,
                        style=answer_style,
                    )
                ),
            )
            for doc in documents
        )
        checks: list[CheckResult] = []
        retained, kl = 0.0, 0.0
        if retention is not None:
            retained, kl = retention.measure(model)
            drop = retention.baseline - retained
            checks.append(
                CheckResult(
                    "retention",
                    drop <= retention.max_retention_drop + 1e-9,
                    f"retention accuracy {retention.baseline:.3f} -> {retained:.3f} "
                    f"(max drop {retention.max_retention_drop:.3f})",
                )
            )
            checks.append(
                CheckResult(
                    "kl_shift",
                    kl <= retention.max_kl,
                    f"KL to the base {kl:.4f} (max {retention.max_kl:.4f})",
                )
            )
    finally:
        del model
    return Certificate(
        deployment=deployment,
        version=version,
        fingerprint=fingerprint,
        base_fingerprint=base_fingerprint,
        adapter_sha256s=tuple(adapter_sha256s),
        documents=rows,
        retention_baseline=retention.baseline if retention is not None else 0.0,
        retention_accuracy=retained,
        kl_shift=kl,
        checks=tuple(f"{c.name}:pass" if c.passed else f"{c.name}:fail:{c.detail}" for c in checks),
        passed=all(c.passed for c in checks),
        grading_metric=metric,
        eval_seconds=time.perf_counter() - started,
    )
