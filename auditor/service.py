"""Auditor service: scores adapters against τ, runs guardrails, signs verdicts (seal:audit worker
and AuditAdapter RPC), and publishes its verdict-signing key (GetSigningKey)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from auditor.certify import RetentionProbe, certify
from auditor.core import Retention, audit, base_retention, check_grading_metric
from auditor.evaluation import VLLMModel, evaluate_document
from auditor.guardrails import MAX_KL, MAX_RETENTION_DROP
from auditor.judge import Judge, LLMJudge, RedisJudgeCache, resolve_api_key
from seal import convert, metrics
from seal.config import ServiceConfig
from seal.errors import InvalidArgument, NotFound
from seal.records import (
    AdapterRef,
    Audited,
    AuditResult,
    AuditTask,
    Certificate,
    Certified,
    CertifyResult,
    CertifyTask,
    Document,
    Event,
    QuestionScore,
    SelfEdit,
    Verdict,
    from_dict,
    sha256_text,
    to_json,
)
from seal.registry import StudentRegistry
from seal.runtime import connect_plane, load_base_model, make_worker
from seal.server import ServiceProcess
from seal.signing import VerdictSigner
from seal.tasks import decode, encode, run_task_id
from seal.tls import TlsFiles, tls_files
from seal.v1 import auditor_pb2, auditor_pb2_grpc, types_pb2
from seal.validation import Limits, validate_document
from seal.workplane import Task, WorkPlane
from student.artifacts import prune_adapters
from student.client import fetch_registered

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
    plane: WorkPlane
    metric: str = "contains"
    verdict_ttl_s: float = 30 * 24 * 3600.0
    adapter_max_bytes: int = 512 * 1024 * 1024
    adapter_max_files: int = 8
    student_wait_s: float = 600.0
    retention: int = 0
    """Fetched adapters kept on disk, oldest pruned first (0 keeps all)."""
    tls: TlsFiles | None = None
    """mTLS files for fetching adapters from students; None: plaintext."""
    judge: Judge | None = None
    """LLM judge grading every τ answer beside the metric; None: deterministic grading only."""
    answer_style: str = "chat"
    """How τ is asked: chat or reference (auditor.evaluation)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Baseline answers depend only on the base model and the document: compute them once.
    _baselines: OrderedDict[str, list[QuestionScore]] = field(default_factory=OrderedDict)
    max_retention_drop: float = MAX_RETENTION_DROP
    retention_questions: int = 0
    """Retention questions each audit and certificate asks: the first N of the set; 0: all."""
    max_kl: float = MAX_KL
    _retention: Retention | None = None
    vllm: Any = None
    """A seal.vllm_server.VLLMEngine serving this same base: every question is answered there (audits
    run concurrently, the engine batching them); None: the transformers model answers, one audit at a time."""
    cache_lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards the base-side caches when audits run concurrently (taken before `lock`, never after)."""

    @property
    def asker(self) -> Any:
        """What answers questions: the transformers model, or its twin on vLLM."""
        return self.model if self.vllm is None else VLLMModel(self.vllm)

    def audit(self, self_edit: SelfEdit, adapter: AdapterRef, reward_only: bool = False) -> Verdict:
        """Score `adapter` on the questions the gateway registered for the self-edit's job and sign it;
        `reward_only` skips the forgetting guardrails (a policy-training round's E-step)."""
        doc = load_document(self.plane, self_edit.job_id, self_edit.doc_index)
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
        adapter_dir = fetch_registered(
            StudentRegistry(self.plane),
            adapter,
            self.adapters_root,
            self.adapter_max_bytes,
            self.adapter_max_files,
            self.student_wait_s,
            tls=self.tls,
        )
        # On transformers one audit holds the model throughout; on vLLM audits answer side by side and
        # take the model's lock only for the KL shift.
        with self.lock if self.vllm is None else self.cache_lock:
            baseline = self._baseline(doc)
            signoff = (
                self._baseline(
                    dataclasses.replace(doc, questions=doc.signoff_questions, signoff_questions=())
                )
                if doc.signoff_questions
                else None
            )
            retention = None if reward_only else self._base_retention()
        with self.lock if self.vllm is None else contextlib.nullcontext():
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
                signoff_baseline=signoff,
                metric=self.metric,
                retention=retention,
                judge=self.judge,
                answer_style=self.answer_style,
                vllm_base=None if self.vllm is None else VLLMModel(self.vllm),
                model_lock=self.lock if self.vllm is not None else None,
                reward_only=reward_only,
            )
            prune_adapters(self.adapters_root, self.retention)  # copies: the student keeps the original
        return self.signer.sign(verdict, ttl_s=self.verdict_ttl_s)

    def certify(self, task: CertifyTask) -> Certificate:
        """Build the deployment version of `task` (every layer fetched from a registered student and
        verified), re-check it on every learned document and on retention, and sign the certificate."""
        if task.base_fingerprint != self.base_fingerprint:
            raise InvalidArgument(
                "base_fingerprint",
                f"the version is on base {task.base_fingerprint[:16]}…, this auditor serves {self.base_fingerprint[:16]}…",
            )
        dirs = [
            fetch_registered(
                StudentRegistry(self.plane),
                layer,
                self.adapters_root,
                self.adapter_max_bytes,
                self.adapter_max_files,
                self.student_wait_s,
                tls=self.tls,
            )
            for layer in task.layers
        ]
        with self.lock:
            certificate = certify(
                self.model,
                self.tokenizer,
                task.deployment,
                task.version,
                task.fingerprint,
                self.base_fingerprint,
                dirs,
                [layer.sha256 for layer in task.layers],
                task.documents,
                metric=self.metric,
                answer_style=self.answer_style,
                retention=self._retention_probe(),
                gates=[doc.gate() for doc in task.documents],
            )
        return self.signer.sign_certificate(certificate, ttl_s=self.verdict_ttl_s)

    def _base_retention(self) -> Retention:
        """The base's retention accuracy and KL continuations, computed once (under self.lock)."""
        if self._retention is None:
            with self.lock if self.vllm is not None else contextlib.nullcontext():
                self._retention = base_retention(
                    self.model,
                    self.tokenizer,
                    self.answer_style,
                    self.max_retention_drop,
                    self.max_kl,
                    vllm_base=None if self.vllm is None else VLLMModel(self.vllm),
                    questions=self.retention_questions,
                )
        return self._retention

    def _retention_probe(self) -> RetentionProbe:
        return RetentionProbe(self._base_retention(), self.answer_style)

    def _baseline(self, doc: Document) -> list[QuestionScore]:
        judge_model = self.judge.model if self.judge is not None else ""
        key = sha256_text(json.dumps([to_json(doc), self.metric, self.answer_style, judge_model]))
        if key not in self._baselines:
            self._baselines[key] = evaluate_document(
                self.asker, self.tokenizer, doc, self.metric, style=self.answer_style, judge=self.judge
            )
            if len(self._baselines) > BASELINE_CACHE_SIZE:  # a long-lived auditor sees endless documents
                self._baselines.popitem(last=False)
        self._baselines.move_to_end(key)
        return self._baselines[key]


class AuditorServicer(auditor_pb2_grpc.AuditorServicer):
    def __init__(self, engine: AuditorEngine) -> None:
        self.engine = engine

    def AuditAdapter(self, request: auditor_pb2.AuditAdapterRequest, context: grpc.ServicerContext) -> Any:
        for name in ("self_edit", "adapter"):
            if not request.HasField(name):
                raise InvalidArgument(name, "is required")
        verdict = self.engine.audit(
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


def audit_handler(engine: AuditorEngine) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def handle(payload: dict[str, Any]) -> dict[str, Any]:
        task = decode(AuditTask, payload)
        if task.self_edit is None or task.adapter is None:
            raise InvalidArgument("payload", "an audit task needs its self_edit and adapter")
        verdict = engine.audit(task.self_edit, task.adapter, reward_only=task.reward_only)
        metrics.verdict_signed(verdict.passed)
        return encode(AuditResult(verdict=verdict))

    return handle


def audit_followups(payload: dict[str, Any], result: dict[str, Any]) -> list[Task]:
    task = decode(AuditTask, payload)
    verdict = decode(AuditResult, result).verdict
    assert verdict is not None  # handle() always stores one
    audited = Audited(self_edit_id=verdict.self_edit_id, verdict=verdict, run=task.run)
    event = Event(job_id=verdict.job_id, audited=audited)
    # The run is in the id: two runs of one self-edit are two verdicts, never one deduplicated event.
    return [Task("events", f"verdict/{run_task_id(verdict.self_edit_id, task.run)}", encode(event))]


def certify_handler(engine: AuditorEngine) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def handle(payload: dict[str, Any]) -> dict[str, Any]:
        return encode(CertifyResult(certificate=engine.certify(decode(CertifyTask, payload))))

    return handle


def certify_followups(payload: dict[str, Any], result: dict[str, Any]) -> list[Task]:
    certificate = decode(CertifyResult, result).certificate
    assert certificate is not None  # handle() always stores one
    event = Event(job_id=f"deployment:{certificate.deployment}", certified=Certified(certificate=certificate))
    return [Task("events", f"certified/{certificate.deployment}/{certificate.version}", encode(event))]


def build_judge(config: ServiceConfig, api_key: str, plane: WorkPlane) -> LLMJudge | None:
    """The configured LLM judge, its grades cached in Redis; None when no judge is configured."""
    if not config.judge_base_url:
        return None
    cache = RedisJudgeCache(plane.redis, plane.key("judge-cache"))
    return LLMJudge(config.judge_base_url, config.judge_model, api_key, cache=cache)


def serve(config: ServiceConfig) -> ServiceProcess:
    """Composition root: load the base model and signing key, start gRPC and the seal:audit worker."""
    check_grading_metric(config.grading_metric, judge_configured=bool(config.judge_base_url))
    # Before the model loads: a bad TLS setting or an unreadable key file fails fast.
    tls = tls_files(config)
    judge_key = resolve_api_key(config.judge_api_key_file, os.environ) if config.judge_base_url else ""
    model, tokenizer, model_dir, fingerprint = load_base_model(config)
    vllm, stop_vllm = (None, None)
    if config.answer_backend == "vllm":
        from seal.vllm_server import engine_for

        vllm, stop_vllm = engine_for(config, model_dir)
    signer = VerdictSigner.load_or_create(Path(config.signing_key or config.data_dir / "auditor-ed25519.key"))
    plane = connect_plane(config)
    engine = AuditorEngine(
        model,
        tokenizer,
        fingerprint,
        signer,
        config.data_dir / "adapters",
        config.limits(),
        plane,
        metric=config.grading_metric,
        verdict_ttl_s=config.verdict_ttl_s,
        adapter_max_bytes=config.adapter_max_bytes,
        adapter_max_files=config.adapter_max_files,
        student_wait_s=config.student_wait_s,
        retention=config.adapter_retention,
        tls=tls,
        judge=build_judge(config, judge_key, plane),
        answer_style=config.answer_prompt,
        max_retention_drop=config.max_retention_drop,
        retention_questions=config.retention_questions,
        max_kl=config.max_kl,
        vllm=vllm,
    )
    # Several audit workers only pay off where answering runs outside the model lock (vLLM).
    workers = [
        make_worker(config, plane, "audit", audit_handler(engine), audit_followups)
        for _ in range(config.audit_workers if vllm is not None else 1)
    ]
    for i, w in enumerate(workers[1:], start=1):
        w.consumer = f"{w.consumer}-{i}"
    certifier = make_worker(config, plane, "certify", certify_handler(engine), certify_followups)

    def register(server: grpc.Server) -> list[str]:
        auditor_pb2_grpc.add_AuditorServicer_to_server(AuditorServicer(engine), server)
        return [auditor_pb2.DESCRIPTOR.services_by_name["Auditor"].full_name]

    process = ServiceProcess(
        "auditor",
        config.listen,
        register,
        [*workers, certifier],
        metrics_listen=config.metrics_listen,
        tls=tls,
    )
    if stop_vllm is not None:
        process.on_stop.append(stop_vllm)
    process.start()
    return process
