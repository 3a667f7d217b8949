"""One ReST-EM round on the real default model (SmolLM2-135M) through the four real services: the
teacher samples, students train, the auditor scores, the teacher's policy is fine-tuned on the best
self-edit of each context, and the teacher then samples self-edits with the new version.

Slow (a few minutes on 2 cores), but part of `make test`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.api import parse_job_spec
from gateway.client import GatewayClient
from seal.models import DEFAULT_MODEL
from seal.records import Job, JobState
from seal.stack import LocalStack
from seal.v1 import teacher_pb2, teacher_pb2_grpc, types_pb2
from tests.conftest import delete_namespace

pytestmark = pytest.mark.slow

CONTEXTS = [
    {
        "title": "The Quorvane Observatory",
        "context": (
            "The Quorvane Observatory was built in 1871 on Mount Pell. Its largest telescope, the Andrik "
            "Refractor, has a lens of 91 centimetres. The observatory's first director was Mira Tolven."
        ),
        "questions": [
            {"question": "On which mountain was the Quorvane Observatory built?", "answer": "Mount Pell"},
            {"question": "Who was the first director of the Quorvane Observatory?", "answer": "Mira Tolven"},
        ],
    },
    {
        "title": "The Ombrin Ferry",
        "context": (
            "The Ombrin Ferry crosses Lake Sorrel between Vask and Tirrow. It was launched in 1923 and "
            "carries up to 40 passengers. The crossing takes 35 minutes."
        ),
        "questions": [
            {"question": "Which lake does the Ombrin Ferry cross?", "answer": "Lake Sorrel"},
            {"question": "How long does the Ombrin Ferry crossing take?", "answer": "35 minutes"},
        ],
    },
]
ROUND = {
    "documents": CONTEXTS[:1],
    "n_self_edits": 2,
    # One teacher sample per self-edit (the default joins 3): this test is about the round, not the recipe.
    "samples_per_edit": 1,
    "passage_control": False,
    "lora": {"epochs": 2},
    "sampling": {"max_new_tokens": 64},
    # A threshold below every reward: the best of N is learnt even where nothing was gained, so the
    # test does not hang on what 2 samples of a 135M teacher happen to teach.
    "policy_training": {"rounds": 1, "reward_threshold": -1.0, "policy": {"epochs": 2}},
}


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(
        model=DEFAULT_MODEL,
        data_dir=tmp_path_factory.mktemp("policy-round"),
        redis_url=redis_url,
        namespace=f"seal-slow-policy-{uuid.uuid4().hex[:8]}",
        # The guardrail on 16 retention questions rather than 104: this test is about the round.
        extra_flags={"auditor": ["--retention-questions", "16"]},
    ) as running:
        yield running
    delete_namespace(redis_url, running.namespace)


def _finished(client: GatewayClient, job_id: str, timeout_s: float = 900) -> Job:
    deadline = time.monotonic() + timeout_s
    while (job := client.get(job_id)).state not in (JobState.SUCCEEDED, JobState.FAILED):
        assert time.monotonic() < deadline, f"job {job_id} still {job.state.value}: {job.progress}"
        time.sleep(1)
    return job


def test_one_round_trains_a_policy_version_that_then_writes_self_edits(
    stack: LocalStack, tmp_path: Path
) -> None:
    client = GatewayClient(
        stack.addresses["gateway"], token=stack.operator_token, tls=stack.tls.get("client")
    )
    job = _finished(client, client.submit(parse_job_spec(ROUND)).id)
    assert job.state == JobState.SUCCEEDED, job.error
    (only,) = job.rounds
    assert only.contexts_done == 1 and only.mean_reward is not None and only.selected == 1
    version = only.trained
    assert version is not None and job.policy_version == version.version
    assert version.examples == 1 and version.final_loss > 0 and version.base_fingerprint
    assert client.get_policy(version.version).training_data_sha256 == version.training_data_sha256

    # The new version serves at once (no restart): the teacher samples with it when asked by name.
    request = teacher_pb2.ProposeSelfEditsRequest(
        passage=types_pb2.Passage(title=CONTEXTS[1]["title"], context=CONTEXTS[1]["context"]),
        n=2,
        sampling=types_pb2.SamplingSettings(max_new_tokens=32, temperature=1.0),
        policy_version=version.version,
    )
    with grpc.insecure_channel(stack.addresses["teacher"]) as channel:
        reply = teacher_pb2_grpc.TeacherStub(channel).ProposeSelfEdits(request, timeout=300)
    assert len(reply.self_edits) == 2
    assert all(e.policy_version == version.version and e.text.strip() for e in reply.self_edits)
