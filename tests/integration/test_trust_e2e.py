"""Trust across real processes: any number of auditors, each with its own key, and only trusted keys;
a student away for 30 s that comes back on another port delays a job but does not fail it.

The foundation's gateway trusted the key of one auditor address (a second auditor failed every job),
and audits retried three times about 2 s apart against the address the adapter named (a student
down 15 s, or back on a new port, failed the job).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.api import parse_job_spec
from gateway.client import GatewayClient
from seal.config import SERVICE_KINDS
from seal.embedded_redis import free_port
from seal.records import JobState
from seal.signing import VerdictSigner, trust_key
from seal.stack import LocalStack
from tests.conftest import delete_namespace
from tests.integration.waiting import wait_finished

JOB = {
    "n_self_edits": 2,
    "passage_control": False,
    "lora": {"epochs": 1, "rank": 4},
    "sampling": {"max_new_tokens": 16},
    "documents": [
        {
            "title": "Omega",
            "context": "Omega is a lake town with a lighthouse.",
            "questions": [
                {"question": "What does Omega have?", "answer": "a lighthouse"},
                {"question": "Which sea is it near?", "answer": "the north sea"},
            ],
        }
    ],
}
SECOND_AUDITOR = VerdictSigner.generate()


@pytest.fixture(scope="module")
def stack(
    tiny_model_dir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    data_dir = tmp_path_factory.mktemp("trust-stack")
    running = LocalStack(
        model=str(tiny_model_dir),
        data_dir=data_dir,
        redis_url=redis_url,
        namespace=f"seal-trust-{uuid.uuid4().hex[:8]}",
        threads=1,
        extra_flags={kind: ["--visibility-timeout-s", "5"] for kind in SERVICE_KINDS},
    )
    # The operator lists a second auditor's public key beside the stack's own before starting.
    trust_key(running.trusted_keys_path(), SECOND_AUDITOR.public_key_bytes())
    with running:
        yield running
    delete_namespace(redis_url, running.namespace)


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> GatewayClient:
    return GatewayClient(stack.addresses["gateway"], token=stack.operator_token)


def _serve_auditor(stack: LocalStack, key: Path, name: str) -> subprocess.Popen[bytes]:
    """Another auditor process on its own port, data dir and signing key (a host of its own)."""
    flags = ["--listen", f"127.0.0.1:{free_port()}", "--namespace", stack.namespace, "--model", stack.model]
    flags += ["--data-dir", str(stack.data_dir / name), "--signing-key", str(key), "--threads", "1"]
    log = open(stack.data_dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
    env = {**os.environ, "SEAL_REDIS_URL": stack.redis_url}
    return subprocess.Popen(
        [sys.executable, "-m", "seal.cli", "serve", "auditor", *flags], stdout=log, stderr=log, env=env
    )


def _replace_auditor(stack: LocalStack, key: Path, name: str) -> subprocess.Popen[bytes]:
    own = stack.processes["auditor"]
    if own.poll() is None:
        own.send_signal(signal.SIGTERM)
        own.wait(timeout=60)
    return _serve_auditor(stack, key, name)


def _write_key(path: Path, signer: VerdictSigner) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        signer._private_key.private_bytes(  # noqa: SLF001 - a test writes the key it made
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def test_a_second_auditor_with_its_own_trusted_key_completes_jobs(
    stack: LocalStack, client: GatewayClient
) -> None:
    second = _replace_auditor(stack, _write_key(stack.data_dir / "second.key", SECOND_AUDITOR), "auditor-2")
    try:
        job = wait_finished(client, client.submit(parse_job_spec(JOB)).id, timeout_s=180)
        assert job.state == JobState.SUCCEEDED, job.error
        key_ids = {e.verdict.auditor_key_id for d in job.documents for e in d.edits}
        assert key_ids == {SECOND_AUDITOR.key_id}
    finally:
        second.terminate()
        second.wait(timeout=60)


def test_an_auditor_whose_key_is_not_trusted_gets_every_verdict_refused(
    stack: LocalStack, client: GatewayClient
) -> None:
    stranger = VerdictSigner.generate()
    rogue = _replace_auditor(stack, _write_key(stack.data_dir / "stranger.key", stranger), "auditor-rogue")
    try:
        job = wait_finished(client, client.submit(parse_job_spec(JOB)).id, timeout_s=180)
        assert job.state == JobState.FAILED and "unknown_key" in job.error
        assert all(e.verdict is None for d in job.documents for e in d.edits)
    finally:
        rogue.terminate()
        rogue.wait(timeout=60)


def test_a_student_away_30_s_and_back_on_another_port_delays_the_job_but_does_not_fail_it(
    stack: LocalStack, client: GatewayClient
) -> None:
    # The auditor is held back until every adapter is trained, so it must fetch them while the
    # student that holds them is gone.
    auditor = _replace_auditor(stack, stack.signing_key_path(), "auditor-3")
    auditor.send_signal(signal.SIGSTOP)
    try:
        job = client.submit(parse_job_spec(JOB))
        deadline = time.monotonic() + 180
        while client.get(job.id).progress.trained < 2:
            assert time.monotonic() < deadline, "the student never trained both self-edits"
            time.sleep(0.5)
        student = stack.processes["student"]
        student.send_signal(signal.SIGKILL)
        student.wait(timeout=10)
        auditor.send_signal(signal.SIGCONT)

        time.sleep(30)
        assert client.get(job.id).state == JobState.RUNNING  # delayed, not failed
        old_address = stack.addresses["student"]
        stack.addresses["student"] = f"127.0.0.1:{free_port()}"
        assert stack.addresses["student"] != old_address
        stack.processes["student"] = stack._spawn("student")  # same data dir: same id, same adapters
        stack._wait_healthy("student", time.monotonic() + 120)

        finished = wait_finished(client, job.id, timeout_s=240)
        assert finished.state == JobState.SUCCEEDED, finished.error
        assert finished.progress.audited == 2
        assert "adapter not fetched yet, retrying" in (stack.data_dir / "logs" / "auditor-3.log").read_text()
    finally:
        auditor.send_signal(signal.SIGCONT)
        auditor.terminate()
        auditor.wait(timeout=60)
