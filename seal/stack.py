"""A whole local stack as child processes: Redis (given or embedded) and the four services.

Used by `seal up`, `seal demo` and the integration tests, so all three run the same real processes.
With `supervise=True` (what `seal up` uses) a child that dies is restarted with backoff on the same
address and flags, and so is the embedded Redis, on the same port and data directory.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seal.config import SERVICE_KINDS
from seal.embedded_redis import EmbeddedRedis, free_port, redis_answers, start_redis
from seal.tls import LOCAL_HOSTS, TlsFiles, make_local_pki
from seal.tls import channel as open_channel

log = logging.getLogger(__name__)

SERVICE_PORT = 50051
METRICS_PORT = 9100
"""The port of a service whose host is not an address of this machine's network namespace."""


def kind_of(name: str) -> str:
    """The service kind of a stack process name ("student-2" is a student)."""
    kind = name.split("-", 1)[0]
    if kind not in SERVICE_KINDS:
        raise ValueError(f"not a service process name: {name!r}")
    return kind


def default_threads() -> int:
    """torch threads per model service: three of them share this machine's cores. Oversubscribed
    OpenMP threads spin against each other; on 2 cores that made training 10x slower."""
    return max(1, (os.cpu_count() or 1) // 3)


def resolve_port(address: str) -> str:
    """`host:0` becomes `host:<a free port>`, so the address can be dialled and kept across restarts."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address must be host:port, got {address!r}")
    return f"{host}:{free_port(host)}" if int(port) == 0 else address


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 1.0
    """Wait before the first restart; doubles with each death that follows soon after."""
    max_delay_s: float = 30.0
    stable_after_s: float = 60.0
    """A child up this long is healthy again: its next death waits `first_delay_s` again."""


@dataclass
class _Tended:
    """Restart bookkeeping of one supervised child."""

    delay_s: float
    started_at: float = field(default_factory=time.monotonic)
    restart_at: float | None = None
    restarts: int = 0


# Students one LocalStack runs at most: each loads its own copy of the model on the same host.
MAX_STUDENTS = 8


@dataclass
class LocalStack:
    model: str
    data_dir: Path
    redis_url: str = ""
    namespace: str = "seal"
    threads: int = 0
    gateway_listen: str = ""
    """Fixed gateway gRPC address (host:port; port 0 picks a free one); empty: a free port."""
    http_listen: str = ""
    """Fixed gateway HTTP address; empty picks a free port."""
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_flags: dict[str, list[str]] = field(default_factory=dict)
    hosts: dict[str, str] = field(default_factory=dict)
    """Per service kind, the host it listens on and is dialled at; default 127.0.0.1."""
    launchers: dict[str, list[str]] = field(default_factory=dict)
    """Per service kind, a command prefix it runs under (e.g. `ip netns exec NAME`)."""
    supervise: bool = False
    """Restart a service, or the embedded Redis, that dies (with backoff) until stop()."""
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    tls_dir: Path | None = None
    """Turn on mTLS between everything: a local CA and per-service certificates here (made once, kept)."""
    teacher_model: str = ""
    """The teacher's model when it differs from the student's and auditor's (`model`)."""
    students: int = 1
    """Student processes: "student", then "student-2", ... Each has its own data dir and identity and
    takes apply tasks from the same consumer group, so updates train side by side."""

    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    addresses: dict[str, str] = field(default_factory=dict, init=False)
    http_address: str = field(default="", init=False)
    metrics_addresses: dict[str, str] = field(default_factory=dict, init=False)
    """Each service's Prometheus /metrics address (kept across restarts)."""
    operator_token: str = field(default="", init=False)
    """The gateway API's operator bearer token, made under the data dir (kept across restarts)."""
    tls: dict[str, TlsFiles] = field(default_factory=dict, init=False)
    _taken: set[tuple[str, int]] = field(default_factory=set, init=False)
    """With tls_dir: each service's TLS files, and `client`'s for callers such as GatewayClient."""
    _redis: EmbeddedRedis | None = field(default=None, init=False)
    _tended: dict[str, _Tended] = field(default_factory=dict, init=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)
    _supervisor: threading.Thread | None = field(default=None, init=False)

    @property
    def names(self) -> tuple[str, ...]:
        """Every service process by name: the four kinds, with the extra students after "student"."""
        extra = tuple(f"student-{i}" for i in range(2, self.students + 1))
        return ("teacher", "student", *extra, "auditor", "gateway")

    def start(self, timeout_s: float = 600.0) -> LocalStack:
        """Start Redis if needed and every service; return once all answer their health check."""
        if not 1 <= self.students <= MAX_STUDENTS:
            raise ValueError(f"students must be between 1 and {MAX_STUDENTS}, got {self.students}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        if self.redis_url and not redis_answers(self.redis_url):
            raise ConnectionError(
                f"the Redis at {self.redis_url} does not answer; start it, or leave it unset "
                "for an embedded one"
            )
        self.addresses = {name: self._free_address(kind_of(name)) for name in self.names}
        self.metrics_addresses = {
            name: self._free_address(kind_of(name), METRICS_PORT) for name in self.names
        }
        if self.gateway_listen:
            self.addresses["gateway"] = resolve_port(self.gateway_listen)
        self.http_address = resolve_port(self.http_listen) if self.http_listen else self._free_address("http")
        try:
            if not self.redis_url:
                # Persistent: AOF and password under the data dir, so a restart of Redis loses nothing.
                self._redis = start_redis(data_dir=self.data_dir / "redis")
                self.redis_url = self._redis.url
            self._make_keys()
            self.operator_token = self._make_api_token()
            if self.tls_dir is not None:
                self.tls = make_local_pki(self.tls_dir, hosts=[*LOCAL_HOSTS, *self.hosts.values()])
            for name in self.names:
                self.processes[name] = self._spawn(name)
            deadline = time.monotonic() + timeout_s
            for name in self.names:
                self._wait_healthy(name, deadline)
        except BaseException:
            self.stop()
            raise
        if self.supervise:
            self._start_supervisor()
        return self

    def signing_key_path(self) -> Path:
        return self.data_dir / "auditor" / "auditor-ed25519.key"

    def trusted_keys_path(self) -> Path:
        return self.data_dir / "gateway" / "trusted-keys.json"

    def _make_keys(self) -> None:
        """The auditor's signing key and the gateway's trust in it: made once, kept across restarts."""
        from seal.signing import VerdictSigner, trust_key

        signer = VerdictSigner.load_or_create(self.signing_key_path())
        trust_key(self.trusted_keys_path(), signer.public_key_bytes())

    def api_tokens_path(self) -> Path:
        return self.data_dir / "gateway" / "api-tokens.json"

    def _make_api_token(self) -> str:
        """An operator token for the local stack's API: the gateway never runs open, even locally."""
        from gateway.auth import local_operator_token

        token, tokens_file = local_operator_token(self.data_dir / "gateway")
        assert tokens_file == self.api_tokens_path()
        return token

    def _free_address(self, kind: str, namespaced_port: int = SERVICE_PORT) -> str:
        host = self.hosts.get(kind, "127.0.0.1")
        try:
            port = free_port(host)
            # A port probed free is released at once, so the kernel may hand it out again: never give
            # two services of one stack the same one (a client would reach the wrong service).
            while (host, port) in self._taken:
                port = free_port(host)
        except OSError:  # not an address of this host (another network namespace): its ports are free
            return f"{host}:{namespaced_port}"
        self._taken.add((host, port))
        return f"{host}:{port}"

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        kind = kind_of(name)
        flags = [
            "--listen",
            self.addresses[name],
            "--namespace",
            self.namespace,
            "--model",
            (self.teacher_model or self.model) if kind == "teacher" else self.model,
            "--data-dir",
            str(self.data_dir / name),
        ]
        flags += ["--threads", str(self.threads or default_threads())]
        flags += ["--metrics-listen", self.metrics_addresses[name]]
        if kind == "gateway":
            flags += ["--trusted-keys", str(self.trusted_keys_path()), "--http-listen", self.http_address]
            flags += ["--api-tokens", str(self.api_tokens_path())]
        if kind == "auditor":
            flags += ["--signing-key", str(self.signing_key_path())]
        if kind in self.tls:
            flags += ["--tls-ca", str(self.tls[kind].ca), "--tls-cert", str(self.tls[kind].cert)]
            flags += ["--tls-key", str(self.tls[kind].key)]
        flags += self.extra_flags.get(kind, [])
        log_file = open(self.log_path(name), "ab")  # noqa: SIM115 - the child owns it
        # The Redis URL may carry a password: the environment keeps it out of `ps`.
        env = {**os.environ, "SEAL_REDIS_URL": self.redis_url, **self.extra_env}
        try:
            # A session of its own: a terminal's Ctrl-C reaches `seal up` alone, which drains the
            # children in order instead of all of them racing their own SIGINT.
            return subprocess.Popen(
                [*self.launchers.get(kind, []), sys.executable, "-m", "seal.cli", "serve", kind, *flags],
                stdout=log_file,
                stderr=log_file,
                env=env,
                start_new_session=True,
            )
        finally:
            log_file.close()

    def log_path(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def _wait_healthy(self, name: str, deadline: float) -> None:
        with open_channel(self.addresses[name], self.tls.get("client")) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.processes[name].poll() is not None:
                    tail = self.log_path(name).read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} exited with code {self.processes[name].returncode}:\n{tail}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not become healthy; see {self.log_path(name)}")
                time.sleep(0.3)

    # --- supervision --------------------------------------------------------------------------

    @property
    def redis_process(self) -> subprocess.Popen[bytes] | None:
        """The embedded redis-server (None with an external Redis)."""
        return None if self._redis is None else self._redis.process

    def restarts(self, name: str) -> int:
        """How often the supervisor has restarted `name` (a service kind, or "redis")."""
        tended = self._tended.get(name)
        return 0 if tended is None else tended.restarts

    def _start_supervisor(self) -> None:
        names = [*self.names, *(["redis"] if self._redis is not None else [])]
        self._tended = {name: _Tended(self.restart_policy.first_delay_s) for name in names}
        self._supervisor = threading.Thread(target=self._supervise, name="stack-supervisor", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        while not self._stopping.wait(0.25):
            if self._redis is not None:
                self._tend("redis", self._redis.process, self._redis.restart)
            for name in self.names:
                self._tend(name, self.processes[name], functools.partial(self._respawn, name))

    def _respawn(self, name: str) -> None:
        self.processes[name] = self._spawn(name)

    def _tend(self, name: str, proc: subprocess.Popen[bytes], restart: Callable[[], None]) -> None:
        """Restart `name` once its backoff has passed, if it died; reset the backoff once it is stable."""
        tended, policy, now = self._tended[name], self.restart_policy, time.monotonic()
        if proc.poll() is None:
            if now - tended.started_at >= policy.stable_after_s:
                tended.delay_s = policy.first_delay_s
            return
        if tended.restart_at is None:
            tended.restart_at = now + tended.delay_s
            log.warning("%s exited with code %s; restarting in %.0f s", name, proc.returncode, tended.delay_s)
            tended.delay_s = min(2 * tended.delay_s, policy.max_delay_s)
            return
        if now < tended.restart_at or self._stopping.is_set():
            return
        try:
            restart()
        except Exception as exc:  # noqa: BLE001 - a failed restart is retried after the next backoff
            log.warning("%s did not restart (%s); trying again in %.0f s", name, exc, tended.delay_s)
            tended.restart_at = time.monotonic() + tended.delay_s
            tended.delay_s = min(2 * tended.delay_s, policy.max_delay_s)
            return
        tended.started_at, tended.restart_at = time.monotonic(), None
        tended.restarts += 1
        log.warning("%s restarted (restart %d)", name, tended.restarts)

    # --- reports and shutdown -----------------------------------------------------------------

    def peak_rss_mb(self) -> dict[str, float]:
        """Each live service's peak resident memory so far (Linux VmHWM), in MiB."""
        peaks = {}
        for kind, proc in self.processes.items():
            status = Path(f"/proc/{proc.pid}/status")
            if proc.poll() is None and status.exists():
                line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))
                peaks[kind] = int(line.split()[1]) / 1024
        return peaks

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop supervising, SIGTERM every service (they drain), then stop the embedded Redis."""
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join()
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._redis is not None:
            self._redis.stop()
            self._redis = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
