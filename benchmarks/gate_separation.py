"""How well a document's gate (seal.gate) separates its own questions from everything else.

For each threshold (distinct document words a prompt must hold), on SQuAD *training* passages (never
the 200 evaluation passages; the threshold was chosen on these and the student's general prompts):

- own questions: the share of a passage's questions its gate opens for, asked bare and asked as the
  auditor asks them ("Topic: <title>\\n<question>");
- other passages' questions: how often a gate opens for a question about another passage (a stacked
  layer answering where it should not);
- general prompts: the student's own (student/data/general_prompts.json), and, measured but not used
  for the choice, the auditor's retention questions and KL prompts: how often any one gate opens.

    .venv/bin/python benchmarks/gate_separation.py --passages 200
    .venv/bin/python benchmarks/gate_separation.py --passages 200 --eval   # evaluation passages: measured only
"""

from __future__ import annotations

import argparse
from pathlib import Path

from auditor.evaluation import question_prompt
from auditor.retention import load_kl_prompts, load_retention_set
from seal.bench.knowledge import default_data_dir, load_eval_items, load_training_items
from seal.gate import document_gate
from student.general import load_general_prompts


def rate(gates: list, prompts: list[str]) -> float:
    """Mean over gates of the share of `prompts` each opens for."""
    opened = sum(g.opens(p) for g in gates for p in prompts)
    return opened / (len(gates) * len(prompts)) if gates and prompts else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=200)
    p.add_argument("--data", type=Path, default=default_data_dir())
    p.add_argument(
        "--cross", type=int, default=50, help="passages whose questions are tried on every other gate"
    )
    p.add_argument(
        "--eval", action="store_true", help="the paper's evaluation passages (never used to choose)"
    )
    args = p.parse_args(argv)
    items = (
        load_eval_items(args.data, args.passages)
        if args.eval
        else load_training_items(args.data, args.passages, 0)
    )
    general = list(load_general_prompts())
    retention = [qa.question for qa in load_retention_set()]
    kl_prompts = list(load_kl_prompts())
    kind = "evaluation" if args.eval else "training"
    print(f"{len(items)} SQuAD {kind} passages, {sum(len(i.doc.questions) for i in items)} questions")
    print(
        "| min hits | own, bare | own, with topic | other passages' | student general | "
        "retention (auditor) | KL prompts (auditor) |"
    )
    print("|---|---|---|---|---|---|---|")
    for hits in (1, 2, 3, 4):
        gates = [document_gate(i.doc.title, i.doc.context, hits) for i in items]
        own = [(g, qa) for g, i in zip(gates, items, strict=True) for qa in i.doc.questions]
        bare = sum(g.opens(qa.question) for g, qa in own) / len(own)
        topic = sum(
            g.opens(question_prompt(i.doc.title, qa.question))
            for g, i in zip(gates, items, strict=True)
            for qa in i.doc.questions
        ) / len(own)
        k = min(args.cross, len(items))
        cross_open = cross_all = 0
        for a in range(k):
            for b in range(k):
                if a != b:
                    questions = [qa.question for qa in items[b].doc.questions]
                    cross_open += sum(gates[a].opens(q) for q in questions)
                    cross_all += len(questions)
        print(
            f"| {hits} | {bare:.1%} | {topic:.1%} | {cross_open / max(cross_all, 1):.2%} | "
            f"{rate(gates, general):.2%} | {rate(gates, retention):.2%} | {rate(gates, kl_prompts):.2%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
