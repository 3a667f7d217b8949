"""Checks on requests, done once at the front door (and again by services reached directly).

Each check raises InvalidArgument naming the field and the allowed range, so a caller knows what
to fix. Pure functions over domain records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from seal.errors import InvalidArgument
from seal.gate import MAX_MIN_HITS
from seal.records import Document, EditFormat, JobSpec, LoraSettings, SamplingSettings

# The linear layers LoRA may target in the Llama-family models seal serves (SmolLM2, Qwen2.5, Llama):
# checked at the front door, so a typo fails the request instead of the student, minutes later.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Learning-rate schedules of the inner loop (student.training.make_scheduler).
SCHEDULES = ("linear", "constant")
# The outer loop: how self-edits are selected, and what the policy update optimizes.
SELECTIONS = ("best_of_n", "threshold")
OBJECTIVES = ("sft", "dpo", "discopop")
PREFERENCE_OBJECTIVES = ("dpo", "discopop")


@dataclass(frozen=True)
class Limits:
    max_documents: int = 32
    max_self_edits: int = 16
    max_context_chars: int = 8000
    max_title_chars: int = 300
    max_questions: int = 200
    max_question_chars: int = 2000
    # What a self-edit's own update directives may ask for (teacher.core.apply_directives).
    max_directive_rank: int = 64
    max_directive_epochs: int = 20
    min_directive_learning_rate: float = 1e-5
    max_directive_learning_rate: float = 1e-2
    # Policy-training jobs (the ReST-EM outer loop).
    max_rounds: int = 10
    max_policy_contexts: int = 200
    max_seeds: int = 5
    # The share of each document's questions kept for sign-off (promotion), never used for selection.
    signoff_fraction: float = 0.0


def check_range(field: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidArgument(
            field, f"must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}"
        )
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        raise InvalidArgument(field, f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")


def check_int_range(field: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer in [{low}, {high}], got {value!r}")
    check_range(field, value, low, high)


def validate_lora(lora: LoraSettings, prefix: str = "lora") -> None:
    check_int_range(f"{prefix}.rank", lora.rank, 1, 256)
    check_range(f"{prefix}.alpha", lora.alpha, 0, 4096, low_open=True)
    check_range(f"{prefix}.learning_rate", lora.learning_rate, 0, 0.1, low_open=True)
    check_int_range(f"{prefix}.epochs", lora.epochs, 1, 100)
    check_int_range(f"{prefix}.batch_size", lora.batch_size, 1, 256)
    check_int_range(f"{prefix}.max_seq_len", lora.max_seq_len, 16, 8192)
    check_int_range(f"{prefix}.seed", lora.seed, 0, 2**31 - 1)
    check_int_range(f"{prefix}.replay", lora.replay, 0, 256)
    check_range(f"{prefix}.kl_weight", lora.kl_weight, 0, 100)
    check_int_range(f"{prefix}.gate", lora.gate, 0, MAX_MIN_HITS)
    if lora.schedule not in SCHEDULES:
        raise InvalidArgument(
            f"{prefix}.schedule", f"must be one of {', '.join(SCHEDULES)}, got {lora.schedule!r}"
        )
    check_range(f"{prefix}.max_grad_norm", lora.max_grad_norm, 0, 1000)
    if not lora.target_modules:
        raise InvalidArgument(f"{prefix}.target_modules", "must list at least one module name, e.g. q_proj")
    unknown = [m for m in lora.target_modules if m not in TARGET_MODULES]
    if unknown:
        raise InvalidArgument(
            f"{prefix}.target_modules",
            f"unknown module(s) {unknown}; choose from {', '.join(TARGET_MODULES)}",
        )


def validate_sampling(sampling: SamplingSettings, prefix: str = "sampling") -> None:
    check_range(f"{prefix}.temperature", sampling.temperature, 0, 2)
    check_range(f"{prefix}.top_p", sampling.top_p, 0, 1, low_open=True)
    check_int_range(f"{prefix}.max_new_tokens", sampling.max_new_tokens, 1, 4096)
    check_int_range(f"{prefix}.seed", sampling.seed, 0, 2**31 - 1)


def validate_passage(title: str, context: str, limits: Limits, prefix: str) -> None:
    if not isinstance(title, str) or not title.strip():
        raise InvalidArgument(f"{prefix}.title", "must not be empty")
    if len(title) > limits.max_title_chars:
        raise InvalidArgument(
            f"{prefix}.title", f"must be at most {limits.max_title_chars} characters, got {len(title)}"
        )
    if not isinstance(context, str) or not context.strip():
        raise InvalidArgument(f"{prefix}.context", "must not be empty")
    if len(context) > limits.max_context_chars:
        raise InvalidArgument(
            f"{prefix}.context", f"must be at most {limits.max_context_chars} characters, got {len(context)}"
        )


def validate_document(doc: Document, limits: Limits, prefix: str) -> None:
    validate_passage(doc.title, doc.context, limits, prefix)
    if not doc.questions:
        raise InvalidArgument(f"{prefix}.questions", "τ must hold at least one question with its answer")
    if len(doc.questions) > limits.max_questions:
        raise InvalidArgument(
            f"{prefix}.questions",
            f"must hold at most {limits.max_questions} questions, got {len(doc.questions)}",
        )
    if len(doc.questions) + len(doc.signoff_questions) > limits.max_questions:
        raise InvalidArgument(
            f"{prefix}.questions",
            f"must hold at most {limits.max_questions} questions with the sign-off questions, "
            f"got {len(doc.questions) + len(doc.signoff_questions)}",
        )
    for kind, questions in (("questions", doc.questions), ("signoff_questions", doc.signoff_questions)):
        for j, qa in enumerate(questions):
            if not isinstance(qa.question, str) or not qa.question.strip():
                raise InvalidArgument(f"{prefix}.{kind}[{j}].question", "must not be empty")
            if len(qa.question) > limits.max_question_chars:
                raise InvalidArgument(
                    f"{prefix}.{kind}[{j}].question",
                    f"must be at most {limits.max_question_chars} characters",
                )
            if not isinstance(qa.answer, str) or not qa.answer.strip():
                raise InvalidArgument(f"{prefix}.{kind}[{j}].answer", "every question needs its answer")


def signoff_count(questions: int, fraction: float) -> int:
    """How many of a document's `questions` are kept for sign-off: round(n x fraction), at least one
    when the fraction is above 0; 0 switches the split off."""
    return 0 if fraction <= 0 else max(1, round(questions * fraction))


def validate_signoff_split(spec: JobSpec, fraction: float) -> None:
    """Each document of a knowledge job can be split into selection and sign-off questions."""
    if spec.policy_training is not None or fraction <= 0:
        return  # policy-training contexts are never promoted: all their questions select
    for i, doc in enumerate(spec.documents):
        if doc.signoff_questions:
            continue  # the submitter chose the sign-off questions itself
        n = len(doc.questions)
        k = signoff_count(n, fraction)
        if n - k < 1:
            raise InvalidArgument(
                f"documents[{i}].questions",
                f"has {n} question(s); the sign-off split ({fraction:.0%} of the questions, at least one) "
                f"needs at least {k + 1}: one or more to select the best self-edit on and {k} to sign it "
                "off on. Add questions, give signoff_questions yourself, or set --signoff-fraction 0",
            )


def validate_job_spec(spec: JobSpec, limits: Limits, deployment_model: str) -> None:
    """Everything a job must satisfy before anything is enqueued."""
    if not spec.documents:
        raise InvalidArgument("documents", "must hold at least one document (title, context, questions)")
    max_documents = limits.max_policy_contexts if spec.policy_training else limits.max_documents
    if len(spec.documents) > max_documents:
        raise InvalidArgument(
            "documents",
            f"must hold at most {max_documents} {'training contexts' if spec.policy_training else 'documents'}, "
            f"got {len(spec.documents)}",
        )
    for i, doc in enumerate(spec.documents):
        validate_document(doc, limits, f"documents[{i}]")
    check_int_range("n_self_edits", spec.n_self_edits, 1, limits.max_self_edits)
    if spec.edit_format == EditFormat.PASSAGE:
        raise InvalidArgument(
            "edit_format", "must be implications, rewrite or self_qa (passage is the control)"
        )
    check_int_range("seeds", spec.seeds, 1, limits.max_seeds)
    check_int_range("samples_per_edit", spec.samples_per_edit, 1, 8)
    validate_lora(spec.lora)
    validate_sampling(spec.sampling)
    if spec.parent_job_id:
        raise InvalidArgument(
            "parent_job_id", "is set by the gateway for the rounds it starts; leave it empty"
        )
    if spec.policy_training is not None:
        validate_policy_training(spec, limits)
    validate_signoff_split(spec, limits.signoff_fraction)
    if spec.model and spec.model != deployment_model:
        raise InvalidArgument(
            "model", f"unknown model {spec.model!r}; this deployment adapts {deployment_model!r}"
        )


def validate_policy_training(spec: JobSpec, limits: Limits) -> None:
    """What a policy-training job must satisfy beyond an ordinary job's checks."""
    training = spec.policy_training
    assert training is not None
    check_int_range("policy_training.rounds", training.rounds, 1, limits.max_rounds)
    if training.selection not in SELECTIONS:
        raise InvalidArgument(
            "policy_training.selection", f"must be one of {', '.join(SELECTIONS)}, got {training.selection!r}"
        )
    check_range("policy_training.reward_threshold", training.reward_threshold, -1, 1)
    policy, prefix = training.policy, "policy_training.policy"
    if policy.objective not in OBJECTIVES:
        raise InvalidArgument(
            f"{prefix}.objective", f"must be one of {', '.join(OBJECTIVES)}, got {policy.objective!r}"
        )
    check_int_range(f"{prefix}.rank", policy.rank, 1, 256)
    check_range(f"{prefix}.alpha", policy.alpha, 0, 4096, low_open=True)
    check_range(f"{prefix}.learning_rate", policy.learning_rate, 0, 0.1, low_open=True)
    check_int_range(f"{prefix}.epochs", policy.epochs, 1, 20)
    check_int_range(f"{prefix}.batch_size", policy.batch_size, 1, 64)
    check_range(f"{prefix}.beta", policy.beta, 0, 10, low_open=True)
    check_range(f"{prefix}.discopop_tau", policy.discopop_tau, 0, 10, low_open=True)
    check_int_range(f"{prefix}.max_seq_len", policy.max_seq_len, 64, 8192)
    check_int_range(f"{prefix}.seed", policy.seed, 0, 2**31 - 1)
    if spec.n_self_edits < 2 and policy.objective in PREFERENCE_OBJECTIVES:
        raise InvalidArgument(
            "n_self_edits",
            f"objective {policy.objective} pairs a better and a worse self-edit: needs at least 2",
        )
