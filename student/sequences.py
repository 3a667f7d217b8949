"""Turning a self-edit into training sequences: pure Python, no torch.

SEAL's inner loop fine-tunes the student on the teacher's self-edit. Each generated line (an
implication, a rewrite, a QA pair) becomes its own short training text prefixed by the passage
title, so every sequence is anchored to the document it is about; the passage itself is included
too, as in the paper. The PASSAGE format is the control: the passage alone, no synthetic data.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

from seal.records import EditFormat, SelfEdit, sha256_text

T = TypeVar("T")

# Label value the loss ignores (the PyTorch / Hugging Face convention).
IGNORE_INDEX = -100


def build_training_texts(self_edit: SelfEdit) -> list[str]:
    """The passage first, then one text per non-empty self-edit line, each prefixed by the title."""
    title = self_edit.passage.title
    texts = [f"{title}\n{self_edit.passage.context}"]
    if self_edit.format is EditFormat.PASSAGE:
        return texts
    return texts + [f"{title}\n{line.strip()}" for line in self_edit.lines if line.strip()]


def training_data_sha256(texts: Sequence[str]) -> str:
    """Digest of exactly what was trained on (recorded in the adapter's provenance)."""
    return sha256_text("\n".join(texts))


def pad_batch(
    token_id_lists: list[list[int]], pad_id: int
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Right-pad to the longest sequence: (input_ids, attention_mask, labels with -100 on padding)."""
    if not token_id_lists:
        raise ValueError("pad_batch needs at least one sequence")
    width = max(len(ids) for ids in token_id_lists)
    input_ids, attention_mask, labels = [], [], []
    for ids in token_id_lists:
        pad = width - len(ids)
        input_ids.append(list(ids) + [pad_id] * pad)
        attention_mask.append([1] * len(ids) + [0] * pad)
        # Labels mask by position, not by id: the pad id may also be a real token (often EOS).
        labels.append(list(ids) + [IGNORE_INDEX] * pad)
    return input_ids, attention_mask, labels


def batches(items: Sequence[T], batch_size: int, seed: int, epochs: int) -> Iterator[list[T]]:
    """`epochs` passes over `items`, each freshly shuffled by one seeded RNG; the last batch may be short."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(items)
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]
