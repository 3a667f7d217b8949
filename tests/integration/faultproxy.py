"""A fault-injecting HTTP proxy for tests: a real HTTP server on loopback in front of a real server.

Told to, it answers the next k requests itself instead of forwarding them, then forwards again:
- `rate_limited(s)`: 429 with `Retry-After: s` and an OpenAI-shaped error body;
- `server_error(status)`: 500 (or any status) with an OpenAI-shaped error body;
- `HANG`: no answer at all: the connection is held until the client gives up (its timeout) or the
  proxy stops.
`fail_always` keeps injecting until `heal`. Every other request is forwarded as it came (method,
path, headers, body) and the upstream's answer is sent back whole. Every request is recorded in
`seen`, with when it arrived and what was done with it.

Plain HTTP to one upstream, whatever it is (seal's own OpenAI-compatible endpoint, a vLLM server):
`FaultProxy(upstream_base_url).base_url` is the same URL with the proxy's port.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Headers that belong to one connection, not to the request (RFC 9110 7.6.1), plus the ones the
# proxy writes itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


@dataclass(frozen=True)
class Fault:
    """What to answer instead of forwarding: `kind` is "status" (answer `status`) or "hang"."""

    kind: str
    status: int = 500
    retry_after_s: float | None = None


def rate_limited(retry_after_s: float = 1.0) -> Fault:
    return Fault("status", 429, retry_after_s)


def server_error(status: int = 500) -> Fault:
    return Fault("status", status)


HANG = Fault("hang", 0)


@dataclass(frozen=True)
class Seen:
    """One request as the proxy saw it: arrival (time.monotonic), path, headers (lower-case names),
    and what it did: "forwarded" (`status` is the upstream's), "status" (injected) or "hang"."""

    at: float
    path: str
    headers: dict[str, str]
    outcome: str
    status: int


@dataclass
class FaultProxy:
    upstream_base_url: str
    upstream_timeout_s: float = 60.0
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        upstream = urlsplit(self.upstream_base_url)
        if upstream.scheme != "http" or not upstream.hostname or not upstream.port:
            raise ValueError(
                f"the proxy forwards to http://host:port/... only, got {self.upstream_base_url!r}"
            )
        self._upstream = (upstream.hostname, upstream.port)
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque()
        self._always: Fault | None = None
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fault-proxy", daemon=True)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}{upstream.path}"

    # --- control -----------------------------------------------------------------------------------

    def fail_next(self, k: int, fault: Fault) -> None:
        """Answer the next `k` requests with `fault` (after any faults already queued)."""
        with self._lock:
            self._faults.extend([fault] * k)

    def fail_always(self, fault: Fault) -> None:
        """Answer every request with `fault` until `heal`."""
        with self._lock:
            self._always = fault

    def heal(self) -> None:
        """Forward everything from now on."""
        with self._lock:
            self._faults.clear()
            self._always = None

    def outcomes(self) -> list[str]:
        return [s.outcome for s in self.seen]

    def gaps(self) -> list[float]:
        """Seconds between one request's arrival and the next one's."""
        return [b.at - a.at for a, b in zip(self.seen, self.seen[1:], strict=False)]

    # --- lifetime ----------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases held connections
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the work ----------------------------------------------------------------------------------

    def _next_fault(self) -> Fault | None:
        with self._lock:
            if self._faults:
                return self._faults.popleft()
            return self._always

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, list, bytes]:
        connection = http.client.HTTPConnection(*self._upstream, timeout=self.upstream_timeout_s)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        except OSError as exc:
            return 502, [("Content-Type", "application/json")], _error_body(f"upstream unreachable: {exc}")
        finally:
            connection.close()

    def _hold(self, conn: socket.socket) -> None:
        """Answer nothing: wait until the client closes its end (it timed out) or the proxy stops."""
        while not self._stopping.is_set():
            readable, _, _ = select.select([conn], [], [], 0.05)
            if not readable:
                continue
            try:
                if not conn.recv(1, socket.MSG_PEEK):
                    return  # the client hung up
            except OSError:
                return
            time.sleep(0.05)  # it sent more (unlikely while it waits): keep holding


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real clients and servers speak

        def do_GET(self) -> None:
            self._handle()

        def do_POST(self) -> None:
            self._handle()

        def log_message(self, *args: object) -> None:
            pass

        def _handle(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            fault = proxy._next_fault()
            arrived = time.monotonic()
            if fault is None:
                forwarded = {k: v for k, v in headers.items() if k not in _HOP_BY_HOP}
                status, reply_headers, reply = proxy._forward(self.command, self.path, forwarded, body)
                proxy.seen.append(Seen(arrived, self.path, headers, "forwarded", status))
                kept = [(k, v) for k, v in reply_headers if k.lower() not in _HOP_BY_HOP]
                self._reply(status, kept, reply)
            elif fault.kind == "hang":
                proxy.seen.append(Seen(arrived, self.path, headers, "hang", 0))
                proxy._hold(self.connection)
                self.close_connection = True
            else:
                proxy.seen.append(Seen(arrived, self.path, headers, "status", fault.status))
                extra = [("Content-Type", "application/json")]
                if fault.retry_after_s is not None:
                    extra.append(("Retry-After", f"{fault.retry_after_s:g}"))
                self._reply(fault.status, extra, _error_body(f"injected fault: HTTP {fault.status}"))

        def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def _error_body(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "server_error", "code": None}}).encode()
