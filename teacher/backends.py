"""Generation backends for the teacher: local transformers, any OpenAI-compatible server, or vLLM.

Each returns, for every prompt, `n` completions of new text only (no prompt, no special tokens).
`policy_version` picks the teacher policy: "" is the base model, else a LoRA version saved in a
`teacher.policies.PolicyStore`. Build one by name with `BACKENDS[name](**kwargs)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from seal.errors import InvalidArgument, NotFound
from seal.models import render_prompt
from seal.records import SamplingSettings
from teacher.policies import PolicyStore

log = logging.getLogger(__name__)

# Statuses worth another try: rate limiting and server-side trouble.
_RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
_ERROR_SNIPPET_CHARS = 500


class Generator(Protocol):
    """Samples completions; `name` identifies the model for provenance."""

    name: str

    def generate(
        self, prompts: list[str], sampling: SamplingSettings, n: int, *, policy_version: str = ""
    ) -> list[list[str]]: ...


class GenerationError(RuntimeError):
    """A backend could not produce completions (bad request, server down, malformed reply)."""


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
        new_tokens = self._generate_tokens(texts, sampling, copies)
        decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        per_prompt = [decoded[i * copies : (i + 1) * copies] for i in range(len(prompts))]
        return [group * n if greedy else group for group in per_prompt]

    def _generate_tokens(self, texts: list[str], sampling: SamplingSettings, copies: int) -> Any:
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
        return output[:, batch["input_ids"].shape[1] :]


def _transformers_sampling_kwargs(sampling: SamplingSettings) -> dict[str, Any]:
    if sampling.temperature <= 0:
        return {"do_sample": False}
    # top_k=0 switches off the top-50 cut that many generation configs carry: the paper samples with
    # temperature and top_p alone.
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}


# --- OpenAI-compatible HTTP ------------------------------------------------------------------------


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


def completion_texts(response: dict[str, Any]) -> list[str]:
    """The message texts of a /chat/completions response, in choice order."""
    try:
        choices = sorted(response["choices"], key=lambda c: c.get("index", 0))
        return [c["message"]["content"] or "" for c in choices]
    except (KeyError, TypeError, AttributeError) as exc:
        snippet = json.dumps(response)[:_ERROR_SNIPPET_CHARS]
        raise GenerationError(f"malformed chat completion response (missing {exc}): {snippet}") from exc


class OpenAIGenerator:
    """Samples from any server speaking the OpenAI chat completions API (vLLM, llama.cpp, OpenAI...)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        timeout_s: float = 120,
        max_retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.name = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s

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
        texts: list[str] = []
        # Some servers ignore `n` and return one choice: ask again for the rest, with a fresh seed so
        # a seeded server does not repeat itself.
        while len(texts) < n:
            call = chat_completion_body(self.name, prompt, sampling, n - len(texts))
            call["seed"] = sampling.seed + len(texts)
            got = completion_texts(self._post(call))
            if not got:
                raise GenerationError(f"{self.url} returned no choices for a request of n={call['n']}")
            texts.extend(got)
        return texts[:n]

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                last_error = f"HTTP {exc.code}: {_body_snippet(exc)}"
                if exc.code not in _RETRYABLE_STATUS:
                    raise GenerationError(f"POST {self.url} failed with {last_error}") from exc
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                last_error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            except json.JSONDecodeError as exc:
                raise GenerationError(f"POST {self.url} returned a body that is not JSON: {exc}") from exc
            log.warning("teacher request failed, retrying", extra={"url": self.url, "error": last_error})
        raise GenerationError(f"POST {self.url} failed after {self.max_retries + 1} attempts: {last_error}")


def _body_snippet(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read()[:_ERROR_SNIPPET_CHARS].decode(errors="replace")
    except OSError:
        return ""


# --- vLLM ------------------------------------------------------------------------------------------


class VLLMGenerator:
    """Generates with vLLM's offline engine (GPU). `engine_kwargs` go to `vllm.LLM` unchanged."""

    def __init__(
        self,
        model_path: str,
        *,
        use_chat_template: bool = True,
        name: str = "",
        policies: PolicyStore | None = None,
        **engine_kwargs: Any,
    ) -> None:
        # Imported here so the teacher runs (transformers / HTTP backends) where vLLM is not installed.
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        self._sampling_params = SamplingParams
        self._lora_request = LoRARequest
        self.policies = policies
        if policies is not None:
            # Policy versions are LoRAs on this engine's base: vLLM serves them only when asked to.
            engine_kwargs.setdefault("enable_lora", True)
        self.llm = LLM(model=str(model_path), **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.use_chat_template = use_chat_template
        self.name = name or str(model_path)

    def generate(
        self, prompts: list[str], sampling: SamplingSettings, n: int, *, policy_version: str = ""
    ) -> list[list[str]]:
        _check_n(n)
        lora = self._lora(policy_version)
        if not prompts:
            return []
        greedy = sampling.temperature <= 0
        # vLLM refuses n > 1 under greedy decoding in some versions, and the copies would be identical.
        params = self._sampling_params(
            n=1 if greedy else n,
            temperature=max(sampling.temperature, 0.0),
            top_p=1.0 if greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
        )
        outputs = self.llm.generate(
            [self._engine_prompt(p) for p in prompts], params, use_tqdm=False, lora_request=lora
        )
        groups = [[c.text for c in out.outputs] for out in outputs]
        return [group * n if greedy else group for group in groups]

    def _lora(self, version: str) -> Any:
        if not version:
            return None
        if self.policies is None:
            raise NotFound(f"policy version {version} asked for, but this teacher has no policy store")
        path = self.policies.get(version)
        # vLLM caches a LoRA by its int id, so one version must always map to one id (> 0).
        return self._lora_request(version, policy_lora_id(version), str(path))

    def _engine_prompt(self, prompt: str) -> str | dict[str, list[int]]:
        if not (self.use_chat_template and self.tokenizer.chat_template):
            return prompt
        # Token ids, because vLLM would add a BOS on top of the one the chat template already wrote.
        text = render_prompt(self.tokenizer, prompt, use_chat_template=True)
        return {"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}


def policy_lora_id(version: str) -> int:
    """vLLM's int id of a policy version: its first 60 bits, plus one (0 is not a valid id)."""
    return int(version[:15], 16) + 1


BACKENDS: dict[str, Callable[..., Generator]] = {
    "transformers": TransformersGenerator,
    "openai": OpenAIGenerator,
    "vllm": VLLMGenerator,
}
