"""What every service process shares: the gRPC server with health, reflection and one error
interceptor, its Redis workers on threads, and a graceful drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from seal import metrics
from seal.errors import status_of
from seal.killswitch import ADAPTATION_HEALTH
from seal.tls import TlsFiles, server_credentials
from seal.workplane import Worker

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns exceptions from servicers into gRPC status codes with their message."""

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return handler._replace(unary_unary=_guard(handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_guard_stream(handler.unary_stream))
        return handler


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    code, _ = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("request failed")
    context.abort(code, str(exc) or type(exc).__name__)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            _abort(context, exc)

    return wrapper


def _guard_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from fn(request, context)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)

    return wrapper


@dataclass
class ServiceProcess:
    """A gRPC server plus Redis workers, started and drained together."""

    name: str
    listen: str
    register: Callable[[grpc.Server], Iterable[str]]
    workers: list[Worker] = field(default_factory=list)
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    max_rpc_threads: int = 8
    on_bound: Callable[[int], None] | None = None
    """Called with the bound port before any worker starts (a worker may need its own address)."""
    tls: TlsFiles | None = None
    """Serve mutual TLS with these files (clients need a certificate from the same CA); None: plaintext."""
    metrics_listen: str = ""
    """Also serve Prometheus /metrics on this host:port; empty: none (the metrics are still kept)."""

    def start(self) -> int:
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_rpc_threads),
            interceptors=[ErrorInterceptor()],
            options=GRPC_OPTIONS,
        )
        names = list(self.register(self.server))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        if self.tls is None:
            self.port = self.server.add_insecure_port(self.listen)
        else:
            self.port = self.server.add_secure_port(self.listen, server_credentials(self.tls))
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.listen}")
        if self.on_bound is not None:
            self.on_bound(self.port)
        self.server.start()
        self.threads = [
            threading.Thread(target=w.run, args=(self.stop_event,), name=f"worker-{w.stream}", daemon=True)
            for w in self.workers
        ]
        for t in self.threads:
            t.start()
        self.on_stop.append(metrics.expose(self.name, self.metrics_listen, self.workers))
        for service in ["", *names]:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        switches = [w.paused for w in self.workers if w.paused is not None]
        if switches:
            threading.Thread(
                target=self._report_kill_switch, args=(switches[0],), name="kill-switch", daemon=True
            ).start()
        log.info("serving", extra={"service": self.name, "port": self.port, "workers": len(self.workers)})
        return self.port

    def _report_kill_switch(self, paused: Callable[[], bool]) -> None:
        """Health service seal.v1.Adaptation: NOT_SERVING while the kill switch stops this service's work."""
        while not self.stop_event.is_set():
            status = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if paused()
                else health_pb2.HealthCheckResponse.SERVING
            )
            self.health.set(ADAPTATION_HEALTH, status)
            self.stop_event.wait(1.0)

    def wait(self) -> None:
        """Block until SIGTERM/SIGINT (or stop()), then drain: finish current tasks, then stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        self.stop_event.wait()
        self.drain()

    def drain(self, grace_s: float = 10.0) -> None:
        log.info("draining", extra={"service": self.name})
        self.stop_event.set()
        self.health.enter_graceful_shutdown()
        for t in self.threads:
            t.join()
        self.server.stop(grace_s).wait()
        for callback in self.on_stop:
            callback()
        log.info("stopped", extra={"service": self.name})
