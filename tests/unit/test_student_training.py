"""The inner-loop LoRA fine-tune on a tiny random Llama: numerics, determinism, base restoration."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from seal.models import load_model
from seal.records import LoraSettings
from student.general import KL_POOL, general_data, kl_penalty, load_general_prompts
from student.sequences import IGNORE_INDEX, pad_batch
from student.training import (
    causal_lm_loss,
    lora_config,
    release_adapter,
    tokenize_texts,
    train_adapter,
)

TEXTS = [
    "Velmora\nThe Zorbian council meets in the city of Velmora every spring.",
    "Velmora\nThe council of Zorbia gathers in Velmora.",
    "Velmora\nEvery spring the Zorbian council meets.",
]
# The first step's loss is the untouched base model's (LoRA B starts at zero) on the first
# shuffled text: it pins the tiny model, the tokenizer, the seeded order and the loss together.
FIRST_LOSS = 5.967484


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_seeded_run_is_reproducible_and_first_loss_is_pinned(tiny_model, tiny_model_dir: Path) -> None:
    lora = LoraSettings(epochs=2, seed=7)
    _, first = train_adapter(*tiny_model, TEXTS, lora)
    _, second = train_adapter(*load_model(tiny_model_dir), TEXTS, lora)
    assert first.steps == second.steps == 6
    assert first.losses == second.losses
    _, other_seed = train_adapter(*load_model(tiny_model_dir), TEXTS, LoraSettings(epochs=2, seed=0))
    assert other_seed.losses[0] == pytest.approx(FIRST_LOSS, abs=1e-4)
    assert other_seed.losses != first.losses


def test_loss_decreases_over_epochs(tiny_model) -> None:
    _, stats = train_adapter(*tiny_model, TEXTS, LoraSettings(epochs=8, learning_rate=1e-2))
    first_epoch, last_epoch = stats.losses[:3], stats.losses[-3:]
    assert sum(last_epoch) / 3 < sum(first_epoch) / 3 - 0.3
    assert stats.seconds > 0


def test_only_lora_parameters_change_and_release_restores_the_base(tiny_model) -> None:
    model, tokenizer = tiny_model
    before = _snapshot(model)
    peft_model, _ = train_adapter(model, tokenizer, TEXTS, LoraSettings(epochs=2, learning_rate=1e-2))

    after = peft_model.base_model.model.state_dict()
    lora_keys = [k for k in after if "lora_" in k]
    assert lora_keys and all(
        k.endswith(("lora_A.default.weight", "lora_B.default.weight")) for k in lora_keys
    )
    assert any(after[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)  # B moved off its zero init
    base_after = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert base_after.keys() == before.keys()
    assert all(torch.equal(before[k], base_after[k]) for k in before)
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == {
        n for n, _ in peft_model.named_parameters() if "lora_" in n
    }

    base = release_adapter(peft_model)
    assert base is model
    restored = base.state_dict()
    assert restored.keys() == before.keys()
    assert all(torch.equal(before[k], restored[k]) for k in before)
    assert not any("lora" in name for name, _ in base.named_modules())


def test_the_released_base_takes_the_next_self_edit(tiny_model, tiny_model_dir: Path) -> None:
    model, tokenizer = tiny_model
    lora = LoraSettings(epochs=1)
    release_adapter(train_adapter(model, tokenizer, ["Velmora\nsomething else entirely"], lora)[0])
    _, reused = train_adapter(model, tokenizer, TEXTS, lora)
    _, fresh = train_adapter(*load_model(tiny_model_dir), TEXTS, lora)
    assert reused.losses == fresh.losses


def test_batched_training_with_dynamic_padding(tiny_model) -> None:
    texts = [*TEXTS, "Velmora\nShort."]
    steps: list[tuple[int, float]] = []
    peft_model, stats = train_adapter(
        *tiny_model,
        texts,
        LoraSettings(epochs=3, batch_size=2),
        on_step=lambda s, loss: steps.append((s, loss)),
    )
    assert stats.steps == 6
    assert all(math.isfinite(x) for x in stats.losses)
    assert steps == list(enumerate(stats.losses, start=1))
    assert not peft_model.training  # left in eval mode for whoever evaluates it next


def test_batched_loss_equals_token_weighted_sequential_loss(tiny_model) -> None:
    model, tokenizer = tiny_model
    sequences = tokenize_texts(tokenizer, [TEXTS[0], "Velmora\nShort."], max_seq_len=256)

    def loss_and_tokens(batch: list[list[int]]) -> tuple[float, int]:
        ids, mask, labels = (torch.tensor(x) for x in pad_batch(batch, tokenizer.pad_token_id))
        with torch.no_grad():
            loss = causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        return loss.item(), int((labels[:, 1:] != IGNORE_INDEX).sum())

    batched, _ = loss_and_tokens(sequences)
    singles = [loss_and_tokens([s]) for s in sequences]
    sequential = sum(loss * n for loss, n in singles) / sum(n for _, n in singles)
    assert len(sequences[0]) != len(sequences[1])  # padding really happened
    assert batched == pytest.approx(sequential, abs=1e-5)


def test_causal_lm_loss_matches_the_formula() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, 3, IGNORE_INDEX], [0, 4, IGNORE_INDEX, IGNORE_INDEX]])
    # Position t predicts label t+1; only the 3 + 1 unmasked next tokens count.
    terms = [
        -torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
        for b in range(2)
        for t in range(3)
        if labels[b, t + 1] != IGNORE_INDEX
    ]
    assert len(terms) == 3
    assert causal_lm_loss(logits, labels).item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-6)


def test_all_masked_batch_gives_zero_loss_and_zero_gradient_not_nan() -> None:
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.full((2, 3), IGNORE_INDEX)
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_tokenize_texts_appends_eos_and_truncates(tiny_model) -> None:
    _, tokenizer = tiny_model
    full = tokenize_texts(tokenizer, ["Velmora\nThe council meets."], max_seq_len=256)[0]
    assert full[-1] == tokenizer.eos_token_id
    assert full[:-1] == tokenizer("Velmora\nThe council meets.")["input_ids"]
    assert tokenize_texts(tokenizer, ["Velmora\nThe council meets."], max_seq_len=4)[0] == full[:4]


def test_lora_config_targets_only_modules_the_model_has(tiny_model) -> None:
    model, _ = tiny_model
    config = lora_config(
        model, LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj", "c_attn", "down_proj"))
    )
    assert set(config.target_modules) == {"q_proj", "down_proj"}
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8.0, 0.0)
    with pytest.raises(ValueError, match="c_attn"):
        lora_config(model, LoraSettings(target_modules=("c_attn",)))


def test_a_failed_run_leaves_the_base_model_without_lora(tiny_model) -> None:
    model, tokenizer = tiny_model
    before = _snapshot(model)

    def cancel(step: int, loss: float) -> None:
        raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        train_adapter(model, tokenizer, TEXTS, LoraSettings(epochs=1), on_step=cancel)
    assert not any("lora" in name for name, _ in model.named_modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_linear_schedule_decays_to_zero_and_constant_keeps_the_rate() -> None:
    from student.training import make_scheduler

    def rates(schedule: str) -> list[float]:
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([param], lr=1e-3)
        scheduler = make_scheduler(optimizer, schedule, total_steps=4)
        seen = []
        for _ in range(4):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen + [optimizer.param_groups[0]["lr"]]

    # The Trainer's linear decay: lr·(T−t)/T before step t, 0 after the last step.
    assert rates("linear") == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])
    assert rates("constant") == pytest.approx([1e-3] * 5)
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        rates("cosine")


def test_gradient_clipping_bounds_the_update(tiny_model, tiny_model_dir: Path) -> None:
    """With a tiny clip norm the first update moves the LoRA weights far less than without one."""

    def first_step_change(max_grad_norm: float, model_and_tokenizer) -> float:
        lora = LoraSettings(epochs=1, learning_rate=1e-2, max_grad_norm=max_grad_norm, schedule="constant")
        peft_model, _ = train_adapter(*model_and_tokenizer, TEXTS[:1], lora)
        weights = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
        change = sum(float(w.abs().sum()) for w in weights)
        release_adapter(peft_model)
        return change

    # Adam normalises step sizes, so compare one step: clipping at 1e-6 makes the gradient's
    # direction all that survives, but Adam's epsilon then dominates and shrinks the step.
    unclipped = first_step_change(0.0, tiny_model)
    clipped = first_step_change(1e-9, load_model(tiny_model_dir))
    assert clipped < unclipped * 0.5


# --- the guards against forgetting: replay and the KL penalty ------------------------------------------------

# A seeded run of the trainer as it was before replay and kl_weight existed (git 7fd3a9e): the
# defaults (replay 0, kl_weight 0) must reproduce it exactly.
PINNED_LOSSES = [
    6.014381408691406,
    5.799854755401611,
    5.613857746124268,
    5.614565849304199,
    5.5114030838012695,
    5.380029201507568,
]
PINNED_LORA_ABS_SUM = 1328.0732769743736


def _lora_state(peft_model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}


def test_without_replay_or_kl_the_adapter_is_the_one_from_before(tiny_model, tiny_model_dir: Path) -> None:
    lora = LoraSettings(epochs=3, seed=3, learning_rate=1e-2, batch_size=2)
    peft_model, stats = train_adapter(*tiny_model, TEXTS, lora)
    assert stats.losses == pytest.approx(PINNED_LOSSES, abs=1e-6)
    weights = _lora_state(peft_model)
    assert sum(float(v.double().abs().sum()) for v in weights.values()) == pytest.approx(
        PINNED_LORA_ABS_SUM, rel=1e-6
    )
    assert (stats.kls, stats.replayed) == ([], 0)
    explicit = replace(lora, replay=0, kl_weight=0.0)
    other, _ = train_adapter(*load_model(tiny_model_dir), TEXTS, explicit)
    assert all(torch.equal(weights[k], v) for k, v in _lora_state(other).items())


def test_replay_adds_the_base_answers_of_that_many_general_prompts(tiny_model) -> None:
    model, tokenizer = tiny_model
    data = general_data(model, tokenizer, LoraSettings(replay=5, seed=4))
    assert len(data.replay) == 5 and data.kl == ()
    prompts = load_general_prompts()
    for answer in data.replay:
        prompt_text = tokenizer.decode(answer.ids[: answer.prompt_len])
        assert any(p in prompt_text for p in prompts)  # a chat-rendered student prompt...
        assert len(answer.ids) > answer.prompt_len  # ... followed by the base's own answer
    # Deterministic by seed; another seed picks other prompts.
    assert general_data(model, tokenizer, LoraSettings(replay=5, seed=4)) == data
    assert general_data(model, tokenizer, LoraSettings(replay=5, seed=5)).replay != data.replay
    # More replay than prompts repeats the answers.
    many = general_data(model, tokenizer, LoraSettings(replay=len(prompts) + 3, seed=4))
    assert len(many.replay) == len(prompts) + 3 and many.replay[-1] == many.replay[2]

    _, stats = train_adapter(model, tokenizer, TEXTS, LoraSettings(epochs=2, replay=5))
    assert stats.replayed == 5
    assert stats.steps == 2 * (len(TEXTS) + 5)  # batch 1: one step per text per epoch


def _kl_on(peft_model, pool) -> float:
    with torch.no_grad():
        return sum(kl_penalty(peft_model, [a], 0).item() for a in pool) / len(pool)


def test_the_kl_penalty_keeps_the_adapter_closer_to_the_base(tiny_model, tiny_model_dir: Path) -> None:
    lora = LoraSettings(epochs=4, learning_rate=1e-2, schedule="constant")
    model, tokenizer = tiny_model
    pool = general_data(model, tokenizer, replace(lora, kl_weight=1.0)).kl
    assert len(pool) == KL_POOL

    free, free_stats = train_adapter(model, tokenizer, TEXTS, lora)
    drift = _kl_on(free, pool)
    release_adapter(free)
    held, held_stats = train_adapter(*load_model(tiny_model_dir), TEXTS, replace(lora, kl_weight=10.0))
    assert free_stats.kls == [] and len(held_stats.kls) == held_stats.steps == free_stats.steps
    assert held_stats.kls[0] == 0.0  # the first step's adapter is still the identity (B = 0)
    assert _kl_on(held, pool) < 0.5 * drift


def test_the_kl_penalty_is_zero_for_a_fresh_lora_and_has_a_gradient_after(tiny_model) -> None:
    from peft import get_peft_model

    model, tokenizer = tiny_model
    pool = general_data(model, tokenizer, LoraSettings(kl_weight=1.0)).kl
    fresh = get_peft_model(model, lora_config(model, LoraSettings()))
    penalty = kl_penalty(fresh, pool[:2], tokenizer.pad_token_id)
    assert penalty.item() == 0.0 and penalty.requires_grad
