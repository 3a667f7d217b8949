"""Teacher service: gRPC servicer, seal:propose worker and composition root over teacher.core."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from seal import convert
from seal.config import ServiceConfig
from seal.errors import InvalidArgument
from seal.records import ApplyTask, EditFormat, Event, Proposed, ProposeResult, ProposeTask, SelfEdit
from seal.runtime import connect_plane, load_base_model, make_worker
from seal.server import ServiceProcess
from seal.tasks import decode, encode
from seal.tls import tls_files
from seal.v1 import teacher_pb2, teacher_pb2_grpc, types_pb2
from seal.validation import Limits, check_int_range, validate_lora, validate_passage, validate_sampling
from seal.workplane import Task
from teacher.backends import BACKENDS, Generator
from teacher.core import passage_control, propose_self_edits


@dataclass
class TeacherEngine:
    """The generator plus a lock: RPCs and the worker share one model."""

    generator: Generator
    limits: Limits
    lock: threading.Lock = field(default_factory=threading.Lock)

    def propose(self, task: ProposeTask) -> list[SelfEdit]:
        validate_passage(task.passage.title, task.passage.context, self.limits, "passage")
        check_int_range("n", task.n, 1, self.limits.max_self_edits)
        if task.format == EditFormat.PASSAGE:
            raise InvalidArgument("format", "must be implications, rewrite or self_qa")
        validate_lora(task.lora)
        validate_sampling(task.sampling)
        with self.lock:
            edits = propose_self_edits(
                self.generator,
                task.passage,
                task.format,
                task.n,
                task.lora,
                task.sampling,
                task.job_id,
                task.doc_index,
            )
        if task.passage_control:
            edits.append(passage_control(task.passage, task.lora, task.job_id, task.doc_index))
        return edits


class TeacherServicer(teacher_pb2_grpc.TeacherServicer):
    def __init__(self, engine: TeacherEngine) -> None:
        self.engine = engine

    def ProposeSelfEdits(
        self, request: teacher_pb2.ProposeSelfEditsRequest, context: grpc.ServicerContext
    ) -> Any:
        task = convert.from_pb(ProposeTask, request)
        edits = self.engine.propose(dataclasses.replace(task, job_id=task.job_id or "adhoc"))
        return teacher_pb2.ProposeSelfEditsResponse(
            self_edits=[convert.to_pb(e, types_pb2.SelfEdit) for e in edits]
        )


def propose_handler(engine: TeacherEngine) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def handle(payload: dict[str, Any]) -> dict[str, Any]:
        edits = engine.propose(decode(ProposeTask, payload))
        return encode(ProposeResult(tuple(edits)))

    return handle


def propose_followups(payload: dict[str, Any], result: dict[str, Any]) -> list[Task]:
    """A "proposed" event for the gateway, then one apply task per self-edit."""
    task = decode(ProposeTask, payload)
    edits = decode(ProposeResult, result).self_edits
    event = Event(job_id=task.job_id, proposed=Proposed(doc_index=task.doc_index, self_edits=edits))
    # The event first: the gateway must know each self-edit before a verdict names it.
    tasks = [Task("events", f"proposed/{task.job_id}/{task.doc_index}", encode(event))]
    return tasks + [Task("apply", se.id, encode(ApplyTask(self_edit=se))) for se in edits]


def build_generator(config: ServiceConfig) -> Generator:
    if config.backend == "openai":
        if not config.openai_base_url or not config.openai_model:
            raise ValueError("backend openai needs --openai-base-url and --openai-model")
        return BACKENDS["openai"](
            base_url=config.openai_base_url, model=config.openai_model, api_key=config.openai_api_key
        )
    if config.backend == "vllm":
        from seal.models import resolve_model

        return BACKENDS["vllm"](str(resolve_model(config.model)))
    if config.backend != "transformers":
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {config.backend!r}")
    model, tokenizer, _, fingerprint = load_base_model(config)
    return BACKENDS["transformers"](
        model, tokenizer, device=config.device, name=f"{config.model}@{fingerprint[:12]}"
    )


def serve(config: ServiceConfig) -> ServiceProcess:
    """Composition root: build the teacher from config and start serving (returns once started)."""
    tls = tls_files(config)  # first: a bad TLS setting fails before the model loads
    engine = TeacherEngine(build_generator(config), config.limits())
    plane = connect_plane(config)
    worker = make_worker(config, plane, "propose", propose_handler(engine), propose_followups)

    def register(server: grpc.Server) -> list[str]:
        teacher_pb2_grpc.add_TeacherServicer_to_server(TeacherServicer(engine), server)
        return [teacher_pb2.DESCRIPTOR.services_by_name["Teacher"].full_name]

    process = ServiceProcess(
        "teacher", config.listen, register, [worker], metrics_listen=config.metrics_listen, tls=tls
    )
    process.start()
    return process
