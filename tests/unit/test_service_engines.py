"""Service engines: limits from their own config, and the auditor's bounded baseline cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from seal.config import load_config
from seal.errors import InvalidArgument
from seal.records import Passage, ProposeTask, SamplingSettings
from seal.stack import LocalStack
from teacher.backends import TransformersGenerator
from teacher.service import TeacherEngine

LONG = Passage("Long", "word " * 1800)  # 9000 characters: over the default limit of 8000


def _propose(engine: TeacherEngine, passage: Passage, n: int) -> list:
    return engine.propose(ProposeTask("job", 0, passage, n=n, sampling=SamplingSettings(max_new_tokens=4)))


def test_config_limits_reach_the_teacher(tiny_model) -> None:
    model, tokenizer = tiny_model
    roomy = load_config("teacher", env={"SEAL_MAX_CONTEXT_CHARS": "10000", "SEAL_MAX_SELF_EDITS": "2"})
    engine = TeacherEngine(TransformersGenerator(model, tokenizer), roomy.limits())
    assert len(_propose(engine, LONG, 2)) == 2  # a gateway with the same config accepts it too
    with pytest.raises(InvalidArgument, match=r"^n: must be in \[1, 2\]"):
        _propose(engine, LONG, 3)
    strict = TeacherEngine(TransformersGenerator(model, tokenizer), load_config("teacher", env={}).limits())
    with pytest.raises(InvalidArgument, match="passage.context"):
        _propose(strict, LONG, 1)


def test_a_configured_redis_that_does_not_answer_is_an_error(tmp_path: Path) -> None:
    stack = LocalStack(model="unused", data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(ConnectionError, match="redis://127.0.0.1:1/0 does not answer"):
        stack.start()
    assert stack.processes == {}


@pytest.mark.parametrize("students", [0, 9])
def test_a_stack_of_too_many_or_no_students_is_refused_before_anything_starts(
    tmp_path: Path, students
) -> None:
    stack = LocalStack(model="unused", data_dir=tmp_path / "stack", students=students)
    with pytest.raises(ValueError, match=f"students must be between 1 and 8, got {students}"):
        stack.start()
    assert stack.processes == {} and not (tmp_path / "stack").exists()


def test_auditor_baseline_cache_reuses_and_stays_bounded(
    tiny_model, tmp_path: Path, monkeypatch, plane
) -> None:
    import auditor.service
    from auditor.service import AuditorEngine
    from seal.records import QA, Document
    from seal.signing import VerdictSigner
    from seal.validation import Limits

    monkeypatch.setattr(auditor.service, "BASELINE_CACHE_SIZE", 2)
    model, tokenizer = tiny_model
    engine = AuditorEngine(model, tokenizer, "f" * 64, VerdictSigner.generate(), tmp_path, Limits(), plane)
    docs = [Document(f"T{i}", "c", (QA("q?", "a"),)) for i in range(3)]
    first = engine._baseline(docs[0])
    assert engine._baseline(docs[0]) is first  # computed once per document
    engine._baseline(docs[1])
    engine._baseline(docs[0])  # docs[0] is now the most recent
    engine._baseline(docs[2])  # evicts docs[1], the least recent
    assert len(engine._baselines) == 2
    assert engine._baseline(docs[0]) is first


def test_the_student_refuses_an_update_over_its_compute_budget(tiny_model, tmp_path: Path) -> None:
    """epochs x training tokens is bounded by config, before any training starts."""
    from seal.errors import InvalidArgument
    from seal.records import EditFormat, LoraSettings, Passage, SelfEdit
    from seal.validation import Limits
    from student.service import StudentEngine

    model, tokenizer = tiny_model
    edit = SelfEdit(
        "e1",
        "j1",
        0,
        0,
        EditFormat.IMPLICATIONS,
        Passage("T", "Alpha is a town."),
        "x",
        ("Alpha is big.",),
        LoraSettings(epochs=3, rank=4),
    )
    engine = StudentEngine(model, tokenizer, "tiny", "f" * 64, tmp_path, Limits(), max_train_tokens=10)
    with pytest.raises(InvalidArgument, match="budget of 10;") as info:
        engine.apply(edit)
    assert info.value.field == "self_edit.lora.epochs"
    assert not any(tmp_path.iterdir())  # nothing was trained or saved
    engine.max_train_tokens = 10**6
    assert engine.apply(edit).steps == 6  # 2 sequences x 3 epochs: within budget it trains
