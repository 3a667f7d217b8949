"""The auditor service's plumbing: runs in events and task ids, and the engine's judged baselines."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from auditor.grading import grade_answer
from auditor.service import AuditorEngine, audit_followups
from seal.records import (
    QA,
    AdapterRef,
    AuditResult,
    AuditTask,
    Document,
    EditFormat,
    Event,
    LoraSettings,
    Passage,
    SelfEdit,
    Verdict,
)
from seal.signing import VerdictSigner
from seal.tasks import decode, encode
from seal.tasks import run_task_id as run_id
from seal.validation import Limits

_EDIT = SelfEdit(
    "edit-7", "job-1", 0, 0, EditFormat.IMPLICATIONS, Passage("T", "c"), "x", ("x",), LoraSettings()
)
_ADAPTER = AdapterRef("a" * 64, "edit-7", "tiny", "f" * 64, 10, 1.0, 2, 0.5)
_SCORE = grade_answer("q?", "a", "a")
_VERDICT = Verdict("job-1", 0, "edit-7", "a" * 64, "f" * 64, 0.0, 1.0, 1.0, (_SCORE,), (_SCORE,), 0.1, True)


def test_run_ids_follow_the_students_rule() -> None:
    assert run_id("edit-7", 0) == "edit-7"
    assert run_id("edit-7", 1) == "edit-7#1"
    assert run_id("edit-7", 2) == "edit-7#2"


@pytest.mark.parametrize(("run", "task_id"), [(0, "verdict/edit-7"), (2, "verdict/edit-7#2")])
def test_the_audited_event_carries_the_tasks_run(run: int, task_id: str) -> None:
    payload = encode(AuditTask(self_edit=_EDIT, adapter=_ADAPTER, run=run))
    (task,) = audit_followups(payload, encode(AuditResult(verdict=_VERDICT)))
    assert (task.stream, task.task_id) == ("events", task_id)
    event = decode(Event, task.payload)
    assert event.audited is not None
    assert (event.job_id, event.audited.self_edit_id, event.audited.run) == ("job-1", "edit-7", run)
    assert event.audited.verdict == _VERDICT


@pytest.mark.parametrize("reward_only", [False, True])
def test_reward_only_travels_from_the_propose_task_to_every_audit(reward_only: bool) -> None:
    from seal.records import ApplyResult, ApplyTask, ProposeResult, ProposeTask
    from student.service import apply_followups
    from teacher.service import propose_followups

    propose = ProposeTask(job_id="job-1", doc_index=0, n=1, seeds=2, reward_only=reward_only)
    applies = [
        t for t in propose_followups(encode(propose), encode(ProposeResult((_EDIT,)))) if t.stream == "apply"
    ]
    assert len(applies) == 2  # one per training run
    for apply in applies:
        assert decode(ApplyTask, apply.payload).reward_only is reward_only
        (audit,) = [
            t
            for t in apply_followups(apply.payload, encode(ApplyResult(adapter=_ADAPTER)))
            if t.stream == "audit"
        ]
        assert decode(AuditTask, audit.payload).reward_only is reward_only


def test_two_runs_of_one_self_edit_never_share_an_event_id() -> None:
    result = encode(AuditResult(verdict=_VERDICT))
    ids = {
        audit_followups(encode(AuditTask(self_edit=_EDIT, adapter=_ADAPTER, run=r)), result)[0].task_id
        for r in range(3)
    }
    assert len(ids) == 3


class _CountingJudge:
    def __init__(self, model: str) -> None:
        self.model = model
        self.items = 0

    def judge_batch(self, items):
        self.items += len(items)
        return [True] * len(items)


def test_the_engine_baseline_is_judged_and_keyed_by_judge_and_style(
    tiny_model, tmp_path: Path, plane
) -> None:
    model, tokenizer = tiny_model
    judge = _CountingJudge("judge-a")
    engine = AuditorEngine(
        model, tokenizer, "f" * 64, VerdictSigner.generate(), tmp_path, Limits(), plane, judge=judge
    )
    doc = Document("T", "c", (QA("q?", "a"), QA("r?", "b")))
    first = engine._baseline(doc)
    assert [s.judged_correct for s in first] == [True, True] and judge.items == 2
    assert engine._baseline(doc) is first and judge.items == 2  # cached: not judged again
    engine.judge = _CountingJudge("judge-b")
    assert engine._baseline(doc) is not first  # another judge's grades are other grades
    engine.answer_style = "reference"
    assert engine._baseline(doc) is not first
    assert len(engine._baselines) == 3


def test_the_job_table_says_a_reward_only_verdict_is_one_not_a_failed_guardrail() -> None:
    from types import SimpleNamespace

    from seal.cli import _guardrails

    def edit(*checks: str) -> SimpleNamespace:
        return SimpleNamespace(verdict=dataclasses.replace(_VERDICT, checks=checks))

    assert (
        _guardrails(edit("tau_leak:pass", "forgetting_unchecked:fail:x")) == "reward only (no retention/KL)"
    )
    assert _guardrails(edit("tau_leak:fail:q", "retention:pass")) == "tau_leak failed"
    assert _guardrails(edit("tau_leak:pass")) == "pass"
