"""The gateway's request logic, shared by the gRPC and HTTP front ends (no transport here)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gateway.core import TERMINAL_STATES
from gateway.jobs import JobStore
from seal.errors import InvalidArgument
from seal.records import EditFormat, Job, JobSpec, from_dict
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
    fmt = data.get("edit_format", EditFormat.IMPLICATIONS.value)
    allowed = [f.value for f in EditFormat if f != EditFormat.PASSAGE]
    if fmt not in allowed:
        raise InvalidArgument("edit_format", f"must be one of {', '.join(allowed)}, got {fmt!r}")
    if not isinstance(data.get("documents", []), list):
        raise InvalidArgument("documents", "must be a list of {title, context, questions}")
    for i, doc in enumerate(data.get("documents", [])):
        if not isinstance(doc, dict) or not isinstance(doc.get("questions", []), list):
            raise InvalidArgument(f"documents[{i}]", "must be an object {title, context, questions: [...]}")
        for j, qa in enumerate(doc.get("questions", [])):
            if not isinstance(qa, dict):
                raise InvalidArgument(
                    f"documents[{i}].questions[{j}]", "must be an object {question, answer}"
                )
    try:
        return from_dict(JobSpec, data)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument("body", str(exc)) from None
