"""The teacher's policy update (M-step) on a tiny random Llama: losses against their formulas, SFT
masking, SFT / DPO / DiscoPOP runs, continuing from a parent, and the policy store."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from seal.digests import directory_manifest, manifest_sha256
from seal.errors import InvalidArgument, NotFound
from seal.models import render_prompt
from seal.records import PolicyExample, PolicySettings, PolicyVersion
from student.sequences import IGNORE_INDEX
from teacher.policies import LINEAGE, PolicyStore
from teacher.policy import (
    discopop_loss,
    dpo_loss,
    pad_sft_batch,
    policy_training_data_sha256,
    release_policy,
    sft_loss,
    sft_sequence,
    tokenize_sft_examples,
    train_policy,
)

EXAMPLES = [
    PolicyExample(
        context_id="c0",
        prompt="Passage: The Zorbian council meets in Velmora.",
        chosen="The council meets every spring in Velmora.",
        rejected="The quick brown fox jumps.",
    ),
    PolicyExample(
        context_id="c1",
        prompt="Passage: The fox jumps over the lazy dog.",
        chosen="The fox is quick and brown.",
        rejected="0123456789 abc",
    ),
]
FAST = PolicySettings(rank=4, alpha=8.0, learning_rate=1e-2, epochs=3, batch_size=2, max_seq_len=256, seed=0)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _lora_state(peft_model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}


def _completion_logp(model, tokenizer, prompt: str, completion: str) -> float:
    """log p(completion + EOS | rendered prompt), summed over the completion tokens."""
    ((ids, labels),) = tokenize_sft_examples(
        tokenizer, [PolicyExample(prompt=prompt, chosen=completion)], 256, use_chat_template=True
    )
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    targets = torch.tensor(labels[1:])
    mask = targets != IGNORE_INDEX
    logps = F.log_softmax(logits.float(), dim=-1)[mask].gather(1, targets[mask].unsqueeze(1))
    return logps.sum().item()


def _margin(model, tokenizer) -> float:
    return sum(
        _completion_logp(model, tokenizer, e.prompt, e.chosen)
        - _completion_logp(model, tokenizer, e.prompt, e.rejected)
        for e in EXAMPLES
    )


# --- losses: TRL's implementation against the formulas ---------------------------------------------

LOGPS = [
    # (π_c, π_r, ref_c, ref_r)
    (-10.0, -12.0, -11.0, -11.0),
    (-3.0, -3.0, -3.0, -3.0),
    (-20.0, -5.0, -18.0, -9.0),
    (-1.5, -40.0, -2.5, -30.0),
]


def _tensors(rows):
    return [torch.tensor(col, dtype=torch.float32) for col in zip(*rows, strict=True)]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_loss_is_the_formula(beta):
    pi_c, pi_r, ref_c, ref_r = _tensors(LOGPS)
    expected = -torch.log(torch.sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))))
    assert dpo_loss(pi_c, pi_r, ref_c, ref_r, beta).item() == pytest.approx(expected.mean().item(), rel=1e-6)
    # Batched equals the mean of one pair at a time.
    singles = [dpo_loss(*_tensors([row]), beta).item() for row in LOGPS]
    assert sum(singles) / len(singles) == pytest.approx(expected.mean().item(), rel=1e-6)


@pytest.mark.parametrize(("beta", "tau"), [(0.1, 0.05), (0.5, 0.05), (1.0, 1.0)])
def test_discopop_loss_is_the_formula(beta, tau):
    pi_c, pi_r, ref_c, ref_r = _tensors(LOGPS)
    rho = (pi_c - pi_r) - (ref_c - ref_r)
    logits = beta * rho
    modulation = torch.sigmoid(logits / tau)
    expected = (1 - modulation) * -torch.log(torch.sigmoid(logits)) + modulation * torch.exp(-logits)
    got = discopop_loss(pi_c, pi_r, ref_c, ref_r, beta, tau)
    assert got.item() == pytest.approx(expected.mean().item(), rel=1e-6)


def test_losses_at_zero_margin_and_their_gradient_signs():
    zero = torch.zeros(1, requires_grad=True)
    ref = torch.zeros(1)
    assert dpo_loss(zero, torch.zeros(1), ref, ref, 0.1).item() == pytest.approx(math.log(2))
    # At ρ = 0 DiscoPOP is half logistic, half exponential.
    assert discopop_loss(zero, torch.zeros(1), ref, ref, 0.1, 0.05).item() == pytest.approx(
        0.5 * math.log(2) + 0.5
    )
    # DPO pulls the chosen log-prob up; DiscoPOP with the paper's τ = 0.05 is non-convex at ρ = 0: the
    # modulation's slope (1/4τ) outweighs the rest and the first step lowers the margin.
    (dpo_grad,) = torch.autograd.grad(dpo_loss(zero, torch.zeros(1), ref, ref, 0.1), zero)
    (disco_grad,) = torch.autograd.grad(discopop_loss(zero, torch.zeros(1), ref, ref, 0.1, 0.05), zero)
    assert dpo_grad.item() < 0
    assert disco_grad.item() > 0


# --- SFT masking -----------------------------------------------------------------------------------


def test_sft_sequence_masks_the_prompt_and_truncates():
    assert sft_sequence([1, 2, 3], [7, 8, 9], max_len=10) == (
        [1, 2, 3, 7, 8, 9],
        [IGNORE_INDEX] * 3 + [7, 8, 9],
    )
    assert sft_sequence([1, 2, 3], [7, 8, 9], max_len=4) == ([1, 2, 3, 7], [IGNORE_INDEX] * 3 + [7])
    assert sft_sequence([1, 2, 3], [7], max_len=2) == ([1, 2], [IGNORE_INDEX] * 2)


def test_pad_sft_batch_pads_labels_with_ignore():
    ids, mask, labels = pad_sft_batch([([1, 2, 3], [-100, 2, 3]), ([4], [-100])], pad_id=0)
    assert ids == [[1, 2, 3], [4, 0, 0]]
    assert mask == [[1, 1, 1], [1, 0, 0]]
    assert labels == [[-100, 2, 3], [-100, -100, -100]]


def test_sft_loss_counts_completion_tokens_only():
    torch.manual_seed(0)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 5, 6]])
    logits = torch.randn(1, 5, 11)
    loss = sft_loss(logits, labels)
    # Logits at positions 0..1 predict prompt tokens 1..2 (ignored): changing them changes nothing.
    perturbed = logits.clone()
    perturbed[:, :2] += torch.randn(1, 2, 11) * 10
    assert sft_loss(perturbed, labels).item() == pytest.approx(loss.item())
    expected = F.cross_entropy(logits[0, 2:4], torch.tensor([5, 6]))
    assert loss.item() == pytest.approx(expected.item())
    # Everything masked: 0, not NaN.
    assert sft_loss(logits, torch.full((1, 5), IGNORE_INDEX)).item() == 0.0


def test_sft_tokenizes_the_prompt_as_the_teacher_renders_it(tiny_model):
    _, tokenizer = tiny_model
    ((ids, labels),) = tokenize_sft_examples(tokenizer, EXAMPLES[:1], 256, use_chat_template=True)
    prompt = tokenizer(render_prompt(tokenizer, EXAMPLES[0].prompt), add_special_tokens=False)["input_ids"]
    completion = tokenizer(EXAMPLES[0].chosen, add_special_tokens=False)["input_ids"]
    assert ids == prompt + completion + [tokenizer.eos_token_id]
    assert labels == [IGNORE_INDEX] * len(prompt) + completion + [tokenizer.eos_token_id]


# --- training --------------------------------------------------------------------------------------


def test_sft_lowers_the_completion_loss_and_restores_the_base(tiny_model):
    model, tokenizer = tiny_model
    base = _snapshot(model)
    before = -sum(_completion_logp(model, tokenizer, e.prompt, e.chosen) for e in EXAMPLES)
    steps = []
    peft_model, stats = train_policy(
        model, tokenizer, EXAMPLES, FAST, on_step=lambda s, loss: steps.append(s)
    )
    after = -sum(_completion_logp(peft_model, tokenizer, e.prompt, e.chosen) for e in EXAMPLES)
    assert stats.steps == 3 and steps == [1, 2, 3]
    assert stats.final_loss == stats.losses[-1] < stats.losses[0]
    assert after < before - 1.0
    restored = release_policy(peft_model)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in base.items())


def test_sft_is_reproducible_with_the_same_seed(tiny_model, tiny_model_dir):
    from seal.models import load_model

    one, stats_one = train_policy(*tiny_model, EXAMPLES, FAST)
    two, stats_two = train_policy(*load_model(tiny_model_dir), EXAMPLES, FAST)
    assert stats_one.losses == stats_two.losses
    assert all(
        torch.equal(a, b) for a, b in zip(_lora_state(one).values(), _lora_state(two).values(), strict=True)
    )


@pytest.mark.parametrize("objective", ["dpo", "discopop"])
def test_preference_objectives_train_the_adapter_and_leave_the_base(tiny_model, tmp_path, objective):
    model, tokenizer = tiny_model
    base = _snapshot(model)
    base_margin = _margin(model, tokenizer)
    settings = dataclasses.replace(FAST, objective=objective, epochs=4, beta=0.5)
    peft_model, stats = train_policy(model, tokenizer, EXAMPLES, settings)
    assert stats.steps == 4 and all(math.isfinite(x) for x in stats.losses)
    lora = _lora_state(peft_model)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    # Only the trained adapter is left: TRL's reference copy is gone, so saving writes one adapter.
    assert list(peft_model.peft_config) == ["default"]
    if objective == "dpo":
        assert _margin(peft_model, tokenizer) > base_margin
    peft_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []
    restored = release_policy(peft_model)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in base.items())
    # TRL's fused LM head is off the base again: a plain forward gives logits.
    assert "forward" not in vars(restored)


def test_continuing_from_a_parent_starts_from_its_weights(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    parent, _ = train_policy(model, tokenizer, EXAMPLES, FAST)
    parent_weights = _lora_state(parent)
    parent.save_pretrained(tmp_path / "parent")
    release_policy(parent)

    # No epochs: the model handed back is the parent as loaded.
    start, stats = train_policy(
        model, tokenizer, EXAMPLES, dataclasses.replace(FAST, epochs=0), tmp_path / "parent"
    )
    assert stats.steps == 0
    started = _lora_state(start)
    assert started.keys() == parent_weights.keys()
    assert all(torch.equal(started[k], parent_weights[k]) for k in started)
    release_policy(start)

    one_epoch = dataclasses.replace(FAST, epochs=1)
    child, stats = train_policy(model, tokenizer, EXAMPLES, one_epoch, tmp_path / "parent")
    assert all(p.requires_grad for n, p in child.named_parameters() if "lora_" in n)
    release_policy(child)
    fresh, fresh_stats = train_policy(model, tokenizer, EXAMPLES, one_epoch)
    release_policy(fresh)
    # The child's first loss is the parent's on the same batch: lower than a fresh LoRA's.
    assert stats.losses[0] < fresh_stats.losses[0]


def test_continuing_needs_the_parents_rank(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    parent, _ = train_policy(model, tokenizer, EXAMPLES, dataclasses.replace(FAST, epochs=0))
    parent.save_pretrained(tmp_path / "parent")
    release_policy(parent)
    with pytest.raises(InvalidArgument, match="rank 4") as err:
        train_policy(model, tokenizer, EXAMPLES, dataclasses.replace(FAST, rank=8), tmp_path / "parent")
    assert err.value.field == "settings.rank"
    assert not any("lora_" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize(
    ("objective", "examples", "field"),
    [
        ("ppo", EXAMPLES, "settings.objective"),
        ("sft", [], "examples"),
        ("dpo", [EXAMPLES[0], dataclasses.replace(EXAMPLES[1], rejected="")], "examples[1].rejected"),
        ("discopop", [dataclasses.replace(EXAMPLES[0], rejected="")], "examples[0].rejected"),
        ("sft", [dataclasses.replace(EXAMPLES[0], chosen="")], "examples[0].chosen"),
    ],
)
def test_bad_requests_name_the_field(tiny_model, objective, examples, field):
    model, tokenizer = tiny_model
    with pytest.raises(InvalidArgument) as err:
        train_policy(model, tokenizer, examples, dataclasses.replace(FAST, objective=objective))
    assert err.value.field == field


def test_sft_needs_no_rejected(tiny_model):
    peft_model, stats = train_policy(*tiny_model, [dataclasses.replace(EXAMPLES[0], rejected="")], FAST)
    assert stats.steps == 3
    release_policy(peft_model)


def test_a_cancelled_run_strips_the_lora(tiny_model):
    model, tokenizer = tiny_model

    def cancel(step: int, loss: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_policy(model, tokenizer, EXAMPLES, FAST, on_step=cancel)
    assert not any("lora_" in name for name, _ in model.named_parameters())


def test_training_data_digest_is_deterministic_and_ordered():
    digest = policy_training_data_sha256(EXAMPLES)
    assert digest == policy_training_data_sha256(list(EXAMPLES))
    assert len(digest) == 64
    assert digest != policy_training_data_sha256(EXAMPLES[::-1])
    assert digest != policy_training_data_sha256([EXAMPLES[0], dataclasses.replace(EXAMPLES[1], chosen="x")])
    assert policy_training_data_sha256([]) != digest


# --- the policy store ------------------------------------------------------------------------------


@pytest.fixture()
def trained(tiny_model):
    model, tokenizer = tiny_model
    peft_model, stats = train_policy(model, tokenizer, EXAMPLES, dataclasses.replace(FAST, epochs=1))
    yield model, tokenizer, peft_model, stats
    release_policy(peft_model)


def _lineage(**kwargs) -> PolicyVersion:
    return PolicyVersion(
        **{"round": 1, "base_model": "tiny", "settings": FAST, "examples": 2, "job_id": "job", **kwargs}
    )


def test_store_round_trip(trained, tmp_path):
    _, _, peft_model, _ = trained
    store = PolicyStore(tmp_path / "policies")
    saved = store.save(peft_model, _lineage(training_data_sha256=policy_training_data_sha256(EXAMPLES)))
    path = store.get(saved.version)
    assert path == tmp_path / "policies" / saved.version
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        LINEAGE,
    ]
    # The address is the adapter's weights and config, not the lineage.
    adapter_files = [f for f in directory_manifest(path) if f.name != LINEAGE]
    assert saved.version == manifest_sha256(adapter_files)
    assert store.lineage(saved.version) == saved
    assert saved.created_at > 0 and saved.job_id == "job" and saved.settings == FAST
    assert json.loads((path / LINEAGE).read_text())["version"] == saved.version
    # Saved then loaded equals the in-memory adapter.
    on_disk = load_file(path / "adapter_model.safetensors")
    in_memory = {k.replace(".default", ""): v for k, v in _lora_state(peft_model).items()}
    assert on_disk.keys() == in_memory.keys()
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in on_disk)


def test_store_lists_newest_first_and_same_weights_keep_one_version(trained, tiny_model_dir, tmp_path):
    from seal.models import load_model

    _, _, peft_model, _ = trained
    store = PolicyStore(tmp_path)
    assert store.list() == []
    old = store.save(peft_model, _lineage(created_at=100.0))
    again = store.save(peft_model, _lineage(created_at=300.0, job_id="other"))
    assert again == old  # equal weights, equal address: the first write stays
    other_model, _ = train_policy(*load_model(tiny_model_dir), EXAMPLES, dataclasses.replace(FAST, epochs=2))
    new = store.save(other_model, _lineage(created_at=200.0, parent=old.version))
    assert [v.version for v in store.list()] == [new.version, old.version]
    assert store.lineage(new.version).parent == old.version


def test_store_never_shows_a_half_written_version(trained, tmp_path):
    _, _, peft_model, _ = trained

    class Crashing:
        def save_pretrained(self, path, **kwargs):
            peft_model.save_pretrained(path, **kwargs)
            raise OSError("disk full")

    store = PolicyStore(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        store.save(Crashing(), _lineage())
    assert list(tmp_path.iterdir()) == []
    assert store.list() == []


@pytest.mark.parametrize("version", ["", "latest", "A" * 64, "../" + "a" * 61, "0" * 64])
def test_store_get_unknown_is_not_found(tmp_path, version):
    store = PolicyStore(tmp_path)
    with pytest.raises(NotFound, match="policy version"):
        store.get(version)
    with pytest.raises(NotFound):
        store.lineage(version)
