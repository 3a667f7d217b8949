"""A whole local stack as child processes: Redis (given or embedded) and the four services.

Used by `seal up`, `seal demo` and the integration tests, so all three run the same real processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seal.config import SERVICE_KINDS
from seal.embedded_redis import EmbeddedRedis, free_port, redis_answers, start_redis


def default_threads() -> int:
    """torch threads per model service: three of them share this machine's cores. Oversubscribed
    OpenMP threads spin against each other; on 2 cores that made training 10x slower."""
    return max(1, (os.cpu_count() or 1) // 3)


@dataclass
class LocalStack:
    model: str
    data_dir: Path
    redis_url: str = ""
    namespace: str = "seal"
    threads: int = 0
    gateway_listen: str = ""
    """Fixed gateway gRPC address (host:port); empty picks a free port, as for the other services."""
    http_listen: str = ""
    """Fixed gateway HTTP address; empty picks a free port."""
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_flags: dict[str, list[str]] = field(default_factory=dict)

    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    addresses: dict[str, str] = field(default_factory=dict, init=False)
    http_address: str = field(default="", init=False)
    _redis: EmbeddedRedis | None = field(default=None, init=False)

    def start(self, timeout_s: float = 600.0) -> LocalStack:
        """Start Redis if needed and every service; return once all answer their health check."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        if self.redis_url and not redis_answers(self.redis_url):
            raise ConnectionError(
                f"the Redis at {self.redis_url} does not answer; start it, or leave it unset "
                "for an embedded one"
            )
        if not self.redis_url:
            self._redis = start_redis()
            self.redis_url = self._redis.url
        self.addresses = {kind: f"127.0.0.1:{free_port()}" for kind in SERVICE_KINDS}
        self.addresses["gateway"] = self.gateway_listen or self.addresses["gateway"]
        self.http_address = self.http_listen or f"127.0.0.1:{free_port()}"
        try:
            for kind in SERVICE_KINDS:
                self.processes[kind] = self._spawn(kind)
            deadline = time.monotonic() + timeout_s
            for kind in SERVICE_KINDS:
                self._wait_healthy(kind, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, kind: str) -> subprocess.Popen[bytes]:
        flags = [
            "--listen",
            self.addresses[kind],
            "--redis-url",
            self.redis_url,
            "--namespace",
            self.namespace,
            "--model",
            self.model,
            "--data-dir",
            str(self.data_dir / kind),
        ]
        flags += ["--threads", str(self.threads or default_threads())]
        if kind == "gateway":
            flags += ["--auditor-address", self.addresses["auditor"], "--http-listen", self.http_address]
        flags += self.extra_flags.get(kind, [])
        log = open(self.log_path(kind), "ab")  # noqa: SIM115 - the child owns it
        env = {**os.environ, **self.extra_env}
        return subprocess.Popen(
            [sys.executable, "-m", "seal.cli", "serve", kind, *flags], stdout=log, stderr=log, env=env
        )

    def log_path(self, kind: str) -> Path:
        return self.data_dir / "logs" / f"{kind}.log"

    def _wait_healthy(self, kind: str, deadline: float) -> None:
        with grpc.insecure_channel(self.addresses[kind]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.processes[kind].poll() is not None:
                    tail = self.log_path(kind).read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{kind} exited with code {self.processes[kind].returncode}:\n{tail}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{kind} did not become healthy; see {self.log_path(kind)}")
                time.sleep(0.3)

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
        """SIGTERM every service (they drain), then stop the embedded Redis."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._redis is not None:
            self._redis.stop()
            self._redis = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
