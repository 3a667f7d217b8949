"""The `openai` teacher backend over real HTTP against a real OpenAI-compatible server on loopback,
through a fault-injecting proxy (tests/integration/faultproxy.py).

The server is seal's own OpenAI-compatible endpoint (gateway.serving on the gateway's app, uvicorn,
a tiny random Llama, API tokens on). Another server joins by a fixture that returns an `Upstream`
(its base URL, model, key) and whose name is added to UPSTREAMS: the lead's vLLM server
(tests/vllm) is meant to, where vLLM runs.

Each fault: 429 with Retry-After is waited for and retried; 500 is retried with backoff; a 500
that persists, or a server that never answers, is a clear GenerationError (transient); a refusal
(wrong key, unknown model) is a GenerationRefused (permanent). On the Redis work plane, a propose
task failed by the server's trouble stays pending and completes once the server heals, nothing
lost; a refused one is dead-lettered at once with the clear error. Self-edits carry the token usage
the server reported; the API key is in no log record and no error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from gateway.auth import Authenticator, generate_token, load_token_file, write_token_file
from gateway.serving import ServedModel, StaticModels
from seal.config import ServiceConfig
from seal.records import (
    DeadLetter,
    EditFormat,
    LoraSettings,
    Passage,
    ProposeResult,
    ProposeTask,
    SamplingSettings,
)
from seal.runtime import make_worker
from seal.tasks import decode, encode
from seal.validation import Limits
from seal.workplane import Task, WorkPlane
from teacher.backends import GenerationError, GenerationRefused, OpenAIGenerator, token_usage
from teacher.service import TeacherEngine, propose_followups, propose_handler
from tests.conftest import delete_namespace
from tests.integration.faultproxy import HANG, FaultProxy, rate_limited, server_error
from tests.integration.test_serving_openai import LIMITS, Server, lively

SAMPLING = SamplingSettings(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=0)
PASSAGE = Passage(title="Kappa", context="Kappa is a village on a hill with a stone bridge and a mill.")
# Short enough for fast tests, long enough for a tiny model's answer on a loaded 2-core machine.
TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Upstream:
    """A real OpenAI-compatible server: where it is, the model it serves, the key it takes ("" for
    none), and the most choices one request may ask for (0: any; seal's endpoint serves n=1)."""

    base_url: str
    model: str
    api_key: str = ""
    max_n: int = 0


# Fixture names, each giving an Upstream; every test here runs against each.
UPSTREAMS = ["seal_endpoint", pytest.param("vllm_endpoint", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def seal_endpoint(
    tiny_model_dir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Upstream]:
    """seal's own endpoint with a tiny random model, closed by an API token."""
    namespace = f"seal-test-api-teacher-{time.monotonic_ns()}"
    plane = WorkPlane(redis.Redis.from_url(redis_url), namespace)
    token = generate_token()
    tokens = write_token_file(
        tmp_path_factory.mktemp("tokens") / "tokens.json", [(token, "teacher", "submitter")]
    )
    model, tokenizer = lively(tiny_model_dir, seed=0)
    served = StaticModels({"tiny": ServedModel("tiny", model, tokenizer, "fp-tiny")})
    server = Server(plane, served, Authenticator(load_token_file(tokens)), LIMITS)
    try:
        yield Upstream(server.base_url, "tiny", api_key=token, max_n=1)
    finally:
        server.http.stop()
        delete_namespace(redis_url, namespace)


@pytest.fixture(scope="module")
def vllm_endpoint(vllm_target: tuple[str, str]) -> Upstream:
    """A real vLLM OpenAI server of the default model, requiring its key (tests/conftest.py; skips,
    saying why, where vLLM cannot install). It serves n > 1."""
    url, key = vllm_target
    return Upstream(url, "base", api_key=key)


@pytest.fixture(scope="module", params=UPSTREAMS)
def upstream(request: pytest.FixtureRequest) -> Upstream:
    return request.getfixturevalue(request.param)


@pytest.fixture()
def proxy(upstream: Upstream) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.base_url) as running:
        yield running


def teacher(proxy: FaultProxy, upstream: Upstream, **settings: object) -> OpenAIGenerator:
    """The openai backend as the teacher service builds it, pointed at the proxy."""
    options: dict = {
        "api_key": upstream.api_key,
        "timeout_s": TIMEOUT_S,
        "max_retries": 2,
        "max_n": upstream.max_n,
    }
    return OpenAIGenerator(proxy.base_url, upstream.model, **{**options, **settings})


# --- the backend -----------------------------------------------------------------------------------


def test_429_with_retry_after_is_waited_for_then_answered(proxy: FaultProxy, upstream: Upstream) -> None:
    proxy.fail_next(2, rate_limited(retry_after_s=1))
    (samples,) = teacher(proxy, upstream).generate(["Where is Kappa?"], SAMPLING, n=1)
    assert proxy.outcomes() == ["status", "status", "forwarded"]
    assert [s.status for s in proxy.seen] == [429, 429, 200]
    # The server's Retry-After (1 s), not the client's own backoff (0.5 s, then 1 s, less jitter).
    assert all(0.95 <= gap < 3 for gap in proxy.gaps()), proxy.gaps()
    prompt_tokens, completion_tokens = token_usage(samples)
    assert len(samples) == 1 and prompt_tokens > 0 and 0 < completion_tokens <= SAMPLING.max_new_tokens


def test_500_is_retried_with_backoff_then_answered(proxy: FaultProxy, upstream: Upstream) -> None:
    proxy.fail_next(2, server_error(500))
    (samples,) = teacher(proxy, upstream).generate(["Where is Kappa?"], SAMPLING, n=2)
    assert proxy.outcomes()[:3] == ["status", "status", "forwarded"]
    assert len(samples) == 2 and token_usage(samples)[1] > 0
    # Exponential backoff: about 0.5 s, then about 1 s (each less up to 25 % jitter).
    first, second = proxy.gaps()[:2]
    assert 0.35 <= first < 3 and 0.7 <= second < 4, proxy.gaps()


def test_a_500_that_persists_is_a_clear_transient_error(proxy: FaultProxy, upstream: Upstream) -> None:
    proxy.fail_always(server_error(500))
    with pytest.raises(GenerationError) as caught:
        teacher(proxy, upstream, max_retries=1).generate(["Where is Kappa?"], SAMPLING, n=1)
    message = str(caught.value)
    assert f"POST {proxy.base_url}/chat/completions failed with HTTP 500 after 2 attempts" in message
    assert "injected fault" in message  # the start of the server's answer
    assert not isinstance(caught.value, GenerationRefused)  # transient: the task is retried later
    assert proxy.outcomes() == ["status", "status"]


def test_a_server_that_never_answers_times_out_with_a_clear_error(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.fail_always(HANG)
    start = time.monotonic()
    with pytest.raises(GenerationError, match=r"got no answer within 0.5 s \(2 attempts\)") as caught:
        teacher(proxy, upstream, timeout_s=0.5, max_retries=1).generate(["Where is Kappa?"], SAMPLING, n=1)
    assert 1.0 <= time.monotonic() - start < 10
    assert proxy.base_url in str(caught.value) and not isinstance(caught.value, GenerationRefused)
    assert proxy.outcomes() == ["hang", "hang"]
    # Healed, the same server answers again.
    proxy.heal()
    assert len(teacher(proxy, upstream).generate(["Where is Kappa?"], SAMPLING, n=1)[0]) == 1


def test_the_key_reaches_the_server_and_no_log_or_error_shows_it(
    proxy: FaultProxy, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    if not upstream.api_key:
        pytest.skip("this server takes no key")
    for name in ("", "openai", "httpx", "httpx2", "httpcore", "teacher"):
        caplog.set_level(logging.DEBUG, logger=name)
    proxy.fail_next(1, server_error(503))
    teacher(proxy, upstream).generate(["Where is Kappa?"], SAMPLING, n=1)
    assert {s.headers["authorization"] for s in proxy.seen} == {f"Bearer {upstream.api_key}"}
    proxy.fail_always(server_error(500))
    with pytest.raises(GenerationError) as transient:
        teacher(proxy, upstream, max_retries=0).generate(["Where is Kappa?"], SAMPLING, n=1)
    proxy.heal()
    wrong_key = upstream.api_key[:-4] + "xxxx"
    with pytest.raises(GenerationRefused, match="refused with HTTP 401") as refused:
        teacher(proxy, upstream, api_key=wrong_key).generate(["Where is Kappa?"], SAMPLING, n=1)
    assert caplog.records, "precondition: the client logged something"
    for text in (caplog.text, str(transient.value), str(refused.value)):
        assert upstream.api_key not in text and wrong_key not in text


def test_an_unknown_model_is_refused_at_once(proxy: FaultProxy, upstream: Upstream) -> None:
    generator = teacher(proxy, upstream)
    generator.name = "no-such-model"
    with pytest.raises(GenerationRefused, match=r"refused with HTTP 404.*no-such-model"):
        generator.generate(["Where is Kappa?"], SAMPLING, n=1)
    assert proxy.outcomes() == ["forwarded"]  # not retried


# --- the task on the work plane --------------------------------------------------------------------


def propose_worker(plane: WorkPlane, generator: OpenAIGenerator) -> object:
    """The teacher's propose worker as its service builds it (make_worker), on a short timeout:
    a failed task is retried 2 s (the worker's backoff) after it failed."""
    engine = TeacherEngine(generator, Limits(), model=generator.name)
    config = ServiceConfig(kind="teacher", namespace=plane.namespace, visibility_timeout_s=3.0)
    return make_worker(config, plane, "propose", propose_handler(engine), propose_followups)


def propose_task(task_id: str) -> Task:
    task = ProposeTask(
        job_id=task_id,
        passage=PASSAGE,
        format=EditFormat.IMPLICATIONS,
        n=2,
        lora=LoraSettings(rank=4, epochs=1),
        sampling=SAMPLING,
    )
    return Task("propose", f"{task_id}/0", encode(task))


def dead_letters(plane: WorkPlane) -> list[DeadLetter]:
    import json

    entries = plane.redis.xrange(plane.stream_key("dead"))
    return [decode(DeadLetter, json.loads(fields[b"payload"])) for _, fields in entries]


def test_a_task_failed_by_the_server_is_retried_later_and_completes_once_it_heals(
    plane: WorkPlane, proxy: FaultProxy, upstream: Upstream
) -> None:
    worker = propose_worker(plane, teacher(proxy, upstream, max_retries=1))
    task = propose_task("job-heal")
    plane.enqueue(task)
    proxy.fail_always(server_error(503))
    assert worker.poll_once(block_ms=100) == 1  # taken, and failed after the client's retries
    assert plane.result("propose", task.task_id) is None
    assert plane.pending_count("propose", "teacher") == 1  # kept for a later try
    assert dead_letters(plane) == []

    proxy.heal()
    deadline = time.monotonic() + 30
    while plane.result("propose", task.task_id) is None and time.monotonic() < deadline:
        worker.poll_once(block_ms=200)
    result = plane.result("propose", task.task_id)
    assert result is not None, "the task was not retried once the server healed"
    edits = decode(ProposeResult, result).self_edits
    assert [e.id for e in edits] == ["job-heal/0/0", "job-heal/0/1"]
    for edit in edits:
        assert edit.teacher_model == upstream.model
        assert edit.prompt_tokens > 0 and 0 < edit.completion_tokens <= SAMPLING.max_new_tokens
    # Nothing lost: acknowledged, no dead letter, and its follow-ups queued (the event, one apply
    # task per self-edit).
    assert plane.pending_count("propose", "teacher") == 0 and dead_letters(plane) == []
    assert plane.redis.xlen(plane.stream_key("events")) == 1
    assert plane.redis.xlen(plane.stream_key("apply")) == len(edits)
    assert proxy.outcomes()[:2] == ["status", "status"] and proxy.outcomes()[-1] == "forwarded"


def test_a_refused_task_is_dead_lettered_at_once_with_the_clear_error(
    plane: WorkPlane, proxy: FaultProxy, upstream: Upstream
) -> None:
    generator = teacher(proxy, upstream)
    generator.name = "no-such-model"
    worker = propose_worker(plane, generator)
    task = propose_task("job-refused")
    plane.enqueue(task)
    assert worker.poll_once(block_ms=100) == 1
    (letter,) = dead_letters(plane)
    assert (letter.task_id, letter.attempts) == (task.task_id, 1)
    assert letter.reason.startswith("GenerationRefused: POST ") and "HTTP 404" in letter.reason
    assert plane.pending_count("propose", "teacher") == 0
    if upstream.api_key:
        assert upstream.api_key not in letter.reason
