"""Benchmark: what an update teaches (τ accuracy) against what it costs (forgetting), per LoRA setting.

The demo's passages and the default model: the teacher writes N self-edits per passage once, then
each LoRA setting below trains on every one of them, and the auditor's cores measure accuracy on
the passage's questions (without the passage) and on the general-knowledge anchor set, in one run:

    .venv/bin/python benchmarks/lora_tradeoff.py [--n 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

from auditor.evaluation import anchor_accuracy, evaluate_document, load_adapter, unload_adapter
from auditor.grading import accuracy
from gateway.api import parse_job_spec
from seal.cli import load_example
from seal.models import DEFAULT_MODEL, load_model, model_fingerprint, resolve_model
from seal.records import EditFormat, LoraSettings, SamplingSettings
from student.core import apply_self_edit
from teacher.backends import TransformersGenerator
from teacher.core import propose_self_edits

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
SETTINGS = {
    "default: r16, all projections, 5 epochs": LoraSettings(),
    "attention only": LoraSettings(target_modules=ATTENTION),
    "3 epochs": LoraSettings(epochs=3),
    "lr 5e-4": LoraSettings(learning_rate=5e-4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3, help="self-edits per passage")
    args = parser.parse_args()
    path = resolve_model(DEFAULT_MODEL)
    model, tokenizer = load_model(path)
    fingerprint = model_fingerprint(path)
    docs = parse_job_spec(load_example()).documents
    teacher = TransformersGenerator(model, tokenizer)
    edits = [
        (doc, se)
        for i, doc in enumerate(docs)
        for se in propose_self_edits(
            teacher,
            doc.passage(),
            EditFormat.IMPLICATIONS,
            args.n,
            LoraSettings(),
            SamplingSettings(),
            "tradeoff",
            i,
        )
    ]
    anchors_before = anchor_accuracy(model, tokenizer)
    results = {}
    for name, lora in SETTINGS.items():
        started = time.perf_counter()
        taught, anchors = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for doc, se in edits:
                adapter = apply_self_edit(
                    model,
                    tokenizer,
                    dataclasses.replace(se, lora=lora),
                    DEFAULT_MODEL,
                    fingerprint,
                    Path(tmp),
                )
                peft_model = load_adapter(model, Path(tmp) / adapter.sha256)
                taught.append(accuracy(evaluate_document(peft_model, tokenizer, doc)))
                anchors.append(anchor_accuracy(peft_model, tokenizer))
                unload_adapter(peft_model)
        results[name] = {
            "tau_accuracy_mean": round(statistics.mean(taught), 3),
            # edits are ordered passage by passage, N each
            "tau_accuracy_best_per_passage": [
                round(max(taught[k * args.n : (k + 1) * args.n]), 2) for k in range(len(docs))
            ],
            "anchor_accuracy_mean": round(statistics.mean(anchors), 3),
            "anchor_drop_over_0.2": sum(anchors_before - a > 0.2 + 1e-9 for a in anchors),
            "updates": len(edits),
            "seconds": round(time.perf_counter() - started),
        }
        print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps({"anchor_accuracy_before": anchors_before, "settings": results}, indent=2))


if __name__ == "__main__":
    main()
