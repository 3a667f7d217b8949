"""An OpenAI-compatible HTTP API for the adapted models, mounted on the gateway's app
(`build_app(..., extra_routes=serving_routes(resolver, authenticator, limits))`).

  GET  /v1/models               {"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}
  POST /v1/chat/completions     a chat.completion, or server-sent chat.completion.chunk events
  POST /v1/completions          a text_completion, or server-sent text_completion events

Clients that already speak OpenAI's API (the `openai` package, LangChain, curl) use the adapted model
unchanged: base_url=http://gateway:8080/v1, api_key=<a seal API token>. Which model a name means is
the resolver's business (`ModelResolver`): the model registry resolves "faq", "faq@3" and "faq:shadow";
`StaticModels` serves fixed models, e.g. the base model.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so the client raises its
BadRequestError (400), AuthenticationError (401), PermissionDeniedError (403) or NotFoundError (404).
Generation runs in worker threads; the event loop never waits on it. Who generates is the served model's
`backend`: transformers in this process (the default; one generation at a time per model, its lock),
or a LoRA of a vLLM server (`VLLMBackend`, which batches concurrent requests itself). The routes, the
request parsing, stop sequences, streaming and the answers' shape are the same for both.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio.to_thread
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.auth import Authenticator, authorize
from gateway.http import Endpoint, HttpError, HttpLimits, error_headers, parse_json, read_body
from seal.errors import InvalidArgument, NotFound, status_of

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 1024
"""The most tokens one request may ask for (max_tokens / max_completion_tokens)."""
DEFAULT_MAX_TOKENS = 128
MAX_STOPS = 4
"""As OpenAI: at most four stop sequences."""
MAX_SHADOWS_PENDING = 8
"""Shadow answers computed or waiting at once; past that a shadow is skipped (and logged), so a slow
shadow model can never pile up threads behind the live traffic."""

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""The roles a message may have, and the role the chat template sees ("developer" is OpenAI's newer
name for "system"; chat templates know only the older one)."""

# Parameters this server cannot honour: refused unless they hold their default (a falsy value),
# since silently ignoring them would give an answer the caller did not ask for.
_UNSUPPORTED = (
    "tools",
    "functions",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "echo",
    "suffix",
)

# --- the models behind the names -------------------------------------------------------------------


@dataclass
class ServedModel:
    id: str
    """The model name a client used ("faq", "faq@3", "faq:shadow"); answers report it as "model"."""
    model: Any
    """A transformers causal LM in eval mode, adapters already merged (None with a VLLMBackend)."""
    tokenizer: Any
    fingerprint: str
    """Of the weights served (base model and adapter); answers report it as system_fingerprint."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    """Held while this model tokenizes, and while transformers generates: one generation at a time."""
    backend: GenerationBackend = field(default_factory=lambda: TRANSFORMERS, repr=False, compare=False)
    """What generates its answers."""


@dataclass(frozen=True)
class Resolution:
    model: ServedModel
    shadow: ServedModel | None = None
    """A model that answers the same request after the client has its answer, for comparison."""


class ModelResolver(Protocol):
    def list_models(self) -> list[str]:
        """The names GET /v1/models lists."""
        ...

    def resolve(self, name: str, prompt: str = "") -> Resolution:
        """The model (and shadow, if any) serving `name` for `prompt` (the text a deployment's gates
        are asked about, seal.gate); NotFound for an unknown deployment/version."""
        ...

    def log_shadow(self, name: str, request: dict[str, Any], answer: str, shadow_answer: str) -> None:
        """Record a shadow comparison: the request's JSON, the served answer and the shadow's."""
        ...


class StaticModels:
    """A resolver over a fixed set of models (the base model, say); no shadows."""

    def __init__(self, models: dict[str, ServedModel]) -> None:
        if not models:
            raise ValueError("StaticModels needs at least one model to serve")
        self.models = dict(models)

    def list_models(self) -> list[str]:
        return list(self.models)

    def resolve(self, name: str, prompt: str = "") -> Resolution:
        served = self.models.get(name)
        if served is None:
            raise NotFound(f"The model {name!r} does not exist; this server has {', '.join(self.models)}")
        return Resolution(served)

    def log_shadow(self, name: str, request: dict[str, Any], answer: str, shadow_answer: str) -> None:
        log.info("shadow answer", extra={"model": name, "answer": answer, "shadow_answer": shadow_answer})


def load_served_model(name: str, model_dir: Path, device: str = "cpu", dtype: str = "float32") -> ServedModel:
    """A model directory (e.g. the base model's) loaded for serving under `name`."""
    from seal.models import load_model, model_fingerprint

    model, tokenizer = load_model(model_dir, device=device, dtype=dtype)
    return ServedModel(name, model, tokenizer, model_fingerprint(model_dir))


# --- requests: JSON -> domain objects (pure) --------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    sampling: Sampling
    messages: tuple[dict[str, str], ...] = ()
    """A chat's turns ({"role", "content"}, roles as the template knows them); empty for a completion."""
    prompt: str = ""
    """A completion's raw prompt; empty for a chat."""
    stream: bool = False
    include_usage: bool = False
    """Streams only: a last chunk with `usage` and no choices (stream_options.include_usage)."""

    @property
    def chat(self) -> bool:
        return bool(self.messages)

    @property
    def gate_text(self) -> str:
        """What a deployment's gates read (seal.gate): every message's content, or the prompt."""
        return "\n".join(m["content"] for m in self.messages) if self.messages else self.prompt


def parse_chat_request(body: Any, max_tokens_limit: int = MAX_TOKENS_LIMIT) -> GenerationRequest:
    """A /v1/chat/completions body checked; InvalidArgument names the parameter to fix."""
    body = _object(body)
    messages = parse_messages(body.get("messages"))
    return _request(body, max_tokens_limit, messages=messages)


def parse_completion_request(body: Any, max_tokens_limit: int = MAX_TOKENS_LIMIT) -> GenerationRequest:
    """A /v1/completions body checked; InvalidArgument names the parameter to fix."""
    body = _object(body)
    if _integer(body, "best_of", 1, 1, None) != 1:
        raise InvalidArgument("best_of", "only best_of=1 is supported")
    return _request(body, max_tokens_limit, prompt=_prompt(body.get("prompt")))


def parse_messages(raw: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument("messages", 'is required: a non-empty list of {"role", "content"} objects')
    return tuple(_message(m, f"messages[{i}]") for i, m in enumerate(raw))


def _message(raw: Any, where: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise InvalidArgument(where, f'must be an object {{"role", "content"}}, got {type(raw).__name__}')
    role = raw.get("role")
    if role not in CHAT_ROLES:
        raise InvalidArgument(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}; got {role!r}")
    return {"role": CHAT_ROLES[role], "content": _content(raw.get("content"), f"{where}.content")}


def _content(raw: Any, where: str) -> str:
    if isinstance(raw, str):
        return raw
    # OpenAI's content parts: only text ones can reach a text model.
    if isinstance(raw, list) and all(_is_text_part(p) for p in raw):
        return "".join(p["text"] for p in raw)
    raise InvalidArgument(where, 'must be a string or a list of {"type": "text", "text": "..."} parts')


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _prompt(raw: Any) -> str:
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if not isinstance(raw, str) or not raw:
        raise InvalidArgument("prompt", "is required: a non-empty string (or a list of one string)")
    return raw


def _request(body: dict[str, Any], max_tokens_limit: int, **kind: Any) -> GenerationRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model", "is required: one of the names GET /v1/models lists")
    if _integer(body, "n", 1, 1, None) != 1:
        raise InvalidArgument("n", "only n=1 is supported; send one request per answer")
    for name in _UNSUPPORTED:
        if body.get(name):
            raise InvalidArgument(name, "is not supported by this server; leave it out")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise InvalidArgument("response_format", 'only {"type": "text"} is supported')
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise InvalidArgument("stream", f"must be true or false, got {stream!r}")
    return GenerationRequest(
        model=model,
        sampling=parse_sampling(body, max_tokens_limit),
        stream=bool(stream),
        include_usage=_include_usage(body.get("stream_options"), bool(stream)),
        **kind,
    )


def parse_sampling(body: dict[str, Any], max_tokens_limit: int = MAX_TOKENS_LIMIT) -> Sampling:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    seed = None if body.get("seed") is None else _integer(body, "seed", 0, None, None)
    return Sampling(
        max_tokens=_integer(body, name, min(DEFAULT_MAX_TOKENS, max_tokens_limit), 1, max_tokens_limit),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=parse_stop(body.get("stop")),
        seed=seed,
    )


def parse_stop(raw: Any) -> tuple[str, ...]:
    stops = [raw] if isinstance(raw, str) else [] if raw is None else raw
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise InvalidArgument("stop", f"must be a non-empty string or a list of at most {MAX_STOPS} of them")
    return tuple(stops)


def _include_usage(raw: Any, stream: bool) -> bool:
    if raw is None:
        return False
    if not stream:
        raise InvalidArgument("stream_options", "is only allowed with stream=true")
    usage = raw.get("include_usage", False) if isinstance(raw, dict) else None
    if not isinstance(usage, bool):
        raise InvalidArgument("stream_options", 'must be {"include_usage": true|false}')
    return usage


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object with model and messages (or prompt)")
    return body


def _integer(body: dict[str, Any], name: str, default: int, low: int | None, high: int | None) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(name, f"must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise InvalidArgument(name, f"must be {bounds}, got {value}")
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidArgument(name, f"must be a number between {low:g} and {high:g}, got {value!r}")
    return float(value)


# --- stop sequences (pure) -------------------------------------------------------------------------


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the earliest stop sequence (which is left out), and whether one was found."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


class StopCutter:
    """Cuts streamed text at the first stop sequence exactly as cut_at_stop cuts the whole text: text
    that might begin a stop sequence is held back until the next piece shows whether it does."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that can be sent now (nothing once a stop sequence has been seen)."""
        if self.stopped:
            return ""
        self.pending += piece
        text, self.stopped = cut_at_stop(self.pending, self.stops)
        if self.stopped:
            self.pending = ""
            return text
        keep = self._held_back()
        ready, self.pending = (
            self.pending[: len(self.pending) - keep],
            self.pending[len(self.pending) - keep :],
        )
        return ready

    def finish(self) -> str:
        """What was held back, once no more text will come."""
        rest, self.pending = ("" if self.stopped else self.pending), ""
        return rest

    def _held_back(self) -> int:
        """The length of the longest end of `pending` that is the start of some stop sequence."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest


# --- answers: domain -> JSON (pure) ----------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    text: str
    """The answer, cut at the first stop sequence, special tokens left out."""
    finish_reason: str
    """"stop" (end of turn or a stop sequence) or "length" (max_tokens, or the model's context)."""
    prompt_tokens: int
    completion_tokens: int

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(frozen=True)
class Reply:
    """What every object of one answer shares: its id, time, model and fingerprint."""

    id: str
    created: int
    model: str
    fingerprint: str
    chat: bool

    @classmethod
    def new(cls, served: ServedModel, chat: bool) -> Reply:
        prefix = "chatcmpl-" if chat else "cmpl-"
        return cls(prefix + uuid.uuid4().hex, int(time.time()), served.id, served.fingerprint, chat)

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }

    def complete(self, generation: Generation) -> dict[str, Any]:
        """The whole answer: a chat.completion or a text_completion."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": generation.finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": generation.text, "refusal": None}
        else:
            choice["text"] = generation.text
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._object(kind, [choice]), "usage": generation.usage}

    def role_chunk(self) -> dict[str, Any]:
        """A chat stream's first chunk: who speaks, no text yet."""
        return self._chunk({"role": "assistant", "content": ""}, "", None)

    def chunk(self, text: str) -> dict[str, Any]:
        """A piece of the answer's text."""
        return self._chunk({"content": text}, text, None)

    def final_chunk(self, finish_reason: str) -> dict[str, Any]:
        """The last chunk with a choice: no text, why the answer ended."""
        return self._chunk({}, "", finish_reason)

    def _chunk(self, delta: dict[str, Any], text: str, finish_reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            return self._object("chat.completion.chunk", [{**choice, "delta": delta}])
        return self._object("text_completion", [{**choice, "text": text}])

    def usage_chunk(self, generation: Generation) -> dict[str, Any]:
        """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._object(kind, []), "usage": generation.usage}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event as OpenAI streams them: `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return b"data: " + payload.encode("utf-8") + b"\n\n"


SSE_DONE = sse("[DONE]")

# --- errors in OpenAI's shape ----------------------------------------------------------------------

_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "insufficient_permissions"),
    404: ("invalid_request_error", "model_not_found"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "overloaded"),
}


class ContextLengthExceeded(InvalidArgument):
    """The prompt alone fills the model's context: nothing is left to answer with."""


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind, default_code = _ERROR_KINDS.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def openai_error_response(exc: BaseException) -> JSONResponse:
    status = exc.status if isinstance(exc, HttpError) else status_of(exc)[1]
    if status >= 500 and status != 503:
        log.error("model request failed", exc_info=exc)
    param = exc.field if isinstance(exc, (InvalidArgument, HttpError)) else None
    if isinstance(exc, NotFound):
        param = "model"
    code = "context_length_exceeded" if isinstance(exc, ContextLengthExceeded) else None
    message = str(exc) or type(exc).__name__
    return JSONResponse(openai_error_body(status, message, param, code), status, error_headers(status))


def _openai_errors(endpoint: Endpoint) -> Endpoint:
    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ClientDisconnect:
            return Response(status_code=400)  # the client left mid-body: nobody reads this answer
        except Exception as exc:  # noqa: BLE001 - every error becomes an OpenAI-shaped status
            return openai_error_response(exc)

    return guarded


# --- generation (blocking: worker threads only) ----------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A request tokenized for one model, checked against its context."""

    inputs: dict[str, Any]
    """input_ids and attention_mask (tensors of one row, on the CPU)."""
    max_new_tokens: int
    sampling: Sampling

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    @property
    def token_ids(self) -> list[int]:
        return [int(t) for t in self.inputs["input_ids"][0].tolist()]


class GenerationBackend(Protocol):
    """What produces a served model's answers (`ServedModel.backend`): TransformersBackend or VLLMBackend."""

    def context_length(self, served: ServedModel) -> int | None:
        """The most tokens prompt and answer may take together (None: not bounded here)."""
        ...

    def generate(
        self,
        served: ServedModel,
        prepared: Prepared,
        on_text: Callable[[str], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> Generation:
        """One answer (blocking). `on_text` gets its text piece by piece as it comes, stop sequences not
        yet cut (the stream's StopCutter cuts them); `cancelled` stops generation early."""
        ...


class TransformersBackend:
    """Generation by transformers in this process: `generate`, one answer at a time per model."""

    def context_length(self, served: ServedModel) -> int | None:
        return _context_length(served.model)

    def generate(
        self,
        served: ServedModel,
        prepared: Prepared,
        on_text: Callable[[str], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> Generation:
        streamer = None if on_text is None else _text_streamer(served.tokenizer, on_text)
        return generate(served, prepared, streamer, cancelled)


TRANSFORMERS = TransformersBackend()


@dataclass(frozen=True)
class VLLMBackend:
    """Generation by a vLLM server (a seal.vllm_server.VLLMEngine): its base model or one LoRA loaded
    there, given our own token ids. No lock is held while it generates: vLLM batches what comes at once."""

    engine: Any
    lora: str
    """The name the server serves this model under (seal.vllm_server.VLLM_BASE_NAME: the base)."""

    def context_length(self, served: ServedModel) -> int | None:
        return int(self.engine.max_model_len())

    def generate(
        self,
        served: ServedModel,
        prepared: Prepared,
        on_text: Callable[[str], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> Generation:
        sampling = prepared.sampling
        completion = self.engine.complete_one(
            prepared.token_ids,
            model=self.lora,
            max_tokens=prepared.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            # vLLM takes a signed 64-bit seed; ours may be any integer.
            seed=None if sampling.seed is None else sampling.seed & 0x7FFF_FFFF_FFFF_FFFF,
            stop=sampling.stop,
            on_text=on_text,
            cancelled=None if cancelled is None else cancelled.is_set,
        )
        # vLLM stops at a stop sequence and leaves it out, as we do; cut again so both backends agree
        # on what a stop is even where vLLM's detokenizer splits text differently.
        text, stopped = cut_at_stop(completion.text, sampling.stop)
        finish_reason = "stop" if stopped or completion.finish_reason != "length" else "length"
        return Generation(text, finish_reason, prepared.prompt_tokens, completion.completion_tokens)


def render(request: GenerationRequest, tokenizer: Any) -> tuple[str, bool]:
    """The text the model reads, and whether the tokenizer should add its special tokens (a chat
    template writes its own; a raw prompt gets them as the model was trained, e.g. a BOS)."""
    if not request.chat:
        return request.prompt, True
    if not tokenizer.chat_template:
        raise InvalidArgument("messages", f"{request.model!r} has no chat template; use /v1/completions")
    messages = list(request.messages)
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)), False


def prepare(served: ServedModel, request: GenerationRequest) -> Prepared:
    """Render and tokenize `request` for `served`; max_tokens is cut to what the context leaves."""
    with served.lock:  # a fast tokenizer is not safe to share between threads
        text, special = render(request, served.tokenizer)
        inputs = served.tokenizer(text, return_tensors="pt", add_special_tokens=special)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    param = "messages" if request.chat else "prompt"
    if prompt_tokens == 0:
        raise InvalidArgument(param, "is empty once tokenized; send some text")
    max_new_tokens = request.sampling.max_tokens
    context = served.backend.context_length(served)
    if context is not None:
        if prompt_tokens >= context:
            raise ContextLengthExceeded(
                param,
                f"this model's maximum context length is {context} tokens and the {param} take "
                f"{prompt_tokens}, leaving none for the answer; shorten the {param}",
            )
        max_new_tokens = min(max_new_tokens, context - prompt_tokens)
    return Prepared(dict(inputs), max_new_tokens, request.sampling)


def _context_length(model: Any) -> int | None:
    # Llama-like configs name it max_position_embeddings; a model without one is not bounded here.
    context = getattr(model.config, "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


def generate(
    served: ServedModel,
    prepared: Prepared,
    streamer: Any = None,
    cancelled: threading.Event | None = None,
) -> Generation:
    """Generate one answer with transformers (blocking; waits for the model's lock). `streamer` gets the
    tokens as they come; `cancelled` stops generation early (the client went away)."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    sampling, tokenizer = prepared.sampling, served.tokenizer
    criteria = StoppingCriteriaList()
    if sampling.stop:
        criteria.append(_StopOnText(tokenizer, prepared.prompt_tokens, sampling.stop))
    if cancelled is not None:
        criteria.append(_Cancelled(cancelled))
    inputs = {k: v.to(served.model.device) for k, v in prepared.inputs.items()}
    with served.lock, torch.inference_mode():
        out = served.model.generate(
            **inputs,
            max_new_tokens=prepared.max_new_tokens,
            # Sampling is done by our own processors with a generator of the request's own, so a seed
            # gives the same answer whatever else runs at the same time (torch's global RNG is shared).
            do_sample=False,
            logits_processor=LogitsProcessorList(_sampling_processors(sampling, served.model.device)),
            stopping_criteria=criteria,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = out[0, prepared.prompt_tokens :].tolist()
        text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    text, stopped = cut_at_stop(text, sampling.stop)
    ended = bool(new_tokens) and new_tokens[-1] in _eos_ids(served.model, tokenizer)
    hit_length = len(new_tokens) >= prepared.max_new_tokens
    finish_reason = "length" if hit_length and not (stopped or ended) else "stop"
    return Generation(text, finish_reason, prepared.prompt_tokens, len(new_tokens))


def _text_streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    """A transformers streamer that hands each piece of decoded answer text to `on_text`."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}


def _sampling_processors(sampling: Sampling, device: Any) -> list[Any]:
    if sampling.temperature == 0:
        return []
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed & 0xFFFF_FFFF_FFFF_FFFF)
    processors: list[Any] = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_p < 1.0:
        processors.append(TopPLogitsWarper(sampling.top_p))
    return [*processors, _SampleWith(generator)]


class _SampleWith:
    """A logits processor that draws the next token with its own generator and leaves only that token
    possible, so greedy decoding then picks it."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(scores.float(), dim=-1)
        choice = torch.multinomial(probs, 1, generator=self.generator)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, choice, 0.0)


class _StopOnText:
    """Stops generation once the answer contains a stop sequence (it is cut off afterwards)."""

    def __init__(self, tokenizer: Any, prompt_tokens: int, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.prompt_tokens, self.stops = tokenizer, prompt_tokens, stops
        # A stop sequence just completed lies within its last tokens: at most 4 per character (bytes).
        self.window = 4 * max(len(s) for s in stops) + 4

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        start = max(self.prompt_tokens, input_ids.shape[1] - self.window)
        tail = self.tokenizer.decode(input_ids[0, start:].tolist(), skip_special_tokens=True)
        found = any(s in tail for s in self.stops)
        return torch.full((input_ids.shape[0],), found, dtype=torch.bool, device=input_ids.device)


class _Cancelled:
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


# --- shadows ---------------------------------------------------------------------------------------


class ShadowRunner:
    """Answers a request again with the shadow model, in a thread of its own, once the client has its
    answer; the two answers go to resolver.log_shadow. Failures are logged, never seen by the client."""

    def __init__(self, resolver: ModelResolver, max_pending: int = MAX_SHADOWS_PENDING) -> None:
        self.resolver = resolver
        self.slots = threading.BoundedSemaphore(max_pending)

    def start(
        self, shadow: ServedModel, request: GenerationRequest, body: dict[str, Any], answer: str
    ) -> None:
        if not self.slots.acquire(blocking=False):
            log.warning("shadow skipped: too many shadow answers pending", extra={"model": request.model})
            return
        args = (shadow, request, body, answer)
        threading.Thread(target=self._run, args=args, name=f"shadow-{shadow.id}", daemon=True).start()

    def _run(
        self, shadow: ServedModel, request: GenerationRequest, body: dict[str, Any], answer: str
    ) -> None:
        try:
            shadow_answer = shadow.backend.generate(shadow, prepare(shadow, request)).text
            self.resolver.log_shadow(request.model, body, answer, shadow_answer)
        except Exception:  # noqa: BLE001 - a shadow never fails the live request
            log.exception("shadow answer failed", extra={"model": request.model, "shadow": shadow.id})
        finally:
            self.slots.release()


# --- routes ----------------------------------------------------------------------------------------


def serving_routes(
    resolver: ModelResolver,
    authenticator: Authenticator,
    limits: HttpLimits,
    max_tokens_limit: int = MAX_TOKENS_LIMIT,
) -> list[Route]:
    """The OpenAI-compatible routes, for build_app(..., extra_routes=...); callers need "use_model"."""
    created = int(time.time())
    shadows = ShadowRunner(resolver)

    def authorized(request: Request) -> None:
        authorize(authenticator.authenticate(request.headers.get("authorization")), "use_model")

    async def list_models(request: Request) -> Response:
        authorized(request)
        names = await run_in_threadpool(resolver.list_models)
        data = [{"id": n, "object": "model", "created": created, "owned_by": "seal"} for n in names]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(request: Request) -> Response:
        authorized(request)  # before the body: a stranger's upload is not read
        body = parse_json(await read_body(request, limits))
        return await answer(parse_chat_request(body, max_tokens_limit), body)

    async def completions(request: Request) -> Response:
        authorized(request)
        body = parse_json(await read_body(request, limits))
        return await answer(parse_completion_request(body, max_tokens_limit), body)

    async def answer(request: GenerationRequest, body: dict[str, Any]) -> Response:
        resolution = await run_in_threadpool(resolver.resolve, request.model, request.gate_text)
        served = resolution.model
        prepared = await run_in_threadpool(prepare, served, request)
        reply = Reply.new(served, request.chat)
        shadow = resolution.shadow

        def after(text: str) -> None:
            if shadow is not None:
                shadows.start(shadow, request, body, text)

        if request.stream:
            return StreamingResponse(
                _stream(served, prepared, request, reply, after),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        generation = await run_in_threadpool(served.backend.generate, served, prepared)
        return JSONResponse(reply.complete(generation), background=BackgroundTask(after, generation.text))

    return [
        Route("/v1/models", _openai_errors(list_models), methods=["GET"]),
        Route("/v1/chat/completions", _openai_errors(chat_completions), methods=["POST"]),
        Route("/v1/completions", _openai_errors(completions), methods=["POST"]),
    ]


async def _stream(
    served: ServedModel,
    prepared: Prepared,
    request: GenerationRequest,
    reply: Reply,
    after: Callable[[str], None],
) -> AsyncIterator[bytes]:
    """The answer as server-sent events while a thread generates it; the thread stops early if the
    client goes away."""
    pieces: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    cancelled = threading.Event()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["generation"] = served.backend.generate(served, prepared, pieces.put, cancelled)
        except BaseException as exc:  # noqa: BLE001 - reported in the stream below
            outcome["error"] = exc
        finally:
            pieces.put(None)  # no more text: the reader stops waiting

    thread = threading.Thread(target=work, name=f"generate-{served.id}", daemon=True)
    thread.start()
    try:
        if request.chat:
            yield sse(reply.role_chunk())
        cutter, sent = StopCutter(prepared.sampling.stop), []
        while (piece := await anyio.to_thread.run_sync(pieces.get)) is not None:
            if text := cutter.feed(piece):
                sent.append(text)
                yield sse(reply.chunk(text))
        if text := cutter.finish():
            sent.append(text)
            yield sse(reply.chunk(text))
        await anyio.to_thread.run_sync(thread.join)
        if "error" in outcome:
            exc = outcome["error"]
            log.error("streamed generation failed", exc_info=exc)
            yield sse(openai_error_body(500, f"generation failed: {exc}"))
            return
        generation: Generation = outcome["generation"]
        yield sse(reply.final_chunk(generation.finish_reason))
        if request.include_usage:
            yield sse(reply.usage_chunk(generation))
        yield SSE_DONE
        after("".join(sent))
    finally:
        cancelled.set()
