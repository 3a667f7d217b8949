"""Job state in Redis, so any gateway (or a restarted one) sees every job.

Keys under the namespace:
  job:<id>        JSON {"id", "spec", "created_at", "owner"} written once at submission
  job:<id>:state  hash {state, finished_at, error}
  job:<id>:parts  hash "<run id>|<kind>" -> JSON      kinds: self_edit, adapter, verdict (see
                  gateway.core.assemble_job); a policy-training job's hash holds
                  "round/<r>|job|policy|selected|trained" instead
  tau:<id>        JSON list of documents with τ              read by the auditor only
  jobs            sorted set of job ids by submission time
  jobs:owner:<s>  the same, of the jobs that subject <s> submitted
  policy:<v>      JSON PolicyVersion of a trained teacher policy (lineage); policies: zset by time
Each event writes its own hash field, so concurrent gateways never overwrite each other. Every key
expires after JOB_TTL_S, and each submission trims the indexes of ids older than that.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from gateway.core import TERMINAL_STATES, assemble_job, expected_runs, split_signoff
from gateway.rounds import round_job_id, round_result, round_spec
from seal.errors import InvalidArgument, NotFound
from seal.records import (
    Job,
    JobSpec,
    JobState,
    PolicyVersion,
    Progress,
    ProposeTask,
    RoundResult,
    from_dict,
    to_dict,
)
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
    def __init__(self, plane: WorkPlane, signoff_fraction: float = 0.0) -> None:
        self.plane = plane
        # Knowledge jobs' documents are split into selection and sign-off questions (gateway.core).
        self.signoff_fraction = signoff_fraction
        self.redis = plane.redis
        self._set_state = plane.redis.register_script(_SET_STATE_UNLESS_FINISHED)

    def _k(self, *parts: str) -> str:
        return self.plane.key(*parts)

    def _index(self, owner: str | None) -> str:
        return self._k("jobs", "owner", owner) if owner else self._k("jobs")

    def create(self, spec: JobSpec, owner: str = "") -> Job:
        """Store a validated job and enqueue its first work, atomically.

        `owner` is the subject that submitted it ("" on an open API); submitters see only their own.
        A knowledge-incorporation job enqueues one propose task per document; a policy-training job
        starts its first round's job in the same transaction.
        """
        job_id = uuid.uuid4().hex[:16]
        pipe = self.redis.pipeline(transaction=True)
        if spec.policy_training is None:
            # The job records its split, so every verdict names (and every reader sees) the same τ.
            documents = tuple(split_signoff(doc, self.signoff_fraction) for doc in spec.documents)
            self._create(pipe, job_id, dataclasses.replace(spec, documents=documents), owner)
        else:
            self._create(pipe, job_id, spec, owner, state=JobState.RUNNING)
            # Round 1 samples with the version the job names ("" = the base policy), and learns on from it.
            self._start_round(pipe, job_id, spec, owner, 1, spec.policy_version)
        pipe.execute()
        return self.get(job_id)

    def start_round(self, parent: Job, round_number: int, policy_version: str) -> None:
        """Start round `round_number` of a policy-training job with `policy_version`; a second call
        for the same round changes nothing (the round's job id is fixed)."""
        owner = self._owner(parent.id)
        if self.exists(round_job_id(parent.id, round_number)):
            return
        pipe = self.redis.pipeline(transaction=True)
        self._start_round(pipe, parent.id, parent.spec, owner, round_number, policy_version)
        pipe.execute()

    def _start_round(
        self, pipe: Any, parent_id: str, spec: JobSpec, owner: str, round_number: int, policy_version: str
    ) -> None:
        child_id = round_job_id(parent_id, round_number)
        self._create(pipe, child_id, round_spec(spec, parent_id, policy_version), owner)
        parts = self._k("job", parent_id, "parts")
        pipe.hsetnx(parts, f"round/{round_number}|job", json.dumps(child_id))
        pipe.hsetnx(parts, f"round/{round_number}|policy", json.dumps(policy_version))
        pipe.expire(parts, JOB_TTL_S)

    def _create(
        self, pipe: Any, job_id: str, spec: JobSpec, owner: str, state: JobState = JobState.QUEUED
    ) -> None:
        now = time.time()
        meta = {"id": job_id, "spec": to_dict(spec), "created_at": now, "owner": owner}
        pipe.set(self._k("job", job_id), json.dumps(meta), ex=JOB_TTL_S)
        pipe.hset(self._k("job", job_id, "state"), mapping={"state": state.value})
        pipe.expire(self._k("job", job_id, "state"), JOB_TTL_S)
        if spec.policy_training is not None:
            return  # the rounds' jobs carry the work; τ is read from them
        pipe.set(self._k("tau", job_id), json.dumps(to_dict(spec.documents)), ex=JOB_TTL_S)
        # Rounds of a policy-training job are listed under it, not beside it.
        indexes = {self._index(None), self._index(owner)} if not spec.parent_job_id else set()
        for index in indexes:
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
                policy_version=spec.policy_version,
                teacher_model=spec.teacher_model,
                seeds=spec.seeds,
                samples_per_edit=spec.samples_per_edit,
                # A round's adapters are scored for the policy, never promoted (gateway.rounds).
                reward_only=bool(spec.parent_job_id),
            )
            self.plane.enqueue(Task("propose", f"{job_id}/{doc_index}", encode(task)), pipeline=pipe)

    def _owner(self, job_id: str) -> str:
        raw = self.redis.get(self._k("job", job_id))
        return str(json.loads(raw).get("owner", "")) if raw is not None else ""

    def parent_of(self, job_id: str) -> str:
        """The policy-training job `job_id` is a round of, or ""."""
        raw = self.redis.get(self._k("job", job_id)) if _JOB_ID.fullmatch(job_id) else None
        return str(json.loads(raw)["spec"].get("parent_job_id", "")) if raw is not None else ""

    def state(self, job_id: str) -> JobState:
        """A job's state alone (one HGET), without assembling the job."""
        raw = self.redis.hget(self._k("job", job_id, "state"), "state")
        return JobState(raw.decode()) if raw is not None else JobState.QUEUED

    def touch(self, job_id: str) -> None:
        """Mark a job changed for its watchers (a policy job when one of its rounds moves)."""
        self.redis.hincrby(self._k("job", job_id, "state"), "changes", 1)

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
        if "policy_training" in meta["spec"] and meta["spec"]["policy_training"] is not None:
            return self._policy_job(meta, state, parts)
        return assemble_job(meta, state, parts)

    def _policy_job(self, meta: dict[str, Any], state: dict[str, str], parts: dict[str, Any]) -> Job:
        """A policy-training job: its rounds, each from its own round job, and the current one's progress."""
        job = assemble_job(meta, state, {})
        rounds: list[RoundResult] = []
        current: Job | None = None
        for number in sorted({int(k.split("|")[0].split("/")[1]) for k in parts if k.startswith("round/")}):
            child_id = parts.get(f"round/{number}|job", "")
            child = self.get(child_id) if child_id and self.exists(child_id) else None
            trained = parts.get(f"round/{number}|trained")
            rounds.append(
                round_result(
                    number,
                    child,
                    parts.get(f"round/{number}|policy", ""),
                    from_dict(PolicyVersion, trained) if trained is not None else None,
                    int(parts.get(f"round/{number}|selected", 0)),
                )
            )
            current = child or current
        last = next((r.trained.version for r in reversed(rounds) if r.trained is not None), "")
        progress = current.progress if current is not None else Progress(documents=len(job.spec.documents))
        training = job.spec.policy_training
        return dataclasses.replace(
            job,
            rounds=tuple(rounds),
            policy_version=last,
            progress=dataclasses.replace(
                progress, round=len(rounds), rounds=training.rounds if training is not None else 0
            ),
        )

    def record_round(self, parent_id: str, round_number: int, kind: str, value: Any) -> bool:
        """Record one fact of a round once (HSETNX); True if this call wrote it."""
        key = self._k("job", parent_id, "parts")
        written = bool(self.redis.hsetnx(key, f"round/{round_number}|{kind}", json.dumps(value)))
        self.redis.expire(key, JOB_TTL_S)
        return written

    def save_policy(self, policy: PolicyVersion) -> None:
        """List a trained policy version (its lineage) for ListPolicies / GetPolicy and submissions."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self._k("policy", policy.version), json.dumps(to_dict(policy)))
        pipe.zadd(self._k("policies"), {policy.version: policy.created_at or time.time()})
        pipe.execute()

    def get_policy(self, version: str) -> PolicyVersion:
        raw = self.redis.get(self._k("policy", version)) if re.fullmatch(r"[0-9a-f]{64}", version) else None
        if raw is None:
            raise NotFound(f"no policy version {version!r}; list them with ListPolicies (GET /v1/policies)")
        return from_dict(PolicyVersion, json.loads(raw))

    def list_policies(self, limit: int = MAX_PAGE) -> list[PolicyVersion]:
        versions = [v.decode() for v in self.redis.zrevrange(self._k("policies"), 0, limit - 1)]
        return [self.get_policy(v) for v in versions]

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
        if spec.policy_training is not None:
            return False  # finished by its last round (gateway.conductor)
        fields = self.redis.hkeys(self._k("job", job_id, "parts"))
        if sum(f.endswith(b"|verdict") for f in fields) >= expected_runs(spec):
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
