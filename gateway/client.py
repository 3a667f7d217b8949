"""A typed client for the gateway's gRPC API: domain records in, domain records out."""

from __future__ import annotations

from collections.abc import Iterator

from seal import convert
from seal.records import Approval, Deployment, DeploymentVersion, Job, JobSpec, KillSwitch, PolicyVersion
from seal.server import GRPC_OPTIONS
from seal.tls import TlsFiles, channel
from seal.v1 import gateway_pb2, gateway_pb2_grpc


class GatewayClient:
    """`token` is an API bearer token, sent as `authorization: Bearer <token>` metadata on every
    call; leave it empty for a gateway with an open API."""

    def __init__(
        self, address: str, timeout_s: float = 30.0, token: str = "", tls: TlsFiles | None = None
    ) -> None:
        self.channel = channel(address, tls, options=GRPC_OPTIONS)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def submit(self, spec: JobSpec) -> Job:
        reply = self.stub.SubmitJob(
            convert.to_pb(spec, gateway_pb2.JobSpec),
            timeout=self.timeout_s,
            wait_for_ready=True,
            metadata=self.metadata,
        )
        return convert.from_pb(Job, reply)

    def get(self, job_id: str) -> Job:
        reply = self.stub.GetJob(
            gateway_pb2.GetJobRequest(job_id=job_id), timeout=self.timeout_s, metadata=self.metadata
        )
        return convert.from_pb(Job, reply)

    def watch(self, job_id: str) -> Iterator[Job]:
        for reply in self.stub.WatchJob(gateway_pb2.GetJobRequest(job_id=job_id), metadata=self.metadata):
            yield convert.from_pb(Job, reply)

    def list_policies(self) -> list[PolicyVersion]:
        reply = self.stub.ListPolicies(
            gateway_pb2.ListPoliciesRequest(), timeout=self.timeout_s, metadata=self.metadata
        )
        return [convert.from_pb(PolicyVersion, p) for p in reply.policies]

    def get_policy(self, version: str) -> PolicyVersion:
        reply = self.stub.GetPolicy(
            gateway_pb2.GetPolicyRequest(version=version), timeout=self.timeout_s, metadata=self.metadata
        )
        return convert.from_pb(PolicyVersion, reply)

    def _call(self, method: str, request: object) -> object:
        return getattr(self.stub, method)(request, timeout=self.timeout_s, metadata=self.metadata)

    def promote(
        self, deployment: str, job_id: str, self_edit_id: str, run: int = 0, alias: str = ""
    ) -> DeploymentVersion:
        request = gateway_pb2.PromoteRequest(
            deployment=deployment, job_id=job_id, self_edit_id=self_edit_id, run=run, alias=alias
        )
        return convert.from_pb(DeploymentVersion, self._call("Promote", request))  # type: ignore[arg-type]

    def approve(self, deployment: str, adapter_sha256: str, comment: str = "") -> Approval:
        request = gateway_pb2.ApproveRequest(
            deployment=deployment, adapter_sha256=adapter_sha256, comment=comment
        )
        return convert.from_pb(Approval, self._call("Approve", request))  # type: ignore[arg-type]

    def rollback(self, deployment: str, version: int, alias: str = "production") -> Deployment:
        request = gateway_pb2.RollbackRequest(deployment=deployment, alias=alias, version=version)
        return convert.from_pb(Deployment, self._call("Rollback", request))  # type: ignore[arg-type]

    def list_deployments(self) -> list[Deployment]:
        reply = self._call("ListDeployments", gateway_pb2.ListDeploymentsRequest())
        return [convert.from_pb(Deployment, d) for d in reply.deployments]  # type: ignore[attr-defined]

    def get_deployment(self, name: str) -> Deployment:
        reply = self._call("GetDeployment", gateway_pb2.GetDeploymentRequest(name=name))
        return convert.from_pb(Deployment, reply)  # type: ignore[arg-type]

    def set_kill_switch(self, on: bool, reason: str = "") -> KillSwitch:
        reply = self._call("SetKillSwitch", gateway_pb2.KillSwitch(on=on, reason=reason))
        return convert.from_pb(KillSwitch, reply)  # type: ignore[arg-type]

    def get_kill_switch(self) -> KillSwitch:
        reply = self._call("GetKillSwitch", gateway_pb2.GetKillSwitchRequest())
        return convert.from_pb(KillSwitch, reply)  # type: ignore[arg-type]

    def close(self) -> None:
        self.channel.close()
