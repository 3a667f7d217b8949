"""Generation backends: transformers on the tiny model, OpenAI-compatible HTTP against a real local server,
vLLM where a GPU and vLLM are present."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from seal.apikeys import read_api_key
from seal.config import load_config
from seal.errors import InvalidArgument, NotFound, PermanentError
from seal.models import render_prompt
from seal.records import PolicyExample, PolicySettings, PolicyVersion, SamplingSettings
from teacher.backends import (
    BACKENDS,
    GenerationError,
    GenerationRefused,
    OpenAIGenerator,
    TransformersGenerator,
    VLLMGenerator,
    chat_completion_body,
    parse_completions,
    request_completions,
    split_evenly,
    token_usage,
)
from teacher.policies import PolicyStore
from teacher.policy import release_policy, train_policy
from teacher.service import build_generator

SAMPLING = SamplingSettings(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=0)
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=12, seed=0)
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def test_backends_registry_names_every_builder():
    assert BACKENDS == {
        "transformers": TransformersGenerator,
        "openai": OpenAIGenerator,
        "vllm": VLLMGenerator,
    }


# --- transformers ----------------------------------------------------------------------------------


def test_render_prompt_wraps_one_user_turn_in_the_chat_template(tiny_model):
    _, tokenizer = tiny_model
    assert render_prompt(tokenizer, "Hi there", use_chat_template=True) == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(tokenizer, "Hi there", use_chat_template=False) == "Hi there"


def test_render_prompt_falls_back_to_raw_text_without_a_template(tiny_model):
    _, tokenizer = tiny_model
    tokenizer.chat_template = None
    assert render_prompt(tokenizer, "Hi there", use_chat_template=True) == "Hi there"


@pytest.mark.parametrize("use_chat_template", [True, False])
def test_transformers_returns_n_new_texts_per_prompt(tiny_model, use_chat_template):
    model, tokenizer = tiny_model
    generator = TransformersGenerator(model, tokenizer, use_chat_template=use_chat_template)
    prompts = ["Passage: The fox.", "Passage: a much longer prompt so the batch needs left padding."]
    out = generator.generate(prompts, SAMPLING, n=3)
    assert [len(group) for group in out] == [3, 3]
    for text in (t for group in out for t in group):
        assert isinstance(text, str)
        assert "Passage:" not in text  # new text only, not the prompt echoed back
        assert not any(tok in text for tok in SPECIAL_TOKENS)


def test_transformers_returns_only_the_new_tokens(tiny_model):
    model, tokenizer = tiny_model
    longest_token = max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))
    one_token = SamplingSettings(max_new_tokens=1, seed=3)
    out = TransformersGenerator(model, tokenizer).generate(["Passage: The fox jumps."], one_token, n=4)
    assert all(len(text) <= longest_token for text in out[0])


def test_transformers_same_seed_same_text_other_seed_other_text(tiny_model):
    model, tokenizer = tiny_model
    generator = TransformersGenerator(model, tokenizer)
    first = generator.generate(["Passage: The fox."], SAMPLING, n=2)
    again = generator.generate(["Passage: The fox."], SAMPLING, n=2)
    other = generator.generate(["Passage: The fox."], SamplingSettings(max_new_tokens=12, seed=1), n=2)
    assert first == again
    assert first != other
    assert first[0][0] != first[0][1]  # the n samples are distinct draws, not copies


def test_transformers_greedy_gives_n_identical_texts(tiny_model):
    model, tokenizer = tiny_model
    out = TransformersGenerator(model, tokenizer).generate(["Passage: The fox.", "Other"], GREEDY, n=3)
    assert [len(group) for group in out] == [3, 3]
    assert all(len(set(group)) == 1 for group in out)


def test_transformers_name_defaults_to_the_model_path(tiny_model, tiny_model_dir):
    model, tokenizer = tiny_model
    assert TransformersGenerator(model, tokenizer).name == str(tiny_model_dir)
    assert TransformersGenerator(model, tokenizer, name="tiny").name == "tiny"


def test_transformers_rejects_n_below_one(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="n must be"):
        TransformersGenerator(model, tokenizer).generate(["x"], SAMPLING, n=0)


# --- policy versions on the transformers backend ---------------------------------------------------

PROMPT = "Passage: The fox."
# A completion the random tiny model would never write, learnt hard so greedy decoding shows it. The
# tiny model's logits are small (random 64-wide embeddings), so its loss stays high; the argmax is
# what moves: these settings make greedy decoding start with the completion's first token ("Zor").
# The random model follows the installed packages: with those of 2026-11-26 (transformers 5.24) 0.1
# overshot, and greedy decoding started with the end-of-turn token the completion ends with.
DISTINCTIVE = "Zorbian council Velmora"
TRAIN = PolicySettings(rank=8, alpha=16.0, learning_rate=0.05, epochs=20, batch_size=1, max_seq_len=128)


def _train_and_save(model, tokenizer, store: PolicyStore, completion: str = DISTINCTIVE) -> str:
    examples = [PolicyExample(prompt=PROMPT, chosen=completion)]
    peft_model, stats = train_policy(model, tokenizer, examples, TRAIN)
    saved = store.save(peft_model, PolicyVersion(base_model="tiny", final_loss=stats.final_loss))
    release_policy(peft_model)
    return saved.version


def test_a_new_version_samples_at_once_and_the_base_stays_the_base(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    store = PolicyStore(tmp_path)
    generator = TransformersGenerator(model, tokenizer, policies=store)
    base_greedy = generator.generate([PROMPT], GREEDY, n=1)
    base_sampled = generator.generate([PROMPT], SAMPLING, n=2)

    version = _train_and_save(model, tokenizer, store)
    tuned = generator.generate([PROMPT], GREEDY, n=1, policy_version=version)
    assert tuned[0][0].startswith(DISTINCTIVE[:3])
    assert tuned != base_greedy
    # Same seed, same version: the same samples.
    sampled = generator.generate([PROMPT], SAMPLING, n=2, policy_version=version)
    assert sampled == generator.generate([PROMPT], SAMPLING, n=2, policy_version=version)
    assert sampled != base_sampled
    # The base policy is untouched by the version having been used.
    assert generator.generate([PROMPT], GREEDY, n=1) == base_greedy
    assert generator.generate([PROMPT], SAMPLING, n=2, policy_version="") == base_sampled
    assert generator.loaded_policies() == [version]


def test_versions_switch_per_call_and_the_least_recently_used_is_evicted(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    store = PolicyStore(tmp_path)
    first = _train_and_save(model, tokenizer, store)
    second = _train_and_save(model, tokenizer, store, completion="0123456789 quick")
    generator = TransformersGenerator(model, tokenizer, policies=store, max_loaded_policies=1)
    out_first = generator.generate([PROMPT], GREEDY, n=1, policy_version=first)
    out_second = generator.generate([PROMPT], GREEDY, n=1, policy_version=second)
    assert out_first != out_second
    assert generator.loaded_policies() == [second]
    # Evicted, then loaded again: the same policy.
    assert generator.generate([PROMPT], GREEDY, n=1, policy_version=first) == out_first
    assert generator.loaded_policies() == [first]


def test_training_waits_for_the_generators_policies_to_be_released(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    store = PolicyStore(tmp_path)
    version = _train_and_save(model, tokenizer, store)
    generator = TransformersGenerator(model, tokenizer, policies=store)
    base = generator.generate([PROMPT], GREEDY, n=1)
    generator.generate([PROMPT], GREEDY, n=1, policy_version=version)
    with pytest.raises(ValueError, match="release_policies"):
        train_policy(model, tokenizer, [PolicyExample(prompt=PROMPT, chosen="x")], TRAIN)
    generator.release_policies()
    assert generator.loaded_policies() == []
    assert not any("lora_" in name for name, _ in model.named_parameters())
    assert generator.generate([PROMPT], GREEDY, n=1) == base


@pytest.mark.parametrize("version", ["0" * 64, "not-a-digest"])
def test_an_unknown_version_is_not_found_before_generating(tiny_model, tmp_path, version):
    model, tokenizer = tiny_model
    generator = TransformersGenerator(model, tokenizer, policies=PolicyStore(tmp_path))
    with pytest.raises(NotFound, match="policy version"):
        generator.generate([PROMPT], GREEDY, n=1, policy_version=version)
    with pytest.raises(NotFound, match="no policy store"):
        TransformersGenerator(model, tokenizer).generate([PROMPT], GREEDY, n=1, policy_version="0" * 64)
    assert generator.loaded_policies() == []


# --- token usage -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "parts", "shares"),
    [(10, 3, [4, 3, 3]), (9, 3, [3, 3, 3]), (2, 4, [1, 1, 0, 0]), (0, 2, [0, 0]), (7, 1, [7])],
)
def test_split_evenly_gives_shares_that_add_up(total, parts, shares):
    assert split_evenly(total, parts) == shares
    assert sum(split_evenly(total, parts)) == total


def test_completions_are_strings_that_carry_their_tokens():
    (a, b) = request_completions(["x", "y"], prompt_tokens=9, completion_tokens=[4, 6])
    assert (a, b) == ("x", "y") and isinstance(a, str)
    assert [(c.prompt_tokens, c.completion_tokens) for c in (a, b)] == [(5, 4), (4, 6)]
    # What a request cost, added back up; a backend that counts nothing returns plain strings.
    assert token_usage([a, b]) == (9, 10)
    assert token_usage(["plain", a]) == (5, 4)
    assert token_usage([]) == (0, 0)


def test_transformers_counts_the_tokens_of_each_sample(tiny_model):
    model, tokenizer = tiny_model
    generator = TransformersGenerator(model, tokenizer)
    prompts = ["Passage: The fox.", "Passage: a much longer prompt so the batch needs left padding."]
    out = generator.generate(prompts, SAMPLING, n=3)
    for prompt, group in zip(prompts, out, strict=True):
        prompt_length = len(
            tokenizer(render_prompt(tokenizer, prompt, True), add_special_tokens=False).input_ids
        )
        assert token_usage(group)[0] == prompt_length  # counted once per prompt, shared by its samples
        assert all(0 < text.completion_tokens <= SAMPLING.max_new_tokens for text in group)
    one_token = SamplingSettings(max_new_tokens=1, seed=3)
    assert [t.completion_tokens for t in generator.generate(prompts[:1], one_token, n=2)[0]] == [1, 1]
    # Greedy decodes once for all n copies: the copies share that one answer's tokens.
    (greedy,) = generator.generate([prompts[0]], GREEDY, n=3)
    assert 0 < token_usage(greedy)[1] <= GREEDY.max_new_tokens


# --- OpenAI-compatible HTTP ------------------------------------------------------------------------

API_KEY = "sk-test-9f8e7d6c5b4a"


class FakeChatServer:
    """A real HTTP server on loopback that records requests and replays scripted replies."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        # Each reply: (status, body dict or str). When the script runs out, echo n choices.
        self.script: list[tuple[int, object]] = []
        self.max_choices: int | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client expects

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {k.lower(): v for k, v in self.headers.items()}
                server.requests.append({"path": self.path, "headers": headers, "body": body})
                status, reply = server.script.pop(0) if server.script else (200, server.echo(body))
                payload = (reply if isinstance(reply, str) else json.dumps(reply)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                # The client's retries wait what the server says: 1 ms keeps these tests fast.
                self.send_header("Retry-After-Ms", "1")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def echo(self, body: dict) -> dict:
        count = body["n"] if self.max_choices is None else min(body["n"], self.max_choices)
        prompt = body["messages"][0]["content"]
        # Out of index order on purpose: the client must sort by index.
        choices = [
            {"index": i, "message": {"role": "assistant", "content": f"{prompt}|{len(self.requests)}|{i}"}}
            for i in reversed(range(count))
        ]
        usage = {"prompt_tokens": 10, "completion_tokens": 7 * count, "total_tokens": 10 + 7 * count}
        return {"id": "x", "object": "chat.completion", "choices": choices, "usage": usage}


@pytest.fixture()
def chat_server():
    server = FakeChatServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_chat_completion_body_shapes_the_request():
    body = chat_completion_body(
        "m", "hello", SamplingSettings(temperature=0.7, top_p=0.9, max_new_tokens=64, seed=5), 4
    )
    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "hello"}],
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 64,
        "n": 4,
        "seed": 5,
    }


def test_parse_completions_orders_choices_maps_null_content_to_empty_and_shares_usage():
    response = {
        "choices": [{"index": 1, "message": {"content": None}}, {"index": 0, "message": {"content": "a"}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 5},
    }
    out = parse_completions(response)
    assert out == ["a", ""]
    assert [(c.prompt_tokens, c.completion_tokens) for c in out] == [(6, 3), (5, 2)]
    # No usage (some servers send none): the texts, counting nothing.
    del response["usage"]
    assert token_usage(parse_completions(response)) == (0, 0)
    with pytest.raises(GenerationError, match="malformed"):
        parse_completions({"error": "nope"})
    with pytest.raises(GenerationError, match="malformed"):
        parse_completions(["not", "an", "object"])


def test_openai_request_shaping_and_parsing(chat_server):
    generator = OpenAIGenerator(chat_server.base_url + "/", "teacher-7b", api_key=API_KEY)
    out = generator.generate(
        ["p1", "p2"], SamplingSettings(temperature=0.5, top_p=0.8, max_new_tokens=32), n=2
    )
    assert out == [["p1|1|0", "p1|1|1"], ["p2|2|0", "p2|2|1"]]
    assert [token_usage(group) for group in out] == [(10, 14), (10, 14)]
    assert generator.name == "teacher-7b"
    first = chat_server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["authorization"] == f"Bearer {API_KEY}"
    assert first["headers"]["content-type"] == "application/json"
    body = first["body"]
    assert body["model"] == "teacher-7b"
    assert body["messages"] == [{"role": "user", "content": "p1"}]
    assert (body["n"], body["temperature"], body["top_p"], body["max_tokens"]) == (2, 0.5, 0.8, 32)
    assert API_KEY not in repr(generator)


def test_openai_refuses_a_policy_version_without_asking_the_server(chat_server):
    generator = OpenAIGenerator(chat_server.base_url, "m")
    with pytest.raises(InvalidArgument, match="serves the remote model only") as err:
        generator.generate(["p"], SAMPLING, n=1, policy_version="a" * 64)
    assert err.value.field == "policy_version"
    assert chat_server.requests == []
    assert generator.generate(["p"], SAMPLING, n=1, policy_version="") == [["p|1|0"]]


def test_openai_sends_a_placeholder_key_without_one(chat_server):
    """The openai client insists on a key; a local server without auth ignores the placeholder."""
    OpenAIGenerator(chat_server.base_url, "m").generate(["p"], SAMPLING, n=1)
    assert chat_server.requests[0]["headers"]["authorization"] == "Bearer unused"


def test_openai_asks_again_when_the_server_ignores_n(chat_server):
    chat_server.max_choices = 1
    out = OpenAIGenerator(chat_server.base_url, "m").generate(["p"], SAMPLING, n=3)
    assert out == [["p|1|0", "p|2|0", "p|3|0"]]
    assert [r["body"]["n"] for r in chat_server.requests] == [3, 2, 1]
    # A fresh seed each call, so a seeded server does not hand back the same sample.
    assert len({r["body"]["seed"] for r in chat_server.requests}) == 3
    # Each request's usage lands on the one choice it returned.
    assert [(c.prompt_tokens, c.completion_tokens) for c in out[0]] == [(10, 7)] * 3


def test_openai_max_n_caps_the_choices_asked_of_one_request(chat_server):
    out = OpenAIGenerator(chat_server.base_url, "m", max_n=2).generate(["p"], SAMPLING, n=5)
    assert len(out[0]) == 5
    assert [r["body"]["n"] for r in chat_server.requests] == [2, 2, 1]
    assert token_usage(out[0]) == (30, 35)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_openai_retries_after_a_transient_error(chat_server, status):
    chat_server.script = [(status, {"error": "busy"})]
    out = OpenAIGenerator(chat_server.base_url, "m").generate(["p"], SAMPLING, n=1)
    assert out == [["p|2|0"]]
    assert len(chat_server.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_openai_refusal_fails_at_once_as_a_permanent_error_with_status_and_body(chat_server, status):
    chat_server.script = [(status, {"error": {"message": "max_tokens is too large"}})]
    generator = OpenAIGenerator(chat_server.base_url, "m")
    with pytest.raises(
        GenerationRefused, match=rf"/v1/chat/completions was refused with HTTP {status}.*too large"
    ):
        generator.generate(["p"], SAMPLING, n=1)
    assert len(chat_server.requests) == 1
    # The work plane dead-letters a PermanentError at once; gRPC answers FAILED_PRECONDITION.
    assert issubclass(GenerationRefused, PermanentError) and issubclass(GenerationRefused, GenerationError)


def test_openai_gives_up_after_max_retries_with_a_transient_error(chat_server):
    chat_server.script = [(503, "down")] * 5
    generator = OpenAIGenerator(chat_server.base_url, "m", max_retries=2)
    with pytest.raises(GenerationError, match=r"failed with HTTP 503 after 3 attempts: down") as caught:
        generator.generate(["p"], SAMPLING, n=1)
    assert not isinstance(caught.value, PermanentError)  # the work plane retries the task later
    assert len(chat_server.requests) == 3


def test_openai_connection_refused_is_retried_then_reported():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    generator = OpenAIGenerator(f"http://127.0.0.1:{port}/v1", "m", timeout_s=2, max_retries=1)
    with pytest.raises(
        GenerationError, match=r"could not connect .*2 attempts\); is the server up"
    ) as caught:
        generator.generate(["p"], SAMPLING, n=1)
    assert not isinstance(caught.value, PermanentError)


def test_openai_reply_that_is_not_json_is_a_clear_error(chat_server):
    chat_server.script = [(200, "<html>proxy error</html>")]
    with pytest.raises(GenerationError, match="not JSON.*proxy error"):
        OpenAIGenerator(chat_server.base_url, "m").generate(["p"], SAMPLING, n=1)


def test_openai_reply_with_no_choices_is_an_error_not_a_loop(chat_server):
    chat_server.script = [(200, {"choices": []})]
    with pytest.raises(GenerationError, match="no choices"):
        OpenAIGenerator(chat_server.base_url, "m").generate(["p"], SAMPLING, n=2)


def test_openai_errors_never_show_the_key_even_when_the_server_echoes_it(chat_server):
    chat_server.script = [(401, {"error": {"message": f"invalid key {API_KEY}"}}), (200, {"oops": API_KEY})]
    generator = OpenAIGenerator(chat_server.base_url, "m", api_key=API_KEY)
    for _ in range(2):
        with pytest.raises(GenerationError) as caught:
            generator.generate(["p"], SAMPLING, n=1)
        assert API_KEY not in str(caught.value) and "[api key]" in str(caught.value)


# --- the API key: a secret file, else the environment ----------------------------------------------


def test_the_key_file_wins_over_the_environment_and_errors_never_show_a_key(tmp_path):
    key_file = tmp_path / "openai-key"
    key_file.write_text(API_KEY + "\n")
    assert read_api_key(str(key_file), "sk-from-env") == API_KEY
    assert read_api_key("", " sk-from-env ") == "sk-from-env"
    assert read_api_key("", "") == ""
    with pytest.raises(ValueError, match="cannot read the OpenAI API key file .*missing"):
        read_api_key(str(tmp_path / "missing"), "", "OpenAI API key")
    key_file.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_api_key(str(key_file), "sk-from-env")


def test_the_teacher_reads_its_key_from_the_file_or_the_environment(tmp_path):
    key_file = tmp_path / "openai-key"
    key_file.write_text(API_KEY)
    flags = {"backend": "openai", "openai_base_url": "http://127.0.0.1:9/v1", "openai_model": "m"}
    from_file = load_config("teacher", {**flags, "openai_api_key_file": str(key_file)}, env={})
    from_env = load_config(
        "teacher",
        flags,
        env={"SEAL_OPENAI_API_KEY": API_KEY, "SEAL_OPENAI_TIMEOUT_S": "7", "SEAL_OPENAI_MAX_N": "1"},
    )
    for config in (from_file, from_env):
        generator, fingerprint = build_generator(config)
        assert isinstance(generator, OpenAIGenerator) and fingerprint == ""
        assert generator._api_key == API_KEY
        assert API_KEY not in repr(generator) and API_KEY not in repr(config)
    assert (generator.timeout_s, generator.max_n, generator.max_retries) == (7.0, 1, 3)
