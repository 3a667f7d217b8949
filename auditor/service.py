"""Auditor service: scores adapters against τ, runs guardrails, signs verdicts (seal:audit worker
and AuditAdapter RPC), and publishes its verdict-signing key (GetSigningKey)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from auditor.core import audit
from auditor.evaluation import anchor_accuracy, evaluate_document
from auditor.grading import GRADING_METRICS
from auditor.signing import VerdictSigner
from seal import convert
from seal.config import ServiceConfig
from seal.errors import InvalidArgument, NotFound
from seal.records import (
    AdapterRef,
    Document,
    QuestionScore,
    SelfEdit,
    Verdict,
    from_dict,
    sha256_text,
    to_dict,
    to_json,
)
from seal.runtime import connect_plane, load_base_model, make_worker
from seal.server import ServiceProcess
from seal.v1 import auditor_pb2, auditor_pb2_grpc, types_pb2
from seal.validation import Limits, validate_document
from seal.workplane import Task, WorkPlane
from student.client import fetch_adapter

# Documents whose baseline answers are kept (a job's N + 1 adapters share one document's baseline).
BASELINE_CACHE_SIZE = 256


@dataclass
class AuditorEngine:
    model: Any
    tokenizer: Any
    base_fingerprint: str
    signer: VerdictSigner
    adapters_root: Path
    limits: Limits
    metric: str = "contains"
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Baseline answers depend only on the base model and the document: compute them once.
    _baselines: OrderedDict[str, list[QuestionScore]] = field(default_factory=OrderedDict)
    _anchor_before: float | None = None

    def audit(self, doc: Document, self_edit: SelfEdit, adapter: AdapterRef) -> Verdict:
        validate_document(doc, self.limits, "document")
        if adapter.base_fingerprint != self.base_fingerprint:
            raise InvalidArgument(
                "adapter.base_fingerprint",
                f"adapter was trained on base {adapter.base_fingerprint[:16]}…, this auditor serves "
                f"{self.base_fingerprint[:16]}…; run the auditor on the student's base model",
            )
        if adapter.self_edit_id != self_edit.id:
            raise InvalidArgument(
                "adapter.self_edit_id", f"is {adapter.self_edit_id!r}, self_edit.id is {self_edit.id!r}"
            )
        adapter_dir = fetch_adapter(adapter.student_address, adapter.sha256, self.adapters_root)
        with self.lock:
            baseline = self._baseline(doc)
            if self._anchor_before is None:
                self._anchor_before = anchor_accuracy(self.model, self.tokenizer)
            verdict = audit(
                self.model,
                self.tokenizer,
                doc,
                self_edit,
                adapter_dir,
                adapter.sha256,
                self.base_fingerprint,
                self_edit.job_id,
                baseline_scores=baseline,
                metric=self.metric,
                anchor_before=self._anchor_before,
            )
        return self.signer.sign(verdict)

    def _baseline(self, doc: Document) -> list[QuestionScore]:
        key = sha256_text(to_json(doc) + self.metric)
        if key not in self._baselines:
            self._baselines[key] = evaluate_document(self.model, self.tokenizer, doc, self.metric)
            if len(self._baselines) > BASELINE_CACHE_SIZE:  # a long-lived auditor sees endless documents
                self._baselines.popitem(last=False)
        self._baselines.move_to_end(key)
        return self._baselines[key]


class AuditorServicer(auditor_pb2_grpc.AuditorServicer):
    def __init__(self, engine: AuditorEngine) -> None:
        self.engine = engine

    def AuditAdapter(self, request: auditor_pb2.AuditAdapterRequest, context: grpc.ServicerContext) -> Any:
        for name in ("document", "self_edit", "adapter"):
            if not request.HasField(name):
                raise InvalidArgument(name, "is required")
        verdict = self.engine.audit(
            convert.from_pb(Document, request.document),
            convert.from_pb(SelfEdit, request.self_edit),
            convert.from_pb(AdapterRef, request.adapter),
        )
        return convert.to_pb(verdict, types_pb2.Verdict)

    def GetSigningKey(self, request: auditor_pb2.GetSigningKeyRequest, context: grpc.ServicerContext) -> Any:
        signer = self.engine.signer
        return auditor_pb2.SigningKey(
            key_id=signer.key_id, public_key=signer.public_key_bytes(), algorithm="ed25519"
        )


def load_document(plane: WorkPlane, job_id: str, doc_index: int) -> Document:
    """τ for one document of a job, as the gateway stored it (only the auditor reads it)."""
    raw = plane.redis.get(plane.key("tau", job_id))
    if raw is None:
        raise NotFound(f"no τ stored for job {job_id!r}")
    documents = json.loads(raw)
    if not 0 <= doc_index < len(documents):
        raise NotFound(f"job {job_id!r} has no document {doc_index}")
    return from_dict(Document, documents[doc_index])


def audit_handler(engine: AuditorEngine, plane: WorkPlane) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def handle(payload: dict[str, Any]) -> dict[str, Any]:
        self_edit = from_dict(SelfEdit, payload["self_edit"])
        doc = load_document(plane, self_edit.job_id, self_edit.doc_index)
        verdict = engine.audit(doc, self_edit, from_dict(AdapterRef, payload["adapter"]))
        return {"verdict": to_dict(verdict)}

    return handle


def audit_followups(payload: dict[str, Any], result: dict[str, Any]) -> list[Task]:
    verdict = result["verdict"]
    event = {
        "type": "verdict",
        "job_id": verdict["job_id"],
        "self_edit_id": verdict["self_edit_id"],
        "verdict": verdict,
    }
    return [Task("events", f"verdict/{verdict['self_edit_id']}", event)]


def serve(config: ServiceConfig) -> ServiceProcess:
    """Composition root: load the base model and signing key, start gRPC and the seal:audit worker."""
    if config.grading_metric not in GRADING_METRICS:
        raise ValueError(
            f"grading_metric must be one of {', '.join(GRADING_METRICS)}, got {config.grading_metric!r}"
        )
    model, tokenizer, _, fingerprint = load_base_model(config)
    signer = VerdictSigner.load_or_create(config.data_dir / "auditor-ed25519.key")
    engine = AuditorEngine(
        model,
        tokenizer,
        fingerprint,
        signer,
        config.data_dir / "adapters",
        config.limits(),
        metric=config.grading_metric,
    )
    plane = connect_plane(config)
    worker = make_worker(config, plane, "audit", audit_handler(engine, plane), audit_followups)

    def register(server: grpc.Server) -> list[str]:
        auditor_pb2_grpc.add_AuditorServicer_to_server(AuditorServicer(engine), server)
        return [auditor_pb2.DESCRIPTOR.services_by_name["Auditor"].full_name]

    process = ServiceProcess("auditor", config.listen, register, [worker])
    process.start()
    return process
