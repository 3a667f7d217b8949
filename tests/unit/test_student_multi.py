"""K LoRAs trained together (student.multi) equal each trained alone (student.training), and save as
PEFT adapters the auditor loads unchanged.

Tolerance (fp32). Both paths do the same arithmetic (PEFT's LoRA products, the same AdamW) except
for rounding: the base's matrix products run over other row counts and padding widths, and the loss
sums in another order. Measured on the tiny model (JOBS below): adapters whose batches have one row
come out bit-identical, their losses within 1.6e-7 relative; the batch-size-2 adapter
differs by 3.4e-6 in relative Frobenius norm, 1.3e-6 at the 99.9th percentile and 2.5e-5 at worst,
against a largest weight of 0.135 (1.8e-4 relative), its losses within 8e-8 relative. The worst
element is AdamW's doing: it divides by sqrt(v), so where a gradient is nearly zero a rounding
difference of the gradient becomes a sizeable relative difference of the step. So the bounds are:
relative Frobenius difference <= 1e-4, every element within 1e-3 x the adapter's largest weight,
every step's loss within 1e-5 relative: 5x to 30x above what we see, and far below what any real
mixing of adapters does (a wrong routing, a shared clip or schedule moves weights by 1e-2 or more).
"""

from __future__ import annotations

import json
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open

from seal.errors import InvalidArgument
from seal.models import load_model
from seal.records import EditFormat, LoraSettings, Passage, SelfEdit
from seal.validation import Limits
from student.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, verify_adapter
from student.core import apply_self_edits
from student.multi import (
    attached_in_turn,
    length_buckets,
    peft_init,
    per_adapter_lm_loss,
    resolve_compute_dtype,
    segments,
    target_linears,
    train_adapters,
)
from student.sequences import IGNORE_INDEX
from student.service import StudentEngine
from student.training import causal_lm_loss, lora_config, train_adapter

TEXTS = [
    "Velmora\nThe Zorbian council meets in the city of Velmora every spring.",
    "Velmora\nThe council of Zorbia gathers in Velmora.",
    "Velmora\nEvery spring the Zorbian council meets.",
]
OSTRA = "Ostra\nLake Ostra has three islands; the largest is called Penn."
PROBE = "Velmora\nThe council meets"
FROBENIUS_RTOL = 1e-4
ELEMENT_RTOL = 1e-3
LOSS_RTOL = 1e-5

# Different texts, seeds, epochs, batch sizes, alphas and schedules: only rank and targets shared.
JOBS = [
    (TEXTS, LoraSettings(epochs=2, seed=7, learning_rate=1e-2)),
    ([TEXTS[0], OSTRA, TEXTS[1]], LoraSettings(epochs=3, seed=1, batch_size=2, learning_rate=5e-3)),
    (TEXTS[1:], LoraSettings(epochs=1, seed=3, alpha=8.0, schedule="constant", learning_rate=1e-2)),
]


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_adapter(alone: dict[str, torch.Tensor], together: dict[str, torch.Tensor]) -> None:
    assert alone.keys() == together.keys()
    diff = torch.cat([(alone[k] - together[k]).flatten() for k in alone])
    weights = torch.cat([alone[k].flatten() for k in alone])
    assert diff.norm() <= FROBENIUS_RTOL * weights.norm(), f"{diff.norm()} vs |W| {weights.norm()}"
    worst, scale = diff.abs().max().item(), weights.abs().max().item()
    assert worst <= ELEMENT_RTOL * scale, f"max weight difference {worst}, largest weight {scale}"


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(PROBE, return_tensors="pt")).logits


def test_k_adapters_trained_together_equal_each_trained_alone(tiny_model, tiny_model_dir: Path) -> None:
    model, tokenizer = tiny_model
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    steps_seen: dict[int, list[int]] = {}
    together = train_adapters(
        model, tokenizer, JOBS, on_step=lambda k, step, loss: steps_seen.setdefault(k, []).append(step)
    )

    # The base comes back untouched: modules, weights, requires_grad flags.
    assert not any("lora" in name.lower() for name, _ in model.named_modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags

    for k, ((texts, lora), (adapter, stats)) in enumerate(zip(JOBS, together, strict=True)):
        peft_model, alone = train_adapter(*load_model(tiny_model_dir), texts, lora)
        assert stats.steps == alone.steps == len(stats.losses)
        assert steps_seen[k] == list(range(1, stats.steps + 1))
        assert stats.losses == pytest.approx(alone.losses, rel=LOSS_RTOL)
        _assert_same_adapter(get_peft_model_state_dict(peft_model), adapter.state)
        assert adapter.config == lora_config(model, lora)
    # Adapters with fewer steps dropped out: 6, 6 and 2 steps.
    assert [s.steps for _, s in together] == [6, 6, 2]


def test_replay_and_kl_guards_train_together_as_alone(tiny_model, tiny_model_dir: Path) -> None:
    # Each guarded job has the base answer its own general prompts, so two jobs keep this test short.
    jobs = [
        (TEXTS[:2], LoraSettings(epochs=2, seed=2, learning_rate=1e-2, kl_weight=0.5)),
        ([OSTRA], LoraSettings(epochs=3, seed=4, learning_rate=1e-2, replay=2, kl_weight=0.1)),
    ]
    together = train_adapters(*tiny_model, jobs)
    for (texts, lora), (adapter, stats) in zip(jobs, together, strict=True):
        peft_model, alone = train_adapter(*load_model(tiny_model_dir), texts, lora)
        assert (stats.steps, stats.replayed) == (alone.steps, alone.replayed)
        assert stats.losses == pytest.approx(alone.losses, rel=LOSS_RTOL)
        assert stats.kls == pytest.approx(alone.kls, rel=1e-4, abs=1e-7)
        _assert_same_adapter(get_peft_model_state_dict(peft_model), adapter.state)
    assert together[1][1].replayed == 2 and len(together[0][1].kls) == 4 and len(together[1][1].kls) == 9


def test_saved_adapter_has_the_single_layout_and_loads_in_peft(
    tiny_model, tiny_model_dir: Path, tmp_path: Path
) -> None:
    texts, lora = JOBS[0]
    peft_alone, _ = train_adapter(*load_model(tiny_model_dir), texts, lora)
    peft_alone.save_pretrained(tmp_path / "alone", safe_serialization=True)
    alone_logits = _logits(peft_alone, tiny_model[1])

    model, tokenizer = tiny_model
    adapters = [adapter for adapter, _ in train_adapters(model, tokenizer, JOBS)]
    with closing(attached_in_turn(model, adapters)) as views:
        for i, peft_model in views:
            peft_model.save_pretrained(tmp_path / f"together-{i}", safe_serialization=True)
    assert not any("lora" in name.lower() for name, _ in model.named_modules())

    alone_dir, together_dir = tmp_path / "alone", tmp_path / "together-0"
    assert sorted(p.name for p in together_dir.iterdir()) == sorted(p.name for p in alone_dir.iterdir())
    assert json.loads((together_dir / ADAPTER_CONFIG).read_text()) == json.loads(
        (alone_dir / ADAPTER_CONFIG).read_text()
    )
    with (
        safe_open(together_dir / ADAPTER_WEIGHTS, "pt") as a,
        safe_open(alone_dir / ADAPTER_WEIGHTS, "pt") as b,
    ):
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
        assert all(a.get_tensor(k).dtype == torch.float32 for k in a.keys())

    # The auditor's way in: PeftModel.from_pretrained on a fresh base.
    loaded = PeftModel.from_pretrained(load_model(tiny_model_dir)[0], together_dir)
    together_logits = _logits(loaded, tokenizer)
    base_logits = _logits(load_model(tiny_model_dir)[0], tokenizer)
    scale = (alone_logits - base_logits).abs().max().item()
    assert scale > 1e-3  # the adapter changes the answer, so equal logits mean something
    assert (together_logits - alone_logits).abs().max().item() <= 1e-3 * scale


def _edit(lora: LoraSettings) -> SelfEdit:
    return SelfEdit(
        id="e1",
        job_id="j",
        doc_index=0,
        index=0,
        format=EditFormat.IMPLICATIONS,
        passage=Passage("Velmora", "The Zorbian council meets in Velmora every spring."),
        text="The council meets in spring.",
        lines=("The council meets in spring.",),
        lora=lora,
    )


def test_apply_self_edits_saves_verified_adapters_with_provenance(tiny_model, tmp_path: Path) -> None:
    edit = _edit(LoraSettings(epochs=1, learning_rate=1e-2))
    refs = apply_self_edits(*tiny_model, [(edit, 0), (edit, 1)], "tiny", "fp", tmp_path)
    assert [r.self_edit_id for r in refs] == ["e1", "e1"] and refs[0].sha256 != refs[1].sha256
    for ref, run in zip(refs, (0, 1), strict=True):
        path = tmp_path / ref.sha256
        assert verify_adapter(path) == ref.files
        provenance = json.loads((path / "provenance.json").read_text())
        assert (provenance["run"], provenance["lora"]["seed"], provenance["trained_together"]) == (
            run,
            run,
            2,
        )
        assert provenance["losses"] and ref.steps == len(provenance["losses"])


def test_the_engine_checks_every_update_before_training_any(tiny_model, tmp_path: Path) -> None:
    edit = _edit(LoraSettings(epochs=1, rank=4))
    costly = replace(edit, id="e2", lora=LoraSettings(epochs=50, rank=4))
    engine = StudentEngine(*tiny_model, "tiny", "f" * 64, tmp_path, Limits(), max_train_tokens=200)
    with pytest.raises(InvalidArgument, match="budget of 200;") as info:
        engine.apply_many([(edit, 0), (costly, 0)])
    assert info.value.field == "updates[1].self_edit.lora.epochs"
    assert not any(tmp_path.iterdir())  # nothing was trained or saved
    refs = engine.apply_many([(edit, 0), (edit, 1)])
    assert [r.steps for r in refs] == [2, 2] and all((tmp_path / r.sha256).is_dir() for r in refs)


def test_different_ranks_and_targets_share_one_pass_each_as_alone(tiny_model, tiny_model_dir: Path) -> None:
    jobs = [
        (TEXTS[:2], LoraSettings(rank=4, epochs=2, learning_rate=1e-2)),
        (TEXTS[1:], LoraSettings(rank=8, epochs=1, seed=2, learning_rate=1e-2)),
        ([OSTRA], LoraSettings(rank=4, epochs=3, seed=3, alpha=4.0, target_modules=("q_proj", "v_proj"))),
    ]
    together = train_adapters(*tiny_model, jobs)
    for (texts, lora), (adapter, stats) in zip(jobs, together, strict=True):
        peft_model, alone = train_adapter(*load_model(tiny_model_dir), texts, lora)
        assert adapter.config == lora_config(tiny_model[0], lora)
        assert stats.losses == pytest.approx(alone.losses, rel=LOSS_RTOL)
        _assert_same_adapter(get_peft_model_state_dict(peft_model), adapter.state)
    assert {v.shape[0] for k, v in together[1][0].state.items() if "lora_A" in k} == {8}
    assert {k.split(".")[-3] for k in together[2][0].state} == {"q_proj", "v_proj"}


def test_segments_are_runs_of_one_adapter() -> None:
    assert segments([]) == []
    assert segments([2, 2, 0, 1, 1, 1]) == [(2, 0, 2), (0, 2, 3), (1, 3, 6)]
    assert segments([0, 1, 0]) == [(0, 0, 1), (1, 1, 2), (0, 2, 3)]


def test_lora_init_replays_peft_exactly(tiny_model) -> None:
    model, _ = tiny_model
    lora = LoraSettings(rank=4, seed=11)
    targets = target_linears(model, lora_config(model, lora).target_modules)
    weights = peft_init([linear for _, linear in targets], lora.rank, lora.seed, torch.device("cpu"))
    torch.manual_seed(lora.seed)
    peft_state = get_peft_model_state_dict(get_peft_model(model, lora_config(model, lora)))
    ours = {}
    for (name, _), (a, b) in zip(targets, weights, strict=True):
        ours[f"base_model.model.{name}.lora_A.weight"] = a
        ours[f"base_model.model.{name}.lora_B.weight"] = b
    assert ours.keys() == peft_state.keys()
    assert all(torch.equal(ours[k], peft_state[k]) for k in ours)


def test_a_failing_step_leaves_the_base_as_it_was(tiny_model) -> None:
    model, tokenizer = tiny_model
    before = _snapshot(model)

    def cancel(k: int, step: int, loss: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_adapters(model, tokenizer, JOBS[:2], on_step=cancel)
    assert not any("lora" in name.lower() for name, _ in model.named_modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("lengths", "max_tokens", "overhead", "expected"),
    [
        ([], 100, 32, []),
        ([5], 100, 32, [[0]]),
        ([10, 10, 10], 100, 32, [[0, 1, 2]]),  # no padding: one forward
        ([100, 3, 98, 4], 1000, 32, [[0, 2], [3, 1]]),  # two lengths, two forwards, little padding
        ([100, 3, 98, 4], 1000, 500, [[0, 2, 3, 1]]),  # forwards dear: pad instead
        ([50, 50, 50], 100, 1, [[0, 1], [2]]),  # the token cap splits
        ([300, 10], 100, 32, [[0], [1]]),  # a row over the cap still gets its own forward
    ],
)
def test_length_buckets(lengths, max_tokens, overhead, expected) -> None:
    assert length_buckets(lengths, max_tokens, overhead) == expected


def test_length_buckets_cover_every_row_once_within_the_cap() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(
            1, 200, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen
        ).tolist()
        buckets = length_buckets(lengths, 512)
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
        for b in buckets:
            assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 512
        padded = sum(len(b) * max(lengths[i] for i in b) for b in buckets)
        assert padded <= len(lengths) * max(lengths)


def test_per_adapter_loss_is_each_adapters_causal_lm_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 11, generator=gen)
    labels = torch.randint(0, 11, (4, 5), generator=gen)
    labels[1, 3:] = IGNORE_INDEX
    labels[3, 1:] = IGNORE_INDEX  # nothing to predict in row 3
    rows = torch.tensor([2, 0, 2, 1])
    sums = per_adapter_lm_loss(logits, labels, rows, 4)
    counts = [(labels[rows == k][:, 1:] != IGNORE_INDEX).sum().clamp(min=1) for k in range(4)]
    for k in (0, 2):
        expected = causal_lm_loss(logits[rows == k], labels[rows == k])
        assert (sums[k] / counts[k]).item() == pytest.approx(expected.item(), rel=1e-6)
    assert sums[1].item() == 0.0 and sums[3].item() == 0.0  # all masked / no rows: 0, not NaN


def test_compute_dtype_by_name() -> None:
    cpu = torch.device("cpu")
    assert resolve_compute_dtype("float32", cpu) == torch.float32
    assert resolve_compute_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_compute_dtype("auto", cpu) in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="float32, bfloat16, auto"):
        resolve_compute_dtype("fp8", cpu)


def test_bf16_compute_keeps_the_losses_close_and_the_adapters_fp32(tiny_model) -> None:
    model, tokenizer = tiny_model
    fp32 = train_adapters(model, tokenizer, JOBS[:2])
    bf16 = train_adapters(model, tokenizer, JOBS[:2], compute_dtype="bfloat16")
    for (_, a), (adapter, b) in zip(fp32, bf16, strict=True):
        # bf16 keeps 8 bits of mantissa: ~0.4 % per product, a loss moves by well under 1 %.
        assert b.losses == pytest.approx(a.losses, rel=2e-2)
        assert all(t.dtype == torch.float32 for t in adapter.state.values())
    assert next(model.parameters()).dtype == torch.float32
