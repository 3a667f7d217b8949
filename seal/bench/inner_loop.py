"""`seal bench inner-loop`: how many self-edits per hour the inner loop gets through, against the
SEAL reference's way of running it, on the same model, self-edits and questions.

Three configurations, in one run:
  (a) "reference": the SEAL reference's loop. A fresh PEFT model per self-edit, the Hugging Face
      Trainer (its defaults: AdamW, linear decay to 0, clipping at 1.0, no weight decay), every
      sequence padded to `pad_length` (2,048) with the loss on the padding (labels = input_ids, pad
      included), LoRA r=32 alpha=64 on q_proj/v_proj, lr 1e-3, batch 1; questions answered one at a
      time, greedy.
  (b) "dynamic": the same with dynamic padding (each batch padded to its longest, padding masked
      out of the loss); with batch 1 that is no padding at all.
  (c) "ours": the project's student training (student.multi.train_adapters, K adapters in one
      batched pass, when that module exists; else student.training.train_adapter, one after another)
      with the same recipe, and the auditor's batched answering.

Self-edits come from the teacher's transformers backend on SQuAD *training* passages (never the 200
evaluation passages), generated once and cached; generation time is measured once and charged to
every configuration per self-edit. A second table times the evaluation backends ("answerers") on
(c)'s adapters: transformers one at a time and batched, and any answerer plugged in (a vLLM one).

Everything lands in <out>/rows.jsonl as it is measured (fsynced), so a killed run resumes where it
stopped; <out>/inner_loop.json and <out>/table.md are rewritten after every row.
"""

from __future__ import annotations

import argparse
import importlib
import math
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, cast

from seal.bench import report
from seal.bench.knowledge import JsonlLog, _digest, default_data_dir, load_training_items
from seal.models import DEFAULT_MODEL
from seal.records import Document, EditFormat, LoraSettings, SamplingSettings, SelfEdit

CONFIGS = ("a", "b", "c")
LABELS = {
    "a": "(a) reference: Trainer, padded to {pad} with loss on padding, one question at a time",
    "b": "(b) reference with dynamic padding (loss masked on padding)",
    "c": "(c) ours: student training + the auditor's batched answering",
}
# The reference's recipe (DESIGN.md, "The reference, exactly"); epochs come from Settings.
REFERENCE_LORA = LoraSettings(
    rank=32,
    alpha=64.0,
    learning_rate=1e-3,
    batch_size=1,
    target_modules=("q_proj", "v_proj"),
    schedule="linear",
    max_grad_norm=1.0,
)
FLOPS_FORMULA = (
    "4·N·tokens per training step (frozen-base LoRA: forward 2·N·tokens + backward through the "
    "activations 2·N·tokens; the LoRA weights' own gradients and the attention-score FLOPs are left "
    "out); N = parameters of the base model's linear layers, LM head included (embedding lookups and "
    "norms excluded). 6·N·tokens would count weight gradients the frozen base never computes."
)
TARGETS = {"c_over_a": 20.0, "c_over_b": 3.0, "mfu": 0.5}
VLLM = "vllm"


@dataclass(frozen=True)
class Settings:
    """One run's settings. A stored row is reused only under the settings that shaped it
    (InnerLoopBench.digest), so a changed recipe or machine setting reruns its rows."""

    model: str = DEFAULT_MODEL
    contexts: int = 2
    # Self-edits per context (K: (c) trains them together when student.multi exists).
    self_edits: int = 3
    # The reference's 10; fewer only for quick runs.
    epochs: int = 10
    # (a) alone for fewer epochs (0: `epochs`), where its padded steps make the full run too long: its
    # training time is then scaled to `epochs` (every step processes exactly pad_length tokens, so a
    # step costs the same in any epoch) and its rewards come from the shorter training.
    reference_epochs: int = 0
    # (a) pads every sequence to this many tokens (the reference: 2048) and truncates longer ones;
    # (b) and (c) truncate at the same length, so all three train on the same tokens.
    pad_length: int = 2048
    device: str = "cpu"
    dtype: str = "float32"
    # torch threads (0: torch's default); the matmul peak is measured with the same number.
    threads: int = 0
    # Shuffle seed of the training passages and sampling seed of the teacher.
    seed: int = 0
    max_new_tokens: int = SamplingSettings().max_new_tokens
    answer_style: str = "chat"
    answer_tokens: int = 48
    answer_batch: int = 16
    # (c)'s trainer: "auto" (student.multi where it exists), "batched" or "single" (see ours_trainer).
    ours_trainer: str = "auto"
    # Side of the square matmul that measures the peak.
    peak_size: int = 2048
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("contexts", "self_edits", "epochs", "pad_length", "answer_tokens", "answer_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.reference_epochs <= self.epochs:
            raise ValueError(
                f"--reference-epochs must be between 0 (= --epochs) and --epochs ({self.epochs}), "
                f"got {self.reference_epochs}"
            )
        unknown = [s for s in self.skip if s not in CONFIGS]
        if unknown:
            raise ValueError(f"--skip takes configurations among {', '.join(CONFIGS)}; got {unknown}")
        if self.ours_trainer not in ("auto", "batched", "single"):
            raise ValueError(f"--ours-trainer must be auto, batched or single, got {self.ours_trainer!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    def epochs_for(self, config: str) -> int:
        return self.reference_epochs if config == "a" and self.reference_epochs else self.epochs

    def lora(self, config: str = "c") -> LoraSettings:
        epochs = self.epochs_for(config)
        return replace(REFERENCE_LORA, epochs=epochs, max_seq_len=self.pad_length, seed=self.seed)

    def machine(self) -> dict[str, Any]:
        """What the timings depend on besides the work itself."""
        return {"device": self.device, "dtype": self.dtype, "threads": self.threads}


# --- pure maths: FLOPs, utilization, rank correlation -------------------------------------------------


def lora_training_flops(n_params: int, tokens: int) -> float:
    """Model FLOPs of training a LoRA on a frozen base over `tokens` tokens (see FLOPS_FORMULA)."""
    return 4.0 * n_params * tokens


def utilization(flops: float, seconds: float, peak_flops_per_s: float) -> float | None:
    """Achieved FLOP/s as a fraction of the peak; None when there is nothing to divide."""
    if seconds <= 0 or peak_flops_per_s <= 0:
        return None
    return flops / seconds / peak_flops_per_s


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            out[i] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on tie-averaged ranks); None when either side is constant
    or there are fewer than 2 pairs."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman needs pairs, got {len(xs)} and {len(ys)} values")
    if len(xs) < 2:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def linear_parameters(model: Any) -> int:
    """N of the FLOP count: weights of every linear layer (a tied LM head counted once, as a matmul)."""
    import torch

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


# --- the machine: matmul peak, peak memory ---------------------------------------------------------------


def measure_matmul_peak(
    device: str, dtype: str, size: int = 2048, repeats: int = 4, trials: int = 5
) -> dict[str, Any]:
    """The machine's matrix-multiply peak here: best of `trials` timings of `repeats` square matmuls
    of side `size`, in `dtype`, with the torch threads set now."""
    import torch

    torch_dtype = getattr(torch, dtype)
    a = torch.randn(size, size, device=device).to(torch_dtype)
    b = torch.randn(size, size, device=device).to(torch_dtype)
    torch.matmul(a, b)  # warm-up: thread pool, kernels, caches
    _sync(device)
    best = math.inf
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    flops = 2.0 * size**3 * repeats
    return {
        "flops_per_s": flops / best,
        "size": size,
        "repeats": repeats,
        "trials": trials,
        "best_seconds": best,
        "threads": torch.get_num_threads(),
        "device": device,
        "dtype": dtype,
    }


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class MemoryMeter:
    """Peak memory of one measured stretch: the process's RSS high-water (getrusage) and, on CUDA,
    torch's max_memory_allocated. On Linux the RSS high-water is reset at `reset()` (clear_refs 5),
    so each stretch reports its own peak; elsewhere it is the process's peak so far."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.resettable = True

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self.resettable = False
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> dict[str, Any]:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            kib //= 1024  # bytes there
        out: dict[str, Any] = {"rss_peak_mib": kib / 1024, "rss_peak_since_reset": self.resettable}
        if self.device == "cuda":
            import torch

            out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out


# --- answerers: the pluggable evaluation backends ------------------------------------------------------


class Answerer(Protocol):
    """An evaluation backend: greedy answers to `prompts`, in order, from the base model with the
    LoRA adapter saved in `adapter_dir` (a PEFT directory), or from the base alone when it is None.

    Prompts are τ questions already in the run's answer style (auditor.evaluation.question_prompt):
    in "chat" style the answerer applies the model's chat template, in "reference" style it feeds the
    raw text. At most `Settings.answer_tokens` new tokens per answer. The bench cuts and grades the
    answers itself."""

    def __call__(self, prompts: Sequence[str], adapter_dir: Path | None) -> list[str]: ...


# (model directory, settings) -> an answerer; `--answerer NAME=MODULE:FUNCTION` names one.
AnswererFactory = Callable[[Path, Settings], Answerer]


@dataclass
class TransformersAnswerer:
    """The auditor's answering (auditor.evaluation.answer_questions) on the resident base model, the
    adapter loaded for the call and unloaded after; batch_size 1 asks one question at a time."""

    model: Any
    tokenizer: Any
    settings: Settings
    batch_size: int

    def __call__(self, prompts: Sequence[str], adapter_dir: Path | None) -> list[str]:
        from auditor.evaluation import load_adapter, unload_adapter

        model = self.model if adapter_dir is None else load_adapter(self.model, adapter_dir)
        try:
            return answer(model, self.tokenizer, prompts, self.settings, self.batch_size)
        finally:
            if adapter_dir is not None:
                unload_adapter(model)


def answer(
    model: Any, tokenizer: Any, prompts: Sequence[str], settings: Settings, batch_size: int
) -> list[str]:
    from auditor.evaluation import answer_questions

    return answer_questions(
        model,
        tokenizer,
        list(prompts),
        max_new_tokens=settings.answer_tokens,
        batch_size=batch_size,
        style=settings.answer_style,
    )


def load_answerer_factory(spec: str) -> tuple[str, AnswererFactory]:
    """`NAME=MODULE:FUNCTION` -> (name, the factory function)."""
    name, sep, target = spec.partition("=")
    module_name, colon, function = target.partition(":")
    if not (sep and colon and name and module_name and function):
        raise ValueError(f"--answerer takes NAME=MODULE:FUNCTION, got {spec!r}")
    factory = getattr(importlib.import_module(module_name), function, None)
    if not callable(factory):
        raise ValueError(f"--answerer {name}: {module_name} has no function {function!r}")
    return name, factory


# --- contexts and self-edits --------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """A training passage with its questions and its K self-edits."""

    index: int
    doc: Document
    edits: tuple[SelfEdit, ...]
    # Seconds of teacher generation charged to each self-edit (one batched call / K).
    generation_seconds: float

    def prompts(self, style: str) -> list[str]:
        from auditor.evaluation import question_prompt

        return [question_prompt(self.doc.title, qa.question, style) for qa in self.doc.questions]


def generate_self_edits(
    model: Any, tokenizer: Any, doc: Document, index: int, settings: Settings, cache: JsonlLog
) -> Context:
    """The teacher's K implications self-edits of `doc` in one sampled call, cached in `cache`."""
    lora = settings.lora()
    sampling = replace(SamplingSettings(), max_new_tokens=settings.max_new_tokens, seed=settings.seed)
    key = _digest(
        {
            "model": settings.model,
            "passage": doc.passage().digest(),
            "k": settings.self_edits,
            "sampling": asdict(sampling),
        }
    )
    row = cache.get(key)
    if row is None:
        from teacher.backends import TransformersGenerator
        from teacher.core import propose_self_edits

        generator = TransformersGenerator(model, tokenizer, settings.device, name=settings.model)
        edits = propose_self_edits(
            generator,
            doc.passage(),
            EditFormat.IMPLICATIONS,
            settings.self_edits,
            lora,
            sampling,
            "bench",
            index,
        )
        row = {
            "key": key,
            "context": index,
            "title": doc.title,
            "generation_seconds": edits[0].generation_seconds,
            "edits": [{"text": e.text, "lines": list(e.lines)} for e in edits],
        }
        cache.append(row)
    cached = tuple(
        SelfEdit(
            id=f"bench/{index}/{i}",
            job_id="bench",
            doc_index=index,
            index=i,
            format=EditFormat.IMPLICATIONS,
            passage=doc.passage(),
            text=e["text"],
            lines=tuple(e["lines"]),
            lora=lora,
        )
        for i, e in enumerate(row["edits"])
    )
    return Context(index, doc, cached, float(row["generation_seconds"]))


# --- (a) and (b): the reference's loop on the Hugging Face Trainer ------------------------------------


@dataclass
class TrainRun:
    """One configuration's training of one or more adapters."""

    seconds: float
    steps: int
    # Tokens that are not padding, over every epoch; and every token the model processed.
    real_tokens: int
    processed_tokens: int
    final_loss: float | None


def reference_features(
    tokenizer: Any, texts: Sequence[str], pad_length: int, pad: bool
) -> list[dict[str, list[int]]]:
    """The reference's tokenization: truncated at `pad_length`, no EOS appended; with `pad`, padded to
    `pad_length` with the pad token and labels = input_ids, padding included (the loss trains on it)."""
    pad_id = _pad_id(tokenizer)
    features = []
    for text in texts:
        ids = tokenizer(text)["input_ids"][:pad_length]
        if pad:
            filler = [pad_id] * (pad_length - len(ids))
            features.append(
                {
                    "input_ids": ids + filler,
                    "attention_mask": [1] * len(ids) + [0] * len(filler),
                    "labels": ids + filler,
                }
            )
        else:
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return features


def _pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def dynamic_padding_collator(pad_id: int) -> Callable[[list[dict[str, list[int]]]], dict[str, Any]]:
    """Pad a batch to its longest sequence, the padding masked out of the loss (labels -100)."""
    import torch

    from student.sequences import pad_batch

    def collate(features: list[dict[str, list[int]]]) -> dict[str, Any]:
        input_ids, attention_mask, labels = pad_batch([f["input_ids"] for f in features], pad_id)
        return {
            "input_ids": torch.tensor(input_ids),
            "attention_mask": torch.tensor(attention_mask),
            "labels": torch.tensor(labels),
        }

    return collate


def train_with_trainer(
    model: Any, tokenizer: Any, texts: Sequence[str], settings: Settings, pad: bool
) -> tuple[Any, TrainRun]:
    """(a) with `pad`, else (b): a fresh PEFT model on the resident base, trained by the Hugging Face
    Trainer with its defaults. Returns the PEFT model (the caller unloads it) and the run."""
    import torch
    from peft import get_peft_model
    from transformers import PrinterCallback, Trainer, TrainingArguments, default_data_collator

    from student.training import lora_config

    lora = settings.lora("a" if pad else "b")
    started = time.perf_counter()
    torch.manual_seed(lora.seed)
    peft_model = get_peft_model(model, lora_config(model, lora))
    features = reference_features(tokenizer, texts, settings.pad_length, pad)
    with tempfile.TemporaryDirectory(prefix="seal-trainer-") as workdir:
        args = TrainingArguments(
            output_dir=workdir,
            per_device_train_batch_size=lora.batch_size,
            num_train_epochs=lora.epochs,
            learning_rate=lora.learning_rate,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=settings.device == "cpu",
            seed=lora.seed,
        )
        collator = default_data_collator if pad else dynamic_padding_collator(_pad_id(tokenizer))
        trainer = Trainer(model=peft_model, args=args, train_dataset=features, data_collator=collator)
        # With tqdm off, the Trainer prints its final metrics dict; the bench logs its own line.
        trainer.remove_callback(PrinterCallback)
        output = trainer.train()
    _sync(settings.device)
    seconds = time.perf_counter() - started
    peft_model.eval()
    real = sum(sum(f["attention_mask"]) for f in features) * lora.epochs
    processed = sum(len(f["input_ids"]) for f in features) * lora.epochs
    return peft_model, TrainRun(
        seconds, int(output.global_step), real, processed, float(output.training_loss)
    )


# --- (c): ours -----------------------------------------------------------------------------------------


BATCHED = "student.multi.train_adapters"
SINGLE = "student.training.train_adapter"


def ours_trainer(choice: str) -> str:
    """The trainer (c) runs: "batched" is student.multi (K adapters in one pass), "single"
    student.training.train_adapter (one after another), "auto" the first where student.multi exists."""
    try:
        import student.multi  # noqa: F401
    except ImportError:
        if choice == "batched":
            raise ValueError("--ours-trainer batched needs student.multi, which is not importable") from None
        return SINGLE
    return SINGLE if choice == "single" else BATCHED


def train_ours(
    model: Any, tokenizer: Any, context: Context, settings: Settings, trainer: str
) -> Generator[tuple[int, Any, TrainRun], None, None]:
    """(c)'s training of one context's self-edits: yields (edit index, a PeftModel answering with that
    adapter, the run). The model is valid until the next item; close the generator when done.

    BATCHED trains all K adapters in one pass and charges each a K-th of its wall time; SINGLE trains
    them one after another."""
    from student.sequences import build_training_texts
    from student.training import release_adapter, tokenize_texts, train_adapter

    lora = settings.lora("c")
    jobs = [(build_training_texts(edit), lora) for edit in context.edits]
    lengths = [[len(ids) for ids in tokenize_texts(tokenizer, texts, lora.max_seq_len)] for texts, _ in jobs]
    if trainer == SINGLE:
        for i, (texts, _) in enumerate(jobs):
            started = time.perf_counter()
            peft_model, stats = train_adapter(model, tokenizer, texts, lora)
            _sync(settings.device)
            real = sum(lengths[i]) * lora.epochs
            run = TrainRun(time.perf_counter() - started, stats.steps, real, real, _last(stats.losses))
            try:
                yield i, peft_model, run
            finally:
                release_adapter(peft_model)
        return

    from student.multi import attached_in_turn, train_adapters

    started = time.perf_counter()
    results = train_adapters(model, tokenizer, jobs)
    _sync(settings.device)
    seconds = (time.perf_counter() - started) / len(jobs)
    processed = batched_processed_tokens(lengths, lora)
    # A generator (closing it detaches the adapters), though student.multi annotates it as an Iterator.
    in_turn = cast(Generator[tuple[int, Any], None, None], attached_in_turn(model, [a for a, _ in results]))
    with closing(in_turn) as views:
        for i, peft_model in views:
            stats = results[i][1]
            run = TrainRun(
                seconds, stats.steps, sum(lengths[i]) * lora.epochs, processed[i], _last(stats.losses)
            )
            yield i, peft_model, run


def batched_processed_tokens(lengths: Sequence[Sequence[int]], lora: LoraSettings) -> list[int]:
    """Tokens each adapter's rows occupy in student.multi's padded micro-batches (a row counts its
    micro-batch's width), by replaying its seeded batches and length bucketing."""
    from student.multi import MAX_TOKENS, length_buckets
    from student.sequences import batches

    streams = [batches(list(ls), lora.batch_size, lora.seed, lora.epochs) for ls in lengths]
    steps = [lora.epochs * -(-len(ls) // lora.batch_size) for ls in lengths]
    processed = [0] * len(lengths)
    for step in range(max(steps, default=0)):
        rows = [(n, k) for k in range(len(lengths)) if step < steps[k] for n in next(streams[k])]
        for bucket in length_buckets([n for n, _ in rows], MAX_TOKENS):
            width = max(rows[i][0] for i in bucket)
            for i in bucket:
                processed[rows[i][1]] += width
    return processed


def _last(losses: Sequence[float]) -> float | None:
    return losses[-1] if losses else None


# --- one run ---------------------------------------------------------------------------------------------


def row_key(row: dict[str, Any]) -> str:
    return f"{row['kind']}|{row.get('config', '')}|{row.get('context', '')}|{row.get('edit', '')}|{row['digest']}"


@dataclass
class InnerLoopBench:
    """One output folder: rows.jsonl (every measurement as it lands), self_edits.jsonl (the teacher's
    cached self-edits), adapters/ ((c)'s adapters for the answerer table), inner_loop.json, table.md."""

    out: Path
    settings: Settings
    model: Any
    tokenizer: Any
    model_dir: Path
    answerers: dict[str, Answerer] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows = JsonlLog(self.out / "rows.jsonl", row_key)
        self.edit_cache = JsonlLog(self.out / "self_edits.jsonl", lambda r: str(r["key"]))
        self.memory = MemoryMeter(self.settings.device)
        self.n_params = linear_parameters(self.model)
        self.trainer_c = ours_trainer(self.settings.ours_trainer)

    # digests: what makes a stored row reusable

    def digest(self, kind: str, config: str = "") -> str:
        s = self.settings
        data: dict[str, Any] = {"kind": kind, "model": s.model, "machine": s.machine(), "seed": s.seed}
        if kind != "peak":
            data.update(
                k=s.self_edits,
                max_new_tokens=s.max_new_tokens,
                answer=[s.answer_style, s.answer_tokens],
                # The gate decides where a served adapter applies, not what it learns (seal.gate).
                lora={k: v for k, v in asdict(s.lora(config)).items() if k != "gate"},
            )
        if kind == "peak":
            data["size"] = s.peak_size
        if config == "a":
            data["pad_length"] = s.pad_length
        if config == "c":
            data["trainer"] = self.trainer_c
            data["answer_batch"] = s.answer_batch
        return _digest(data)

    # the run

    def run(self, docs: Sequence[tuple[int, Document]]) -> dict[str, Any]:
        s = self.settings
        peak = self._peak()
        self.log(
            f"matmul peak: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({s.dtype}, {peak['threads']} threads)"
        )
        contexts = [self._context(index, doc) for index, doc in docs]
        for ctx in contexts:
            self._base(ctx)
        # Context by context, the configurations back to back: on a shared machine whose load drifts,
        # (b) and (c) of a context then run minutes apart, not an hour.
        order = [c for c in ("c", "b", "a") if c not in s.skip]
        for ctx in contexts:
            for config in order:
                self._config(config, ctx)
                self.write_outputs(contexts)
        self._answerer_table(contexts)
        return self.write_outputs(contexts)

    def _peak(self) -> dict[str, Any]:
        key = row_key({"kind": "peak", "digest": self.digest("peak")})
        if (row := self.rows.get(key)) is None:
            s = self.settings
            row = {
                "kind": "peak",
                "digest": self.digest("peak"),
                **measure_matmul_peak(s.device, s.dtype, s.peak_size),
            }
            self.rows.append(row)
        return row

    def _context(self, index: int, doc: Document) -> Context:
        started = time.perf_counter()
        ctx = generate_self_edits(self.model, self.tokenizer, doc, index, self.settings, self.edit_cache)
        if time.perf_counter() - started > 1:
            self.log(
                f"context {index} ({doc.title}): {len(ctx.edits)} self-edits, "
                f"{ctx.generation_seconds:.1f} s of generation each"
            )
        return ctx

    def _base(self, ctx: Context) -> dict[str, Any]:
        """The base model's accuracy on the context's questions (batched), shared by every configuration."""
        digest = self.digest("base")
        key = row_key({"kind": "base", "context": ctx.index, "digest": digest})
        if (row := self.rows.get(key)) is None:
            responses, seconds = self._answer(self.model, ctx, self.settings.answer_batch)
            row = {"kind": "base", "context": ctx.index, "digest": digest, "seconds": seconds}
            row.update(self._grade(ctx, responses))
            self.rows.append(row)
        return row

    def _answer(self, model: Any, ctx: Context, batch_size: int) -> tuple[list[str], float]:
        """`model`'s answers to the context's questions, and the seconds they took."""
        started = time.perf_counter()
        responses = answer(
            model, self.tokenizer, ctx.prompts(self.settings.answer_style), self.settings, batch_size
        )
        _sync(self.settings.device)
        return responses, time.perf_counter() - started

    def _grade(self, ctx: Context, responses: Sequence[str]) -> dict[str, Any]:
        from auditor.grading import grade_answer

        scores = [
            grade_answer(qa.question, qa.answer, r)
            for qa, r in zip(ctx.doc.questions, responses, strict=True)
        ]
        correct = sum(sc.correct for sc in scores)
        return {
            "correct": correct,
            "questions": len(scores),
            "accuracy": correct / len(scores) if scores else 0.0,
            "responses": list(responses),
        }

    def _done(self, config: str, ctx: Context, edit: int) -> bool:
        row = {"kind": "edit", "config": config, "context": ctx.index, "edit": edit}
        return row_key({**row, "digest": self.digest("edit", config)}) in self.rows

    def _config(self, config: str, ctx: Context) -> None:
        pending = [i for i in range(len(ctx.edits)) if not self._done(config, ctx, i)]
        if not pending:
            return
        if config == "c":
            self._run_ours(ctx)
            return
        from student.sequences import build_training_texts

        for i in pending:
            self.memory.reset()
            texts = build_training_texts(ctx.edits[i])
            peft_model, run = train_with_trainer(
                self.model, self.tokenizer, texts, self.settings, pad=config == "a"
            )
            try:
                # The reference asks one question at a time.
                responses, eval_seconds = self._answer(peft_model, ctx, 1)
            finally:
                peft_model.unload()
                self.model.eval()
            self._record(config, ctx, i, run, eval_seconds, responses)

    def _run_ours(self, ctx: Context) -> None:
        """(c) on every self-edit of the context (a batched trainer trains them together, so they are
        redone together), each adapter saved for the answerer table."""
        self.memory.reset()
        with closing(train_ours(self.model, self.tokenizer, ctx, self.settings, self.trainer_c)) as trained:
            for i, model, run in trained:
                responses, eval_seconds = self._answer(model, ctx, self.settings.answer_batch)
                model.save_pretrained(str(self._adapter_dir(ctx.index, i)))
                self._record("c", ctx, i, run, eval_seconds, responses)
        self.model.eval()

    def _adapter_dir(self, context: int, edit: int) -> Path:
        return self.out / "adapters" / self.digest("edit", "c") / f"{context}-{edit}"

    def _record(
        self, config: str, ctx: Context, edit: int, run: TrainRun, eval_seconds: float, responses: list[str]
    ) -> None:
        base = self._base(ctx)
        graded = self._grade(ctx, responses)
        row = {
            "kind": "edit",
            "config": config,
            "context": ctx.index,
            "edit": edit,
            "digest": self.digest("edit", config),
            "generation_seconds": ctx.generation_seconds,
            "train_seconds": run.seconds,
            "eval_seconds": eval_seconds,
            "steps": run.steps,
            "real_tokens": run.real_tokens,
            "processed_tokens": run.processed_tokens,
            "final_loss": run.final_loss,
            **graded,
            "base_accuracy": base["accuracy"],
            "reward": graded["accuracy"] - base["accuracy"],
            "trainer": self.trainer_c if config == "c" else "transformers.Trainer",
            **self.memory.peak(),
            "finished_at": time.time(),
        }
        self.rows.append(row)
        self.log(
            f"({config}) context {ctx.index} edit {edit}: train {run.seconds:.1f} s ({run.steps} steps, "
            f"{run.real_tokens} real / {run.processed_tokens} processed tokens), eval {eval_seconds:.1f} s, "
            f"{graded['correct']}/{graded['questions']} correct (base {base['correct']}), "
            f"peak RSS {row['rss_peak_mib']:.0f} MiB"
        )

    # the answerer table

    def _answerer_table(self, contexts: Sequence[Context]) -> None:
        """Every answerer on the base and each of (c)'s saved adapters, per context."""
        if "c" in self.settings.skip:
            return
        for name, answerer in self.all_answerers().items():
            for ctx in contexts:
                digest = self.digest(f"eval:{name}")
                key = row_key({"kind": "eval", "config": name, "context": ctx.index, "digest": digest})
                if key in self.rows:
                    continue
                prompts = ctx.prompts(self.settings.answer_style)
                targets: list[Path | None] = [
                    None,
                    *(self._adapter_dir(ctx.index, i) for i in range(len(ctx.edits))),
                ]
                started = time.perf_counter()
                # An answerer that can (the vLLM one) asks every model at once: batched across adapters.
                many = getattr(answerer, "answer_many", None)
                answers = many(prompts, targets) if many else [answerer(prompts, t) for t in targets]
                _sync(self.settings.device)
                seconds = time.perf_counter() - started
                self.rows.append(
                    {
                        "kind": "eval",
                        "config": name,
                        "context": ctx.index,
                        "digest": digest,
                        "questions": len(prompts) * len(targets),
                        "models": len(targets),
                        "seconds": seconds,
                        "answers": answers,
                    }
                )
                self.log(
                    f"answerer {name}, context {ctx.index}: {len(prompts) * len(targets)} answers in {seconds:.1f} s"
                )

    def all_answerers(self) -> dict[str, Answerer]:
        s = self.settings
        return {
            "transformers (one at a time)": TransformersAnswerer(self.model, self.tokenizer, s, 1),
            f"transformers (batched, {s.answer_batch})": TransformersAnswerer(
                self.model, self.tokenizer, s, s.answer_batch
            ),
            **self.answerers,
        }

    # outputs

    def summary(self, contexts: Sequence[Context]) -> dict[str, Any]:
        return summarize(
            list(self.rows.rows.values()),
            self.settings,
            {c: self.digest("edit", c) for c in CONFIGS},
            {name: self.digest(f"eval:{name}") for name in self.all_answerers()},
            self.digest("peak"),
            self.n_params,
            contexts=[
                {"index": c.index, "title": c.doc.title, "questions": len(c.doc.questions)} for c in contexts
            ],
            trainer_c=self.trainer_c,
            answerers_given=sorted(self.answerers),
            golds={c.index: [qa.answer for qa in c.doc.questions] for c in contexts},
            base_digest=self.digest("base"),
        )

    def write_outputs(self, contexts: Sequence[Context]) -> dict[str, Any]:
        data = self.summary(contexts)
        report.write_json(self.out / "inner_loop.json", data)
        report.write_text_atomic(self.out / "table.md", markdown_tables(data))
        return data


# --- summary and tables (pure) ----------------------------------------------------------------------


def summarize(
    rows: Sequence[dict[str, Any]],
    settings: Settings,
    edit_digests: dict[str, str],
    eval_digests: dict[str, str],
    peak_digest: str,
    n_params: int,
    contexts: Sequence[dict[str, Any]] = (),
    trainer_c: str = "",
    answerers_given: Sequence[str] = (),
    golds: dict[int, list[str]] | None = None,
    base_digest: str = "",
) -> dict[str, Any]:
    """inner_loop.json from the rows of this run's settings; with `golds` (each context's gold
    answers) and the base rows' digest, every self-edit also gets an F1 reward."""
    rows = with_f1_rewards(rows, golds or {}, base_digest)
    peak = next((r for r in rows if r["kind"] == "peak" and r["digest"] == peak_digest), None)
    peak_flops = peak["flops_per_s"] if peak else 0.0
    configs = {}
    for config in CONFIGS:
        mine = sorted(
            (
                r
                for r in rows
                if r["kind"] == "edit" and r.get("config") == config and r["digest"] == edit_digests[config]
            ),
            key=lambda r: (r["context"], r["edit"]),
        )
        configs[config] = summarize_config(config, mine, settings, n_params, peak_flops)
    if trainer_c:
        configs["c"]["trainer"] = trainer_c
    return {
        "benchmark": "seal bench inner-loop",
        "settings": {**asdict(settings), "lora": asdict(settings.lora())},
        "flops_formula": FLOPS_FORMULA,
        "n_params": n_params,
        "matmul_peak": peak,
        "contexts": list(contexts),
        "configs": configs,
        "ratios": ratios(configs),
        "rank_correlation": rank_correlations(configs),
        "targets": TARGETS,
        "answerers": summarize_answerers(rows, eval_digests, answerers_given),
        "written_at": time.time(),
    }


def mean_f1(responses: Sequence[str], golds: Sequence[str]) -> float:
    """Mean SQuAD token F1 of responses against their golds."""
    from auditor.grading import token_f1

    pairs = list(zip(responses, golds, strict=True))
    return sum(token_f1(r, g) for r, g in pairs) / len(pairs) if pairs else 0.0


def with_f1_rewards(
    rows: Sequence[dict[str, Any]], golds: dict[int, list[str]], base_digest: str
) -> list[dict[str, Any]]:
    """Edit rows of contexts with golds and a base row gain "reward_f1": mean token F1 after minus
    before. Graded by "contains", a 135M student often scores 0 before and after on every self-edit;
    F1 still orders them by how close their answers came."""
    base = {
        r["context"]: mean_f1(r["responses"], golds[r["context"]])
        for r in rows
        if r["kind"] == "base" and r["digest"] == base_digest and r["context"] in golds
    }
    return [
        {**r, "reward_f1": mean_f1(r["responses"], golds[r["context"]]) - base[r["context"]]}
        if r["kind"] == "edit" and r["context"] in base
        else r
        for r in rows
    ]


def summarize_config(
    config: str, rows: Sequence[dict[str, Any]], settings: Settings, n_params: int, peak_flops: float
) -> dict[str, Any]:
    """One configuration's figures: per self-edit means, self-edits per hour, utilization, memory, rewards."""
    label = LABELS[config].format(pad=settings.pad_length)
    if not rows:
        status = "skipped (--skip)" if config in settings.skip else "not run yet"
        return {"label": label, "status": status, "self_edits": 0}
    n = len(rows)
    gen, measured, ev = (
        sum(r[k] for r in rows) / n for k in ("generation_seconds", "train_seconds", "eval_seconds")
    )
    # (a) run for fewer epochs: its training time scaled to the full epochs (see Settings).
    train = measured * settings.epochs / settings.epochs_for(config)
    train_total = sum(r["train_seconds"] for r in rows)
    real = sum(r["real_tokens"] for r in rows)
    processed = sum(r["processed_tokens"] for r in rows)
    out: dict[str, Any] = {
        "label": label,
        "status": "complete" if n == settings.contexts * settings.self_edits else f"partial ({n} self-edits)",
        "self_edits": n,
        "epochs_trained": settings.epochs_for(config),
        "seconds_per_self_edit": {
            "generation": gen,
            "training": train,
            "evaluation": ev,
            "total": gen + train + ev,
        },
        "self_edits_per_hour": 3600 / (gen + train + ev),
        "self_edits_per_hour_inner_loop": 3600 / (train + ev),
        "steps": sum(r["steps"] for r in rows),
        "real_tokens": real,
        "processed_tokens": processed,
        "train_flops_real": lora_training_flops(n_params, real),
        "mfu": utilization(lora_training_flops(n_params, real), train_total, peak_flops),
        "utilization_processed_tokens": utilization(
            lora_training_flops(n_params, processed), train_total, peak_flops
        ),
        "real_tokens_per_s": real / train_total if train_total > 0 else None,
        "rss_peak_mib": max(r["rss_peak_mib"] for r in rows),
        "mean_reward": sum(r["reward"] for r in rows) / n,
        "rewards": {f"{r['context']}-{r['edit']}": r["reward"] for r in rows},
        "per_self_edit": [
            {
                k: r[k]
                for k in (
                    "context",
                    "edit",
                    "train_seconds",
                    "eval_seconds",
                    "steps",
                    "real_tokens",
                    "processed_tokens",
                    "final_loss",
                    "correct",
                    "questions",
                    "reward",
                    "rss_peak_mib",
                )
            }
            for r in rows
        ],
    }
    if all("reward_f1" in r for r in rows):
        out["mean_reward_f1"] = sum(r["reward_f1"] for r in rows) / n
        out["rewards_f1"] = {f"{r['context']}-{r['edit']}": r["reward_f1"] for r in rows}
    if train != measured:
        out["training_extrapolated"] = (
            f"trained {settings.epochs_for(config)} of the {settings.epochs} epochs, {measured:.1f} s per "
            f"self-edit, its training time scaled to {settings.epochs} epochs; MFU from the measured run; "
            f"rewards after {settings.epochs_for(config)} epoch(s)"
        )
    if any("cuda_peak_mib" in r for r in rows):
        out["cuda_peak_mib"] = max(r.get("cuda_peak_mib", 0.0) for r in rows)
    return out


def ratios(configs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """(c) over (a) and over (b) in self-edits per hour, with generation and without it."""
    out: dict[str, float | None] = {}
    for other in ("a", "b"):
        for key, suffix in (("self_edits_per_hour", ""), ("self_edits_per_hour_inner_loop", "_inner_loop")):
            c, o = configs["c"].get(key), configs[other].get(key)
            out[f"c_over_{other}{suffix}"] = c / o if c and o else None
    return out


def rank_correlations(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Spearman's rho between the reward orderings of two configurations, over the self-edits both ran."""
    out: dict[str, Any] = {}
    for x, y in (("c", "b"), ("c", "a"), ("b", "a")):
        entry: dict[str, Any] = {}
        for suffix in ("", "_f1"):
            rx, ry = configs[x].get(f"rewards{suffix}", {}), configs[y].get(f"rewards{suffix}", {})
            shared = sorted(set(rx) & set(ry))
            rho = spearman([rx[k] for k in shared], [ry[k] for k in shared]) if len(shared) >= 2 else None
            entry[f"spearman{suffix}"] = rho
            entry[f"pairs{suffix}"] = len(shared)
            if rho is None:
                entry[f"why_none{suffix}"] = (
                    "fewer than 2 self-edits in both"
                    if len(shared) < 2
                    else "one side's rewards are all equal"
                )
        out[f"{x}_vs_{y}"] = entry
    return out


def summarize_answerers(
    rows: Sequence[dict[str, Any]], digests: dict[str, str], given: Sequence[str]
) -> list[dict[str, Any]]:
    """Questions per second of each answerer on the same adapters, and how often it gives the first
    answerer's answer."""
    out = []
    reference: list[Any] | None = None
    for name, digest in digests.items():
        mine = sorted(
            (r for r in rows if r["kind"] == "eval" and r.get("config") == name and r["digest"] == digest),
            key=lambda r: r["context"],
        )
        if not mine:
            out.append({"answerer": name, "status": "not run yet"})
            continue
        answers = [a for r in mine for per_model in r["answers"] for a in per_model]
        questions = sum(r["questions"] for r in mine)
        seconds = sum(r["seconds"] for r in mine)
        entry: dict[str, Any] = {
            "answerer": name,
            "status": "run",
            "contexts": len(mine),
            "questions": questions,
            "seconds": seconds,
            "questions_per_s": questions / seconds if seconds > 0 else None,
        }
        if reference is None:
            reference = answers
        elif len(reference) == len(answers):
            entry["agreement_with_first"] = sum(
                x == y for x, y in zip(reference, answers, strict=True)
            ) / len(answers)
        out.append(entry)
    if VLLM not in given:
        out.append(
            {
                "answerer": VLLM,
                "status": "not run",
                "why": "no vLLM answerer given: pass --answerer vllm=MODULE:FUNCTION, a function of "
                "(model_dir, settings) returning an answerer (seal.bench.inner_loop.Answerer)",
            }
        )
    return out


def _f(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def markdown_tables(data: dict[str, Any]) -> str:
    """The two printed tables: configurations (with ratios, utilization, rank correlation) and answerers."""
    s = data["settings"]
    peak = data["matmul_peak"]
    lines = [
        f"## Inner loop, {s['contexts']} contexts × {s['self_edits']} self-edits, {s['epochs']} epochs, "
        f"{s['model']} ({s['device']}, {s['dtype']})",
        "",
        "| configuration | self-edits/h | inner loop only /h | s per self-edit: gen / train / eval | MFU (real tokens) | util. incl. padding | tokens real / processed | peak RSS MiB | mean reward: accuracy / F1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in data["configs"].values():
        if not c["self_edits"]:
            lines.append(f"| {c['label']} | {c['status']} | | | | | | | |")
            continue
        sp = c["seconds_per_self_edit"]
        lines.append(
            f"| {c['label']} | {c['self_edits_per_hour']:.1f} | {c['self_edits_per_hour_inner_loop']:.1f} "
            f"| {sp['generation']:.1f} / {sp['training']:.1f} / {sp['evaluation']:.1f} "
            f"| {_f(c['mfu'], '{:.2%}')} | {_f(c['utilization_processed_tokens'], '{:.2%}')} "
            f"| {c['real_tokens']:,} / {c['processed_tokens']:,} | {c['rss_peak_mib']:.0f} "
            f"| {c['mean_reward']:+.3f} / {_f(c.get('mean_reward_f1'), '{:+.3f}')} |"
        )
    notes = [
        f"{c['label']}: {c['training_extrapolated']}."
        for c in data["configs"].values()
        if "training_extrapolated" in c
    ]
    r = data["ratios"]
    rho = data["rank_correlation"]["c_vs_b"]
    t = data["targets"]
    c_mfu = data["configs"]["c"].get("mfu")
    lines += [
        "",
        *notes,
        f"(c)/(a): {_f(r['c_over_a'], '{:.1f}×')} self-edits per hour (target ≥ {t['c_over_a']:.0f}×; "
        f"inner loop only {_f(r['c_over_a_inner_loop'], '{:.1f}×')}); "
        f"(c)/(b): {_f(r['c_over_b'], '{:.1f}×')} (target ≥ {t['c_over_b']:.0f}×; inner loop only "
        f"{_f(r['c_over_b_inner_loop'], '{:.1f}×')}).",
        f"(c)'s training MFU: {_f(c_mfu, '{:.1%}')} of the measured matmul peak (target ≥ {t['mfu']:.0%}). "
        f"Spearman ρ of (c)'s and (b)'s rewards over {rho['pairs']} self-edits: "
        f"{_f(rho['spearman'], '{:+.2f}')} by accuracy"
        + (f" ({rho['why_none']})" if rho["spearman"] is None else "")
        + f", {_f(rho.get('spearman_f1'), '{:+.2f}')} by token F1"
        + (f" ({rho['why_none_f1']})" if rho.get("spearman_f1") is None else "")
        + ".",
        f"Matmul peak: {_f(peak and peak['flops_per_s'] / 1e9, '{:.1f}')} GFLOP/s "
        f"({peak['size'] if peak else '?'}² {s['dtype']} matmuls, {peak['threads'] if peak else '?'} threads, best of "
        f"{peak['trials'] if peak else '?'}). FLOPs: {data['flops_formula']} N = {data['n_params']:,}.",
        "",
        "### Evaluation backends on (c)'s adapters (the base and every adapter, each context's questions)",
        "",
        "| answerer | answers | seconds | questions/s | same answer as the first |",
        "|---|---|---|---|---|",
    ]
    for a in data["answerers"]:
        if a["status"] != "run":
            lines.append(f"| {a['answerer']} | {a['status']}{': ' + a['why'] if 'why' in a else ''} | | | |")
            continue
        lines.append(
            f"| {a['answerer']} | {a['questions']} | {a['seconds']:.1f} | {_f(a['questions_per_s'], '{:.2f}')} "
            f"| {_f(a.get('agreement_with_first'), '{:.0%}')} |"
        )
    return "\n".join(lines) + "\n"


# --- the command ---------------------------------------------------------------------------------------


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        model=args.model,
        contexts=args.contexts,
        self_edits=args.self_edits,
        epochs=args.epochs,
        reference_epochs=args.reference_epochs,
        pad_length=args.pad_length,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        answer_style=args.answer_style,
        answer_tokens=args.answer_tokens,
        answer_batch=args.answer_batch,
        peak_size=args.peak_size,
        ours_trainer=args.ours_trainer,
        skip=tuple(x.strip() for x in args.skip.split(",") if x.strip()),
    )


def run_bench(
    settings: Settings,
    out: Path,
    docs: Sequence[tuple[int, Document]],
    factories: dict[str, AnswererFactory] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Load the model, run every configuration (resuming from `out`), write and return the summary."""
    import torch

    from seal.models import load_model, resolve_model

    if settings.threads:
        torch.set_num_threads(settings.threads)
    model_dir = resolve_model(settings.model)
    model, tokenizer = load_model(model_dir, device=settings.device, dtype=settings.dtype)
    answerers = {name: factory(model_dir, settings) for name, factory in (factories or {}).items()}
    bench = InnerLoopBench(out, settings, model, tokenizer, model_dir, answerers, log)
    log(f"(c) trains with {bench.trainer_c}; {torch.get_num_threads()} torch threads; -> {out}")
    return bench.run(docs)


def cmd_inner_loop(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    factories = dict(load_answerer_factory(spec) for spec in args.answerer)
    items = load_training_items(args.data, settings.contexts, settings.seed)
    data = run_bench(settings, args.out, [(item.index, item.doc) for item in items], factories)
    print(markdown_tables(data))
    return 0


def add_inner_loop_command(sub: Any) -> None:
    p = sub.add_parser(
        "inner-loop",
        help="self-edits per hour: the SEAL reference's loop against ours, MFU, memory (resumable)",
    )
    defaults = Settings()
    p.add_argument("--out", type=Path, default=Path("bench-out/inner-loop"), help="results folder (resumed)")
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--data", type=Path, default=default_data_dir(), help="the knowledge data folder")
    p.add_argument("--contexts", type=int, default=defaults.contexts, help="SQuAD training passages")
    p.add_argument("--self-edits", type=int, default=defaults.self_edits, help="per context")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="the reference: 10")
    p.add_argument(
        "--reference-epochs",
        type=int,
        default=defaults.reference_epochs,
        help="(a) alone for fewer epochs, its training time scaled to --epochs (0: --epochs)",
    )
    p.add_argument(
        "--pad-length", type=int, default=defaults.pad_length, help="(a)'s padding (the reference: 2048)"
    )
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (0: torch's default)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=defaults.dtype)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="per self-edit")
    p.add_argument("--answer-style", choices=("chat", "reference"), default=defaults.answer_style)
    p.add_argument("--answer-tokens", type=int, default=defaults.answer_tokens)
    p.add_argument("--answer-batch", type=int, default=defaults.answer_batch, help="(c)'s answering batch")
    p.add_argument(
        "--peak-size", type=int, default=defaults.peak_size, help="side of the peak's square matmuls"
    )
    p.add_argument(
        "--ours-trainer",
        choices=("auto", "batched", "single"),
        default=defaults.ours_trainer,
        help="(c): student.multi's batched pass, train_adapter one by one, or auto (batched where it exists)",
    )
    p.add_argument("--skip", default="", help="configurations to leave out, e.g. a,b")
    p.add_argument(
        "--answerer",
        action="append",
        default=[],
        help="NAME=MODULE:FUNCTION, an extra evaluation backend (e.g. vllm=...); repeatable",
    )
    p.set_defaults(func=cmd_inner_loop)
