"""Faults survived: a service SIGKILLed mid-task, and Redis (with an append-only file) killed mid-job.

One supervised stack for the module, on a redis-server of the test's own (AOF, password, spare port),
so every fault restarts something real, and a check that nothing was left behind in Redis. The
student's SIGKILL is in test_recovery_and_cli.py (restarted by the test, not the supervisor).
Last, a stack whose Redis and services each live in a network namespace of their own, with a link
taken down and up mid-job (skipped, saying why, where namespaces cannot be made).
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis

from gateway.api import parse_job_spec
from gateway.client import GatewayClient
from seal.config import SERVICE_KINDS
from seal.embedded_redis import EmbeddedRedis, start_redis
from seal.records import Job, JobState
from seal.stack import LocalStack, RestartPolicy
from tests.integration.test_recovery_and_cli import _pending

FAULT_JOB = {
    "n_self_edits": 3,
    "lora": {"epochs": 1, "rank": 4},
    "sampling": {"max_new_tokens": 24},
    "documents": [
        {
            "title": "Kappa",
            "context": "Kappa is a village on a hill with a stone bridge and a mill.",
            "questions": [
                {"question": "Where is Kappa?", "answer": "on a hill"},
                {"question": "What does Kappa have?", "answer": "a stone bridge"},
            ],
        }
    ],
}
NAMESPACE = "seal-faults"
# Short timeouts: a killed worker's task is reclaimed 4 s after its last heartbeat.
FAST = {kind: ["--visibility-timeout-s", "4"] for kind in SERVICE_KINDS}
WORK_STREAMS = ("propose", "apply", "audit", "policy", "events")


@pytest.fixture(scope="module")
def aof_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = start_redis(data_dir=tmp_path_factory.mktemp("aof-redis"))
    assert "appendonly yes" in (server.data_dir / "redis.conf").read_text()  # type: ignore[operator]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(
    tiny_model_dir: Path, aof_redis: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with LocalStack(
        model=str(tiny_model_dir),
        data_dir=tmp_path_factory.mktemp("fault-stack"),
        redis_url=aof_redis.url,
        namespace=NAMESPACE,
        threads=1,
        extra_flags=FAST,
        supervise=True,
        restart_policy=RestartPolicy(first_delay_s=0.5),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> GatewayClient:
    return GatewayClient(stack.addresses["gateway"], token=stack.operator_token)


def wait_finished_through_outages(client: GatewayClient, job_id: str, timeout_s: float = 150) -> Job:
    """Like waiting.wait_finished, but a gateway or Redis that is briefly away is waited for."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            job = client.get(job_id)
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
                raise
        else:
            if job.state in (JobState.SUCCEEDED, JobState.FAILED):
                return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not finish in {timeout_s} s: {client.get(job_id).progress}")


def wait_until_taken(r: redis.Redis, stream: str, group: str, timeout_s: float = 90) -> None:
    """Return once a worker of `group` holds a task of `stream` (it is mid-task)."""
    key, deadline = f"{NAMESPACE}:stream:{stream}", time.monotonic() + timeout_s
    while not _pending(r, key, group):
        assert time.monotonic() < deadline, f"no {group} ever took a {stream} task"
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("kind", "stream"),
    [
        ("teacher", "propose"),  # killed while generating self-edits
        ("auditor", "audit"),  # killed while evaluating an adapter
        ("gateway", "apply"),  # killed while the student trains: its events wait for the new gateway
    ],
)
def test_a_job_completes_after_a_service_is_killed_mid_task(
    stack: LocalStack, client: GatewayClient, aof_redis: EmbeddedRedis, kind: str, stream: str
) -> None:
    r = redis.Redis.from_url(aof_redis.url)
    job = client.submit(parse_job_spec(FAULT_JOB))
    victim = stack.processes[kind]
    restarts = stack.restarts(kind)
    wait_until_taken(r, stream, "student" if kind == "gateway" else kind)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)

    finished = wait_finished_through_outages(client, job.id)
    assert finished.state == JobState.SUCCEEDED, finished.error
    assert finished.progress.audited == finished.progress.self_edits == 4  # 3 self-edits + passage
    assert stack.restarts(kind) == restarts + 1
    assert stack.processes[kind].pid != victim.pid
    if kind != "gateway":  # the new process (or a peer) took over the task the dead one held
        assert "reclaimed stuck task" in stack.log_path(kind).read_text()


def test_a_job_completes_after_redis_is_killed_and_restarted_from_its_aof(
    stack: LocalStack, client: GatewayClient, aof_redis: EmbeddedRedis
) -> None:
    r = redis.Redis.from_url(aof_redis.url)
    job = client.submit(parse_job_spec(FAULT_JOB))
    wait_until_taken(r, "apply", "student")
    aof_redis.process.kill()  # SIGKILL: no shutdown save; only what the AOF already holds survives
    aof_redis.process.wait()
    time.sleep(2)  # every service sees Redis gone
    aof_redis.launch()  # same port, data dir and password

    finished = wait_finished_through_outages(client, job.id)
    assert finished.state == JobState.SUCCEEDED, finished.error
    assert finished.progress.audited == 4
    assert all(proc.poll() is None for proc in stack.processes.values())  # no service died of it


def test_after_the_faults_the_work_streams_are_empty_and_every_work_key_expires(
    stack: LocalStack, aof_redis: EmbeddedRedis
) -> None:
    r = redis.Redis.from_url(aof_redis.url)
    deadline = time.monotonic() + 30  # the last events are acked just after the job is marked done
    while sum(r.xlen(f"{NAMESPACE}:stream:{s}") for s in WORK_STREAMS) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {s: r.xlen(f"{NAMESPACE}:stream:{s}") for s in WORK_STREAMS} == dict.fromkeys(WORK_STREAMS, 0)
    work_keys = [
        k.decode()
        for prefix in ("attempts", "enqueued", "result")
        for k in r.scan_iter(f"{NAMESPACE}:{prefix}:*")
    ]
    assert work_keys
    assert [k for k in work_keys if r.ttl(k) < 0] == []


@dataclass
class NetnsLab:
    """A bridge in a hub namespace; each node gets a namespace, a veth on the bridge and an address.
    The test process joins the bridge through one more veth, so it can dial the gateway."""

    tag: str = field(default_factory=lambda: f"{random.randrange(16**4):04x}")
    subnet: str = ""
    nodes: list[str] = field(default_factory=list)

    def ns(self, node: str) -> str:
        return f"seal{self.tag}-{node}"

    def ip(self, node: str) -> str:
        return f"{self.subnet}.{10 + self.nodes.index(node)}"

    def hub_end(self, node: str) -> str:
        return f"v{self.tag}{self.nodes.index(node)}h"

    def launcher(self, node: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(node)]

    def build(self, nodes: list[str]) -> None:
        taken = _ip("route").stdout + _ip("addr").stdout
        free = [n for n in range(100, 250) if f"10.213.{n}." not in taken]
        self.subnet, self.nodes = f"10.213.{random.choice(free)}", nodes
        hub = self.ns("hub")
        _ip("netns", "add", hub)
        _ip("-n", hub, "link", "set", "lo", "up")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for node in nodes:
            ns, inner = self.ns(node), f"v{self.tag}{nodes.index(node)}"
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            self._wire(inner, ns, f"{self.ip(node)}/24")
        self._wire(f"v{self.tag}r", None, f"{self.subnet}.1/24")

    def _wire(self, inner: str, ns: str | None, cidr: str) -> None:
        """A veth pair: `inner` (in `ns`, or here) with `cidr`; its `h` end on the hub's bridge."""
        hub, outer = self.ns("hub"), inner + "h"
        _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
        _ip("link", "set", outer, "netns", hub)
        _ip("-n", hub, "link", "set", outer, "master", "br0")
        _ip("-n", hub, "link", "set", outer, "up")
        if ns is not None:
            _ip("link", "set", inner, "netns", ns)
        where = ["-n", ns] if ns is not None else []
        _ip(*where, "addr", "add", cidr, "dev", inner)
        _ip(*where, "link", "set", inner, "up")

    def set_link(self, node: str, state: str) -> None:
        _ip("-n", self.ns("hub"), "link", "set", self.hub_end(node), state)

    def tear_down(self) -> None:
        for node in [*self.nodes, "hub"]:  # a namespace takes its veth ends (and their peers) with it
            _ip("netns", "del", self.ns(node), check=False)
        _ip("link", "del", f"v{self.tag}r", check=False)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


@pytest.fixture()
def netns_lab() -> Iterator[NetnsLab]:
    if shutil.which("ip") is None:
        pytest.skip("network namespaces: no `ip` command (install iproute2)")
    lab = NetnsLab()
    try:
        lab.build(["redis", *SERVICE_KINDS])
    except OSError as exc:
        lab.tear_down()
        pytest.skip(f"network namespaces cannot be made here (needs root or CAP_NET_ADMIN): {exc}")
    yield lab
    lab.tear_down()


def test_a_job_completes_with_each_service_in_its_own_network_namespace_and_a_link_down_mid_job(
    netns_lab: NetnsLab, tiny_model_dir: Path, tmp_path: Path
) -> None:
    lab = netns_lab
    server = EmbeddedRedis(6379, tmp_path / "redis", host=lab.ip("redis"), launcher=lab.launcher("redis"))
    server.launch(timeout_s=30)
    try:
        with LocalStack(
            model=str(tiny_model_dir),
            data_dir=tmp_path / "stack",  # each service keeps its own data dir under it
            redis_url=server.url,
            namespace=NAMESPACE,
            threads=1,
            extra_flags=FAST,
            hosts={kind: lab.ip(kind) for kind in SERVICE_KINDS},
            launchers={kind: lab.launcher(kind) for kind in SERVICE_KINDS},
            http_listen=f"{lab.ip('gateway')}:8080",
        ) as stack:
            assert len({a.rpartition(":")[0] for a in stack.addresses.values()}) == 4
            client = GatewayClient(stack.addresses["gateway"], token=stack.operator_token)
            job = client.submit(parse_job_spec(FAULT_JOB))
            wait_until_taken(redis.Redis.from_url(server.url), "apply", "student")
            lab.set_link("student", "down")  # mid-training: the student is cut off from everyone
            time.sleep(6)
            lab.set_link("student", "up")
            finished = wait_finished_through_outages(client, job.id)
            assert finished.state == JobState.SUCCEEDED, finished.error
            assert finished.progress.audited == 4
            assert all(proc.poll() is None for proc in stack.processes.values())
    finally:
        server.stop()
