"""Student service: applies self-edits as LoRA updates (seal:apply worker and ApplySelfEdit RPC) and
serves the adapters' bytes to other hosts (FetchAdapter)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from seal import convert
from seal.config import ServiceConfig
from seal.errors import InvalidArgument, NotFound
from seal.records import AdapterRef, ApplyResult, ApplyTask, AuditTask, Event, SelfEdit, Trained
from seal.registry import StudentRegistry, student_id_for
from seal.runtime import connect_plane, load_base_model, make_worker
from seal.server import ServiceProcess
from seal.tasks import decode, encode, run_task_id
from seal.tls import tls_files
from seal.v1 import student_pb2, student_pb2_grpc, types_pb2
from seal.validation import Limits, validate_lora, validate_passage
from seal.workplane import Task
from student.artifacts import adapter_path, iter_adapter_chunks, list_adapters, prune_adapters
from student.core import apply_self_edit, apply_self_edits
from student.sequences import build_training_texts
from student.training import tokenize_texts

log = logging.getLogger(__name__)


@dataclass
class StudentEngine:
    """One base model shared by RPCs and the worker; a lock makes updates take turns."""

    model: Any
    tokenizer: Any
    base_model_name: str
    base_fingerprint: str
    adapters_root: Path
    limits: Limits
    student_id: str = ""
    max_train_tokens: int = 2_000_000
    retention: int = 0
    registry: StudentRegistry | None = None
    # The base's compute dtype when updates train together (student.multi.COMPUTE_DTYPES).
    compute_dtype: str = "float32"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def apply(
        self, self_edit: SelfEdit, on_step: Callable[[int, float], None] | None = None, run: int = 0
    ) -> AdapterRef:
        validate_passage(self_edit.passage.title, self_edit.passage.context, self.limits, "self_edit.passage")
        validate_lora(self_edit.lora, "self_edit.lora")
        self.check_budget(self_edit)
        with self.lock:
            adapter = apply_self_edit(
                self.model,
                self.tokenizer,
                self_edit,
                base_model_name=self.base_model_name,
                base_fingerprint=self.base_fingerprint,
                adapters_root=self.adapters_root,
                student_id=self.student_id,
                on_step=on_step,
                run=run,
            )
            self.prune()
        if self.registry is not None:
            self.registry.add_holder(adapter.sha256, self.student_id)
        return adapter

    def apply_many(self, updates: Sequence[tuple[SelfEdit, int]]) -> list[AdapterRef]:
        """Apply several (self-edit, run) pairs with their LoRAs trained together in one batched pass
        (student.multi); adapters in the order given. Every update is checked before any trains."""
        for i, (self_edit, _) in enumerate(updates):
            name = f"updates[{i}].self_edit"
            validate_passage(
                self_edit.passage.title, self_edit.passage.context, self.limits, f"{name}.passage"
            )
            validate_lora(self_edit.lora, f"{name}.lora")
            self.check_budget(self_edit, name)
        with self.lock:
            adapters = apply_self_edits(
                self.model,
                self.tokenizer,
                updates,
                base_model_name=self.base_model_name,
                base_fingerprint=self.base_fingerprint,
                adapters_root=self.adapters_root,
                student_id=self.student_id,
                compute_dtype=self.compute_dtype,
            )
            self.prune()
        if self.registry is not None:
            for adapter in adapters:
                self.registry.add_holder(adapter.sha256, self.student_id)
        return adapters

    def prune(self) -> None:
        for sha in prune_adapters(self.adapters_root, self.retention):
            if self.registry is not None:
                self.registry.remove_holder(sha, self.student_id)

    def check_budget(self, self_edit: SelfEdit, name: str = "self_edit") -> None:
        """Refuse an update whose compute (epochs x training tokens) exceeds the configured budget."""
        sequences = tokenize_texts(
            self.tokenizer, build_training_texts(self_edit), self_edit.lora.max_seq_len
        )
        cost = self_edit.lora.epochs * sum(len(s) for s in sequences)
        if cost > self.max_train_tokens:
            raise InvalidArgument(
                f"{name}.lora.epochs",
                f"this update costs {cost} token-epochs ({self_edit.lora.epochs} epochs x "
                f"{cost // self_edit.lora.epochs} tokens), over this student's budget of "
                f"{self.max_train_tokens}; use fewer epochs or a shorter self-edit",
            )

    def adapter_dir(self, sha256: str) -> Path:
        try:
            path = adapter_path(self.adapters_root, sha256)
        except ValueError as exc:
            raise InvalidArgument("sha256", str(exc)) from None
        if not path.is_dir():
            raise NotFound(f"no adapter {sha256} on this student")
        return path


class StudentServicer(student_pb2_grpc.StudentServicer):
    def __init__(self, engine: StudentEngine) -> None:
        self.engine = engine

    def ApplySelfEdit(self, request: student_pb2.ApplySelfEditRequest, context: grpc.ServicerContext) -> Any:
        if not request.HasField("self_edit"):
            raise InvalidArgument("self_edit", "is required")
        adapter = self.engine.apply(convert.from_pb(SelfEdit, request.self_edit))
        return convert.to_pb(adapter, types_pb2.AdapterRef)

    def FetchAdapter(
        self, request: student_pb2.FetchAdapterRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        path = self.engine.adapter_dir(request.sha256)
        for filename, offset, data in iter_adapter_chunks(path):
            yield student_pb2.AdapterChunk(filename=filename, offset=offset, data=data)


def apply_handler(engine: StudentEngine) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def handle(payload: dict[str, Any]) -> dict[str, Any]:
        task = decode(ApplyTask, payload)
        return encode(ApplyResult(adapter=engine.apply(_required(task.self_edit), run=task.run)))

    return handle


def apply_batch_handler(engine: StudentEngine) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Several apply tasks at once: their adapters train together in one batched pass (apply_many)."""

    def handle(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        tasks = [decode(ApplyTask, payload) for payload in payloads]
        adapters = engine.apply_many([(_required(task.self_edit), task.run) for task in tasks])
        return [encode(ApplyResult(adapter=adapter)) for adapter in adapters]

    return handle


def apply_followups(payload: dict[str, Any], result: dict[str, Any]) -> list[Task]:
    """Tell the gateway the adapter was trained, and hand it to the auditor."""
    task = decode(ApplyTask, payload)
    se = _required(task.self_edit)
    adapter = decode(ApplyResult, result).adapter
    event = Event(job_id=se.job_id, trained=Trained(self_edit_id=se.id, adapter=adapter, run=task.run))
    run_id = run_task_id(se.id, task.run)
    # The event first: the gateway must know the adapter before the auditor's verdict names it.
    return [
        Task("events", f"trained/{run_id}", encode(event)),
        Task(
            "audit",
            run_id,
            encode(AuditTask(self_edit=se, adapter=adapter, run=task.run, reward_only=task.reward_only)),
        ),
    ]


def _required(self_edit: SelfEdit | None) -> SelfEdit:
    if self_edit is None:
        raise InvalidArgument("self_edit", "is required")
    return self_edit


def keep_registered(
    registry: StudentRegistry, engine: StudentEngine, address: str, stop: threading.Event
) -> threading.Thread:
    """Register this student and every adapter it holds, then renew the entry until `stop`."""
    for path in list_adapters(engine.adapters_root):
        registry.add_holder(path.name, engine.student_id)

    def renew() -> None:
        while True:
            try:
                registry.register(engine.student_id, address)
            except Exception as exc:  # noqa: BLE001 - Redis away: keep trying, the entry just lapses
                log.warning("student registration failed", extra={"error": str(exc)})
            if stop.wait(registry.ttl_s / 3):
                break
        registry.unregister(engine.student_id)

    thread = threading.Thread(target=renew, name="student-registration", daemon=True)
    thread.start()
    return thread


def serve(config: ServiceConfig) -> ServiceProcess:
    """Composition root: load the base model, register, start the gRPC server and the seal:apply worker."""
    tls = tls_files(config)  # first: a bad TLS setting fails before the model loads
    model, tokenizer, _, fingerprint = load_base_model(config)
    plane = connect_plane(config)
    registry = StudentRegistry(plane)
    engine = StudentEngine(
        model,
        tokenizer,
        config.model,
        fingerprint,
        config.data_dir / "adapters",
        config.limits(),
        student_id=student_id_for(config.data_dir),
        max_train_tokens=config.max_train_tokens,
        retention=config.adapter_retention,
        registry=registry,
        compute_dtype=config.compute_dtype,
    )
    engine.adapters_root.mkdir(parents=True, exist_ok=True)
    worker = make_worker(
        config,
        plane,
        "apply",
        apply_handler(engine),
        apply_followups,
        handle_batch=apply_batch_handler(engine) if config.train_batch > 1 else None,
        batch_size=config.train_batch,
    )

    def register(server: grpc.Server) -> list[str]:
        student_pb2_grpc.add_StudentServicer_to_server(StudentServicer(engine), server)
        return [student_pb2.DESCRIPTOR.services_by_name["Student"].full_name]

    process = ServiceProcess(
        "student", config.listen, register, [worker], metrics_listen=config.metrics_listen, tls=tls
    )

    def advertise(port: int) -> None:
        # Register before the worker trains anything, so every adapter's student can be found.
        keep_registered(registry, engine, config.advertised(port), process.stop_event)

    process.on_bound = advertise
    process.start()
    return process
