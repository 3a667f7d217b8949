"""Shared fixtures: a tiny random Llama (built once per session, never downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from seal.models import build_tiny_model, load_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def tiny_model(tiny_model_dir: Path):
    """A fresh (model, tokenizer) pair each test, so tests cannot leak state into each other."""
    return load_model(tiny_model_dir)
