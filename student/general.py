"""The update's guards against forgetting: the base model's own answers to general prompts.

Two uses, both set by `LoraSettings`:
- replay (`replay` = n): n general prompts, chat-rendered, each followed by the base model's greedy
  answer, join the update's training sequences, so the update keeps rehearsing what the model said;
- KL penalty (`kl_weight` = w): every step also scores a few prompt + base-answer sequences and adds
  w · KL(base || adapted) over their answer tokens to the loss.

The prompts (data/general_prompts.json) are the student's own and disjoint from the auditor's
(auditor/data/retention.json): an update must never train on what the auditor measures with. The KL
is computed here independently of the auditor's code on purpose: a bug in one is not silently
shared by the other, so the audit stays a check.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from seal.models import render_prompt
from seal.records import LoraSettings

PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "general_prompts.json"
ANSWER_MAX_NEW_TOKENS = 24
"""New tokens of each base answer: its first sentence or so, enough to carry the model's way of
answering, and short because every KL step pays for it."""
KL_POOL = 16
"""General sequences the KL penalty cycles through."""
KL_BATCH = 1
"""General sequences per training step in the KL penalty: one already makes a step about three times
as expensive (a prompt and its answer are longer than a training text, and the base runs it too)."""


def load_general_prompts(path: Path = PROMPTS_FILE) -> tuple[str, ...]:
    return tuple(json.loads(path.read_text()))


@dataclass(frozen=True)
class BaseAnswer:
    """Token ids of a chat-rendered prompt followed by the base model's greedy answer."""

    ids: tuple[int, ...]
    # ids[prompt_len:] is the answer.
    prompt_len: int


@dataclass(frozen=True)
class GeneralData:
    replay: tuple[BaseAnswer, ...] = ()
    kl: tuple[BaseAnswer, ...] = ()


def general_data(model: Any, tokenizer: Any, lora: LoraSettings) -> GeneralData:
    """The `lora.replay` replay sequences and the KL pool `lora` asks for, answered by `model` as it is
    now (call before wrapping it in a LoRA). Prompts in an order seeded by `lora.seed`; empty when
    both guards are off."""
    replay = lora.replay
    kl = KL_POOL if lora.kl_weight > 0 else 0
    if replay == 0 and kl == 0:
        return GeneralData()
    prompts = list(load_general_prompts())
    random.Random(lora.seed).shuffle(prompts)
    answers = base_answers(model, tokenizer, prompts[: max(replay, kl)])
    # More replay than prompts (validation allows 256) repeats answers: the same rehearsal, weighted up.
    return GeneralData(replay=tuple(answers[i % len(answers)] for i in range(replay)), kl=tuple(answers[:kl]))


def base_answers(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = ANSWER_MAX_NEW_TOKENS
) -> list[BaseAnswer]:
    """Greedy answers of `model` to `prompts` (chat template), each up to and including its end token."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    model.train(was_training)
    width = enc["input_ids"].shape[1]
    eos = tokenizer.eos_token_id
    answers = []
    for row, mask in zip(out.tolist(), enc["attention_mask"].tolist(), strict=True):
        prompt = [t for t, m in zip(row[:width], mask, strict=False) if m]
        answer = row[width:]
        if eos in answer:  # what follows the end token is the batch's padding
            answer = answer[: answer.index(eos) + 1]
        answers.append(BaseAnswer(tuple(prompt + answer), len(prompt)))
    return answers


def kl_batches(pool: Sequence[BaseAnswer], batch_size: int, seed: int) -> Iterator[list[BaseAnswer]]:
    """Endless batches from `pool`: seeded shuffles, one pass after another."""
    rng = random.Random(seed)
    while True:
        order = list(pool)
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]


def kl_penalty(peft_model: Any, batch: Sequence[BaseAnswer], pad_id: int) -> torch.Tensor:
    """Mean per-token KL(base || adapted) over the answer tokens of `batch`, differentiable in the
    adapter; the base's logits come from the same model with the adapter disabled, without gradient."""
    ids, mask, predicts_answer = answer_tensors(batch, pad_id, next(peft_model.parameters()).device)
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model(input_ids=ids, attention_mask=mask).logits[predicts_answer]
    adapted = peft_model(input_ids=ids, attention_mask=mask).logits[predicts_answer]
    return mean_kl(base, adapted)


def mean_kl(base_logits: torch.Tensor, adapted_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(base) || softmax(adapted)) for [N, vocab] logits; 0 when N = 0."""
    if base_logits.shape[0] == 0:
        return adapted_logits.sum() * 0.0
    log_p = F.log_softmax(base_logits.float(), dim=-1)
    log_q = F.log_softmax(adapted_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def answer_tensors(
    batch: Sequence[BaseAnswer], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, positions that predict an answer token) of right-padded prompt + answer
    sequences (position t predicts token t + 1), for the KL penalty."""
    width = max(len(a.ids) for a in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    predicts_answer = torch.zeros_like(ids, dtype=torch.bool)
    for row, a in enumerate(batch):
        ids[row, : len(a.ids)] = torch.tensor(a.ids)
        mask[row, : len(a.ids)] = 1
        predicts_answer[row, a.prompt_len - 1 : len(a.ids) - 1] = True
    return ids.to(device), mask.to(device), predicts_answer.to(device)
