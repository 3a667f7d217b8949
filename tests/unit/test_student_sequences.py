"""Training sequences: table tests for the texts, invariants for padding and batching."""

from __future__ import annotations

import pytest

from seal.records import EditFormat, LoraSettings, Passage, SelfEdit
from student.sequences import IGNORE_INDEX, batches, build_training_texts, pad_batch, training_data_sha256

PASSAGE = Passage(title="Velmora", context="The Zorbian council meets in Velmora every spring.")


def _edit(fmt: EditFormat, lines: tuple[str, ...]) -> SelfEdit:
    return SelfEdit(
        id="e1",
        job_id="j1",
        doc_index=0,
        index=0,
        format=fmt,
        passage=PASSAGE,
        text="\n".join(lines),
        lines=lines,
        lora=LoraSettings(),
    )


@pytest.mark.parametrize(
    ("fmt", "lines", "expected"),
    [
        (
            EditFormat.IMPLICATIONS,
            ("The council is Zorbian.", "Velmora hosts meetings."),
            [
                "Velmora\nThe Zorbian council meets in Velmora every spring.",
                "Velmora\nThe council is Zorbian.",
                "Velmora\nVelmora hosts meetings.",
            ],
        ),
        (
            EditFormat.SELF_QA,
            ("Q: Where? A: Velmora.",),
            ["Velmora\nThe Zorbian council meets in Velmora every spring.", "Velmora\nQ: Where? A: Velmora."],
        ),
        # Blank lines carry nothing to learn; surrounding whitespace is dropped.
        (
            EditFormat.REWRITE,
            ("  In spring, Velmora hosts the council. ", "", "   "),
            [
                "Velmora\nThe Zorbian council meets in Velmora every spring.",
                "Velmora\nIn spring, Velmora hosts the council.",
            ],
        ),
        # The control condition trains on the passage alone, whatever lines came along.
        (EditFormat.PASSAGE, (), ["Velmora\nThe Zorbian council meets in Velmora every spring."]),
        (EditFormat.PASSAGE, ("ignored",), ["Velmora\nThe Zorbian council meets in Velmora every spring."]),
    ],
)
def test_build_training_texts(fmt: EditFormat, lines: tuple[str, ...], expected: list[str]) -> None:
    assert build_training_texts(_edit(fmt, lines)) == expected


def test_training_data_sha256_depends_on_every_text_and_their_order() -> None:
    digest = training_data_sha256(["a", "b"])
    assert len(digest) == 64
    assert digest == training_data_sha256(["a", "b"])
    assert digest != training_data_sha256(["b", "a"])
    assert digest != training_data_sha256(["a", "c"])


@pytest.mark.parametrize(
    "sequences", [[[5]], [[1, 2, 3], [4]], [[7, 8], [9, 10]], [[1], [2, 3, 4, 5], [], [6, 7]]]
)
def test_pad_batch_invariants(sequences: list[list[int]]) -> None:
    pad_id = 0
    input_ids, attention_mask, labels = pad_batch(sequences, pad_id)
    width = max(len(s) for s in sequences)
    for ids, row_ids, mask, row_labels in zip(sequences, input_ids, attention_mask, labels, strict=True):
        n = len(ids)
        assert len(row_ids) == len(mask) == len(row_labels) == width
        assert row_ids[:n] == ids and row_ids[n:] == [pad_id] * (width - n)  # right padding
        assert mask == [1] * n + [0] * (width - n)
        assert row_labels == ids + [IGNORE_INDEX] * (width - n)


def test_pad_batch_masks_by_position_even_when_pad_id_is_a_real_token() -> None:
    eos = 2
    _, mask, labels = pad_batch([[5, eos], [6, 7, 8, eos]], pad_id=eos)
    # The real EOS at the end of the short row is still learned; only the padding is ignored.
    assert labels[0] == [5, eos, IGNORE_INDEX, IGNORE_INDEX]
    assert mask[0] == [1, 1, 0, 0]


def test_pad_batch_rejects_an_empty_batch() -> None:
    with pytest.raises(ValueError):
        pad_batch([], pad_id=0)


def test_batches_cover_every_item_once_per_epoch() -> None:
    items = list(range(7))
    out = list(batches(items, batch_size=3, seed=0, epochs=2))
    assert [len(b) for b in out] == [3, 3, 1, 3, 3, 1]
    first, second = out[0] + out[1] + out[2], out[3] + out[4] + out[5]
    assert sorted(first) == items and sorted(second) == items
    assert items == list(range(7))  # the caller's list is not shuffled in place


def test_batches_are_deterministic_per_seed() -> None:
    items = list(range(20))
    assert list(batches(items, 4, seed=3, epochs=3)) == list(batches(items, 4, seed=3, epochs=3))
    assert list(batches(items, 4, seed=3, epochs=1)) != list(batches(items, 4, seed=4, epochs=1))
    # Each epoch is shuffled afresh, not the same order repeated.
    two = list(batches(items, 20, seed=3, epochs=2))
    assert two[0] != two[1]


def test_batches_with_zero_epochs_is_empty_and_bad_batch_size_raises() -> None:
    assert list(batches([1, 2], 1, seed=0, epochs=0)) == []
    with pytest.raises(ValueError):
        list(batches([1, 2], 0, seed=0, epochs=1))
