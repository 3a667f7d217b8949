"""Benchmark: milder updates against forgetting, beyond `seal bench retention`'s settings.

Each tried on the retention study's cached self-edits (one per passage, `seal bench retention`'s
self_edits.jsonl, whose first text is the passage itself):
- the default adapter with its LoRA delta scaled by s (W + s·ΔW: one training, several scales);
- LoRA on the MLP projections only;
- the passage alone (the update without the self-edit's lines);
- the self-edit's grounded lines only: a line stays when at least 3 of its content words are there
  and 30 % of them occur in the passage (the small teacher's lines are often fragments or inventions).
Per (passage, setting, scale) a row: τ accuracy after (all the passage's questions, without the
passage), retention drop and KL shift as `seal bench retention` measures them. Rows are appended as
they land and a rerun skips those already there:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/milder_updates.py \\
        --edits docs/results/retention/self_edits.jsonl --out bench-out/milder_updates.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seal.bench.knowledge import default_data_dir
from seal.bench.retention import demo_passages, measure_adapter, measure_base, squad_passages, tau_accuracy
from seal.models import DEFAULT_MODEL, load_model, resolve_model
from seal.records import LoraSettings
from student.training import release_adapter, train_adapter

MLP = ("gate_proj", "up_proj", "down_proj")
STOP = set(
    "that this with from have were been their there they which would could should about into than then "
    "them these those what when where while also such other more most some only over very your will "
    "shall being does done many much each both".split()
)


def content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 4 and w not in STOP]


def grounded(texts: list[str], share: float = 0.3) -> list[str]:
    """The passage (texts[0]) and the lines ("title\nline") whose content words are in it enough."""
    passage = set(content_words(texts[0]))
    kept = [texts[0]]
    for text in texts[1:]:
        words = content_words(text.split("\n", 1)[-1])
        if len(words) >= 3 and sum(w in passage for w in words) / len(words) >= share:
            kept.append(text)
    return kept


def every(texts: list[str]) -> list[str]:
    return texts


# name -> (recipe, scales of the trained delta, which of the passage's texts are trained on)
SETTINGS: dict[str, tuple[LoraSettings, tuple[float, ...], Callable[[list[str]], list[str]]]] = {
    "default": (LoraSettings(), (1.0, 0.6, 0.4, 0.25), every),
    "mlp": (LoraSettings(target_modules=MLP), (1.0, 0.5), every),
    "passage-only": (LoraSettings(), (1.0,), lambda texts: texts[:1]),
    "grounded-0.3": (LoraSettings(), (1.0,), grounded),
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
    parser.add_argument("--passages", default="demo:0,demo:1,demo:2,squad:1045,squad:1212")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated setting names")
    parser.add_argument("--out", type=Path, default=Path("bench-out/milder_updates.jsonl"))
    args = parser.parse_args()

    # A passage cached twice (an earlier samples-per-edit setting) keeps its last row: the self-edit the
    # retention study's table uses (demo:0 has 5 texts there, not the older 19).
    texts = {row["passage"]: row["texts"] for row in map(json.loads, args.edits.read_text().splitlines())}
    done = set()
    if args.out.exists():
        done = {(r["passage"], r["setting"]) for r in map(json.loads, args.out.read_text().splitlines())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(resolve_model(DEFAULT_MODEL))
    base = measure_base(model, tokenizer)
    wanted = args.passages.split(",")
    passages = demo_passages() + squad_passages(default_data_dir(), 2)
    for passage in (p for p in passages if p.key in wanted):
        for name in args.settings.split(","):
            lora, scales, pick = SETTINGS[name]
            if (passage.key, name) in done:
                continue
            trained_on = pick(texts[passage.key])
            peft_model, stats = train_adapter(model, tokenizer, trained_on, lora)
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
                        "texts": len(trained_on),
                        "acc": accuracy,
                        "drop": figures["retention_drop"],
                        "kl": figures["kl"],
                        "train_s": stats.seconds,
                        "steps": stats.steps,
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
