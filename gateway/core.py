"""Pure job logic: assemble a Job from what the services reported, pick the best self-edit."""

from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from typing import Any

from seal.errors import InvalidArgument
from seal.records import (
    AdapterRef,
    ApplyTask,
    AuditTask,
    Document,
    DocumentResult,
    EditFormat,
    EditResult,
    Event,
    Job,
    JobSpec,
    JobState,
    PolicyTask,
    Progress,
    ProposeTask,
    SeedRun,
    SelfEdit,
    Verdict,
    from_dict,
    sha256_text,
)
from seal.tasks import TASK_TYPES, decode
from seal.validation import signoff_count

TERMINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED)


def split_signoff(doc: Document, fraction: float) -> Document:
    """`doc` with signoff_count(n, fraction) of its questions moved to its sign-off questions.

    Which ones is fixed by the questions' text (ordered by sha256), not their position, so the split is
    reproducible and does not favour the end of a passage. A document that already names sign-off
    questions, or a fraction of 0, is kept as it is.
    """
    k = signoff_count(len(doc.questions), fraction)
    if doc.signoff_questions or k == 0:
        return doc
    ranked = sorted(range(len(doc.questions)), key=lambda i: sha256_text(doc.questions[i].question))
    held = set(ranked[:k])
    return dataclasses.replace(
        doc,
        questions=tuple(qa for i, qa in enumerate(doc.questions) if i not in held),
        signoff_questions=tuple(qa for i, qa in enumerate(doc.questions) if i in held),
    )


def expected_edits(spec: JobSpec) -> int:
    """Self-edits a job proposes in all: N per document, plus the passage-only control."""
    return len(spec.documents) * (spec.n_self_edits + int(spec.passage_control))


def expected_runs(spec: JobSpec) -> int:
    """Adapters a job trains and audits in all: every self-edit once per seed."""
    return expected_edits(spec) * max(spec.seeds, 1)


def split_run(edit_run_id: str) -> tuple[str, int]:
    """("<self_edit_id>", run) of a run id as seal.tasks.run_task_id writes it."""
    edit_id, sep, run = edit_run_id.rpartition("#")
    return (edit_id, int(run)) if sep and run.isdigit() else (edit_run_id, 0)


def edit_result(self_edit: SelfEdit, runs: dict[int, dict[str, Any]]) -> EditResult:
    """A self-edit with its training runs; its reward is the mean over the audited runs."""
    seed_runs = [
        SeedRun(
            run=run,
            adapter=from_dict(AdapterRef, p["adapter"]) if "adapter" in p else None,
            verdict=from_dict(Verdict, p["verdict"]) if "verdict" in p else None,
        )
        for run, p in sorted(runs.items())
    ]
    first = next((r for r in seed_runs if r.run == 0), SeedRun(0))
    rewards = [r.verdict.reward for r in seed_runs if r.verdict is not None]
    return EditResult(
        self_edit=self_edit,
        adapter=first.adapter,
        verdict=first.verdict,
        more_runs=tuple(r for r in seed_runs if r.run != 0),
        reward=statistics.fmean(rewards) if rewards else None,
        reward_std=statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
    )


def best_self_edit(edits: list[EditResult]) -> str:
    """The audited self-edit with the highest mean reward over its runs; ties go to the first.

    The control never counts, nor does a self-edit that leaked τ in any run: its reward measures
    copying the answers, not learning. Other guardrails (forgetting) gate promotion through
    `Verdict.passed`, not the ranking.
    """
    scored = [e for e in edits if e.reward is not None and rankable(e)]
    if not scored:
        return ""
    return max(scored, key=lambda e: (e.reward, -e.self_edit.index)).self_edit.id  # type: ignore[arg-type,return-value]


def rankable(edit: EditResult) -> bool:
    """A sampled self-edit (not the control) none of whose verdicts caught it leaking τ."""
    leaked = any(r.verdict is not None and "tau_leak" in r.verdict.failed_checks() for r in edit.runs())
    return edit.self_edit.format != EditFormat.PASSAGE and not leaked


def assemble_job(meta: dict[str, Any], state: dict[str, str], parts: dict[str, str]) -> Job:
    """Build the Job record from its stored pieces.

    meta: {"id", "spec", "created_at"}; state: {"state", "finished_at", "error"};
    parts: "<self_edit_id>|self_edit" and "<run id>|adapter|verdict" -> JSON-decoded record dicts,
    where a run id is the self-edit's id for run 0 and "<self_edit_id>#<run>" after.
    """
    spec = from_dict(JobSpec, meta["spec"])
    self_edits: dict[str, dict[str, Any]] = {}
    runs: dict[str, dict[int, dict[str, Any]]] = defaultdict(lambda: defaultdict(dict))
    for key, value in parts.items():
        run_id, kind = key.rsplit("|", 1)
        if kind == "self_edit":
            self_edits[run_id] = value
        else:
            edit_id, run = split_run(run_id)
            runs[edit_id][run][kind] = value
    results = [
        edit_result(from_dict(SelfEdit, se), runs.get(edit_id, {})) for edit_id, se in self_edits.items()
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
            self_edits=expected_runs(spec),
            trained=sum(r.adapter is not None for e in results for r in e.runs()),
            audited=sum(r.verdict is not None for e in results for r in e.runs()),
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
    if isinstance(task, (ProposeTask, Event, PolicyTask)):
        return task.job_id
    if isinstance(task, (ApplyTask, AuditTask)) and task.self_edit is not None:
        return task.self_edit.job_id
    return ""
