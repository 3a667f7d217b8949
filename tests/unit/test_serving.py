"""The serving API's pure pieces: request parsing and its refusals, stop sequences (whole and streamed),
the answer objects and SSE lines, OpenAI-shaped errors; and generation's own edges on the tiny model."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

from gateway.http import HttpError
from gateway.serving import (
    MAX_TOKENS_LIMIT,
    SSE_DONE,
    ContextLengthExceeded,
    Generation,
    GenerationRequest,
    Reply,
    Sampling,
    ServedModel,
    StaticModels,
    StopCutter,
    cut_at_stop,
    generate,
    load_served_model,
    openai_error_response,
    parse_chat_request,
    parse_completion_request,
    prepare,
    sse,
)
from seal.errors import InvalidArgument, NotFound, Unauthenticated

HELLO = [{"role": "user", "content": "hello"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": HELLO, **fields}


# --- parsing ---------------------------------------------------------------------------------------


def test_a_minimal_chat_request_gets_openai_defaults() -> None:
    request = parse_chat_request(chat())
    assert request == GenerationRequest(
        model="m", sampling=Sampling(), messages=({"role": "user", "content": "hello"},)
    )
    assert request.sampling == Sampling(max_tokens=128, temperature=1.0, top_p=1.0, stop=(), seed=None)
    assert request.chat and not request.stream and not request.include_usage


def test_every_parameter_is_read() -> None:
    request = parse_chat_request(
        chat(
            max_tokens=10,
            temperature=0,
            top_p=0.5,
            stop="\n",
            seed=-3,
            n=1,
            stream=True,
            stream_options={"include_usage": True},
            user="ignored",
        )
    )
    assert request.sampling == Sampling(max_tokens=10, temperature=0.0, top_p=0.5, stop=("\n",), seed=-3)
    assert request.stream and request.include_usage


def test_max_completion_tokens_wins_over_max_tokens_and_is_bounded() -> None:
    assert parse_chat_request(chat(max_tokens=5, max_completion_tokens=7)).sampling.max_tokens == 7
    assert parse_chat_request(chat(max_tokens=MAX_TOKENS_LIMIT)).sampling.max_tokens == MAX_TOKENS_LIMIT
    assert parse_chat_request(chat(), max_tokens_limit=16).sampling.max_tokens == 16
    with pytest.raises(InvalidArgument) as caught:
        parse_chat_request(chat(max_completion_tokens=MAX_TOKENS_LIMIT + 1))
    assert caught.value.field == "max_completion_tokens" and str(MAX_TOKENS_LIMIT) in str(caught.value)


def test_content_parts_and_developer_messages_reach_the_template_as_text() -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]},
        {"role": "assistant", "content": "hi"},
    ]
    assert parse_chat_request(chat(messages=messages)).messages == (
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (None, "body"),
        ([chat()], "body"),
        ({"messages": HELLO}, "model"),
        ({"model": "", "messages": HELLO}, "model"),
        ({"model": "m"}, "messages"),
        (chat(messages=[]), "messages"),
        (chat(messages=["hello"]), "messages[0]"),
        (chat(messages=[*HELLO, {"role": "tool", "content": "x"}]), "messages[1].role"),
        (chat(messages=[{"content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": "user"}]), "messages[0].content"),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages[0].content",
        ),
        (chat(n=2), "n"),
        (chat(n=True), "n"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens=1.5), "max_tokens"),
        (chat(max_tokens=True), "max_tokens"),
        (chat(temperature=-0.1), "temperature"),
        (chat(temperature="hot"), "temperature"),
        (chat(top_p=1.5), "top_p"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(stop=[""]), "stop"),
        (chat(stop=3), "stop"),
        (chat(seed="x"), "seed"),
        (chat(stream="yes"), "stream"),
        (chat(stream_options={"include_usage": True}), "stream_options"),
        (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options"),
        (chat(tools=[{"type": "function"}]), "tools"),
        (chat(logprobs=True), "logprobs"),
        (chat(presence_penalty=0.5), "presence_penalty"),
        (chat(response_format={"type": "json_object"}), "response_format"),
    ],
)
def test_malformed_chat_requests_name_the_parameter(body: Any, param: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_chat_request(body)
    assert caught.value.field == param


def test_defaults_of_unsupported_parameters_are_accepted() -> None:
    body = chat(
        logprobs=False, presence_penalty=0, frequency_penalty=0.0, tools=[], response_format={"type": "text"}
    )
    assert parse_chat_request(body).model == "m"


def test_a_completion_takes_a_string_or_a_list_of_one() -> None:
    assert parse_completion_request({"model": "m", "prompt": "Once"}).prompt == "Once"
    assert parse_completion_request({"model": "m", "prompt": ["Once"], "best_of": 1}).prompt == "Once"
    assert not parse_completion_request({"model": "m", "prompt": "Once"}).chat
    for prompt in (None, "", ["a", "b"], [1, 2, 3]):
        with pytest.raises(InvalidArgument) as caught:
            parse_completion_request({"model": "m", "prompt": prompt})
        assert caught.value.field == "prompt"
    for param, value in (("best_of", 2), ("echo", True), ("suffix", "end")):
        with pytest.raises(InvalidArgument) as caught:
            parse_completion_request({"model": "m", "prompt": "Once", param: value})
        assert caught.value.field == param


# --- stop sequences --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello world", (), ("hello world", False)),
        ("hello world", ("o",), ("hell", True)),
        ("hello world", ("world", "lo"), ("hel", True)),  # the earliest, not the first listed
        ("hello world", ("xyz",), ("hello world", False)),
        ("stop", ("stop",), ("", True)),
    ],
)
def test_the_text_is_cut_at_the_earliest_stop(text: str, stops: tuple[str, ...], expected: tuple) -> None:
    assert cut_at_stop(text, stops) == expected


def _streamed(pieces: list[str], stops: tuple[str, ...]) -> str:
    cutter = StopCutter(stops)
    return "".join(cutter.feed(p) for p in pieces) + cutter.finish()


def test_streamed_text_is_cut_exactly_where_the_whole_text_is() -> None:
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice("aab\n") for _ in range(rng.randint(0, 14)))
        stops = tuple(
            "".join(rng.choice("ab\n") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))
        )
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text) + 1)))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert _streamed(pieces, stops) == cut_at_stop(text, stops)[0], (pieces, stops)


def test_a_possible_stop_is_held_back_until_it_is_known() -> None:
    cutter = StopCutter(("END",))
    assert cutter.feed("the E") == "the "  # "E" may begin END
    assert cutter.feed("N") == ""
    assert cutter.feed("D and more") == "" and cutter.stopped
    assert cutter.finish() == ""
    cutter = StopCutter(("END",))
    assert (cutter.feed("the EN"), cutter.feed("ter"), cutter.finish()) == ("the ", "ENter", "")
    cutter = StopCutter(("END",))
    assert (cutter.feed("the EN"), cutter.finish()) == ("the ", "EN")  # no more text: not a stop


# --- answers as OpenAI objects ---------------------------------------------------------------------

GEN = Generation("Hi there", "length", prompt_tokens=5, completion_tokens=3)


def reply(chat: bool) -> Reply:
    return Reply("chatcmpl-1" if chat else "cmpl-1", 1700000000, "faq@3", "fp", chat)


def test_a_chat_completion_object() -> None:
    assert reply(True).complete(GEN) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "faq@3",
        "system_fingerprint": "fp",
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "logprobs": None,
                "message": {"role": "assistant", "content": "Hi there", "refusal": None},
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def test_a_text_completion_object() -> None:
    answer = reply(False).complete(GEN)
    assert answer["object"] == "text_completion"
    assert answer["choices"] == [
        {"index": 0, "finish_reason": "length", "logprobs": None, "text": "Hi there"}
    ]
    assert answer["usage"]["total_tokens"] == 8


def test_chat_chunks_start_with_the_role_and_end_with_the_reason() -> None:
    r = reply(True)
    deltas = [c["choices"][0] for c in (r.role_chunk(), r.chunk("Hi"), r.final_chunk("stop"))]
    assert [(d["delta"], d["finish_reason"]) for d in deltas] == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Hi"}, None),
        ({}, "stop"),
    ]
    assert {r.chunk("x")["object"], r.usage_chunk(GEN)["object"]} == {"chat.completion.chunk"}
    assert r.usage_chunk(GEN)["choices"] == [] and r.usage_chunk(GEN)["usage"] == GEN.usage


def test_text_chunks_carry_text() -> None:
    r = reply(False)
    assert r.chunk("Hi")["choices"][0] == {"index": 0, "finish_reason": None, "logprobs": None, "text": "Hi"}
    assert r.final_chunk("length")["choices"][0]["text"] == ""
    assert r.chunk("Hi")["object"] == "text_completion"


def test_sse_lines() -> None:
    line = sse({"a": "é\n"})
    assert line.startswith(b"data: ") and line.endswith(b"\n\n") and line.count(b"\n") == 2
    assert json.loads(line[len(b"data: ") :]) == {"a": "é\n"}
    assert SSE_DONE == b"data: [DONE]\n\n"


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status", "kind", "param", "code"),
    [
        (InvalidArgument("n", "only n=1"), 400, "invalid_request_error", "n", None),
        (
            ContextLengthExceeded("messages", "too long"),
            400,
            "invalid_request_error",
            "messages",
            "context_length_exceeded",
        ),
        (NotFound("no model"), 404, "invalid_request_error", "model", "model_not_found"),
        (Unauthenticated("no token"), 401, "invalid_request_error", None, "invalid_api_key"),
        (HttpError(413, "too big", "body"), 413, "invalid_request_error", "body", "request_too_large"),
        (RuntimeError("boom"), 500, "server_error", None, None),
    ],
)
def test_errors_have_openai_shape(
    exc: Exception, status: int, kind: str, param: str | None, code: str | None
) -> None:
    response = openai_error_response(exc)
    body = json.loads(bytes(response.body))
    assert response.status_code == status
    assert body == {"error": {"message": str(exc), "type": kind, "param": param, "code": code}}
    assert ("www-authenticate" in response.headers) == (status == 401)


def test_static_models_serve_their_names_only() -> None:
    served = ServedModel("base", model=None, tokenizer=None, fingerprint="fp")
    models = StaticModels({"base": served})
    assert models.list_models() == ["base"]
    assert models.resolve("base").model is served and models.resolve("base").shadow is None
    with pytest.raises(NotFound, match="'faq'.*base"):
        models.resolve("faq")


# --- generation on the tiny model ------------------------------------------------------------------


@pytest.fixture()
def served(tiny_model: tuple[Any, Any]) -> ServedModel:
    model, tokenizer = tiny_model
    return ServedModel("tiny", model, tokenizer, "fp")


def completion(prompt: str, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(model="tiny", sampling=Sampling(**sampling), prompt=prompt)


def test_a_prompt_that_fills_the_context_is_refused(served: ServedModel) -> None:
    context = served.model.config.max_position_embeddings
    long_prompt = "0 " * context
    with pytest.raises(ContextLengthExceeded) as caught:
        prepare(served, completion(long_prompt))
    assert caught.value.field == "prompt" and str(context) in str(caught.value)


def test_max_tokens_is_cut_to_what_the_context_leaves(served: ServedModel) -> None:
    context = served.model.config.max_position_embeddings
    prompt_tokens = prepare(served, completion("0 " * 100)).prompt_tokens
    text = "0 " * (100 * (context - 3) // prompt_tokens)
    prepared = prepare(served, completion(text, max_tokens=64, temperature=0))
    assert prepared.max_new_tokens == context - prepared.prompt_tokens < 64
    generation = generate(served, prepared)
    assert (generation.completion_tokens, generation.finish_reason) == (prepared.max_new_tokens, "length")


def test_sampling_with_a_seed_repeats_and_leaves_the_global_rng_alone(served: ServedModel) -> None:
    request = completion("The quick", max_tokens=12, temperature=5.0, seed=11)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    first = generate(served, prepare(served, request))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert generate(served, prepare(served, request)) == first
    others = {
        generate(
            served, prepare(served, completion("The quick", max_tokens=12, temperature=5.0, seed=s))
        ).text
        for s in range(4)
    }
    assert len(others) > 1


def test_a_model_directory_is_loaded_for_serving(tiny_model_dir: Any) -> None:
    from seal.models import model_fingerprint

    served = load_served_model("base", tiny_model_dir)
    assert (served.id, served.fingerprint) == ("base", model_fingerprint(tiny_model_dir))
    assert not served.model.training and served.tokenizer.chat_template
