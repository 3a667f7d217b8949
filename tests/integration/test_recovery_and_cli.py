"""A worker killed mid-task loses no work; `seal demo` and `seal up` work as commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.api import parse_job_spec
from gateway.client import GatewayClient
from seal.config import SERVICE_KINDS
from seal.embedded_redis import free_port
from seal.records import JobState
from seal.stack import LocalStack
from seal.tls import TlsFiles
from seal.tls import channel as open_channel
from tests.conftest import delete_namespace
from tests.integration.waiting import wait_finished

LONG_CONTEXT = " ".join(f"Gamma street number {i} has a blue door and a red roof." for i in range(60))


def test_task_of_a_killed_student_is_reclaimed_and_the_job_completes(
    tiny_model_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    fast_reclaim = {kind: ["--visibility-timeout-s", "3"] for kind in SERVICE_KINDS}
    stack = LocalStack(
        model=str(tiny_model_dir),
        data_dir=tmp_path,
        redis_url=redis_url,
        namespace=f"seal-it-{uuid.uuid4().hex[:8]}",
        extra_flags=fast_reclaim,
    )
    with stack:
        client = GatewayClient(stack.addresses["gateway"], token=stack.operator_token)
        spec = parse_job_spec(
            {
                "n_self_edits": 1,
                "passage_control": False,
                "sampling": {"max_new_tokens": 8},
                "lora": {"epochs": 40, "rank": 4},  # long enough to be killed mid-training
                "documents": [
                    {
                        "title": "Gamma",
                        "context": LONG_CONTEXT,
                        "questions": [
                            {"question": "What colour are the doors?", "answer": "blue"},
                            {"question": "Which sea is it near?", "answer": "the north sea"},
                        ],
                    }
                ],
            }
        )
        job = client.submit(spec)
        r = redis.Redis.from_url(stack.redis_url)
        apply_stream = f"{stack.namespace}:stream:apply"
        deadline = time.monotonic() + 60
        while not _pending(r, apply_stream):  # the student has taken the task and is training
            assert time.monotonic() < deadline, "the student never took the task"
            time.sleep(0.05)
        stack.processes["student"].send_signal(signal.SIGKILL)
        stack.processes["student"].wait(timeout=10)
        assert client.get(job.id).progress.trained == 0

        stack.processes["student"] = stack._spawn("student")
        stack._wait_healthy("student", time.monotonic() + 60)
        finished = wait_finished(client, job.id, timeout_s=180)
        assert finished.state == JobState.SUCCEEDED, finished.error
        assert finished.progress.trained == finished.progress.audited == 1
        assert "reclaimed stuck task" in stack.log_path("student").read_text()
        assert _pending(r, apply_stream) == 0
    delete_namespace(redis_url, stack.namespace)


def _pending(r: redis.Redis, stream: str, group: str = "student") -> int:
    try:
        return int(r.xpending(stream, group)["pending"])
    except redis.ResponseError:  # the group does not exist yet
        return 0


def test_seal_demo_prints_the_table(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = {
        "n_self_edits": 1,
        "lora": {"epochs": 1, "rank": 4},
        "sampling": {"max_new_tokens": 16},
        "documents": [
            {
                "title": "Delta",
                "context": "Delta is a harbour city.",
                "questions": [
                    {"question": "What is Delta?", "answer": "a harbour city"},
                    {"question": "Which sea is it near?", "answer": "the north sea"},
                ],
            }
        ],
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "seal.cli",
            "demo",
            "--model",
            str(tiny_model_dir),
            "--file",
            str(tmp_path / "job.json"),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        # no Redis given: the demo starts an embedded one, and keeps out of any shared Redis
        env={k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "SEAL_REDIS_URL")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "no adaptation" in result.stdout
        and "self-edits, mean" in result.stdout
        and "best (oracle)" in result.stdout
    )
    assert "Delta" in result.stdout
    assert "peak resident memory: teacher" in result.stdout
    assert "guardrail failures: tau_leak 0/2, retention" in result.stdout


def test_seal_up_serves_until_interrupted(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With no Redis given, `seal up` starts an embedded one; Ctrl-C stops every child."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "seal.cli",
            "up",
            "--model",
            str(tiny_model_dir),
            "--data-dir",
            str(tmp_path),
            "--gateway-listen",
            f"127.0.0.1:{free_port()}",
            "--http-listen",
            f"127.0.0.1:{free_port()}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        while not (lines and lines[-1] == "}"):
            line = proc.stdout.readline()
            assert line, f"seal up exited early: {''.join(lines)}"
            lines.append(line.rstrip("\n"))
        addresses = json.loads("\n".join(lines[lines.index("{") :]))
        assert redis.Redis.from_url(addresses["redis"]).ping()
        tls = TlsFiles(
            tmp_path / "tls" / "ca.pem", tmp_path / "tls" / "client.pem", tmp_path / "tls" / "client.key"
        )
        with open_channel(addresses["gateway"], tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(addresses["redis"], socket_connect_timeout=1).ping()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["serve", "student", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["serve", "student", "--listen", "nowhere"], "address must be host:port"),
        (["serve", "auditor", "--visibility-timeout-s", "soon"], "visibility_timeout_s must be a number"),
    ],
)
def test_bad_service_configuration_is_a_one_line_error(args: list[str], says: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "seal.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert says in result.stderr
    assert "Traceback" not in result.stderr
