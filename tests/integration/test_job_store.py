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


def _signed_verdict_event(job_id: str, signer):  # noqa: ANN001, ANN202
    from seal.records import Verdict, to_dict

    verdict = Verdict(
        job_id, 0, f"{job_id}/0/0", "a" * 64, "f" * 64, 0.0, 1.0, 1.0, (), (), 1.0, True, ("tau_leak:pass",)
    )
    signed = signer.sign(verdict)
    return signed, {
        "type": "verdict",
        "job_id": job_id,
        "self_edit_id": signed.self_edit_id,
        "verdict": to_dict(signed),
    }


def test_gateway_records_a_verdict_only_with_the_auditors_signature(plane) -> None:
    from auditor.signing import VerdictSigner
    from gateway.events import SigningKeys, event_handler

    store = JobStore(plane)
    auditor, impostor = VerdictSigner.generate(), VerdictSigner.generate()
    fetches = []

    def fetch() -> tuple[str, bytes]:
        fetches.append(1)
        return auditor.key_id, auditor.public_key_bytes()

    handle = event_handler(store, SigningKeys(fetch))
    job = store.create(SPEC)
    _, genuine = _signed_verdict_event(job.id, auditor)
    handle(genuine)
    assert plane.redis.hexists(plane.key("job", job.id, "parts"), f"{job.id}/0/0|verdict")
    assert store.get(job.id).state == JobState.QUEUED  # recorded, job not failed

    forged_job = store.create(SPEC)
    _, forged = _signed_verdict_event(forged_job.id, impostor)  # an unknown key: fetched, still refused
    handle(forged)
    refused = store.get(forged_job.id)
    assert refused.state == JobState.FAILED and "not signed by the auditor" in refused.error
    assert not plane.redis.hexists(plane.key("job", forged_job.id, "parts"), f"{forged_job.id}/0/0|verdict")

    tampered_job = store.create(SPEC)
    _, tampered = _signed_verdict_event(tampered_job.id, auditor)
    tampered["verdict"]["reward"] = 0.5  # a changed field breaks the signature
    handle(tampered)
    assert store.get(tampered_job.id).state == JobState.FAILED
    assert len(fetches) == 2  # the known key is cached; only the impostor's id caused a second fetch
