"""Certifying a deployment version: the base with every promoted adapter merged, re-checked as a whole.

A promotion adds a layer to what is served, so a verdict about one adapter alone is not enough: the
SEAL paper's continual-learning experiment shows later updates erasing earlier ones. Before an alias
moves, the auditor builds the version exactly as it will be served (for each prompt, the layers whose
gates open for it, merged into the weights in order, `seal.models.merge_adapters`; an ungated version
merges every layer), asks it the sign-off questions of every document the deployment has learned (one
row of the documents x versions matrix), and measures retention against the base; the gateway
compares the row with the parent version's. Pure: no Redis, no gRPC.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auditor.core import Retention, routed_kl, routed_retention_accuracy
from auditor.evaluation import evaluate_document, question_prompt
from auditor.grading import accuracy
from auditor.guardrails import CheckResult
from auditor.retention import Continuation, continuation_batch, token_kl
from seal.gate import Gate, Routes
from seal.models import merge_adapters
from seal.records import Certificate, Document, DocumentAccuracy, LearnedDocument, QuestionScore


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
    """How the version's retention is measured, and the limits it must keep."""

    retention: Retention
    """The base's side (auditor.core.base_retention): questions, per-question results, KL prompts."""
    answer_style: str = "chat"

    @property
    def baseline(self) -> float:
        return self.retention.baseline

    @property
    def max_retention_drop(self) -> float:
        return self.retention.max_drop

    @property
    def max_kl(self) -> float:
        return self.retention.max_kl


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
    gates: Sequence[Gate | None] | None = None,
) -> Certificate:
    """An unsigned certificate of the version made of `adapter_dirs` merged into `base_model` in order.

    Each prompt is answered by the layers whose `gates` open for it (seal.gate; None: every layer,
    one merged model), merged into a copy of `base_model`, which is left untouched. Every document in
    `documents` gets its sign-off accuracy; with `retention`, the version's retention accuracy and KL
    shift are checked, the prompts no layer opens for keeping the base's own results.
    """
    started = time.perf_counter()
    gates = list(gates) if gates is not None else [None] * len(adapter_dirs)
    if len(gates) != len(adapter_dirs):
        raise ValueError(f"{len(gates)} gates for {len(adapter_dirs)} layers")

    def build(layers: tuple[int, ...]) -> Any:
        return merge_adapters(base_model, [adapter_dirs[i] for i in layers]) if layers else base_model

    # One merged copy of the base at a time (each is the size of the model): the prompts are grouped by
    # the layers they open, so each group builds its model once.
    routes = Routes(gates, build, cache_size=1)
    try:
        rows = tuple(
            DocumentAccuracy(
                job_id=doc.job_id,
                doc_index=doc.doc_index,
                document_sha256=doc.document_sha256,
                accuracy=accuracy(
                    routed_scores(
                        routes,
                        tokenizer,
                        Document(title=doc.title, questions=doc.signoff_questions),
                        metric,
                        answer_style,
                    )
                ),
            )
            for doc in documents
        )
        checks: list[CheckResult] = []
        retained, kl = 0.0, 0.0
        if retention is not None:
            retained, kl = routed_retention(routes, base_model, tokenizer, retention)
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
        del routes
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


def routed_scores(
    routes: Routes, tokenizer: Any, doc: Document, metric: str, answer_style: str
) -> list[QuestionScore]:
    """`doc`'s questions, each answered by the layers its prompt opens."""
    prompts = [question_prompt(doc.title, qa.question, answer_style) for qa in doc.questions]
    scores: list[QuestionScore | None] = [None] * len(prompts)
    for layers, positions in routes.group(prompts).items():
        asked = dataclasses.replace(doc, questions=tuple(doc.questions[i] for i in positions))
        fresh = evaluate_document(routes.model(layers), tokenizer, asked, metric, style=answer_style)
        for i, score in zip(positions, fresh, strict=True):
            scores[i] = score
    return [s for s in scores if s is not None]


def routed_retention(
    routes: Routes, base_model: Any, tokenizer: Any, probe: RetentionProbe
) -> tuple[float, float]:
    """(retention accuracy, KL shift to the base) of the routed version: the prompts no layer opens
    for are the base's own (its cached per-question results, KL 0); the rest are asked again."""

    def key_for(prompt: str) -> tuple[int, ...] | None:
        return routes.layers_for(prompt) or None

    def model_of(key: Any) -> Any:
        return routes.model(key or ())

    every_layer = tuple(range(len(routes.gates)))
    accuracy_after = routed_retention_accuracy(
        probe.retention, tokenizer, probe.answer_style, key_for, model_of, every_layer
    )
    kl = routed_kl(
        probe.retention,
        key_for,
        lambda key, rows: kl_between(base_model, model_of(key), tokenizer, rows),
        every_layer,
    )
    return accuracy_after, kl
