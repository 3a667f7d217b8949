"""Stacking LoRA layers into one adapter (seal.models.stack_loras): on the tiny model, the stacked
adapter gives the logits of the layers merged one after another (merge_adapters)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from seal.models import merge_adapters, read_lora, stack_loras, write_lora


def random_lora(model: Any, out: Path, seed: int, **settings: Any) -> Path:
    """A LoRA of `model` whose B is random too (PEFT starts B at zero), saved as PEFT saves it."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture()
def layers(tiny_model: tuple[Any, Any], tmp_path: Path) -> list[Path]:
    model, _ = tiny_model
    return [
        random_lora(model, tmp_path / "a", 0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        # Another rank, rsLoRA's scale, and modules the first does not target (and one it does).
        random_lora(
            model,
            tmp_path / "b",
            1,
            r=2,
            lora_alpha=3,
            use_rslora=True,
            target_modules=["v_proj", "o_proj", "down_proj"],
        ),
        random_lora(model, tmp_path / "c", 2, r=3, lora_alpha=3, target_modules=["q_proj"]),
    ]


def logits(model: Any, tokenizer: Any) -> torch.Tensor:
    enc = tokenizer(["The quick brown fox", "Zorbian council"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**enc).logits


def test_the_stacked_adapter_equals_the_layers_merged_in_turn(
    tiny_model: tuple[Any, Any], layers: list[Path], tmp_path: Path
) -> None:
    model, tokenizer = tiny_model
    config, tensors = stack_loras([read_lora(d) for d in layers])
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (9, 9, False)
    assert config["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]
    stacked = write_lora(tmp_path / "stacked", config, tensors)
    merged = merge_adapters(model, layers)
    served = PeftModel.from_pretrained(copy.deepcopy(model), str(stacked), is_trainable=False).eval()
    expected, got = logits(merged, tokenizer), logits(served, tokenizer)
    assert not torch.allclose(expected, logits(model, tokenizer), atol=1e-2)  # the layers do change it
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_one_layer_stacks_to_itself_at_scale_one(tiny_model: tuple[Any, Any], layers: list[Path]) -> None:
    config, tensors = stack_loras([read_lora(layers[0])])
    _, original = read_lora(layers[0])
    for key, value in original.items():
        scale = 8 / 4 if ".lora_B." in key else 1.0
        torch.testing.assert_close(tensors[key], value * scale)
    assert (config["r"], config["lora_alpha"]) == (4, 4)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ],
)
def test_what_cannot_be_stacked_exactly_is_refused(layers: list[Path], change: dict, named: str) -> None:
    config, tensors = read_lora(layers[0])
    with pytest.raises(ValueError, match=named):
        stack_loras([({**config, **change}, tensors), read_lora(layers[1])])
    with pytest.raises(ValueError, match="lora_magnitude"):
        stack_loras([(config, {**tensors, "x.lora_magnitude_vector": torch.ones(2)})])
