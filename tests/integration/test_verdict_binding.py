"""The gateway accepts a verdict only if it is signed by a trusted key and names what the gateway
recorded itself: this job, this self-edit and its text, this adapter, its base, the job's questions.

Each case here is a hole of the foundation: a verdict signed for one thing and replayed into another
was recorded, since only the signature was checked.
"""

from __future__ import annotations

import dataclasses

import pytest

from gateway.events import event_handler
from gateway.jobs import JobStore
from seal.digests import document_sha256, self_edit_sha256
from seal.records import (
    QA,
    AdapterFile,
    AdapterRef,
    Audited,
    Document,
    EditFormat,
    Event,
    JobSpec,
    JobState,
    LoraSettings,
    Proposed,
    SelfEdit,
    Trained,
    Verdict,
    to_dict,
)
from seal.signing import TrustedKeys, VerdictSigner
from seal.tasks import encode

DOC = Document("Alpha", "Alpha is a town.", (QA("What is Alpha?", "a town"),))
SPEC = JobSpec(documents=(DOC,), n_self_edits=1, passage_control=False)
AUDITOR = VerdictSigner.generate()


def _self_edit(job_id: str, text: str = "Alpha is a town by the sea.") -> SelfEdit:
    return SelfEdit(
        id=f"{job_id}/0/0",
        job_id=job_id,
        doc_index=0,
        index=0,
        format=EditFormat.IMPLICATIONS,
        passage=DOC.passage(),
        text=text,
        lines=(text,),
        lora=LoraSettings(),
        teacher_model="teacher@v1",
    )


def _adapter(self_edit: SelfEdit, sha: str = "a" * 64) -> AdapterRef:
    return AdapterRef(
        sha256=sha,
        self_edit_id=self_edit.id,
        base_model="tiny",
        base_fingerprint="f" * 64,
        size_bytes=10,
        train_seconds=1.0,
        steps=1,
        final_loss=0.5,
        student_id="student-1",
        files=(AdapterFile("adapter_model.safetensors", "b" * 64, 10),),
    )


def _verdict(self_edit: SelfEdit, adapter: AdapterRef, doc: Document = DOC, reward: float = 1.0) -> Verdict:
    return Verdict(
        job_id=self_edit.job_id,
        doc_index=0,
        self_edit_id=self_edit.id,
        adapter_sha256=adapter.sha256,
        base_fingerprint=adapter.base_fingerprint,
        baseline_accuracy=0.0,
        adapted_accuracy=reward,
        reward=reward,
        baseline_scores=(),
        adapted_scores=(),
        eval_seconds=1.0,
        passed=True,
        checks=("tau_leak:pass",),
        self_edit_sha256=self_edit_sha256(self_edit),
        document_sha256=document_sha256(doc),
        teacher_model=self_edit.teacher_model,
    )


def _event(job_id: str, verdict: Verdict) -> dict:
    return encode(Event(job_id=job_id, audited=Audited(self_edit_id=verdict.self_edit_id, verdict=verdict)))


def _proposed(job_id: str, edit: SelfEdit) -> dict:
    return encode(Event(job_id=job_id, proposed=Proposed(doc_index=0, self_edits=(edit,))))


def _trained(job_id: str, edit: SelfEdit, adapter: AdapterRef) -> dict:
    return encode(Event(job_id=job_id, trained=Trained(self_edit_id=edit.id, adapter=adapter)))


def _proposed_and_trained(store: JobStore, handle):  # noqa: ANN001, ANN202
    """A new job whose self-edit the teacher proposed and the student trained, as their events say."""
    job = store.create(SPEC)
    edit = _self_edit(job.id)
    adapter = _adapter(edit)
    handle(_proposed(job.id, edit))
    handle(_trained(job.id, edit, adapter))
    return job, edit, adapter


@pytest.fixture()
def running(plane):
    """A job whose self-edit was proposed and trained, as the teacher's and student's events say."""
    store = JobStore(plane)
    handle = event_handler(store, TrustedKeys.of(AUDITOR.public_key_bytes()))
    job, edit, adapter = _proposed_and_trained(store, handle)
    return store, handle, job, edit, adapter


def test_a_verdict_naming_what_was_recorded_is_accepted_and_finishes_the_job(running) -> None:
    store, handle, job, edit, adapter = running
    handle(_event(job.id, AUDITOR.sign(_verdict(edit, adapter))))
    done = store.get(job.id)
    assert done.state == JobState.SUCCEEDED, done.error
    assert done.documents[0].edits[0].verdict.reward == 1.0


def _other_job_verdict(store, edit, adapter):  # noqa: ANN001, ANN202
    other = store.create(SPEC)
    other_edit = _self_edit(other.id)
    return _verdict(other_edit, _adapter(other_edit))


REFUSALS = {
    # A verdict signed for another job, replayed into this one's events.
    "wrong_job": lambda store, edit, adapter: _other_job_verdict(store, edit, adapter),
    # The same self-edit id with other text: not what the teacher proposed.
    "wrong_self_edit": lambda store, edit, adapter: _verdict(
        dataclasses.replace(edit, text="Alpha is a city.", lines=("Alpha is a city.",)), adapter
    ),
    # Another adapter than the one the student reported for this self-edit.
    "wrong_adapter": lambda store, edit, adapter: _verdict(edit, _adapter(edit, sha="c" * 64)),
    # Scored on questions the caller chose (e.g. the adapter's own answers as gold), not the job's.
    "wrong_questions": lambda store, edit, adapter: _verdict(
        edit, adapter, doc=dataclasses.replace(DOC, questions=(QA("What is Alpha?", "whatever it says"),))
    ),
    # Another base model than the adapter was trained on.
    "wrong_base": lambda store, edit, adapter: dataclasses.replace(
        _verdict(edit, adapter), base_fingerprint="0" * 64
    ),
}


@pytest.mark.parametrize("code", list(REFUSALS))
def test_a_verdict_for_something_else_is_refused_and_not_recorded(running, code: str) -> None:
    store, handle, job, edit, adapter = running
    handle(_event(job.id, AUDITOR.sign(REFUSALS[code](store, edit, adapter))))
    refused = store.get(job.id)
    assert refused.state == JobState.FAILED and code in refused.error
    assert refused.documents[0].edits[0].verdict is None


def test_an_untrusted_key_tampered_field_or_expired_verdict_is_refused(plane) -> None:
    store = JobStore(plane)
    handle = event_handler(store, TrustedKeys.of(AUDITOR.public_key_bytes()))
    cases = {
        "unknown_key": lambda v: VerdictSigner.generate().sign(v),
        "altered": lambda v: dataclasses.replace(AUDITOR.sign(v), reward=0.5),
        "expired": lambda v: AUDITOR.sign(v, ttl_s=-1),
    }
    for code, make in cases.items():
        job, edit, adapter = _proposed_and_trained(store, handle)
        handle(_event(job.id, make(_verdict(edit, adapter))))
        refused = store.get(job.id)
        assert refused.state == JobState.FAILED and code in refused.error, code


def test_a_replayed_verdict_cannot_change_a_finished_job(running) -> None:
    """The foundation let an event added to the stream flip a finished job's best reward."""
    store, handle, job, edit, adapter = running
    handle(_event(job.id, AUDITOR.sign(_verdict(edit, adapter, reward=0.0))))
    assert store.get(job.id).state == JobState.SUCCEEDED
    handle(_event(job.id, AUDITOR.sign(_verdict(edit, adapter, reward=1.0))))
    after = store.get(job.id)
    assert after.state == JobState.SUCCEEDED
    assert after.documents[0].edits[0].verdict.reward == 0.0


def test_a_verdict_before_its_adapter_is_recorded_is_retried_not_lost(plane) -> None:
    from gateway.events import NotRecordedYet

    store = JobStore(plane)
    handle = event_handler(store, TrustedKeys.of(AUDITOR.public_key_bytes()))
    job = store.create(SPEC)
    edit = _self_edit(job.id)
    adapter = _adapter(edit)
    event = _event(job.id, AUDITOR.sign(_verdict(edit, adapter)))
    handle(_proposed(job.id, edit))
    with pytest.raises(NotRecordedYet):  # the worker retries it after a backoff
        handle(event)
    handle(_trained(job.id, edit, adapter))
    handle(event)
    assert store.get(job.id).state == JobState.SUCCEEDED


def test_a_job_whose_last_event_lands_after_its_last_verdict_still_finishes(plane) -> None:
    """Every event re-checks completion: the foundation checked only on verdicts."""
    store = JobStore(plane)
    handle = event_handler(store, TrustedKeys.of(AUDITOR.public_key_bytes()))
    job, edit, adapter = _proposed_and_trained(store, handle)
    # The verdict part lands (e.g. a gateway died after writing it, before checking completion)...
    store.record(job.id, edit.id, "verdict", to_dict(AUDITOR.sign(_verdict(edit, adapter))))
    assert store.get(job.id).state == JobState.RUNNING
    # ...and the next event of the job, whatever it is, finishes it.
    handle(_trained(job.id, edit, adapter))
    assert store.get(job.id).state == JobState.SUCCEEDED


@pytest.mark.parametrize(
    "payload",
    [
        {"job_id": "x", "audited": {"self_edit_id": 7}},
        {"job_id": "x", "proposed": {"doc_index": "zero"}},
        {"job_id": "x", "type": "verdict"},
        {"job_id": "x"},
    ],
    ids=["wrong-type", "bad-int", "unknown-field", "no-kind"],
)
def test_a_malformed_event_is_refused_before_anything_is_recorded(plane, payload) -> None:
    """Events are proto messages parsed strictly; a bad one is InvalidArgument (dead-lettered at once)."""
    from seal.errors import InvalidArgument

    handle = event_handler(JobStore(plane), TrustedKeys.of(AUDITOR.public_key_bytes()))
    with pytest.raises(InvalidArgument):
        handle(payload)
    assert not list(plane.redis.scan_iter(plane.key("job", "*")))


def test_events_for_a_job_that_does_not_exist_write_nothing(plane) -> None:
    """A forged or late event for an unknown (or expired) job leaves no key behind, with or without TTL."""
    store = JobStore(plane)
    handle = event_handler(store, TrustedKeys.of(AUDITOR.public_key_bytes()))
    ghost = "0123456789abcdef"
    edit = _self_edit(ghost)
    handle(_proposed(ghost, edit))
    handle(_trained(ghost, edit, _adapter(edit)))
    store.set_state(ghost, JobState.FAILED, error="late dead letter")
    assert list(plane.redis.scan_iter(plane.key("job", "*"))) == []
