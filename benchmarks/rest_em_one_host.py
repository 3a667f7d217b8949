"""Benchmark: ReST-EM rounds on one host, in one process (a GPU box without Redis or the services).

`seal bench rest-em` runs the outer loop through the services: one student task per update, each
with its own signed verdict. On one GPU host without Redis or the services (a lent machine with no
package index), this runs the same pieces in one process, round by round:
- E-step: the teacher's sampling (`teacher.core.propose_self_edits`, a chunk's contexts in one
  generate call), each self-edit's update (`student.sequences.build_training_texts`, then
  `student.training.train_adapter` one by one, or with `--trainer batched` `student.multi`'s one pass
  for the chunk: slower on an H100, docs/PERFORMANCE.md), its reward τ = accuracy after
  minus before on all the context's questions, asked without the passage
  (`auditor.evaluation.evaluate_document`, as `seal bench knowledge` scores);
- selection: per context the best self-edit if its reward exceeds the threshold (the services'
  `best_of_n` rule, `gateway.rounds.select_examples`);
- M-step: `teacher.policy.train_policy` (SFT on prompt -> chosen), continuing from the last round.
Rewards are unsigned here (no auditor service; the single trainer runs fp32, the batched one bf16 on
CUDA): rows of this script are for the policy, not for a promotion. One row per self-edit is appended to
<out>/round<r>.jsonl as its chunk lands (fsynced), and a rerun skips the contexts whose every
self-edit is there; each round's policy is saved to <out>/round<r>-policy/ (bf16 weights, so it
travels; renamed into place last, so a rerun redoes a round whose policy never landed), with
<out>/round<r>.json (its examples, their digest, mean reward, timings).

    python benchmarks/rest_em_one_host.py --out bench-out/rest-em-gpu --device cuda \\
        --contexts 50 --n 5 --rounds 2 --round-budget-s 240
    .venv/bin/seal bench knowledge --conditions policy-round1 \\
        --policy round1=bench-out/rest-em-gpu/round1-policy ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from contextlib import closing
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from auditor.evaluation import evaluate_document, load_adapter, unload_adapter
from seal.bench.knowledge import Item, JsonlLog, default_data_dir, load_training_items
from seal.bench.report import write_text_atomic
from seal.models import DEFAULT_MODEL, load_model, resolve_model
from seal.records import EditFormat, LoraSettings, PolicyExample, PolicySettings, SamplingSettings
from student.multi import attached_in_turn, train_adapters
from student.sequences import build_training_texts
from student.training import release_adapter, train_adapter
from teacher.backends import TransformersGenerator
from teacher.core import propose_self_edits
from teacher.policy import policy_training_data_sha256, release_policy, train_policy
from teacher.prompts import build_prompt


class Sampled:
    """A Generator handing out completions sampled beforehand, all prompts of a chunk in one call."""

    def __init__(self, name: str, by_prompt: dict[str, list[str]]) -> None:
        self.name = name
        self.by_prompt = by_prompt

    def generate(self, prompts: list[str], sampling: SamplingSettings, n: int, **_: Any) -> list[list[str]]:
        return [self.by_prompt[p] for p in prompts]


def row_key(row: dict[str, Any]) -> str:
    return f"{row['round']}/{row['context']}/{row['sample']}"


def e_step_chunk(
    model: Any,
    tokenizer: Any,
    items: list[Item],
    args: argparse.Namespace,
    round_number: int,
    policy_dir: Path | None,
) -> list[dict[str, Any]]:
    """Sample n self-edits per context, train each, score before and after: one row per self-edit."""
    fmt = EditFormat(args.format)
    lora = replace(LoraSettings(), epochs=args.epochs)
    sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, seed=1000 * round_number + items[0].index)
    started = time.perf_counter()
    prompts = [build_prompt(item.doc.passage(), fmt) for item in items]
    teacher = load_adapter(model, policy_dir) if policy_dir is not None else model
    try:
        generator = TransformersGenerator(teacher, tokenizer, args.device, name=args.model)
        samples = generator.generate(prompts, sampling, args.n)
    finally:
        if policy_dir is not None:
            unload_adapter(teacher)
    sampled = Sampled(args.model, dict(zip(prompts, samples, strict=True)))
    edits = [
        edit
        for item in items
        for edit in propose_self_edits(
            sampled, item.doc.passage(), fmt, args.n, lora, sampling, "one-host", item.index
        )
    ]
    generated = time.perf_counter() - started
    before = {item.index: evaluate_document(model, tokenizer, item.doc) for item in items}
    by_index = {item.index: item for item in items}
    started = time.perf_counter()
    jobs = [(build_training_texts(e), e.lora) for e in edits]
    rows = []
    if args.trainer == "batched":
        trained = train_adapters(model, tokenizer, jobs, compute_dtype=args.compute_dtype)
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        with closing(attached_in_turn(model, [adapter for adapter, _ in trained])) as views:
            for i, peft_model in views:
                after = evaluate_document(peft_model, tokenizer, by_index[edits[i].doc_index].doc)
                rows.append(_row(round_number, edits[i], trained[i][1], before[edits[i].doc_index], after))
        scored = time.perf_counter() - started
    else:  # one update at a time (on a GPU far faster than the batched pass: docs/PERFORMANCE.md)
        train_seconds = scored = 0.0
        for edit, (texts, lora) in zip(edits, jobs, strict=True):
            peft_model, stats = train_adapter(model, tokenizer, texts, lora)
            train_seconds += stats.seconds
            tick = time.perf_counter()
            try:
                after = evaluate_document(peft_model, tokenizer, by_index[edit.doc_index].doc)
            finally:
                release_adapter(peft_model)
            scored += time.perf_counter() - tick
            rows.append(_row(round_number, edit, stats, before[edit.doc_index], after))
    for row in rows:  # the chunk's wall times, shared by its rows
        row.update(chunk_contexts=len(items), generate_s=generated, train_s=train_seconds, score_s=scored)
    rows.sort(key=lambda r: (r["context"], r["sample"]))
    return rows


def _row(round_number: int, edit: Any, stats: Any, before: list[Any], after: list[Any]) -> dict[str, Any]:
    acc_before = sum(s.correct for s in before) / len(before)
    acc_after = sum(s.correct for s in after) / len(after)
    return {
        "round": round_number,
        "context": edit.doc_index,
        "title": edit.passage.title,
        "sample": edit.index,
        "text": edit.text,
        "lines": len(edit.lines),
        "before": acc_before,
        "after": acc_after,
        "reward": acc_after - acc_before,
        "steps": stats.steps,
        "final_loss": stats.losses[-1] if stats.losses else None,
    }


def _samples(log: JsonlLog, context: int) -> int:
    return sum(row["context"] == context for row in log.rows.values())


def select_best(rows: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """Per context the highest-reward self-edit (ties: lowest sample) if it beats `threshold`."""
    by_context: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_context.setdefault(row["context"], []).append(row)
    best = [min(group, key=lambda r: (-r["reward"], r["sample"])) for group in by_context.values()]
    return [r for r in best if r["reward"] > threshold]


def m_step(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    items: dict[int, Item],
    args: argparse.Namespace,
    parent: Path | None,
    out_dir: Path,
) -> dict[str, Any]:
    chosen = select_best(rows, args.threshold)
    fmt = EditFormat(args.format)
    examples = [
        PolicyExample(
            context_id=str(r["context"]),
            prompt=build_prompt(items[r["context"]].doc.passage(), fmt),
            chosen=r["text"],
            chosen_reward=r["reward"],
        )
        for r in chosen
    ]
    settings = PolicySettings(epochs=args.policy_epochs)
    peft_model, stats = train_policy(model, tokenizer, examples, settings, parent_dir=parent)
    try:
        peft_model.save_pretrained(str(out_dir))
    finally:
        release_policy(peft_model)
    _to_bf16(out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's blank model card
    return {
        "examples": len(examples),
        "training_data_sha256": policy_training_data_sha256(examples),
        "settings": asdict(settings),
        "parent": str(parent) if parent else "",
        "steps": stats.steps,
        "final_loss": stats.final_loss,
        "seconds": stats.seconds,
        "chosen": [{"context": r["context"], "sample": r["sample"], "reward": r["reward"]} for r in chosen],
    }


def _to_bf16(adapter_dir: Path) -> None:
    """Halve the saved adapter (fp32 -> bf16) so it fits what a lent machine hands back; PEFT loads it
    into an fp32 model by casting."""
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}, str(path))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out/rest-em-one-host"))
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=default_data_dir())
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--trainer", default="single", choices=("single", "batched"), help="updates one by one, or together"
    )
    p.add_argument("--compute-dtype", default="auto", choices=("float32", "bfloat16", "auto"))
    p.add_argument("--contexts", type=int, default=50, help="training contexts per round")
    p.add_argument("--skip", type=int, default=8, help="training passages to skip (the recipe study's)")
    p.add_argument("--chunk", type=int, default=10, help="contexts whose updates train together")
    p.add_argument("--n", type=int, default=5, help="self-edits per context")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5, help="inner-loop epochs (the results table's recipe)")
    p.add_argument("--format", default=EditFormat.IMPLICATIONS.value)
    p.add_argument("--max-new-tokens", type=int, default=SamplingSettings().max_new_tokens)
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--policy-epochs", type=int, default=PolicySettings().epochs)
    p.add_argument(
        "--round-budget-s",
        type=float,
        default=0.0,
        help="a round starts no chunk after this many seconds (0: none)",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="the model's architecture with random weights (seed 0): times a run, teaches nothing",
    )
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(resolve_model(args.model), device=args.device)
    if args.random_weights:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model.config).to(args.device).eval()
    all_items = load_training_items(args.data, args.skip + args.contexts)[args.skip :]
    items = {item.index: item for item in all_items}
    parent: Path | None = None
    for r in range(1, args.rounds + 1):
        policy_dir = args.out / f"round{r}-policy"
        if (policy_dir / "adapter_config.json").is_file():
            parent = policy_dir
            continue
        t0 = time.perf_counter()
        # Rows as they land (fsynced; a line cut short by a crash is redone): a context is done when
        # all its n self-edits are in.
        log = JsonlLog(args.out / f"round{r}.jsonl", row_key)
        done = {c for c in {row["context"] for row in log.rows.values()} if _samples(log, c) >= args.n}
        todo = [item for item in all_items if item.index not in done]
        for start in range(0, len(todo), args.chunk):
            if args.round_budget_s and time.perf_counter() - t0 > args.round_budget_s:
                print(
                    f"round {r}: budget spent; the M-step learns from the {len(done)} contexts done",
                    flush=True,
                )
                break
            chunk = todo[start : start + args.chunk]
            rows = e_step_chunk(model, tokenizer, chunk, args, r, parent)
            for row in rows:
                log.append(row)
            done |= {item.index for item in chunk}
            row = rows[0]
            print(
                f"round {r}: {len(done)}/{len(all_items)} contexts; chunk of {len(chunk)}: generate "
                f"{row['generate_s']:.0f} s, train {row['train_s']:.0f} s, score {row['score_s']:.0f} s; "
                f"mean reward {statistics.fmean(x['reward'] for x in rows):+.3f}",
                flush=True,
            )
        rows = [row for row in log.rows.values() if row["context"] in done]
        if not select_best(rows, args.threshold):
            print(f"round {r}: no self-edit beat the threshold; no policy", flush=True)
            return 1
        # The policy is trained into a staging folder and renamed into place last, with its record
        # written before: a crash never leaves a policy folder that a rerun would take as finished.
        staging = policy_dir.with_name(policy_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        summary = m_step(model, tokenizer, rows, items, args, parent, staging)
        summary.update(
            round=r,
            contexts=len(done),
            self_edits=len(rows),
            mean_reward=statistics.fmean(x["reward"] for x in rows),
            wall_s=time.perf_counter() - t0,
        )
        write_text_atomic(args.out / f"round{r}.json", json.dumps(summary, indent=2) + "\n")
        os.replace(staging, policy_dir)
        print(
            f"round {r}: mean reward {summary['mean_reward']:+.3f} over {len(rows)} self-edits; "
            f"{summary['examples']} examples, SFT loss {summary['final_loss']:.3f}",
            flush=True,
        )
        parent = policy_dir
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
