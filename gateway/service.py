"""Gateway service: the front door (gRPC + HTTP/JSON) and the conductor (events worker)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from gateway.api import GatewayApi
from gateway.events import SigningKeys, auditor_key_fetcher, dead_letter_handler, event_handler
from gateway.http import start_http
from gateway.jobs import JobStore
from seal import convert
from seal.config import ServiceConfig
from seal.records import Job, JobSpec
from seal.runtime import connect_plane, make_worker
from seal.server import ServiceProcess
from seal.v1 import gateway_pb2, gateway_pb2_grpc


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, api: GatewayApi) -> None:
        self.api = api

    def SubmitJob(self, request: gateway_pb2.JobSpec, context: grpc.ServicerContext) -> Any:
        return _job_pb(self.api.submit(convert.from_pb(JobSpec, request)))

    def GetJob(self, request: gateway_pb2.GetJobRequest, context: grpc.ServicerContext) -> Any:
        return _job_pb(self.api.get(request.job_id))

    def WatchJob(self, request: gateway_pb2.GetJobRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        for job in self.api.watch(request.job_id, is_active=context.is_active):
            yield _job_pb(job)


def _job_pb(job: Job) -> gateway_pb2.Job:
    return convert.to_pb(job, gateway_pb2.Job)


def serve(config: ServiceConfig) -> ServiceProcess:
    """Composition root: job store, signing keys, workers on seal:events and seal:dead, gRPC, HTTP."""
    if not config.auditor_address:
        raise ValueError("the gateway needs --auditor-address to verify verdict signatures")
    plane = connect_plane(config)
    store = JobStore(plane)
    keys = SigningKeys(auditor_key_fetcher(config.auditor_address))
    api = GatewayApi(store, config.limits(), config.model)
    workers = [
        make_worker(config, plane, "events", event_handler(store, keys)),
        make_worker(config, plane, "dead", dead_letter_handler(store)),
    ]

    def register(server: grpc.Server) -> list[str]:
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(api), server)
        return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

    process = ServiceProcess("gateway", config.listen, register, workers)
    process.start()
    if config.http_listen:
        http = start_http(api, config.http_listen)
        process.on_stop.append(http.shutdown)
    return process
