"""Service configuration: one typed dataclass, filled from defaults < environment (SEAL_*) < flags."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seal.models import DEFAULT_MODEL
from seal.validation import Limits

SERVICE_KINDS = ("teacher", "student", "auditor", "gateway")


@dataclass
class ServiceConfig:
    kind: str
    """Which service this process runs: teacher, student, auditor or gateway."""
    listen: str = "127.0.0.1:0"
    """gRPC listen address, host:port (port 0 picks a free port)."""
    advertise: str = ""
    """Address other hosts use to reach this service; defaults to the bound listen address."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """The Redis that carries the work streams and job state."""
    namespace: str = "seal"
    """Prefix of every Redis key and stream; lets several stacks share one Redis."""
    model: str = DEFAULT_MODEL
    """Base model: a bundled name (smollm2-135m) or a local Hugging Face model directory."""
    data_dir: Path = field(default_factory=lambda: Path(".seal"))
    """Where this service keeps adapters, keys and caches."""
    device: str = "cpu"
    """torch device for model services (cpu, cuda, cuda:1)."""
    dtype: str = "float32"
    """Weights dtype for model services (float32, bfloat16, float16)."""
    threads: int = 0
    """torch CPU threads (0 leaves torch's default)."""
    backend: str = "transformers"
    """Teacher generation backend: transformers, vllm or openai."""
    openai_base_url: str = ""
    """Teacher with backend=openai: base URL of an OpenAI-compatible API (…/v1)."""
    openai_model: str = ""
    """Teacher with backend=openai: the model name the API serves."""
    openai_api_key: str = field(default="", repr=False)
    """Teacher with backend=openai: API key (prefer the SEAL_OPENAI_API_KEY variable or a key file)."""
    openai_api_key_file: str = ""
    """Teacher with backend=openai: file holding the API key; when set it wins over openai_api_key."""
    openai_timeout_s: float = 120.0
    """Teacher with backend=openai: seconds one HTTP request may take before it counts as failed."""
    openai_max_retries: int = 3
    """Teacher with backend=openai: retries of a failed request (backoff, or the server's Retry-After)
    before the task fails; a task failed by a down or overloaded server is retried later."""
    openai_max_n: int = 0
    """Teacher with backend=openai: most choices asked of one request (1 for servers that refuse
    n > 1, as llama.cpp's and seal's own do); 0: no cap."""
    http_listen: str = "127.0.0.1:8080"
    """Gateway: HTTP/JSON listen address (empty disables HTTP)."""
    grading_metric: str = "contains"
    """Auditor: what makes an answer correct (contains, exact_match, f1; judge needs a judge below)."""
    judge_base_url: str = ""
    """Auditor: base URL (…/v1) of an OpenAI-compatible API whose model also grades every τ answer
    (the paper's yes/no judge); empty: no judge. Set with judge_model."""
    judge_model: str = ""
    """Auditor: the judge's model name (gpt-4.1 in the paper)."""
    judge_api_key_file: str = ""
    """Auditor: file holding the judge's API key; empty: the SEAL_JUDGE_API_KEY variable, if set."""
    answer_prompt: str = "chat"
    """Auditor: how τ is asked: chat (the question as one turn of the chat template) or reference
    (the paper's raw base-model prompt, up to 64 tokens, the answer cut at its first newline)."""
    answer_backend: str = "transformers"
    """Auditor: the engine that answers τ, sign-off and retention questions: transformers or vllm
    (base and adapters as LoRA requests of one vLLM server; the KL shift stays on transformers)."""
    serve_backend: str = "transformers"
    """Gateway: what generates the OpenAI-compatible API's answers: transformers (each version merged into
    a copy of the base here) or vllm (each version one LoRA of a vLLM server, its layers stacked into one
    of rank their sum, at most the server's max LoRA rank, max_directive_rank when the gateway starts it)."""
    audit_workers: int = 1
    """Auditor: audits run at once; with answer_backend=vllm, their questions batch together in vLLM."""
    vllm_url: str = ""
    """Teacher (backend=vllm), auditor (answer_backend=vllm) and gateway (serve_backend=vllm): base URL
    (…/v1) of a running vLLM server of this same base model; empty: the service starts its own from
    vllm_python."""
    vllm_python: str = ""
    """The interpreter of a vLLM environment (`make vllm-env` builds .venv-vllm); empty:
    SEAL_VLLM_PYTHON, else .venv-vllm/bin/python beside the code."""
    vllm_memory_fraction: float = 0.25
    """Share of the accelerator's memory (on CPU builds: of host memory) vLLM reserves for its cache."""
    visibility_timeout_s: float = 120.0
    """A task unacknowledged this long (no heartbeat) is reclaimed by another worker."""
    max_attempts: int = 3
    """Deliveries of one task before it goes to the dead-letter stream."""
    max_documents: int = 32
    """Most documents per job."""
    max_self_edits: int = 16
    """Most self-edits per document (N)."""
    max_context_chars: int = 8000
    """Longest context accepted. Every service checks these limits; give all of them the same."""
    max_rounds: int = 10
    """Most rounds of a policy-training job."""
    max_policy_contexts: int = 200
    """Most training contexts of a policy-training job."""
    max_seeds: int = 5
    """Most training runs (seeds) per self-edit."""
    max_directive_rank: int = 64
    """Teacher: the largest LoRA rank a self-edit's own directives may ask for."""
    max_directive_epochs: int = 20
    """Teacher: the most epochs a self-edit's own directives may ask for."""
    signoff_fraction: float = 0.3
    """Gateway: share of each document's questions kept for sign-off (promotion), never used to choose
    the best self-edit; 0 switches the split off (then nothing can be promoted)."""
    required_approvals: int = 0
    """Gateway: operator approvals (distinct identities) an adapter needs before it is promoted."""
    max_knowledge_drop: float = 0.25
    """Gateway: how far a promotion may lower an earlier document's sign-off accuracy (0..1)."""
    max_retention_drop: float = 0.10
    """Auditor: how far an update may lower the base's accuracy on the retention set (0..1); the
    default is auditor.guardrails.MAX_RETENTION_DROP (a test keeps them equal)."""
    retention_questions: int = 0
    """Auditor: how many of the retention set's 104 questions each audit asks (the first N); 0: all.
    Fewer is cheaper on a CPU and a coarser guardrail (one question is 1/N of the accuracy)."""
    max_kl: float = 0.05
    """Auditor: the largest mean per-token KL(base || adapted) on general prompts an update may cause
    (auditor.guardrails.MAX_KL)."""
    # --- trust: verdict signing, authentication, transport security ------------------------------
    signing_key: str = ""
    """Auditor: its Ed25519 private key file (PEM); empty: <data_dir>/auditor-ed25519.key, made if missing."""
    trusted_keys: str = ""
    """Gateway: file of trusted auditor public keys, JSON {"keys": [{"key_id", "public_key" (base64)}]}.
    Any number of auditors and retired keys may be listed; a verdict under any other key is refused."""
    verdict_ttl_s: float = 30 * 24 * 3600.0
    """Auditor: how long a signed verdict stays valid (its expires_at)."""
    api_tokens: str = ""
    """Gateway: file of API bearer tokens, JSON {"tokens": [{"sha256", "subject", "role"}]};
    roles are submitter (own jobs only) and operator (everything). Empty: the API is open (local use)."""
    tls_ca: str = ""
    """PEM of the CA that signs every service certificate; with tls_cert/tls_key turns on mTLS."""
    tls_cert: str = ""
    """This service's certificate (PEM), signed by tls_ca."""
    tls_key: str = ""
    """This service's private key (PEM)."""
    # --- bounds ----------------------------------------------------------------------------------
    adapter_max_bytes: int = 512 * 1024 * 1024
    """Auditor: largest adapter (all files together) it will fetch."""
    adapter_max_files: int = 8
    """Auditor: most files an adapter may hold."""
    student_wait_s: float = 600.0
    """Auditor: how long to keep retrying (with backoff) for a student that holds an adapter."""
    max_train_tokens: int = 2_000_000
    """Student: compute budget of one update, epochs x training tokens; larger self-edits are refused."""
    train_batch: int = 1
    """Student: apply tasks taken at once and trained together in one batched pass over the shared base
    (student.multi: each adapter as it would train alone, up to rounding); 1 trains each alone."""
    compute_dtype: str = "float32"
    """Student: the frozen base's matmul dtype when updates train together: float32, bfloat16 (LoRA
    weights, loss and optimizer stay fp32) or auto (bf16 where the hardware has it natively)."""
    adapter_retention: int = 200
    """Student and auditor: adapters kept on disk (oldest pruned first, none younger than an hour); 0 keeps all."""
    http_max_body_bytes: int = 16 * 1024 * 1024
    """Gateway: largest HTTP request body."""
    http_max_concurrency: int = 64
    """Gateway: HTTP requests served at once; more wait briefly then get 503."""
    http_read_timeout_s: float = 30.0
    """Gateway: how long a client may take to send its request body."""
    max_watchers: int = 256
    """Gateway: concurrent WatchJob streams (gRPC and HTTP); more get RESOURCE_EXHAUSTED / 429."""
    metrics_listen: str = ""
    """Prometheus /metrics address (host:port); empty: none (the gateway also serves it over HTTP)."""

    def __post_init__(self) -> None:
        if self.kind not in SERVICE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(SERVICE_KINDS)}, got {self.kind!r}")
        self.data_dir = Path(self.data_dir)
        if not math.isfinite(self.visibility_timeout_s) or self.visibility_timeout_s <= 0:
            raise ValueError(
                f"visibility_timeout_s must be a finite number > 0, got {self.visibility_timeout_s}"
            )
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not math.isfinite(self.openai_timeout_s) or self.openai_timeout_s <= 0:
            raise ValueError(f"openai_timeout_s must be a finite number > 0, got {self.openai_timeout_s}")
        if self.openai_max_retries < 0 or self.openai_max_n < 0:
            raise ValueError("openai_max_retries and openai_max_n must be >= 0")
        for name in ("signoff_fraction", "max_knowledge_drop", "max_retention_drop"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.max_kl >= 0:
            raise ValueError(f"max_kl must be >= 0, got {self.max_kl}")
        if self.required_approvals < 0:
            raise ValueError(f"required_approvals must be >= 0, got {self.required_approvals}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.answer_prompt not in ("chat", "reference"):
            raise ValueError(f"answer_prompt must be chat or reference, got {self.answer_prompt!r}")
        if self.answer_backend not in ("transformers", "vllm"):
            raise ValueError(f"answer_backend must be transformers or vllm, got {self.answer_backend!r}")
        if self.serve_backend not in ("transformers", "vllm"):
            raise ValueError(f"serve_backend must be transformers or vllm, got {self.serve_backend!r}")
        if self.audit_workers < 1:
            raise ValueError(f"audit_workers must be >= 1, got {self.audit_workers}")
        if self.retention_questions < 0:
            raise ValueError(f"retention_questions must be >= 0, got {self.retention_questions}")
        if self.train_batch < 1:
            raise ValueError(f"train_batch must be >= 1, got {self.train_batch}")
        if self.compute_dtype not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"compute_dtype must be float32, bfloat16 or auto, got {self.compute_dtype!r}")
        if not 0 < self.vllm_memory_fraction <= 1:
            raise ValueError(f"vllm_memory_fraction must be in (0, 1], got {self.vllm_memory_fraction}")
        if bool(self.judge_base_url) != bool(self.judge_model):
            raise ValueError(
                "a judge needs both judge_base_url and judge_model (--judge-base-url, --judge-model)"
            )
        _split_address(self.listen)

    def limits(self) -> Limits:
        return Limits(
            max_documents=self.max_documents,
            max_self_edits=self.max_self_edits,
            max_context_chars=self.max_context_chars,
            max_rounds=self.max_rounds,
            max_policy_contexts=self.max_policy_contexts,
            max_seeds=self.max_seeds,
            max_directive_rank=self.max_directive_rank,
            max_directive_epochs=self.max_directive_epochs,
            signoff_fraction=self.signoff_fraction,
        )

    def advertised(self, bound_port: int) -> str:
        """The address peers should dial, given the port the server actually bound."""
        if self.advertise:
            return self.advertise
        host, _ = _split_address(self.listen)
        if host in ("0.0.0.0", "[::]", "::"):
            host = socket.gethostname()
        return f"{host}:{bound_port}"


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address must be host:port with a port in [0, 65535], got {address!r}")
    return host, int(port)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServiceConfig field (--redis-url, --data-dir, ...), defaulting to unset."""
    for f in dataclasses.fields(ServiceConfig):
        if f.name == "kind":
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None)


def load_config(
    kind: str, flags: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> ServiceConfig:
    """Defaults, then SEAL_<FIELD> environment variables, then flags that were given."""
    environ: Any = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServiceConfig):
        if f.name == "kind":
            continue
        raw = (flags or {}).get(f.name)
        if raw is None:
            raw = environ.get("SEAL_" + f.name.upper())
        if raw is not None:
            values[f.name] = _coerce(f, raw)
    return ServiceConfig(kind=kind, **values)


def _coerce(f: dataclasses.Field[Any], raw: Any) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
    try:
        if isinstance(default, bool):
            return str(raw).lower() in ("1", "true", "yes", "on")
        if isinstance(default, (int, float)):
            return type(default)(raw)
    except ValueError:
        raise ValueError(f"{f.name} must be a number, got {raw!r}") from None
    if isinstance(default, Path):
        return Path(raw)
    return str(raw)
