"""Teacher service: gRPC servicer, seal:propose worker and composition root over teacher.core."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from seal import convert
from seal.apikeys import read_api_key
from seal.config import ServiceConfig
from seal.errors import FailedPrecondition, InvalidArgument
from seal.records import (
    ApplyTask,
    EditFormat,
    Event,
    PolicyResult,
    PolicyTask,
    PolicyTrained,
    PolicyVersion,
    Proposed,
    ProposeResult,
    ProposeTask,
    SelfEdit,
)
from seal.registry import student_id_for
from seal.runtime import connect_plane, load_base_model, make_worker
from seal.server import ServiceProcess
from seal.tasks import decode, encode, run_task_id
from seal.tls import tls_files
from seal.v1 import teacher_pb2, teacher_pb2_grpc, types_pb2
from seal.validation import Limits, check_int_range, validate_lora, validate_passage, validate_sampling
from seal.workplane import Task
from teacher.backends import BACKENDS, Generator, TransformersGenerator
from teacher.core import passage_control, propose_self_edits
from teacher.policies import PolicyStore
from teacher.policy import policy_training_data_sha256, release_policy, train_policy


@dataclass
class TeacherEngine:
    """The generator plus a lock: RPCs and the worker share one model."""

    generator: Generator
    limits: Limits
    # The model this teacher serves, as jobs name it (config.model).
    model: str = ""
    policies: PolicyStore | None = None
    # Who holds the policy versions this teacher trains (its data dir's id), and its base's fingerprint.
    teacher_id: str = ""
    fingerprint: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def propose(self, task: ProposeTask) -> list[SelfEdit]:
        validate_passage(task.passage.title, task.passage.context, self.limits, "passage")
        check_int_range("n", task.n, 1, self.limits.max_self_edits)
        if task.teacher_model and task.teacher_model != self.model:
            raise InvalidArgument(
                "teacher_model", f"this teacher serves {self.model!r}, not {task.teacher_model!r}"
            )
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
                policy_version=task.policy_version,
                limits=self.limits,
                samples_per_edit=max(task.samples_per_edit, 1),
            )
        if task.passage_control:
            edits.append(passage_control(task.passage, task.lora, task.job_id, task.doc_index))
        return edits

    def train_policy(self, task: PolicyTask) -> PolicyVersion:
        """The M-step: fine-tune the policy on the task's examples, store it, and return its lineage.

        The generator keeps serving every version it had (the new one is loaded on first use); only
        the local backends (transformers, and vllm, which keeps a transformers copy of its base for
        this) hold weights they can train.
        """
        if getattr(self.generator, "model", None) is None or self.policies is None:
            raise FailedPrecondition(
                f"this teacher's backend ({type(self.generator).__name__}) cannot train a policy; "
                "run a teacher with --backend transformers or vllm for policy-training jobs"
            )
        if task.teacher_model and task.teacher_model != self.model:
            raise InvalidArgument(
                "teacher_model", f"this teacher serves {self.model!r}, not {task.teacher_model!r}"
            )
        parent_dir = self.policies.get(task.parent) if task.parent else None  # NotFound names it
        with self.lock:
            generator = self.generator
            generator.release_policies()  # training needs the bare base; versions reload on demand
            peft_model, stats = train_policy(
                generator.model,
                generator.tokenizer,
                task.examples,
                task.settings,
                parent_dir=parent_dir,
                use_chat_template=generator.use_chat_template,
            )
            try:
                lineage = PolicyVersion(
                    round=task.round,
                    parent=task.parent,
                    base_model=self.model,
                    base_fingerprint=self.fingerprint,
                    settings=task.settings,
                    training_data_sha256=policy_training_data_sha256(task.examples),
                    examples=len(task.examples),
                    final_loss=stats.final_loss,
                    train_seconds=stats.seconds,
                    job_id=task.job_id,
                    evidence=tuple(e for example in task.examples for e in example.evidence),
                    created_at=time.time(),
                    round_mean_reward=task.round_mean_reward,
                    teacher_id=self.teacher_id,
                )
                return self.policies.save(peft_model, lineage)
            finally:
                release_policy(peft_model)


def policy_handler(engine: TeacherEngine) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def handle(payload: dict[str, Any]) -> dict[str, Any]:
        return encode(PolicyResult(policy=engine.train_policy(decode(PolicyTask, payload))))

    return handle


def policy_followups(payload: dict[str, Any], result: dict[str, Any]) -> list[Task]:
    """Tell the gateway the round's policy is trained (it starts the next round)."""
    task = decode(PolicyTask, payload)
    policy = decode(PolicyResult, result).policy
    event = Event(job_id=task.job_id, policy_trained=PolicyTrained(round=task.round, policy=policy))
    return [Task("events", f"policy/{task.job_id}/{task.round}", encode(event))]


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
    """A "proposed" event for the gateway, then one apply task per self-edit and training run."""
    task = decode(ProposeTask, payload)
    edits = decode(ProposeResult, result).self_edits
    event = Event(job_id=task.job_id, proposed=Proposed(doc_index=task.doc_index, self_edits=edits))
    # The event first: the gateway must know each self-edit before a verdict names it.
    tasks = [Task("events", f"proposed/{task.job_id}/{task.doc_index}", encode(event))]
    runs = range(max(task.seeds, 1))
    return tasks + [
        Task(
            "apply",
            run_task_id(se.id, run),
            encode(ApplyTask(self_edit=se, run=run, reward_only=task.reward_only)),
        )
        for se in edits
        for run in runs
    ]


def build_generator(config: ServiceConfig, policies: PolicyStore | None = None) -> tuple[Generator, str]:
    """The configured backend and the fingerprint of its base ("" for a remote model)."""
    if config.backend == "openai":
        if not config.openai_base_url or not config.openai_model:
            raise ValueError("backend openai needs --openai-base-url and --openai-model")
        generator = BACKENDS["openai"](
            base_url=config.openai_base_url,
            model=config.openai_model,
            api_key=read_api_key(config.openai_api_key_file, config.openai_api_key, "OpenAI API key"),
            timeout_s=config.openai_timeout_s,
            max_retries=config.openai_max_retries,
            max_n=config.openai_max_n,
        )
        return generator, ""
    if config.backend == "vllm":
        from seal.vllm_server import engine_for

        # vLLM samples; the transformers copy of the same base trains new policy versions (the M-step),
        # which vLLM then serves as LoRA adapters loaded into the running engine.
        model, tokenizer, model_dir, fingerprint = load_base_model(config)
        engine, stop = engine_for(config, model_dir)
        generator = BACKENDS["vllm"](
            engine, tokenizer, name=f"{config.model}@{fingerprint[:12]}", policies=policies, model=model
        )
        generator.stop = stop
        return generator, fingerprint
    if config.backend != "transformers":
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {config.backend!r}")
    model, tokenizer, _, fingerprint = load_base_model(config)
    generator = TransformersGenerator(
        model, tokenizer, device=config.device, name=f"{config.model}@{fingerprint[:12]}", policies=policies
    )
    return generator, fingerprint


def serve(config: ServiceConfig) -> ServiceProcess:
    """Composition root: build the teacher from config and start serving (returns once started)."""
    tls = tls_files(config)  # first: a bad TLS setting fails before the model loads
    policies = PolicyStore(Path(config.data_dir) / "policies")
    generator, fingerprint = build_generator(config, policies)
    engine = TeacherEngine(
        generator,
        config.limits(),
        model=config.model,
        policies=policies,
        teacher_id=student_id_for(config.data_dir, "teacher"),
        fingerprint=fingerprint,
    )
    plane = connect_plane(config)
    workers = [
        make_worker(config, plane, "propose", propose_handler(engine), propose_followups),
        make_worker(config, plane, "policy", policy_handler(engine), policy_followups),
    ]

    def register(server: grpc.Server) -> list[str]:
        teacher_pb2_grpc.add_TeacherServicer_to_server(TeacherServicer(engine), server)
        return [teacher_pb2.DESCRIPTOR.services_by_name["Teacher"].full_name]

    process = ServiceProcess(
        "teacher", config.listen, register, workers, metrics_listen=config.metrics_listen, tls=tls
    )
    if hasattr(generator, "stop"):  # a vLLM server this teacher started stops with it
        process.on_stop.append(generator.stop)
    process.start()
    return process
