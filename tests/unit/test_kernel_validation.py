"""Request checks: every bad field names its exact path and the allowed range; boundaries are inclusive."""

from __future__ import annotations

import dataclasses
import math

import pytest

from seal.errors import InvalidArgument
from seal.records import QA, Document, EditFormat, JobSpec, LoraSettings, SamplingSettings
from seal.validation import (
    Limits,
    check_range,
    validate_document,
    validate_job_spec,
    validate_lora,
    validate_sampling,
)

MODEL = "smollm2-135m"
LIMITS = Limits()
DOC = Document(title="Velmora", context="The council meets in Velmora.", questions=(QA("Where?", "Velmora"),))
SPEC = JobSpec(documents=(DOC, DOC))


def _lora(**changes):
    return dataclasses.replace(LoraSettings(), **changes)


def _sampling(**changes):
    return dataclasses.replace(SamplingSettings(), **changes)


def _spec(**changes):
    return dataclasses.replace(SPEC, **changes)


def _doc(**changes):
    return dataclasses.replace(DOC, **changes)


def _rejects(call, field: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        call()
    assert info.value.field == field
    assert str(info.value).startswith(field + ": ")
    return info.value


def test_a_valid_spec_passes():
    """The defaults plus one good document are a valid job, with or without naming the model."""
    validate_job_spec(SPEC, LIMITS, MODEL)
    validate_job_spec(_spec(model=MODEL, edit_format=EditFormat.SELF_QA), LIMITS, MODEL)


def test_invalid_argument_is_a_value_error_with_the_field():
    """Callers that catch ValueError still see validation failures."""
    err = _rejects(lambda: validate_lora(_lora(rank=0)), "lora.rank")
    assert isinstance(err, ValueError)


# --- LoRA ---------------------------------------------------------------------------------------

LORA_OK = [
    ("rank", 1),
    ("rank", 256),
    ("alpha", 1e-9),
    ("alpha", 4096),
    ("learning_rate", 1e-12),
    ("learning_rate", 0.1),
    ("epochs", 1),
    ("epochs", 100),
    ("batch_size", 1),
    ("batch_size", 256),
    ("max_seq_len", 16),
    ("max_seq_len", 8192),
    ("seed", 0),
    ("seed", 2**31 - 1),
    ("target_modules", ("q_proj",)),
]


@pytest.mark.parametrize("name, value", LORA_OK)
def test_lora_boundary_values_are_accepted(name, value):
    """Both ends of every closed range are allowed."""
    validate_lora(_lora(**{name: value}))


LORA_BAD = [
    ("rank", 0, "[1, 256]"),
    ("rank", 257, "[1, 256]"),
    ("rank", -1, "[1, 256]"),
    ("rank", True, "[1, 256]"),
    ("rank", 16.0, "[1, 256]"),
    ("rank", "16", "[1, 256]"),
    ("alpha", 0, "(0, 4096]"),
    ("alpha", 0.0, "(0, 4096]"),
    ("alpha", 4096.5, "(0, 4096]"),
    ("alpha", math.nan, "(0, 4096]"),
    ("alpha", math.inf, "(0, 4096]"),
    ("alpha", True, "(0, 4096]"),
    ("learning_rate", 0.0, "(0, 0.1]"),
    ("learning_rate", 0.1000001, "(0, 0.1]"),
    ("learning_rate", -1e-3, "(0, 0.1]"),
    ("learning_rate", math.nan, "(0, 0.1]"),
    ("epochs", 0, "[1, 100]"),
    ("epochs", 101, "[1, 100]"),
    ("epochs", False, "[1, 100]"),
    ("batch_size", 0, "[1, 256]"),
    ("batch_size", 257, "[1, 256]"),
    ("max_seq_len", 15, "[16, 8192]"),
    ("max_seq_len", 8193, "[16, 8192]"),
    ("seed", -1, "[0, 2147483647]"),
    ("seed", 2**31, "[0, 2147483647]"),
    ("target_modules", (), "q_proj"),
    ("target_modules", ("q_proj", ""), "q_proj"),
    ("target_modules", ("q_proj", 3), "q_proj"),
    ("target_modules", ("nope_proj",), "unknown module"),
]


@pytest.mark.parametrize("name, value, allowed", LORA_BAD)
def test_bad_lora_field_names_its_path_and_the_allowed_range(name, value, allowed):
    """Just outside a range, a bool, a float for an int, NaN: each names lora.<field> and the range."""
    err = _rejects(lambda: validate_lora(_lora(**{name: value})), f"lora.{name}")
    assert allowed in str(err)


def test_lora_prefix_is_used_in_the_field_path():
    """Services validating a nested lora (e.g. in a self-edit) get their own path."""
    _rejects(lambda: validate_lora(_lora(epochs=0), prefix="self_edit.lora"), "self_edit.lora.epochs")


# --- Sampling -----------------------------------------------------------------------------------

SAMPLING_OK = [
    ("temperature", 0),
    ("temperature", 0.0),
    ("temperature", 2.0),
    ("top_p", 1.0),
    ("top_p", 1e-6),
    ("max_new_tokens", 1),
    ("max_new_tokens", 4096),
    ("seed", 0),
    ("seed", 2**31 - 1),
]


@pytest.mark.parametrize("name, value", SAMPLING_OK)
def test_sampling_boundary_values_are_accepted(name, value):
    """Greedy decoding (temperature 0) and top_p 1.0 are allowed."""
    validate_sampling(_sampling(**{name: value}))


SAMPLING_BAD = [
    ("temperature", -1e-9, "[0, 2]"),
    ("temperature", 2.0000001, "[0, 2]"),
    ("temperature", math.nan, "[0, 2]"),
    ("temperature", "hot", "[0, 2]"),
    ("temperature", None, "[0, 2]"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.0000001, "(0, 1]"),
    ("top_p", math.nan, "(0, 1]"),
    ("top_p", True, "(0, 1]"),
    ("max_new_tokens", 0, "[1, 4096]"),
    ("max_new_tokens", 4097, "[1, 4096]"),
    ("max_new_tokens", 64.0, "[1, 4096]"),
    ("seed", -1, "[0, 2147483647]"),
    ("seed", True, "[0, 2147483647]"),
]


@pytest.mark.parametrize("name, value, allowed", SAMPLING_BAD)
def test_bad_sampling_field_names_its_path_and_the_allowed_range(name, value, allowed):
    """Each bad sampling value names sampling.<field> and the allowed range."""
    err = _rejects(lambda: validate_sampling(_sampling(**{name: value})), f"sampling.{name}")
    assert allowed in str(err)


# --- check_range --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, low, high, low_open, ok",
    [
        (0, 0, 1, False, True),
        (1, 0, 1, False, True),
        (0, 0, 1, True, False),
        (1e-300, 0, 1, True, True),
        (1, 0, 1, True, True),
        (-1, 0, 1, False, False),
        (1.5, 0, 1, False, False),
        (math.inf, 0, 1, False, False),
        (-math.inf, 0, 1, False, False),
        (math.nan, 0, 1, False, False),
        (True, 0, 1, False, False),
        (False, 0, 1, False, False),
        ("0.5", 0, 1, False, False),
        (None, 0, 1, False, False),
    ],
)
def test_check_range(value, low, high, low_open, ok):
    """Closed upper end, open or closed lower end; NaN, inf, bools and non-numbers rejected."""
    if ok:
        check_range("x", value, low, high, low_open=low_open)
        return
    err = _rejects(lambda: check_range("x", value, low, high, low_open=low_open), "x")
    assert f"{'(' if low_open else '['}{low}, {high}]" in str(err)


@pytest.mark.parametrize("value", [0.25, 0.5, 0.75])
def test_check_range_accepts_the_interior(value):
    """Every value strictly inside the interval passes, open end or not."""
    check_range("x", value, 0, 1)
    check_range("x", value, 0, 1, low_open=True)


# --- Documents ----------------------------------------------------------------------------------

DOC_BAD = [
    (_doc(title=""), "d.title", "empty"),
    (_doc(title="   "), "d.title", "empty"),
    (_doc(title=None), "d.title", "empty"),
    (_doc(title="t" * 301), "d.title", "300"),
    (_doc(context=""), "d.context", "empty"),
    (_doc(context="\n"), "d.context", "empty"),
    (_doc(context="c" * 8001), "d.context", "8000"),
    (_doc(questions=()), "d.questions", "at least one"),
    (_doc(questions=(QA("q", "a"),) * 201), "d.questions", "200"),
    (_doc(questions=(QA("q", "a"), QA(" ", "a"))), "d.questions[1].question", "empty"),
    (_doc(questions=(QA("q" * 2001, "a"),)), "d.questions[0].question", "2000"),
    (_doc(questions=(QA("q", ""),)), "d.questions[0].answer", "answer"),
    (_doc(questions=(QA("q", "a"), QA("q", "a"), QA("q", 5))), "d.questions[2].answer", "answer"),
]


@pytest.mark.parametrize("doc, field, says", DOC_BAD)
def test_bad_document_names_the_exact_path(doc, field, says):
    """Empty or over-long title/context/question, missing answer: each names its own path."""
    err = _rejects(lambda: validate_document(doc, LIMITS, "d"), field)
    assert says in str(err)


def test_document_limits_are_inclusive():
    """Exactly max characters / questions is allowed."""
    doc = Document(title="t" * 300, context="c" * 8000, questions=(QA("q" * 2000, "a"),) * 200)
    validate_document(doc, LIMITS, "d")


def test_document_limits_come_from_the_limits_passed():
    """A deployment's tighter Limits apply."""
    tight = Limits(max_context_chars=10, max_questions=1, max_title_chars=3)
    validate_document(_doc(title="abc", context="c" * 10), tight, "d")
    _rejects(lambda: validate_document(_doc(title="abc", context="c" * 11), tight, "d"), "d.context")
    _rejects(lambda: validate_document(_doc(title="abcd", context="c"), tight, "d"), "d.title")
    doc = _doc(title="abc", context="c", questions=(QA("q", "a"),) * 2)
    _rejects(lambda: validate_document(doc, tight, "d"), "d.questions")


# --- Whole job spec -----------------------------------------------------------------------------

BAD_Q = _doc(questions=(QA("Where?", ""),))
SPEC_BAD = [
    (_spec(documents=()), "documents", "at least one"),
    (_spec(documents=(DOC,) * 33), "documents", "32"),
    (_spec(documents=(DOC, BAD_Q)), "documents[1].questions[0].answer", "answer"),
    (_spec(documents=(DOC, DOC, _doc(title=""))), "documents[2].title", "empty"),
    (_spec(n_self_edits=0), "n_self_edits", "[1, 16]"),
    (_spec(n_self_edits=17), "n_self_edits", "[1, 16]"),
    (_spec(n_self_edits=True), "n_self_edits", "[1, 16]"),
    (_spec(n_self_edits=3.0), "n_self_edits", "[1, 16]"),
    (_spec(edit_format=EditFormat.PASSAGE), "edit_format", "implications, rewrite or self_qa"),
    (_spec(lora=_lora(rank=0)), "lora.rank", "[1, 256]"),
    (_spec(lora=_lora(rank=257)), "lora.rank", "[1, 256]"),
    (_spec(sampling=_sampling(top_p=1.5)), "sampling.top_p", "(0, 1]"),
    (_spec(sampling=_sampling(temperature=math.nan)), "sampling.temperature", "[0, 2]"),
    (_spec(model="llama-70b"), "model", MODEL),
]


@pytest.mark.parametrize("spec, field, says", SPEC_BAD)
def test_bad_job_spec_names_the_exact_field(spec, field, says):
    """Each bad field of a job produces InvalidArgument with its path and what is allowed."""
    err = _rejects(lambda: validate_job_spec(spec, LIMITS, MODEL), field)
    assert says in str(err)


@pytest.mark.parametrize("n", [1, 16])
def test_n_self_edits_boundaries_are_accepted(n):
    """1 and max_self_edits are both allowed."""
    validate_job_spec(_spec(n_self_edits=n), LIMITS, MODEL)


def test_max_documents_is_accepted():
    """Exactly max_documents documents is allowed."""
    validate_job_spec(_spec(documents=(DOC,) * 32), LIMITS, MODEL)


def test_n_self_edits_limit_comes_from_limits():
    """The deployment's max_self_edits bounds n_self_edits."""
    _rejects(
        lambda: validate_job_spec(_spec(n_self_edits=3), Limits(max_self_edits=2), MODEL), "n_self_edits"
    )


def test_model_mismatch_message_names_both_models():
    """The caller learns what they asked for and what this deployment adapts."""
    err = _rejects(lambda: validate_job_spec(_spec(model="other"), LIMITS, MODEL), "model")
    assert "'other'" in str(err) and repr(MODEL) in str(err)
