"""The student's core: apply one self-edit to the base model and publish the resulting adapter.

No gRPC here; the servicer translates requests into `apply_self_edit` calls and back.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from seal import metrics
from seal.records import AdapterRef, SelfEdit
from student.artifacts import save_adapter
from student.sequences import build_training_texts, training_data_sha256
from student.training import release_adapter, train_adapter


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
    lora = dataclasses.replace(self_edit.lora, seed=self_edit.lora.seed + run)
    peft_model, stats = train_adapter(model, tokenizer, texts, lora, on_step=on_step)
    metrics.training_done(stats.steps, stats.seconds)
    try:
        final_loss = stats.losses[-1] if stats.losses else 0.0
        provenance = {
            "self_edit_id": self_edit.id,
            "job_id": self_edit.job_id,
            "doc_index": self_edit.doc_index,
            "format": self_edit.format.value,
            "teacher_model": self_edit.teacher_model,
            "base_model": base_model_name,
            "base_fingerprint": base_fingerprint,
            "lora": asdict(lora),
            "run": run,
            "policy_version": self_edit.policy_version,
            "directives": self_edit.directives,
            "directive_error": self_edit.directive_error,
            "data_sha256": training_data_sha256(texts),
            "steps": stats.steps,
            "final_loss": final_loss,
            "losses": stats.losses,
            "train_seconds": stats.seconds,
            "created_at": time.time(),
        }
        sha, _, files = save_adapter(peft_model, adapters_root, provenance)
    finally:
        # Even if saving fails, the shared base model must go back to serving the next self-edit.
        release_adapter(peft_model)
    return AdapterRef(
        sha256=sha,
        self_edit_id=self_edit.id,
        base_model=base_model_name,
        base_fingerprint=base_fingerprint,
        size_bytes=sum(f.size for f in files),
        train_seconds=stats.seconds,
        steps=stats.steps,
        final_loss=final_loss,
        student_id=student_id,
        files=files,
    )
