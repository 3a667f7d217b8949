"""The models the OpenAI-compatible API serves: deployment versions, built from verified parts only.

A model name is a deployment: `faq` (its production alias), `faq:candidate` / `faq:shadow` (another
alias), or `faq@3` (version 3, whatever the aliases say). Resolving reads the alias from Redis on
every request, so a promotion or a rollback changes what the next request gets, with no restart.

Before a version is loaded, every part of it is verified again under the gateway's trusted auditor
keys: each layer's verdict (signature, the adapter digest and base it names, passed) and the
version's certificate (signature, the exact fingerprint, adapters and documents, passed); each adapter's
files are fetched from a registered student and checked against their manifest digest. A version
that fails any of this is never loaded. Expiry is not re-checked here: it gates promotion, and a
served model does not stop answering the day its verdict would have expired.

Each request is answered by the layers whose gates open for its text (seal.gate): a version of its
own, made of those layers and fingerprinted as such, loaded and cached like any version; no layer
open, the base model. An ungated version is served whole, as before.

Two ways to serve a verified version: merged into a copy of the base model in this process
(transformers, the default), or as one LoRA of a vLLM server (`VLLMLoras`, --serve-backend vllm).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.deployments import ALIASES, DeploymentStore, certificate_problem, check_name
from gateway.serving import Resolution, ServedModel, VLLMBackend
from seal.errors import FailedPrecondition, NotFound
from seal.gate import route
from seal.models import merge_adapters, read_lora, stack_loras, write_lora
from seal.records import AdapterRef, DeploymentVersion, VersionState
from seal.signing import TrustedKeys, VerdictRejected, layer_gate_sha256s, version_fingerprint

log = logging.getLogger(__name__)

SHADOW_LOG_CAP = 10_000
BASE_MODEL = "base"
"""The base model itself, always served (no deployment may take this name): what every version adds to."""


def parse_model_name(name: str) -> tuple[str, str, int | None]:
    """(deployment, alias, version) of a model name; NotFound for a name that cannot be one."""
    deployment, alias, version = name, "production", None
    try:
        if "@" in name:
            deployment, raw = name.split("@", 1)
            version = int(raw)
        elif ":" in name:
            deployment, alias = name.split(":", 1)
        check_name(deployment)
    except ValueError:
        raise NotFound(
            f"The model {name!r} does not exist: name a deployment (faq), an alias (faq:shadow) or a version (faq@3)"
        ) from None
    if alias not in ALIASES:
        raise NotFound(f"The model {name!r} does not exist: aliases are {', '.join(ALIASES)}")
    return deployment, alias, version


def routed_version(version: DeploymentVersion, prompt: str) -> DeploymentVersion:
    """The part of a (verified) `version` that answers `prompt`: the layers whose gates open for it
    (seal.gate), as a version of its own with its own fingerprint; `version` itself when every layer
    applies (an ungated version always)."""
    with_adapter = [layer for layer in version.layers if layer.adapter is not None]
    gates = [layer.document.gate() if layer.document is not None else None for layer in with_adapter]
    layers = tuple(with_adapter[i] for i in route(gates, prompt))
    if len(layers) == len(with_adapter):
        return version
    fingerprint = version_fingerprint(
        version.base_fingerprint, [x.adapter.sha256 for x in layers if x.adapter], layer_gate_sha256s(layers)
    )
    return dataclasses.replace(version, layers=layers, fingerprint=fingerprint)


def verify_version(version: DeploymentVersion, keys: TrustedKeys) -> None:
    """FailedPrecondition unless every layer's verdict and the version's certificate verify and name it."""
    where = f"{version.deployment}@{version.version}"
    if version.state is not VersionState.PROMOTED:
        raise FailedPrecondition(f"{where} is {version.state.value}, not promoted: it is never served")
    try:
        for layer in version.layers:
            if layer.verdict is None or layer.adapter is None:
                raise FailedPrecondition(f"{where}: a layer has no verdict")
            statement = keys.verify(layer.verdict)
            if (
                statement.adapter_sha256 != layer.adapter.sha256
                or statement.base_fingerprint != version.base_fingerprint
            ):
                raise FailedPrecondition(f"{where}: a layer's verdict names another adapter or base")
            if not statement.passed:
                raise FailedPrecondition(f"{where}: a layer's verdict did not pass")
        if version.layers:
            if version.certificate is None:
                raise FailedPrecondition(f"{where} has no certificate")
            certificate = keys.verify_certificate(version.certificate)
            problem = certificate_problem(version, version.certificate)
            if problem or not certificate.passed:
                raise FailedPrecondition(f"{where}: {problem or 'its certificate did not pass'}")
    except VerdictRejected as exc:
        raise FailedPrecondition(f"{where} is not served: {exc}") from None


class VLLMLoras:
    """Deployment versions served as LoRAs of one vLLM server (seal.vllm_server.VLLMEngine).

    A version is loaded at its first request (after verification: the caller's business) as ONE adapter
    named v-<fingerprint[:16]>: its layers stacked into one exactly equivalent LoRA whose rank is the
    sum of theirs (seal.models.stack_loras), written under `work_dir`. A version whose rank would pass
    the server's max LoRA rank is refused (FailedPrecondition), never served as something else. The
    last `cache_size` versions stay loaded; an older one is unloaded from the server (a request still
    streaming from it then fails). Version 0 is the server's base model.
    """

    def __init__(
        self, engine: Any, tokenizer: Any, work_dir: Path, max_rank: int = 64, cache_size: int = 3
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.work_dir = Path(work_dir)
        self.max_rank = max_rank
        self.cache_size = cache_size
        self._loaded: OrderedDict[str, str] = OrderedDict()  # fingerprint -> LoRA name, oldest first
        self._lock = threading.Lock()
        # Every model here shares the one tokenizer, so they share the lock that guards it.
        self._tokenizer_lock = threading.Lock()

    def base(self, name: str, fingerprint: str) -> ServedModel:
        from seal.vllm_server import VLLM_BASE_NAME

        return self._model(name, fingerprint, VLLM_BASE_NAME)

    def served(
        self, name: str, version: DeploymentVersion, adapter_dirs: Callable[[], list[Path]]
    ) -> ServedModel:
        """The (already verified) `version` as a LoRA of the server, loaded if it is not yet."""
        if not version.layers:
            return self.base(name, version.fingerprint)
        with self._lock:
            lora = self._loaded.get(version.fingerprint)
            if lora is None:
                lora = self._load(version, adapter_dirs())
                self._loaded[version.fingerprint] = lora
                while len(self._loaded) > self.cache_size:
                    _, evicted = self._loaded.popitem(last=False)
                    self.engine.unload_lora(evicted)
                    shutil.rmtree(self.work_dir / evicted, ignore_errors=True)
            self._loaded.move_to_end(version.fingerprint)
        return self._model(name, version.fingerprint, lora)

    def _load(self, version: DeploymentVersion, dirs: list[Path]) -> str:
        where = f"{version.deployment}@{version.version}"
        try:
            config, tensors = stack_loras([read_lora(d) for d in dirs])
        except ValueError as exc:
            raise FailedPrecondition(f"{where} cannot be served by vLLM: {exc}") from None
        if config["r"] > self.max_rank:
            raise FailedPrecondition(
                f"{where} cannot be served by vLLM: its {len(dirs)} layers stack into LoRA rank "
                f"{config['r']}, more than the server's max LoRA rank {self.max_rank}; serve it with "
                "--serve-backend transformers, or give vLLM a larger --max-lora-rank"
            )
        name = f"v-{version.fingerprint[:16]}"
        staging = write_lora(self.work_dir / f".{name}-{uuid.uuid4().hex[:8]}", config, tensors)
        target = self.work_dir / name
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        self.engine.load_lora(name, target)
        log.info(
            "version loaded into vLLM",
            extra={"model": where, "lora": name, "rank": config["r"], "layers": len(dirs)},
        )
        return name

    def _model(self, name: str, fingerprint: str, lora: str) -> ServedModel:
        backend = VLLMBackend(self.engine, lora)
        return ServedModel(
            name, None, self.tokenizer, fingerprint, lock=self._tokenizer_lock, backend=backend
        )

    def close(self) -> None:
        """Unload every version this gateway loaded (the server may be shared, or outlive us)."""
        with self._lock:
            for lora in self._loaded.values():
                self.engine.unload_lora(lora)
            self._loaded.clear()


class DeploymentModels:
    """A ModelResolver over the deployment registry (gateway.serving): versions merged into the base
    model by transformers here (`base` loads it), or LoRAs of a vLLM server (`vllm`; `base` unused)."""

    def __init__(
        self,
        deployments: DeploymentStore,
        keys: TrustedKeys,
        base: Callable[[], tuple[Any, Any]],
        fetch: Callable[[AdapterRef], Path],
        cache_size: int = 3,
        vllm: VLLMLoras | None = None,
    ) -> None:
        self.deployments = deployments
        self.keys = keys
        self.vllm = vllm
        self._base_loader = base
        self._base: tuple[Any, Any] | None = None
        self.fetch = fetch
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._base_lock = threading.Lock()
        # fingerprint -> (model, tokenizer, generation lock); the last few versions stay loaded.
        self._models: OrderedDict[str, tuple[Any, Any, threading.Lock]] = OrderedDict()

    def list_models(self) -> list[str]:
        names = [BASE_MODEL]
        for d in self.deployments.list():
            names += [d.name if a.name == "production" else f"{d.name}:{a.name}" for a in d.aliases]
            names += [f"{d.name}@{v.version}" for v in d.versions if v.state is VersionState.PROMOTED]
        return names

    def resolve(self, name: str, prompt: str = "") -> Resolution:
        if name == BASE_MODEL:
            if self.vllm is not None:
                return Resolution(self.vllm.base(name, "base"))
            model, tokenizer = self._base_model()
            with self._lock:
                lock = self._base_lock
            return Resolution(ServedModel(name, model, tokenizer, "base", lock=lock))
        deployment, alias, number = parse_model_name(name)
        if number is None:
            version = self.deployments.resolve(deployment, alias)
        else:
            version = self.deployments.version(deployment, number)
            if version.state is not VersionState.PROMOTED:
                raise NotFound(
                    f"The model {name!r} does not exist: version {number} was {version.state.value}"
                )
        served = self._served(name, version, prompt)
        shadow = None
        if alias == "production" and number is None:
            try:
                shadow_version = self.deployments.resolve(deployment, "shadow")
            except NotFound:
                shadow_version = None
            if shadow_version is not None and shadow_version.fingerprint != version.fingerprint:
                try:
                    shadow = self._served(f"{deployment}:shadow", shadow_version, prompt)
                except Exception:  # noqa: BLE001 - a broken shadow never stops production answering
                    log.exception("shadow model not loaded", extra={"model": name})
        return Resolution(served, shadow)

    def log_shadow(self, name: str, request: dict[str, Any], answer: str, shadow_answer: str) -> None:
        """Both answers side by side on the `shadow-log` stream (capped), for operators to compare."""
        entry = {
            "model": name,
            "request": request,
            "answer": answer,
            "shadow_answer": shadow_answer,
            "at": time.time(),
        }
        plane = self.deployments.plane
        plane.redis.xadd(
            plane.key("shadow-log"), {"entry": json.dumps(entry)}, maxlen=SHADOW_LOG_CAP, approximate=True
        )

    def _served(self, name: str, version: DeploymentVersion, prompt: str = "") -> ServedModel:
        # Verified on every request, not only when loaded: the cache is keyed by the fingerprint, and
        # a record edited in Redis under the same fingerprint must not inherit a loaded model.
        verify_version(version, self.keys)
        version = routed_version(version, prompt)
        if not version.layers:
            # No layer's gate opens for this prompt: the base model answers it.
            return self._base_served(name, version.fingerprint)
        if self.vllm is not None:
            return self.vllm.served(name, version, lambda: self._adapter_dirs(version))
        with self._lock:
            cached = self._models.get(version.fingerprint)
            if cached is None:
                model, tokenizer = self._base_model()
                dirs = self._adapter_dirs(version)
                merged = merge_adapters(model, dirs) if dirs else model
                # Version 0 is the base model object itself: it shares the base's generation lock.
                cached = (merged, tokenizer, threading.Lock() if dirs else self._base_lock)
                self._models[version.fingerprint] = cached
                log.info(
                    "model loaded for serving", extra={"model": name, "fingerprint": version.fingerprint[:16]}
                )
                while len(self._models) > self.cache_size:
                    self._models.popitem(last=False)
            self._models.move_to_end(version.fingerprint)
        merged, tokenizer, lock = cached
        return ServedModel(name, merged, tokenizer, version.fingerprint, lock=lock)

    def _base_served(self, name: str, fingerprint: str) -> ServedModel:
        if self.vllm is not None:
            return self.vllm.base(name, fingerprint)
        model, tokenizer = self._base_model()
        return ServedModel(name, model, tokenizer, fingerprint, lock=self._base_lock)

    def _adapter_dirs(self, version: DeploymentVersion) -> list[Path]:
        return [self.fetch(layer.adapter) for layer in version.layers if layer.adapter is not None]

    def _base_model(self) -> tuple[Any, Any]:
        if self._base is None:
            self._base = self._base_loader()
        return self._base
