"""The teacher's policy update (the ReST-EM M-step): fine-tune a LoRA on the teacher's own base model.

Read it top to bottom: check the examples, wrap the base in a fresh LoRA (or the parent version's,
to keep training it), then run one objective:
- "sft": supervised fine-tuning on prompt -> chosen, loss on the completion tokens only (ReST-EM);
- "dpo" and "discopop": TRL's DPOTrainer on (prompt, chosen, rejected) pairs, against the policy the
  run started from.
The caller saves the PEFT model it gets back (`teacher.policies.PolicyStore`), then calls
`release_policy`, which leaves the base weights bit-identical to before.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from seal import convert
from seal.digests import message_sha256
from seal.errors import InvalidArgument
from seal.models import render_prompt
from seal.records import PolicyExample, PolicySettings
from seal.v1 import types_pb2
from student.sequences import IGNORE_INDEX, batches
from student.training import causal_lm_loss, lora_config_for

# Every projection of a Llama-style block; the ones this architecture has are targeted.
POLICY_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFERENCE_LOSS_TYPES = {"dpo": "sigmoid", "discopop": "discopop"}
OBJECTIVES = ("sft", *PREFERENCE_LOSS_TYPES)


@dataclass
class PolicyTrainStats:
    steps: int
    losses: list[float]
    seconds: float

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else 0.0


def train_policy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[PolicyExample],
    settings: PolicySettings,
    parent_dir: Path | None = None,
    use_chat_template: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[PeftModel, PolicyTrainStats]:
    """Fine-tune a LoRA policy on `examples` with `settings.objective`; `on_step(step, loss)` after each step.

    `parent_dir` (a saved policy version) is loaded as the trainable starting point; None starts fresh.
    """
    check_policy_examples(examples, settings.objective)
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "the base model already carries LoRA layers (a generator's loaded policies?): "
            "call TransformersGenerator.release_policies() before training on it"
        )
    started = time.perf_counter()
    peft_model = _wrap_policy(model, settings, parent_dir)
    try:
        if settings.objective == "sft":
            losses = _train_sft(peft_model, tokenizer, examples, settings, use_chat_template, on_step)
        else:
            losses = _train_preference(peft_model, tokenizer, examples, settings, use_chat_template, on_step)
    except BaseException:
        # The caller never gets the PEFT model, so strip the LoRA here (an on_step may cancel by raising).
        release_policy(peft_model)
        raise
    finally:
        peft_model.eval()
    return peft_model, PolicyTrainStats(len(losses), losses, time.perf_counter() - started)


def release_policy(peft_model: PeftModel) -> Any:
    """Remove the LoRA layers without merging; the base weights are exactly as before training."""
    return peft_model.unload()


def check_policy_examples(examples: Sequence[PolicyExample], objective: str) -> None:
    if objective not in OBJECTIVES:
        raise InvalidArgument(
            "settings.objective", f"unknown objective {objective!r}; use one of {list(OBJECTIVES)}"
        )
    if not examples:
        raise InvalidArgument("examples", "a policy update needs at least one example")
    for i, example in enumerate(examples):
        if not example.chosen:
            raise InvalidArgument(f"examples[{i}].chosen", "is empty: nothing to learn from")
        if objective in PREFERENCE_LOSS_TYPES and not example.rejected:
            raise InvalidArgument(
                f"examples[{i}].rejected",
                f"is empty, but the {objective!r} objective needs a rejected self-edit",
            )


def policy_training_data_sha256(examples: Sequence[PolicyExample]) -> str:
    """sha256 over the examples in order: each one's deterministic protobuf digest, chained."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(message_sha256(convert.to_pb(example, types_pb2.PolicyExample)).encode())
    return digest.hexdigest()


def policy_lora_config(model: Any, settings: PolicySettings) -> LoraConfig:
    return lora_config_for(model, settings.rank, settings.alpha, POLICY_TARGET_MODULES)


def _wrap_policy(model: Any, settings: PolicySettings, parent_dir: Path | None) -> PeftModel:
    # Seed before wrapping: LoRA's A matrices are randomly initialised.
    torch.manual_seed(settings.seed)
    if parent_dir is None:
        return get_peft_model(model, policy_lora_config(model, settings))
    peft_model = PeftModel.from_pretrained(model, str(parent_dir), is_trainable=True)
    parent = peft_model.peft_config["default"]
    # The parent's shape wins over the settings; say so rather than train something else than asked.
    if (parent.r, parent.lora_alpha) != (settings.rank, settings.alpha):
        release_policy(peft_model)
        raise InvalidArgument(
            "settings.rank",
            f"the parent policy has rank {parent.r} and alpha {parent.lora_alpha}; continuing it needs the same "
            f"(got rank {settings.rank}, alpha {settings.alpha})",
        )
    return peft_model


# --- SFT (ReST-EM) ---------------------------------------------------------------------------------
# Our own loop, not TRL's SFTTrainer: it is the student's 20-line recipe, it tokenizes the prompt
# exactly as TransformersGenerator does when sampling (the chat template writes its own special
# tokens, so none are added), and a tiny in-memory dataset needs no datasets/accelerate pipeline,
# output directory or logging set-up to switch off.


def sft_sequence(
    prompt_ids: list[int], completion_ids: list[int], max_len: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example, truncated to `max_len`; the prompt's labels are ignored."""
    input_ids = (prompt_ids + completion_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_len]
    return input_ids, labels


def pad_sft_batch(
    sequences: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Right-pad (input_ids, labels) pairs: (input_ids, attention_mask, labels with -100 on padding)."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids, attention_mask, labels = [], [], []
    for ids, labs in sequences:
        pad = width - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        attention_mask.append([1] * len(ids) + [0] * pad)
        labels.append(labs + [IGNORE_INDEX] * pad)
    return input_ids, attention_mask, labels


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens (prompt and padding are -100)."""
    return causal_lm_loss(logits, labels)


def tokenize_sft_examples(
    tokenizer: Any, examples: Sequence[PolicyExample], max_len: int, use_chat_template: bool
) -> list[tuple[list[int], list[int]]]:
    templated = use_chat_template and bool(tokenizer.chat_template)
    out = []
    for example in examples:
        prompt_text = render_prompt(tokenizer, example.prompt, use_chat_template)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=not templated)["input_ids"]
        # Tokenized apart from the prompt, as the model produces it: new tokens after the prompt's last.
        completion_ids = tokenizer(example.chosen, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        out.append(sft_sequence(prompt_ids, completion_ids, max_len))
    return out


def _train_sft(
    peft_model: PeftModel,
    tokenizer: Any,
    examples: Sequence[PolicyExample],
    settings: PolicySettings,
    use_chat_template: bool,
    on_step: Callable[[int, float], None] | None,
) -> list[float]:
    sequences = tokenize_sft_examples(tokenizer, examples, settings.max_seq_len, use_chat_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(peft_model.parameters()).device
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    losses: list[float] = []
    peft_model.train()
    for batch in batches(sequences, settings.batch_size, settings.seed, settings.epochs):
        input_ids, attention_mask, labels = (
            torch.tensor(x, device=device) for x in pad_sft_batch(batch, pad_id)
        )
        logits = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = sft_loss(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(len(losses), losses[-1])
    return losses


# --- DPO and DiscoPOP (TRL) ------------------------------------------------------------------------


def _train_preference(
    peft_model: PeftModel,
    tokenizer: Any,
    examples: Sequence[PolicyExample],
    settings: PolicySettings,
    use_chat_template: bool,
    on_step: Callable[[int, float], None] | None,
) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [
        {
            "prompt": render_prompt(tokenizer, e.prompt, use_chat_template),
            "chosen": e.chosen,
            "rejected": e.rejected,
        }
        for e in examples
    ]
    losses: list[float] = []

    class RecordLoss(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                if on_step is not None:
                    on_step(len(losses), losses[-1])

    base = peft_model.get_base_model()
    # DPOTrainer swaps in a fused LM head as an instance attribute; take it off again afterwards.
    had_own_forward = "forward" in vars(base)
    with tempfile.TemporaryDirectory(prefix="seal-policy-") as scratch:
        args = DPOConfig(
            output_dir=scratch,
            loss_type=[PREFERENCE_LOSS_TYPES[settings.objective]],
            beta=settings.beta,
            discopop_tau=settings.discopop_tau,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            num_train_epochs=settings.epochs,
            per_device_train_batch_size=settings.batch_size,
            max_length=settings.max_seq_len,
            seed=settings.seed,
            data_seed=settings.seed,
            use_cpu=peft_model.device.type == "cpu",
            bf16=False,
            fp16=False,
            # Checkpointing would switch the shared base model into checkpointing mode for good.
            activation_checkpointing=False,
            report_to=[],
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=1,
            disable_tqdm=True,
        )
        # Given a PEFT model and no ref_model, TRL copies the starting adapter as "ref" and scores the
        # reference with it: the base policy for a fresh LoRA (B = 0), the parent version otherwise.
        trainer = DPOTrainer(
            model=peft_model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[RecordLoss()],
        )
        try:
            trainer.train()
        finally:
            if "ref" in peft_model.peft_config:
                peft_model.delete_adapter("ref")
            peft_model.set_adapter("default")
            if not had_own_forward:
                vars(base).pop("forward", None)
    return losses


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """TRL's DPO loss ("sigmoid") of sequence log-probs, mean over pairs."""
    return _trl_preference_loss(
        "sigmoid", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )


def discopop_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    tau: float,
) -> torch.Tensor:
    """TRL's DiscoPOP loss (log-ratio modulated) of sequence log-probs, mean over pairs."""
    return _trl_preference_loss(
        "discopop", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, tau
    )


def _trl_preference_loss(
    loss_type: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    tau: float = 0.05,
) -> torch.Tensor:
    # trl 1.16 has no standalone loss function: the losses live inline in DPOTrainer._compute_loss,
    # which runs the model and then the loss. We call that method with a stand-in trainer (one process,
    # precomputed reference log-probs) and a stand-in model whose one completion token per sequence
    # carries the given log-prob, so the numbers are TRL's own. Its tests pin this to the formulas.
    from trl import DPOTrainer

    pairs = chosen_logps.shape[0]
    policy_logps = torch.cat([chosen_logps, rejected_logps]).unsqueeze(1)
    zeros = torch.zeros_like(policy_logps.detach())

    def model(**_: Any) -> SimpleNamespace:
        return SimpleNamespace(log_probs=policy_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    one_process = SimpleNamespace(
        device=chosen_logps.device, gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=one_process,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        args=SimpleNamespace(discopop_tau=tau),
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * pairs, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * pairs, 2, dtype=torch.long),
        # The first token is "prompt", the second the completion whose log-prob the model returns.
        "completion_mask": torch.tensor([[0, 1]] * (2 * pairs)),
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
