"""The gateway's request logic, shared by the gRPC and HTTP front ends (no transport here).

Every call names its caller (a Principal from gateway.auth): a submitter reaches only its own jobs,
an operator every job. Watchers are bounded across both front ends by one WatcherSlots.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from gateway.auth import ANONYMOUS, Principal, authorize
from gateway.core import TERMINAL_STATES
from gateway.deployments import DeploymentStore
from gateway.jobs import JobPage, JobStore
from seal import metrics
from seal.errors import FailedPrecondition, InvalidArgument, Refused, ResourceExhausted
from seal.records import (
    Approval,
    Deployment,
    DeploymentVersion,
    Job,
    JobSpec,
    KillSwitch,
    PolicyVersion,
    RecordError,
    from_dict,
)
from seal.validation import Limits, validate_job_spec

log = logging.getLogger(__name__)


def actor_of(principal: Principal) -> str:
    """Who an audit entry or an approval names: the token's subject ("anonymous" on an open API)."""
    return principal.subject or "anonymous"


class WatcherSlots:
    """At most `limit` jobs watched at once, over gRPC and HTTP together."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_watchers must be >= 1, got {limit}")
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()

    def acquire(self) -> Callable[[], None]:
        """Take a slot (ResourceExhausted when none is left); returns its release, safe to call twice."""
        with self._lock:
            if self.open >= self.limit:
                raise ResourceExhausted(
                    f"{self.limit} watchers are open, the most this gateway serves (max_watchers); "
                    "retry later, or poll the job instead of watching it"
                )
            self.open += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self.open -= 1

        return release


class JobWatch:
    """One watcher of one job, holding a watcher slot until close(). Polling costs one round trip
    (the job's revision) unless the job changed."""

    def __init__(self, store: JobStore, job_id: str, owner: str | None, release: Callable[[], None]) -> None:
        self.store, self.owner, self.close = store, owner, release
        self.revision = store.revision(job_id)  # before the read, so a change in between is seen next
        self.job = store.get(job_id, owner)

    @property
    def finished(self) -> bool:
        return self.job.state in TERMINAL_STATES

    def poll(self) -> Job | None:
        """The job if it changed since the last poll, else None."""
        revision = self.store.revision(self.job.id)
        if revision == self.revision:
            return None
        self.revision = revision
        job = self.store.get(self.job.id, self.owner)
        if job == self.job:
            return None
        self.job = job
        return job


@dataclass
class GatewayApi:
    store: JobStore
    limits: Limits
    deployment_model: str
    watchers: WatcherSlots = field(default_factory=lambda: WatcherSlots(256))
    poll_s: float = 0.5
    """How often a watcher re-reads its job's revision."""
    deployments: DeploymentStore | None = None
    """The registry of served models (promotion, rollback, kill switch) and the audit log's writer."""

    def submit(self, spec: JobSpec, principal: Principal = ANONYMOUS) -> Job:
        authorize(principal, "submit_job")
        validate_job_spec(spec, self.limits, self.deployment_model)
        self._check_kill_switch()
        if spec.policy_version:
            self.store.get_policy(spec.policy_version)  # NotFound names it before anything is enqueued
        job = self.store.create(spec, owner=principal.subject)
        metrics.job_submitted()
        self._audit(
            "submission",
            principal,
            f"job:{job.id}",
            {"documents": [d.title for d in job.spec.documents], "n_self_edits": spec.n_self_edits},
        )
        return job

    def _check_kill_switch(self) -> None:
        if self.deployments is not None:
            switch = self.deployments.kill_switch()
            if switch.on:
                raise Refused(
                    "kill_switch",
                    f"adaptation is stopped ({switch.reason}, by {switch.actor or 'anonymous'}); "
                    "an operator turns it off with `seal kill-switch off`",
                )

    def _audit(self, kind: str, principal: Principal, subject: str, body: dict[str, Any]) -> None:
        if self.deployments is not None:
            self.deployments.audit(kind, actor_of(principal), subject, body)

    # --- deployments: promotion, approvals, rollback, kill switch ---------------------------------

    def _registry(self) -> DeploymentStore:
        if self.deployments is None:
            raise FailedPrecondition("this gateway keeps no deployment registry")
        return self.deployments

    def promote(
        self,
        name: str,
        job_id: str,
        self_edit_id: str,
        run: int = 0,
        alias: str = "",
        principal: Principal = ANONYMOUS,
    ) -> DeploymentVersion:
        authorize(principal, "promote")
        return self._registry().promote(name, job_id, self_edit_id, run, alias, actor_of(principal))

    def approve(
        self, name: str, adapter_sha256: str, comment: str = "", principal: Principal = ANONYMOUS
    ) -> Approval:
        authorize(principal, "approve")
        return self._registry().approve(name, adapter_sha256, actor_of(principal), comment)

    def rollback(self, name: str, alias: str, version: int, principal: Principal = ANONYMOUS) -> Deployment:
        authorize(principal, "rollback")
        return self._registry().rollback(name, alias, version, actor_of(principal))

    def list_deployments(self, principal: Principal = ANONYMOUS) -> list[Deployment]:
        authorize(principal, "list_deployments")
        return self._registry().list()

    def get_deployment(self, name: str, principal: Principal = ANONYMOUS) -> Deployment:
        authorize(principal, "get_deployment")
        return self._registry().get(name)

    def set_kill_switch(self, on: bool, reason: str, principal: Principal = ANONYMOUS) -> KillSwitch:
        authorize(principal, "set_kill_switch")
        return self._registry().set_kill_switch(on, reason, actor_of(principal))

    def kill_switch_state(self) -> dict[str, Any] | None:
        """The kill switch as /healthz shows it (no caller needed: health is public); None without a registry."""
        if self.deployments is None:
            return None
        try:
            state = self.deployments.kill_switch()
        except redis.RedisError:
            return None
        return {"on": state.on, "reason": state.reason} if state.on else {"on": False}

    def get_kill_switch(self, principal: Principal = ANONYMOUS) -> KillSwitch:
        authorize(principal, "get_kill_switch")
        return self._registry().kill_switch()

    def get(self, job_id: str, principal: Principal = ANONYMOUS) -> Job:
        authorize(principal, "get_job")
        return self.store.get(job_id, principal.owner_filter)

    def list_policies(self, principal: Principal = ANONYMOUS) -> list[PolicyVersion]:
        """Trained teacher policy versions, newest first."""
        authorize(principal, "list_policies")
        return self.store.list_policies()

    def get_policy(self, version: str, principal: Principal = ANONYMOUS) -> PolicyVersion:
        authorize(principal, "get_policy")
        return self.store.get_policy(version)

    def list_jobs(
        self, principal: Principal = ANONYMOUS, limit: int = 50, cursor: str = "", owner: str | None = None
    ) -> JobPage:
        """The caller's jobs, newest first; an operator sees everyone's, or one `owner`'s."""
        authorize(principal, "list_jobs")
        if owner is not None and owner != principal.subject:
            authorize(principal, "list_jobs_of_any_owner")
        return self.store.list_page(limit, cursor, principal.owner_filter if owner is None else owner)

    def open_watch(self, job_id: str, principal: Principal = ANONYMOUS) -> JobWatch:
        """Start watching a job; the caller must close() the watch (ResourceExhausted when full)."""
        authorize(principal, "watch_job")
        release = self.watchers.acquire()
        try:
            return JobWatch(self.store, job_id, principal.owner_filter, release)
        except BaseException:
            release()
            raise

    def watch(
        self, job_id: str, principal: Principal = ANONYMOUS, is_active: Any = lambda: True
    ) -> Iterator[Job]:
        """The job each time it changes, ending with its finished state (for a thread per stream)."""
        watch = self.open_watch(job_id, principal)
        try:
            yield watch.job
            while not watch.finished and is_active():
                time.sleep(self.poll_s)
                job = watch.poll()
                if job is not None:
                    yield job
        finally:
            watch.close()


class RedisProbe:
    """Pings Redis every `interval_s` on a thread; `serving` is whether it answered the last ping.
    `on_change(serving)` runs on each change (the gateway sets its gRPC health with it)."""

    def __init__(
        self,
        client: redis.Redis,
        on_change: Callable[[bool], None] = lambda serving: None,
        interval_s: float = 1.0,
    ) -> None:
        self.client, self.on_change, self.interval_s = client, on_change, interval_s
        self.serving = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        try:
            serving = bool(self.client.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            serving = False
        if serving != self.serving:
            self.serving = serving
            (log.info if serving else log.error)(
                "redis " + ("answers again" if serving else "does not answer")
            )
            self.on_change(serving)
        return serving

    def start(self) -> RedisProbe:
        self.check()
        self._thread = threading.Thread(target=self._run, name="redis-probe", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def parse_job_spec(data: Any) -> JobSpec:
    """A JobSpec from JSON (HTTP body, CLI file); missing settings take their defaults."""
    if not isinstance(data, dict):
        raise InvalidArgument("body", "must be a JSON object with a 'documents' list")
    try:  # strict: wrong JSON types and lone surrogates are refused with their path (seal.records)
        return from_dict(JobSpec, data)
    except RecordError as exc:
        raise InvalidArgument(exc.path or "body", exc.message) from None
