"""docker-compose.yml, the Dockerfile and the shipped example job are loaded and checked (no Docker
engine here): every variable the compose file sets is a config field, every service gets what it
requires, secrets come from files or the environment, and the healthcheck works against a real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from gateway.api import parse_job_spec
from seal.cli import load_example
from seal.config import SERVICE_KINDS, ServiceConfig, load_config
from seal.validation import Limits, validate_job_spec

ROOT = Path(__file__).resolve().parents[2]
MODEL_SERVICES = ("teacher", "student", "auditor")
PASSWORD = "pw-from-dot-env"
# Every service: Redis with a password, mTLS, metrics, an address peers can dial.
REQUIRED = {
    kind: {"redis_url", "tls_ca", "tls_cert", "tls_key", "metrics_listen", "advertise"}
    for kind in SERVICE_KINDS
}
REQUIRED["gateway"] |= {"trusted_keys", "api_tokens", "http_listen"}
REQUIRED["auditor"] |= {"signing_key"}
PATH_FIELDS = ("tls_ca", "tls_cert", "tls_key", "trusted_keys", "api_tokens", "signing_key")

_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$, as `docker compose config` does."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        value = env.get(name, "")
        if op in (":?", "?") and (name not in env or (op == ":?" and not value)):
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and (name not in env or (op == ":-" and not value)):
            return arg
        return value

    return _VARIABLE.sub(one, text.replace("$$", "\0")).replace("\0", "$")


def _raw_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


def _compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return yaml.safe_load(interpolate(_raw_text(), {"SEAL_REDIS_PASSWORD": PASSWORD} if env is None else env))


def _env(kind: str) -> dict[str, str]:
    return {k: str(v) for k, v in _compose()["services"][kind]["environment"].items()}


def _config(kind: str) -> ServiceConfig:
    return load_config(kind, env=_env(kind))


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", (ROOT / "Dockerfile").read_text(), flags=re.M))


def test_compose_runs_one_container_per_service_plus_redis() -> None:
    services = _compose()["services"]
    assert set(services) == {"redis", *SERVICE_KINDS}
    for kind in SERVICE_KINDS:
        assert services[kind]["command"] == ["serve", kind]


def test_every_variable_the_compose_file_sets_is_a_config_field() -> None:
    fields = {f"SEAL_{name.upper()}" for name in ServiceConfig.__dataclass_fields__} - {"SEAL_KIND"}
    for kind in SERVICE_KINDS:
        env = _env(kind)
        unknown = sorted(k for k in env if k.startswith("SEAL_") and k not in fields)
        assert not unknown, f"{kind}: {unknown} are not ServiceConfig fields"
        assert all(k.startswith("SEAL_") for k in env), f"{kind}: only SEAL_* settings are read"
        _config(kind)  # and every value is valid


def test_every_service_sets_what_it_requires() -> None:
    for kind in SERVICE_KINDS:
        config, default = _config(kind), ServiceConfig(kind=kind)
        unset = sorted(name for name in REQUIRED[kind] if getattr(config, name) == getattr(default, name))
        assert not unset, f"{kind} leaves {unset} at their defaults"


def test_every_service_reaches_redis_with_the_password_from_the_environment() -> None:
    for kind in SERVICE_KINDS:
        url = urlparse(_config(kind).redis_url)
        assert (url.hostname, url.port, url.password) == ("redis", 6379, PASSWORD)
    # Without the variable compose refuses to start, rather than run Redis open or with a blank password.
    with pytest.raises(KeyError, match="SEAL_REDIS_PASSWORD"):
        _compose(env={})


def test_no_secret_is_written_in_the_compose_file() -> None:
    raw = yaml.safe_load(_raw_text())
    redis_command = raw["services"]["redis"]["command"]
    password = redis_command[redis_command.index("--requirepass") + 1]
    assert _VARIABLE.fullmatch(password), "the Redis password must come from the environment"
    for kind in SERVICE_KINDS:
        assert "${SEAL_REDIS_PASSWORD" in raw["services"][kind]["environment"]["SEAL_REDIS_URL"]
    text = _raw_text()
    assert "-----BEGIN" not in text, "a PEM key or certificate in the compose file"
    assert not re.search(r"seal_[A-Za-z0-9_-]{40}", text), "an API token in the compose file"


def test_key_material_and_tokens_are_mounted_as_secrets() -> None:
    compose = _compose()
    declared = compose["secrets"]
    for kind in SERVICE_KINDS:
        mounted = {}
        for item in compose["services"][kind]["secrets"]:
            source, target = (
                (item, item)
                if isinstance(item, str)
                else (item["source"], item.get("target", item["source"]))
            )
            assert source in declared and "file" in declared[source], f"{kind}: secret {source} has no file"
            mounted[f"/run/secrets/{target}"] = declared[source]["file"]
        config = _config(kind)
        for name in PATH_FIELDS:
            value = getattr(config, name)
            if value:
                assert value in mounted, f"{kind}: {name}={value} is not a mounted secret"
        assert mounted[config.tls_cert].endswith(f"/{kind}.pem")  # each service its own identity
        assert mounted[config.tls_key].endswith(f"/{kind}.key")


def test_redis_keeps_its_data_with_aof_and_requires_a_password() -> None:
    redis = _compose()["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1] == PASSWORD
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert redis["environment"]["REDISCLI_AUTH"] == PASSWORD  # its healthcheck authenticates
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_every_container_has_a_healthcheck_and_services_wait_for_a_healthy_redis() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    for kind in SERVICE_KINDS:
        assert services[kind]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_model_services_get_a_cuda_torch_and_a_gpu_and_the_gateway_neither() -> None:
    services = _compose()["services"]
    declared = _dockerfile_args()
    assert declared["TORCH_VARIANT"] == "cpu"
    for kind in SERVICE_KINDS:
        build = services[kind]["build"]
        assert set(build.get("args", {})) <= set(declared), f"{kind}: build args the Dockerfile lacks"
        variant = build.get("args", {}).get("TORCH_VARIANT", declared["TORCH_VARIANT"])
        wants_cuda = _config(kind).device.startswith("cuda")
        assert variant == "cpu" or re.fullmatch(r"cu\d+", variant), f"{kind}: unknown torch build {variant}"
        assert wants_cuda == (variant != "cpu"), f"{kind}: device {_config(kind).device} on a {variant} torch"
        assert variant in services[kind]["image"], f"{kind}: the image tag should name its torch build"
        reservations = services[kind].get("deploy", {}).get("resources", {}).get("reservations", {})
        assert bool(reservations.get("devices")) == wants_cuda, f"{kind}: a GPU iff device is cuda"
    for kind in MODEL_SERVICES:
        assert _config(kind).device == "cuda"
    assert _config("gateway").device == "cpu"


def test_dockerfile_installs_torch_from_the_index_its_build_arg_names() -> None:
    text = (ROOT / "Dockerfile").read_text()
    install = re.search(
        r'--index-url "https://download\.pytorch\.org/whl/\$\{TORCH_VARIANT\}" "torch==\$\{TORCH_VERSION\}"',
        text,
    )
    assert install, "torch must come from the index TORCH_VARIANT names"
    assert install.start() < text.index("RUN pip install ."), "torch before the package"
    assert "endswith('+${TORCH_VARIANT}')" in text, "the build checks it got the variant it asked for"
    assert "EXPOSE 50051 8080 9100" in text


def test_no_volume_is_shared_and_metrics_are_exposed() -> None:
    services = _compose()["services"]
    volumes = [v.split(":")[0] for kind in SERVICE_KINDS for v in services[kind].get("volumes", [])]
    assert len(volumes) == len(set(volumes)), "services must not share a volume: adapters travel over gRPC"
    for kind in SERVICE_KINDS:
        port = _config(kind).metrics_listen.rpartition(":")[2]
        assert port in services[kind]["expose"]


def test_every_service_gets_the_same_request_limits() -> None:
    limits = {_config(kind).limits() for kind in SERVICE_KINDS}
    assert len(limits) == 1
    for kind in SERVICE_KINDS:
        assert {"SEAL_MAX_DOCUMENTS", "SEAL_MAX_SELF_EDITS", "SEAL_MAX_CONTEXT_CHARS"} <= set(_env(kind))


def test_compose_healthcheck_passes_against_a_real_mtls_server_and_fails_without_it(tmp_path: Path) -> None:
    from seal.server import ServiceProcess
    from seal.tls import make_local_pki

    tls = make_local_pki(tmp_path / "tls", services=("teacher",), hosts=("localhost",))["teacher"]
    script = _compose()["services"]["teacher"]["healthcheck"]["test"][3]
    process = ServiceProcess("teacher", "127.0.0.1:0", lambda server: [], tls=tls)
    port = process.start()

    def check() -> int:
        env = {
            **os.environ,
            "SEAL_TLS_CA": str(tls.ca),
            "SEAL_TLS_CERT": str(tls.cert),
            "SEAL_TLS_KEY": str(tls.key),
            "SEAL_ADVERTISE": "teacher:50051",
            "SEAL_LISTEN": f"0.0.0.0:{port}",
        }
        return subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, timeout=60).returncode

    try:
        assert check() == 0
    finally:
        process.drain(grace_s=0)
    assert check() != 0


def test_bundled_example_job_is_valid() -> None:
    spec = parse_job_spec(load_example())
    validate_job_spec(spec, Limits(), "smollm2-135m")
    assert len(spec.documents) >= 3
    for doc in spec.documents:
        # τ must not be answerable from the title alone (else the demo proves nothing).
        assert all(qa.answer.lower() not in doc.title.lower() for qa in doc.questions)
        assert all(qa.answer.lower() in doc.context.lower() for qa in doc.questions)
