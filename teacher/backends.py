"""Generation backends for the teacher: local transformers, any OpenAI-compatible server, or vLLM.

Each returns, for every prompt, `n` completions of new text only (no prompt, no special tokens).
`policy_version` picks the teacher policy: "" is the base model, else a LoRA version saved in a
`teacher.policies.PolicyStore`. Build one by name with `BACKENDS[name](**kwargs)`.

A backend that counts tokens returns `Completion`s (strings that also carry the tokens they cost);
the teacher's core adds them up onto each self-edit.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import openai

from seal.errors import FailedPrecondition, InvalidArgument, NotFound
from seal.models import prompt_token_ids, render_prompt
from seal.records import SamplingSettings
from seal.vllm_server import VLLMEngine, VLLMError
from teacher.policies import PolicyStore

log = logging.getLogger(__name__)

_ERROR_SNIPPET_CHARS = 500


class Generator(Protocol):
    """Samples completions; `name` identifies the model for provenance."""

    name: str

    def generate(
        self, prompts: list[str], sampling: SamplingSettings, n: int, *, policy_version: str = ""
    ) -> list[list[str]]: ...


class GenerationError(RuntimeError):
    """A backend could not produce completions: the server down, overloaded, too slow, or answering
    nonsense. Transient as far as anyone can tell (not a PermanentError): the work plane keeps the
    task and retries it later, up to its max_attempts."""


class GenerationRefused(GenerationError, FailedPrecondition):
    """The server refused the request as made (HTTP 400, 401, 403, 404, 422...): a wrong key, an
    unknown model, a setting it does not take. Asking again cannot help, so the work plane
    dead-letters the task with this message at once (and gRPC answers FAILED_PRECONDITION)."""


class Completion(str):
    """One sampled text that also carries the tokens it cost, as the backend counted them.

    A str, so callers that want the text alone never notice; backends that count nothing return
    plain strings (0 tokens). When one request produced several choices, its prompt tokens (and,
    where the backend counts per request only, its completion tokens) are split evenly over them,
    so the shares of a request add up to what it cost.
    """

    prompt_tokens: int
    completion_tokens: int

    def __new__(cls, text: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> Completion:
        completion = super().__new__(cls, text)
        completion.prompt_tokens = prompt_tokens
        completion.completion_tokens = completion_tokens
        return completion


def token_usage(samples: Iterable[str]) -> tuple[int, int]:
    """The (prompt, completion) tokens of `samples` added up; a plain string counts nothing."""
    counted = [s for s in samples if isinstance(s, Completion)]
    return sum(s.prompt_tokens for s in counted), sum(s.completion_tokens for s in counted)


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` whole shares that differ by at most one (the larger first) and add up to it."""
    base, extra = divmod(max(total, 0), parts)
    return [base + (i < extra) for i in range(parts)]


def request_completions(
    texts: list[str], prompt_tokens: int, completion_tokens: list[int]
) -> list[Completion]:
    """One request's texts as Completions: its prompt tokens shared evenly over them, and each text's
    own completion tokens (one count per text)."""
    shares = split_evenly(prompt_tokens, len(texts)) if texts else []
    return [Completion(t, p, c) for t, p, c in zip(texts, shares, completion_tokens, strict=True)]


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")


# --- transformers ----------------------------------------------------------------------------------


# Policy versions a transformers teacher keeps loaded at once (a 135M model's r16 LoRA is ~10 MB).
MAX_LOADED_POLICIES = 4


class TransformersGenerator:
    """Generates with a loaded transformers causal LM (left-padded tokenizer, as `load_model` sets).

    Policy versions from `policies` load on first use as named PEFT adapters on this one base model
    (the `max_loaded_policies` most recently used stay loaded). Not thread-safe: the teacher service
    holds a lock around every call, as it does for the model itself.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str = "cpu",
        use_chat_template: bool = True,
        name: str = "",
        policies: PolicyStore | None = None,
        max_loaded_policies: int = MAX_LOADED_POLICIES,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.use_chat_template = use_chat_template
        self.name = name or model.config.name_or_path
        self.policies = policies
        self.max_loaded_policies = max(1, max_loaded_policies)
        self._peft: Any = None
        # Loaded versions, least recently used first.
        self._loaded: OrderedDict[str, None] = OrderedDict()

    def generate(
        self, prompts: list[str], sampling: SamplingSettings, n: int, *, policy_version: str = ""
    ) -> list[list[str]]:
        _check_n(n)
        with self._policy(policy_version):
            if not prompts:
                return []
            return self._generate(prompts, sampling, n)

    def loaded_policies(self) -> list[str]:
        """The policy versions loaded now, least recently used first."""
        return list(self._loaded)

    def release_policies(self) -> None:
        """Drop every loaded version: the model is the bare base again (to train a new policy on it)."""
        if self._peft is not None:
            # unload(), not merge: the base weights were never touched.
            self._peft.unload()
        self._peft = None
        self._loaded.clear()

    @contextlib.contextmanager
    def _policy(self, version: str) -> Iterator[None]:
        if not version:
            # The base policy: with versions loaded, switch their LoRA layers off for this call.
            with self._peft.disable_adapter() if self._peft is not None else contextlib.nullcontext():
                yield
            return
        if version in self._loaded:
            self._loaded.move_to_end(version)
        else:
            self._load_policy(version)
        self._peft.set_adapter(version, inference_mode=True)
        yield

    def _load_policy(self, version: str) -> None:
        from peft import PeftModel

        if self.policies is None:
            raise NotFound(f"policy version {version} asked for, but this teacher has no policy store")
        path = str(self.policies.get(version))
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.model, path, adapter_name=version)
        else:
            self._peft.load_adapter(path, adapter_name=version)
        # Active before evicting: PEFT would otherwise pick some other adapter when the active one goes.
        self._peft.set_adapter(version, inference_mode=True)
        self._loaded[version] = None
        while len(self._loaded) > self.max_loaded_policies:
            oldest, _ = self._loaded.popitem(last=False)
            self._peft.delete_adapter(oldest)

    def _generate(self, prompts: list[str], sampling: SamplingSettings, n: int) -> list[list[str]]:
        greedy = sampling.temperature <= 0
        # Greedy decoding gives n identical answers: decode once, copy.
        copies = 1 if greedy else n
        texts = [render_prompt(self.tokenizer, p, self.use_chat_template) for p in prompts]
        new_tokens, prompt_tokens = self._generate_tokens(texts, sampling, copies)
        decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        # Padding fills a row after its end (and where pad is the end-of-sequence token, that end).
        generated = (new_tokens != self.tokenizer.pad_token_id).sum(dim=1).tolist()
        out = []
        for i, prompt_length in enumerate(prompt_tokens):
            rows = range(i * copies, (i + 1) * copies)
            if greedy:  # one answer stands for all n: its tokens are shared, as a request's are
                group = [decoded[rows[0]]] * n
                spent = split_evenly(generated[rows[0]], n)
            else:
                group = [decoded[r] for r in rows]
                spent = [generated[r] for r in rows]
            out.append(request_completions(group, prompt_length, spent))
        return out

    def _generate_tokens(
        self, texts: list[str], sampling: SamplingSettings, copies: int
    ) -> tuple[Any, list[int]]:
        """The new tokens of every sequence, and each prompt's length in tokens (padding excluded)."""
        import torch

        templated = self.use_chat_template and bool(self.tokenizer.chat_template)
        # The chat template already writes its special tokens; adding them again would double a BOS.
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated).to(
            self.device
        )
        torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            output = self.model.generate(
                **batch,
                **_transformers_sampling_kwargs(sampling),
                max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=copies,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return output[:, batch["input_ids"].shape[1] :], batch["attention_mask"].sum(dim=1).tolist()


def _transformers_sampling_kwargs(sampling: SamplingSettings) -> dict[str, Any]:
    if sampling.temperature <= 0:
        return {"do_sample": False}
    # top_k=0 switches off the top-50 cut that many generation configs carry: the paper samples with
    # temperature and top_p alone.
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}


# --- OpenAI-compatible HTTP ------------------------------------------------------------------------

# What the openai client retries itself (request timeout, lock conflict, rate limiting, server
# trouble): a status still among these once its retries are spent is worth a later try.
TRANSIENT_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


def chat_completion_body(model: str, prompt: str, sampling: SamplingSettings, n: int) -> dict[str, Any]:
    """The JSON body of one /chat/completions request for `n` samples of `prompt`."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_new_tokens,
        "n": n,
        "seed": sampling.seed,
    }


def parse_completions(response: Any) -> list[Completion]:
    """The choices of a /chat/completions response in index order, with its `usage` shared over them.

    The API reports usage per request, not per choice, so completion tokens are split evenly too;
    a response without usage counts 0.
    """
    try:
        choices = sorted(response["choices"], key=lambda c: c.get("index", 0))
        texts = [c["message"]["content"] or "" for c in choices]
    except (KeyError, TypeError, AttributeError) as exc:
        snippet = json.dumps(response)[:_ERROR_SNIPPET_CHARS]
        raise GenerationError(f"malformed chat completion response (missing {exc}): {snippet}") from None
    usage = response.get("usage")
    completion_tokens = split_evenly(_count(usage, "completion_tokens"), len(texts)) if texts else []
    return request_completions(texts, _count(usage, "prompt_tokens"), completion_tokens)


def _count(usage: Any, key: str) -> int:
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and value > 0 else 0


class OpenAIGenerator:
    """Samples from any server speaking the OpenAI chat completions API (vLLM, llama.cpp, OpenAI...).

    The official `openai` client does the HTTP: each request's timeout, and its retries with
    exponential backoff (0.5 s doubling up to 8 s, with jitter) or after the server's Retry-After
    (up to two minutes). What is still wrong after its retries raises GenerationError (transient: the
    work plane retries the task later) or GenerationRefused (the request as made was refused: the
    task is dead-lettered); either names the URL, the status and the start of the server's answer,
    never the API key.

    A server that returns fewer choices than asked (some ignore `n`) is asked again for the rest;
    `max_n` (0: no cap) caps the choices asked of one request, for servers that refuse n > 1.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        timeout_s: float = 120,
        max_retries: int = 3,
        max_n: int = 0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.name = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_n = max_n
        self._api_key = api_key
        # The client insists on some key; a local server without auth ignores this placeholder.
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key or "unused", timeout=timeout_s, max_retries=max_retries
        )

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIGenerator(base_url={self.base_url!r}, model={self.name!r})"

    def generate(
        self, prompts: list[str], sampling: SamplingSettings, n: int, *, policy_version: str = ""
    ) -> list[list[str]]:
        _check_n(n)
        if policy_version:
            raise InvalidArgument(
                "policy_version",
                f"the openai backend serves the remote model only ({self.name}); it cannot load policy version "
                f"{policy_version}: leave policy_version empty, or serve policies with the transformers or vllm backend",
            )
        return [self._sample(prompt, sampling, n) for prompt in prompts]

    def _sample(self, prompt: str, sampling: SamplingSettings, n: int) -> list[str]:
        completions: list[Completion] = []
        # Some servers ignore `n` and return one choice: ask again for the rest, with a fresh seed so
        # a seeded server does not repeat itself.
        while len(completions) < n:
            wanted = n - len(completions)
            body = chat_completion_body(self.name, prompt, sampling, min(wanted, self.max_n or wanted))
            body["seed"] = sampling.seed + len(completions)
            got = self._post(body)
            if not got:
                raise GenerationError(f"{self.url} returned no choices for a request of n={body['n']}")
            completions.extend(got)
        return list(completions[:n])

    def _post(self, body: dict[str, Any]) -> list[Completion]:
        try:
            response = self._client.chat.completions.with_raw_response.create(**body)
        except openai.APIStatusError as exc:
            raise self._status_error(exc) from None
        except openai.APITimeoutError as exc:
            raise GenerationError(
                f"POST {self.url} got no answer within {self.timeout_s} s "
                f"({self._attempts(exc.request)} attempts): the server is stuck or overloaded "
                "(a longer --openai-timeout-s helps if it is only slow)"
            ) from None
        except openai.APIConnectionError as exc:
            cause = self._redact(str(exc.__cause__ or exc))[:_ERROR_SNIPPET_CHARS]
            raise GenerationError(
                f"POST {self.url} could not connect ({cause}; {self._attempts(exc.request)} attempts); "
                "is the server up?"
            ) from None
        try:
            return parse_completions(json.loads(response.text))
        except json.JSONDecodeError as exc:
            snippet = self._redact(response.text[:_ERROR_SNIPPET_CHARS])
            raise GenerationError(
                f"POST {self.url} returned a body that is not JSON ({exc.msg}): {snippet}"
            ) from None
        except GenerationError as exc:
            raise GenerationError(self._redact(f"POST {self.url} returned a {exc}")) from None

    def _status_error(self, exc: openai.APIStatusError) -> GenerationError:
        status = exc.status_code
        body = self._redact(exc.response.text[:_ERROR_SNIPPET_CHARS])
        if status in TRANSIENT_STATUS:
            attempts = self._attempts(exc.response.request)
            return GenerationError(
                f"POST {self.url} failed with HTTP {status} after {attempts} attempts: {body}"
            )
        return GenerationRefused(
            f"POST {self.url} was refused with HTTP {status}, not retried (check the model name, the API "
            f"key and the sampling settings): {body}"
        )

    def _attempts(self, request: Any) -> int:
        """Tries the client made: it numbers its retries in a header of each request it sends."""
        try:
            return int(request.headers["x-stainless-retry-count"]) + 1
        except (AttributeError, KeyError, TypeError, ValueError):
            return self.max_retries + 1

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "[api key]") if self._api_key else text


# --- vLLM ------------------------------------------------------------------------------------------


class VLLMGenerator:
    """Samples from a vLLM server (seal.vllm_server): the base model, or a policy version as a LoRA
    adapter loaded into the running engine the first time it is asked for (no restart).

    Prompts are rendered and tokenized here, with the teacher's own tokenizer, exactly as the
    transformers backend does (`prompt_token_ids`), and sent as token ids: vLLM would otherwise add a
    BOS of its own on top of the chat template's. Thread-safe: requests from several threads are
    batched by the server.
    """

    def __init__(
        self,
        engine: VLLMEngine,
        tokenizer: Any,
        *,
        use_chat_template: bool = True,
        name: str = "",
        policies: PolicyStore | None = None,
        model: Any = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        # A transformers copy of the same base, for training policy versions (None: sampling only).
        self.model = model
        self.stop: Callable[[], None] = engine.close
        self.use_chat_template = use_chat_template
        self.policies = policies
        self.name = name or engine.model

    def generate(
        self, prompts: list[str], sampling: SamplingSettings, n: int, *, policy_version: str = ""
    ) -> list[list[str]]:
        _check_n(n)
        model = self._lora(policy_version)
        if not prompts:
            return []
        greedy = sampling.temperature <= 0
        ids = [prompt_token_ids(self.tokenizer, p, self.use_chat_template) for p in prompts]
        try:
            groups = self.engine.complete(
                ids,
                model=model,
                max_tokens=sampling.max_new_tokens,
                # Greedy decoding gives n identical answers: decode once, copy.
                n=1 if greedy else n,
                temperature=max(sampling.temperature, 0.0),
                top_p=1.0 if greedy else sampling.top_p,
                seed=sampling.seed,
            )
        except VLLMError as exc:
            raise GenerationError(str(exc)) from exc
        # Usage: each prompt's tokens shared over its samples; each sample's tokens counted again by
        # the teacher's tokenizer (the completions API reports one total per request).
        counted = [
            request_completions(
                group,
                len(prompt_ids),
                [len(self.tokenizer.encode(t, add_special_tokens=False)) for t in group],
            )
            for group, prompt_ids in zip(groups, ids, strict=True)
        ]
        return [group * n if greedy else group for group in counted]

    def loaded_policies(self) -> list[str]:
        return [name.removeprefix("policy-") for name in self.engine.loaded() if name.startswith("policy-")]

    def release_policies(self) -> None:
        """Nothing to release: versions live in the vLLM engine, `model` stays the bare base."""

    def _lora(self, version: str) -> str:
        if not version:
            return ""
        if self.policies is None:
            raise NotFound(f"policy version {version} asked for, but this teacher has no policy store")
        path = self.policies.get(version)
        try:
            return self.engine.load_lora(f"policy-{version}", path)
        except VLLMError as exc:
            raise GenerationError(str(exc)) from exc


BACKENDS: dict[str, Callable[..., Generator]] = {
    "transformers": TransformersGenerator,
    "openai": OpenAIGenerator,
    "vllm": VLLMGenerator,
}
