"""The teacher core: self-edit proposal with a scripted generator and with the real tiny model."""

from __future__ import annotations

import pytest

from seal.records import EditFormat, LoraSettings, Passage, SamplingSettings, SelfEdit
from teacher.backends import TransformersGenerator
from teacher.core import passage_control, propose_self_edits
from teacher.prompts import build_prompt

PASSAGE = Passage(title="Velmora", context="The Zorbian council meets in Velmora every spring.")
LORA = LoraSettings(rank=4, epochs=1)
SAMPLING = SamplingSettings(max_new_tokens=12, seed=0)


class ScriptedGenerator:
    """Returns fixed completions and records every call."""

    name = "scripted-teacher"

    def __init__(self, completions: list[str]) -> None:
        self.completions = completions
        self.calls: list[tuple[list[str], SamplingSettings, int]] = []

    def generate(self, prompts: list[str], sampling: SamplingSettings, n: int) -> list[list[str]]:
        self.calls.append((prompts, sampling, n))
        return [self.completions[:n] for _ in prompts]


def test_propose_makes_one_generate_call_and_one_edit_per_completion():
    generator = ScriptedGenerator(["1. The council meets.\n2. It is spring.", "- Velmora hosts it.", "\n \n"])
    edits = propose_self_edits(generator, PASSAGE, EditFormat.IMPLICATIONS, 3, LORA, SAMPLING, "job-1", 4)
    assert generator.calls == [([build_prompt(PASSAGE, EditFormat.IMPLICATIONS)], SAMPLING, 3)]
    assert [e.id for e in edits] == ["job-1/4/0", "job-1/4/1", "job-1/4/2"]
    assert [e.index for e in edits] == [0, 1, 2]
    assert [e.lines for e in edits] == [("The council meets.", "It is spring."), ("Velmora hosts it.",), ()]
    assert [e.text for e in edits] == generator.completions
    for edit in edits:
        assert (edit.job_id, edit.doc_index, edit.format) == ("job-1", 4, EditFormat.IMPLICATIONS)
        assert edit.passage == PASSAGE
        assert edit.lora == LORA
        assert edit.teacher_model == "scripted-teacher"
        assert edit.generation_seconds >= 0


def test_propose_keeps_edits_that_parse_to_nothing():
    edits = propose_self_edits(
        ScriptedGenerator(["", "!!!"]), PASSAGE, EditFormat.SELF_QA, 2, LORA, SAMPLING, "j", 0
    )
    assert [(e.id, e.lines) for e in edits] == [("j/0/0", ()), ("j/0/1", ())]


def test_propose_parses_in_the_requested_format():
    generator = ScriptedGenerator(["Q: Where?\nA: Velmora."])
    (edit,) = propose_self_edits(generator, PASSAGE, EditFormat.SELF_QA, 1, LORA, SAMPLING, "j", 0)
    assert edit.lines == ("Q: Where? A: Velmora.",)
    assert "Questions and answers:" in generator.calls[0][0][0]


def test_propose_refuses_the_passage_format_and_bad_n():
    with pytest.raises(ValueError, match="no teacher prompt"):
        propose_self_edits(ScriptedGenerator(["x"]), PASSAGE, EditFormat.PASSAGE, 1, LORA, SAMPLING, "j", 0)
    with pytest.raises(ValueError, match="n must be"):
        propose_self_edits(
            ScriptedGenerator(["x"]), PASSAGE, EditFormat.IMPLICATIONS, 0, LORA, SAMPLING, "j", 0
        )


def test_propose_rejects_a_generator_that_returns_the_wrong_count():
    with pytest.raises(RuntimeError, match="returned 1 completions, wanted 2"):
        propose_self_edits(
            ScriptedGenerator(["only one"]), PASSAGE, EditFormat.IMPLICATIONS, 2, LORA, SAMPLING, "j", 0
        )


def test_propose_with_the_tiny_model_is_seeded_and_reproducible(tiny_model):
    model, tokenizer = tiny_model
    generator = TransformersGenerator(model, tokenizer, name="tiny-llama")

    def propose(seed: int) -> list[SelfEdit]:
        sampling = SamplingSettings(max_new_tokens=12, seed=seed)
        return propose_self_edits(generator, PASSAGE, EditFormat.IMPLICATIONS, 3, LORA, sampling, "job", 2)

    edits, again, other = propose(0), propose(0), propose(1)
    assert [e.id for e in edits] == ["job/2/0", "job/2/1", "job/2/2"]
    assert all(
        isinstance(e, SelfEdit) and isinstance(e.text, str) and isinstance(e.lines, tuple) for e in edits
    )
    assert all(e.teacher_model == "tiny-llama" and e.generation_seconds > 0 for e in edits)
    assert len({e.generation_seconds for e in edits}) == 1  # the batch time shared out evenly
    assert [e.text for e in edits] == [e.text for e in again]
    assert [e.lines for e in edits] == [e.lines for e in again]
    assert [e.text for e in edits] != [e.text for e in other]


def test_passage_control_is_the_train_on_passage_baseline():
    edit = passage_control(PASSAGE, LORA, "job-1", 7)
    assert edit.id == "job-1/7/passage"
    assert (edit.job_id, edit.doc_index, edit.format) == ("job-1", 7, EditFormat.PASSAGE)
    assert (edit.text, edit.lines) == ("", ())
    assert edit.passage == PASSAGE and edit.lora == LORA
