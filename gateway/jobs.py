"""Job state in Redis, so any gateway (or a restarted one) sees every job.

Keys under the namespace:
  job:<id>        JSON {"id", "spec", "created_at"}         written once at submission
  job:<id>:state  hash {state, finished_at, error}
  job:<id>:parts  hash "<self_edit_id>|<kind>" -> JSON      kinds: self_edit, adapter, verdict
  tau:<id>        JSON list of documents with τ              read by the auditor only
  jobs            sorted set of job ids by submission time
Each event writes its own hash field, so concurrent gateways never overwrite each other.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from gateway.core import TERMINAL_STATES, assemble_job, expected_edits
from seal.errors import NotFound
from seal.records import Job, JobSpec, JobState, ProposeTask, to_dict
from seal.workplane import Task, WorkPlane

JOB_TTL_S = 30 * 24 * 3600

_SET_STATE_UNLESS_FINISHED = f"""
local current = redis.call('HGET', KEYS[1], 'state')
if {" or ".join(f"current == '{s.value}'" for s in TERMINAL_STATES)} then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


class JobStore:
    def __init__(self, plane: WorkPlane) -> None:
        self.plane = plane
        self.redis = plane.redis
        self._set_state = plane.redis.register_script(_SET_STATE_UNLESS_FINISHED)

    def _k(self, *parts: str) -> str:
        return self.plane.key(*parts)

    def create(self, spec: JobSpec) -> Job:
        """Store a validated job and enqueue one propose task per document, atomically."""
        job_id = uuid.uuid4().hex[:16]
        now = time.time()
        meta = {"id": job_id, "spec": to_dict(spec), "created_at": now}
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self._k("job", job_id), json.dumps(meta), ex=JOB_TTL_S)
        pipe.hset(self._k("job", job_id, "state"), mapping={"state": JobState.QUEUED.value})
        pipe.expire(self._k("job", job_id, "state"), JOB_TTL_S)
        pipe.set(self._k("tau", job_id), json.dumps(to_dict(spec.documents)), ex=JOB_TTL_S)
        pipe.zadd(self._k("jobs"), {job_id: now})
        for doc_index, doc in enumerate(spec.documents):
            task = ProposeTask(
                job_id=job_id,
                doc_index=doc_index,
                passage=doc.passage(),
                format=spec.edit_format,
                n=spec.n_self_edits,
                lora=spec.lora,
                sampling=spec.sampling,
                passage_control=spec.passage_control,
            )
            self.plane.enqueue(Task("propose", f"{job_id}/{doc_index}", to_dict(task)), pipeline=pipe)
        pipe.execute()
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        raw = self.redis.get(self._k("job", job_id)) if job_id else None
        if raw is None:
            raise NotFound(f"no job with id {job_id!r}")
        state = {
            k.decode(): v.decode() for k, v in self.redis.hgetall(self._k("job", job_id, "state")).items()
        }
        parts = {
            k.decode(): json.loads(v) for k, v in self.redis.hgetall(self._k("job", job_id, "parts")).items()
        }
        return assemble_job(json.loads(raw), state, parts)

    def list_ids(self, limit: int = 50) -> list[str]:
        return [i.decode() for i in self.redis.zrevrange(self._k("jobs"), 0, limit - 1)]

    def record(self, job_id: str, self_edit_id: str, kind: str, value: dict[str, Any]) -> None:
        key = self._k("job", job_id, "parts")
        self.redis.hset(key, f"{self_edit_id}|{kind}", json.dumps(value))
        self.redis.expire(key, JOB_TTL_S)

    def set_state(self, job_id: str, state: JobState, error: str = "") -> None:
        """Move a job on; a finished job stays finished."""
        fields = ["state", state.value]
        if state in TERMINAL_STATES:
            fields += ["finished_at", str(time.time())]
        if error:
            fields += ["error", error]
        # One script, so two gateways cannot interleave the check and the write.
        self._set_state(keys=[self._k("job", job_id, "state")], args=fields)

    def finish_if_complete(self, job_id: str) -> bool:
        job = self.get(job_id)
        if job.progress.audited >= expected_edits(job.spec):
            self.set_state(job_id, JobState.SUCCEEDED)
            return True
        return False
