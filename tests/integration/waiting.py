"""Waiting on jobs in integration tests."""

from __future__ import annotations

import time

from gateway.client import GatewayClient
from seal.records import Job, JobState


def wait_finished(client: GatewayClient, job_id: str, timeout_s: float = 240) -> Job:
    """Poll until the job succeeds or fails; a job still running at the deadline fails the test."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if job.state in (JobState.SUCCEEDED, JobState.FAILED):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not finish in {timeout_s} s: {client.get(job_id).progress}")
