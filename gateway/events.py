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
from typing import TYPE_CHECKING, Any

from gateway.conductor import Conductor
from gateway.core import TERMINAL_STATES, job_id_of_task
from gateway.jobs import JobStore
from seal.digests import document_sha256, self_edit_sha256
from seal.errors import InvalidArgument
from seal.records import Audited, DeadLetter, Event, Job, JobState, Proposed, Trained, to_dict
from seal.signing import Expected, TrustedKeys, VerdictRejected, check_verdict
from seal.tasks import decode, run_task_id

if TYPE_CHECKING:
    from gateway.deployments import DeploymentStore

log = logging.getLogger(__name__)


class NotRecordedYet(RuntimeError):
    """A verdict arrived before the events that name its self-edit and adapter: retried later."""


def expected_for(job: Job, self_edit_id: str, run: int = 0) -> Expected:
    """What a verdict for run `run` of `self_edit_id` must name, from this gateway's own records."""
    edit = next((e for d in job.documents for e in d.edits if e.self_edit.id == self_edit_id), None)
    adapter = next((r.adapter for r in edit.runs() if r.run == run), None) if edit is not None else None
    if edit is None or adapter is None:
        raise NotRecordedYet(
            f"run {run} of self-edit {self_edit_id!r} of job {job.id} has no recorded adapter yet"
        )
    doc_index = edit.self_edit.doc_index
    return Expected(
        job_id=job.id,
        doc_index=doc_index,
        self_edit_id=self_edit_id,
        self_edit_sha256=self_edit_sha256(edit.self_edit),
        document_sha256=document_sha256(job.spec.documents[doc_index]),
        adapter_sha256=adapter.sha256,
        base_fingerprint=adapter.base_fingerprint,
    )


def event_handler(
    store: JobStore, keys: TrustedKeys, deployments: DeploymentStore | None = None
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    conductor = Conductor(store)

    def proposed(job_id: str, event: Proposed) -> None:
        for se in event.self_edits:
            store.record(job_id, se.id, "self_edit", to_dict(se))
        store.set_state(job_id, JobState.RUNNING)

    def trained(job_id: str, event: Trained) -> None:
        if event.adapter is None:
            raise InvalidArgument("trained.adapter", "is required")
        store.record(job_id, run_task_id(event.self_edit_id, event.run), "adapter", to_dict(event.adapter))

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
            check_verdict(verdict, keys, expected_for(job, verdict.self_edit_id, event.run))
        except VerdictRejected as exc:
            log.error("verdict refused", extra={"self_edit_id": event.self_edit_id, "reason": str(exc)})
            store.set_state(job.id, JobState.FAILED, error=f"verdict for {event.self_edit_id} refused: {exc}")
            return
        store.record(job.id, run_task_id(event.self_edit_id, event.run), "verdict", to_dict(verdict))
        if deployments is not None:
            deployments.audit(
                "verdict",
                f"auditor:{verdict.auditor_key_id}",
                f"job:{job.id}",
                {
                    "self_edit_id": verdict.self_edit_id,
                    "run": event.run,
                    "adapter_sha256": verdict.adapter_sha256,
                    "reward": verdict.reward,
                    "signoff": [verdict.signoff_baseline_accuracy, verdict.signoff_adapted_accuracy],
                    "passed": verdict.passed,
                    "checks": list(verdict.checks),
                    "signature": verdict.signature,
                },
            )

    def handle(payload: dict[str, Any]) -> dict[str, Any]:
        event = decode(Event, payload)
        kinds = (event.proposed, event.trained, event.audited, event.policy_trained, event.certified)
        if all(kind is None for kind in kinds):
            raise InvalidArgument(
                "payload", "an event must be one of proposed, trained, audited, policy_trained, certified"
            )
        if event.certified is not None:
            if deployments is None or event.certified.certificate is None:
                raise InvalidArgument("certified", "this gateway keeps no deployments, or no certificate")
            deployments.certified(event.certified.certificate)
            return {}
        if not store.exists(event.job_id):  # expired, or named by a forged event: nothing to fold into
            log.warning("event for an unknown job dropped", extra={"job_id": event.job_id})
            return {}
        if event.proposed is not None:
            proposed(event.job_id, event.proposed)
        elif event.trained is not None:
            trained(event.job_id, event.trained)
        elif event.audited is not None:
            audited(event.job_id, event.audited)
        elif event.policy_trained is not None:
            conductor.policy_trained(event.job_id, event.policy_trained)
        store.finish_if_complete(event.job_id)
        conductor.round_changed(event.job_id)
        return {}

    return handle


def dead_letter_handler(
    store: JobStore, deployments: DeploymentStore | None = None
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A task that kept failing fails its job, with the reason the service gave (and a failed round
    fails its policy-training job)."""
    conductor = Conductor(store)

    def handle(payload: dict[str, Any]) -> dict[str, Any]:
        letter = decode(DeadLetter, payload)
        try:
            task = json.loads(letter.payload_json)
        except ValueError:
            task = {}
        if letter.stream == "certify" and deployments is not None:
            name, _, number = letter.task_id.rpartition("/")
            if number.isdigit():
                deployments.fail_certification(name, int(number), f"certification failed: {letter.reason}")
            return {}
        job_id = job_id_of_task(letter.stream, task)
        if job_id:
            reason = (
                f"{letter.stream} task {letter.task_id} failed ({letter.attempts} attempts): {letter.reason}"
            )
            store.set_state(job_id, JobState.FAILED, error=reason)
            conductor.round_changed(job_id)
        return {"job_id": job_id}

    return handle
