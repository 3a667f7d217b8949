"""`seal bench knowledge` (the SEAL results table) and `seal bench recipe` (the inner-loop recipe study).

Read it top to bottom: conditions (what a row trains on), data (the paper's passages), the self-edit
sources (released files, or our teacher with a cache), one (condition, passage, sample) run, the run
loop that appends every result to results.jsonl as it lands, the multi-document (CPT) table, and the
two commands. Both use the services' cores in one process: teacher prompts, student training,
auditor evaluation.

Resume: a result is keyed by condition name + passage index + sample + a digest of the condition's
settings; a restart skips keys already in results.jsonl and reads sampled self-edits from
self_edits.jsonl, so a changed recipe reruns its rows and nothing is sampled twice.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from seal.bench import report
from seal.records import QA, Document, EditFormat, LoraSettings, Passage, SamplingSettings, SelfEdit
from teacher.prompts import build_prompt, parse_self_edit

# --- conditions --------------------------------------------------------------------------------------

# Self-edits released with the paper (same 200 passages, same order; 5 completions each).
RELEASED = {
    "qwen2.5-7b": "base_val.json",
    "gpt-4.1": "gpt4_1_val.json",
    "seal-round2": "iter2_val.json",
}
TEACHER = "teacher"
# How a condition builds one passage's training data.
DATA_KINDS = ("none", "passage", "one", "all")


@dataclass(frozen=True)
class Condition:
    """One row of a table: the training data of a passage's update, where self-edits come from, the recipe."""

    name: str
    label: str
    # "none": no update; "passage": the passage alone; "one": passage + one self-edit per sample;
    # "all": passage + the first `n` self-edits concatenated into one update.
    data: str
    # A RELEASED key or TEACHER; empty for "none" and "passage".
    source: str = ""
    lora: LoraSettings = field(default_factory=LoraSettings)
    edit_format: EditFormat = EditFormat.IMPLICATIONS
    # A teacher policy: a PEFT LoRA directory loaded on the teacher model ("" = the untrained teacher).
    policy: str = ""
    policy_path: str = ""
    n: int = 1

    def __post_init__(self) -> None:
        if self.data not in DATA_KINDS:
            raise ValueError(f"condition {self.name!r}: data must be one of {DATA_KINDS}, got {self.data!r}")
        needs_source = self.data in ("one", "all")
        if needs_source and self.source not in (*RELEASED, TEACHER):
            raise ValueError(
                f"condition {self.name!r}: source must be one of {[*RELEASED, TEACHER]}, got {self.source!r}"
            )
        if self.n < 1:
            raise ValueError(f"condition {self.name!r}: n must be at least 1, got {self.n}")

    @property
    def self_edits(self) -> bool:
        return self.data in ("one", "all")


@dataclass(frozen=True)
class Setup:
    """What every condition of a run shares; part of every digest."""

    student_model: str
    teacher_model: str
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    samples: int = 1
    metric: str = "contains"
    answer_tokens: int = 48

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"--samples must be at least 1, got {self.samples}")


def sample_count(cond: Condition, setup: Setup) -> int:
    """Self-edit rows train `samples` self-edits separately; the others have one deterministic update."""
    return setup.samples if cond.data == "one" else 1


def edit_indices(cond: Condition, sample: int) -> list[int]:
    """Which self-edits of the passage a sample trains on (released completions[i], or teacher seed i)."""
    if cond.data == "one":
        return [sample]
    if cond.data == "all":
        return list(range(cond.n))
    return []


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# LoraSettings fields added after the first rows were written, with the value that switches each off:
# off, they change nothing a row measured, so they stay out of the digest and those rows are reused.
_LATER_LORA_FIELDS: dict[str, Any] = {"replay": 0, "kl_weight": 0.0}


def lora_key(lora: LoraSettings) -> dict[str, Any]:
    """The recipe as a row's digest sees it: every field, less the later ones left switched off, and
    less the gate (seal.gate), which decides where a served adapter applies, not what it learns: the
    benches ask their questions of the adapter itself."""
    key = asdict(lora)
    key.pop("gate", None)
    for name, off in _LATER_LORA_FIELDS.items():
        if key.get(name) == off:
            del key[name]
    return key


def condition_digest(cond: Condition, setup: Setup) -> str:
    """Everything that changes a row's result, so a changed recipe (or model) never reuses old rows."""
    data: dict[str, Any] = {
        "data": cond.data,
        "student": setup.student_model,
        "metric": setup.metric,
        "answer_tokens": setup.answer_tokens,
    }
    if cond.data != "none":
        data["lora"] = lora_key(cond.lora)
    if cond.self_edits:
        data.update(source=cond.source, n=cond.n if cond.data == "all" else 1)
    if cond.source == TEACHER:
        data.update(teacher_source_key(cond, setup))
    return _digest(data)


def teacher_source_key(cond: Condition, setup: Setup) -> dict[str, Any]:
    """What determines our teacher's self-edits, apart from the passage and the seed."""
    key = {
        "teacher": setup.teacher_model,
        "policy": cond.policy,
        "policy_path": cond.policy_path,
        "format": cond.edit_format.value,
        "sampling": asdict(replace(setup.sampling, seed=0)),
    }
    if cond.policy_path:
        # The adapter's weights, not where they lie: a policy retrained in place is another row, and
        # one moved (into docs/results, say) keeps its rows.
        del key["policy_path"]
        key["policy_sha256"] = _policy_sha256(cond.policy_path)
    return key


@functools.cache
def _policy_sha256(path: str) -> str:
    """sha256 over the adapter's weight files (names and contents), its config left out: PEFT writes
    the base model's local path there."""
    from seal.digests import file_sha256

    weights = sorted(Path(path).glob("*.safetensors")) or sorted(Path(path).glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"no adapter weights (*.safetensors) in {path}")
    return _digest([[w.name, file_sha256(w)] for w in weights])


def plan_of(cond: Condition, setup: Setup) -> report.Plan:
    return report.Plan(
        name=cond.name,
        label=cond.label,
        digest=condition_digest(cond, setup),
        samples=sample_count(cond, setup),
        self_edits=cond.self_edits,
        policy=cond.policy,
    )


def knowledge_conditions(
    lora: LoraSettings,
    teacher_format: EditFormat,
    policies: Sequence[tuple[str, str]] = (),
    join: int = 1,
) -> list[Condition]:
    """The rows of the SEAL results table (paper, Table 2 single passage), then one per teacher policy.

    `join` > 1 makes every self-edit row the default recipe's update instead: the passage plus `join`
    self-edits of the passage joined (teacher seeds 0..join-1, or the first `join` released
    completions), as the services do with `samples_per_edit`; those rows are named `NAME-joinN`."""
    if join < 1:
        raise ValueError(f"--join must be at least 1, got {join}")
    rows = _single_conditions(lora, teacher_format, policies)
    if join == 1:
        return rows
    return [
        replace(c, name=f"{c.name}-join{join}", label=f"{c.label}, {join} joined", data="all", n=join)
        if c.self_edits
        else c
        for c in rows
    ]


def _single_conditions(
    lora: LoraSettings, teacher_format: EditFormat, policies: Sequence[tuple[str, str]]
) -> list[Condition]:
    return [
        Condition("none", "no adaptation", "none", lora=lora),
        Condition("passage", "passage only", "passage", lora=lora),
        Condition("teacher", "passage + our teacher (untrained)", "one", TEACHER, lora, teacher_format),
        Condition("qwen2.5-7b", "passage + Qwen2.5-7B (released)", "one", "qwen2.5-7b", lora),
        Condition("gpt-4.1", "passage + GPT-4.1 (released)", "one", "gpt-4.1", lora),
        Condition("seal-round2", "passage + SEAL round 2 (released)", "one", "seal-round2", lora),
        *(
            Condition(
                f"policy-{name}",
                f"passage + our teacher, policy {name}",
                "one",
                TEACHER,
                lora,
                teacher_format,
                policy=name,
                policy_path=path,
            )
            for name, path in policies
        ),
    ]


def recipe_conditions(base: LoraSettings, n: int) -> list[Condition]:
    """The recipe study's rows; every teacher row with the default format shares the same self-edits.
    Adding a row is adding one line here."""
    const5 = replace(base, epochs=5, schedule="constant")
    linear10 = replace(base, epochs=10, schedule="linear")
    long_format = EditFormat.IMPLICATIONS_LONG
    return [
        Condition("passage", "passage only (recipe default)", "passage", lora=base),
        Condition("one-e5-constant", "one self-edit, 5 epochs, constant lr", "one", TEACHER, const5),
        Condition("one-e10-linear", "one self-edit, 10 epochs, linear decay", "one", TEACHER, linear10),
        Condition(
            "all-e5-constant", f"all {n} self-edits, 5 epochs, constant lr", "all", TEACHER, const5, n=n
        ),
        Condition(
            "all-e10-linear", f"all {n} self-edits, 10 epochs, linear decay", "all", TEACHER, linear10, n=n
        ),
        Condition("one-long", "one self-edit, implications_long prompt", "one", TEACHER, base, long_format),
        Condition(
            "all-long-e10-linear",
            f"all {n} implications_long self-edits, 10 epochs, linear decay",
            "all",
            TEACHER,
            linear10,
            long_format,
            n=n,
        ),
        Condition(
            "one-e10-reference-lora",
            "one self-edit, 10 epochs, the reference's LoRA (r32, alpha 64, q and v only)",
            "one",
            TEACHER,
            replace(linear10, rank=32, alpha=64.0, target_modules=("q_proj", "v_proj")),
        ),
    ]


# --- data ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """A passage with its questions, its index in its file, and the released self-edits (if any)."""

    index: int
    doc: Document
    released: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _document(record: dict[str, Any]) -> Document:
    questions = tuple(QA(q["question"], q["answer"]) for q in record["questions"])
    return Document(record["title"], record["context"], questions)


def load_eval_items(data_dir: Path, k: int | None = None) -> list[Item]:
    """The paper's 200 evaluation passages (base_val.json order) with each released file's completions."""
    base = json.loads((data_dir / RELEASED["qwen2.5-7b"]).read_text())
    files = {source: json.loads((data_dir / name).read_text()) for source, name in RELEASED.items()}
    items = []
    for i, record in enumerate(base[:k]):
        released = {}
        for source, records in files.items():
            other = records[i]
            if (other["title"], other["context"]) != (record["title"], record["context"]):
                raise ValueError(
                    f"{RELEASED[source]} record {i} is not the passage of base_val.json record {i}"
                )
            released[source] = tuple(other["completions"])
        items.append(Item(i, _document(record), released))
    return items


def load_training_items(data_dir: Path, k: int, seed: int = 0) -> list[Item]:
    """SQuAD passages that are not among the 200 evaluation passages, shuffled with `seed`, first k.

    Indices are positions in squad_val.json. Raises if the split is not disjoint."""
    squad = json.loads((data_dir / "squad_val.json").read_text())
    held_out = {
        (r["title"], r["context"]) for r in json.loads((data_dir / RELEASED["qwen2.5-7b"]).read_text())
    }
    train = [(i, r) for i, r in enumerate(squad) if (r["title"], r["context"]) not in held_out]
    # A duplicate context would slip in under another index; the split must hold as a set.
    overlap = {(r["title"], r["context"]) for _, r in train} & held_out
    assert not overlap, f"{len(overlap)} training passages are evaluation passages"
    random.Random(seed).shuffle(train)
    return [Item(i, _document(r)) for i, r in train[:k]]


# --- results files (append-only JSON lines, fsynced) ------------------------------------------------


class JsonlLog:
    """An append-only JSON-lines file keyed by `key(row)`; every append is flushed and fsynced."""

    def __init__(self, path: Path, key: Callable[[dict[str, Any]], str]) -> None:
        self.path = path
        self.key = key
        self.rows: dict[str, dict[str, Any]] = {}
        text = path.read_text() if path.is_file() else ""
        if text and not text.endswith("\n"):
            # A crash cut the last append short: end that line so the next row starts on its own.
            with open(path, "a") as fh:
                fh.write("\n")
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: its work is simply redone
            self.rows[key(row)] = row

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows[self.key(row)] = row


def result_key(row: dict[str, Any]) -> str:
    return f"{row['condition']}|{row['passage']}|{row['sample']}|{row['digest']}"


def edit_key(row: dict[str, Any]) -> str:
    return str(row["key"])


# --- self-edits --------------------------------------------------------------------------------------

# (condition, passage, seed) -> (text, generation seconds): our teacher writing one self-edit.
Sampler = Callable[[Condition, Passage, int], tuple[str, float]]


@dataclass(frozen=True)
class Edit:
    text: str
    generation_seconds: float


class SelfEdits:
    """Self-edits of a passage by source: released completions, or our teacher's, sampled once and cached."""

    def __init__(self, setup: Setup, sampler: Sampler | None, cache: JsonlLog) -> None:
        self.setup = setup
        self.sampler = sampler
        self.cache = cache

    def get(self, cond: Condition, item: Item, index: int) -> Edit:
        if cond.source != TEACHER:
            completions = item.released[cond.source]
            if index >= len(completions):
                raise ValueError(
                    f"{cond.source} has {len(completions)} self-edits per passage; asked for #{index}"
                )
            return Edit(completions[index], 0.0)
        passage = item.doc.passage()
        key = _digest({**teacher_source_key(cond, self.setup), "passage": passage.digest(), "seed": index})
        cached = self.cache.get(key)
        if cached is None:
            if self.sampler is None:
                raise RuntimeError("this run has no teacher, but a condition asks for its self-edits")
            text, seconds = self.sampler(cond, passage, index)
            cached = {
                "key": key,
                "passage": item.index,
                "seed": index,
                "text": text,
                "generation_seconds": seconds,
            }
            cached.update(teacher_source_key(cond, self.setup))
            self.cache.append(cached)
        return Edit(cached["text"], cached["generation_seconds"])


def combined_self_edit(cond: Condition, passage: Passage, texts: Sequence[str]) -> SelfEdit:
    """One update's self-edit: the passage plus the union of the texts' lines (order kept, no repeats)."""
    fmt = EditFormat.PASSAGE if cond.data == "passage" else cond.edit_format
    lines = tuple(dict.fromkeys(line for t in texts for line in parse_self_edit(t, fmt)))
    return SelfEdit(
        id=f"bench/{cond.name}",
        job_id="bench",
        doc_index=0,
        index=0,
        format=fmt,
        passage=passage,
        text="\n\n".join(texts),
        lines=lines,
        lora=cond.lora,
    )


# --- one (condition, passage, sample) -----------------------------------------------------------------


@dataclass
class Student:
    model: Any
    tokenizer: Any


def train_and_score(
    student: Student, cond: Condition, setup: Setup, texts: list[str], docs: Sequence[Document]
) -> tuple[list[list[Any]], dict[str, Any]]:
    """Train one adapter on `texts` (none for "none"), score every doc's questions, restore the base."""
    from auditor.evaluation import evaluate_document
    from student.training import release_adapter, train_adapter

    stats: dict[str, Any] = {"train_seconds": 0.0, "steps": 0, "final_loss": None}
    model = student.model
    if cond.data != "none":
        model, trained = train_adapter(student.model, student.tokenizer, texts, cond.lora)
        stats.update(
            train_seconds=trained.seconds,
            steps=trained.steps,
            final_loss=trained.losses[-1] if trained.losses else None,
        )
    try:
        started = time.perf_counter()
        scores = [
            evaluate_document(model, student.tokenizer, doc, setup.metric, setup.answer_tokens)
            for doc in docs
        ]
        stats["eval_seconds"] = time.perf_counter() - started
    finally:
        if cond.data != "none":
            release_adapter(model)
    return scores, stats


def run_sample(
    student: Student, edits: SelfEdits, cond: Condition, setup: Setup, item: Item, sample: int
) -> dict[str, Any]:
    """Train and score one sample of one condition on one passage: the row results.jsonl gets."""
    from student.sequences import build_training_texts

    picked = [edits.get(cond, item, i) for i in edit_indices(cond, sample)]
    update = combined_self_edit(cond, item.doc.passage(), [e.text for e in picked])
    texts = build_training_texts(update) if cond.data != "none" else []
    (scores,), stats = train_and_score(student, cond, setup, texts, [item.doc])
    correct = sum(s.correct for s in scores)
    return {
        "condition": cond.name,
        "digest": condition_digest(cond, setup),
        "passage": item.index,
        "sample": sample,
        "title": item.doc.title,
        "accuracy": correct / len(scores) if scores else 0.0,
        "correct": correct,
        "questions": len(scores),
        "generation_seconds": sum(e.generation_seconds for e in picked),
        **stats,
        "edit_indices": edit_indices(cond, sample),
        "edit_chars": sum(len(e.text) for e in picked),
        "edit_lines": len(update.lines),
        "training_texts": len(texts),
        "responses": [{"question": s.question, "response": s.response, "correct": s.correct} for s in scores],
        "finished_at": time.time(),
    }


# --- the run loop ------------------------------------------------------------------------------------


@dataclass
class Bench:
    """One output folder: results and self-edit logs, and the tables rewritten after every passage."""

    out: Path
    setup: Setup
    student: Student
    sampler: Sampler | None
    title: str = "Knowledge incorporation"
    notes: list[str] = field(default_factory=list)
    rounds: list[str] = field(default_factory=list)
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = JsonlLog(self.out / "results.jsonl", result_key)
        self.edits = SelfEdits(self.setup, self.sampler, JsonlLog(self.out / "self_edits.jsonl", edit_key))
        self.multidoc: list[report.ConditionSummary] = []
        self.extra: dict[str, Any] = {}
        # The passages of this run: rows of others (a longer run's, in the same folder) stay out of
        # its tables. Empty until run() names them.
        self.passages: set[int] = set()

    def run(self, conditions: Sequence[Condition], items: Sequence[Item]) -> list[report.ConditionSummary]:
        """Every condition on every passage (passage by passage), skipping results already logged."""
        self.passages = {item.index for item in items}
        for number, item in enumerate(items, 1):
            for cond in conditions:
                for sample in range(sample_count(cond, self.setup)):
                    self._run_one(cond, item, sample, f"[{number}/{len(items)}]")
            self.write_outputs(conditions)
        return self.summaries(conditions)

    def _run_one(self, cond: Condition, item: Item, sample: int, where: str) -> None:
        key = result_key(
            {
                "condition": cond.name,
                "passage": item.index,
                "sample": sample,
                "digest": condition_digest(cond, self.setup),
            }
        )
        if key in self.results:
            return
        row = run_sample(self.student, self.edits, cond, self.setup, item, sample)
        self.results.append(row)
        self.log(
            f"{where} {item.doc.title[:28]:<28} {cond.name:<18} sample {sample}: "
            f"{row['correct']}/{row['questions']} correct, gen {row['generation_seconds']:.1f} s, "
            f"train {row['train_seconds']:.1f} s ({row['steps']} steps), eval {row['eval_seconds']:.1f} s"
        )

    def summaries(self, conditions: Sequence[Condition]) -> list[report.ConditionSummary]:
        rows = [r for r in self.results.rows.values() if not self.passages or r["passage"] in self.passages]
        return [report.summarize(rows, plan_of(c, self.setup)) for c in conditions]

    def table(self, conditions: Sequence[Condition]) -> str:
        return self._table(self.summaries(conditions))

    def paired(self, summaries: Sequence[report.ConditionSummary]) -> list[report.PairedDifference]:
        """Each later teacher round against the first (the untrained teacher), when the run has both."""
        by_name = {s.name: s for s in summaries}
        rounds = [by_name[n] for n in self.rounds if n in by_name]
        if len(rounds) < 2:
            return []
        return [report.paired_difference(r, rounds[0]) for r in rounds[1:]]

    def _table(self, summaries: Sequence[report.ConditionSummary]) -> str:
        text = report.markdown_table(summaries, self.title, self.notes)
        if paired := self.paired(summaries):
            baseline = next(s.label for s in summaries if s.name == paired[0].against)
            text += "\n" + report.paired_table(paired, baseline)
        return text

    def write_outputs(self, conditions: Sequence[Condition]) -> None:
        summaries = self.summaries(conditions)
        report.write_text_atomic(self.out / "table.md", self._table(summaries))
        report.write_plot(summaries, self.out / "accuracy.png", self.title, self.rounds)
        report.write_json(
            self.out / "summary.json",
            {
                "title": self.title,
                "setup": asdict(self.setup),
                "intervals": report.INTERVALS_NOTE,
                "conditions": [
                    {**asdict(c), "digest": condition_digest(c, self.setup), **report.summary_dict(s)}
                    for c, s in zip(conditions, summaries, strict=True)
                ],
                "multidoc": [report.summary_dict(s) for s in self.multidoc],
                "paired": [asdict(d) for d in self.paired(summaries)],
                **self.extra,
                "written_at": time.time(),
            },
        )

    # --- the multi-document (CPT) table ---

    def run_multidoc(
        self, conditions: Sequence[Condition], items: Sequence[Item]
    ) -> list[report.ConditionSummary]:
        """Per condition ONE adapter on the union of every passage's training texts, scored on all
        their questions; written to table_multidoc.md and summary.json's "multidoc"."""
        for cond in conditions:
            row = self._multidoc_row(cond, items)
            self.multidoc = [s for s in self.multidoc if s.name != cond.name]
            self.multidoc.append(report.summarize_multidoc(row, cond.name, cond.label))
        text = report.markdown_table(
            self.multidoc, f"{self.title}: {len(items)} passages in one update", self.notes
        )
        report.write_text_atomic(self.out / "table_multidoc.md", text)
        return self.multidoc

    def _multidoc_row(self, cond: Condition, items: Sequence[Item]) -> dict[str, Any]:
        from student.sequences import build_training_texts

        digest = _digest(
            {"condition": condition_digest(cond, self.setup), "passages": [i.index for i in items]}
        )
        key = result_key({"condition": cond.name, "passage": -1, "sample": 0, "digest": digest})
        if (done := self.results.get(key)) is not None:
            return done
        texts: list[str] = []
        generation = chars = lines = 0.0
        for item in items:
            picked = [self.edits.get(cond, item, i) for i in edit_indices(cond, 0)]
            update = combined_self_edit(cond, item.doc.passage(), [e.text for e in picked])
            texts += build_training_texts(update)
            generation += sum(e.generation_seconds for e in picked)
            chars += sum(len(e.text) for e in picked)
            lines += len(update.lines)
        docs = [item.doc for item in items]
        scores, stats = train_and_score(self.student, cond, self.setup, texts, docs)
        per_passage = [_passage_score(item.index, sc) for item, sc in zip(items, scores, strict=True)]
        row = {
            "condition": cond.name,
            "digest": digest,
            "passage": -1,
            "sample": 0,
            "multidoc": True,
            "per_passage": per_passage,
            "accuracy": sum(p["correct"] for p in per_passage)
            / max(1, sum(p["questions"] for p in per_passage)),
            "generation_seconds": generation,
            **stats,
            "self_edits": cond.self_edits,
            "edit_chars": chars / len(items),
            "edit_lines": lines / len(items),
            "training_texts": len(texts),
            "finished_at": time.time(),
        }
        self.results.append(row)
        self.log(
            f"[multi-doc] {cond.name:<18} {row['accuracy']:.1%} of all questions, train {row['train_seconds']:.0f} s"
        )
        return row


def _passage_score(index: int, scores: Sequence[Any]) -> dict[str, Any]:
    correct = sum(s.correct for s in scores)
    return {
        "passage": index,
        "correct": correct,
        "questions": len(scores),
        "accuracy": correct / max(1, len(scores)),
    }


# --- models --------------------------------------------------------------------------------------------


def teacher_sampler(model: Any, tokenizer: Any, name: str, setup: Setup, device: str) -> Sampler:
    """Our teacher: one self-edit per (passage, seed), with the condition's policy adapter loaded if any."""
    from auditor.evaluation import load_adapter, unload_adapter
    from teacher.backends import TransformersGenerator
    from teacher.core import propose_self_edits

    def sample(cond: Condition, passage: Passage, seed: int) -> tuple[str, float]:
        policy = load_adapter(model, Path(cond.policy_path)) if cond.policy_path else None
        try:
            generator = TransformersGenerator(policy or model, tokenizer, device, name=name)
            sampling = replace(setup.sampling, seed=seed)
            (edit,) = propose_self_edits(
                generator, passage, cond.edit_format, 1, cond.lora, sampling, "bench", 0
            )
        finally:
            if policy is not None:
                unload_adapter(policy)
        return edit.text, edit.generation_seconds

    return sample


def load_models(args: argparse.Namespace, setup: Setup, need_teacher: bool) -> tuple[Student, Sampler | None]:
    from seal.models import load_model, resolve_model

    model, tokenizer = load_model(resolve_model(args.model), device=args.device)
    if not need_teacher:
        return Student(model, tokenizer), None
    if args.teacher_model == args.model:
        # The same weights serve both: the teacher samples (policy adapters unloaded after) before training.
        teacher, teacher_tok = model, tokenizer
    else:
        teacher, teacher_tok = load_model(resolve_model(args.teacher_model), device=args.device)
    return Student(model, tokenizer), teacher_sampler(
        teacher, teacher_tok, args.teacher_model, setup, args.device
    )


# --- the commands ------------------------------------------------------------------------------------


def recipe_from_args(args: argparse.Namespace) -> LoraSettings:
    overrides = {
        "epochs": args.epochs,
        "learning_rate": args.lr,
        "rank": args.rank,
        "schedule": args.schedule,
    }
    lora = replace(LoraSettings(), **{k: v for k, v in overrides.items() if v is not None})
    # alpha follows rank (2r), as in the defaults and the reference, unless the rank is left alone.
    return replace(lora, alpha=2.0 * lora.rank) if args.rank is not None else lora


def setup_from_args(args: argparse.Namespace) -> Setup:
    sampling = replace(SamplingSettings(), max_new_tokens=args.max_new_tokens)
    return Setup(args.model, args.teacher_model, sampling, args.samples, answer_tokens=args.answer_tokens)


def parse_policies(specs: Sequence[str]) -> list[tuple[str, str]]:
    policies = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--policy takes NAME=PATH (a PEFT LoRA directory), got {spec!r}")
        if not (Path(path) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"--policy {name}: no adapter_config.json in {path}")
        policies.append((name, path))
    return policies


def select(conditions: list[Condition], names: str) -> list[Condition]:
    if not names:
        return conditions
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {c.name: c for c in conditions}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown conditions {unknown}; this command has {list(known)}")
    return [known[n] for n in wanted]


def with_prompts(conditions: list[Condition], log: Callable[[str], None]) -> list[Condition]:
    """Drop teacher rows whose format has no prompt in teacher.prompts (yet), saying so."""
    kept = []
    for cond in conditions:
        try:
            if cond.source == TEACHER:
                build_prompt(Passage("", ""), cond.edit_format)
            kept.append(cond)
        except ValueError as exc:
            log(f"skipping condition {cond.name}: {exc}")
    return kept


def _notes(setup: Setup, lora: LoraSettings, data: str, join: int = 1) -> list[str]:
    rows = (
        f"A self-edit row trains {setup.samples} self-edit(s) per passage separately; "
        "the passage's accuracy is their mean (no best-of-N)."
        if join == 1
        else f"A self-edit row (NAME-join{join}) trains one update per passage on the passage and "
        f"{join} self-edits joined (no best-of-N)."
    )
    return [
        f"Student {setup.student_model}, teacher {setup.teacher_model} (sampling {asdict(setup.sampling)}); "
        f"questions asked without the passage, graded {setup.metric!r}.",
        f"Recipe (LoRA): {asdict(lora)}.",
        f"Passages: {data}. {rows}",
    ]


def cmd_knowledge(args: argparse.Namespace) -> int:
    setup = setup_from_args(args)
    lora = recipe_from_args(args)
    policies = parse_policies(args.policy)
    if args.join > 1 and args.samples > 1:
        raise ValueError(
            "--samples trains one-self-edit rows separately; with --join each row is one joined update"
        )
    conditions = knowledge_conditions(lora, EditFormat(args.teacher_format), policies, args.join)
    conditions = with_prompts(select(conditions, args.conditions), print)
    items = load_eval_items(args.data, args.passages)
    check_released_counts(conditions, items, setup)
    student, sampler = load_models(
        args, setup, any(c.source == TEACHER for c in conditions) or bool(args.multi_doc)
    )
    bench = Bench(
        args.out,
        setup,
        student,
        sampler,
        title=f"SEAL knowledge incorporation, {len(items)} evaluation passages",
        notes=_notes(setup, lora, f"the first {len(items)} of base_val.json", args.join),
        rounds=[
            c.name for c in conditions if c.source == TEACHER and c.edit_format.value == args.teacher_format
        ],
    )
    print(f"{len(conditions)} conditions × {len(items)} passages -> {args.out}", flush=True)
    bench.run(conditions, items)
    print(bench.table(conditions))
    if args.multi_doc:
        multidoc = multidoc_conditions(conditions, lora, args)
        bench.run_multidoc(multidoc, items[: args.multi_doc])
        bench.write_outputs(conditions)
        print((args.out / "table_multidoc.md").read_text())
    return 0


def check_released_counts(conditions: Sequence[Condition], items: Sequence[Item], setup: Setup) -> None:
    """Fail before any training when a released row would ask for a completion the files lack."""
    for cond in conditions:
        if cond.source in RELEASED:
            need = max(max(edit_indices(cond, s), default=-1) for s in range(sample_count(cond, setup))) + 1
            have = min(len(item.released[cond.source]) for item in items)
            if need > have:
                raise ValueError(
                    f"{cond.name} needs {need} self-edits per passage; the released file has {have}"
                )


def multidoc_conditions(
    conditions: Sequence[Condition], lora: LoraSettings, args: argparse.Namespace
) -> list[Condition]:
    """The CPT table's rows: passage only, each released source and our untrained teacher, with all
    `--multi-doc-edits` self-edits of each passage (the reference's k_completions = 5)."""
    lora = replace(lora, epochs=args.multi_doc_epochs) if args.multi_doc_epochs else lora
    fmt = EditFormat(args.teacher_format)
    k = args.multi_doc_edits
    rows = [Condition("cpt-passage", "passage only", "passage", lora=lora)]
    for source, label in (
        ("qwen2.5-7b", "Qwen2.5-7B"),
        ("gpt-4.1", "GPT-4.1"),
        ("seal-round2", "SEAL round 2"),
        (TEACHER, "our teacher (untrained)"),
    ):
        rows.append(Condition(f"cpt-{source}", f"passage + {label}, {k} each", "all", source, lora, fmt, n=k))
    return rows


def cmd_recipe(args: argparse.Namespace) -> int:
    setup = setup_from_args(args)
    base = recipe_from_args(args)
    conditions = with_prompts(select(recipe_conditions(base, args.n), args.conditions), print)
    items = load_training_items(args.data, args.passages, args.seed)
    student, sampler = load_models(args, setup, any(c.source == TEACHER for c in conditions))
    bench = Bench(
        args.out,
        setup,
        student,
        sampler,
        title=f"Inner-loop recipe study, {len(items)} training passages",
        notes=_notes(
            setup, base, f"{len(items)} SQuAD training passages (not among the 200), shuffle seed {args.seed}"
        ),
    )
    bench.extra = {"passages": [{"index": i.index, "title": i.doc.title} for i in items]}
    print(f"{len(conditions)} conditions × {len(items)} training passages -> {args.out}", flush=True)
    bench.run(conditions, items)
    print(bench.table(conditions))
    return 0


def default_data_dir() -> Path:
    """../shared/data/knowledge relative to the repository root."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "knowledge"


def _common_flags(p: argparse.ArgumentParser, default_out: str, default_passages: int) -> None:
    from seal.models import DEFAULT_MODEL

    p.add_argument("--passages", type=int, default=default_passages, help="how many passages (first K)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the student model")
    p.add_argument("--teacher-model", default=None, help="the teacher's model (default: --model)")
    p.add_argument(
        "--out", type=Path, default=Path(default_out), help="results folder (resumed if it exists)"
    )
    p.add_argument("--data", type=Path, default=default_data_dir(), help="the knowledge data folder")
    p.add_argument("--conditions", default="", help="comma-separated condition names (default: all)")
    p.add_argument("--samples", type=int, default=1, help="self-edits per passage, each trained separately")
    p.add_argument("--epochs", type=int, default=None, help="recipe override")
    p.add_argument("--lr", type=float, default=None, help="recipe override (learning rate)")
    p.add_argument("--rank", type=int, default=None, help="recipe override (LoRA rank; alpha = 2 * rank)")
    p.add_argument("--schedule", choices=("linear", "constant"), default=None, help="recipe override")
    p.add_argument(
        "--max-new-tokens", type=int, default=SamplingSettings().max_new_tokens, help="per self-edit"
    )
    p.add_argument("--answer-tokens", type=int, default=48, help="new tokens per answer (the reference: 64)")
    p.add_argument("--device", default="cpu")


def add_bench_commands(sub: Any) -> None:
    """`seal bench knowledge` and `seal bench recipe` under the `bench` subparsers."""
    knowledge = sub.add_parser("knowledge", help="the SEAL results table on the paper's evaluation passages")
    _common_flags(knowledge, "bench-out/knowledge", 50)
    formats = [f.value for f in EditFormat if f is not EditFormat.PASSAGE]
    knowledge.add_argument("--teacher-format", default=EditFormat.IMPLICATIONS.value, choices=formats)
    knowledge.add_argument(
        "--policy", action="append", default=[], help="NAME=PATH of a teacher policy adapter"
    )
    knowledge.add_argument(
        "--join",
        type=int,
        default=1,
        help="self-edits joined in one update per self-edit row (the default recipe: 3); rows NAME-joinN",
    )
    knowledge.add_argument(
        "--multi-doc", type=int, default=0, help="also the CPT table over the first n passages"
    )
    knowledge.add_argument("--multi-doc-epochs", type=int, default=None, help="epochs of the CPT update")
    knowledge.add_argument(
        "--multi-doc-edits", type=int, default=5, help="self-edits per passage in the CPT update"
    )
    knowledge.set_defaults(func=_with_teacher_default(cmd_knowledge))

    recipe = sub.add_parser("recipe", help="the inner-loop recipe study on training passages only")
    _common_flags(recipe, "bench-out/recipe", 8)
    recipe.add_argument("--n", type=int, default=3, help="self-edits in the all-N rows")
    recipe.add_argument("--seed", type=int, default=0, help="shuffle seed of the training passages")
    recipe.set_defaults(func=_with_teacher_default(cmd_recipe))

    from seal.bench.continual import add_continual_command
    from seal.bench.rest_em import add_rest_em_command

    add_rest_em_command(sub, default_data_dir())
    add_continual_command(sub)
    retention = sub.add_parser(
        "retention",
        help="learning against retention, per guard against forgetting (resumable); --help for its flags",
        add_help=False,
    )
    retention.set_defaults(func=_retention)


def _retention(args: argparse.Namespace) -> int:
    """`seal bench retention` with no flags (seal.cli.main hands any flags to its own parser)."""
    from seal.bench.retention import main

    return main([])


def _with_teacher_default(
    command: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        args.teacher_model = args.teacher_model or args.model
        return command(args)

    return run
