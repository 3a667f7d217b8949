"""The gateway's side of the work plane: fold service events and dead letters into job state.

A verdict is accepted only if its signature verifies under a trusted auditor key and it names what
this gateway recorded itself: this job, this self-edit (and the digest of its text), the adapter the
student reported for it, that adapter's base model, and the job's own questions; and it has not
expired. Every event re-checks whether the job is complete, so the order events land in never
leaves a job running.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from gateway.core import TERMINAL_STATES, job_id_of_task
from gateway.jobs import JobStore
from seal.digests import document_sha256, self_edit_sha256
from seal.errors import InvalidArgument
from seal.records import Audited, DeadLetter, Event, Job, JobState, Proposed, Trained, to_dict
from seal.signing import Expected, TrustedKeys, VerdictRejected, check_verdict
from seal.tasks import decode

log = logging.getLogger(__name__)


class NotRecordedYet(RuntimeError):
    """A verdict arrived before the events that name its self-edit and adapter: retried later."""


def expected_for(job: Job, self_edit_id: str) -> Expected:
    """What a verdict for `self_edit_id` must name, from this gateway's own records of `job`."""
    edit = next((e for d in job.documents for e in d.edits if e.self_edit.id == self_edit_id), None)
    if edit is None or edit.adapter is None:
        raise NotRecordedYet(f"self-edit {self_edit_id!r} of job {job.id} has no recorded adapter yet")
    doc_index = edit.self_edit.doc_index
    return Expected(
        job_id=job.id,
        doc_index=doc_index,
        self_edit_id=self_edit_id,
        self_edit_sha256=self_edit_sha256(edit.self_edit),
        document_sha256=document_sha256(job.spec.documents[doc_index]),
        adapter_sha256=edit.adapter.sha256,
        base_fingerprint=edit.adapter.base_fingerprint,
    )


def event_handler(store: JobStore, keys: TrustedKeys) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def proposed(job_id: str, event: Proposed) -> None:
        for se in event.self_edits:
            store.record(job_id, se.id, "self_edit", to_dict(se))
        store.set_state(job_id, JobState.RUNNING)

    def trained(job_id: str, event: Trained) -> None:
        if event.adapter is None:
            raise InvalidArgument("trained.adapter", "is required")
        store.record(job_id, event.self_edit_id, "adapter", to_dict(event.adapter))

    def audited(job_id: str, event: Audited) -> None:
        verdict = event.verdict
        if verdict is None:
            raise InvalidArgument("audited.verdict", "is required")
        job = store.get(job_id)
        if job.state in TERMINAL_STATES:
            log.warning("verdict for a finished job ignored", extra={"job_id": job.id})
            return
        try:
            if verdict.job_id != job.id or verdict.self_edit_id != event.self_edit_id:
                # Checked before looking the self-edit up: another job's self-edit is never "not yet here".
                raise VerdictRejected(
                    "wrong_job", f"verdict names job {verdict.job_id!r}, event job {job.id!r}"
                )
            check_verdict(verdict, keys, expected_for(job, verdict.self_edit_id))
        except VerdictRejected as exc:
            log.error("verdict refused", extra={"self_edit_id": event.self_edit_id, "reason": str(exc)})
            store.set_state(job.id, JobState.FAILED, error=f"verdict for {event.self_edit_id} refused: {exc}")
            return
        store.record(job.id, event.self_edit_id, "verdict", to_dict(verdict))

    def handle(payload: dict[str, Any]) -> dict[str, Any]:
        event = decode(Event, payload)
        if event.proposed is None and event.trained is None and event.audited is None:
            raise InvalidArgument("payload", "an event must be one of proposed, trained, audited")
        if not store.exists(event.job_id):  # expired, or named by a forged event: nothing to fold into
            log.warning("event for an unknown job dropped", extra={"job_id": event.job_id})
            return {}
        if event.proposed is not None:
            proposed(event.job_id, event.proposed)
        elif event.trained is not None:
            trained(event.job_id, event.trained)
        elif event.audited is not None:
            audited(event.job_id, event.audited)
        store.finish_if_complete(event.job_id)
        return {}

    return handle


def dead_letter_handler(store: JobStore) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A task that kept failing fails its job, with the reason the service gave."""

    def handle(payload: dict[str, Any]) -> dict[str, Any]:
        letter = decode(DeadLetter, payload)
        try:
            task = json.loads(letter.payload_json)
        except ValueError:
            task = {}
        job_id = job_id_of_task(letter.stream, task)
        if job_id:
            reason = (
                f"{letter.stream} task {letter.task_id} failed ({letter.attempts} attempts): {letter.reason}"
            )
            store.set_state(job_id, JobState.FAILED, error=reason)
        return {"job_id": job_id}

    return handle
