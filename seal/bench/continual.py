"""`seal bench continual`: knowledge that accumulates, document after document (the SEAL paper's
continual-learning experiment), and which way of building the next version keeps more.

Documents arrive one at a time (the demo's invented passages, then SQuAD *training* passages). For
each, the teacher writes one self-edit with the default recipe (cached), an adapter is trained, and
version i is the base with adapters 1..i merged in order, as a deployment builds it. Two strategies:

- `merged` (what the registry ships): every adapter is trained on the base, and the versions merge
  them; adapter i never saw adapters 1..i-1.
- `sequential`: adapter i is trained on version i-1 (the merged weights), as continued training
  would be.
- `gated` (what the registry ships with gates on, the default: seal.gate): the adapters of `merged`,
  each behind its document's gate; version i answers each prompt with the layers whose gates open
  for it (merged), and with the base where none does, exactly as the auditor certifies it
  (auditor.certify.routed_scores / routed_retention) and the gateway serves it.

After each document, version i is asked every question of every document so far (all of a
document's questions, not only its sign-off share: this is a measurement, not a gate), and its
retention accuracy and KL shift to the base are measured as the auditor does. Rows are saved as
they land (results.jsonl) and a rerun resumes; the adapters are kept, so a version is rebuilt by
merging them. Output: results.json and a Markdown table per strategy (rows: versions, columns:
documents).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from seal.bench.knowledge import JsonlLog, _digest, default_data_dir, load_training_items
from seal.gate import DEFAULT_MIN_HITS, Routes, document_gate
from seal.records import Document, EditFormat, LoraSettings, SamplingSettings, SelfEdit

STRATEGIES = ("merged", "sequential", "gated")


def documents(data_dir: Path, squad: int, seed: int = 0) -> list[Document]:
    """The demo's three invented passages, then `squad` SQuAD training passages (never evaluation ones)."""
    from gateway.api import parse_job_spec
    from seal.cli import load_example

    demo = list(parse_job_spec(load_example()).documents)
    return demo + [item.doc for item in load_training_items(data_dir, squad, seed)]


def self_edit_for(
    cache: JsonlLog, model: Any, tokenizer: Any, doc: Document, lora: LoraSettings, samples: int
) -> SelfEdit:
    """The teacher's self-edit of `doc` with the default recipe (samples joined), sampled once."""
    from teacher.backends import TransformersGenerator
    from teacher.core import propose_self_edits

    key = _digest({"passage": doc.passage().digest(), "samples": samples, "format": "implications"})
    cached = cache.get(key)
    if cached is None:
        generator = TransformersGenerator(model, tokenizer, str(model.device), name="bench")
        (edit,) = propose_self_edits(
            generator,
            doc.passage(),
            EditFormat.IMPLICATIONS,
            1,
            lora,
            SamplingSettings(),
            "bench",
            0,
            samples_per_edit=samples,
        )
        cached = {"key": key, "title": doc.title, "text": edit.text, "lines": list(edit.lines)}
        cache.append(cached)
    return SelfEdit(
        id=f"bench/{key}",
        job_id="bench",
        doc_index=0,
        index=0,
        format=EditFormat.IMPLICATIONS,
        passage=doc.passage(),
        text=cached["text"],
        lines=tuple(cached["lines"]),
        lora=lora,
    )


def version_model(base: Any, adapter_dirs: list[Path]) -> Any:
    from seal.models import merge_adapters

    return merge_adapters(base, adapter_dirs)


def run(
    out: Path,
    docs: list[Document],
    lora: LoraSettings,
    samples: int,
    model_spec: str,
    device: str = "cpu",
    strategies: tuple[str, ...] = STRATEGIES,
) -> dict[str, Any]:
    from auditor.certify import RetentionProbe, kl_between, routed_retention, routed_scores
    from auditor.core import base_retention
    from auditor.evaluation import evaluate_document
    from auditor.grading import accuracy
    from auditor.retention import retention_accuracy
    from seal.models import load_model, resolve_model
    from student.sequences import build_training_texts
    from student.training import train_adapter

    out.mkdir(parents=True, exist_ok=True)
    results = JsonlLog(out / "results.jsonl", key=lambda r: r["key"])
    edits = JsonlLog(out / "self_edits.jsonl", key=lambda r: r["key"])
    model, tokenizer = load_model(resolve_model(model_spec), device=device)
    retention = base_retention(model, tokenizer)
    # The gate changes what a version answers with, not what an adapter learns: only gated rows bind it.
    recipe = {k: v for k, v in dataclasses.asdict(lora).items() if k != "gate"}
    gates = [document_gate(d.title, d.context, lora.gate or DEFAULT_MIN_HITS) for d in docs]
    for strategy in strategies:
        adapters: list[Path] = []
        for step, doc in enumerate(docs):
            key = _digest(
                {
                    "strategy": strategy,
                    "step": step,
                    "docs": [d.passage().digest() for d in docs[: step + 1]],
                    "lora": recipe,
                    **({"gate": lora.gate or DEFAULT_MIN_HITS} if strategy == "gated" else {}),
                }
            )
            adapter_dir = out / "adapters" / strategy / str(step)
            if results.get(key) is not None and adapter_dir.is_dir():
                adapters.append(adapter_dir)
                continue
            edit = self_edit_for(edits, model, tokenizer, doc, lora, samples)
            started = time.perf_counter()
            # merged, gated: train on the base; sequential: train on the previous version's merged weights.
            trainee = model if strategy != "sequential" or not adapters else version_model(model, adapters)
            peft_model, stats = train_adapter(trainee, tokenizer, build_training_texts(edit), lora)
            if adapter_dir.exists():
                import shutil

                shutil.rmtree(adapter_dir)
            adapter_dir.parent.mkdir(parents=True, exist_ok=True)
            peft_model.save_pretrained(str(adapter_dir))
            peft_model.unload()
            train_seconds = time.perf_counter() - started
            adapters.append(adapter_dir)
            started = time.perf_counter()
            if strategy == "gated":
                dirs = list(adapters)

                def build(layers: tuple[int, ...], dirs: list[Path] = dirs) -> Any:
                    return version_model(model, [dirs[i] for i in layers]) if layers else model

                routes = Routes(gates[: step + 1], build, cache_size=2)
                accuracies = [
                    accuracy(routed_scores(routes, tokenizer, d, "contains", "chat"))
                    for d in docs[: step + 1]
                ]
                retained, kl = routed_retention(routes, model, tokenizer, RetentionProbe(retention))
                del routes
            else:
                version = version_model(model, adapters)
                accuracies = [accuracy(evaluate_document(version, tokenizer, d)) for d in docs[: step + 1]]
                retained = retention_accuracy(version, tokenizer)
                kl = kl_between(model, version, tokenizer, retention.sequences)
                del version
            row: dict[str, Any] = {
                "key": key,
                "strategy": strategy,
                "version": step + 1,
                "document": doc.title,
                "accuracy": accuracies,
                "base_accuracy": [accuracy(evaluate_document(model, tokenizer, d)) for d in docs[: step + 1]],
                "retention": retained,
                "retention_baseline": retention.baseline,
                "kl": kl,
                "train_seconds": train_seconds,
                "eval_seconds": time.perf_counter() - started,
                "final_loss": stats.losses[-1] if stats.losses else None,
                "lora": recipe,
            }
            results.append(row)
            print(
                f"{strategy} v{step + 1} ({doc.title[:30]}): "
                + " ".join(f"{a:.0%}" for a in accuracies)
                + f"  retention {row['retention']:.0%} KL {row['kl']:.3f}",
                flush=True,
            )
    summary = summarize(list(results.rows.values()), docs)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(render(summary) + "\n")
    print(render(summary))
    return summary


def summarize(rows: list[dict[str, Any]], docs: list[Document]) -> dict[str, Any]:
    by = {(r["strategy"], r["version"]): r for r in rows}
    summary: dict[str, Any] = {"documents": [d.title for d in docs], "strategies": {}}
    for strategy in STRATEGIES:
        versions = [by[(strategy, v)] for v in range(1, len(docs) + 1) if (strategy, v) in by]
        if not versions:
            continue
        last = versions[-1]
        # How much of what each document reached right after its own update is still there at the end.
        kept = [
            (
                last["accuracy"][i] - last["base_accuracy"][i],
                versions[i]["accuracy"][i] - versions[i]["base_accuracy"][i],
            )
            for i in range(len(last["accuracy"]))
        ]
        summary["strategies"][strategy] = {
            "versions": versions,
            "mean_gain_at_end": sum(k[0] for k in kept) / len(kept),
            "mean_gain_when_learned": sum(k[1] for k in kept) / len(kept),
        }
    return summary


def render(summary: dict[str, Any]) -> str:
    docs = summary["documents"]
    lines = []
    for strategy, data in summary["strategies"].items():
        lines += ["", f"### {strategy}", ""]
        lines.append("| version | " + " | ".join(d[:18] for d in docs) + " | retention | KL |")
        lines.append("|---|" + "---|" * len(docs) + "---|---|")
        for row in data["versions"]:
            cells = [f"{a:.0%}" for a in row["accuracy"]] + [""] * (len(docs) - len(row["accuracy"]))
            lines.append(
                f"| {row['version']} | "
                + " | ".join(cells)
                + f" | {row['retention']:.0%} | {row['kl']:.3f} |"
            )
        base = data["versions"][-1]["base_accuracy"]
        lines.append("| base | " + " | ".join(f"{a:.0%}" for a in base) + " | 100% | 0 |")
        lines.append(
            f"\nmean gain over the base: {data['mean_gain_when_learned']:+.0%} right after each document's own update, "
            f"{data['mean_gain_at_end']:+.0%} after the last one"
        )
    return "\n".join(lines)


def cmd_continual(args: argparse.Namespace) -> int:
    overrides = json.loads(args.lora) if args.lora else {}
    lora = dataclasses.replace(LoraSettings(), **overrides)
    docs = documents(Path(args.data_dir), args.squad, args.seed)
    strategies = tuple(args.strategies.split(",")) if args.strategies else STRATEGIES
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategy {unknown}; choose from {', '.join(STRATEGIES)}")
    run(Path(args.out), docs, lora, args.samples, args.model, args.device, strategies)
    return 0


def add_continual_command(sub: Any) -> None:
    p = sub.add_parser(
        "continual", help="documents x versions accuracy, merged vs sequential adapters (resumable)"
    )
    p.add_argument("--out", default="bench-out/continual")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=str(default_data_dir()))
    p.add_argument("--squad", type=int, default=3, help="SQuAD training passages after the demo's three")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=3, help="teacher samples joined in each self-edit")
    p.add_argument("--lora", default="", help='LoRA overrides as JSON, e.g. {"replay": 16}')
    p.add_argument(
        "--strategies", default="", help=f"comma-separated, of {', '.join(STRATEGIES)} (default: all)"
    )
    p.set_defaults(func=cmd_continual)
