"""Faults survived: a service SIGKILLed mid-task, and Redis (with an append-only file) killed mid-job.

One supervised stack for the module, on a redis-server of the test's own (AOF, password, spare port),
so every fault restarts something real and the module ends by checking that nothing was left behind
in Redis. The student's SIGKILL is in test_recovery_and_cli.py (restarted by the test, not the
supervisor); the namespaced-network test is in test_netns.py.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from gateway.api import parse_job_spec
from gateway.client import GatewayClient
from seal.config import SERVICE_KINDS
from seal.embedded_redis import EmbeddedRedis, start_redis
from seal.records import Job, JobState
from seal.stack import LocalStack, RestartPolicy
from tests.integration.test_recovery_and_cli import _pending

FAULT_JOB = {
    "n_self_edits": 3,
    "lora": {"epochs": 1, "rank": 4},
    "sampling": {"max_new_tokens": 24},
    "documents": [
        {
            "title": "Kappa",
            "context": "Kappa is a village on a hill with a stone bridge and a mill.",
            "questions": [
                {"question": "Where is Kappa?", "answer": "on a hill"},
                {"question": "What does Kappa have?", "answer": "a stone bridge"},
            ],
        }
    ],
}
NAMESPACE = "seal-faults"
# Short timeouts: a killed worker's task is reclaimed 4 s after its last heartbeat.
FAST = {kind: ["--visibility-timeout-s", "4"] for kind in SERVICE_KINDS}
WORK_STREAMS = ("propose", "apply", "audit", "events")


@pytest.fixture(scope="module")
def aof_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = start_redis(data_dir=tmp_path_factory.mktemp("aof-redis"))
    assert "appendonly yes" in (server.data_dir / "redis.conf").read_text()  # type: ignore[operator]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(
    tiny_model_dir: Path, aof_redis: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with LocalStack(
        model=str(tiny_model_dir),
        data_dir=tmp_path_factory.mktemp("fault-stack"),
        redis_url=aof_redis.url,
        namespace=NAMESPACE,
        threads=1,
        extra_flags=FAST,
        supervise=True,
        restart_policy=RestartPolicy(first_delay_s=0.5),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> GatewayClient:
    return GatewayClient(stack.addresses["gateway"])


def wait_finished_through_outages(client: GatewayClient, job_id: str, timeout_s: float = 150) -> Job:
    """Like waiting.wait_finished, but a gateway or Redis that is briefly away is waited for."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            job = client.get(job_id)
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
                raise
        else:
            if job.state in (JobState.SUCCEEDED, JobState.FAILED):
                return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not finish in {timeout_s} s: {client.get(job_id).progress}")


def wait_until_taken(r: redis.Redis, stream: str, group: str, timeout_s: float = 90) -> None:
    """Return once a worker of `group` holds a task of `stream` (it is mid-task)."""
    key, deadline = f"{NAMESPACE}:stream:{stream}", time.monotonic() + timeout_s
    while not _pending(r, key, group):
        assert time.monotonic() < deadline, f"no {group} ever took a {stream} task"
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("kind", "stream"),
    [
        ("teacher", "propose"),  # killed while generating self-edits
        ("auditor", "audit"),  # killed while evaluating an adapter
        ("gateway", "apply"),  # killed while the student trains: its events wait for the new gateway
    ],
)
def test_a_job_completes_after_a_service_is_killed_mid_task(
    stack: LocalStack, client: GatewayClient, aof_redis: EmbeddedRedis, kind: str, stream: str
) -> None:
    r = redis.Redis.from_url(aof_redis.url)
    job = client.submit(parse_job_spec(FAULT_JOB))
    victim = stack.processes[kind]
    restarts = stack.restarts(kind)
    wait_until_taken(r, stream, "student" if kind == "gateway" else kind)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)

    finished = wait_finished_through_outages(client, job.id)
    assert finished.state == JobState.SUCCEEDED, finished.error
    assert finished.progress.audited == finished.progress.self_edits == 4  # 3 self-edits + passage
    assert stack.restarts(kind) == restarts + 1
    assert stack.processes[kind].pid != victim.pid
    if kind != "gateway":  # the new process (or a peer) took over the task the dead one held
        assert "reclaimed stuck task" in stack.log_path(kind).read_text()


def test_a_job_completes_after_redis_is_killed_and_restarted_from_its_aof(
    stack: LocalStack, client: GatewayClient, aof_redis: EmbeddedRedis
) -> None:
    r = redis.Redis.from_url(aof_redis.url)
    job = client.submit(parse_job_spec(FAULT_JOB))
    wait_until_taken(r, "apply", "student")
    aof_redis.process.kill()  # SIGKILL: no shutdown save; only what the AOF already holds survives
    aof_redis.process.wait()
    time.sleep(2)  # every service sees Redis gone
    aof_redis.launch()  # same port, data dir and password

    finished = wait_finished_through_outages(client, job.id)
    assert finished.state == JobState.SUCCEEDED, finished.error
    assert finished.progress.audited == 4
    assert all(proc.poll() is None for proc in stack.processes.values())  # no service died of it


def test_after_the_faults_the_work_streams_are_empty_and_every_work_key_expires(
    stack: LocalStack, aof_redis: EmbeddedRedis
) -> None:
    r = redis.Redis.from_url(aof_redis.url)
    deadline = time.monotonic() + 30  # the last events are acked just after the job is marked done
    while sum(r.xlen(f"{NAMESPACE}:stream:{s}") for s in WORK_STREAMS) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {s: r.xlen(f"{NAMESPACE}:stream:{s}") for s in WORK_STREAMS} == dict.fromkeys(WORK_STREAMS, 0)
    work_keys = [
        k.decode()
        for prefix in ("attempts", "enqueued", "result")
        for k in r.scan_iter(f"{NAMESPACE}:{prefix}:*")
    ]
    assert work_keys
    assert [k for k in work_keys if r.ttl(k) < 0] == []
