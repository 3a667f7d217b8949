"""`seal bench retention`: what each guard against forgetting costs in learning, and what it saves.

Read it top to bottom: the settings (the unmitigated default, replay, a KL penalty, a milder LoRA, a
combination), the passages (the demo's three invented ones and SQuAD training passages, never the
200 evaluation passages), one fixed self-edit per passage (written once by our teacher, as a default
job writes it, and cached), one (setting, passage) run, a calibration of the thresholds on a
harmless and a destructive update, and the table.

Per (setting, passage) a row in results.jsonl: τ accuracy before and after (all the passage's
questions), retention accuracy after (the base's is measured once), the KL shift on the auditor's
prompts, and the training's own figures. Rows land as they finish; a rerun skips the ones already
there (a row is keyed by setting, passage and a digest of everything that changes it), so a run
can span sessions. The guardrail verdicts are computed at table time from the figures, so the
table follows the thresholds in auditor.guardrails.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from seal.bench import report
from seal.bench.knowledge import JsonlLog, _digest, default_data_dir, load_eval_items, load_training_items
from seal.gate import DEFAULT_MIN_HITS, Gate, document_gate, partition
from seal.records import QA, Document, EditFormat, LoraSettings, SamplingSettings

# --- settings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str
    label: str
    lora: LoraSettings
    gated: bool = False
    """Measured as served behind the passage's gate (seal.gate, `lora.gate` words): the prompts the
    gate stays closed for are the base's. Every other setting is measured ungated."""


def retention_settings(base: LoraSettings) -> list[Setting]:
    """The study's rows; adding one is adding a line. (Replay 32 was tried on the first passage and
    dropped: four times the steps of replay 8, and no less forgetting.)"""
    return [
        Setting("default", "unmitigated default", base),
        Setting("replay-8", "replay 8", replace(base, replay=8)),
        Setting("kl-0.1", "KL penalty 0.1", replace(base, kl_weight=0.1)),
        Setting("kl-1", "KL penalty 1", replace(base, kl_weight=1.0)),
        Setting("kl-3", "KL penalty 3", replace(base, kl_weight=3.0)),
        Setting("kl-10", "KL penalty 10", replace(base, kl_weight=10.0)),
        Setting("mild", "milder LoRA (lr 5e-4, 5 epochs)", replace(base, learning_rate=5e-4, epochs=5)),
        Setting("replay-8+kl-1", "replay 8 + KL penalty 1", replace(base, replay=8, kl_weight=1.0)),
        Setting(
            "gated-2", "default, gated (2 document words)", replace(base, gate=DEFAULT_MIN_HITS), gated=True
        ),
    ]


# --- passages and their self-edits -----------------------------------------------------------------------


@dataclass(frozen=True)
class Passage:
    """A passage of the study: `key` names it in the results ("demo:0", "squad:1045")."""

    key: str
    doc: Document


def demo_passages(path: Path | None = None) -> list[Passage]:
    """The invented passages of seal/examples/demo.json: the model cannot know them beforehand."""
    path = path or Path(__file__).resolve().parents[1] / "examples" / "demo.json"
    docs = json.loads(path.read_text())["documents"]
    return [
        Passage(f"demo:{i}", Document(d["title"], d["context"], tuple(QA(**q) for q in d["questions"])))
        for i, d in enumerate(docs)
    ]


def eval_passages(data_dir: Path, k: int) -> list[Passage]:
    """The first k of the paper's 200 evaluation passages, for measurement only: no setting, prompt or
    threshold of this study is chosen on them."""
    return [Passage(f"eval:{item.index}", item.doc) for item in load_eval_items(data_dir, k)]


def squad_passages(data_dir: Path, k: int, seed: int = 0) -> list[Passage]:
    """SQuAD training passages (not among the 200 evaluation passages), as `seal bench recipe` picks them."""
    return [Passage(f"squad:{item.index}", item.doc) for item in load_training_items(data_dir, k, seed)]


# (passage) -> (training texts, self-edit text): one self-edit, written once.
Writer = Callable[[Passage], tuple[list[str], str]]


def teacher_writer(model: Any, tokenizer: Any, name: str, samples_per_edit: int) -> Writer:
    """Our teacher writes one implications self-edit per passage as a default job does (seed 0,
    `samples_per_edit` samples joined); the student's training texts are built from it."""
    from student.sequences import build_training_texts
    from teacher.backends import TransformersGenerator
    from teacher.core import propose_self_edits

    def write(passage: Passage) -> tuple[list[str], str]:
        generator = TransformersGenerator(model, tokenizer, str(model.device), name=name)
        (edit,) = propose_self_edits(
            generator,
            passage.doc.passage(),
            EditFormat.IMPLICATIONS,
            1,
            LoraSettings(),
            SamplingSettings(),
            "bench-retention",
            0,
            samples_per_edit=samples_per_edit,
        )
        return build_training_texts(edit), edit.text

    return write


def cached_self_edit(cache: JsonlLog, writer: Writer, passage: Passage, key: dict[str, Any]) -> list[str]:
    """The passage's training texts, from the cache or written (and cached) now."""
    digest = _digest({**key, "title": passage.doc.title, "context": passage.doc.context})
    row = cache.get(digest)
    if row is None:
        started = time.perf_counter()
        texts, text = writer(passage)
        row = {
            "key": digest,
            "passage": passage.key,
            "text": text,
            "texts": texts,
            "seconds": time.perf_counter() - started,
        }
        cache.append(row)
    return list(row["texts"])


# --- measuring ---------------------------------------------------------------------------------------


@dataclass
class Yardsticks:
    """What the base model scores, computed once, as the auditor computes it (auditor.core.Retention):
    the retention accuracy, each question's result, and the KL sequences with their prompts."""

    retention: Any

    @property
    def retention_before(self) -> float:
        return float(self.retention.baseline)


def measure_base(model: Any, tokenizer: Any) -> Yardsticks:
    from auditor.core import base_retention

    return Yardsticks(base_retention(model, tokenizer))


def measure_adapter(
    peft_model: Any, tokenizer: Any, base: Yardsticks, gate: Gate | None = None
) -> dict[str, Any]:
    """Retention accuracy and KL shift of an adapted model (behind `gate`, if any), and how long the
    audit spent on them."""
    from auditor.core import gated_kl, gated_retention

    started = time.perf_counter()
    retention = gated_retention(gate, peft_model, tokenizer, base.retention, "chat")
    retention_seconds = time.perf_counter() - started
    kl = gated_kl(gate, peft_model, tokenizer, base.retention)
    return {
        "retention_before": base.retention_before,
        "retention_after": retention,
        "retention_drop": base.retention_before - retention,
        "kl": kl,
        "retention_seconds": retention_seconds,
        "kl_seconds": time.perf_counter() - started - retention_seconds,
    }


def tau_accuracy(model: Any, tokenizer: Any, doc: Document) -> tuple[float, list[dict[str, Any]]]:
    from auditor.evaluation import evaluate_document

    scores = evaluate_document(model, tokenizer, doc)
    return (
        sum(s.correct for s in scores) / len(scores),
        [{"question": s.question, "response": s.response, "correct": s.correct} for s in scores],
    )


def run_one(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    doc: Document,
    lora: LoraSettings,
    base: Yardsticks,
    gated: bool = False,
    base_responses: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Train one adapter on `texts`, score τ, retention and KL with it, and restore the base. `gated`:
    measured behind the passage's gate, the questions it stays closed for keeping the base's
    `base_responses`."""
    from auditor.evaluation import question_prompt
    from student.training import release_adapter, train_adapter

    gate = document_gate(doc.title, doc.context, lora.gate) if gated else None
    peft_model, stats = train_adapter(model, tokenizer, texts, lora)
    try:
        accuracy, responses = tau_accuracy(peft_model, tokenizer, doc)
        if gate is not None:
            prompts = [question_prompt(doc.title, qa.question) for qa in doc.questions]
            _, closed = partition(gate, prompts)
            for i in closed:
                responses[i] = {**base_responses[i], "gate": "closed"}
            accuracy = sum(r["correct"] for r in responses) / len(responses)
        figures = measure_adapter(peft_model, tokenizer, base, gate)
    finally:
        release_adapter(peft_model)
    return {
        "accuracy_after": accuracy,
        **figures,
        "train_seconds": stats.seconds,
        "steps": stats.steps,
        "final_loss": stats.losses[-1] if stats.losses else None,
        "final_kl_penalty": stats.kls[-1] if stats.kls else None,
        "replayed": stats.replayed,
        "responses": responses,
    }


# --- calibration -------------------------------------------------------------------------------------

NEUTRAL_SENTENCE = "The museum opens at nine in the morning and closes at five in the afternoon."
NONSENSE = "blorp zint quax blorp zint quax blorp zint quax blorp zint quax"


def calibration_settings(base: LoraSettings) -> list[tuple[str, str, list[str], LoraSettings]]:
    """Updates whose verdict is clear without a passage, to place the thresholds: one step on a
    neutral sentence (the smallest real update: what the retention set's greedy near-ties alone
    do), the default recipe on that sentence (harmless text, but ten epochs of it), and a
    destructive update (lr 1e-2 on repetitive nonsense)."""
    return [
        ("neutral-1-step", "one neutral sentence, one step", [NEUTRAL_SENTENCE], replace(base, epochs=1)),
        ("harmless", "one neutral sentence, default recipe (10 epochs)", [NEUTRAL_SENTENCE], base),
        (
            "destructive",
            "repetitive nonsense, lr 1e-2 constant, 10 epochs",
            [NONSENSE] * 8,
            replace(base, learning_rate=1e-2, schedule="constant"),
        ),
    ]


def calibration_key(name: str, lora: LoraSettings, model_name: str) -> dict[str, str]:
    return {"setting": f"calibration:{name}", "passage": "-", "digest": _row_digest(lora, model_name)}


# --- the run ---------------------------------------------------------------------------------------------


def result_key(row: dict[str, Any]) -> str:
    return f"{row['setting']}|{row['passage']}|{row['digest']}"


def run_retention_bench(
    model: Any,
    tokenizer: Any,
    passages: Sequence[Passage],
    settings: Sequence[Setting],
    out: Path,
    writer: Writer,
    model_name: str,
    log: Callable[[str], None] = print,
    samples_per_edit: int = 1,
) -> dict[str, Any]:
    """The calibration rows, then every setting on every passage (passage by passage), skipping rows
    already in out/results.jsonl; the table (out/table.md) and summary (out/summary.json) after each passage."""
    out.mkdir(parents=True, exist_ok=True)
    results = JsonlLog(out / "results.jsonl", result_key)
    edits = JsonlLog(out / "self_edits.jsonl", lambda row: str(row["key"]))
    edit_key = {
        "teacher": model_name,
        "format": "implications",
        "samples_per_edit": samples_per_edit,
        "seed": 0,
    }
    started = time.perf_counter()
    base = measure_base(model, tokenizer)
    log(
        f"base: retention {base.retention_before:.3f} ({time.perf_counter() - started:.1f} s with the KL sequences)"
    )
    calibrate(model, tokenizer, base, results, model_name, log)
    for number, passage in enumerate(passages, 1):
        texts = cached_self_edit(edits, writer, passage, edit_key)
        before = _base_accuracy(results, model, tokenizer, passage, model_name)
        for setting in settings:
            key = {
                "setting": setting.name,
                "passage": passage.key,
                "digest": _row_digest(setting.lora, model_name, setting.gated),
            }
            if result_key(key) in results:
                continue
            row = run_one(
                model,
                tokenizer,
                texts,
                passage.doc,
                setting.lora,
                base,
                setting.gated,
                _base_row(results, passage, model_name)["responses"],
            )
            row.update(
                key,
                title=passage.doc.title,
                accuracy_before=before,
                texts=len(texts),
                finished_at=time.time(),
            )
            row["gain"] = row["accuracy_after"] - before
            results.append(row)
            log(
                f"[{number}/{len(passages)}] {passage.key:<11} {setting.name:<14} gain {row['gain']:+.2f} "
                f"retention drop {row['retention_drop']:.3f} KL {row['kl']:.4f} "
                f"train {row['train_seconds']:.0f} s ({row['steps']} steps) "
                f"audit {row['retention_seconds'] + row['kl_seconds']:.1f} s"
            )
        write_outputs(out, settings, results, model_name, samples_per_edit, [p.key for p in passages])
    return write_outputs(out, settings, results, model_name, samples_per_edit, [p.key for p in passages])


def _base_row(results: JsonlLog, passage: Passage, model_name: str) -> dict[str, Any]:
    """The passage's base row (written by `_base_accuracy`)."""
    key = {"setting": "base", "passage": passage.key, "digest": _digest({"model": model_name})}
    return results.get(result_key(key)) or {}


def _base_accuracy(results: JsonlLog, model: Any, tokenizer: Any, passage: Passage, model_name: str) -> float:
    key = {"setting": "base", "passage": passage.key, "digest": _digest({"model": model_name})}
    row = results.get(result_key(key))
    if row is None:
        accuracy, responses = tau_accuracy(model, tokenizer, passage.doc)
        row = {**key, "title": passage.doc.title, "accuracy": accuracy, "responses": responses}
        results.append(row)
    return float(row["accuracy"])


def _row_digest(lora: LoraSettings, model_name: str, gated: bool = False) -> str:
    """Everything that changes a row: the recipe, the model, the yardsticks' and guards' data, and the
    gate where the row is measured behind one (ungated rows keep the digests they had before gates)."""
    recipe = {k: v for k, v in asdict(lora).items() if k != "gate"}
    data = {"lora": recipe, "model": model_name, "answer_style": "chat", "data": _data_digest()}
    return _digest({**data, "gate": lora.gate} if gated else data)


def _data_digest() -> str:
    """The yardsticks' and guards' data by content (not file bytes: a rebuilt set with the same
    questions measures the same)."""
    from auditor.retention import (
        KL_MAX_NEW_TOKENS,
        RETENTION_MAX_NEW_TOKENS,
        load_kl_prompts,
        load_retention_set,
    )
    from student.general import ANSWER_MAX_NEW_TOKENS, KL_BATCH, KL_POOL, load_general_prompts

    return _digest(
        {
            "retention": [asdict(qa) for qa in load_retention_set()],
            "kl_prompts": load_kl_prompts(),
            "student_prompts": load_general_prompts(),
            "budgets": [
                RETENTION_MAX_NEW_TOKENS,
                KL_MAX_NEW_TOKENS,
                ANSWER_MAX_NEW_TOKENS,
                KL_BATCH,
                KL_POOL,
            ],
        }
    )


def calibrate(
    model: Any,
    tokenizer: Any,
    base: Yardsticks,
    results: JsonlLog,
    model_name: str,
    log: Callable[[str], None],
) -> None:
    for name, label, texts, lora in calibration_settings(LoraSettings()):
        key = calibration_key(name, lora, model_name)
        if result_key(key) in results:
            continue
        from student.training import release_adapter, train_adapter

        peft_model, stats = train_adapter(model, tokenizer, texts, lora)
        try:
            figures = measure_adapter(peft_model, tokenizer, base)
        finally:
            release_adapter(peft_model)
        results.append(
            {**key, "label": label, **figures, "steps": stats.steps, "train_seconds": stats.seconds}
        )
        log(f"calibration {name}: retention drop {figures['retention_drop']:.3f}, KL {figures['kl']:.4f}")


# --- the table -------------------------------------------------------------------------------------------


SENSITIVITY_DROPS = (0.10, 0.15, 0.20, 0.25)
SENSITIVITY_KLS = (0.05, 0.10)


def passes(row: dict[str, Any], max_drop: float | None = None, max_kl: float | None = None) -> bool:
    """Whether the row's adapter passes the retention guardrails (at auditor.guardrails' thresholds
    unless others are given)."""
    from auditor.guardrails import MAX_KL, MAX_RETENTION_DROP, run_guardrails

    checks = run_guardrails(
        "",
        (),
        row["retention_before"],
        row["retention_after"],
        MAX_RETENTION_DROP if max_drop is None else max_drop,
        kl=row["kl"],
        max_kl=MAX_KL if max_kl is None else max_kl,
    )
    return all(c.passed for c in checks)


def sensitivity(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The fraction of `rows` passing at other thresholds: "drop<=D,kl<=K" -> fraction."""
    return {
        f"drop<={d:.2f},kl<={k:.2f}": sum(passes(r, d, k) for r in rows) / len(rows)
        for k in SENSITIVITY_KLS
        for d in SENSITIVITY_DROPS
    }


def summarize(
    settings: Sequence[Setting],
    rows: Sequence[dict[str, Any]],
    model_name: str,
    passages: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Per setting: mean gain, mean retention drop, mean and max KL, the fraction passing, seconds;
    over `passages` only, when given."""
    summaries: list[dict[str, Any]] = []
    for setting in settings:
        digest = _row_digest(setting.lora, model_name, setting.gated)
        mine = [
            r
            for r in rows
            if r["setting"] == setting.name
            and r["digest"] == digest
            and (passages is None or r["passage"] in passages)
        ]
        n = len(mine)
        summaries.append(
            {
                "setting": setting.name,
                "label": setting.label,
                "lora": asdict(setting.lora),
                "passages": n,
                "gain": report.mean([r["gain"] for r in mine]) if n else None,
                "gain_interval": report.normal_interval([r["gain"] for r in mine]) if n > 1 else None,
                "retention_drop": report.mean([r["retention_drop"] for r in mine]) if n else None,
                "max_retention_drop": max((r["retention_drop"] for r in mine), default=None),
                "kl": report.mean([r["kl"] for r in mine]) if n else None,
                "max_kl": max((r["kl"] for r in mine), default=None),
                "pass_fraction": sum(passes(r) for r in mine) / n if n else None,
                "pass_at": sensitivity(mine) if n else {},
                "train_seconds": report.mean([r["train_seconds"] for r in mine]) if n else None,
                "audit_seconds": report.mean([r["retention_seconds"] + r["kl_seconds"] for r in mine])
                if n
                else None,
            }
        )
    default = next((s for s in summaries if s["setting"] == "default"), None)
    for s in summaries:
        unmitigated = default["gain"] if default else None
        s["gain_vs_default"] = s["gain"] / unmitigated if unmitigated and s["gain"] is not None else None
    return summaries


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def markdown_table(
    summaries: Sequence[dict[str, Any]], calibration: Sequence[dict[str, Any]], notes: Sequence[str]
) -> str:
    from auditor.guardrails import MAX_KL, MAX_RETENTION_DROP

    lines = [
        "## Learning versus retention",
        "",
        *notes,
        "",
        f"Guardrails: retention drop ≤ {MAX_RETENTION_DROP:.3f} and KL(base ‖ adapted) ≤ {MAX_KL:.3f} nats per token.",
        "",
        "| setting | passages | τ gain (after − before) | of default's gain | retention drop (mean / max) "
        "| KL shift (mean / max) | pass guardrails | train s | audit s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['label']} | {s['passages']} | {_fmt(s['gain'], '{:+.3f}')} | {_fmt(s['gain_vs_default'], '{:.0%}')} "
            f"| {_fmt(s['retention_drop'], '{:.3f}')} / {_fmt(s['max_retention_drop'], '{:.3f}')} "
            f"| {_fmt(s['kl'], '{:.4f}')} / {_fmt(s['max_kl'], '{:.4f}')} | {_fmt(s['pass_fraction'], '{:.0%}')} "
            f"| {_fmt(s['train_seconds'], '{:.0f}')} | {_fmt(s['audit_seconds'], '{:.1f}')} |"
        )
    lines += [
        "",
        "Fraction passing at other thresholds (retention drop ≤ D and KL ≤ K):",
        "",
        "| setting | "
        + " | ".join(f"D {d:.2f}, K {k:.2f}" for k in SENSITIVITY_KLS for d in SENSITIVITY_DROPS)
        + " |",
        "|---|" + "---|" * (len(SENSITIVITY_KLS) * len(SENSITIVITY_DROPS)),
    ]
    for s in summaries:
        if s["pass_at"]:
            lines.append(f"| {s['label']} | " + " | ".join(f"{v:.0%}" for v in s["pass_at"].values()) + " |")
    if calibration:
        lines += [
            "",
            "Calibration (no passage):",
            "",
            "| update | retention drop | KL shift | passes |",
            "|---|---|---|---|",
        ]
        for row in calibration:
            lines.append(
                f"| {row['label']} | {row['retention_drop']:.3f} | {row['kl']:.4f} | {'yes' if passes(row) else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def write_outputs(
    out: Path,
    settings: Sequence[Setting],
    results: JsonlLog,
    model_name: str,
    samples_per_edit: int = 1,
    passages_of_run: Sequence[str] | None = None,
) -> dict[str, Any]:
    """summary.json and table.md from the rows there; with `passages_of_run`, over those passages only."""
    rows = [
        r
        for r in results.rows.values()
        if r["setting"] != "base" and not r["setting"].startswith("calibration:")
    ]
    calibration = [
        row
        for name, _, _, lora in calibration_settings(LoraSettings())
        if (row := results.get(result_key(calibration_key(name, lora, model_name)))) is not None
    ]
    summaries = summarize(settings, rows, model_name, passages_of_run)
    digests = {_row_digest(s.lora, model_name, s.gated) for s in settings}
    passages = sorted(
        {
            r["passage"]
            for r in rows
            if r["digest"] in digests and (passages_of_run is None or r["passage"] in passages_of_run)
        }
    )
    notes = [
        f"Student and teacher {model_name}; {len(passages)} passages ({', '.join(passages)}); one self-edit per "
        f"passage (our teacher, implications, {samples_per_edit} sample(s) joined, seed 0), the same for every "
        "setting.",
        "τ gain: accuracy on all the passage's questions after the update minus before, asked without the "
        "passage, graded 'contains'. Retention: the auditor's retention set (auditor/data/retention.json); "
        "KL: mean per-token KL(base ‖ adapted) over the base's greedy continuations of the auditor's prompts.",
    ]
    summary = {
        "settings": summaries,
        "calibration": calibration,
        "passages": passages,
        "written_at": time.time(),
    }
    report.write_json(out / "summary.json", summary)
    report.write_text_atomic(out / "table.md", markdown_table(summaries, calibration, notes))
    return summary


# --- the command ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from seal.models import DEFAULT_MODEL

    p = argparse.ArgumentParser(
        prog="seal bench retention",
        description="what each guard against forgetting costs in learning, and what it saves",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="the student (and teacher) model")
    p.add_argument("--squad", type=int, default=6, help="SQuAD training passages besides the demo's three")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed of the training passages")
    p.add_argument(
        "--eval-passages",
        type=int,
        default=0,
        help="measure on the first N evaluation passages instead of the demo's and the training ones "
        "(settings are chosen on those, never on these)",
    )
    p.add_argument("--data", type=Path, default=default_data_dir(), help="the knowledge data folder")
    p.add_argument("--settings", default="", help="comma-separated setting names (default: all)")
    p.add_argument("--out", type=Path, default=Path("bench-out/retention"), help="results folder (resumed)")
    p.add_argument(
        "--samples-per-edit",
        type=int,
        default=1,
        help="teacher samples joined into each passage's self-edit (a default job joins 3)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--table-only",
        action="store_true",
        help="write the table from the rows already in --out, over this run's passages, training nothing",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from seal.models import load_model, resolve_model

    args = build_parser().parse_args(argv)
    settings = retention_settings(LoraSettings())
    if args.settings:
        wanted = [s.strip() for s in args.settings.split(",") if s.strip()]
        known = {s.name: s for s in settings}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise SystemExit(f"unknown settings {unknown}; choose from {list(known)}")
        settings = [known[w] for w in wanted]
    passages = demo_passages() + (squad_passages(args.data, args.squad, args.seed) if args.squad else [])
    if args.eval_passages:
        passages = eval_passages(args.data, args.eval_passages)
    if args.table_only:
        results = JsonlLog(args.out / "results.jsonl", result_key)
        keys = [p.key for p in passages]
        write_outputs(args.out, settings, results, args.model, args.samples_per_edit, keys)
        print((args.out / "table.md").read_text())
        return 0
    model, tokenizer = load_model(resolve_model(args.model), device=args.device)
    writer = teacher_writer(model, tokenizer, args.model, args.samples_per_edit)
    print(f"{len(settings)} settings × {len(passages)} passages -> {args.out}", flush=True)
    run_retention_bench(
        model,
        tokenizer,
        passages,
        settings,
        args.out,
        writer,
        args.model,
        log=lambda m: print(m, flush=True),
        samples_per_edit=args.samples_per_edit,
    )
    print((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
