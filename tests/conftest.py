"""Shared fixtures: a tiny random Llama (built once per session, never downloaded)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from seal.models import DEFAULT_MODEL, build_tiny_model, load_model, resolve_model
from seal.vllm_server import (
    VLLM_BASE_NAME,
    VLLMEngine,
    VLLMServer,
    VLLMServerSettings,
    default_vllm_python,
    vllm_unavailable,
)


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


# --- the real vLLM engine: one server of the default model for the whole session --------------------
# It runs from the environment `make vllm-env` builds (.venv-vllm, or SEAL_VLLM_PYTHON). Tests using it
# skip only where that environment could not be built, and say why; `make test` builds it first.
# SEAL_TEST_VLLM_URL points them at a server already running (of the default model) instead.


# The server is launched as soon as the session's tests are collected, and the tests that use it run
# last, so its start-up (about a minute on 2 cores) overlaps the rest of the suite instead of
# waiting in a fixture; idle, it used 1 CPU-second in 30 s here.
_early: dict[str, tuple[VLLMServer, str]] = {}
# The early server's log folder (made before pytest's tmp_path exists): removed after a green session,
# kept after a failure so its log can be read.
_early_dirs: list[Path] = []


def _uses_vllm(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    dynamic = callspec is not None and "vllm_endpoint" in callspec.params.values()
    return "vllm_target" in getattr(item, "fixturenames", ()) or dynamic


def _new_server(log_file: Path) -> tuple[VLLMServer, str]:
    key = f"sk-vllm-test-{os.urandom(8).hex()}"
    settings = VLLMServerSettings(
        resolve_model(DEFAULT_MODEL), served_name=VLLM_BASE_NAME, api_key=key, log_file=log_file
    )
    return VLLMServer(settings), key


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture parameters
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_uses_vllm)  # stable: the vLLM tests last, each group in its own order


def pytest_collection_finish(session: pytest.Session) -> None:
    if os.environ.get("SEAL_TEST_VLLM_URL") or not any(_uses_vllm(i) for i in session.items):
        return
    if vllm_unavailable(default_vllm_python()):
        return  # the fixture skips, saying why
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="seal-vllm-"))
    _early_dirs.append(folder)
    server, key = _new_server(folder / "server.log")
    server.launch()
    _early["server"] = (server, key)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if "server" in _early:  # never reached by a test (a failure, -x): still stop it
        _early.pop("server")[0].stop()
    for folder in _early_dirs:
        if session.exitstatus == 0:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"\nthe vLLM server's log is kept in {folder}")


@pytest.fixture(scope="session")
def vllm_target(tmp_path_factory: pytest.TempPathFactory):
    """(base URL …/v1, API key) of a vLLM server of the default model, serving it as "base"."""
    given = os.environ.get("SEAL_TEST_VLLM_URL")
    if given:
        yield given, os.environ.get("SEAL_TEST_VLLM_API_KEY", "")
        return
    why = vllm_unavailable(default_vllm_python())
    if why:
        pytest.skip(f"vLLM cannot run on this machine: {why}")
    if "server" in _early:
        server, key = _early.pop("server")
    else:
        server, key = _new_server(tmp_path_factory.mktemp("vllm") / "server.log")
        server.launch()
    log_file = server.settings.log_file
    try:
        server.wait_ready(timeout_s=900)
    except Exception as exc:  # the log says why; show its tail in the failure
        server.stop()
        tail = log_file.read_text(errors="replace")[-3000:] if log_file and log_file.exists() else ""
        raise RuntimeError(f"{exc}\n--- vLLM log tail ---\n{tail}") from exc
    yield server.base_url, key
    server.stop()


@pytest.fixture(scope="session")
def vllm_url(vllm_target: tuple[str, str]) -> str:
    return vllm_target[0]


@pytest.fixture(scope="session")
def vllm_engine(vllm_target: tuple[str, str]):
    url, key = vllm_target
    engine = VLLMEngine(url, model=VLLM_BASE_NAME, api_key=key)
    yield engine
    engine.close()
