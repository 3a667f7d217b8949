"""API tokens and roles: the token file, bearer authentication, role checks, and the gRPC interceptor
that guards the Gateway service only (health stays open)."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.api import WatcherSlots, parse_job_spec
from gateway.auth import (
    ANONYMOUS,
    Authenticator,
    BearerAuthInterceptor,
    Principal,
    Role,
    add_intercepted_servicer,
    authorize,
    current_principal,
    generate_token,
    load_token_file,
    write_token_file,
)
from seal.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated, status_of
from seal.server import ServiceProcess
from seal.v1 import gateway_pb2, gateway_pb2_grpc


@pytest.fixture()
def tokens(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    issued = {"alice": generate_token(), "root": generate_token()}
    path = write_token_file(
        tmp_path / "tokens.json",
        [(issued["alice"], "alice", "submitter"), (issued["root"], "root", "operator")],
    )
    return path, issued


def test_token_file_holds_digests_only_and_is_private(tokens) -> None:  # noqa: ANN001
    path, issued = tokens
    text = path.read_text()
    assert all(token not in text for token in issued.values())
    assert hashlib.sha256(issued["alice"].encode()).hexdigest() in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [(e.subject, e.role) for e in load_token_file(path)] == [
        ("alice", Role.SUBMITTER),
        ("root", Role.OPERATOR),
    ]
    assert issued["alice"] != issued["root"] and len(issued["alice"]) > 40


def test_a_local_stack_gets_one_operator_token_with_no_setup(tmp_path: Path) -> None:
    from gateway.auth import local_operator_token

    token, tokens_file = local_operator_token(tmp_path / "gateway")
    assert Authenticator(load_token_file(tokens_file)).authenticate(f"Bearer {token}") == Principal(
        "operator", Role.OPERATOR
    )
    assert local_operator_token(tmp_path / "gateway") == (token, tokens_file)  # kept across restarts
    assert stat.S_IMODE((tmp_path / "gateway" / "operator-token").stat().st_mode) == 0o600
    (tmp_path / "gateway" / "operator-token").write_text("seal_stale\n")  # not in the file: a new one
    renewed, _ = local_operator_token(tmp_path / "gateway")
    assert renewed != token and token not in tokens_file.read_text()


def test_bearer_tokens_authenticate_their_subject_and_role(tokens) -> None:  # noqa: ANN001
    path, issued = tokens
    auth = Authenticator(load_token_file(path))
    assert auth.authenticate(f"Bearer {issued['alice']}") == Principal("alice", Role.SUBMITTER)
    assert auth.authenticate(f"bearer  {issued['root']} ") == Principal("root", Role.OPERATOR)
    for bad in (None, "", "Bearer", f"Basic {issued['alice']}", "Bearer not-a-token", issued["alice"]):
        with pytest.raises(Unauthenticated):
            auth.authenticate(bad)


def test_an_open_api_lets_everyone_in_as_an_operator() -> None:
    auth = Authenticator.from_config("")
    assert auth.open and auth.authenticate(None) == ANONYMOUS
    assert ANONYMOUS.owner_filter is None


def test_roles_decide_what_a_caller_may_do() -> None:
    alice, root = Principal("alice", Role.SUBMITTER), Principal("root", Role.OPERATOR)
    for action in ("submit_job", "get_job", "watch_job", "list_jobs"):
        authorize(alice, action)
    authorize(root, "list_jobs_of_any_owner")
    with pytest.raises(PermissionDenied, match="needs the role operator"):
        authorize(alice, "list_jobs_of_any_owner")
    with pytest.raises(PermissionDenied):  # anything unlisted (a future promotion RPC) is an operator's
        authorize(alice, "/seal.v1.Gateway/PromoteAdapter")
    assert alice.owner_filter == "alice" and root.owner_filter is None


@pytest.mark.parametrize(
    ("document", "says"),
    [
        ("not json", "not valid JSON"),
        ({"tokens": []}, "lists no tokens"),
        ({"tokens": [{"sha256": "abc", "subject": "a", "role": "operator"}]}, "tokens[0].sha256"),
        ({"tokens": [{"sha256": "a" * 64, "subject": "a:b", "role": "operator"}]}, "tokens[0].subject"),
        ({"tokens": [{"sha256": "a" * 64, "subject": "a", "role": "admin"}]}, "tokens[0].role"),
        ({"keys": []}, '"tokens"'),
    ],
)
def test_a_malformed_token_file_says_what_to_fix(tmp_path: Path, document, says: str) -> None:  # noqa: ANN001
    path = tmp_path / "tokens.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("]", r"\]")):
        load_token_file(path)
    with pytest.raises(FileNotFoundError, match="api_tokens"):
        load_token_file(tmp_path / "missing.json")


def test_refusals_map_to_their_grpc_and_http_status() -> None:
    import redis

    assert status_of(Unauthenticated("x")) == (grpc.StatusCode.UNAUTHENTICATED, 401)
    assert status_of(PermissionDenied("x")) == (grpc.StatusCode.PERMISSION_DENIED, 403)
    assert status_of(ResourceExhausted("x")) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 429)
    assert status_of(redis.ConnectionError("down")) == (grpc.StatusCode.UNAVAILABLE, 503)
    assert status_of(redis.TimeoutError("slow")) == (grpc.StatusCode.UNAVAILABLE, 503)


def test_a_lone_surrogate_is_refused_naming_its_field() -> None:
    job = {
        "documents": [{"title": "ok", "context": "c", "questions": [{"question": "q\ud800", "answer": "a"}]}]
    }
    with pytest.raises(InvalidArgument) as err:
        parse_job_spec(job)
    assert err.value.field == "documents[0].questions[0].question"
    with pytest.raises(InvalidArgument) as err:
        parse_job_spec({"documents": [], "lora": {"\udfff": 1}})
    assert err.value.field == "lora" and "\\udfff" in str(err.value)  # named, and escaped in the message
    str(err.value).encode("utf-8")  # the error body itself can be sent
    spec = parse_job_spec({"documents": [{"title": "Zürich, 東京, 🙂", "context": "c"}]})
    assert spec.documents[0].title == "Zürich, 東京, 🙂"  # real non-ASCII text passes


def test_watcher_slots_are_bounded_and_released_once() -> None:
    slots = WatcherSlots(2)
    first, _second = slots.acquire(), slots.acquire()
    with pytest.raises(ResourceExhausted, match="max_watchers"):
        slots.acquire()
    first()
    first()  # a second release of the same slot frees nothing more
    slots.acquire()
    with pytest.raises(ResourceExhausted):
        slots.acquire()


class _EchoGateway(gateway_pb2_grpc.GatewayServicer):
    """Answers GetJob with the caller's subject as the job id."""

    def GetJob(self, request, context):  # noqa: ANN001, ANN201, N802
        return gateway_pb2.Job(id=current_principal().subject or "anonymous")

    def WatchJob(self, request, context):  # noqa: ANN001, ANN201, N802
        yield gateway_pb2.Job(id=current_principal().subject)


@pytest.fixture()
def guarded_server(tokens):  # noqa: ANN001, ANN201
    path, issued = tokens
    interceptor = BearerAuthInterceptor(Authenticator(load_token_file(path)))

    def register(server: grpc.Server) -> list[str]:
        add_intercepted_servicer(
            gateway_pb2_grpc.add_GatewayServicer_to_server, _EchoGateway(), server, interceptor
        )
        return ["seal.v1.Gateway"]

    process = ServiceProcess("gateway", "127.0.0.1:0", register)
    process.start()
    with grpc.insecure_channel(f"127.0.0.1:{process.port}") as channel:
        yield channel, issued
    process.server.stop(0).wait()


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_grpc_interceptor_authenticates_gateway_calls_only(guarded_server) -> None:  # noqa: ANN001
    channel, issued = guarded_server
    stub = gateway_pb2_grpc.GatewayStub(channel)
    request = gateway_pb2.GetJobRequest(job_id="x")
    assert stub.GetJob(request, metadata=_bearer(issued["alice"]), timeout=10).id == "alice"
    assert [j.id for j in stub.WatchJob(request, metadata=_bearer(issued["root"]), timeout=10)] == ["root"]
    for metadata in ((), _bearer("forged")):
        with pytest.raises(grpc.RpcError) as err:
            stub.GetJob(request, metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(stub.WatchJob(request, metadata=metadata, timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Health (and reflection) on the same server need no token.
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_interceptor_refuses_the_wrong_role(tokens) -> None:  # noqa: ANN001
    path, issued = tokens
    interceptor = BearerAuthInterceptor(
        Authenticator(load_token_file(path)), {"/seal.v1.Gateway/GetJob": "list_jobs_of_any_owner"}
    )

    def register(server: grpc.Server) -> list[str]:
        add_intercepted_servicer(
            gateway_pb2_grpc.add_GatewayServicer_to_server, _EchoGateway(), server, interceptor
        )
        return ["seal.v1.Gateway"]

    process = ServiceProcess("gateway", "127.0.0.1:0", register)
    process.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{process.port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            request = gateway_pb2.GetJobRequest(job_id="x")
            with pytest.raises(grpc.RpcError) as err:
                stub.GetJob(request, metadata=_bearer(issued["alice"]), timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "needs the role operator" in err.value.details()
            assert stub.GetJob(request, metadata=_bearer(issued["root"]), timeout=10).id == "root"
            # A method missing from the table (WatchJob here) is an operator's too.
            with pytest.raises(grpc.RpcError) as err:
                list(stub.WatchJob(request, metadata=_bearer(issued["alice"]), timeout=10))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        process.server.stop(0).wait()


def test_add_token_appends_a_digest_and_keeps_the_existing_holders(tmp_path) -> None:
    from gateway.auth import Authenticator, add_token

    path = tmp_path / "tokens.json"
    alice = add_token(path, "alice", "submitter")
    ops = add_token(path, "ops", "operator")
    text = path.read_text()
    assert alice not in text and ops not in text  # digests only
    auth = Authenticator.from_config(str(path))
    assert auth.authenticate(f"Bearer {alice}").subject == "alice"
    assert auth.authenticate(f"Bearer {ops}").role.value == "operator"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
