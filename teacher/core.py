"""The teacher's core: turn a passage into candidate self-edits. No gRPC, no Redis."""

from __future__ import annotations

import dataclasses
import json
import math
import time

from seal.records import EditFormat, LoraSettings, Passage, SamplingSettings, SelfEdit
from seal.validation import Limits
from teacher.backends import Generator, token_usage
from teacher.prompts import build_prompt, parse_self_edit, split_directives

# What a self-edit may set for its own update, and the type each takes.
DIRECTIVE_KEYS = {"learning_rate": float, "epochs": int, "rank": int}


def self_edit_id(job_id: str, doc_index: int, index: int | str) -> str:
    """The deterministic id of a self-edit, so retried work lands on the same record."""
    return f"{job_id}/{doc_index}/{index}"


def propose_self_edits(
    generator: Generator,
    passage: Passage,
    fmt: EditFormat,
    n: int,
    lora: LoraSettings,
    sampling: SamplingSettings,
    job_id: str,
    doc_index: int,
    policy_version: str = "",
    limits: Limits | None = None,
    samples_per_edit: int = 1,
) -> list[SelfEdit]:
    """Sample `n` self-edits of `passage` in one generate call, with `policy_version` ("" = base).

    Each self-edit joins `samples_per_edit` samples (blank-line separated): one update on several
    samples of a context teaches a small student more than one sample does (docs/RESULTS.md).

    A completion that parses to no lines is kept (the student then trains on the passage alone):
    the outer RL loop needs its low reward. Directives a completion writes set its own LoRA
    settings within `limits`; refused ones leave `lora` as it is and say why on the self-edit.
    Each self-edit records the tokens its samples cost, where the generator counts them.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    limits = limits or Limits()
    prompt = build_prompt(passage, fmt)
    start = time.perf_counter()
    # The keyword only when a version is asked for, so a generator without policies still serves.
    extra = {"policy_version": policy_version} if policy_version else {}
    k = max(samples_per_edit, 1)
    (samples,) = generator.generate([prompt], sampling, n * k, **extra)
    seconds_each = (time.perf_counter() - start) / n
    if len(samples) != n * k:
        raise RuntimeError(
            f"generator {generator.name!r} returned {len(samples)} completions, wanted {n * k}"
        )
    edits = []
    for index in range(n):
        own = samples[index * k : (index + 1) * k]
        text = "\n\n".join(own)
        prompt_tokens, completion_tokens = token_usage(own)
        directives = split_directives(text)[0]
        effective, error = apply_directives(lora, directives, limits)
        edits.append(
            SelfEdit(
                id=self_edit_id(job_id, doc_index, index),
                job_id=job_id,
                doc_index=doc_index,
                index=index,
                format=fmt,
                passage=passage,
                text=text,
                lines=parse_self_edit(text, fmt),
                lora=effective,
                teacher_model=generator.name,
                generation_seconds=seconds_each,
                policy_version=policy_version,
                directives=directives,
                directive_error=error,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
        )
    return edits


def apply_directives(lora: LoraSettings, directives: str, limits: Limits) -> tuple[LoraSettings, str]:
    """`lora` with a self-edit's directives applied, and "" — or `lora` unchanged and why not.

    Directives are a JSON object of learning_rate, epochs and rank. All or nothing: one bad value
    refuses them all, so a self-edit never trains on half of what it asked for. A new rank keeps
    the job's alpha/rank ratio (the LoRA scale).
    """
    if not directives:
        return lora, ""
    try:
        asked = json.loads(directives)
    except ValueError as exc:
        return lora, f"directives are not JSON ({exc.msg} at character {exc.pos})"
    if not isinstance(asked, dict):
        return lora, f"directives must be a JSON object of {', '.join(DIRECTIVE_KEYS)}"
    unknown = sorted(set(asked) - set(DIRECTIVE_KEYS))
    if unknown:
        return lora, f"unknown directive(s) {unknown}; allowed: {', '.join(DIRECTIVE_KEYS)}"
    bounds = {
        "learning_rate": (limits.min_directive_learning_rate, limits.max_directive_learning_rate),
        "epochs": (1, limits.max_directive_epochs),
        "rank": (1, limits.max_directive_rank),
    }
    changes: dict[str, float | int] = {}
    for key, value in asked.items():
        low, high = bounds[key]
        kind = DIRECTIVE_KEYS[key]
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or (kind is int and value != int(value)) or not math.isfinite(value):
            return (
                lora,
                f"directive {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}",
            )
        if not low <= value <= high:
            return lora, f"directive {key} must be in [{low}, {high}], got {value}"
        changes[key] = kind(value)
    if "rank" in changes:
        changes["alpha"] = lora.alpha * changes["rank"] / lora.rank
    return dataclasses.replace(lora, **changes), ""


def passage_control(passage: Passage, lora: LoraSettings, job_id: str, doc_index: int) -> SelfEdit:
    """The paper's "train on passage" baseline: no synthetic data, the passage alone."""
    return SelfEdit(
        id=self_edit_id(job_id, doc_index, "passage"),
        job_id=job_id,
        doc_index=doc_index,
        # -1: not one of the sampled edits 0..n-1.
        index=-1,
        format=EditFormat.PASSAGE,
        passage=passage,
        text="",
        lines=(),
        lora=lora,
    )
