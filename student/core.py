"""The student's core: apply a self-edit (or several at once) to the base model and publish the
resulting adapters.

No gRPC here; the servicer translates requests into `apply_self_edit` calls and back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from seal import metrics
from seal.records import AdapterFile, AdapterRef, LoraSettings, SelfEdit
from student.artifacts import save_adapter
from student.multi import attached_in_turn, train_adapters
from student.sequences import build_training_texts, training_data_sha256
from student.training import TrainStats, release_adapter, train_adapter


def apply_self_edit(
    model: Any,
    tokenizer: Any,
    self_edit: SelfEdit,
    base_model_name: str,
    base_fingerprint: str,
    adapters_root: Path,
    student_id: str = "",
    on_step: Callable[[int, float], None] | None = None,
    run: int = 0,
) -> AdapterRef:
    """Train a LoRA on the self-edit, save it content addressed, and restore the base model.

    `run` numbers the training runs of one self-edit: run r trains with seed lora.seed + r, so
    several runs measure how much the reward owes to the seed.
    """
    texts = build_training_texts(self_edit)
    lora = run_settings(self_edit, run)
    peft_model, stats = train_adapter(model, tokenizer, texts, lora, on_step=on_step)
    metrics.training_done(stats.steps, stats.seconds)
    try:
        provenance = adapter_provenance(self_edit, run, texts, stats, base_model_name, base_fingerprint)
        sha, _, files = save_adapter(peft_model, adapters_root, provenance)
    finally:
        # Even if saving fails, the shared base model must go back to serving the next self-edit.
        release_adapter(peft_model)
    return adapter_ref(self_edit, sha, files, stats, base_model_name, base_fingerprint, student_id)


def apply_self_edits(
    model: Any,
    tokenizer: Any,
    updates: Sequence[tuple[SelfEdit, int]],
    base_model_name: str,
    base_fingerprint: str,
    adapters_root: Path,
    student_id: str = "",
    compute_dtype: str = "float32",
) -> list[AdapterRef]:
    """`apply_self_edit` for several (self-edit, run) pairs at once: their LoRAs are trained together
    in one batched pass over the base (student.multi), each equal to the one it would train alone
    up to floating-point rounding, and each saved as its own content-addressed adapter."""
    texts = [build_training_texts(se) for se, _ in updates]
    jobs = [(t, run_settings(se, run)) for t, (se, run) in zip(texts, updates, strict=True)]
    trained = train_adapters(model, tokenizer, jobs, compute_dtype=compute_dtype)
    group_seconds = max((stats.seconds for _, stats in trained), default=0.0)
    metrics.training_done(sum(stats.steps for _, stats in trained), group_seconds)
    refs: list[AdapterRef | None] = [None] * len(updates)
    with contextlib.closing(attached_in_turn(model, [adapter for adapter, _ in trained])) as views:
        for i, peft_model in views:
            (self_edit, run), stats = updates[i], trained[i][1]
            provenance = adapter_provenance(
                self_edit, run, texts[i], stats, base_model_name, base_fingerprint
            )
            provenance["trained_together"] = len(updates)
            sha, _, files = save_adapter(peft_model, adapters_root, provenance)
            refs[i] = adapter_ref(self_edit, sha, files, stats, base_model_name, base_fingerprint, student_id)
    return [ref for ref in refs if ref is not None]


def run_settings(self_edit: SelfEdit, run: int) -> LoraSettings:
    """Run r of a self-edit trains with seed lora.seed + r."""
    return dataclasses.replace(self_edit.lora, seed=self_edit.lora.seed + run)


def adapter_provenance(
    self_edit: SelfEdit,
    run: int,
    texts: list[str],
    stats: TrainStats,
    base_model_name: str,
    base_fingerprint: str,
) -> dict[str, Any]:
    """provenance.json of an adapter: what it was trained from, on what, how, and how it went."""
    return {
        "self_edit_id": self_edit.id,
        "job_id": self_edit.job_id,
        "doc_index": self_edit.doc_index,
        "format": self_edit.format.value,
        "teacher_model": self_edit.teacher_model,
        "base_model": base_model_name,
        "base_fingerprint": base_fingerprint,
        "lora": asdict(run_settings(self_edit, run)),
        "run": run,
        "policy_version": self_edit.policy_version,
        "directives": self_edit.directives,
        "directive_error": self_edit.directive_error,
        "data_sha256": training_data_sha256(texts),
        "steps": stats.steps,
        "final_loss": final_loss(stats),
        "losses": stats.losses,
        "train_seconds": stats.seconds,
        "created_at": time.time(),
    }


def adapter_ref(
    self_edit: SelfEdit,
    sha: str,
    files: tuple[AdapterFile, ...],
    stats: TrainStats,
    base_model_name: str,
    base_fingerprint: str,
    student_id: str,
) -> AdapterRef:
    return AdapterRef(
        sha256=sha,
        self_edit_id=self_edit.id,
        base_model=base_model_name,
        base_fingerprint=base_fingerprint,
        size_bytes=sum(f.size for f in files),
        train_seconds=stats.seconds,
        steps=stats.steps,
        final_loss=final_loss(stats),
        student_id=student_id,
        files=files,
    )


def final_loss(stats: TrainStats) -> float:
    return stats.losses[-1] if stats.losses else 0.0
