"""The teacher core: self-edit proposal with a scripted generator and with the real tiny model."""

from __future__ import annotations

import pytest

from seal.records import EditFormat, LoraSettings, Passage, SamplingSettings, SelfEdit
from teacher.backends import TransformersGenerator, request_completions
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

    def generate(
        self, prompts: list[str], sampling: SamplingSettings, n: int, policy_version: str = ""
    ) -> list[list[str]]:
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
    assert generator.calls[0][0][0].endswith("\n\nQuestion 1: ")


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


@pytest.mark.parametrize(
    ("directives", "expected", "error"),
    [
        ('{"learning_rate": 5e-4, "epochs": 8}', {"learning_rate": 5e-4, "epochs": 8}, ""),
        ('{"rank": 8}', {"rank": 8, "alpha": 16.0}, ""),
        ('{"epochs": 8.0}', {"epochs": 8}, ""),
        ('{"epochs": 500}', {}, "directive epochs must be in [1, 20], got 500"),
        ('{"rank": 2.5}', {}, "directive rank must be an integer, got 2.5"),
        ('{"learning_rate": true}', {}, "directive learning_rate must be a number, got True"),
        (
            '{"learning_rate": 1.0, "epochs": 3}',
            {},
            "directive learning_rate must be in [1e-05, 0.01], got 1.0",
        ),
        ('{"dropout": 0.1}', {}, "unknown directive(s) ['dropout']; allowed: learning_rate, epochs, rank"),
        ("[1, 2]", {}, "directives must be a JSON object of learning_rate, epochs, rank"),
        ("{epochs: 8}", {}, "directives are not JSON"),
    ],
    ids=[
        "lr-epochs",
        "rank-keeps-scale",
        "integral-float",
        "epochs-over",
        "fractional-rank",
        "bool",
        "all-or-nothing",
        "unknown",
        "not-object",
        "not-json",
    ],
)
def test_apply_directives_within_limits(directives, expected, error):
    from seal.validation import Limits
    from teacher.core import apply_directives

    lora, why = apply_directives(LoraSettings(rank=4, alpha=8.0), directives, Limits())
    assert why.startswith(error) and bool(why) == bool(error)
    assert lora == LoraSettings(**{"rank": 4, "alpha": 8.0, **expected})
    assert all(type(getattr(lora, k)) is type(v) for k, v in expected.items())


def test_propose_applies_a_self_edits_directives_and_records_them():
    generator = ScriptedGenerator(
        ['1. The council meets.\nDirectives: {"epochs": 9}', '1. Fact.\nDirectives: {"epochs": 99}']
    )
    good, refused = propose_self_edits(
        generator, PASSAGE, EditFormat.IMPLICATIONS, 2, LORA, SAMPLING, "j", 0, policy_version="ab" * 32
    )
    assert (good.lora.epochs, good.directives, good.directive_error) == (9, '{"epochs": 9}', "")
    assert good.lines == ("The council meets.",)
    assert refused.lora == LORA and refused.directive_error.startswith("directive epochs must be in")
    assert good.policy_version == refused.policy_version == "ab" * 32


def test_each_self_edit_joins_its_samples_in_one_generate_call():
    generator = ScriptedGenerator(["1. Alpha.", "2. Beta.", "3. Gamma.", "4. Delta."])
    edits = propose_self_edits(
        generator, PASSAGE, EditFormat.IMPLICATIONS, 2, LORA, SAMPLING, "j", 0, samples_per_edit=2
    )
    assert [call[2] for call in generator.calls] == [4]  # n × samples_per_edit, one call
    assert [e.text for e in edits] == ["1. Alpha.\n\n2. Beta.", "3. Gamma.\n\n4. Delta."]
    assert [e.lines for e in edits] == [("Alpha.", "Beta."), ("Gamma.", "Delta.")]
    assert [e.id for e in edits] == ["j/0/0", "j/0/1"]
    # A generator that counts no tokens (plain strings) leaves the usage at 0.
    assert [(e.prompt_tokens, e.completion_tokens) for e in edits] == [(0, 0), (0, 0)]


def test_each_self_edit_adds_up_the_tokens_of_its_samples():
    """One request of 4 choices (prompt 10 tokens, 2+3+4+5 generated): what it cost, per self-edit."""
    samples = request_completions(["1. A.", "2. B.", "3. C.", "4. D."], 10, [2, 3, 4, 5])
    edits = propose_self_edits(
        ScriptedGenerator(samples),
        PASSAGE,
        EditFormat.IMPLICATIONS,
        2,
        LORA,
        SAMPLING,
        "j",
        0,
        samples_per_edit=2,
    )
    assert [(e.prompt_tokens, e.completion_tokens) for e in edits] == [(6, 5), (4, 9)]
    assert sum(e.prompt_tokens for e in edits) == 10
