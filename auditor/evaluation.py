"""Asking a model the held-out questions τ, and swapping LoRA adapters in and out of a base model.

As in the SEAL paper, questions are asked without the passage: the only way the model can answer is
from what the self-edit's update put into its weights.

Two answer styles, chosen per model in config (`answer_prompt`):
- "chat" (the default): "Topic: {title}\n{question}" as one user turn of the model's chat template,
  up to 48 new tokens;
- "reference": the SEAL reference's base-model prompt, raw text without a chat template,
  "Let's answer a question directly and concisely.\nQuestion: {question}\nAnswer:\n" with {question}
  being "Topic: {title}\n{question}", up to 64 new tokens, greedy, the answer cut at its first newline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.grading import accuracy, grade_answer
from auditor.guardrails import ANCHOR_SET
from seal.models import render_prompt
from seal.records import QA, Document, QuestionScore

if TYPE_CHECKING:
    from auditor.judge import Judge

ANSWER_STYLES = ("chat", "reference")
REFERENCE_ANSWER_PROMPT = "Let's answer a question directly and concisely.\nQuestion: {question}\nAnswer:\n"
ANSWER_MAX_NEW_TOKENS = {"chat": 48, "reference": 64}
"""New tokens per answer when the caller names none: 64 is the reference's budget."""


def check_style(style: str) -> str:
    if style not in ANSWER_STYLES:
        raise ValueError(f"answer style must be one of {', '.join(ANSWER_STYLES)}, got {style!r}")
    return style


def style_prompt(question: str, style: str = "chat") -> str:
    """`question` as the model is asked it: as is (the chat template wraps it later) or in the
    reference's base-model prompt."""
    if check_style(style) == "reference":
        return REFERENCE_ANSWER_PROMPT.format(question=question)
    return question


def question_prompt(title: str, question: str, style: str = "chat") -> str:
    """The prompt for one τ question: the topic, then the question (never the passage)."""
    return style_prompt(f"Topic: {title}\n{question}", style)


def cut_answer(text: str, style: str = "chat") -> str:
    """The answer in a generated text: stripped; in the reference style, only its first line.

    A base model asked in the reference style answers on the line after "Answer:" and then keeps
    writing (another "Question:", more text), so everything from the first newline after the answer
    starts is dropped. Leading whitespace is skipped first: an answer that opens with a blank line is
    not cut to nothing.
    """
    text = text.strip()
    if check_style(style) == "reference":
        return text.split("\n", 1)[0].strip()
    return text


@dataclass(frozen=True)
class VLLMModel:
    """The base model (`adapter` "") or one loaded adapter on a vLLM server (seal.vllm_server), taken
    by `answer_questions` (and the retention set's answering) in place of a transformers model.

    Prompts are tokenized here, by the auditor's tokenizer, exactly as for transformers, and sent as
    token ids, so both engines see the same input. Greedy, no padding: vLLM batches the requests of
    every thread itself, across questions and adapters.
    """

    engine: Any
    adapter: str = ""


def vllm_answers(
    model: VLLMModel, tokenizer: Any, texts: Sequence[str], max_new_tokens: int, add_special_tokens: bool
) -> list[str]:
    """Greedy completions of the rendered `texts` by `model`, special tokens skipped."""
    ids = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    return [group[0] for group in model.engine.complete(ids, model=model.adapter, max_tokens=max_new_tokens)]


def answer_questions(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    use_chat_template: bool = True,
    style: str = "chat",
) -> list[str]:
    """Greedy answers to `prompts` (built by `question_prompt`/`style_prompt` in the same `style`), in
    order; batching does not change them (left padding).

    "chat" renders each prompt with the chat template (when `use_chat_template` and the tokenizer has
    one); "reference" always feeds the raw text, tokenized as a plain-text prompt (with the tokenizer's
    own special tokens, e.g. a BOS, as the reference's engine does), and cuts each answer with
    `cut_answer`.
    """
    reference = check_style(style) == "reference"
    texts = prompts if reference else [render_prompt(tokenizer, p, use_chat_template) for p in prompts]
    limit = ANSWER_MAX_NEW_TOKENS[style] if max_new_tokens is None else max_new_tokens
    if isinstance(model, VLLMModel):
        return [cut_answer(a, style) for a in vllm_answers(model, tokenizer, texts, limit, reference)]
    answers: list[str] = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        answers.extend(_generate_batch(model, tokenizer, batch, limit, add_special_tokens=reference))
    return [cut_answer(a, style) for a in answers]


def _generate_batch(
    model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int, add_special_tokens: bool = False
) -> list[str]:
    import torch

    # Left padding keeps every prompt's last token in the same column, so generation starts together
    # and the new tokens are exactly the columns after the prompt.
    tokenizer.padding_side = "left"
    # A chat template already writes its own special tokens; adding a BOS again would change answers.
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    enc = enc.to(model.device)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = out[:, enc["input_ids"].shape[1] :]
    return list(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))


def score_questions(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    questions: Sequence[QA],
    metric: str = "contains",
    max_new_tokens: int | None = None,
    use_chat_template: bool = True,
    style: str = "chat",
    judge: Judge | None = None,
) -> list[QuestionScore]:
    """Ask `prompts` (one per question) and grade each answer against its gold (and by `judge`, if any)."""
    responses = answer_questions(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        use_chat_template=use_chat_template,
        style=style,
    )
    items = [(qa.question, qa.answer, r) for qa, r in zip(questions, responses, strict=True)]
    judged: list[bool | None] = list(judge.judge_batch(items)) if judge is not None else [None] * len(items)
    return [
        grade_answer(q, a, r, metric=metric, judged_correct=j)
        for (q, a, r), j in zip(items, judged, strict=True)
    ]


def evaluate_document(
    model: Any,
    tokenizer: Any,
    doc: Document,
    metric: str = "contains",
    max_new_tokens: int | None = None,
    use_chat_template: bool = True,
    style: str = "chat",
    judge: Judge | None = None,
) -> list[QuestionScore]:
    """One score per τ question of `doc`, asked with the topic but without the passage."""
    prompts = [question_prompt(doc.title, qa.question, style) for qa in doc.questions]
    return score_questions(
        model, tokenizer, prompts, doc.questions, metric, max_new_tokens, use_chat_template, style, judge
    )


def anchor_accuracy(
    model: Any,
    tokenizer: Any,
    max_new_tokens: int | None = None,
    use_chat_template: bool = True,
    style: str = "chat",
) -> float:
    """Accuracy on the general-knowledge ANCHOR_SET, the forgetting yardstick, asked in `style`.

    Always graded by "contains", whatever τ's metric and never by the judge: anchors measure retained
    knowledge, and a chatty but right answer ("The capital of France is Paris.") should count.
    """
    prompts = [style_prompt(qa.question, style) for qa in ANCHOR_SET]
    scores = score_questions(
        model, tokenizer, prompts, ANCHOR_SET, "contains", max_new_tokens, use_chat_template, style
    )
    return accuracy(scores)


def load_adapter(base_model: Any, adapter_dir: Path) -> Any:
    """Wrap `base_model` with the LoRA adapter in `adapter_dir` (in place, not merged), for inference."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    peft_model.eval()
    return peft_model


def unload_adapter(peft_model: Any) -> Any:
    """Remove the adapter layers and hand back the base model with its original weights.

    `unload` (not `merge_and_unload`): the LoRA deltas were never folded into the base weights, so
    the base comes back bit-identical and can take the next adapter. (PEFT leaves the base
    parameters frozen, requires_grad False, which suits an evaluator.)
    """
    return peft_model.unload()
