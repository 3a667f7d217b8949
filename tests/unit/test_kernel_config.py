"""Service configuration: defaults < SEAL_* environment < flags, coercion, checks, advertised address."""

from __future__ import annotations

import argparse
import dataclasses
import socket
from pathlib import Path

import pytest

from seal.config import SERVICE_KINDS, ServiceConfig, add_config_flags, load_config
from seal.models import DEFAULT_MODEL


def test_defaults_with_no_env_and_no_flags():
    """An empty environment gives the dataclass defaults."""
    config = load_config("teacher", flags={}, env={})
    assert config == ServiceConfig(kind="teacher")
    assert config.listen == "127.0.0.1:0"
    assert config.model == DEFAULT_MODEL
    assert config.data_dir == Path(".seal")
    assert (config.threads, config.visibility_timeout_s, config.max_attempts) == (0, 120.0, 3)


@pytest.mark.parametrize(
    "flags, env, expected",
    [
        ({}, {}, "seal"),
        ({}, {"SEAL_NAMESPACE": "env"}, "env"),
        ({"namespace": "flag"}, {}, "flag"),
        ({"namespace": "flag"}, {"SEAL_NAMESPACE": "env"}, "flag"),
        ({"namespace": None}, {"SEAL_NAMESPACE": "env"}, "env"),
        ({"namespace": None}, {}, "seal"),
        ({}, {"NAMESPACE": "unprefixed", "seal_namespace": "lower"}, "seal"),
    ],
)
def test_precedence_defaults_then_env_then_flags(flags, env, expected):
    """A flag beats SEAL_<FIELD>, which beats the default; a None flag counts as not given."""
    assert load_config("gateway", flags=flags, env=env).namespace == expected


def test_precedence_is_per_field():
    """Env and flags for different fields combine."""
    config = load_config(
        "student",
        flags={"threads": "2"},
        env={"SEAL_THREADS": "8", "SEAL_DEVICE": "cuda:1", "SEAL_REDIS_URL": "redis://r:6379/1"},
    )
    assert (config.threads, config.device, config.redis_url) == (2, "cuda:1", "redis://r:6379/1")


def test_an_empty_env_value_counts_as_given_for_strings():
    """SEAL_HTTP_LISTEN= disables HTTP rather than falling back to the default."""
    assert load_config("gateway", env={"SEAL_HTTP_LISTEN": ""}).http_listen == ""


@pytest.mark.parametrize(
    "name, raw, expected, type_",
    [
        ("threads", "4", 4, int),
        ("threads", 4, 4, int),
        ("max_attempts", "5", 5, int),
        ("max_documents", "10", 10, int),
        ("visibility_timeout_s", "30", 30.0, float),
        ("visibility_timeout_s", "0.5", 0.5, float),
        ("visibility_timeout_s", 7, 7.0, float),
        ("data_dir", "/var/lib/seal", Path("/var/lib/seal"), Path),
        ("data_dir", Path("rel/dir"), Path("rel/dir"), Path),
        ("listen", "0.0.0.0:50051", "0.0.0.0:50051", str),
        ("model", "/models/tiny", "/models/tiny", str),
    ],
)
def test_values_are_coerced_to_the_field_type(name, raw, expected, type_):
    """Strings from env or flags become the field's type, whichever source gave them."""
    for config in (
        load_config("auditor", flags={name: raw}, env={}),
        load_config("auditor", flags={}, env={"SEAL_" + name.upper(): str(raw)}),
    ):
        value = getattr(config, name)
        assert value == expected
        assert isinstance(value, type_) and not isinstance(value, bool)


@pytest.mark.parametrize(
    "name, raw",
    [
        ("threads", "four"),
        ("threads", "2.5"),
        ("threads", ""),
        ("max_attempts", "3x"),
        ("visibility_timeout_s", "soon"),
        ("max_context_chars", "8k"),
    ],
)
def test_bad_number_is_a_value_error_naming_the_field(name, raw):
    """The message says which setting was wrong and what it got."""
    with pytest.raises(ValueError, match=rf"^{name} must be a number, got {raw!r}$"):
        load_config("student", env={"SEAL_" + name.upper(): raw})
    with pytest.raises(ValueError, match=name):
        load_config("student", flags={name: raw}, env={})


@pytest.mark.parametrize("kind", SERVICE_KINDS)
def test_every_service_kind_loads(kind):
    """teacher, student, auditor and gateway are all valid kinds."""
    assert load_config(kind, env={}).kind == kind


@pytest.mark.parametrize("kind", ["", "Teacher", "worker", "gateway "])
def test_bad_kind_is_rejected(kind):
    """The message lists the valid kinds."""
    with pytest.raises(ValueError, match="teacher, student, auditor, gateway"):
        load_config(kind, env={})


@pytest.mark.parametrize(
    "listen",
    ["127.0.0.1:0", "0.0.0.0:50051", "[::]:50051", "localhost:65535", "teacher.internal:1"],
)
def test_good_listen_address_is_accepted(listen):
    """host:port, IPv6 in brackets, and port 0 (pick a free port)."""
    assert load_config("teacher", flags={"listen": listen}, env={}).listen == listen


@pytest.mark.parametrize(
    "listen", ["", "localhost", "50051", ":50051", "host:", "host:port", "host:-1", "host:5 0", "host:65536"]
)
def test_bad_listen_address_is_rejected(listen):
    """Anything that is not host:port fails at start, naming the address."""
    with pytest.raises(ValueError, match="host:port"):
        load_config("teacher", flags={"listen": listen}, env={})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_supported_dtypes_are_accepted(dtype):
    """The three weight dtypes the model services support."""
    assert load_config("student", env={"SEAL_DTYPE": dtype}).dtype == dtype


@pytest.mark.parametrize("dtype", ["fp16", "float64", "int8", "", "FLOAT32"])
def test_bad_dtype_is_rejected(dtype):
    """The message lists the supported dtypes."""
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        load_config("student", env={"SEAL_DTYPE": dtype})


@pytest.mark.parametrize(
    "name, raw, says",
    [
        ("visibility_timeout_s", "0", "visibility_timeout_s"),
        ("visibility_timeout_s", "-5", "visibility_timeout_s"),
        ("max_attempts", "0", "max_attempts"),
    ],
)
def test_out_of_range_settings_are_rejected(name, raw, says):
    """A zero or negative timeout, or no attempts at all, cannot work."""
    with pytest.raises(ValueError, match=says):
        load_config("gateway", env={"SEAL_" + name.upper(): raw})


@pytest.mark.parametrize("raw", ["nan", "inf"])
def test_non_finite_visibility_timeout_is_rejected(raw):
    """float('nan') and float('inf') parse, but are no usable timeout."""
    with pytest.raises(ValueError, match="visibility_timeout_s"):
        load_config("gateway", env={"SEAL_VISIBILITY_TIMEOUT_S": raw})


def test_os_environ_is_read_when_no_env_is_given(monkeypatch):
    """Without an explicit env, the process environment is used."""
    monkeypatch.setenv("SEAL_NAMESPACE", "from-os")
    assert load_config("teacher").namespace == "from-os"
    assert load_config("teacher", env={}).namespace == "seal"


def test_api_key_is_not_in_the_repr():
    """Logging the config never prints the OpenAI key."""
    config = load_config("teacher", env={"SEAL_OPENAI_API_KEY": "sk-secret"})
    assert config.openai_api_key == "sk-secret"
    assert "sk-secret" not in repr(config)


def test_flags_parser_has_one_flag_per_field_and_defaults_to_unset():
    """argparse output feeds load_config directly; flags not given leave env and defaults in charge."""
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = vars(parser.parse_args(["--redis-url", "redis://x:1/0", "--visibility-timeout-s", "9"]))
    assert set(args) == {f.name for f in dataclasses.fields(ServiceConfig)} - {"kind"}
    config = load_config(
        "gateway", flags=args, env={"SEAL_REDIS_URL": "redis://env:1/0", "SEAL_THREADS": "3"}
    )
    assert (config.redis_url, config.visibility_timeout_s, config.threads) == ("redis://x:1/0", 9.0, 3)


# --- advertised() --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "listen, advertise, port, expected",
    [
        ("127.0.0.1:0", "", 43211, "127.0.0.1:43211"),
        ("127.0.0.1:50051", "", 50051, "127.0.0.1:50051"),
        ("teacher.internal:0", "", 5000, "teacher.internal:5000"),
        ("[::1]:0", "", 7, "[::1]:7"),
        ("0.0.0.0:0", "teacher:50051", 43211, "teacher:50051"),
        ("127.0.0.1:0", "10.0.0.5:9000", 43211, "10.0.0.5:9000"),
    ],
)
def test_advertised_address(listen, advertise, port, expected):
    """advertise wins when set; otherwise the listen host with the port actually bound."""
    config = ServiceConfig(kind="teacher", listen=listen, advertise=advertise)
    assert config.advertised(port) == expected


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "0.0.0.0:50051"])
def test_advertised_replaces_a_wildcard_host_with_the_hostname(listen):
    """Peers cannot dial 0.0.0.0, so the machine's hostname is advertised instead."""
    config = ServiceConfig(kind="student", listen=listen)
    assert config.advertised(1234) == f"{socket.gethostname()}:1234"


def test_config_checks_run_on_direct_construction_too():
    """__post_init__ guards the dataclass itself, not only load_config."""
    with pytest.raises(ValueError, match="max_attempts"):
        ServiceConfig(kind="teacher", max_attempts=0)
    assert ServiceConfig(kind="teacher", data_dir="x").data_dir == Path("x")


def test_the_demo_runs_two_students_and_a_third_of_the_retention_set(monkeypatch):
    """`seal demo` keeps within its time on a 2-core CPU with two students and 32 retention questions
    per audit; `seal up` runs one student and asks all 104; the flags reach the stack, and counts out
    of range are refused."""
    from seal import cli, stack

    parser = cli.build_parser()
    assert parser.parse_args(["demo"]).retention_questions == 32
    assert parser.parse_args(["up"]).retention_questions == 0
    assert (parser.parse_args(["demo"]).students, parser.parse_args(["up"]).students) == (2, 1)
    started: list[dict] = []

    class Recording:
        def __init__(self, **kwargs):
            started.append(kwargs)

        def start(self):
            return self

    monkeypatch.setattr(stack, "LocalStack", Recording)
    monkeypatch.setattr("seal.models.resolve_model", lambda name: Path("."))
    cli._stack(parser.parse_args(["up", "--retention-questions", "8"]))
    assert started[-1]["extra_flags"] == {"auditor": ["--retention-questions", "8"]}
    assert started[-1]["students"] == 1
    cli._stack(parser.parse_args(["up"]))  # 0 (all): nothing passed, the auditor's own setting holds
    assert started[-1]["extra_flags"] == {}
    with pytest.raises(SystemExit, match="--students must be between 1 and 8"):
        cli._stack(parser.parse_args(["up", "--students", "0"]))
    with pytest.raises(SystemExit, match="--retention-questions must be >= 0"):
        cli._stack(parser.parse_args(["demo", "--retention-questions", "-1"]))
