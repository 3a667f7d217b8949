"""Gateway service: the front door (gRPC + HTTP/JSON) and the conductor (events worker)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import redis
from grpc_health.v1 import health_pb2

from gateway.api import GatewayApi, RedisProbe, WatcherSlots
from gateway.auth import Authenticator, BearerAuthInterceptor, add_intercepted_servicer, current_principal
from gateway.deployments import DeploymentStore
from gateway.events import dead_letter_handler, event_handler
from gateway.http import HttpLimits, build_app, start_http
from gateway.jobs import JobStore
from gateway.served import DeploymentModels, VLLMLoras
from gateway.serving import serving_routes
from seal import convert
from seal.auditlog import AuditLog
from seal.config import ServiceConfig
from seal.models import resolve_model
from seal.records import Job, JobSpec
from seal.registry import StudentRegistry
from seal.runtime import connect_plane, load_base_model, make_worker
from seal.server import ServiceProcess
from seal.signing import load_trusted_keys
from seal.tls import tls_files
from seal.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2
from student.client import fetch_registered


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, api: GatewayApi) -> None:
        self.api = api

    def SubmitJob(self, request: gateway_pb2.JobSpec, context: grpc.ServicerContext) -> Any:
        return _job_pb(self.api.submit(convert.from_pb(JobSpec, request), current_principal()))

    def GetJob(self, request: gateway_pb2.GetJobRequest, context: grpc.ServicerContext) -> Any:
        return _job_pb(self.api.get(request.job_id, current_principal()))

    def WatchJob(self, request: gateway_pb2.GetJobRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        for job in self.api.watch(request.job_id, current_principal(), is_active=context.is_active):
            yield _job_pb(job)

    def ListPolicies(self, request: gateway_pb2.ListPoliciesRequest, context: grpc.ServicerContext) -> Any:
        policies = self.api.list_policies(current_principal())
        return gateway_pb2.ListPoliciesResponse(
            policies=[convert.to_pb(p, types_pb2.PolicyVersion) for p in policies]
        )

    def GetPolicy(self, request: gateway_pb2.GetPolicyRequest, context: grpc.ServicerContext) -> Any:
        return convert.to_pb(
            self.api.get_policy(request.version, current_principal()), types_pb2.PolicyVersion
        )

    def Promote(self, request: gateway_pb2.PromoteRequest, context: grpc.ServicerContext) -> Any:
        version = self.api.promote(
            request.deployment,
            request.job_id,
            request.self_edit_id,
            request.run,
            request.alias,
            current_principal(),
        )
        return convert.to_pb(version, gateway_pb2.DeploymentVersion)

    def Approve(self, request: gateway_pb2.ApproveRequest, context: grpc.ServicerContext) -> Any:
        approval = self.api.approve(
            request.deployment, request.adapter_sha256, request.comment, current_principal()
        )
        return convert.to_pb(approval, gateway_pb2.Approval)

    def Rollback(self, request: gateway_pb2.RollbackRequest, context: grpc.ServicerContext) -> Any:
        deployment = self.api.rollback(
            request.deployment, request.alias, request.version, current_principal()
        )
        return convert.to_pb(deployment, gateway_pb2.Deployment)

    def ListDeployments(
        self, request: gateway_pb2.ListDeploymentsRequest, context: grpc.ServicerContext
    ) -> Any:
        deployments = self.api.list_deployments(current_principal())
        return gateway_pb2.ListDeploymentsResponse(
            deployments=[convert.to_pb(d, gateway_pb2.Deployment) for d in deployments]
        )

    def GetDeployment(self, request: gateway_pb2.GetDeploymentRequest, context: grpc.ServicerContext) -> Any:
        return convert.to_pb(
            self.api.get_deployment(request.name, current_principal()), gateway_pb2.Deployment
        )

    def SetKillSwitch(self, request: gateway_pb2.KillSwitch, context: grpc.ServicerContext) -> Any:
        state = self.api.set_kill_switch(request.on, request.reason, current_principal())
        return convert.to_pb(state, gateway_pb2.KillSwitch)

    def GetKillSwitch(self, request: gateway_pb2.GetKillSwitchRequest, context: grpc.ServicerContext) -> Any:
        return convert.to_pb(self.api.get_kill_switch(current_principal()), gateway_pb2.KillSwitch)


def _job_pb(job: Job) -> gateway_pb2.Job:
    return convert.to_pb(job, gateway_pb2.Job)


def serve(config: ServiceConfig) -> ServiceProcess:
    """Composition root: job store, trusted auditor keys, workers on seal:events and seal:dead, gRPC, HTTP."""
    tls = tls_files(config)  # first: a bad TLS setting fails before anything starts
    if not config.trusted_keys:
        raise ValueError(
            "the gateway needs --trusted-keys: a file of the auditor public keys whose verdicts it "
            "accepts (`seal keys KEY --trust FILE` makes a key and lists it)"
        )
    keys = load_trusted_keys(config.trusted_keys)
    plane = connect_plane(config)
    store = JobStore(plane, config.signoff_fraction)
    audit_log = AuditLog(plane.redis, plane.key(""))
    deployments = DeploymentStore(
        plane,
        store,
        keys,
        required_approvals=config.required_approvals,
        max_knowledge_drop=config.max_knowledge_drop,
        audit=lambda kind, actor, subject, body: audit_log.append(kind, actor, subject, body),
    )
    authenticator = Authenticator.from_config(config.api_tokens)
    api = GatewayApi(
        store, config.limits(), config.model, WatcherSlots(config.max_watchers), deployments=deployments
    )
    workers = [
        make_worker(config, plane, "events", event_handler(store, keys, deployments), pausable=False),
        make_worker(config, plane, "dead", dead_letter_handler(store, deployments), pausable=False),
    ]

    def register(server: grpc.Server) -> list[str]:
        add_intercepted_servicer(
            gateway_pb2_grpc.add_GatewayServicer_to_server,
            GatewayServicer(api),
            server,
            BearerAuthInterceptor(authenticator),
        )
        return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

    process = ServiceProcess(
        "gateway",
        config.listen,
        register,
        workers,
        metrics_listen=config.metrics_listen,
        tls=tls,
        # A gRPC watcher holds a thread: room for every watcher, and unary calls still get 8.
        max_rpc_threads=config.max_watchers + 8,
    )
    # Before anything starts: a vLLM server that cannot start fails the gateway, not its first request.
    serve_vllm = bool(config.http_listen) and config.serve_backend == "vllm"
    vllm = _vllm_loras(config, process) if serve_vllm else None
    process.start()
    probe = RedisProbe(_probe_client(config), on_change=_health_setter(process)).start()
    process.on_stop.append(probe.stop)
    if config.http_listen:
        limits = HttpLimits(
            config.http_max_body_bytes, config.http_read_timeout_s, config.http_max_concurrency
        )
        models = DeploymentModels(
            deployments,
            keys,
            base=lambda: load_base_model(config)[:2],
            vllm=vllm,
            fetch=lambda adapter: fetch_registered(
                StudentRegistry(plane),
                adapter,
                config.data_dir / "served-adapters",  # never pruned: a promoted adapter stays servable
                config.adapter_max_bytes,
                config.adapter_max_files,
                config.student_wait_s,
                tls=tls,
            ),
        )
        app = build_app(
            api,
            authenticator,
            lambda: probe.serving,
            limits,
            extra_routes=serving_routes(models, authenticator, limits),
        )
        http = start_http(app, config.http_listen, limits)
        process.on_stop.append(http.stop)
    return process


def _vllm_loras(config: ServiceConfig, process: ServiceProcess) -> VLLMLoras:
    """Versions served as LoRAs of a vLLM server: the one at --vllm-url, or one started here (and
    stopped with the process); prompts are still rendered and tokenized by our own tokenizer."""
    from transformers import AutoTokenizer

    from seal.vllm_server import engine_for

    model_dir = resolve_model(config.model)
    engine, stop_vllm = engine_for(config, model_dir)
    loras = VLLMLoras(
        engine,
        AutoTokenizer.from_pretrained(model_dir),
        config.data_dir / "served-loras",
        max_rank=config.max_directive_rank,
    )

    def stop() -> None:
        loras.close()
        stop_vllm()

    process.on_stop.append(stop)
    return loras


def _probe_client(config: ServiceConfig) -> redis.Redis:
    """A client of its own with short timeouts, so a Redis that hangs is found out within seconds."""
    return redis.Redis.from_url(config.redis_url, socket_timeout=2, socket_connect_timeout=2)


def _health_setter(process: ServiceProcess) -> Any:
    service = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name

    def set_health(serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", service):
            process.health.set(name, status)

    return set_health
