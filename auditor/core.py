"""The auditor's core: judge one adapter against a document's held-out questions τ.

SEAL's reward for a self-edit is the accuracy gain on τ of the model updated on it. This module
computes that gain, runs the guardrails, and returns an unsigned `Verdict`; the servicer signs it.
With an LLM judge every τ answer also gets the judge's grade, and the verdict names the judge's model.
It imports no protobuf.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

from auditor.evaluation import (
    VLLMModel,
    evaluate_document,
    load_adapter,
    question_prompt,
    style_prompt,
    unload_adapter,
)
from auditor.grading import GRADING_METRICS, JUDGE_METRIC, accuracy, reward
from auditor.guardrails import MAX_KL, MAX_RETENTION_DROP, CheckResult, run_guardrails
from auditor.judge import Judge, judge_scores
from auditor.retention import (
    Continuation,
    base_continuations,
    kl_shift,
    load_kl_prompts,
    load_retention_set,
    retention_correct,
)
from seal.digests import directory_manifest, document_sha256, manifest_sha256, self_edit_sha256
from seal.errors import InvalidArgument
from seal.gate import Gate, applies, document_gate, partition
from seal.records import FORGETTING_UNCHECKED, QA, Document, QuestionScore, SelfEdit, Verdict

REWARD_ONLY_DETAIL = (
    "reward-only audit of a policy-training round: retention and KL were not measured; never promotable"
)


class AdapterMismatchError(ValueError):
    """The adapter on disk is not the one the verdict would name."""


def check_grading_metric(metric: str, judge_configured: bool) -> None:
    """InvalidArgument unless `metric` is known, and "judge" only where a judge is configured."""
    if metric not in GRADING_METRICS:
        raise InvalidArgument(
            "grading_metric", f"must be one of {', '.join(GRADING_METRICS)}, got {metric!r}"
        )
    if metric == JUDGE_METRIC and not judge_configured:
        raise InvalidArgument(
            "grading_metric",
            "is 'judge', but no LLM judge is configured: set --judge-base-url and --judge-model "
            "(SEAL_JUDGE_BASE_URL, SEAL_JUDGE_MODEL) or choose contains, exact_match or f1",
        )


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
    signoff_baseline: list[QuestionScore] | None = None,
    metric: str = "contains",
    max_new_tokens: int | None = None,
    retention: Retention | None = None,
    judge: Judge | None = None,
    answer_style: str = "chat",
    vllm_base: VLLMModel | None = None,
    model_lock: contextlib.AbstractContextManager[Any] | None = None,
    reward_only: bool = False,
) -> Verdict:
    """Evaluate `doc`'s τ before and after the adapter; an unsigned verdict of reward and checks.

    `baseline_scores` and `retention` depend only on the base model (and document), so callers cache
    them (`base_retention`); without `retention` the retention and KL checks are skipped. The base
    model is restored even on error. With `judge`, every τ answer is also graded by it; a judge that
    cannot answer raises JudgeError, and no verdict is made. With `vllm_base` (the same base model on a
    vLLM server), every question is answered there, the adapter loaded into the engine for the
    purpose; only the KL shift, which needs full distributions, still runs on `base_model`, under
    `model_lock` (the caller's lock on `base_model`, so that several audits can answer at once).
    `reward_only` (a policy-training round's E-step, which needs τ alone): pass no `retention`; the
    verdict carries a failed FORGETTING_UNCHECKED check, so it can never be promoted.

    The adapter is judged as it will be served: behind the gate of `doc` that the self-edit's
    `lora.gate` sets (seal.gate), every question and general prompt the gate stays closed for is
    answered by the base, so it keeps the base's score (reused, not asked again) and adds no KL.
    """
    if reward_only and retention is not None:
        raise ValueError("a reward-only audit measures no retention: pass retention=None")
    model_lock = model_lock if model_lock is not None else contextlib.nullcontext()
    check_grading_metric(metric, judge is not None)
    started = time.perf_counter()
    # Sign only for the files we actually evaluate (weights and config alike): a swapped or edited
    # file must not inherit a verdict.
    actual_sha = manifest_sha256(directory_manifest(Path(adapter_dir)))
    if actual_sha != adapter_sha256:
        raise AdapterMismatchError(
            f"adapter in {adapter_dir} has manifest sha256 {actual_sha}, but the request names {adapter_sha256}"
        )
    # The engine that answers: the transformers model itself, or the same base on a vLLM server.
    asker = base_model if vllm_base is None else vllm_base
    if baseline_scores is None:
        baseline_scores = evaluate_document(
            asker, tokenizer, doc, metric, max_new_tokens, style=answer_style, judge=judge
        )
    elif judge is not None:
        baseline_scores = judge_scores(judge, baseline_scores, metric)
    signoff_doc = dataclasses.replace(doc, questions=doc.signoff_questions)
    gate = document_gate(doc.title, doc.context, self_edit.lora.gate)
    if doc.signoff_questions and signoff_baseline is None:
        signoff_baseline = evaluate_document(
            asker, tokenizer, signoff_doc, metric, max_new_tokens, style=answer_style, judge=judge
        )

    # On transformers the answering PEFT model also gives the KL shift; with vLLM, only the KL needs
    # the local model, so it waits for `model_lock` alone, after the answers.
    kl_here = retention is not None and vllm_base is None
    with adapted_models(base_model, Path(adapter_dir), adapter_sha256, vllm_base, kl_here) as (
        adapted,
        peft_model,
    ):

        def ask(document: Document, baseline: list[QuestionScore]) -> list[QuestionScore]:
            return gated_scores(
                gate, adapted, tokenizer, document, baseline, metric, max_new_tokens, answer_style, judge
            )

        adapted_scores = ask(doc, baseline_scores)
        # The sign-off questions: scored for the verdict that gates promotion, never for the reward.
        signoff_scores = ask(signoff_doc, signoff_baseline or []) if doc.signoff_questions else []
        retention_after = (
            gated_retention(gate, adapted, tokenizer, retention, answer_style)
            if retention is not None
            else None
        )
        kl = gated_kl(gate, peft_model, tokenizer, retention) if retention is not None and kl_here else None
    if retention is not None and not kl_here:
        with model_lock:
            peft_model = load_adapter(base_model, Path(adapter_dir))
            try:
                kl = gated_kl(gate, peft_model, tokenizer, retention)
            finally:
                unload_adapter(peft_model)

    training_text = "\n".join((self_edit.text, *self_edit.lines))
    checks = run_guardrails(
        training_text,
        (*doc.questions, *doc.signoff_questions),
        retention_before=retention.baseline if retention is not None else None,
        retention_after=retention_after,
        max_retention_drop=retention.max_drop if retention is not None else 0.0,
        kl=kl,
        max_kl=retention.max_kl if retention is not None else 0.0,
        retention_questions=(
            len(retention.questions) if retention is not None and retention.questions is not None else None
        ),
    )
    signoff_before = accuracy(signoff_baseline) if signoff_baseline else 0.0
    signoff_after = accuracy(signoff_scores) if signoff_scores else 0.0
    if doc.signoff_questions:
        checks.append(signoff_check(signoff_before, signoff_after, len(doc.signoff_questions)))
    if reward_only:
        # A failed check, not a missing one: everything that reads verdicts already refuses it.
        checks.append(CheckResult(FORGETTING_UNCHECKED, False, REWARD_ONLY_DETAIL))
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
        judge_model=judge.model if judge is not None else "",
        signoff_baseline_accuracy=signoff_before,
        signoff_adapted_accuracy=signoff_after,
        signoff_scores=tuple(signoff_scores),
    )


@contextlib.contextmanager
def adapted_models(
    base_model: Any, adapter_dir: Path, adapter_sha256: str, vllm_base: VLLMModel | None, need_peft: bool
) -> Iterator[tuple[Any, Any]]:
    """(the model that answers, the PEFT model for the KL shift or None) with the adapter in place.

    On transformers both are one PEFT model over `base_model`; with vLLM the answering model is the
    adapter loaded into the server under its digest, unloaded again afterwards. The base is restored
    even on error.
    """
    peft_model = load_adapter(base_model, adapter_dir) if vllm_base is None or need_peft else None
    name = ""
    try:
        if vllm_base is not None:
            name = vllm_base.engine.load_lora(f"adapter-{adapter_sha256[:16]}", adapter_dir)
            yield VLLMModel(vllm_base.engine, name), peft_model
        else:
            yield peft_model, peft_model
    finally:
        if name:
            vllm_base.engine.unload_lora(name)  # type: ignore[union-attr]
        if peft_model is not None:
            unload_adapter(peft_model)


def gated_scores(
    gate: Gate | None,
    adapted: Any,
    tokenizer: Any,
    doc: Document,
    baseline: list[QuestionScore],
    metric: str,
    max_new_tokens: int | None,
    style: str,
    judge: Judge | None,
) -> list[QuestionScore]:
    """`doc`'s questions as the gated adapter answers them: those its gate opens for asked to
    `adapted`, the rest keeping their `baseline` score (the base answers them)."""
    opened, _ = partition(gate, [question_prompt(doc.title, qa.question, style) for qa in doc.questions])
    scores = list(baseline)
    if opened:
        asked = dataclasses.replace(doc, questions=tuple(doc.questions[i] for i in opened))
        fresh = evaluate_document(adapted, tokenizer, asked, metric, max_new_tokens, style=style, judge=judge)
        for i, score in zip(opened, fresh, strict=True):
            scores[i] = score
    return scores


# --- routed measurement: each prompt answered by the model its gates pick (None: the base itself) -----
# One pair of helpers for the audit of one gated adapter and the certification of a routed version.

ADAPTED = "adapted"
"""The audit's one routing key besides None (the base)."""


def routed_retention_accuracy(
    retention: Retention,
    tokenizer: Any,
    style: str,
    key_for: Callable[[str], Hashable | None],
    model_of: Callable[[Hashable | None], Any],
    unrouted_key: Hashable,
) -> float:
    """Retention accuracy when each question goes to the model `key_for(prompt)` names, built once per
    key by `model_of`. A question routed to None (the base) keeps the base's cached result; without
    those results every question goes to `unrouted_key`."""
    questions = retention.questions if retention.questions is not None else load_retention_set()
    known = len(retention.baseline_correct) == len(questions)
    correct = list(retention.baseline_correct) if known else [False] * len(questions)
    groups: dict[Hashable | None, list[int]] = {}
    for i, qa in enumerate(questions):
        key = key_for(style_prompt(qa.question, style)) if known else unrouted_key
        groups.setdefault(key, []).append(i)
    for key, positions in groups.items():
        if key is not None:
            fresh = retention_correct(model_of(key), tokenizer, [questions[i] for i in positions], style)
            for i, right in zip(positions, fresh, strict=True):
                correct[i] = right
    return sum(correct) / len(correct) if correct else 0.0


def routed_kl(
    retention: Retention,
    key_for: Callable[[str], Hashable | None],
    kl_of: Callable[[Hashable, list[Continuation]], float],
    unrouted_key: Hashable,
) -> float:
    """Mean per-token KL shift over all of `retention`'s continuations when each goes to the model its
    prompt routes to: `kl_of(key, continuations)` is that model's mean KL on them; a continuation routed
    to None (the base itself) adds exactly 0. Without the prompts' texts all go to `unrouted_key`."""
    sequences = retention.sequences
    routed = len(retention.kl_prompts) == len(sequences)
    groups: dict[Hashable | None, list[Continuation]] = {}
    for i, continuation in enumerate(sequences):
        key = key_for(retention.kl_prompts[i]) if routed else unrouted_key
        groups.setdefault(key, []).append(continuation)

    def tokens(rows: Sequence[Continuation]) -> int:
        return sum(len(c.ids) - c.prompt_len for c in rows)

    total = sum(kl_of(key, rows) * tokens(rows) for key, rows in groups.items() if key is not None)
    return total / tokens(sequences) if tokens(sequences) else 0.0


def gated_retention(
    gate: Gate | None, adapted: Any, tokenizer: Any, retention: Retention, style: str
) -> float:
    """Retention accuracy of the gated adapter: only the questions its gate opens for are asked again."""
    return routed_retention_accuracy(
        retention,
        tokenizer,
        style,
        lambda prompt: ADAPTED if applies(gate, prompt) else None,
        lambda _: adapted,
        ADAPTED,
    )


def gated_kl(gate: Gate | None, peft_model: Any, tokenizer: Any, retention: Retention) -> float:
    """Mean per-token KL shift of the gated adapter over all the continuations (the prompts its gate
    stays closed for are answered by the base itself)."""
    return routed_kl(
        retention,
        lambda prompt: ADAPTED if applies(gate, prompt) else None,
        lambda _, rows: kl_shift(peft_model, tokenizer, rows),
        ADAPTED,
    )


def signoff_check(before: float, after: float, questions: int) -> CheckResult:
    """Passes when the update answers more of the held-out sign-off questions than the base did."""
    detail = (
        f"sign-off accuracy {before:.3f} -> {after:.3f} on {questions} question(s) never used for selection"
    )
    return CheckResult("signoff", after > before, detail)


@dataclasses.dataclass(frozen=True)
class Retention:
    """What an update must keep of its base: the base's accuracy on the retention set and its own
    continuations of the auditor's general prompts (for the KL shift), with the limits."""

    baseline: float
    sequences: tuple[Continuation, ...]
    max_drop: float = MAX_RETENTION_DROP
    max_kl: float = MAX_KL
    questions: tuple[QA, ...] | None = None
    """The retention questions `baseline` was measured on, asked again after the update; None: the
    whole retention set."""
    baseline_correct: tuple[bool, ...] = ()
    """The base's result on each of `questions` (what a gated adapter's closed questions keep)."""
    kl_prompts: tuple[str, ...] = ()
    """The general prompts `sequences` continue, in order (what a gate is asked about)."""


def base_retention(
    base_model: Any,
    tokenizer: Any,
    answer_style: str = "chat",
    max_drop: float = MAX_RETENTION_DROP,
    max_kl: float = MAX_KL,
    vllm_base: VLLMModel | None = None,
    questions: int = 0,
) -> Retention:
    """The base model's side of the retention checks: computed once per auditor, then cached. With
    `vllm_base` the retention questions are answered there (as the adapted model's will be).
    `questions` > 0 keeps only the first that many of the retention set (cheaper, coarser)."""
    asked = load_retention_set()[:questions] if questions > 0 else load_retention_set()
    correct = retention_correct(vllm_base or base_model, tokenizer, asked, style=answer_style)
    prompts = load_kl_prompts()
    return Retention(
        baseline=sum(correct) / len(correct) if correct else 0.0,
        sequences=tuple(base_continuations(base_model, tokenizer, prompts)),
        max_drop=max_drop,
        max_kl=max_kl,
        questions=asked,
        baseline_correct=tuple(correct),
        kl_prompts=tuple(prompts),
    )


def format_check(check: CheckResult) -> str:
    """A check as the verdict records it: "name:pass" or "name:fail:detail"."""
    return f"{check.name}:pass" if check.passed else f"{check.name}:fail:{check.detail}"
