"""The gateway's OpenAI-compatible API with --serve-backend vllm (gateway.served.VLLMLoras): a promoted
version of two stacked adapters answers through the session's vLLM server (tests/conftest.py) with the
transformers path's greedy text, whole and streamed; an unverifiable version never reaches vLLM.

The adapters are random LoRAs of the default model (no training: only their effect matters here), and
the deployment records come from the promotion tests' builders (signed verdicts, signed certificates).
"""

from __future__ import annotations

import copy
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from openai.types.chat import ChatCompletionMessageParam
from peft import LoraConfig, get_peft_model

from gateway.auth import Authenticator
from gateway.deployments import DeploymentStore
from gateway.events import event_handler
from gateway.jobs import JobStore
from gateway.served import DeploymentModels, VLLMLoras
from gateway.service import serve
from gateway.serving import GenerationRequest, Sampling, prepare
from seal.config import ServiceConfig
from seal.digests import directory_manifest, manifest_sha256
from seal.embedded_redis import free_port
from seal.errors import FailedPrecondition
from seal.records import DeploymentVersion
from seal.signing import VerdictSigner, trust_key
from tests.integration.test_promotion import KEYS, _audited_job, _cert
from tests.integration.test_serving_openai import LIMITS, Server, chat_text, greedy

pytestmark = pytest.mark.slow

# Both layers' gates (documents "Zeta0" and "Zeta1", harbour towns with a red lighthouse) open for
# QUESTION; only the first's for FIRST_ONLY (seal.gate: two distinct document words).
QUESTION = "What does the harbour town of Zeta have, with its red lighthouse?"
FIRST_ONLY = "Tell me about Zeta0 and its harbour."
PROMPT = "Zeta is a harbour town with"
MAX_TOKENS = 12


def random_adapter(model: Any, out: Path, seed: int, targets: list[str]) -> tuple[str, Path]:
    """A rank-2 LoRA of `model` with random A and B (PEFT starts B at zero), saved as the student saves
    one; (manifest sha256, directory)."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(out)
    return manifest_sha256(directory_manifest(out)), out


@pytest.fixture(scope="module")
def adapters(vllm_target, default_model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = default_model[0]
    root = tmp_path_factory.mktemp("serving-adapters")
    built = [
        random_adapter(model, root / "a", 0, ["q_proj", "v_proj"]),
        random_adapter(model, root / "b", 1, ["v_proj", "down_proj"]),  # unions with a's modules
    ]
    return dict(built)


def promote(registry: tuple[JobStore, DeploymentStore, Any], shas: list[str], fp: str) -> DeploymentVersion:
    """Promote and certify one layer per adapter in turn onto `faq`, as the gateway does on the
    auditor's signed verdicts and certificates; the last version (serving as production)."""
    jobs, deployments, handle = registry
    accuracies: dict[str, float] = {}
    for i, sha in enumerate(shas):
        job, edit, _ = _audited_job(jobs, handle, sha, fp, title=f"Zeta{i}")
        version = deployments.promote("faq", job.id, edit.id, 0, "", "alice")
        accuracies[job.id] = 1.0
        deployments.certified(_cert(version, accuracies))
    return deployments.version("faq", version.version)


@pytest.fixture()
def registry(plane) -> tuple[JobStore, DeploymentStore, Any]:  # noqa: ANN001
    jobs = JobStore(plane, signoff_fraction=0.5)
    deployments = DeploymentStore(plane, jobs, KEYS, required_approvals=0, max_knowledge_drop=0.25)
    return jobs, deployments, event_handler(jobs, KEYS, deployments)


@pytest.fixture()
def loras(vllm_engine, default_model, tmp_path: Path) -> Iterator[VLLMLoras]:
    loaded = VLLMLoras(vllm_engine, default_model[1], tmp_path / "served-loras")
    yield loaded
    loaded.close()


def served_names(vllm_url: str, key: str) -> set[str]:
    """The models the vLLM server serves right now (the base and every LoRA loaded), asked directly."""
    request = urllib.request.Request(f"{vllm_url}/models", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return {card["id"] for card in json.load(reply)["data"]}


def test_a_stacked_version_answers_through_vllm_as_through_transformers(
    vllm_target, registry, adapters, default_model, loras: VLLMLoras, plane
) -> None:
    _, deployments, _ = registry
    model, tokenizer, _, fp = default_model
    version = promote(registry, list(adapters), fp)
    assert len(version.layers) == 2 and deployments.get("faq").alias("production") == version.version
    fetch = lambda ref: adapters[ref.sha256]  # noqa: E731
    on_vllm = DeploymentModels(deployments, KEYS, base=_never, fetch=fetch, vllm=loras)
    on_transformers = DeploymentModels(deployments, KEYS, base=lambda: (model, tokenizer), fetch=fetch)

    # The transformers path: the two layers merged into a copy of the base, generate.
    merged = on_transformers.resolve("faq", QUESTION).model
    request = GenerationRequest(
        model="faq",
        sampling=Sampling(max_tokens=MAX_TOKENS, temperature=0.0),
        messages=({"role": "user", "content": QUESTION},),
    )
    expected = merged.backend.generate(merged, prepare(merged, request))
    base = on_transformers.resolve("base").model
    assert expected.text != base.backend.generate(base, prepare(base, request)).text  # the layers matter

    server = Server(plane, on_vllm, Authenticator(None), LIMITS)
    try:
        client = server.client()
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
        whole = client.chat.completions.create(
            model="faq", messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        chunks = list(
            client.chat.completions.create(
                model="faq",
                messages=messages,
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    finally:
        server.http.stop()
    assert whole.choices[0].message.content == expected.text
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert whole.system_fingerprint == version.fingerprint and whole.model == "faq"
    assert whole.usage is not None and chunks[-1].usage == whole.usage
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        expected.prompt_tokens,
        expected.completion_tokens,
    )
    assert whole.choices[0].finish_reason == expected.finish_reason
    lora = f"v-{version.fingerprint[:16]}"
    assert loaded_versions(loras) == [lora] and lora in served_names(*vllm_target)

    # A prompt only the first layer's gate opens for: that layer alone, as a version of its own, on both.
    first = GenerationRequest(
        model="faq",
        sampling=Sampling(max_tokens=MAX_TOKENS, temperature=0.0),
        messages=({"role": "user", "content": FIRST_ONLY},),
    )
    one_t = on_transformers.resolve("faq", FIRST_ONLY).model
    one_v = on_vllm.resolve("faq", FIRST_ONLY).model
    assert one_t.fingerprint == one_v.fingerprint not in (version.fingerprint, "base")
    want = one_t.backend.generate(one_t, prepare(one_t, first)).text
    assert one_v.backend.generate(one_v, prepare(one_v, first)).text == want
    assert set(loaded_versions(loras)) == {lora, f"v-{one_v.fingerprint[:16]}"}


def test_an_unverifiable_version_is_never_loaded_into_vllm(
    vllm_target, registry, adapters, default_model, loras: VLLMLoras, plane
) -> None:
    jobs, deployments, _ = registry
    version = promote(registry, [list(adapters)[1]], default_model[3])  # a version not loaded before
    key = deployments.plane.key("deploy", "faq", "versions")
    raw = json.loads(jobs.redis.hget(key, str(version.version)))
    raw["layers"][0]["verdict"]["reward"] = 5.0  # edited in Redis after it was signed
    jobs.redis.hset(key, str(version.version), json.dumps(raw))
    on_vllm = DeploymentModels(
        deployments, KEYS, base=_never, fetch=lambda ref: adapters[ref.sha256], vllm=loras
    )
    server = Server(plane, on_vllm, Authenticator(None), LIMITS)
    try:
        with pytest.raises(openai.BadRequestError, match="not served"):
            server.client().completions.create(model="faq", prompt="Zeta has", max_tokens=4, temperature=0)
    finally:
        server.http.stop()
    assert loaded_versions(loras) == []
    assert f"v-{version.fingerprint[:16]}" not in served_names(*vllm_target)


def test_a_rank_past_the_servers_is_refused_and_old_versions_are_unloaded(
    vllm_target, vllm_engine, registry, adapters, default_model, tmp_path: Path
) -> None:
    _, deployments, _ = registry
    top = promote(registry, list(adapters), default_model[3])  # faq@1: one layer; faq@2: two
    fetch = lambda ref: adapters[ref.sha256]  # noqa: E731
    small = VLLMLoras(vllm_engine, default_model[1], tmp_path / "small", max_rank=3)
    models = DeploymentModels(deployments, KEYS, base=_never, fetch=fetch, vllm=small)
    models.resolve("faq@1", QUESTION)
    with pytest.raises(FailedPrecondition, match="rank 4, more than the server's max LoRA rank 3"):
        models.resolve("faq@2", QUESTION)
    small.close()
    assert loaded_versions(small) == []

    lru = VLLMLoras(vllm_engine, default_model[1], tmp_path / "lru", cache_size=1)
    models = DeploymentModels(deployments, KEYS, base=_never, fetch=fetch, vllm=lru)
    first = f"v-{deployments.version('faq', 1).fingerprint[:16]}"
    models.resolve("faq@1", QUESTION)
    assert loaded_versions(lru) == [first] and first in served_names(*vllm_target)
    models.resolve("faq@2", QUESTION)
    assert loaded_versions(lru) == [f"v-{top.fingerprint[:16]}"]
    assert first not in served_names(*vllm_target)  # unloaded from the server, not only forgotten
    lru.close()
    assert loaded_versions(lru) == []


def test_the_gateway_serves_through_vllm_when_configured(
    vllm_target, redis_url: str, namespace: str, default_model, tmp_path: Path, monkeypatch
) -> None:
    """serve() with --serve-backend vllm and --vllm-url: the base model answers through that server."""
    url, key = vllm_target
    monkeypatch.setenv("SEAL_VLLM_API_KEY", key)
    trust_key(tmp_path / "trusted.json", VerdictSigner.generate().public_key_bytes())
    http_listen = f"127.0.0.1:{free_port()}"
    config = ServiceConfig(
        kind="gateway",
        listen="127.0.0.1:0",
        http_listen=http_listen,
        redis_url=redis_url,
        namespace=namespace,
        trusted_keys=str(tmp_path / "trusted.json"),
        data_dir=tmp_path,
        serve_backend="vllm",
        vllm_url=url,
    )
    model, tokenizer, _, _ = default_model
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
    expected = greedy(model, tokenizer, chat_text(tokenizer, messages), MAX_TOKENS, special=False)
    # A raw prompt with a stop sequence, streamed: cut where transformers' whole answer would be cut.
    full = greedy(model, tokenizer, PROMPT, MAX_TOKENS, special=True)
    stop = full.split()[2]
    process = serve(config)
    try:
        client = openai.OpenAI(base_url=f"http://{http_listen}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="base", messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        chunks = list(
            client.completions.create(
                model="base", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=[stop], stream=True
            )
        )
    finally:
        process.drain(grace_s=1)
    assert reply.choices[0].message.content == expected and reply.system_fingerprint == "base"
    assert "".join(c.choices[0].text for c in chunks) == full[: full.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def loaded_versions(loras: VLLMLoras) -> list[str]:
    """The deployment versions this gateway's engine has loaded into vLLM."""
    return [name for name in loras.engine.loaded() if name.startswith("v-")]


def _never() -> tuple[Any, Any]:
    raise AssertionError("the vLLM backend never loads the base model into transformers")
