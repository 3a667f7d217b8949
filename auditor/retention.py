"""What an update costs the model outside its passage: a retention set and a KL shift on general prompts.

Two yardsticks, both measured before and after an adapter (the "before" halves depend only on the
base model, so callers compute them once per base and cache them):
- retention accuracy: short general-knowledge questions the base model answers correctly, asked in
  the auditor's chat style and graded "contains". The set in data/retention.json was filtered on the
  default model (its fingerprint is in the file), so the base scores 1.0 there and any drop is the
  update's doing. Greedy decoding makes the base's own run-to-run noise zero.
- KL shift: mean per-token KL(base || adapted) over the base model's own greedy continuations of
  general prompts. It sees changes of behaviour that have not (yet) flipped an answer.

Neither set is ever trained on: the student's replay and KL penalty use their own, disjoint prompts
(student/data/general_prompts.json).

`python -m auditor.retention build --out auditor/data/retention.json` rebuilds the retention set from
the candidates in data/retention_candidates.json by asking the model; see `build_retention_set`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditor.evaluation import VLLMModel, cut_answer, style_prompt, vllm_answers
from auditor.grading import answer_contained, grade_answer, normalize_answer
from seal.models import render_prompt
from seal.records import QA

DATA_DIR = Path(__file__).resolve().parent / "data"
RETENTION_FILE = DATA_DIR / "retention.json"
CANDIDATES_FILE = DATA_DIR / "retention_candidates.json"

RETENTION_MAX_NEW_TOKENS = 48
"""New tokens an adapted model gets to say a retention answer: the auditor's chat budget for τ. A
model that now opens with "The answer to this classic question lies in..." and then says it still
knows it (that change of manner is what the KL shift measures). Cheap all the same: an answer stops
as soon as it contains its gold (`answer_until_gold`)."""
FILTER_MAX_NEW_TOKENS = 16
"""The base model must say each gold within this many tokens to enter the set, which keeps its own
answers short and leaves room for an adapted model to say more."""
RETENTION_BATCH_SIZE = 128
"""The whole set in one batch: rows leave it as they settle, and every decoding step has a fixed cost
(the layers' Python), so one batch of answers beats two."""
RETENTION_SIZE = 104
"""Questions the builder picks (round robin over topics); a few may drop out while the set settles,
and at least 100 must stay. One question is about 1 % of retention accuracy."""
KL_MAX_NEW_TOKENS = 16
"""Tokens of each base continuation the KL is measured on."""


# --- the data ----------------------------------------------------------------------------------------


def load_retention_set(path: Path = RETENTION_FILE) -> tuple[QA, ...]:
    """The filtered retention questions, each with the gold its base answer contains."""
    data = json.loads(path.read_text())
    return tuple(QA(q["question"], q["answer"]) for q in data["questions"])


def load_kl_prompts(path: Path = RETENTION_FILE) -> tuple[str, ...]:
    """The auditor's general prompts for the KL shift (never the student's)."""
    return tuple(json.loads(path.read_text())["kl_prompts"])


# --- retention accuracy ------------------------------------------------------------------------------


def retention_accuracy(
    model: Any,
    tokenizer: Any,
    questions: Sequence[QA] | None = None,
    style: str = "chat",
    max_new_tokens: int = RETENTION_MAX_NEW_TOKENS,
    batch_size: int = RETENTION_BATCH_SIZE,
) -> float:
    """Accuracy on `questions` (default: the retention set), asked in `style` without a topic.

    Always "contains" and never the judge, as for τ's anchors: a chatty but right answer counts.
    The default model scores exactly 1.0 on the shipped set (it was filtered so, in these batches).
    """
    questions = load_retention_set() if questions is None else tuple(questions)
    correct = retention_correct(model, tokenizer, questions, style, max_new_tokens, batch_size)
    return sum(correct) / len(correct) if correct else 0.0


def retention_correct(
    model: Any,
    tokenizer: Any,
    questions: Sequence[QA],
    style: str = "chat",
    max_new_tokens: int = RETENTION_MAX_NEW_TOKENS,
    batch_size: int = RETENTION_BATCH_SIZE,
) -> list[bool]:
    """Whether each of `questions` is answered right, as `retention_accuracy` grades it."""
    prompts = [style_prompt(qa.question, style) for qa in questions]
    golds = [(qa.answer,) for qa in questions]
    responses = answer_until_gold(model, tokenizer, prompts, golds, max_new_tokens, batch_size, style)
    scores = [grade_answer(qa.question, qa.answer, r) for qa, r in zip(questions, responses, strict=True)]
    return [s.correct for s in scores]


def answer_until_gold(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    golds: Sequence[Sequence[str]],
    max_new_tokens: int = RETENTION_MAX_NEW_TOKENS,
    batch_size: int = RETENTION_BATCH_SIZE,
    style: str = "chat",
) -> list[str]:
    """Greedy answers to `prompts` as `auditor.evaluation.answer_questions` gives them, except that each
    stops as soon as it contains one of its `golds` ("contains" grading then reads the same).

    The decoding loop is our own so that a settled row leaves the batch (its cache rows are dropped):
    an audit pays for the answers still being written, not for the longest one. Without a gold ever
    said, an answer equals `answer_questions`' (a test holds them equal).
    """
    texts = [prompt if style == "reference" else render_prompt(tokenizer, prompt) for prompt in prompts]
    if isinstance(model, VLLMModel):
        # vLLM decodes every answer in full (no stop at the gold), which grades the same: "contains"
        # finds the gold in the full answer exactly when it would have stopped there.
        full = vllm_answers(model, tokenizer, texts, max_new_tokens, style == "reference")
        return [cut_answer(a, style) for a in full]
    answers: list[str] = []
    for start in range(0, len(texts), batch_size):
        end = start + batch_size
        answers += _answer_batch(model, tokenizer, texts[start:end], golds[start:end], max_new_tokens, style)
    return answers


def _answer_batch(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    golds: Sequence[Sequence[str]],
    max_new_tokens: int,
    style: str,
) -> list[str]:
    import torch

    # As answer_questions: the reference style is raw text with the tokenizer's own special tokens.
    rows = [tokenizer(t, add_special_tokens=style == "reference")["input_ids"] for t in texts]
    # Every prompt opens with the same chat preamble (SmolLM's system line: 24 of ~37 tokens); it is
    # run once and its cache shared, and only the rest of each prompt is left-padded behind it.
    shared = _common_prefix_length(rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r) - shared for r in rows)
    suffix = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), shared + width), dtype=torch.long)
    for i, r in enumerate(rows):
        suffix[i, width - (len(r) - shared) :] = torch.tensor(r[shared:], dtype=torch.long)
        mask[i, :shared] = 1
        mask[i, shared + width - (len(r) - shared) :] = 1
    suffix, mask = suffix.to(model.device), mask.to(model.device)
    stops = _stop_ids(model, tokenizer)
    tokens: list[list[int]] = [[] for _ in texts]
    active = list(range(len(texts)))  # batch rows still answering, in cache order
    with torch.inference_mode():
        cache = _prefix_cache(model, rows[0][:shared], len(rows))
        out = model(
            input_ids=suffix,
            attention_mask=mask,
            position_ids=_positions(mask)[:, shared:],
            past_key_values=cache,
            logits_to_keep=1,
        )
        for step in range(max_new_tokens):
            next_ids = out.logits[:, -1].argmax(-1)
            going = []
            for i, (row, token) in enumerate(zip(active, next_ids.tolist(), strict=True)):
                if token in stops:
                    continue
                tokens[row].append(token)
                if not _settled(tokenizer.decode(tokens[row], skip_special_tokens=True), golds[row], style):
                    going.append(i)
            if not going or step == max_new_tokens - 1:
                break
            # `past_key_values` rather than transformers 5's `cache`: pyproject allows transformers 4.46.
            cache = out.past_key_values
            if len(going) < len(active):
                keep = torch.tensor(going, device=mask.device)
                cache.batch_select_indices(keep)
                mask, next_ids = mask[keep], next_ids[keep]
                active = [active[i] for i in going]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            out = model(
                input_ids=next_ids[:, None],
                attention_mask=mask,
                position_ids=_positions(mask)[:, -1:],
                past_key_values=cache,
                logits_to_keep=1,
            )
    return [cut_answer(tokenizer.decode(t, skip_special_tokens=True), style) for t in tokens]


def _common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own."""
    shortest = min(len(r) for r in rows)
    n = 0
    while n < shortest - 1 and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def _prefix_cache(model: Any, prefix: Sequence[int], batch: int) -> Any:
    """The KV cache of `prefix`, run once and repeated for `batch` rows (None for no prefix)."""
    import torch

    if not prefix:
        return None
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=model.device)
    cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    cache.batch_repeat_interleave(batch)
    return cache


def _positions(mask: Any) -> Any:
    """Position ids of left-padded rows, as `generate` makes them (padding gets 1; it is masked)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


def _settled(text: str, golds: Sequence[str], style: str) -> bool:
    """Whether an answer so far already contains a gold (or, in the reference style, its line ended)."""
    answer = cut_answer(text, style)
    if style == "reference" and answer != text.strip():
        return True
    return any(answer_contained(answer, gold) for gold in golds)


# --- KL shift ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Continuation:
    """Token ids of a chat-rendered prompt and the base model's greedy continuation of it."""

    ids: tuple[int, ...]
    # ids[prompt_len:] is the continuation; the KL is measured on the positions that predict it.
    prompt_len: int


def base_continuations(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = KL_MAX_NEW_TOKENS
) -> list[Continuation]:
    """The base model's own greedy continuations of `prompts` (chat template), up to and including its
    end-of-turn token. Depends only on the base: compute once per base model and cache."""
    import torch

    texts = [render_prompt(tokenizer, p) for p in prompts]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    width = enc["input_ids"].shape[1]
    stops = _stop_ids(model, tokenizer)
    result = []
    for row, mask in zip(out.tolist(), enc["attention_mask"].tolist(), strict=True):
        prompt = [t for t, m in zip(row[:width], mask, strict=False) if m]
        result.append(Continuation(tuple(prompt + _until_stop(row[width:], stops)), len(prompt)))
    return result


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    return {i for i in ids | {tokenizer.eos_token_id} if i is not None}


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """`tokens` up to and including the first stop token (what follows is batch padding)."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens


def kl_shift(
    peft_model: Any, tokenizer: Any, sequences: Sequence[Continuation], batch_size: int = 8
) -> float:
    """Mean per-token KL(base || adapted) over the continuation tokens of `sequences`.

    The base's logits come from the same PEFT model with its adapter disabled; a fresh LoRA (B = 0)
    therefore gives exactly 0. 0.0 when there is no continuation token at all.
    """
    import torch

    if not sequences:
        return 0.0
    total, count = 0.0, 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # The shared chat preamble runs once per batch and model (its cache differs with the adapter);
    # it must end before the first position that predicts a continuation token.
    first_target = min(c.prompt_len for c in sequences) - 1
    shared = max(min(_common_prefix_length([c.ids for c in sequences]), first_target), 0)
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        ids, attention, targets = continuation_batch(batch, pad_id, peft_model.device, shared)
        prefix = batch[0].ids[:shared]
        with torch.no_grad():
            with peft_model.disable_adapter():
                cache = _prefix_cache(peft_model, prefix, len(batch))
                base = peft_model(input_ids=ids, attention_mask=attention, past_key_values=cache).logits
            cache = _prefix_cache(peft_model, prefix, len(batch))
            adapted = peft_model(input_ids=ids, attention_mask=attention, past_key_values=cache).logits
        kl = token_kl(base[targets], adapted[targets])
        total += float(kl.sum())
        count += int(kl.numel())
    return total / count if count else 0.0


def continuation_batch(
    batch: Sequence[Continuation], pad_id: int, device: Any = "cpu", shared: int = 0
) -> tuple[Any, Any, Any]:
    """The batch after its first `shared` tokens (a prefix every sequence has, run separately),
    right-padded: (input_ids, attention_mask over prefix and rest, targets). `targets` marks the
    positions of the rest whose next token is a continuation token (position t predicts t + 1)."""
    import torch

    width = max(len(c.ids) for c in batch) - shared
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), shared + width), dtype=torch.long)
    targets = torch.zeros((len(batch), width), dtype=torch.bool)
    attention[:, :shared] = 1
    for row, c in enumerate(batch):
        rest = len(c.ids) - shared
        ids[row, :rest] = torch.tensor(c.ids[shared:], dtype=torch.long)
        attention[row, shared : shared + rest] = 1
        targets[row, max(c.prompt_len - 1 - shared, 0) : rest - 1] = True
    return ids.to(device), attention.to(device), targets.to(device)


def token_kl(base_logits: Any, adapted_logits: Any) -> Any:
    """KL(p_base || p_adapted) per row of [N, vocab] logits, in float32: Σ p (log p − log q)."""
    import torch.nn.functional as F

    base = F.log_softmax(base_logits.float(), dim=-1)
    adapted = F.log_softmax(adapted_logits.float(), dim=-1)
    return F.kl_div(adapted, base, log_target=True, reduction="none").sum(-1)


# --- building the retention set ------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    question: str
    answers: tuple[str, ...]
    topic: str


def load_candidates(path: Path = CANDIDATES_FILE) -> list[Candidate]:
    """Candidates whose every gold is a real answer: not empty, not a single character, not in the question
    (a gold the question already says would be "contained" in any echo of it)."""
    data = json.loads(path.read_text())
    result = []
    for c in data["questions"]:
        question = normalize_answer(c["question"]).split()
        answers = tuple(
            a
            for a in c["answers"]
            if len(normalize_answer(a)) > 1 and not _contains(question, normalize_answer(a).split())
        )
        if answers:
            result.append(Candidate(c["question"], answers, c["topic"]))
    return result


def _contains(tokens: list[str], run: list[str]) -> bool:
    return any(tokens[i : i + len(run)] == run for i in range(len(tokens) - len(run) + 1))


def answered(
    model: Any,
    tokenizer: Any,
    candidates: Sequence[Candidate],
    max_new_tokens: int = RETENTION_MAX_NEW_TOKENS,
    style: str = "chat",
) -> list[QA]:
    """The candidates the model answers right within `max_new_tokens`, each as a QA whose gold is the
    first alias its answer contains."""
    prompts = [style_prompt(c.question, style) for c in candidates]
    golds = [c.answers for c in candidates]
    responses = answer_until_gold(
        model, tokenizer, prompts, golds, max_new_tokens, RETENTION_BATCH_SIZE, style
    )
    kept = []
    for c, response in zip(candidates, responses, strict=True):
        gold = next((a for a in c.answers if answer_contained(response, a)), None)
        if gold is not None:
            kept.append(QA(c.question, gold))
    return kept


def round_robin(questions: Sequence[QA], topics: dict[str, str], size: int) -> list[QA]:
    """Up to `size` questions, one topic at a time, so that no topic (capitals...) fills the set."""
    by_topic: dict[str, list[QA]] = {}
    for qa in questions:
        by_topic.setdefault(topics[qa.question], []).append(qa)
    picked: list[QA] = []
    while len(picked) < size and any(by_topic.values()):
        for queue in by_topic.values():
            if queue and len(picked) < size:
                picked.append(queue.pop(0))
    return picked


def build_retention_set(model: Any, tokenizer: Any, candidates: Sequence[Candidate], size: int) -> list[QA]:
    """Ask every candidate, keep those answered right within FILTER_MAX_NEW_TOKENS, pick `size` across
    topics, then re-ask the picked set as `retention_accuracy` will (same batches, its gold only) until
    every answer is right: left padding changes float rounding a little with the batch, and a near
    tie may flip."""
    topics = {c.question: c.topic for c in candidates}
    picked = round_robin(answered(model, tokenizer, candidates, FILTER_MAX_NEW_TOKENS), topics, size)
    for _ in range(5):
        as_asked = [Candidate(qa.question, (qa.answer,), topics[qa.question]) for qa in picked]
        again = answered(model, tokenizer, as_asked)
        if len(again) == len(picked):
            return again
        picked = again
    raise RuntimeError("the retention set did not settle after 5 rounds of re-asking")


def cmd_build(args: argparse.Namespace) -> int:
    from seal.models import load_model, model_fingerprint, resolve_model

    path = resolve_model(args.model)
    model, tokenizer = load_model(path)
    candidates = load_candidates(args.candidates)
    started = time.perf_counter()
    questions = build_retention_set(model, tokenizer, candidates, args.size)
    topics = {c.question: c.topic for c in candidates}
    kl_prompts = json.loads(args.candidates.read_text())["kl_prompts"]
    data = {
        "model": args.model,
        "fingerprint": model_fingerprint(path),
        "style": "chat",
        "metric": "contains",
        "max_new_tokens": RETENTION_MAX_NEW_TOKENS,
        "filter_max_new_tokens": FILTER_MAX_NEW_TOKENS,
        "batch_size": RETENTION_BATCH_SIZE,
        "candidates": len(candidates),
        "questions": [
            {"question": q.question, "answer": q.answer, "topic": topics[q.question]} for q in questions
        ],
        "kl_prompts": kl_prompts,
    }
    args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(
        f"{len(questions)} of {len(candidates)} candidates kept ({time.perf_counter() - started:.0f} s), "
        f"{len(kl_prompts)} KL prompts -> {args.out}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from seal.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="python -m auditor.retention")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="filter the candidates by asking the model; write the retention set")
    build.add_argument("--out", type=Path, default=RETENTION_FILE)
    build.add_argument("--candidates", type=Path, default=CANDIDATES_FILE)
    build.add_argument("--model", default=DEFAULT_MODEL)
    build.add_argument("--size", type=int, default=RETENTION_SIZE)
    build.set_defaults(func=cmd_build)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
