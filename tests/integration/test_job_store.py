"""The gateway's job store on a real Redis: atomic submission, and finished jobs stay finished."""

from __future__ import annotations

from gateway.jobs import JobStore
from seal.records import QA, Document, JobSpec, JobState, ProposeTask, from_json

SPEC = JobSpec(
    documents=(Document("A", "Alpha is a town.", (QA("What is Alpha?", "a town"),)),) * 2, n_self_edits=2
)


def test_submission_stores_the_job_and_one_propose_task_per_document(plane) -> None:
    job = JobStore(plane).create(SPEC)
    assert job.state == JobState.QUEUED
    entries = plane.redis.xrange(plane.stream_key("propose"))
    tasks = [from_json(ProposeTask, fields[b"payload"]) for _, fields in entries]
    assert [(t.job_id, t.doc_index, t.n, t.passage_control) for t in tasks] == [
        (job.id, 0, 2, True),
        (job.id, 1, 2, True),
    ]
    assert b"What is Alpha" not in b"".join(fields[b"payload"] for _, fields in entries)  # τ stays out
    # The enqueue markers were set too: replaying the same task ids adds nothing.
    from seal.workplane import Task

    assert not plane.enqueue(Task("propose", f"{job.id}/0", {}))


def test_a_finished_job_stays_finished(plane) -> None:
    store = JobStore(plane)
    job = store.create(SPEC)
    store.set_state(job.id, JobState.RUNNING)
    assert store.get(job.id).state == JobState.RUNNING
    store.set_state(job.id, JobState.SUCCEEDED)
    store.set_state(job.id, JobState.FAILED, error="late dead letter")
    store.set_state(job.id, JobState.RUNNING)
    finished = store.get(job.id)
    assert finished.state == JobState.SUCCEEDED and finished.error == "" and finished.finished_at > 0
