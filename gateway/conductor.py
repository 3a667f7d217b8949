"""The gateway's conductor of policy-training jobs: it moves a job from round to round.

Driven by the same events as every job, and idempotent, so a redelivered event or a restarted
gateway repeats nothing: a round's job id is fixed (gateway.rounds.round_job_id), its M-step task id
is fixed ("<job>/<round>" on seal:policy, enqueued once), and each fact of a round is recorded once.
"""

from __future__ import annotations

import logging
import re

from gateway.core import TERMINAL_STATES
from gateway.jobs import JobStore
from gateway.rounds import policy_task
from seal.errors import InvalidArgument
from seal.records import JobState, PolicyTrained, to_dict
from seal.tasks import encode
from seal.workplane import Task

log = logging.getLogger(__name__)


def serving(version: str) -> str:
    return f"the last good policy, {version}, stays serving" if version else "the base policy stays serving"


class Conductor:
    def __init__(self, store: JobStore) -> None:
        self.store = store

    def round_changed(self, round_job_id: str) -> None:
        """After any change to a job: if it is a finished round, fail the parent or start its M-step."""
        parent_id = self.store.parent_of(round_job_id)
        if not parent_id or not self.store.exists(parent_id):
            return
        self.store.touch(parent_id)
        # Every event of a round lands here: read its state alone, and the whole job only at its end.
        if self.store.state(round_job_id) not in TERMINAL_STATES:
            return
        round_job = self.store.get(round_job_id)
        parent = self.store.get(parent_id)
        if parent.state in TERMINAL_STATES:
            return
        this = next((r for r in parent.rounds if r.job_id == round_job_id), None)
        if this is None:
            return
        if round_job.state == JobState.FAILED:
            self._fail(parent_id, f"round {this.round} failed: {round_job.error}", parent.policy_version)
            return
        try:
            task = policy_task(parent, this.round, round_job, this.policy_version)
        except InvalidArgument as exc:
            self._fail(parent_id, f"round {this.round}: {exc.message}", parent.policy_version)
            return
        self.store.record_round(parent_id, this.round, "selected", len(task.examples))
        if self.store.plane.enqueue(Task("policy", f"{parent_id}/{this.round}", encode(task))):
            log.info(
                "policy update enqueued",
                extra={"job_id": parent_id, "round": this.round, "examples": len(task.examples)},
            )

    def policy_trained(self, parent_id: str, event: PolicyTrained) -> None:
        """A round's M-step is done: list the version, then start the next round or finish the job."""
        policy = event.policy
        if policy is None or not re.fullmatch(r"[0-9a-f]{64}", policy.version):
            raise InvalidArgument("policy_trained.policy.version", "must be a 64-hex manifest digest")
        parent = self.store.get(parent_id)
        training = parent.spec.policy_training
        if training is None:
            raise InvalidArgument("job_id", f"job {parent_id} is not a policy-training job")
        if parent.state in TERMINAL_STATES:
            return
        self.store.save_policy(policy)
        self.store.record_round(parent_id, event.round, "trained", to_dict(policy))
        if event.round >= training.rounds:
            self.store.set_state(parent_id, JobState.SUCCEEDED)
        else:
            self.store.start_round(self.store.get(parent_id), event.round + 1, policy.version)
        self.store.touch(parent_id)

    def _fail(self, parent_id: str, reason: str, last_version: str) -> None:
        self.store.set_state(parent_id, JobState.FAILED, error=f"{reason}; {serving(last_version)}")
