"""The OpenAI-compatible serving API (gateway.serving) on a real uvicorn server on loopback, mounted on
the gateway's own app, spoken to by the official `openai` client; the model is a tiny random Llama.

The tiny model's weights are redrawn larger than their initialisation (std 0.3), so greedy answers are
varied text (letters, spaces, newlines, broken UTF-8) rather than one token repeated: the streaming
tests then see every way a streamer can split text.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from openai.types.chat import ChatCompletionMessageParam

from gateway.api import GatewayApi
from gateway.auth import Authenticator, generate_token, load_token_file, write_token_file
from gateway.http import HttpLimits, build_app, start_http
from gateway.jobs import JobStore
from gateway.serving import Resolution, ServedModel, StaticModels, serving_routes
from seal.models import load_model
from seal.validation import Limits

QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Where does the Zorbian council meet?"}
]
PROMPT = "The Zorbian council meets in"


def lively(model_dir: Path, seed: int) -> tuple[Any, Any]:
    """The tiny model with its matrices redrawn at std 0.3 (varied answers); same seed, same model."""
    model, tokenizer = load_model(model_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model, tokenizer


def greedy(model: Any, tokenizer: Any, text: str, max_new_tokens: int, special: bool) -> str:
    """What transformers' own generate answers for `text`: the reference the server must match."""
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=special)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return str(tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))


def chat_text(tokenizer: Any, messages: list[ChatCompletionMessageParam]) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def post(url: str, body: Any) -> tuple[int, Any]:
    """A plain HTTP POST (no OpenAI client): the status and the JSON answer as sent."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


class Server:
    """build_app with the serving routes, served by start_http on a free loopback port."""

    def __init__(self, plane: Any, resolver: Any, authenticator: Authenticator, limits: HttpLimits) -> None:
        api = GatewayApi(JobStore(plane), Limits(), "tiny")
        routes = serving_routes(resolver, authenticator, limits)
        self.http = start_http(
            build_app(api, authenticator, limits=limits, extra_routes=routes), "127.0.0.1:0", limits
        )
        self.base_url = f"http://127.0.0.1:{self.http.port}/v1"

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=60)


LIMITS = HttpLimits(max_body_bytes=64 * 1024)


@pytest.fixture()
def tiny(tiny_model_dir: Path) -> ServedModel:
    model, tokenizer = lively(tiny_model_dir, seed=0)
    return ServedModel("tiny", model, tokenizer, "fp-tiny")


@pytest.fixture()
def server(plane: Any, tiny: ServedModel) -> Iterator[Server]:
    running = Server(plane, StaticModels({"tiny": tiny}), Authenticator(None), LIMITS)
    yield running
    running.http.stop()


def test_models_are_listed(server: Server) -> None:
    models = server.client().models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [("tiny", "model", "seal")]
    assert models.data[0].created > 0


def test_a_greedy_chat_answer_is_what_generate_gives(server: Server, tiny: ServedModel) -> None:
    expected = greedy(tiny.model, tiny.tokenizer, chat_text(tiny.tokenizer, QUESTION), 8, special=False)
    reply = server.client().chat.completions.create(
        model="tiny",
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected and expected
    assert choice.finish_reason == "length"
    assert (
        reply.object == "chat.completion" and reply.model == "tiny" and reply.system_fingerprint == "fp-tiny"
    )
    prompt_tokens = len(
        tiny.tokenizer(chat_text(tiny.tokenizer, QUESTION), add_special_tokens=False).input_ids
    )
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 8)
    assert reply.usage.total_tokens == prompt_tokens + 8


def test_a_streamed_chat_answer_equals_the_whole_one(server: Server) -> None:
    client = server.client()
    whole = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # include_usage: the last chunk
    assert {c.id for c in chunks} == {chunks[0].id} and all(
        c.object == "chat.completion.chunk" for c in chunks
    )


def test_completions_answer_a_raw_prompt_whole_and_streamed(server: Server, tiny: ServedModel) -> None:
    client = server.client()
    expected = greedy(tiny.model, tiny.tokenizer, PROMPT, 16, special=True)
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "length" and whole.usage and whole.usage.completion_tokens == 16
    chunks = list(
        client.completions.create(model="tiny", prompt=[PROMPT], max_tokens=16, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_stop_sequence_cuts_the_answer_whole_and_streamed(server: Server, tiny: ServedModel) -> None:
    full = greedy(tiny.model, tiny.tokenizer, PROMPT, 16, special=True)
    stop = full[5:7]  # cut where the answer's sixth character begins (or earlier, if it occurs before)
    expected = full[: full.find(stop)]
    client = server.client()
    stops = [stop, "never-said"]
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=stops)
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
    assert whole.usage is not None and whole.usage.completion_tokens < 16  # generation stopped early, too
    chunks = list(
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=stops, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_repeats_a_sampled_answer(server: Server) -> None:
    client = server.client()

    def sample(seed: int) -> str | None:
        reply = client.chat.completions.create(
            model="tiny", messages=QUESTION, max_tokens=16, temperature=1.5, seed=seed
        )
        return reply.choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert len({first, sample(8), sample(9)}) > 1


def test_an_unknown_model_is_not_found(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().chat.completions.create(model="nope", messages=QUESTION)
    error = caught.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"], error["type"]) == (
        "model_not_found",
        "model",
        "invalid_request_error",
    )
    assert "nope" in error["message"] and "tiny" in error["message"]


def test_more_than_one_choice_is_refused_naming_n(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model="tiny", messages=QUESTION, n=2)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "n"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny"}, "messages"),
        ({"model": "tiny", "messages": "hello"}, "messages"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": "tiny", "messages": QUESTION, "max_tokens": "many"}, "max_tokens"),
        ({"model": "tiny", "messages": QUESTION, "temperature": 9}, "temperature"),
        ({"messages": QUESTION}, "model"),
    ],
)
def test_malformed_requests_get_openai_shaped_400s(server: Server, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        # The client's raw post: its create() would refuse some of these bodies itself.
        server.client().post("/chat/completions", body=body, cast_to=dict)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == param
    status, answer = post(f"{server.base_url}/chat/completions", body)
    assert status == 400
    message = answer["error"]["message"]
    assert answer == {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    }
    assert param in message


def test_malformed_json_and_large_bodies_are_refused_in_openai_shape(server: Server) -> None:
    status, answer = post(f"{server.base_url}/chat/completions", b"{not json")
    assert status == 400
    assert answer["error"]["param"] == "body" and "JSON" in answer["error"]["message"]
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (LIMITS.max_body_bytes + 1)}]}
    status, answer = post(f"{server.base_url}/chat/completions", big)
    assert (status, answer["error"]["code"]) == (413, "request_too_large")


def test_a_token_file_closes_the_api_to_strangers(plane: Any, tiny: ServedModel, tmp_path: Path) -> None:
    alice = generate_token()
    tokens = write_token_file(tmp_path / "tokens.json", [(alice, "alice", "submitter")])
    running = Server(plane, StaticModels({"tiny": tiny}), Authenticator(load_token_file(tokens)), LIMITS)
    try:
        no_key = {"Authorization": openai.omit}  # the client insists on a key unless told to send none
        with pytest.raises(openai.AuthenticationError) as caught:
            running.client().chat.completions.create(model="tiny", messages=QUESTION, extra_headers=no_key)
        assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "invalid_api_key"
        assert caught.value.response.headers["WWW-Authenticate"].startswith("Bearer")
        with pytest.raises(openai.AuthenticationError):
            running.client("seal_not-a-token").chat.completions.create(model="tiny", messages=QUESTION)
        with pytest.raises(openai.AuthenticationError):
            running.client("seal_not-a-token").models.list()
        reply = running.client(alice).chat.completions.create(
            model="tiny",
            messages=QUESTION,
            max_tokens=4,
            temperature=0,
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        assert [m.id for m in running.client(alice).models.list().data] == ["tiny"]
    finally:
        running.http.stop()


class ShadowedModels(StaticModels):
    """Serves "tiny" with a shadow (another tiny model), and records what it is asked to log."""

    def __init__(self, live: ServedModel, shadow: ServedModel) -> None:
        super().__init__({"tiny": live})
        self.shadow = shadow
        self.logged: list[tuple[str, dict, str, str]] = []
        self.done = threading.Event()

    def resolve(self, name: str, prompt: str = "") -> Resolution:
        return Resolution(super().resolve(name).model, self.shadow)

    def log_shadow(self, name: str, request: dict, answer: str, shadow_answer: str) -> None:
        self.logged.append((name, request, answer, shadow_answer))
        self.done.set()


def test_a_shadow_answers_the_same_request_and_both_answers_are_logged(
    plane: Any, tiny: ServedModel, tiny_model_dir: Path
) -> None:
    shadow_model, shadow_tokenizer = lively(tiny_model_dir, seed=1)
    shadow = ServedModel("tiny:shadow", shadow_model, shadow_tokenizer, "fp-shadow")
    resolver = ShadowedModels(tiny, shadow)
    running = Server(plane, resolver, Authenticator(None), LIMITS)
    try:
        client = running.client()
        reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0)
        assert resolver.done.wait(30)
        resolver.done.clear()
        stream = client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].text for c in stream)
        assert resolver.done.wait(30)
    finally:
        running.http.stop()
    (name, request, answer, shadow_answer), streamed_log = resolver.logged
    assert name == "tiny" and request["messages"] == QUESTION
    assert answer == reply.choices[0].message.content
    text = chat_text(shadow_tokenizer, QUESTION)
    assert shadow_answer == greedy(shadow_model, shadow_tokenizer, text, 8, special=False) != answer
    assert streamed_log[1]["prompt"] == PROMPT and streamed_log[2] == streamed  # streams are shadowed too
    assert streamed_log[3] == greedy(shadow_model, shadow_tokenizer, PROMPT, 8, special=True)
