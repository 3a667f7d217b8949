"""docker-compose.yml and the shipped example job are loaded and checked (no Docker engine here)."""

from __future__ import annotations

from pathlib import Path

import yaml

from gateway.api import parse_job_spec
from seal.cli import load_example
from seal.config import SERVICE_KINDS, load_config
from seal.validation import Limits, validate_job_spec

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_one_container_per_service_plus_redis() -> None:
    services = _compose()["services"]
    assert set(services) == {"redis", *SERVICE_KINDS}
    for kind in SERVICE_KINDS:
        assert services[kind]["command"] == ["serve", kind]


def test_compose_environment_is_a_valid_service_config() -> None:
    """Every SEAL_* variable the compose file sets must be one ServiceConfig understands, with a valid value."""
    for kind in SERVICE_KINDS:
        env = {k: str(v) for k, v in _compose()["services"][kind]["environment"].items()}
        unknown = [
            k
            for k in env
            if k.startswith("SEAL_")
            and not hasattr(load_config(kind, env={}), k.removeprefix("SEAL_").lower())
        ]
        assert not unknown, f"{kind}: unknown settings {unknown}"
        config = load_config(kind, env=env)
        assert config.redis_url == "redis://redis:6379/0"


def test_model_services_reserve_a_gpu_and_share_no_volume() -> None:
    services = _compose()["services"]
    for kind in ("teacher", "student", "auditor"):
        devices = services[kind]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    volumes = [v.split(":")[0] for kind in SERVICE_KINDS for v in services[kind].get("volumes", [])]
    assert len(volumes) == len(set(volumes)), "services must not share a volume: adapters travel over gRPC"


def test_gateway_knows_where_the_auditor_is() -> None:
    env = _compose()["services"]["gateway"]["environment"]
    assert env["SEAL_AUDITOR_ADDRESS"].split(":")[0] in _compose()["services"]


def test_bundled_example_job_is_valid() -> None:
    spec = parse_job_spec(load_example())
    validate_job_spec(spec, Limits(), "smollm2-135m")
    assert len(spec.documents) >= 3
    for doc in spec.documents:
        # τ must not be answerable from the title alone (else the demo proves nothing).
        assert all(qa.answer.lower() not in doc.title.lower() for qa in doc.questions)
        assert all(qa.answer.lower() in doc.context.lower() for qa in doc.questions)


def test_every_service_gets_the_same_request_limits() -> None:
    services = _compose()["services"]
    limits = {
        load_config(kind, env={k: str(v) for k, v in services[kind]["environment"].items()}).limits()
        for kind in SERVICE_KINDS
    }
    assert len(limits) == 1
    assert "SEAL_MAX_CONTEXT_CHARS" in services["teacher"]["environment"]
