"""A typed client for the gateway's gRPC API: domain records in, domain records out."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from seal import convert
from seal.records import Job, JobSpec
from seal.server import GRPC_OPTIONS
from seal.v1 import gateway_pb2, gateway_pb2_grpc


class GatewayClient:
    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        self.channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.timeout_s = timeout_s

    def submit(self, spec: JobSpec) -> Job:
        reply = self.stub.SubmitJob(
            convert.to_pb(spec, gateway_pb2.JobSpec), timeout=self.timeout_s, wait_for_ready=True
        )
        return convert.from_pb(Job, reply)

    def get(self, job_id: str) -> Job:
        reply = self.stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id), timeout=self.timeout_s)
        return convert.from_pb(Job, reply)

    def watch(self, job_id: str) -> Iterator[Job]:
        for reply in self.stub.WatchJob(gateway_pb2.GetJobRequest(job_id=job_id)):
            yield convert.from_pb(Job, reply)

    def close(self) -> None:
        self.channel.close()
