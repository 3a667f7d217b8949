"""Run-to-run spread of the untrained teacher's row, and a policy row against it, from results.jsonl.

After `seal bench knowledge ... --conditions teacher --samples 2` has added a second self-edit
(seed 1) per passage, each seed's self-edits are one "run" of the row. This prints each run's mean,
their paired difference (the run-to-run spread) and a policy row's paired difference against each
run and against their mean, with 95 % paired bootstrap intervals over passages:

    .venv/bin/python benchmarks/seed_spread.py docs/results/knowledge/results.jsonl --policy policy-r1-cpu \
        --pair teacher,passage --pair qwen2.5-7b,passage --pair teacher,qwen2.5-7b --pair policy-r1-cpu,qwen2.5-7b

`--pair A,B` adds A's sample-0 row minus B's, paired over the passages both have, with each row's
mean over those passages.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from seal.bench.report import bootstrap_interval, mean


def _line(label: str, diffs: list[float]) -> str:
    low, high = bootstrap_interval(diffs)
    return f"{label}: {100 * mean(diffs):+.1f} points (95 % {100 * low:+.1f} to {100 * high:+.1f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path)
    p.add_argument("--policy", default="", help="a policy condition's name, compared with both runs")
    p.add_argument("--pair", action="append", default=[], help="A,B: condition A minus condition B")
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    teacher = [r for r in rows if r["condition"] == "teacher" and r["passage"] >= 0]
    if teacher or args.policy:
        _spread(rows, teacher, args.policy)
    for pair in args.pair:
        a, sep, b = pair.partition(",")
        if not sep:
            raise SystemExit(f"--pair takes A,B (two condition names), got {pair!r}")
        first, second = (_sample0(rows, name) for name in (a, b))
        shared = sorted(set(first) & set(second))
        if not shared:
            raise SystemExit(f"--pair {pair}: no passage has both rows")
        means = f"{100 * mean([first[q] for q in shared]):.1f} % against {100 * mean([second[q] for q in shared]):.1f} %"
        print(_line(f"{a} - {b} ({len(shared)} passages, {means})", [first[q] - second[q] for q in shared]))
    return 0


def _spread(rows: list[dict], teacher: list[dict], policy_name: str) -> None:
    """The untrained row's seed 1 against seed 0, and `policy_name`'s row against each seed."""
    if not teacher:
        raise SystemExit("no 'teacher' rows: --policy compares with the untrained row's two seeds")
    if len({r["digest"] for r in teacher}) != 1:
        raise SystemExit("the teacher rows come from more than one recipe: filter them first")
    acc = {(r["passage"], r["sample"]): r["accuracy"] for r in teacher}
    passages = sorted(p for p, s in acc if s == 1 and (p, 0) in acc)
    seed0 = [acc[(p, 0)] for p in passages]
    seed1 = [acc[(p, 1)] for p in passages]
    print(f"{len(passages)} passages: seed 0 {100 * mean(seed0):.1f} %, seed 1 {100 * mean(seed1):.1f} %")
    print(_line("seed 1 - seed 0 (run-to-run)", [b - a for a, b in zip(seed0, seed1, strict=True)]))
    if policy_name:
        policy = _sample0(rows, policy_name)
        shared = [i for i, p in enumerate(passages) if p in policy]
        trained = [policy[passages[i]] for i in shared]
        for label, base in (("seed 0", seed0), ("seed 1", seed1)):
            print(
                _line(f"{policy_name} - {label}", [t - base[i] for t, i in zip(trained, shared, strict=True)])
            )
        both = [(seed0[i] + seed1[i]) / 2 for i in shared]
        print(_line(f"{policy_name} - mean of both", [t - b for t, b in zip(trained, both, strict=True)]))


def _sample0(rows: list[dict], condition: str) -> dict[int, float]:
    """A condition's sample-0 accuracy per passage (single-passage rows only). Rows of one recipe
    only: where a condition has rows under several digests (an older recipe, or a policy once keyed
    by its path), the digest with the most passages is kept and the others are said to be left out."""
    picked = [
        r
        for r in rows
        if r["condition"] == condition and r["passage"] >= 0 and r["sample"] == 0 and not r.get("multidoc")
    ]
    counts = Counter(r["digest"] for r in picked)
    if len(counts) > 1:
        (kept, _), *others = counts.most_common()
        left = sum(n for _, n in others)
        print(f"({condition}: {left} row(s) of another recipe left out, digest {kept} kept)")
        picked = [r for r in picked if r["digest"] == kept]
    return {r["passage"]: r["accuracy"] for r in picked}


if __name__ == "__main__":
    raise SystemExit(main())
