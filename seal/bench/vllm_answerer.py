"""The vLLM answerer of `seal bench inner-loop`'s evaluation table: the auditor's vLLM answering.

`--answerer vllm=seal.bench.vllm_answerer:vllm_answerer` starts a vLLM server of the run's model
(from `make vllm-env`; or uses SEAL_VLLM_URL / SEAL_VLLM_API_KEY) and answers exactly as the auditor
with `--answer-backend vllm` does: the prompts rendered and tokenized by our tokenizer, the adapter
loaded into the running engine. `answer_many` asks the base and every adapter at once, from one
thread per model, so the engine batches across questions *and* adapters.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from auditor.evaluation import VLLMModel, answer_questions
from seal.digests import directory_manifest, manifest_sha256
from seal.vllm_server import VLLM_BASE_NAME, VLLMEngine, VLLMServer, VLLMServerSettings


class VLLMAnswerer:
    def __init__(self, engine: VLLMEngine, tokenizer: Any, style: str, max_new_tokens: int) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.style = style
        self.max_new_tokens = max_new_tokens

    def __call__(self, prompts: Sequence[str], adapter_dir: Path | None) -> list[str]:
        return self.answer_many(prompts, [adapter_dir])[0]

    def answer_many(self, prompts: Sequence[str], targets: Sequence[Path | None]) -> list[list[str]]:
        """The answers of the base (None) and of each adapter in `targets`, all asked at once."""
        names = [
            ""
            if t is None
            else self.engine.load_lora(f"adapter-{manifest_sha256(directory_manifest(t))[:16]}", t)
            for t in targets
        ]
        try:
            with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
                return list(pool.map(self._ask, [list(prompts)] * len(names), names))
        finally:
            for name in names:
                if name:
                    self.engine.unload_lora(name)

    def _ask(self, prompts: list[str], name: str) -> list[str]:
        model = VLLMModel(self.engine, name)
        return answer_questions(model, self.tokenizer, prompts, self.max_new_tokens, style=self.style)


def vllm_answerer(model_dir: Path, settings: Any) -> VLLMAnswerer:
    """The answerer factory `seal bench inner-loop --answerer` takes: (model directory, settings)."""
    from transformers import AutoTokenizer

    url, key = os.environ.get("SEAL_VLLM_URL", ""), os.environ.get("SEAL_VLLM_API_KEY", "")
    if not url:
        key = os.urandom(12).hex()
        server = VLLMServer(
            VLLMServerSettings(Path(model_dir), served_name=VLLM_BASE_NAME, api_key=key, dtype=settings.dtype)
        ).start()
        atexit.register(server.stop)
        url = server.base_url
    return VLLMAnswerer(
        VLLMEngine(url, model=VLLM_BASE_NAME, api_key=key),
        AutoTokenizer.from_pretrained(model_dir),
        settings.answer_style,
        settings.answer_tokens,
    )
