"""Pure job logic: assemble a Job from what the services reported, pick the best self-edit."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from seal.errors import InvalidArgument
from seal.records import (
    AdapterRef,
    ApplyTask,
    AuditTask,
    DocumentResult,
    EditFormat,
    EditResult,
    Event,
    Job,
    JobSpec,
    JobState,
    Progress,
    ProposeTask,
    SelfEdit,
    Verdict,
    from_dict,
)
from seal.tasks import TASK_TYPES, decode

TERMINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED)


def expected_edits(spec: JobSpec) -> int:
    """Adapters a job trains and audits in all: N per document, plus the passage-only control."""
    return len(spec.documents) * (spec.n_self_edits + int(spec.passage_control))


def best_self_edit(edits: list[EditResult]) -> str:
    """The audited self-edit with the highest reward; ties go to the first.

    The control never counts, nor does a self-edit that leaked τ: its reward measures copying the
    answers, not learning. Other guardrails (forgetting) gate promotion through `Verdict.passed`,
    not the ranking.
    """
    scored = [
        e
        for e in edits
        if e.verdict is not None
        and "tau_leak" not in e.verdict.failed_checks()
        and e.self_edit.format != EditFormat.PASSAGE
    ]
    if not scored:
        return ""
    return max(scored, key=lambda e: (e.verdict.reward, -e.self_edit.index)).self_edit.id  # type: ignore[union-attr]


def assemble_job(meta: dict[str, Any], state: dict[str, str], parts: dict[str, str]) -> Job:
    """Build the Job record from its stored pieces.

    meta: {"id", "spec", "created_at"}; state: {"state", "finished_at", "error"};
    parts: "<self_edit_id>|self_edit|adapter|verdict" -> JSON-decoded record dicts.
    """
    spec = from_dict(JobSpec, meta["spec"])
    by_edit: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, value in parts.items():
        edit_id, kind = key.rsplit("|", 1)
        by_edit[edit_id][kind] = value
    results = [
        EditResult(
            self_edit=from_dict(SelfEdit, p["self_edit"]),
            adapter=from_dict(AdapterRef, p["adapter"]) if "adapter" in p else None,
            verdict=from_dict(Verdict, p["verdict"]) if "verdict" in p else None,
        )
        for p in by_edit.values()
        if "self_edit" in p
    ]
    documents = tuple(_document_result(i, doc.title, results) for i, doc in enumerate(spec.documents))
    return Job(
        id=meta["id"],
        spec=spec,
        created_at=meta["created_at"],
        state=JobState(state.get("state", JobState.QUEUED.value)),
        finished_at=float(state.get("finished_at", 0.0)),
        error=state.get("error", ""),
        progress=Progress(
            documents=len(spec.documents),
            proposed=len({r.self_edit.doc_index for r in results}),
            self_edits=expected_edits(spec),
            trained=sum(r.adapter is not None for r in results),
            audited=sum(r.verdict is not None for r in results),
        ),
        documents=documents,
    )


def _document_result(doc_index: int, title: str, results: list[EditResult]) -> DocumentResult:
    edits = sorted(
        (r for r in results if r.self_edit.doc_index == doc_index),
        key=lambda r: (r.self_edit.format == EditFormat.PASSAGE, r.self_edit.index),
    )
    baseline = next((r.verdict.baseline_accuracy for r in edits if r.verdict is not None), None)
    return DocumentResult(
        doc_index=doc_index,
        title=title,
        baseline_accuracy=baseline,
        edits=tuple(edits),
        best_self_edit_id=best_self_edit(edits),
    )


def job_id_of_task(stream: str, payload: dict[str, Any]) -> str:
    """The job a (dead-lettered) task belonged to, whatever its stream; "" if it cannot be read."""
    task_type = TASK_TYPES.get(stream)
    try:
        task = decode(task_type, payload) if task_type is not None else None
    except InvalidArgument:
        return ""
    if isinstance(task, (ProposeTask, Event)):
        return task.job_id
    if isinstance(task, (ApplyTask, AuditTask)) and task.self_edit is not None:
        return task.self_edit.job_id
    return ""
