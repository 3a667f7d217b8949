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


@pytest.fixture(scope="session")
def redis_url():
    """A real Redis: the one at SEAL_TEST_REDIS_URL / 127.0.0.1:6379 if it answers, else our own."""
    import os

    from seal.embedded_redis import redis_answers, start_redis

    url = os.environ.get("SEAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if redis_answers(url):
        yield url
        return
    server = start_redis()
    yield server.url
    server.stop()


@pytest.fixture()
def namespace(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own, so tests sharing one Redis never see each other's keys."""
    import uuid

    return f"seal-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture()
def plane(redis_url: str, namespace: str):
    import redis

    from seal.workplane import WorkPlane

    client = redis.Redis.from_url(redis_url)
    yield WorkPlane(client, namespace)
    delete_namespace(redis_url, namespace)


def delete_namespace(redis_url: str, namespace: str) -> int:
    """Remove every key a test's stack wrote under `namespace` in a shared Redis; returns how many."""
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{namespace}:*"))
    return int(client.delete(*keys)) if keys else 0
