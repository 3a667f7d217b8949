"""A real `seal serve gateway` process answers /metrics in the Prometheus text format, and its
counters move as it accepts a job and folds a dead letter into it (real Redis, real gRPC)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.api import parse_job_spec
from gateway.client import GatewayClient
from seal.embedded_redis import free_port
from seal.records import JobState
from seal.signing import VerdictSigner, trust_key
from seal.workplane import WorkPlane
from tests.integration.waiting import wait_finished

JOB = {
    "n_self_edits": 1,
    "documents": [
        {
            "title": "T",
            "context": "T is a town.",
            "questions": [
                {"question": "What is T?", "answer": "a town"},
                {"question": "Which sea is it near?", "answer": "the north sea"},
            ],
        }
    ],
}


@pytest.fixture()
def gateway(redis_url: str, namespace: str, plane: WorkPlane, tmp_path: Path):
    """(gRPC address, metrics address, HTTP address) of a gateway process of this test's namespace."""
    trusted = tmp_path / "trusted-keys.json"
    trust_key(trusted, VerdictSigner.generate().public_key_bytes())
    grpc_at, metrics_at, http_at = (f"127.0.0.1:{free_port()}" for _ in range(3))
    log = tmp_path / "gateway.log"
    # Flags, not the environment, carry the settings: SEAL_* variables of the caller must not leak in.
    command = [sys.executable, "-m", "seal.cli", "serve", "gateway", "--listen", grpc_at]
    command += ["--redis-url", redis_url, "--namespace", namespace, "--data-dir", str(tmp_path / "data")]
    command += ["--trusted-keys", str(trusted), "--http-listen", http_at, "--metrics-listen", metrics_at]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"gateway exited:\n{log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(f"http://{metrics_at}/metrics", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"no /metrics after 60 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
        yield grpc_at, metrics_at, http_at
    finally:
        process.terminate()
        process.wait(timeout=30)


def _scrape(address: str) -> tuple[str, dict]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        content_type = reply.headers["Content-Type"]
        body = reply.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    return content_type, samples


def test_gateway_serves_prometheus_metrics_that_move_with_its_work(gateway, plane: WorkPlane) -> None:
    grpc_at, metrics_at, http_at = gateway
    content_type, before = _scrape(metrics_at)
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
    for stream in ("events", "dead"):
        assert before[("seal_queue_depth", (("group", "gateway"), ("stream", stream)))] == 0
        assert before[("seal_tasks_completed_total", (("service", "gateway"), ("stream", stream)))] == 0
    assert before[("seal_jobs_submitted_total", ())] == 0

    client = GatewayClient(grpc_at)
    try:
        job = client.submit(parse_job_spec(JOB))
        # No teacher runs: the propose task gives up, and the gateway's dead-letter worker fails the job.
        plane.dead_letter("propose", f"{job.id}/0", {"job_id": job.id}, "RuntimeError: teacher gone", 3)
        assert wait_finished(client, job.id, timeout_s=30).state == JobState.FAILED
    finally:
        client.close()

    _, after = _scrape(metrics_at)
    assert after[("seal_jobs_submitted_total", ())] == 1
    assert after[("seal_tasks_completed_total", (("service", "gateway"), ("stream", "dead")))] == 1
    assert after[("seal_task_latency_seconds_count", (("service", "gateway"), ("stream", "dead")))] == 1
    assert after[("seal_task_duration_seconds_count", (("service", "gateway"), ("stream", "dead")))] == 1
    # The dead-letter stream keeps its letters for operators, but none waits for the gateway now.
    assert after[("seal_queue_depth", (("group", "gateway"), ("stream", "dead")))] == 0
    # The gateway's HTTP API serves the same registry at /metrics, queue depth included.
    _, over_http = _scrape(http_at)
    for key in (
        ("seal_jobs_submitted_total", ()),
        ("seal_queue_depth", (("group", "gateway"), ("stream", "dead"))),
    ):
        assert over_http[key] == after[key]
