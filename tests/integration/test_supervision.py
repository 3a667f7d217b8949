"""`seal up` supervises: port 0 works, a killed service or its embedded Redis comes back (with its
data: jobs submitted before and after a Redis kill complete), and SIGTERM leaves no process behind.

One real `seal up` subprocess for the module, with its own data dir; the SIGTERM test runs last.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.api import parse_job_spec
from gateway.client import GatewayClient
from seal.records import JobState
from seal.stack import LocalStack, RestartPolicy, _Tended
from seal.tls import TlsFiles
from seal.tls import channel as open_channel
from tests.integration.test_faults import FAULT_JOB, wait_finished_through_outages


@dataclass
class SealUp:
    process: subprocess.Popen[str]
    addresses: dict[str, str]
    data_dir: Path

    def children(self) -> dict[int, str]:
        """pid -> command line of every live child of `seal up`."""
        return {pid: cmd for pid, (ppid, cmd) in _processes().items() if ppid == self.process.pid}

    def child(self, needle: str) -> int:
        (pid,) = [pid for pid, cmd in self.children().items() if needle in cmd]
        return pid

    def log(self) -> str:
        return (self.data_dir / "seal-up.err").read_text()

    def client(self) -> GatewayClient:
        """A client with the operator token and the client certificate `seal up` made."""
        token = (self.data_dir / "gateway" / "operator-token").read_text().strip()
        return GatewayClient(self.addresses["gateway"], token=token, tls=self.tls())

    def tls(self) -> TlsFiles:
        tls_dir = self.data_dir / "tls"
        return TlsFiles(tls_dir / "ca.pem", tls_dir / "client.pem", tls_dir / "client.key")

    def health(self, kind: str) -> int:
        return _health(self.addresses[kind], self.tls())


@pytest.fixture(scope="module")
def seal_up(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SealUp]:
    data_dir = tmp_path_factory.mktemp("seal-up")
    # No Redis given: `seal up` embeds one. Short visibility timeout: reclaims within seconds.
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "SEAL_REDIS_URL")}
    env["SEAL_VISIBILITY_TIMEOUT_S"] = "4"
    with open(data_dir / "seal-up.err", "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "seal.cli",
                "up",
                "--model",
                str(tiny_model_dir),
                "--data-dir",
                str(data_dir),
                "--threads",
                "1",
                "--gateway-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
    try:
        lines: list[str] = []
        while not (lines and lines[-1] == "}"):
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, f"seal up exited early: {(data_dir / 'seal-up.err').read_text()[-3000:]}"
            lines.append(line.rstrip("\n"))
        addresses = json.loads("\n".join(lines[lines.index("{") :]))
        yield SealUp(proc, addresses, data_dir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=90)


def test_port_zero_is_resolved_to_a_real_port_before_the_gateway_starts(seal_up: SealUp) -> None:
    for name in ("gateway", "http"):
        host, _, port = seal_up.addresses[name].rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0, seal_up.addresses
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    assert seal_up.health("gateway") == health_pb2.HealthCheckResponse.SERVING
    # mTLS with no setup: the stack made its CA and certificates, and plaintext is refused.
    assert _health(seal_up.addresses["gateway"]) == -1


def test_embedded_redis_keeps_an_append_only_file_and_a_private_password(seal_up: SealUp) -> None:
    redis_dir = seal_up.data_dir / "redis"
    password = (redis_dir / "password").read_text().strip()
    assert stat.S_IMODE((redis_dir / "password").stat().st_mode) == 0o600
    assert seal_up.addresses["redis"].startswith(f"redis://:{password}@127.0.0.1:")
    assert (redis_dir / "appendonlydir").is_dir()
    assert password not in seal_up.children()[seal_up.child("redis-server")]  # not on its command line
    anonymous = redis.Redis.from_url(seal_up.addresses["redis"].replace(f":{password}@", ""))
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()


def test_a_killed_service_is_restarted_on_the_same_address(seal_up: SealUp) -> None:
    old = seal_up.child("serve teacher")
    redis_before = seal_up.child("redis-server")
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        teachers = [pid for pid, cmd in seal_up.children().items() if "serve teacher" in cmd]
        if (
            teachers
            and teachers != [old]
            and seal_up.health("teacher") == health_pb2.HealthCheckResponse.SERVING
        ):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the teacher was not restarted: {seal_up.log()[-2000:]}")
    assert "teacher exited with code -9; restarting" in seal_up.log()
    assert seal_up.child("redis-server") == redis_before  # the stack's Redis kept running
    assert seal_up.process.poll() is None


def test_jobs_submitted_before_and_after_the_embedded_redis_is_killed_complete(seal_up: SealUp) -> None:
    client = seal_up.client()
    r = redis.Redis.from_url(seal_up.addresses["redis"])
    before = client.submit(parse_job_spec(FAULT_JOB))
    old = seal_up.child("redis-server")
    os.kill(old, signal.SIGKILL)  # no shutdown save: only the append-only file keeps the job
    deadline = time.monotonic() + 60
    while True:  # the supervisor brings it back on the same port, data dir and password
        try:
            # The supervisor logs the restart once its new Redis answers, so a client may get there first.
            if r.ping() and seal_up.child("redis-server") != old and "redis restarted" in seal_up.log():
                break
        except (redis.ConnectionError, ValueError):
            pass
        assert time.monotonic() < deadline, f"redis was not restarted: {seal_up.log()[-2000:]}"
        time.sleep(0.2)
    after = client.submit(parse_job_spec(FAULT_JOB))
    for job in (before, after):
        finished = wait_finished_through_outages(client, job.id)
        assert finished.state == JobState.SUCCEEDED, finished.error
        assert finished.progress.audited == 4


def test_sigterm_stops_every_child_and_the_embedded_redis(seal_up: SealUp) -> None:
    children = seal_up.children()
    assert len(children) == 5, children  # four services and redis-server
    seal_up.process.send_signal(signal.SIGTERM)
    assert seal_up.process.wait(timeout=90) == 0
    alive = {pid: cmd for pid, (_, cmd) in _processes().items() if pid in children}
    assert alive == {}, f"left behind: {alive}"
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(seal_up.addresses["redis"], socket_connect_timeout=1).ping()


class _FakeChild:
    """Stands in for a Popen: dies when told, comes back when restarted."""

    returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


def _supervised_fake(tmp_path: Path, policy: RestartPolicy, restart_fails: int = 0):  # noqa: ANN202
    """A stack tending one fake teacher; returns (stack, child, restart, kill_and_time_restart)."""
    stack = LocalStack(model="unused", data_dir=tmp_path, restart_policy=policy)
    stack._tended = {"teacher": _Tended(policy.first_delay_s)}
    child, restarted, failures = _FakeChild(), [], [restart_fails]

    def restart() -> None:
        if failures[0] > 0:
            failures[0] -= 1
            raise OSError("port in use")
        restarted.append(time.monotonic())
        child.returncode = None

    def kill_and_time_restart() -> float:
        child.returncode, died, before = -9, time.monotonic(), len(restarted)
        while len(restarted) == before:
            stack._tend("teacher", child, restart)  # type: ignore[arg-type]
            time.sleep(0.005)
        return restarted[-1] - died

    return stack, child, restart, kill_and_time_restart


def test_restarts_back_off_doubling_to_a_cap_and_the_backoff_resets_once_stable(tmp_path: Path) -> None:
    policy = RestartPolicy(first_delay_s=0.1, max_delay_s=0.3, stable_after_s=0.5)
    stack, child, restart, kill_and_time_restart = _supervised_fake(tmp_path, policy)
    delays = [kill_and_time_restart() for _ in range(4)]
    for delay, expected in zip(delays, [0.1, 0.2, 0.3, 0.3], strict=True):
        assert expected <= delay < expected + 0.1, delays
    time.sleep(0.6)  # up longer than stable_after_s
    stack._tend("teacher", child, restart)  # type: ignore[arg-type]
    assert 0.1 <= kill_and_time_restart() < 0.2
    assert stack.restarts("teacher") == 5


def test_a_restart_that_fails_is_tried_again_after_the_next_backoff(tmp_path: Path) -> None:
    policy = RestartPolicy(first_delay_s=0.1, max_delay_s=1.0)
    stack, _, _, kill_and_time_restart = _supervised_fake(tmp_path, policy, restart_fails=1)
    assert 0.3 <= kill_and_time_restart() < 0.45  # 0.1 s, a failed try, then 0.2 s more
    assert stack.restarts("teacher") == 1


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live (not zombie) process, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited while we looked
            continue
        if fields[0] != "Z":
            found[int(entry.name)] = (int(fields[1]), cmdline)
    return found


def _health(address: str, tls: TlsFiles | None = None) -> int:
    with open_channel(address, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return -1
    return int(reply.status)


def test_a_persistent_redis_starts_from_a_relative_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`seal up` passes .seal/redis; redis-server changes into its dir before opening its log, so a
    relative path made it fail to start (found by `make demo` on a fresh checkout)."""
    from seal.embedded_redis import start_redis

    monkeypatch.chdir(tmp_path)
    server = start_redis(data_dir=Path(".seal/redis"))
    try:
        assert redis.Redis.from_url(server.url).ping()
        assert (tmp_path / ".seal" / "redis" / "redis.log").is_file()
    finally:
        server.stop()
