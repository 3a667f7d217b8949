"""The teacher's core: turn a passage into candidate self-edits. No gRPC, no Redis."""

from __future__ import annotations

import time

from seal.records import EditFormat, LoraSettings, Passage, SamplingSettings, SelfEdit
from teacher.backends import Generator
from teacher.prompts import build_prompt, parse_self_edit


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
) -> list[SelfEdit]:
    """Sample `n` self-edits of `passage` in one generate call.

    A completion that parses to no lines is kept (the student then trains on the passage alone):
    the outer RL loop needs its low reward.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    prompt = build_prompt(passage, fmt)
    start = time.perf_counter()
    (completions,) = generator.generate([prompt], sampling, n)
    seconds_each = (time.perf_counter() - start) / n
    if len(completions) != n:
        raise RuntimeError(
            f"generator {generator.name!r} returned {len(completions)} completions, wanted {n}"
        )
    return [
        SelfEdit(
            id=self_edit_id(job_id, doc_index, index),
            job_id=job_id,
            doc_index=doc_index,
            index=index,
            format=fmt,
            passage=passage,
            text=text,
            lines=parse_self_edit(text, fmt),
            lora=lora,
            teacher_model=generator.name,
            generation_seconds=seconds_each,
        )
        for index, text in enumerate(completions)
    ]


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
