"""Job state in Redis, so any gateway (or a restarted one) sees every job.

Keys under the namespace:
  job:<id>        JSON {"id", "spec", "created_at", "owner"} written once at submission
  job:<id>:state  hash {state, finished_at, error}
  job:<id>:parts  hash "<self_edit_id>|<kind>" -> JSON      kinds: self_edit, adapter, verdict
  tau:<id>        JSON list of documents with τ              read by the auditor only
  jobs            sorted set of job ids by submission time
  jobs:owner:<s>  the same, of the jobs that subject <s> submitted
Each event writes its own hash field, so concurrent gateways never overwrite each other. Every key
expires after JOB_TTL_S, and each submission trims the indexes of ids older than that.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from gateway.core import TERMINAL_STATES, assemble_job, expected_edits
from seal.errors import InvalidArgument, NotFound
from seal.records import Job, JobSpec, JobState, ProposeTask, from_dict, to_dict
from seal.tasks import encode
from seal.workplane import Task, WorkPlane

JOB_TTL_S = 30 * 24 * 3600
MAX_PAGE = 100
_JOB_ID = re.compile(r"[0-9a-f]{16}")
"""What create() makes; anything else (e.g. an id with ':state' appended) names no job."""

# KEYS[1] the state hash, KEYS[2] the job itself: a job that does not exist (expired, or named by a
# forged event) gets no state, so no key without a TTL is ever made.
_SET_STATE_UNLESS_FINISHED = f"""
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local current = redis.call('HGET', KEYS[1], 'state')
if {" or ".join(f"current == '{s.value}'" for s in TERMINAL_STATES)} then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


@dataclass(frozen=True)
class JobPage:
    ids: list[str]
    next_cursor: str
    """Pass back as `cursor` for the next (older) page; empty on the last page."""


class JobStore:
    def __init__(self, plane: WorkPlane) -> None:
        self.plane = plane
        self.redis = plane.redis
        self._set_state = plane.redis.register_script(_SET_STATE_UNLESS_FINISHED)

    def _k(self, *parts: str) -> str:
        return self.plane.key(*parts)

    def _index(self, owner: str | None) -> str:
        return self._k("jobs", "owner", owner) if owner else self._k("jobs")

    def create(self, spec: JobSpec, owner: str = "") -> Job:
        """Store a validated job and enqueue one propose task per document, atomically.

        `owner` is the subject that submitted it ("" on an open API); submitters see only their own.
        """
        job_id = uuid.uuid4().hex[:16]
        now = time.time()
        meta = {"id": job_id, "spec": to_dict(spec), "created_at": now, "owner": owner}
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self._k("job", job_id), json.dumps(meta), ex=JOB_TTL_S)
        pipe.hset(self._k("job", job_id, "state"), mapping={"state": JobState.QUEUED.value})
        pipe.expire(self._k("job", job_id, "state"), JOB_TTL_S)
        pipe.set(self._k("tau", job_id), json.dumps(to_dict(spec.documents)), ex=JOB_TTL_S)
        for index in {self._index(None), self._index(owner)}:
            pipe.zadd(index, {job_id: now})
            # The jobs themselves expire after JOB_TTL_S; their ids go from the index with them.
            pipe.zremrangebyscore(index, "-inf", f"({now - JOB_TTL_S}")
            pipe.expire(index, JOB_TTL_S)
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
            self.plane.enqueue(Task("propose", f"{job_id}/{doc_index}", encode(task)), pipeline=pipe)
        pipe.execute()
        return self.get(job_id)

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job; with `owner`, only if that subject submitted it (another's job is NotFound too,
        so ids do not leak)."""
        raw = self.redis.get(self._k("job", job_id)) if _JOB_ID.fullmatch(job_id) else None
        meta = json.loads(raw) if raw is not None else None
        if meta is None or (owner is not None and meta.get("owner", "") != owner):
            raise NotFound(f"no job with id {job_id!r}")
        state = {
            k.decode(): v.decode() for k, v in self.redis.hgetall(self._k("job", job_id, "state")).items()
        }
        parts = {
            k.decode(): json.loads(v) for k, v in self.redis.hgetall(self._k("job", job_id, "parts")).items()
        }
        return assemble_job(meta, state, parts)

    def revision(self, job_id: str) -> tuple[Any, ...]:
        """A cheap marker that changes whenever the job does (one round trip), for watchers."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self._k("job", job_id, "state"))
        pipe.hlen(self._k("job", job_id, "parts"))
        state, parts = pipe.execute()
        return tuple(sorted(state.items())), parts

    def list_page(self, limit: int = 50, cursor: str = "", owner: str | None = None) -> JobPage:
        """Job ids, newest first, `limit` (1..MAX_PAGE) at a time; with `owner`, only that subject's."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument("limit", f"must be between 1 and {MAX_PAGE}, got {limit}")
        index = self._index(owner)
        if not cursor:
            rows = self.redis.zrevrangebyscore(index, "+inf", "-inf", start=0, num=limit + 1, withscores=True)
        else:
            score, after = _parse_cursor(cursor)
            # Members of equal score come in reverse lexical order: skip those up to the cursor's id.
            ties = int(self.redis.zcount(index, score, score))
            rows = self.redis.zrevrangebyscore(
                index, score, "-inf", start=0, num=limit + ties + 1, withscores=True
            )
            rows = [(m, s) for m, s in rows if s < score or m.decode() < after]
        ids = [(m.decode(), s) for m, s in rows[: limit + 1]]
        more = len(ids) > limit
        ids = ids[:limit]
        return JobPage([i for i, _ in ids], f"{ids[-1][1]!r}/{ids[-1][0]}" if more else "")

    def exists(self, job_id: str) -> bool:
        return bool(_JOB_ID.fullmatch(job_id)) and bool(self.redis.exists(self._k("job", job_id)))

    def record(self, job_id: str, self_edit_id: str, kind: str, value: dict[str, Any]) -> None:
        """Record a part once: a redelivered event writes the same value, a replayed one changes nothing."""
        key = self._k("job", job_id, "parts")
        self.redis.hsetnx(key, f"{self_edit_id}|{kind}", json.dumps(value))
        self.redis.expire(key, JOB_TTL_S)

    def set_state(self, job_id: str, state: JobState, error: str = "") -> None:
        """Move a job on; a finished job stays finished."""
        fields = ["state", state.value]
        if state in TERMINAL_STATES:
            fields += ["finished_at", str(time.time())]
        if error:
            fields += ["error", error]
        # One script, so two gateways cannot interleave the check and the write.
        self._set_state(keys=[self._k("job", job_id, "state"), self._k("job", job_id)], args=fields)

    def finish_if_complete(self, job_id: str) -> bool:
        """Succeed the job once every expected adapter has a verdict. Runs after every event, so it
        counts the verdict fields (HKEYS) instead of decoding the whole job."""
        raw = self.redis.get(self._k("job", job_id))
        if raw is None:
            return False
        spec = from_dict(JobSpec, json.loads(raw)["spec"])
        fields = self.redis.hkeys(self._k("job", job_id, "parts"))
        if sum(f.endswith(b"|verdict") for f in fields) >= expected_edits(spec):
            self.set_state(job_id, JobState.SUCCEEDED)
            return True
        return False


def _parse_cursor(cursor: str) -> tuple[float, str]:
    score, _, job_id = cursor.partition("/")
    try:
        value = float(score)
    except ValueError:
        value = float("nan")
    if value != value or not _JOB_ID.fullmatch(job_id):
        raise InvalidArgument("cursor", "is not a cursor this gateway returned; pass next_cursor unchanged")
    return value, job_id
