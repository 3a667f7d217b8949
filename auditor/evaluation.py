"""Asking a model the held-out questions τ, and swapping LoRA adapters in and out of a base model.

As in the SEAL paper, questions are asked without the passage: the only way the model can answer is
from what the self-edit's update put into its weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auditor.grading import accuracy, grade_answer
from auditor.guardrails import ANCHOR_SET
from seal.models import render_prompt
from seal.records import QA, Document, QuestionScore


def question_prompt(title: str, question: str) -> str:
    """The prompt for one τ question: the topic, then the question (never the passage)."""
    return f"Topic: {title}\n{question}"


def answer_questions(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    use_chat_template: bool = True,
) -> list[str]:
    """Greedy answers to `prompts`, in order; batching does not change them (left padding)."""
    texts = [render_prompt(tokenizer, p, use_chat_template) for p in prompts]
    answers: list[str] = []
    for start in range(0, len(texts), batch_size):
        answers.extend(_generate_batch(model, tokenizer, texts[start : start + batch_size], max_new_tokens))
    return answers


def _generate_batch(model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int) -> list[str]:
    import torch

    # Left padding keeps every prompt's last token in the same column, so generation starts together
    # and the new tokens are exactly the columns after the prompt.
    tokenizer.padding_side = "left"
    # A chat template already writes its own special tokens; adding a BOS again would change answers.
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = enc.to(model.device)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = out[:, enc["input_ids"].shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def score_questions(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    questions: Sequence[QA],
    metric: str = "contains",
    max_new_tokens: int = 48,
    use_chat_template: bool = True,
) -> list[QuestionScore]:
    """Ask `prompts` (one per question) and grade each answer against its gold."""
    responses = answer_questions(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, use_chat_template=use_chat_template
    )
    return [
        grade_answer(qa.question, qa.answer, r, metric=metric)
        for qa, r in zip(questions, responses, strict=True)
    ]


def evaluate_document(
    model: Any,
    tokenizer: Any,
    doc: Document,
    metric: str = "contains",
    max_new_tokens: int = 48,
    use_chat_template: bool = True,
) -> list[QuestionScore]:
    """One score per τ question of `doc`, asked with the topic but without the passage."""
    prompts = [question_prompt(doc.title, qa.question) for qa in doc.questions]
    return score_questions(
        model, tokenizer, prompts, doc.questions, metric, max_new_tokens, use_chat_template
    )


def anchor_accuracy(
    model: Any, tokenizer: Any, max_new_tokens: int = 48, use_chat_template: bool = True
) -> float:
    """Accuracy on the general-knowledge ANCHOR_SET, the forgetting yardstick.

    Always graded by "contains", whatever τ's metric: anchors measure retained knowledge, and a
    chatty but right answer ("The capital of France is Paris.") should count.
    """
    prompts = [qa.question for qa in ANCHOR_SET]
    scores = score_questions(
        model, tokenizer, prompts, ANCHOR_SET, "contains", max_new_tokens, use_chat_template
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
