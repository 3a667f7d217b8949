"""Student service: applies self-edits as LoRA updates (seal:apply worker and ApplySelfEdit RPC) and
serves the adapters' bytes to other hosts (FetchAdapter)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from seal import convert
from seal.config import ServiceConfig
from seal.errors import InvalidArgument, NotFound
from seal.records import AdapterRef, SelfEdit, from_dict, to_dict
from seal.runtime import connect_plane, load_base_model, make_worker
from seal.server import ServiceProcess
from seal.v1 import student_pb2, student_pb2_grpc, types_pb2
from seal.validation import Limits, validate_lora, validate_passage
from seal.workplane import Task
from student.artifacts import adapter_path, iter_adapter_chunks
from student.core import apply_self_edit


@dataclass
class StudentEngine:
    """One base model shared by RPCs and the worker; a lock makes updates take turns."""

    model: Any
    tokenizer: Any
    base_model_name: str
    base_fingerprint: str
    adapters_root: Path
    limits: Limits
    address: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def apply(self, self_edit: SelfEdit, on_step: Callable[[int, float], None] | None = None) -> AdapterRef:
        validate_passage(self_edit.passage.title, self_edit.passage.context, self.limits, "self_edit.passage")
        validate_lora(self_edit.lora, "self_edit.lora")
        with self.lock:
            return apply_self_edit(
                self.model,
                self.tokenizer,
                self_edit,
                base_model_name=self.base_model_name,
                base_fingerprint=self.base_fingerprint,
                adapters_root=self.adapters_root,
                student_address=self.address,
                on_step=on_step,
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
        adapter = engine.apply(from_dict(SelfEdit, payload["self_edit"]))
        return {"adapter": to_dict(adapter)}

    return handle


def apply_followups(payload: dict[str, Any], result: dict[str, Any]) -> list[Task]:
    """Hand the adapter to the auditor, and tell the gateway it was trained."""
    se = payload["self_edit"]
    event = {
        "type": "trained",
        "job_id": se["job_id"],
        "self_edit_id": se["id"],
        "adapter": result["adapter"],
    }
    return [
        Task("audit", se["id"], {"self_edit": se, "adapter": result["adapter"]}),
        Task("events", f"trained/{se['id']}", event),
    ]


def serve(config: ServiceConfig) -> ServiceProcess:
    """Composition root: load the base model, start the gRPC server and the seal:apply worker."""
    model, tokenizer, _, fingerprint = load_base_model(config)
    engine = StudentEngine(
        model, tokenizer, config.model, fingerprint, config.data_dir / "adapters", config.limits()
    )
    engine.adapters_root.mkdir(parents=True, exist_ok=True)
    plane = connect_plane(config)
    worker = make_worker(config, plane, "apply", apply_handler(engine), apply_followups)

    def register(server: grpc.Server) -> list[str]:
        student_pb2_grpc.add_StudentServicer_to_server(StudentServicer(engine), server)
        return [student_pb2.DESCRIPTOR.services_by_name["Student"].full_name]

    def advertise(port: int) -> None:
        # Adapters name the address they can be fetched from: set it before the worker trains any.
        engine.address = config.advertised(port)

    process = ServiceProcess("student", config.listen, register, [worker], on_bound=advertise)
    process.start()
    return process
