"""HTTP/JSON beside gRPC: POST /v1/jobs, GET /v1/jobs, GET /v1/jobs/<id>, GET /healthz.

Errors come back as {"error": {"code", "message", "field"}} with a 4xx/5xx status.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gateway.api import GatewayApi, parse_job_spec
from seal.errors import InvalidArgument, status_of
from seal.records import to_dict

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 * 1024 * 1024


def make_handler(api: GatewayApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "seal-gateway"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._dispatch(self._get)

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch(self._post)

        def _get(self) -> tuple[int, Any]:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/healthz":
                return 200, {"status": "ok"}
            if path == "/v1/jobs":
                return 200, {"jobs": api.store.list_ids()}
            if path.startswith("/v1/jobs/"):
                return 200, to_dict(api.get(path.removeprefix("/v1/jobs/")))
            return 404, _error("not_found", f"no route GET {path}; try /v1/jobs or /v1/jobs/<id>")

        def _post(self) -> tuple[int, Any]:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path != "/v1/jobs":
                return 404, _error("not_found", f"no route POST {path}; submit jobs to /v1/jobs")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                return 413, _error("too_large", f"body is {length} bytes; the limit is {MAX_BODY_BYTES}")
            try:
                data = json.loads(self.rfile.read(length) or b"null")
            except json.JSONDecodeError as exc:
                raise InvalidArgument("body", f"is not valid JSON ({exc})") from None
            job = api.submit(parse_job_spec(data))
            return 201, to_dict(job)

        def _dispatch(self, route: Any) -> None:
            try:
                status, body = route()
            except Exception as exc:  # noqa: BLE001 - every error becomes a JSON status
                _, status = status_of(exc)
                if status >= 500:
                    log.exception("http request failed")
                code = HTTPStatus(status).phrase.lower().replace(" ", "_")
                body = _error(code, str(exc), getattr(exc, "field", None))
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.info("http", extra={"request": fmt % args})

    return Handler


def _error(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if field:
        err["field"] = field
    return {"error": err}


def start_http(api: GatewayApi, listen: str) -> ThreadingHTTPServer:
    host, _, port = listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), make_handler(api))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
