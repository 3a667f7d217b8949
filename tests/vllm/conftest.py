"""vLLM against transformers on the default model; the server is the session's `vllm_url`
(tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from seal.models import DEFAULT_MODEL, load_model, model_fingerprint, resolve_model


@pytest.fixture(scope="session")
def default_model():
    """The default model on transformers, fp32, as the services load it: (model, tokenizer, dir, fingerprint)."""
    path: Path = resolve_model(DEFAULT_MODEL)
    model, tokenizer = load_model(path)
    return model, tokenizer, path, model_fingerprint(path)
