"""LLMJudge against a real OpenAI-compatible HTTP server on loopback (Starlette served by uvicorn).

The server answers "yes" when the student answer contains the gold answer (case-insensitive) and "no"
otherwise, counts calls, records the Authorization header, and can be told to answer 500 or 429 (with
Retry-After) a number of times first.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from auditor.judge import FileJudgeCache, JudgeError, LLMJudge, RedisJudgeCache

API_KEY = "sk-test-3f9c1e-judge-secret"
_GOLD = re.compile(r"\nGold answer: (.*)\nStudent answer: (.*)\nIs the student answer correct", re.DOTALL)


@dataclass
class JudgeServer:
    url: str = ""
    calls: int = 0
    fail_500: int = 0
    fail_429: int = 0
    retry_after_s: str = "1"
    authorizations: list[str] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.calls = self.fail_500 = self.fail_429 = 0
            self.authorizations.clear()
            self.bodies.clear()

    async def chat_completions(self, request: Request) -> JSONResponse:
        body = await request.json()
        auth = request.headers.get("authorization", "")
        with self.lock:
            self.calls += 1
            self.authorizations.append(auth)
            self.bodies.append(body)
            if self.fail_500:
                self.fail_500 -= 1
                # Echo the credentials, as a careless proxy might: the judge must not repeat them.
                return JSONResponse({"error": {"message": f"upstream failed for {auth}"}}, status_code=500)
            if self.fail_429:
                self.fail_429 -= 1
                return JSONResponse(
                    {"error": {"message": "slow down"}},
                    status_code=429,
                    headers={"Retry-After": self.retry_after_s},
                )
        gold, student = _GOLD.search(body["messages"][0]["content"]).groups()  # type: ignore[union-attr]
        reply = "Yes." if gold.lower() in student.lower() else "No."
        return JSONResponse(
            {
                "id": f"chatcmpl-{self.calls}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )


@pytest.fixture(scope="module")
def judge_server() -> Iterator[JudgeServer]:
    state = JudgeServer()
    app = Starlette(routes=[Route("/v1/chat/completions", state.chat_completions, methods=["POST"])])
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None, timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the fake judge server did not start"
    state.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    yield state
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture()
def server(judge_server: JudgeServer) -> JudgeServer:
    judge_server.reset()
    return judge_server


def _judge(server: JudgeServer, **kwargs) -> LLMJudge:
    kwargs.setdefault("api_key", API_KEY)
    kwargs.setdefault("timeout_s", 10)
    kwargs.setdefault("max_retries", 2)
    return LLMJudge(server.url, "judge-model", **kwargs)


_ITEMS = [
    ("Where does the council meet?", "Velmora", "In the city of velmora."),
    ("Where does the council meet?", "Velmora", "In Paris."),
    ("When?", "spring", "Every spring, without fail."),
    ("Who leads it?", "Ilsa", "I do not know."),
]


def test_grades_follow_the_servers_reply_at_temperature_0(server: JudgeServer) -> None:
    judge = _judge(server)
    assert judge.judge_batch(_ITEMS) == [True, False, True, False]
    assert server.calls == 4
    body = server.bodies[0]
    assert (body["model"], body["temperature"]) == ("judge-model", 0)
    assert body["messages"][0]["role"] == "user"
    assert body["messages"][0]["content"].startswith("You are a grading assistant.")
    # Batched (concurrent) equals one by one, in order.
    assert [_judge(server).judge(*item) for item in _ITEMS] == [True, False, True, False]


def test_a_cache_hit_makes_no_second_call(server: JudgeServer, tmp_path: Path, plane) -> None:
    path = tmp_path / "grades.jsonl"
    judge = _judge(server, cache=FileJudgeCache(path))
    assert judge.judge(*_ITEMS[0]) is True
    assert judge.judge(*_ITEMS[0]) is True
    assert server.calls == 1
    # A restarted benchmark reads the file and asks only for what is new.
    resumed = _judge(server, cache=FileJudgeCache(path))
    assert resumed.judge_batch(_ITEMS[:2]) == [True, False]
    assert server.calls == 2
    # The auditor's Redis cache, shared by every auditor: a second judge finds the grade.
    redis_cache = RedisJudgeCache(plane.redis, plane.key("judge-cache"))
    assert _judge(server, cache=redis_cache).judge(*_ITEMS[2]) is True
    assert _judge(server, cache=redis_cache).judge(*_ITEMS[2]) is True
    assert server.calls == 3


def test_500_then_ok_is_retried_by_the_client(server: JudgeServer) -> None:
    server.fail_500 = 2
    assert _judge(server, max_retries=2).judge(*_ITEMS[0]) is True
    assert server.calls == 3


def test_429_waits_for_retry_after(server: JudgeServer) -> None:
    server.fail_429 = 1
    started = time.monotonic()
    assert _judge(server).judge(*_ITEMS[1]) is False
    assert server.calls == 2
    assert time.monotonic() - started >= 0.9  # Retry-After: 1


def test_always_500_raises_a_clear_error_without_the_key(server: JudgeServer) -> None:
    server.fail_500 = 10**6
    with pytest.raises(JudgeError) as info:
        _judge(server, max_retries=1).judge(*_ITEMS[0])
    message = str(info.value)
    assert "judge 'judge-model' at http://127.0.0.1:" in message
    assert "answered HTTP 500 (2 attempts)" in message
    assert API_KEY not in message and "[api key]" in message  # the echoed key is redacted
    # Raised `from None`: a logged traceback does not print the client's own error (and its body).
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert server.calls == 2


def test_a_server_that_is_down_raises_a_clear_error(server: JudgeServer) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = LLMJudge(f"http://127.0.0.1:{port}/v1", "judge-model", api_key=API_KEY, max_retries=0)
    with pytest.raises(
        JudgeError, match=r"did not answer \(APIConnectionError, 1 attempts\); is the server up"
    ):
        judge.judge(*_ITEMS[0])


def test_the_key_is_sent_as_a_bearer_token_and_never_logged(
    server: JudgeServer, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("", "openai", "httpx", "httpx2", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    server.fail_500 = 1
    server.fail_429 = 1
    assert _judge(server).judge(*_ITEMS[0]) is True
    assert server.authorizations == [f"Bearer {API_KEY}"] * 3
    assert caplog.records, "precondition: the client logged something"
    assert API_KEY not in caplog.text
    server.reset()
    server.fail_500 = 10**6
    with pytest.raises(JudgeError) as info:
        _judge(server, max_retries=0).judge(*_ITEMS[0])
    assert API_KEY not in str(info.value) and API_KEY not in caplog.text


def test_without_a_key_a_placeholder_bearer_is_sent(server: JudgeServer) -> None:
    """The openai client insists on a key; a local server without auth gets a harmless placeholder."""
    assert _judge(server, api_key="").judge(*_ITEMS[0]) is True
    assert server.authorizations == ["Bearer unused"]
