"""The gateway's public API, served in this process by its own composition root (gateway.service.serve)
against a real Redis: uvicorn on a loopback port, gRPC beside it, bearer tokens with roles.

Malformed requests are written on raw sockets, since an HTTP client library would refuse to send them.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.auth import generate_token, write_token_file
from gateway.client import GatewayClient
from gateway.service import serve
from seal.config import ServiceConfig
from seal.embedded_redis import free_port, start_redis
from seal.records import QA, Document, JobSpec
from seal.signing import VerdictSigner, trust_key
from seal.v1 import gateway_pb2, gateway_pb2_grpc

JOB = {
    "n_self_edits": 1,
    "documents": [
        {
            "title": "Alpha",
            "context": "Alpha is a town by the sea.",
            "questions": [
                {"question": "What is Alpha?", "answer": "a town"},
                {"question": "Which sea is it near?", "answer": "the north sea"},
            ],
        }
    ],
}
SPEC = JobSpec(
    documents=(
        Document("Alpha", "Alpha is a town.", (QA("What is Alpha?", "a town"), QA("Is Alpha big?", "no"))),
    )
)
READ_TIMEOUT_S = 1.0


def _config(tmp: Path, redis_url: str, namespace: str, tokens: dict[str, str]) -> ServiceConfig:
    write_token_file(
        tmp / "tokens.json",
        [
            (tokens["alice"], "alice", "submitter"),
            (tokens["bob"], "bob", "submitter"),
            (tokens["root"], "root", "operator"),
        ],
    )
    trust_key(tmp / "trusted.json", VerdictSigner.generate().public_key_bytes())
    return ServiceConfig(
        kind="gateway",
        listen="127.0.0.1:0",
        http_listen=f"127.0.0.1:{free_port()}",
        redis_url=redis_url,
        namespace=namespace,
        api_tokens=str(tmp / "tokens.json"),
        trusted_keys=str(tmp / "trusted.json"),
        max_watchers=2,
        http_read_timeout_s=READ_TIMEOUT_S,
        http_max_body_bytes=256 * 1024,
    )


class Gateway:
    def __init__(self, config: ServiceConfig, tokens: dict[str, str]) -> None:
        self.config, self.tokens = config, tokens
        self.process = serve(config)
        self.http_port = int(config.http_listen.rpartition(":")[2])
        self.grpc_address = f"127.0.0.1:{self.process.port}"

    def request(
        self, method: str, path: str, body: Any = None, who: str | None = "alice", headers: dict | None = None
    ) -> tuple[int, Any]:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        sent = {"Content-Type": "application/json", **(headers or {})}
        if who:
            sent["Authorization"] = f"Bearer {self.tokens[who]}"
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        is_json = response.getheader("content-type", "").startswith("application/json")
        return response.status, json.loads(payload) if is_json else payload

    def submit(self, who: str = "alice") -> str:
        status, body = self.request("POST", "/v1/jobs", JOB, who=who)
        assert status == 201, body
        return body["id"]

    def client(self, who: str) -> GatewayClient:
        return GatewayClient(self.grpc_address, timeout_s=10, token=self.tokens[who])

    def jobs_stored(self) -> int:
        return int(self.process_redis().zcard(f"{self.config.namespace}:jobs"))

    def process_redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.config.redis_url)


@pytest.fixture(scope="module")
def gateway(redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    tokens = {name: generate_token() for name in ("alice", "bob", "root")}
    namespace = f"seal-test-{uuid.uuid4().hex[:10]}"
    gw = Gateway(_config(tmp_path_factory.mktemp("gw"), redis_url, namespace, tokens), tokens)
    yield gw
    gw.process.drain(grace_s=1)
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{namespace}:*"):
        client.delete(key)


def raw_request(
    port: int, data: bytes, wait_s: float = 10.0, half_close: bool = False
) -> tuple[int, Any, float]:
    """Send bytes as they are; (status, JSON body or None, seconds until the answer). 0: no answer."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return 0, None, time.monotonic() - started
        payload = response.read()
    return response.status, json.loads(payload), time.monotonic() - started


def _post(port: int, body: bytes, token: str, content_length: str | None = None) -> bytes:
    length = str(len(body)) if content_length is None else content_length
    return (
        f"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode() + body


def _assert_error(body: Any, code: str, field: str | None = None) -> None:
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    if field is not None:
        assert body["error"]["field"] == field, body


@pytest.mark.parametrize(
    ("content_length", "body", "field", "says"),
    [
        ("abc", b"{}", "headers", "Content-Length"),
        ("-1", b"{}", "headers", "Content-Length"),
        (None, b'{"documents": [{"title": "\xff\xfe"}]}', "body", "UTF-8"),
        (None, b"[" * 100_000 + b"]" * 100_000, "body", "nested"),
        (
            None,
            json.dumps({**JOB, "documents": [{**JOB["documents"][0], "title": "\ud800"}]}).encode(),
            "documents[0].title",
            "surrogate",
        ),
    ],
    ids=["content-length-abc", "content-length-negative", "invalid-utf8", "nested-100000", "lone-surrogate"],
)
def test_malformed_requests_are_400_with_a_json_error_and_create_nothing(
    gateway: Gateway, content_length: str | None, body: bytes, field: str, says: str
) -> None:
    before = gateway.jobs_stored()
    status, answer, _ = raw_request(
        gateway.http_port, _post(gateway.http_port, body, gateway.tokens["alice"], content_length)
    )
    assert status == 400
    _assert_error(answer, "bad_request", field)
    assert says in answer["error"]["message"]
    assert gateway.jobs_stored() == before


def test_a_body_shorter_than_its_content_length_times_out_and_creates_nothing(gateway: Gateway) -> None:
    before = gateway.jobs_stored()
    whole = json.dumps(JOB).encode()
    request = _post(gateway.http_port, whole[:20], gateway.tokens["alice"], content_length=str(len(whole)))
    status, answer, took = raw_request(gateway.http_port, request)
    assert status == 408 and took < READ_TIMEOUT_S + 3
    _assert_error(answer, "request_timeout", "body")
    # A client that gives up mid-body gets nothing done either.
    status, _, took = raw_request(gateway.http_port, request, half_close=True)
    assert took < READ_TIMEOUT_S + 3
    assert gateway.jobs_stored() == before
    # Meanwhile the server serves everyone else.
    assert gateway.request("GET", "/healthz")[0] == 200


def test_a_body_over_the_limit_is_413(gateway: Gateway) -> None:
    before = gateway.jobs_stored()
    status, answer = gateway.request("POST", "/v1/jobs", {**JOB, "pad": "x" * 300_000})
    assert status == 413
    _assert_error(answer, "request_entity_too_large", "body")
    assert gateway.jobs_stored() == before


def test_routes_ids_and_methods_that_do_not_exist_are_json_404_and_405(gateway: Gateway) -> None:
    job_id = gateway.submit()
    status, answer = gateway.request("GET", f"/v1/jobs/{job_id}:state")
    assert status == 404  # not a WRONGTYPE 500: only the ids that the store makes name a job
    _assert_error(answer, "not_found")
    status, answer = gateway.request("GET", "/v2/anything")
    assert status == 404 and "no route" in answer["error"]["message"]
    status, answer = gateway.request("DELETE", f"/v1/jobs/{job_id}")
    assert status == 405
    _assert_error(answer, "method_not_allowed")
    with pytest.raises(grpc.RpcError) as err:
        gateway.client("alice").get(job_id + ":parts")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_metrics_need_no_token(gateway: Gateway) -> None:
    assert gateway.request("GET", "/healthz", who=None) == (
        200,
        {"status": "serving", "kill_switch": {"on": False}},
    )
    status, text = gateway.request("GET", "/metrics", who=None)
    assert status == 200 and b"# HELP" in text


def test_missing_or_unknown_tokens_are_401_and_unauthenticated(gateway: Gateway) -> None:
    job_id = gateway.submit()
    for headers in ({}, {"Authorization": "Bearer seal_nobody"}, {"Authorization": "Basic YWxpY2U6eA=="}):
        for method, path in (("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{job_id}")):
            status, answer = gateway.request(method, path, JOB if method == "POST" else None, None, headers)
            assert status == 401, (method, path, headers)
            _assert_error(answer, "unauthorized")
    with grpc.insecure_channel(gateway.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        GatewayClient(gateway.grpc_address, token="seal_forged").submit(SPEC)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_submitter_sees_only_its_own_jobs_and_an_operator_sees_all(gateway: Gateway) -> None:
    alices = gateway.submit("alice")
    bobs = gateway.client("bob").submit(SPEC).id  # over gRPC, owned the same way
    # Another's job is 404, as if it did not exist, over HTTP and gRPC.
    status, answer = gateway.request("GET", f"/v1/jobs/{bobs}", who="alice")
    assert status == 404 and bobs in answer["error"]["message"]
    with pytest.raises(grpc.RpcError) as err:
        gateway.client("alice").get(bobs)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    status, answer = gateway.request("GET", f"/v1/jobs/{bobs}/watch", who="alice")
    assert status == 404
    assert gateway.client("bob").get(bobs).id == bobs
    # Lists: a submitter's own; an operator's everyone's, or one owner's.
    alice_list = gateway.request("GET", "/v1/jobs?limit=100", who="alice")[1]["jobs"]
    assert alices in alice_list and bobs not in alice_list
    root_list = gateway.request("GET", "/v1/jobs?limit=100", who="root")[1]["jobs"]
    assert {alices, bobs} <= set(root_list)
    assert gateway.request("GET", "/v1/jobs?owner=bob", who="root")[1]["jobs"][0] == bobs
    assert gateway.client("root").get(alices).id == alices
    status, answer = gateway.request("GET", "/v1/jobs?owner=bob", who="alice")
    assert status == 403
    _assert_error(answer, "forbidden")


def test_job_lists_are_paginated(gateway: Gateway) -> None:
    created = [gateway.submit("bob") for _ in range(3)]
    first = gateway.request("GET", "/v1/jobs?limit=2", who="bob")[1]
    assert first["jobs"] == created[::-1][:2] and first["next_cursor"]
    rest = gateway.request("GET", f"/v1/jobs?limit=2&cursor={first['next_cursor']}", who="bob")[1]
    assert rest["jobs"][0] == created[0]
    for query, field in (
        ("limit=101", "limit"),
        ("limit=0", "limit"),
        ("limit=many", "limit"),
        ("cursor=zz", "cursor"),
    ):
        status, answer = gateway.request("GET", f"/v1/jobs?{query}", who="bob")
        assert status == 400
        _assert_error(answer, "bad_request", field)


def _watch(gateway: Gateway, job_id: str, who: str = "alice") -> tuple[http.client.HTTPResponse, Any]:
    """(the open response, its first event's job) or (the response, its JSON error)."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=30)
    conn.request(
        "GET", f"/v1/jobs/{job_id}/watch", headers={"Authorization": f"Bearer {gateway.tokens[who]}"}
    )
    response = conn.getresponse()
    if response.status != 200:
        return response, json.loads(response.read())
    assert response.getheader("content-type").startswith("text/event-stream")
    assert response.readline() == b"event: job\n"
    return response, json.loads(response.readline().removeprefix(b"data: "))


def test_watchers_are_bounded_and_do_not_starve_unary_calls(gateway: Gateway) -> None:
    job_id = gateway.submit()
    alice = gateway.client("alice")
    sse, first = _watch(gateway, job_id)
    assert first["id"] == job_id and first["state"] == "queued"
    grpc_watch = alice.stub.WatchJob(gateway_pb2.GetJobRequest(job_id=job_id), metadata=alice.metadata)
    assert next(grpc_watch).id == job_id
    # Two watchers open (the limit): a third is refused over either transport, with a clear error.
    refused, answer = _watch(gateway, job_id)
    assert refused.status == 429 and "max_watchers" in answer["error"]["message"]
    _assert_error(answer, "too_many_requests")
    with pytest.raises(grpc.RpcError) as err:
        next(alice.watch(job_id))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Unary calls still answer, on both transports, while the watchers stay open.
    assert alice.get(job_id).id == job_id
    assert gateway.request("GET", f"/v1/jobs/{job_id}")[0] == 200
    # A watcher that goes away gives its slot back.
    sse.close()
    grpc_watch.cancel()
    deadline = time.monotonic() + 10
    while (again := _watch(gateway, job_id)[0]).status == 429:
        assert time.monotonic() < deadline, "a closed watcher kept its slot"
        time.sleep(0.2)
    again.close()


def test_a_watch_stream_reports_changes_until_the_job_finishes(gateway: Gateway) -> None:
    from gateway.jobs import JobStore
    from seal.records import JobState
    from seal.workplane import WorkPlane

    job_id = gateway.submit()
    sse, first = _watch(gateway, job_id)
    assert first["state"] == "queued"
    store = JobStore(WorkPlane(gateway.process_redis(), gateway.config.namespace))
    threading.Timer(0.3, store.set_state, (job_id, JobState.FAILED, "stopped by the test")).start()
    events = [line for line in sse.read().split(b"\n") if line.startswith(b"data: ")]  # to the end
    assert json.loads(events[-1].removeprefix(b"data: "))["state"] == "failed"


def test_redis_down_is_unavailable_and_not_serving_then_recovers(tmp_path: Path) -> None:
    own = start_redis()
    port = int(own.url.rpartition(":")[2].split("/")[0])
    tokens = {name: generate_token() for name in ("alice", "bob", "root")}
    gw = Gateway(_config(tmp_path, own.url, "seal-test-down", tokens), tokens)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(gw.grpc_address))

    def grpc_health() -> int:
        return health.Check(health_pb2.HealthCheckRequest(service="seal.v1.Gateway"), timeout=5).status

    def eventually(check: Any, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert time.monotonic() < deadline
            time.sleep(0.1)

    try:
        gw.submit()
        own.stop()
        eventually(lambda: grpc_health() == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert gw.request("GET", "/healthz") == (503, {"status": "not_serving", "kill_switch": None})
        with pytest.raises(grpc.RpcError) as err:
            gw.client("alice").submit(SPEC)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        status, answer = gw.request("POST", "/v1/jobs", JOB)
        assert status == 503
        _assert_error(answer, "service_unavailable")
        assert "Redis" in answer["error"]["message"]

        own = start_redis(port=port)
        eventually(lambda: grpc_health() == health_pb2.HealthCheckResponse.SERVING)
        assert gw.request("GET", "/healthz") == (200, {"status": "serving", "kill_switch": {"on": False}})
        assert gw.submit()
    finally:
        gw.process.drain(grace_s=1)
        own.stop()


def test_cli_status_sends_the_token_from_its_flag_or_environment(
    gateway: Gateway, monkeypatch, capsys, tmp_path
) -> None:  # noqa: ANN001
    from seal.cli import main

    monkeypatch.chdir(tmp_path)  # no local stack's .seal/ here to fall back on
    job_id = gateway.submit("alice")
    args = ["status", job_id, "--gateway", gateway.grpc_address, "--json"]
    assert main([*args, "--token", gateway.tokens["alice"]]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == job_id
    monkeypatch.setenv("SEAL_API_TOKEN", gateway.tokens["root"])
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["id"] == job_id
    monkeypatch.delenv("SEAL_API_TOKEN")
    with pytest.raises(grpc.RpcError) as err:
        main(args)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_requests_over_the_concurrency_limit_get_a_json_503_and_health_still_answers(plane) -> None:  # noqa: ANN001
    from gateway.api import GatewayApi
    from gateway.auth import Authenticator
    from gateway.http import HttpLimits, build_app, start_http
    from gateway.jobs import JobStore
    from seal.validation import Limits

    limits = HttpLimits(max_concurrency=1, read_timeout_s=5.0, queue_wait_s=0.2)
    api = GatewayApi(JobStore(plane), Limits(), "smollm2-135m")
    server = start_http(build_app(api, Authenticator(None), limits=limits), "127.0.0.1:0", limits)
    try:
        # One request in flight, its body still coming, holds the only turn.
        holder = socket.create_connection(("127.0.0.1", server.port))
        holder.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.3)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        started = time.monotonic()
        conn.request("GET", "/v1/jobs")
        response = conn.getresponse()
        assert response.status == 503 and time.monotonic() - started < 3
        assert json.loads(response.read())["error"]["code"] == "service_unavailable"
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        holder.close()  # the turn comes back
        deadline = time.monotonic() + 10
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", "/v1/jobs")
            if (status := conn.getresponse().status) == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == 200
    finally:
        server.stop()


def test_the_registry_over_http_reads_for_everyone_changes_for_operators_with_coded_refusals(
    gateway: Gateway,
) -> None:
    assert gateway.request("GET", "/v1/deployments") == (200, {"deployments": []})
    status, answer = gateway.request("GET", "/v1/deployments/faq")
    assert status == 404 and "no deployment 'faq'" in answer["error"]["message"]
    job_id = gateway.submit()
    promote = {"job_id": job_id, "self_edit_id": f"{job_id}/0/0"}
    status, answer = gateway.request("POST", "/v1/deployments/faq/promote", promote)
    assert status == 403  # a submitter cannot promote
    status, answer = gateway.request("POST", "/v1/deployments/faq/promote", promote, who="root")
    assert status == 404 and "no self-edit" in answer["error"]["message"]  # nothing proposed yet
    status, answer = gateway.request("POST", "/v1/deployments/faq/promote", {"job_id": job_id}, who="root")
    assert status == 400 and answer["error"]["field"] == "self_edit_id"
    status, answer = gateway.request("POST", "/v1/deployments/faq/retire", {}, who="root")
    assert status == 404 and "promote, approve, rollback" in answer["error"]["message"]

    status, _ = gateway.request("PUT", "/v1/kill-switch", {"on": True, "reason": "drill"})
    assert status == 403
    status, answer = gateway.request("PUT", "/v1/kill-switch", {"on": True, "reason": "drill"}, who="root")
    assert status == 200 and answer["on"] is True and answer["actor"] == "root"
    try:
        assert gateway.request("GET", "/healthz", who=None)[1]["kill_switch"] == {
            "on": True,
            "reason": "drill",
        }
        status, answer = gateway.request("POST", "/v1/jobs", JOB)
        assert (
            status == 400
            and answer["error"]["code"] == "kill_switch"
            and "drill" in answer["error"]["message"]
        )
        status, answer = gateway.request("POST", "/v1/deployments/faq/promote", promote, who="root")
        assert status == 400 and answer["error"]["code"] == "kill_switch"
        with pytest.raises(grpc.RpcError) as err:
            gateway.client("alice").submit(SPEC)
        assert (
            err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "kill_switch" in err.value.details()
        )
    finally:
        status, answer = gateway.request("PUT", "/v1/kill-switch", {"on": False}, who="root")
    assert status == 200 and answer["on"] is False
    assert gateway.request("GET", "/v1/kill-switch")[1]["on"] is False
