"""Mutual TLS on a real service process: a ServiceProcess (health, reflection, the error interceptor)
in a child process with mTLS on, and one small RPC that answers with the caller's verified name.

No model is loaded: the transport is what is under test, and it is the same for every service."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seal.server import GRPC_OPTIONS, ServiceProcess
from seal.tls import TlsFiles, channel, make_local_pki, peer_service

ROOT = Path(__file__).resolve().parents[2]
WHOAMI = "/seal.test.Whoami/Who"


def serve_whoami() -> None:
    """Child process entry: `python -c ... serve_whoami()` [CA CERT KEY]; prints the bound port."""
    tls = TlsFiles(*(Path(p) for p in sys.argv[1:4])) if len(sys.argv) > 1 else None

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        return peer_service(context).encode()

    def register(server: grpc.Server) -> list[str]:
        handler = grpc.unary_unary_rpc_method_handler(who)  # raw bytes in and out
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("seal.test.Whoami", {"Who": handler})]
        )
        return []

    process = ServiceProcess("whoami", "127.0.0.1:0", register, tls=tls)
    print(process.start(), flush=True)
    process.wait()


def _start(tls: TlsFiles | None) -> tuple[subprocess.Popen[str], str]:
    code = "from tests.integration.test_mtls import serve_whoami; serve_whoami()"
    files = [str(tls.ca), str(tls.cert), str(tls.key)] if tls else []
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *files],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    port = proc.stdout.readline().strip()
    if not port.isdigit():
        proc.kill()
        pytest.fail(f"the mTLS test server did not start (exit code {proc.wait()})")
    return proc, f"127.0.0.1:{port}"


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()  # SIGTERM: the ServiceProcess drains and exits
    try:
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    return make_local_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    """A second, unrelated CA with the same service names: trusted by nobody here."""
    return make_local_pki(tmp_path_factory.mktemp("other-pki"))


@pytest.fixture(scope="module")
def teacher(pki: dict[str, TlsFiles]) -> Iterator[str]:
    proc, address = _start(pki["teacher"])
    yield address
    _stop(proc)


def _health(ch: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(ch)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def _refused(ch: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        _health(ch)
    return refused.value.code()


def test_a_client_with_a_certificate_from_the_same_ca_is_served(
    pki: dict[str, TlsFiles], teacher: str
) -> None:
    with channel(teacher, pki["client"], options=GRPC_OPTIONS) as ch:
        assert _health(ch) == health_pb2.HealthCheckResponse.SERVING


def test_the_server_sees_the_verified_name_of_each_calling_service(
    pki: dict[str, TlsFiles], teacher: str
) -> None:
    for caller in ("client", "auditor", "gateway"):
        with channel(teacher, pki[caller]) as ch:
            assert ch.unary_unary(WHOAMI)(b"", timeout=10) == caller.encode()


def test_a_plaintext_client_is_refused(teacher: str) -> None:
    with channel(teacher, None) as ch:
        assert _refused(ch) == grpc.StatusCode.UNAVAILABLE


def test_a_client_with_a_certificate_from_another_ca_is_refused(
    pki: dict[str, TlsFiles], other_pki: dict[str, TlsFiles], teacher: str
) -> None:
    # It trusts our CA (so the server's certificate checks out) but presents a foreign certificate.
    impostor = TlsFiles(pki["client"].ca, other_pki["client"].cert, other_pki["client"].key)
    with channel(teacher, impostor) as ch:
        assert _refused(ch) == grpc.StatusCode.UNAVAILABLE


def test_a_tls_client_without_a_certificate_is_refused(pki: dict[str, TlsFiles], teacher: str) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=pki["client"].ca.read_bytes())
    with grpc.secure_channel(teacher, creds) as ch:
        assert _refused(ch) == grpc.StatusCode.UNAVAILABLE


def test_a_client_refuses_a_server_whose_certificate_another_ca_signed(
    other_pki: dict[str, TlsFiles], teacher: str
) -> None:
    # The client trusts only the other CA: the teacher's (real) certificate must not satisfy it.
    with channel(teacher, other_pki["client"]) as ch:
        assert _refused(ch) == grpc.StatusCode.UNAVAILABLE


def test_a_client_refuses_a_server_certificate_not_made_for_the_dialled_address(tmp_path: Path) -> None:
    # Same CA, but the server's certificate names only another host: dialling 127.0.0.1 must fail.
    pki = make_local_pki(tmp_path, services=("teacher", "client"), hosts=("gpu-host-1",))
    proc, address = _start(pki["teacher"])
    try:
        with channel(address, pki["client"]) as ch:
            assert _refused(ch) == grpc.StatusCode.UNAVAILABLE
    finally:
        _stop(proc)


def test_without_tls_the_service_is_plaintext_and_names_no_peer() -> None:
    proc, address = _start(None)
    try:
        with channel(address, None) as ch:
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
            assert ch.unary_unary(WHOAMI)(b"", timeout=10) == b""
    finally:
        _stop(proc)


def test_the_server_still_serves_after_refusing_clients(pki: dict[str, TlsFiles], teacher: str) -> None:
    with channel(teacher, None) as ch:
        _refused(ch)
    with channel(teacher, pki["student"]) as ch:
        assert _health(ch) == health_pb2.HealthCheckResponse.SERVING


TINY_JOB = {
    "n_self_edits": 1,
    "lora": {"epochs": 1, "rank": 4},
    "sampling": {"max_new_tokens": 16},
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


@pytest.mark.timeout(600)
def test_a_local_stack_with_mtls_finishes_a_job_and_refuses_plaintext_on_every_port(
    tiny_model_dir: Path, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    from gateway.api import parse_job_spec
    from gateway.client import GatewayClient
    from seal.records import JobState
    from seal.stack import LocalStack
    from tests.integration.waiting import wait_finished

    stack = LocalStack(
        model=str(tiny_model_dir),
        data_dir=tmp_path / "stack",
        redis_url=redis_url,
        namespace=namespace,
        threads=1,
        tls_dir=tmp_path / "tls",
    )
    try:
        with stack:
            for kind, address in stack.addresses.items():
                with channel(address, None) as ch:
                    assert _refused(ch) == grpc.StatusCode.UNAVAILABLE, kind
            client = GatewayClient(
                stack.addresses["gateway"], token=stack.operator_token, tls=stack.tls["client"]
            )
            # Every hop is mTLS: the auditor fetches the adapter from the student over it.
            job = wait_finished(client, client.submit(parse_job_spec(TINY_JOB)).id)
            client.close()
            assert job.state == JobState.SUCCEEDED, job.error
            assert all(e.verdict is not None for doc in job.documents for e in doc.edits)
    finally:
        keys = redis.Redis.from_url(redis_url)
        for key in keys.scan_iter(f"{namespace}:*"):
            keys.delete(key)


@pytest.mark.parametrize("kind", ["teacher", "student", "auditor", "gateway"])
def test_seal_serve_with_part_of_the_tls_settings_exits_before_anything_starts(
    kind: str, pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    # A model that does not exist: were TLS checked after loading it, the error would name the model.
    flags = ["--tls-ca", str(pki[kind].ca), "--tls-cert", str(pki[kind].cert), "--model", str(tmp_path)]
    flags += ["--trusted-keys", str(tmp_path / "keys.json")] if kind == "gateway" else []
    done = subprocess.run(
        [sys.executable, "-m", "seal.cli", "serve", kind, *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "missing --tls-key" in done.stderr
