"""The gateway's request logic, shared by the gRPC and HTTP front ends (no transport here)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gateway.core import TERMINAL_STATES
from gateway.jobs import JobStore
from seal.errors import InvalidArgument
from seal.records import Job, JobSpec, RecordError, from_dict
from seal.validation import Limits, validate_job_spec


@dataclass
class GatewayApi:
    store: JobStore
    limits: Limits
    deployment_model: str

    def submit(self, spec: JobSpec) -> Job:
        validate_job_spec(spec, self.limits, self.deployment_model)
        return self.store.create(spec)

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def watch(self, job_id: str, poll_s: float = 0.5, is_active: Any = lambda: True) -> Iterator[Job]:
        """The job each time it changes, ending with its finished state."""
        last = None
        while is_active():
            job = self.store.get(job_id)
            if job != last:
                yield job
                last = job
            if job.state in TERMINAL_STATES:
                return
            time.sleep(poll_s)


def parse_job_spec(data: Any) -> JobSpec:
    """A JobSpec from JSON (HTTP body, CLI file); missing settings take their defaults."""
    if not isinstance(data, dict):
        raise InvalidArgument("body", "must be a JSON object with a 'documents' list")
    try:
        return from_dict(JobSpec, data)
    except RecordError as exc:
        raise InvalidArgument(exc.path or "body", exc.message) from None
