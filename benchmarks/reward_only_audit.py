"""Benchmark: what an E-step audit costs with the forgetting guardrails, and reward-only.

A policy-training round only needs each self-edit's reward τ; its audits skip retention and KL
(`reward_only`, set by the gateway on a round's tasks). This times `auditor.core.audit` both ways on
the same adapter of the default model, alternating, in one process, with the base's side of the
retention checks computed once beforehand, as the auditor service caches it:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/reward_only_audit.py --repeats 3

The adapter is the passage-only update (default recipe, 5 epochs) of one SQuAD training passage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from auditor.core import audit, base_retention
from auditor.retention import load_retention_set
from seal.bench.knowledge import default_data_dir, load_training_items
from seal.models import DEFAULT_MODEL, load_model, resolve_model
from seal.records import EditFormat, LoraSettings, SelfEdit
from student.artifacts import save_adapter
from student.sequences import build_training_texts
from student.training import release_adapter, train_adapter


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", type=Path, default=default_data_dir())
    p.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    args = p.parse_args()

    model, tokenizer = load_model(resolve_model(DEFAULT_MODEL))
    (item,) = load_training_items(args.data, 1)
    doc = item.doc
    edit = SelfEdit(
        id="bench/0",
        job_id="bench",
        doc_index=0,
        index=0,
        format=EditFormat.PASSAGE,
        passage=doc.passage(),
        text=doc.context,
        lines=(),
        lora=replace(LoraSettings(), epochs=5),
    )
    peft_model, _ = train_adapter(model, tokenizer, build_training_texts(edit), edit.lora)
    with tempfile.TemporaryDirectory() as tmp:
        sha, adapter_dir, _ = save_adapter(peft_model, Path(tmp), {"bench": True})
        release_adapter(peft_model)
        started = time.perf_counter()
        retention = base_retention(model, tokenizer)
        base_side = time.perf_counter() - started
        times: dict[str, list[float]] = {"full": [], "reward_only": []}
        rewards = {}
        for _ in range(args.repeats):
            for kind in times:
                started = time.perf_counter()
                verdict = audit(
                    model,
                    tokenizer,
                    doc,
                    edit,
                    adapter_dir,
                    sha,
                    "f" * 64,
                    "bench",
                    retention=None if kind == "reward_only" else retention,
                    reward_only=kind == "reward_only",
                )
                times[kind].append(time.perf_counter() - started)
                rewards[kind] = verdict.reward
    result = {
        "passage": doc.title,
        "questions": len(doc.questions),
        "retention_questions": len(retention.questions or load_retention_set()),
        "kl_sequences": len(retention.sequences),
        "base_side_once_s": base_side,
        "full_s": times["full"],
        "reward_only_s": times["reward_only"],
        "median_ratio": statistics.median(times["full"]) / statistics.median(times["reward_only"]),
        "rewards": rewards,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
