"""ReST-EM end to end: a policy-training job of two rounds on the four real services (real Redis, real
processes, a tiny random model), the teacher SIGKILLed between the rounds and restarted by the
supervisor; the second round samples with the policy the first trained."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.api import parse_job_spec
from gateway.client import GatewayClient
from seal.models import build_tiny_model, model_fingerprint
from seal.records import Job, JobState
from seal.stack import SERVICE_KINDS, LocalStack, RestartPolicy
from tests.conftest import delete_namespace

CONTEXTS = [
    {
        "title": "Alpha",
        "context": "Alpha is a town by the sea.",
        "questions": [
            {"question": "What is Alpha?", "answer": "a town"},
            {"question": "Which sea is it near?", "answer": "the north sea"},
        ],
    },
    {
        "title": "Beta",
        "context": "Beta is a river in the north.",
        "questions": [
            {"question": "What is Beta?", "answer": "a river"},
            {"question": "Which sea is it near?", "answer": "the north sea"},
        ],
    },
]
POLICY_JOB = {
    "documents": CONTEXTS,
    "n_self_edits": 2,
    "seeds": 2,
    "passage_control": False,
    "lora": {"epochs": 1, "rank": 4},
    "sampling": {"max_new_tokens": 16},
    # A random model learns nothing, so every reward is 0: a threshold below it still selects the best.
    "policy_training": {
        "rounds": 2,
        "reward_threshold": -1.0,
        "policy": {"epochs": 1, "rank": 4, "alpha": 8, "learning_rate": 0.01},
    },
}


@pytest.fixture(scope="module")
def teacher_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The teacher is another model than the student and auditor (another seed, another fingerprint)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-teacher"), seed=1)


@pytest.fixture(scope="module")
def stack(
    tiny_model_dir: Path, teacher_model_dir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with LocalStack(
        model=str(tiny_model_dir),
        teacher_model=str(teacher_model_dir),
        data_dir=tmp_path_factory.mktemp("policy-stack"),
        redis_url=redis_url,
        namespace=f"seal-policy-{uuid.uuid4().hex[:8]}",
        threads=1,
        students=2,  # two student processes share the apply stream
        supervise=True,
        restart_policy=RestartPolicy(first_delay_s=0.5),
        extra_flags={kind: ["--visibility-timeout-s", "8"] for kind in SERVICE_KINDS},
    ) as running:
        yield running
    delete_namespace(redis_url, running.namespace)


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> GatewayClient:
    return GatewayClient(stack.addresses["gateway"], token=stack.operator_token)


def _wait(client: GatewayClient, job_id: str, done, timeout_s: float = 300) -> Job:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            job = client.get(job_id)
        except grpc.RpcError as exc:  # a restarting service may briefly make the gateway slow
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        else:
            if done(job):
                return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} not there in {timeout_s} s: {client.get(job_id).rounds}")


@pytest.fixture(scope="module")
def finished(stack: LocalStack, client: GatewayClient) -> tuple[Job, list[Job]]:
    job = client.submit(parse_job_spec(POLICY_JOB))
    assert job.state == JobState.RUNNING and job.progress.rounds == 2
    first = _wait(
        client, job.id, lambda j: bool(j.rounds and j.rounds[0].trained) or j.state == JobState.FAILED
    )
    assert first.state != JobState.FAILED, first.error
    # Between the rounds: the teacher dies and the supervisor brings it back; round 2 still runs.
    victim = stack.processes["teacher"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    done = _wait(client, job.id, lambda j: j.state in (JobState.SUCCEEDED, JobState.FAILED), timeout_s=400)
    assert stack.restarts("teacher") >= 1
    return done, [client.get(r.job_id) for r in done.rounds]


def test_two_rounds_each_train_a_version_and_round_two_samples_with_round_ones(
    finished, tiny_model_dir: Path, teacher_model_dir: Path
) -> None:
    job, round_jobs = finished
    assert job.state == JobState.SUCCEEDED, job.error
    assert [r.round for r in job.rounds] == [1, 2]
    first, second = job.rounds
    assert first.policy_version == ""  # round 1 samples with the base policy
    assert first.trained is not None and second.trained is not None
    assert second.policy_version == first.trained.version
    assert job.policy_version == second.trained.version != first.trained.version
    # Continue from the last policy (the default): round 2's M-step started from round 1's version.
    assert (first.trained.parent, second.trained.parent) == ("", first.trained.version)
    for number, (summary, round_job) in enumerate(zip(job.rounds, round_jobs, strict=True), start=1):
        assert round_job.spec.parent_job_id == job.id
        assert summary.contexts == summary.contexts_done == 2
        assert summary.selected == 2  # best of N per context
        assert summary.mean_reward is not None
        edits = [e for d in round_job.documents for e in d.edits]
        assert len(edits) == 4
        for edit in edits:  # every self-edit records the policy version that wrote it
            assert edit.self_edit.policy_version == summary.policy_version
            # Teacher and student are different models: each is named where it worked.
            assert edit.self_edit.teacher_model.startswith(str(teacher_model_dir))
            assert edit.adapter.base_model == str(tiny_model_dir)
            runs = edit.runs()
            assert [r.run for r in runs] == [0, 1] and all(r.verdict is not None for r in runs)
            assert runs[0].adapter.sha256 != runs[1].adapter.sha256  # another seed, another adapter
            assert edit.reward == pytest.approx(sum(r.verdict.reward for r in runs) / 2)
            # The E-step's audits were reward-only: no retention or KL measured, and never promotable.
            for r in runs:
                assert "forgetting_unchecked" in r.verdict.failed_checks() and not r.verdict.passed
                assert not any(c.startswith(("retention:", "kl_shift:")) for c in r.verdict.checks)
        assert summary.trained.round == number
        assert summary.trained.base_fingerprint == model_fingerprint(teacher_model_dir)
        assert summary.trained.examples == 2
        assert len(summary.trained.evidence) == 4  # the 2 runs of each selected self-edit
        assert all("@" in e for e in summary.trained.evidence)


def test_two_students_share_the_updates_each_under_its_own_identity(stack, finished) -> None:
    """Both take apply tasks from one consumer group; every adapter names the student that holds it."""
    _, round_jobs = finished
    runs = [r for job in round_jobs for d in job.documents for e in d.edits for r in e.runs()]
    trained_by = {r.adapter.student_id for r in runs}
    assert len(trained_by) == 2, trained_by
    assert all((stack.data_dir / name / "adapters").is_dir() for name in ("student", "student-2"))
    held = {
        name: {p.name for p in (stack.data_dir / name / "adapters").iterdir()}
        for name in ("student", "student-2")
    }
    assert {r.adapter.sha256 for r in runs} <= held["student"] | held["student-2"]
    assert held["student"] and held["student-2"] and not held["student"] & held["student-2"]


def test_policy_versions_are_listed_with_lineage_over_grpc_and_http(stack, client, finished) -> None:
    job, _ = finished
    versions = [r.trained.version for r in job.rounds]
    listed = [p.version for p in client.list_policies()]
    assert listed[:2] == versions[::-1]  # newest first
    second = client.get_policy(versions[1])
    assert (second.round, second.parent, second.job_id) == (2, versions[0], job.id)
    assert len(second.training_data_sha256) == 64 and second.base_fingerprint
    request = urllib.request.Request(
        f"http://{stack.http_address}/v1/policies/{versions[0]}",
        headers={"Authorization": f"Bearer {stack.operator_token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert json.loads(reply.read())["round"] == 1


def test_an_unknown_policy_version_is_not_found(client) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.get_policy("ab" * 32)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    spec = parse_job_spec({**POLICY_JOB, "policy_training": None, "policy_version": "cd" * 32})
    with pytest.raises(grpc.RpcError) as caught:
        client.submit(spec)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no policy version" in caught.value.details()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"policy_training": {"rounds": 11}}, "policy_training.rounds"),
        ({"seeds": 6}, "seeds"),
        ({"policy_training": {"selection": "top_k"}}, "policy_training.selection"),
        ({"policy_training": {"policy": {"objective": "ppo"}}}, "policy_training.policy.objective"),
        ({"n_self_edits": 1, "policy_training": {"policy": {"objective": "dpo"}}}, "n_self_edits"),
        ({"parent_job_id": "0123456789abcdef"}, "parent_job_id"),
    ],
)
def test_a_policy_job_beyond_the_limits_is_refused_naming_the_field(client, change, field) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.submit(parse_job_spec({**POLICY_JOB, **change}))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}:")


def test_a_failed_round_fails_the_job_and_says_which_policy_stays(client) -> None:
    """Threshold 1: nothing a random model writes can exceed it, so round 1 selects nothing."""
    job = client.submit(
        parse_job_spec({**POLICY_JOB, "policy_training": {"rounds": 1, "reward_threshold": 1.0}})
    )
    done = _wait(client, job.id, lambda j: j.state in (JobState.SUCCEEDED, JobState.FAILED))
    assert done.state == JobState.FAILED
    assert "round 1: selected no self-edit" in done.error
    assert "the base policy stays serving" in done.error


def test_seal_status_shows_the_rounds(finished) -> None:
    from seal.cli import render_table

    job, _ = finished
    table = render_table(job)
    assert "policy training: round 2 of 2, 2 contexts, N = 2, seeds = 2, best_of_n / sft" in table
    for summary in job.rounds:
        assert f"{summary.trained.version[:12]} (loss" in table
    assert f"latest policy version: {job.policy_version}" in table
