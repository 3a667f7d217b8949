"""Benchmark: knowledge incorporation on the SEAL paper's SQuAD passages, with the default model.

For the first K of the paper's 200 evaluation passages (../shared/data/knowledge/base_val.json), the
student (SmolLM2-135M by default) answers each passage's questions without the passage:
  - with no adaptation,
  - after a LoRA update on the passage alone,
  - after an update on the passage + implications written by the default model itself (our teacher),
  - after an update on the passage + implications written by Qwen2.5-7B (released with the paper),
  - after an update on the passage + implications written by GPT-4.1 (released with the paper).
It uses the same cores as the services (teacher prompts, student training, auditor grading), in one
process, and prints mean accuracy per condition.

    .venv/bin/python benchmarks/knowledge.py --passages 5 [--data ../shared/data/knowledge]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from auditor.evaluation import evaluate_document, load_adapter, unload_adapter
from auditor.grading import accuracy
from seal.models import DEFAULT_MODEL, load_model, model_fingerprint, resolve_model
from seal.records import QA, Document, EditFormat, LoraSettings, SamplingSettings, SelfEdit
from student.core import apply_self_edit
from teacher.backends import TransformersGenerator
from teacher.core import propose_self_edits
from teacher.prompts import parse_self_edit

CONDITIONS = (
    "no adaptation",
    "passage only",
    "own implications",
    "Qwen2.5-7B implications",
    "GPT-4.1 implications",
)


def load_records(data_dir: Path, k: int) -> list[tuple[Document, str, str]]:
    base = json.loads((data_dir / "base_val.json").read_text())[:k]
    gpt = json.loads((data_dir / "gpt4_1_val.json").read_text())[:k]
    out = []
    for b, g in zip(base, gpt, strict=True):
        assert b["title"] == g["title"], "base_val and gpt4_1_val must list the same passages in order"
        doc = Document(
            b["title"], b["context"], tuple(QA(q["question"], q["answer"]) for q in b["questions"])
        )
        out.append((doc, b["completions"][0], g["completions"][0]))
    return out


def self_edit(doc: Document, lines: tuple[str, ...], fmt: EditFormat, lora: LoraSettings) -> SelfEdit:
    return SelfEdit(
        id=f"bench/{doc.title}/{fmt.value}",
        job_id="bench",
        doc_index=0,
        index=0,
        format=fmt,
        passage=doc.passage(),
        text="\n".join(lines),
        lines=lines,
        lora=lora,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=5)
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data/knowledge"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=Path("/tmp/seal-bench"))
    args = parser.parse_args()

    path = resolve_model(args.model)
    model, tokenizer = load_model(path)
    fingerprint = model_fingerprint(path)
    teacher = TransformersGenerator(model, tokenizer)
    lora = LoraSettings()
    scores: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    started = time.perf_counter()
    for doc, qwen_text, gpt_text in load_records(args.data, args.passages):
        own = propose_self_edits(
            teacher, doc.passage(), EditFormat.IMPLICATIONS, 1, lora, SamplingSettings(), "bench", 0
        )
        edits = {
            "passage only": self_edit(doc, (), EditFormat.PASSAGE, lora),
            "own implications": own[0],
            "Qwen2.5-7B implications": self_edit(
                doc, parse_self_edit(qwen_text, EditFormat.IMPLICATIONS), EditFormat.IMPLICATIONS, lora
            ),
            "GPT-4.1 implications": self_edit(
                doc, parse_self_edit(gpt_text, EditFormat.IMPLICATIONS), EditFormat.IMPLICATIONS, lora
            ),
        }
        scores["no adaptation"].append(accuracy(evaluate_document(model, tokenizer, doc)))
        for condition, edit in edits.items():
            adapter = apply_self_edit(model, tokenizer, edit, args.model, fingerprint, args.out)
            peft_model = load_adapter(model, args.out / adapter.sha256)
            scores[condition].append(accuracy(evaluate_document(peft_model, tokenizer, doc)))
            unload_adapter(peft_model)
        print(json.dumps({"title": doc.title, **{c: round(s[-1], 3) for c, s in scores.items()}}), flush=True)
    print(
        json.dumps(
            {
                "model": args.model,
                "passages": args.passages,
                "questions_graded_by": "contains",
                "lora": {"rank": lora.rank, "epochs": lora.epochs, "learning_rate": lora.learning_rate},
                "mean_accuracy": {c: round(sum(s) / len(s), 3) for c, s in scores.items()},
                "seconds": round(time.perf_counter() - started),
                "torch_threads": torch.get_num_threads(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
