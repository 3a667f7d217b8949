"""The GPU paths: LoRA training and τ evaluation on CUDA in bfloat16. Skipped without a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from auditor.core import audit
from auditor.evaluation import answer_questions
from seal.models import build_tiny_model, load_model, model_fingerprint
from seal.records import QA, Document, EditFormat, LoraSettings, Passage, SelfEdit
from student.core import apply_self_edit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DOC = Document("Alpha", "Alpha is a town by the sea.", (QA("What is Alpha?", "a town"),))


@pytest.fixture(scope="module")
def cuda_bf16_model(tmp_path_factory: pytest.TempPathFactory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=128)
    model, tokenizer = load_model(path, device="cuda", dtype="bfloat16")
    return model, tokenizer, model_fingerprint(path)


def _self_edit(epochs: int) -> SelfEdit:
    lines = ("Alpha is a town.", "Alpha lies by the sea.")
    return SelfEdit(
        id="gpu/0/0",
        job_id="gpu",
        doc_index=0,
        index=0,
        format=EditFormat.IMPLICATIONS,
        passage=Passage(DOC.title, DOC.context),
        text="\n".join(lines),
        lines=lines,
        lora=LoraSettings(rank=8, alpha=16, epochs=epochs, learning_rate=1e-2),
    )


def test_bf16_lora_training_on_cuda_tracks_fp32_on_cpu_and_restores_the_base(
    cuda_bf16_model, tmp_path: Path
) -> None:
    model, tokenizer, fingerprint = cuda_bf16_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses: list[float] = []
    adapter = apply_self_edit(
        model,
        tokenizer,
        _self_edit(epochs=20),
        "tiny",
        fingerprint,
        tmp_path / "gpu",
        on_step=lambda step, loss: losses.append(loss),
    )
    # The same run in float32 on the CPU is the reference: bf16 on CUDA must learn as much.
    cpu_model, cpu_tokenizer = load_model(cuda_bf16_model_path(model), device="cpu", dtype="float32")
    reference: list[float] = []
    apply_self_edit(
        cpu_model,
        cpu_tokenizer,
        _self_edit(epochs=20),
        "tiny",
        fingerprint,
        tmp_path / "cpu",
        on_step=lambda step, loss: reference.append(loss),
    )
    assert all(math.isfinite(x) for x in losses)
    assert len(losses) == len(reference)
    assert _tail(losses) < _head(losses) - 1.0  # it learned
    assert _tail(losses) == pytest.approx(_tail(reference), rel=0.1)
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.bfloat16
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # base untouched
    assert (tmp_path / "gpu" / adapter.sha256 / "adapter_model.safetensors").is_file()


def _head(losses: list[float]) -> float:
    return sum(losses[:3]) / 3


def _tail(losses: list[float]) -> float:
    return sum(losses[-3:]) / 3


def cuda_bf16_model_path(model) -> Path:  # noqa: ANN001
    return Path(model.config._name_or_path)


def test_batched_greedy_answers_on_cuda_equal_one_by_one(cuda_bf16_model) -> None:
    model, tokenizer, _ = cuda_bf16_model
    prompts = ["Topic: Alpha\nWhat is Alpha?", "Topic: Beta\nWhere is the river Beta, and how long is it?"]
    batched = answer_questions(model, tokenizer, prompts, max_new_tokens=8)
    single = [answer_questions(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single


def test_audit_of_a_cuda_adapter(cuda_bf16_model, tmp_path: Path) -> None:
    model, tokenizer, fingerprint = cuda_bf16_model
    se = _self_edit(epochs=2)
    adapter = apply_self_edit(model, tokenizer, se, "tiny", fingerprint, tmp_path)
    verdict = audit(
        model,
        tokenizer,
        DOC,
        se,
        tmp_path / adapter.sha256,
        adapter.sha256,
        fingerprint,
        "gpu",
        max_new_tokens=8,
    )
    assert verdict.reward == pytest.approx(verdict.adapted_accuracy - verdict.baseline_accuracy)
    assert len(verdict.adapted_scores) == 1
