"""HTTP/JSON beside gRPC, on Starlette served by uvicorn (in a thread of the gateway process).

  POST /v1/jobs                 submit a job: 201 and the job
  GET  /v1/jobs                 {"jobs": [ids, newest first], "next_cursor"}; ?limit=1..100&cursor=&owner=
  GET  /v1/jobs/{id}            the job
  GET  /v1/jobs/{id}/watch      server-sent events: `event: job` with the job each time it changes,
                                until it is finished
  GET  /v1/policies[/{version}] teacher policy versions
  GET  /v1/deployments[/{name}] the registry: versions, aliases, lineage, certificates
  POST /v1/deployments/{name}/promote   {"job_id", "self_edit_id", "run"?, "alias"?}: 202 and the
                                version being certified; a refusal is 400 with its own code
  POST /v1/deployments/{name}/approve   {"adapter_sha256", "comment"?}
  POST /v1/deployments/{name}/rollback  {"version", "alias"?}
  GET|PUT /v1/kill-switch       {"on": bool, "reason"}: stops all adaptation and promotion
  GET  /healthz                 200 {"status": "serving", "kill_switch"}, or 503 {"status":
                                "not_serving"} while Redis does not answer
  GET  /metrics                 Prometheus
  GET  /v1/models, POST /v1/chat/completions, POST /v1/completions
                                OpenAI-compatible model serving, where the gateway serves models
                                (gateway.serving.serving_routes, passed as build_app's extra_routes;
                                its errors have OpenAI's shape)

Every error is {"error": {"code", "message", "field"?}} with a 4xx/5xx status, including requests
uvicorn refuses before the app sees them (a Content-Length of "abc"). Bounded: the body's size
(413), the time to send the request head and body (408), requests in flight (503 after a short
wait), watch streams (429, shared with gRPC).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import anyio.to_thread
import h11
import uvicorn
from prometheus_client import make_asgi_app
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.api import GatewayApi, JobWatch, parse_job_spec
from gateway.auth import Authenticator, Principal
from seal.errors import InvalidArgument, status_of
from seal.records import Job, to_dict

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0
"""A watch stream with no change sends an SSE comment this often, so proxies keep it open."""


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 16 * 1024 * 1024
    read_timeout_s: float = 30.0
    """The most time a client may take to send its request head, and then its body."""
    max_concurrency: int = 64
    """Requests in flight at once (watch streams, /healthz and /metrics are not counted)."""
    queue_wait_s: float = 1.0
    """How long a request over max_concurrency waits for a turn before its 503."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "read_timeout_s", "max_concurrency"):
            if not getattr(self, name) > 0:
                raise ValueError(f"http_{name} must be > 0, got {getattr(self, name)}")


class HttpError(Exception):
    """A refusal that only HTTP has (too large, too slow): its status, code and message."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field = status, field


def error_body(status: int, message: str, field: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": _code(status), "message": message}
    if field:
        err["field"] = field
    return {"error": err}


def _code(status: int) -> str:
    return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")


def error_headers(status: int) -> dict[str, str]:
    """The headers an error status needs, for every API on this stack (the OpenAI one too)."""
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="seal"'
    if status in (429, 503):
        headers["Retry-After"] = "1"
    if status in (408, 413):
        headers["Connection"] = "close"  # the rest of the body is unread: this connection is done
    return headers


def error_response(exc: BaseException) -> JSONResponse:
    status = exc.status if isinstance(exc, HttpError) else status_of(exc)[1]
    if status >= 500 and status != 503:
        log.error("http request failed", exc_info=exc)
    headers = error_headers(status)
    message = str(exc) or type(exc).__name__
    if status == 503 and not isinstance(exc, HttpError):
        message = f"the job store (Redis) does not answer; retry shortly ({message})"
    body = error_body(status, message, getattr(exc, "field", None))
    refusal = getattr(exc, "code", None)
    if isinstance(refusal, str):  # a promotion refusal: its own code (no_verdict, expired, ...)
        body["error"]["code"] = refusal
    return JSONResponse(body, status, headers)


Endpoint = Callable[[Request], Awaitable[Response]]


def _json_errors(endpoint: Endpoint) -> Endpoint:
    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ClientDisconnect:
            # The client left mid-body: nothing was done, and nobody reads this answer.
            return Response(status_code=400)
        except Exception as exc:  # noqa: BLE001 - every error becomes a JSON status
            return error_response(exc)

    return guarded


def build_app(
    api: GatewayApi,
    authenticator: Authenticator,
    is_serving: Callable[[], bool] = lambda: True,
    limits: HttpLimits | None = None,
    extra_routes: Sequence[Route] = (),
) -> Starlette:
    """The gateway's ASGI app; `is_serving` says whether Redis answers (for /healthz); `extra_routes`
    are served beside the gateway's own (the model-serving API of gateway.serving)."""
    limits = limits or HttpLimits()

    def caller(request: Request) -> Principal:
        return authenticator.authenticate(request.headers.get("authorization"))

    async def submit(request: Request) -> Response:
        principal = caller(request)  # before the body: a stranger's upload is not read
        body = await read_body(request, limits)

        def create() -> Job:
            return api.submit(parse_job_spec(parse_json(body)), principal)

        return JSONResponse(to_dict(await run_in_threadpool(create)), 201)

    async def list_jobs(request: Request) -> Response:
        principal = caller(request)
        query = request.query_params
        limit = _int_param(query.get("limit", "50"), "limit")
        page = await run_in_threadpool(
            api.list_jobs, principal, limit, query.get("cursor", ""), query.get("owner")
        )
        return JSONResponse({"jobs": page.ids, "next_cursor": page.next_cursor or None})

    async def get_job(request: Request) -> Response:
        principal = caller(request)
        job = await run_in_threadpool(api.get, request.path_params["job_id"], principal)
        return JSONResponse(to_dict(job))

    async def watch_job(request: Request) -> Response:
        principal = caller(request)
        watch = await run_in_threadpool(api.open_watch, request.path_params["job_id"], principal)
        return WatchResponse(watch, api.poll_s)

    async def list_policies(request: Request) -> Response:
        policies = await run_in_threadpool(api.list_policies, caller(request))
        return JSONResponse({"policies": [to_dict(p) for p in policies]})

    async def get_policy(request: Request) -> Response:
        policy = await run_in_threadpool(api.get_policy, request.path_params["version"], caller(request))
        return JSONResponse(to_dict(policy))

    async def list_deployments(request: Request) -> Response:
        deployments = await run_in_threadpool(api.list_deployments, caller(request))
        return JSONResponse({"deployments": [to_dict(d) for d in deployments]})

    async def get_deployment(request: Request) -> Response:
        deployment = await run_in_threadpool(api.get_deployment, request.path_params["name"], caller(request))
        return JSONResponse(to_dict(deployment))

    async def deployment_action(request: Request) -> Response:
        """POST /v1/deployments/{name}/promote | approve | rollback, with a JSON body."""
        principal = caller(request)
        name, action = request.path_params["name"], request.path_params["action"]
        body = parse_json(await read_body(request, limits)) if action in DEPLOYMENT_ACTIONS else None
        if body is None:
            raise HttpError(404, f"no action {action!r}; a deployment takes {', '.join(DEPLOYMENT_ACTIONS)}")
        if not isinstance(body, dict):
            raise InvalidArgument("body", "must be a JSON object")

        def run() -> Any:
            if action == "promote":
                return api.promote(
                    name,
                    _str(body, "job_id"),
                    _str(body, "self_edit_id"),
                    _int(body, "run", 0),
                    _str(body, "alias", "production"),
                    principal,
                )
            if action == "approve":
                return api.approve(name, _str(body, "adapter_sha256"), _str(body, "comment", ""), principal)
            return api.rollback(name, _str(body, "alias", "production"), _int(body, "version"), principal)

        result = await run_in_threadpool(run)
        return JSONResponse(to_dict(result), 202 if action == "promote" else 200)

    async def kill_switch(request: Request) -> Response:
        principal = caller(request)
        if request.method == "GET":
            return JSONResponse(to_dict(await run_in_threadpool(api.get_kill_switch, principal)))
        body = parse_json(await read_body(request, limits))
        if not isinstance(body, dict) or not isinstance(body.get("on"), bool):
            raise InvalidArgument("on", 'the body must be {"on": true|false, "reason": "..."}')
        state = await run_in_threadpool(api.set_kill_switch, body["on"], _str(body, "reason", ""), principal)
        return JSONResponse(to_dict(state))

    async def healthz(request: Request) -> Response:
        switch = await run_in_threadpool(api.kill_switch_state)
        if is_serving():
            return JSONResponse({"status": "serving", "kill_switch": switch})
        return JSONResponse({"status": "not_serving", "kill_switch": switch}, 503)

    async def route_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = (
                f"no route {request.method} {request.url.path}; the API is /v1/jobs, /v1/jobs/<id>, "
                "/v1/policies and, where this gateway serves models, /v1/models, /v1/chat/completions "
                "and /v1/completions"
            )
        elif exc.status_code == 405:
            message = (
                f"{request.url.path} does not take {request.method}; it takes {exc.headers.get('Allow', '')}"
            )
        else:
            message = str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), exc.status_code, exc.headers)

    async def jobs(request: Request) -> Response:
        return await (submit if request.method == "POST" else list_jobs)(request)

    routes = [
        Route("/v1/jobs", _json_errors(jobs), methods=["GET", "POST"]),
        Route("/v1/jobs/{job_id}", _json_errors(get_job), methods=["GET"]),
        Route("/v1/jobs/{job_id}/watch", _json_errors(watch_job), methods=["GET"]),
        Route("/v1/policies", _json_errors(list_policies), methods=["GET"]),
        Route("/v1/policies/{version}", _json_errors(get_policy), methods=["GET"]),
        Route("/v1/deployments", _json_errors(list_deployments), methods=["GET"]),
        Route("/v1/deployments/{name}", _json_errors(get_deployment), methods=["GET"]),
        Route("/v1/deployments/{name}/{action}", _json_errors(deployment_action), methods=["POST"]),
        Route("/v1/kill-switch", _json_errors(kill_switch), methods=["GET", "PUT"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", _AsgiEndpoint(make_asgi_app()), methods=["GET"]),
        *extra_routes,
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Redis calls run in anyio's worker threads: let every admitted request have one.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, limits.max_concurrency + 8)
        yield

    app = Starlette(routes=routes, exception_handlers={HTTPException: route_error}, lifespan=lifespan)
    app.add_middleware(ConcurrencyLimit, limit=limits.max_concurrency, wait_s=limits.queue_wait_s)
    return app


DEPLOYMENT_ACTIONS = ("promote", "approve", "rollback")


def _str(body: dict[str, Any], name: str, default: str | None = None) -> str:
    value = body.get(name, default)
    if not isinstance(value, str) or (default is None and not value):
        raise InvalidArgument(
            name, f"must be a {'non-empty ' if default is None else ''}string, got {value!r}"
        )
    return value


def _int(body: dict[str, Any], name: str, default: int | None = None) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(name, f"must be a non-negative integer, got {value!r}")
    return value


def _int_param(raw: str, name: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgument(name, f"must be an integer, got {raw!r}") from None


async def read_body(request: Request, limits: HttpLimits) -> bytes:
    """The whole body, refused past max_body_bytes (413) or read_timeout_s (408)."""
    declared = request.headers.get("content-length")  # h11 has checked it is a non-negative integer
    if declared is not None and int(declared) > limits.max_body_bytes:
        raise _too_large(int(declared), limits)

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise _too_large(size, limits)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), limits.read_timeout_s)
    except asyncio.TimeoutError:
        raise HttpError(
            408,
            f"the body did not arrive within {limits.read_timeout_s:g} s; "
            "send all the bytes that Content-Length announces",
            "body",
        ) from None


def _too_large(size: int, limits: HttpLimits) -> HttpError:
    return HttpError(413, f"body is {size} bytes or more; the limit is {limits.max_body_bytes}", "body")


def parse_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument("body", f"is not valid UTF-8 (byte {exc.start}); send UTF-8 JSON") from None
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError as exc:
        raise InvalidArgument("body", f"is not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidArgument("body", "is nested too deeply to be a job") from None


def _sse(job: Job) -> bytes:
    return b"event: job\ndata: " + json.dumps(to_dict(job)).encode() + b"\n\n"


class WatchResponse(StreamingResponse):
    """Server-sent events of one JobWatch, polled from the event loop (no thread per watcher); the
    watcher slot is given back however the stream ends (finished, client gone, shutdown)."""

    def __init__(self, watch: JobWatch, poll_s: float) -> None:
        self.watch, self.poll_s = watch, poll_s
        super().__init__(
            self._events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(self) -> AsyncIterator[bytes]:
        yield _sse(self.watch.job)
        quiet_s = 0.0
        while not self.watch.finished:
            await asyncio.sleep(self.poll_s)
            job = await run_in_threadpool(self.watch.poll)
            if job is not None:
                quiet_s = 0.0
                yield _sse(job)
            else:
                quiet_s += self.poll_s
                if quiet_s >= HEARTBEAT_S:
                    quiet_s = 0.0
                    yield b": still watching\n\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.watch.close()


class _AsgiEndpoint:
    """Lets a plain ASGI callable (prometheus_client's app) serve one Route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class ConcurrencyLimit:
    """At most `limit` requests in flight; the next ones wait `wait_s` for a turn, then get 503.
    Watch streams (bounded by max_watchers), /healthz and /metrics do not count, so health answers
    under load."""

    def __init__(self, app: ASGIApp, limit: int, wait_s: float) -> None:
        self.app, self.limit, self.wait_s = app, limit, wait_s
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in ("/healthz", "/metrics") or path.endswith("/watch"):
            await self.app(scope, receive, send)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.wait_s)
        except asyncio.TimeoutError:
            busy = HttpError(503, f"{self.limit} requests are in flight, the most this gateway serves; retry")
            await error_response(busy)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._slots.release()


# --- uvicorn in a thread -------------------------------------------------------------------------


class _Connection(h11.Connection):
    """Remembers why h11 refused a request, so the 400 can say what to fix."""

    last_error = ""

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.last_error = str(exc)
            raise


def protocol_class(read_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with JSON 400s and a deadline for the request head (an idle or
    trickling connection is closed after read_timeout_s instead of being held open)."""

    class JsonH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.conn = _Connection(h11.SERVER, self.conn._max_incomplete_event_size)  # same limits
            self._head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_head()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _watch_head(self) -> None:
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self._head_timer is None:
                self._head_timer = self.loop.call_later(read_timeout_s, self._head_timeout)
            elif not waiting and self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            reason = self.conn.last_error or "malformed request"
            message = f"malformed HTTP request ({reason}); Content-Length must be a non-negative integer"
            payload = json.dumps(error_body(400, message, "headers")).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ]
            # h11 is in its error state now, so the response is written by hand.
            head = b"HTTP/1.1 400 Bad Request\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
            self.transport.write(head + b"\r\n" + payload)
            self.transport.close()

    return JsonH11Protocol


@dataclass
class HttpServer:
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop accepting, let requests in flight finish (watch streams are cut after a few seconds)."""
        self.server.should_exit = True
        self.thread.join(timeout_s)


def start_http(app: ASGIApp, listen: str, limits: HttpLimits, start_timeout_s: float = 30.0) -> HttpServer:
    """Serve `app` on `listen` (host:port; port 0 picks one) from a thread; returns once it accepts."""
    host, _, port = listen.rpartition(":")
    family, _, _, _, address = socket.getaddrinfo(
        host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.create_server(address, family=family)  # bound here, so a taken port fails now
    config = uvicorn.Config(
        app,
        http=protocol_class(limits.read_timeout_s),
        lifespan="on",
        log_config=None,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
        # A backstop on connections; requests are bounded by ConcurrencyLimit with JSON errors.
        limit_concurrency=4 * limits.max_concurrency + 1024,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        sock.close()
        raise RuntimeError(f"the HTTP server did not start on {listen}")
    return HttpServer(server, thread, sock.getsockname()[1])
