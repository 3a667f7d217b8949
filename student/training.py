"""The inner-loop LoRA fine-tune: one self-edit in, one adapter out.

Read it top to bottom as a recipe: let the base model answer the general prompts the guards against
forgetting need (none by default; student.general), wrap it in a fresh LoRA, tokenize the texts and
append the replayed answers, run `epochs` seeded passes of AdamW over dynamically padded batches (the
learning rate decaying linearly to 0 and gradients clipped at norm 1.0, as the Hugging Face Trainer
the SEAL reference uses does; with `kl_weight`, each step's loss also pays for drifting from the base
on general prompts), then hand back the PEFT model.
`release_adapter` strips the LoRA again so the same base model object serves the next self-edit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import get_constant_schedule, get_linear_schedule_with_warmup

from seal.records import LoraSettings
from seal.validation import SCHEDULES
from student.general import KL_BATCH, BaseAnswer, general_data, kl_batches, kl_penalty
from student.sequences import IGNORE_INDEX, batches, pad_batch


@dataclass
class TrainStats:
    steps: int
    # The language-modelling loss of each step (without the KL penalty).
    losses: list[float]
    seconds: float
    # Each step's KL(base || adapted) on general prompts; empty when kl_weight is 0.
    kls: list[float] = field(default_factory=list)
    replayed: int = 0


def train_adapter(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    lora: LoraSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[PeftModel, TrainStats]:
    """Fine-tune a fresh LoRA on `texts` (plus `lora.replay` replayed base answers); `on_step(step,
    loss)` runs after every step (1-based)."""
    started = time.perf_counter()
    # The base answers its general prompts before any LoRA exists: these are the answers to keep.
    general = general_data(model, tokenizer, lora)
    # Seed before wrapping: LoRA's A matrices are randomly initialised.
    torch.manual_seed(lora.seed)
    peft_model = get_peft_model(model, lora_config(model, lora))
    sequences = training_sequences(tokenizer, texts, lora, general.replay)
    kl_stream = kl_batches(general.kl, KL_BATCH, lora.seed) if general.kl else None
    pad_id = pad_token_id(tokenizer)
    device = next(peft_model.parameters()).device

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(trainable, lora, len(sequences))

    losses: list[float] = []
    kls: list[float] = []
    peft_model.train()
    try:
        for batch in batches(sequences, lora.batch_size, lora.seed, lora.epochs):
            input_ids, attention_mask, labels = (
                torch.tensor(x, device=device) for x in pad_batch(batch, pad_id)
            )
            logits = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = causal_lm_loss(logits, labels)
            if kl_stream is not None:
                kl = kl_penalty(peft_model, next(kl_stream), pad_id)
                (loss + lora.kl_weight * kl).backward()
                kls.append(kl.item())
            else:
                loss.backward()
            if lora.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, lora.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_step is not None:
                on_step(len(losses), losses[-1])
    except BaseException:
        # The caller never gets the PEFT model, so strip the LoRA here (an on_step may cancel by raising).
        release_adapter(peft_model)
        raise
    finally:
        peft_model.eval()
    seconds = time.perf_counter() - started
    return peft_model, TrainStats(len(losses), losses, seconds, kls, replayed=len(general.replay))


def training_sequences(
    tokenizer: Any, texts: list[str], lora: LoraSettings, replay: Sequence[BaseAnswer]
) -> list[list[int]]:
    """The update's token sequences: each text (see `tokenize_texts`), then the replayed base answers."""
    sequences = tokenize_texts(tokenizer, texts, lora.max_seq_len)
    return sequences + [list(a.ids[: lora.max_seq_len]) for a in replay]


def pad_token_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def make_optimizer(
    trainable: list[torch.nn.Parameter], lora: LoraSettings, n_sequences: int, foreach: bool | None = None
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW and its learning-rate schedule over `lora.epochs` passes of `n_sequences` sequences
    (`foreach`: torch's choice of implementation when None)."""
    # No weight decay: the Hugging Face Trainer default the reference runs.
    optimizer = torch.optim.AdamW(trainable, lr=lora.learning_rate, weight_decay=0.0, foreach=foreach)
    total_steps = lora.epochs * -(-n_sequences // lora.batch_size)
    return optimizer, make_scheduler(optimizer, lora.schedule, total_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int) -> Any:
    """The learning-rate schedule by name: transformers' own, so "linear" is exactly the Trainer's."""
    if schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=total_steps)
    if schedule == "constant":
        return get_constant_schedule(optimizer)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def release_adapter(peft_model: PeftModel) -> Any:
    """Remove the LoRA layers without merging; the base weights are exactly as before training."""
    # unload() swaps each LoRA layer back for its untouched base layer; merge_and_unload would not.
    return peft_model.unload()


def lora_config(model: Any, lora: LoraSettings) -> LoraConfig:
    """A LoRA config targeting the requested projections that this architecture actually has."""
    return lora_config_for(model, lora.rank, lora.alpha, lora.target_modules)


def lora_config_for(model: Any, rank: int, alpha: float, target_modules: Sequence[str]) -> LoraConfig:
    """A LoRA config (no dropout, no bias) on those of `target_modules` this model has; the student's
    inner loop and the teacher's policy share it."""
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [name for name in target_modules if name in present]
    if not targets:
        raise ValueError(
            f"none of the LoRA target modules {list(target_modules)} exist in this model; "
            f"its linear layers are named {sorted(present)}"
        )
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def tokenize_texts(tokenizer: Any, texts: list[str], max_seq_len: int) -> list[list[int]]:
    """Token ids of each text with EOS appended (so the model learns where a fact ends), truncated."""
    return [(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])[:max_seq_len] for text in texts]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over unmasked labels; 0 (not NaN) when everything is masked."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (shifted_labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count
