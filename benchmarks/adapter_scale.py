"""Benchmark: does a trained adapter, scaled down, keep what it taught and give back what it broke?

Two cheap ways to a milder update, each tried on the retention study's cached self-edits (one per
passage, `seal bench retention`'s self_edits.jsonl): the default adapter with its LoRA delta scaled
by s (W + s·ΔW, one training, several scales), and LoRA on the MLP projections only. Per (passage,
setting, scale) a row: τ accuracy after (all the passage's questions, without the passage),
retention drop and KL shift as `seal bench retention` measures them. Rows are appended as they land
and a rerun skips those already there:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/adapter_scale.py \\
        --edits docs/results/retention/self_edits.jsonl --out bench-out/adapter_scale.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from seal.bench.retention import demo_passages, measure_adapter, measure_base, tau_accuracy
from seal.models import DEFAULT_MODEL, load_model, resolve_model
from seal.records import LoraSettings
from student.training import release_adapter, train_adapter

MLP = ("gate_proj", "up_proj", "down_proj")
SETTINGS: dict[str, tuple[LoraSettings, tuple[float, ...]]] = {
    "default": (LoraSettings(), (1.0, 0.6, 0.4, 0.25)),
    "mlp": (LoraSettings(target_modules=MLP), (1.0, 0.5)),
}


def scaled_layers(peft_model: Any) -> list[tuple[Any, float]]:
    """Every LoRA layer of the "default" adapter with its trained scaling (alpha / rank)."""
    return [
        (m, m.scaling["default"])
        for m in peft_model.modules()
        if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=Path, default=Path("docs/results/retention/self_edits.jsonl"))
    parser.add_argument("--passages", default="demo:0,demo:1", help="comma-separated passage keys")
    parser.add_argument("--out", type=Path, default=Path("bench-out/adapter_scale.jsonl"))
    args = parser.parse_args()

    texts = {row["passage"]: row["texts"] for row in map(json.loads, args.edits.read_text().splitlines())}
    done = set()
    if args.out.exists():
        done = {(r["passage"], r["setting"]) for r in map(json.loads, args.out.read_text().splitlines())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(resolve_model(DEFAULT_MODEL))
    base = measure_base(model, tokenizer)
    wanted = args.passages.split(",")
    for passage in (p for p in demo_passages() if p.key in wanted):
        for name, (lora, scales) in SETTINGS.items():
            if (passage.key, name) in done:
                continue
            peft_model, stats = train_adapter(model, tokenizer, texts[passage.key], lora)
            layers = scaled_layers(peft_model)
            rows = []
            for scale in scales:
                for layer, trained in layers:
                    layer.scaling["default"] = trained * scale
                accuracy, _ = tau_accuracy(peft_model, tokenizer, passage.doc)
                figures = measure_adapter(peft_model, tokenizer, base)
                rows.append(
                    {
                        "passage": passage.key,
                        "setting": name,
                        "scale": scale,
                        "acc": accuracy,
                        "drop": figures["retention_drop"],
                        "kl": figures["kl"],
                        "train_s": stats.seconds,
                    }
                )
                print(rows[-1], flush=True)
            for layer, trained in layers:
                layer.scaling["default"] = trained
            release_adapter(peft_model)
            with args.out.open("a") as fh:  # a setting's rows land together: a rerun redoes it whole
                fh.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
