"""Domain records shared by every service.

Plain frozen dataclasses: the cores take and return these, the gRPC servicers translate them to and
from protobuf (`seal.convert`), and the Redis work plane stores them as JSON (`to_json` / `from_json`).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from seal.gate import DEFAULT_MIN_HITS, Gate

T = TypeVar("T")


class EditFormat(str, enum.Enum):
    """How the teacher writes a self-edit (the SEAL paper's data formats)."""

    IMPLICATIONS = "implications"
    REWRITE = "rewrite"
    SELF_QA = "self_qa"
    # The control condition: train on the passage alone, no synthetic data.
    PASSAGE = "passage"
    # The reference's "a long list" / "a very long list" variants of the implications prompt.
    IMPLICATIONS_LONG = "implications_long"
    IMPLICATIONS_VERY_LONG = "implications_very_long"


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class QA:
    question: str = ""
    answer: str = ""


@dataclass(frozen=True)
class Document:
    """One context C with its evaluation τ (held-out questions)."""

    title: str = ""
    context: str = ""
    questions: tuple[QA, ...] = ()
    # Split off by the gateway: scored only for the verdict that gates promotion, never for selection.
    signoff_questions: tuple[QA, ...] = ()

    def passage(self) -> Passage:
        """The part of the document that teacher and student may see (never τ)."""
        return Passage(title=self.title, context=self.context)


@dataclass(frozen=True)
class Passage:
    title: str
    context: str

    def digest(self) -> str:
        return sha256_text(self.title + "\n" + self.context)


@dataclass(frozen=True)
class LoraSettings:
    """Update directives for one inner-loop LoRA fine-tune.

    Defaults follow the SEAL paper's inner loop (lr 1e-3, batch 1) with a rank and epoch count that
    keep one update around 20 s on a 2-core CPU with the default model.
    """

    rank: int = 16
    alpha: float = 32.0
    learning_rate: float = 1e-3
    epochs: int = 10
    batch_size: int = 1
    max_seq_len: int = 256
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    seed: int = 0
    # "linear": decay to 0 over the run (the Hugging Face Trainer default the reference runs);
    # "constant": the same rate throughout.
    schedule: str = "linear"
    # Clip gradients to this global norm (the reference: 1.0); 0 switches clipping off.
    max_grad_norm: float = 1.0
    # Replay: general prompts answered by the base model itself, mixed into the update (0: none).
    replay: int = 0
    # Weight of a KL(base || adapted) penalty on general prompts added to the loss (0: none).
    kl_weight: float = 0.0
    # Gate (seal.gate): the adapter applies only to prompts holding at least this many distinct content
    # words of its document, the base answering the rest; 0: it applies to every prompt.
    gate: int = DEFAULT_MIN_HITS


@dataclass(frozen=True)
class SamplingSettings:
    """How the teacher samples self-edits (paper: temperature 1.0, top_p 0.95)."""

    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0


@dataclass(frozen=True)
class JobSpec:
    documents: tuple[Document, ...] = ()
    n_self_edits: int = 3
    edit_format: EditFormat = EditFormat.IMPLICATIONS
    lora: LoraSettings = field(default_factory=LoraSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    # Also train on the passage alone: the paper's "train on passage" baseline row.
    passage_control: bool = True
    # Base model to adapt (the student's); empty means the deployment's model.
    model: str = ""
    # Training runs (seeds) per self-edit; the reward is their mean.
    seeds: int = 1
    # The teacher's model; empty means the deployment's. May differ from the student's.
    teacher_model: str = ""
    # The teacher policy version that writes the self-edits; empty for the base policy.
    policy_version: str = ""
    # Set for a policy-training job (ReST-EM): `documents` are then the training contexts.
    policy_training: PolicyTraining | None = None
    # The policy-training job this job is a round of (set by the gateway only).
    parent_job_id: str = ""
    # Teacher samples joined into each self-edit: one update on several samples teaches a small
    # model more than one sample (the recipe study in docs/RESULTS.md).
    samples_per_edit: int = 3


@dataclass(frozen=True)
class PolicySettings:
    """How the M-step fine-tunes the teacher's policy (the reference: LoRA r64 α128, lr 3e-4, 2 epochs;
    rank and learning rate here suit a 135M teacher on a CPU, and are settings)."""

    objective: str = "sft"
    rank: int = 16
    alpha: float = 32.0
    learning_rate: float = 3e-4
    epochs: int = 2
    batch_size: int = 2
    beta: float = 0.1
    discopop_tau: float = 0.05
    max_seq_len: int = 2048
    seed: int = 0


@dataclass(frozen=True)
class PolicyTraining:
    """The outer loop's settings: R rounds of E-step (sample, train, audit) and M-step."""

    rounds: int = 2
    # "best_of_n" (the best self-edit per context, as the reference code keeps) or "threshold" (every
    # self-edit whose mean reward exceeds reward_threshold, as the paper's equation states).
    selection: str = "best_of_n"
    reward_threshold: float = 0.0
    policy: PolicySettings = field(default_factory=PolicySettings)
    continue_from_last: bool = True


@dataclass(frozen=True)
class PolicyExample:
    context_id: str = ""
    prompt: str = ""
    chosen: str = ""
    rejected: str = ""
    chosen_reward: float = 0.0
    rejected_reward: float = 0.0
    # "<self_edit_id>@<adapter_sha256>" of every verdict the rewards came from.
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicyVersion:
    """A trained teacher policy (a LoRA on the teacher's base), addressed by its manifest digest."""

    version: str = ""
    round: int = 0
    parent: str = ""
    base_model: str = ""
    base_fingerprint: str = ""
    settings: PolicySettings = field(default_factory=PolicySettings)
    training_data_sha256: str = ""
    examples: int = 0
    final_loss: float = 0.0
    train_seconds: float = 0.0
    job_id: str = ""
    evidence: tuple[str, ...] = ()
    created_at: float = 0.0
    round_mean_reward: float = 0.0
    teacher_id: str = ""


@dataclass(frozen=True)
class ProposeTask:
    """What the teacher is asked for one document: the passage (never τ) and how to write self-edits."""

    job_id: str = ""
    doc_index: int = 0
    passage: Passage = field(default_factory=lambda: Passage("", ""))
    format: EditFormat = EditFormat.IMPLICATIONS
    n: int = 1
    lora: LoraSettings = field(default_factory=LoraSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    # Also emit the passage-only control self-edit.
    passage_control: bool = False
    policy_version: str = ""
    teacher_model: str = ""
    # Training runs per self-edit (one apply task each); 0 is read as 1.
    seeds: int = 1
    # Samples joined into each self-edit; 0 is read as 1.
    samples_per_edit: int = 1
    # A policy-training round's E-step: the audits measure the reward and skip the forgetting
    # guardrails; their verdicts say so and are never promoted.
    reward_only: bool = False


@dataclass(frozen=True)
class SelfEdit:
    """Synthetic training data plus the update directives the student applies."""

    id: str
    job_id: str
    doc_index: int
    index: int
    format: EditFormat
    passage: Passage
    text: str
    lines: tuple[str, ...]
    lora: LoraSettings
    teacher_model: str = ""
    generation_seconds: float = 0.0
    # The teacher policy version that wrote it ("" for the base policy).
    policy_version: str = ""
    # Update directives written in the self-edit (JSON object text), and why they were refused if so.
    directives: str = ""
    directive_error: str = ""
    # Tokens the teacher's backend counted for it: a request's usage split evenly over its choices
    # (types.proto SelfEdit says how; 0 when the backend reports none). Zero values leave the
    # self-edit's digest as it was before these fields existed.
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class AdapterFile:
    """One file of an adapter directory with its digest (an entry of the adapter's manifest)."""

    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class AdapterRef:
    """A trained LoRA adapter, addressed by the sha256 of its manifest (every file, not just weights)."""

    sha256: str
    self_edit_id: str
    base_model: str
    base_fingerprint: str
    size_bytes: int
    train_seconds: float
    steps: int
    final_loss: float
    # The registered student that trained it; its address is looked up, never carried.
    student_id: str = ""
    files: tuple[AdapterFile, ...] = ()


@dataclass(frozen=True)
class QuestionScore:
    question: str
    answer: str
    response: str
    exact_match: bool
    f1: float
    contains: bool
    correct: bool
    # The LLM judge's grade, when a judge is configured.
    judged_correct: bool | None = None


@dataclass(frozen=True)
class Verdict:
    """The auditor's signed judgement of one adapter against τ (see seal.signing for what binds it)."""

    job_id: str
    doc_index: int
    self_edit_id: str
    adapter_sha256: str
    base_fingerprint: str
    baseline_accuracy: float
    adapted_accuracy: float
    reward: float
    baseline_scores: tuple[QuestionScore, ...]
    adapted_scores: tuple[QuestionScore, ...]
    eval_seconds: float
    passed: bool
    checks: tuple[str, ...] = ()
    auditor_key_id: str = ""
    signature: str = ""
    self_edit_sha256: str = ""
    document_sha256: str = ""
    teacher_model: str = ""
    grading_metric: str = ""
    issued_at: float = 0.0
    expires_at: float = 0.0
    # Base64 of the signed VerdictStatement bytes (bytes fields are base64 text in records).
    statement: str = ""
    judge_model: str = ""
    signoff_baseline_accuracy: float = 0.0
    signoff_adapted_accuracy: float = 0.0
    signoff_scores: tuple[QuestionScore, ...] = ()

    def failed_checks(self) -> tuple[str, ...]:
        """Names of the guardrail checks that failed (checks read "name:pass" or "name:fail:detail")."""
        return tuple(
            name for name, outcome, *_ in (c.split(":", 2) for c in self.checks) if outcome != "pass"
        )


@dataclass(frozen=True)
class LearnedDocument:
    """A document a deployment has learned, with the sign-off questions every later version re-checks."""

    job_id: str = ""
    doc_index: int = 0
    title: str = ""
    document_sha256: str = ""
    signoff_questions: tuple[QA, ...] = ()
    # The layer's gate (seal.gate); gate_min_hits 0: the layer applies to every prompt.
    gate_words: tuple[str, ...] = ()
    gate_min_hits: int = 0

    def gate(self) -> Gate | None:
        return Gate(self.gate_words, self.gate_min_hits) if self.gate_min_hits else None


@dataclass(frozen=True)
class Layer:
    """One adapter of a deployment version, in merge order, with the verdict that admitted it."""

    adapter: AdapterRef | None = None
    verdict: Verdict | None = None
    self_edit_text: str = ""
    policy_version: str = ""
    document: LearnedDocument | None = None


@dataclass(frozen=True)
class DocumentAccuracy:
    job_id: str = ""
    doc_index: int = 0
    document_sha256: str = ""
    accuracy: float = 0.0


@dataclass(frozen=True)
class Certificate:
    """The auditor's signed re-check of a whole deployment version (see seal.signing)."""

    deployment: str = ""
    version: int = 0
    fingerprint: str = ""
    base_fingerprint: str = ""
    adapter_sha256s: tuple[str, ...] = ()
    documents: tuple[DocumentAccuracy, ...] = ()
    retention_baseline: float = 0.0
    retention_accuracy: float = 0.0
    kl_shift: float = 0.0
    checks: tuple[str, ...] = ()
    passed: bool = False
    grading_metric: str = ""
    eval_seconds: float = 0.0
    auditor_key_id: str = ""
    issued_at: float = 0.0
    expires_at: float = 0.0
    statement: str = ""
    signature: str = ""

    def failed_checks(self) -> tuple[str, ...]:
        return tuple(
            name for name, outcome, *_ in (c.split(":", 2) for c in self.checks) if outcome != "pass"
        )


class VersionState(str, enum.Enum):
    CERTIFYING = "certifying"
    PROMOTED = "promoted"
    REFUSED = "refused"


@dataclass(frozen=True)
class DeploymentVersion:
    deployment: str = ""
    version: int = 0
    parent: int = 0
    fingerprint: str = ""
    base_fingerprint: str = ""
    layers: tuple[Layer, ...] = ()
    state: VersionState = VersionState.CERTIFYING
    refusal_code: str = ""
    message: str = ""
    certificate: Certificate | None = None
    promoted_by: str = ""
    created_at: float = 0.0
    finished_at: float = 0.0
    alias: str = ""
    approvers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Alias:
    name: str = ""
    version: int = 0


@dataclass(frozen=True)
class Deployment:
    name: str = ""
    base_fingerprint: str = ""
    aliases: tuple[Alias, ...] = ()
    versions: tuple[DeploymentVersion, ...] = ()
    created_at: float = 0.0

    def alias(self, name: str) -> int | None:
        return next((a.version for a in self.aliases if a.name == name), None)


@dataclass(frozen=True)
class Approval:
    deployment: str = ""
    adapter_sha256: str = ""
    approver: str = ""
    approved_at: float = 0.0
    approvers: tuple[str, ...] = ()
    required: int = 0


@dataclass(frozen=True)
class KillSwitch:
    on: bool = False
    reason: str = ""
    actor: str = ""
    changed_at: float = 0.0


# --- work-plane payloads (seal/v1/tasks.proto; encoded by seal.tasks) --------------------------------


@dataclass(frozen=True)
class ProposeResult:
    self_edits: tuple[SelfEdit, ...] = ()


@dataclass(frozen=True)
class ApplyTask:
    self_edit: SelfEdit | None = None
    # Which training run of the self-edit: the LoRA seed is lora.seed + run.
    run: int = 0
    reward_only: bool = False


@dataclass(frozen=True)
class ApplyResult:
    adapter: AdapterRef | None = None


# The check a reward-only verdict fails (a policy-training round's E-step skips retention and KL).
FORGETTING_UNCHECKED = "forgetting_unchecked"


@dataclass(frozen=True)
class AuditTask:
    self_edit: SelfEdit | None = None
    adapter: AdapterRef | None = None
    run: int = 0
    reward_only: bool = False


@dataclass(frozen=True)
class AuditResult:
    verdict: Verdict | None = None


@dataclass(frozen=True)
class Proposed:
    doc_index: int = 0
    self_edits: tuple[SelfEdit, ...] = ()


@dataclass(frozen=True)
class Trained:
    self_edit_id: str = ""
    adapter: AdapterRef | None = None
    run: int = 0


@dataclass(frozen=True)
class Audited:
    self_edit_id: str = ""
    verdict: Verdict | None = None
    run: int = 0


@dataclass(frozen=True)
class PolicyTask:
    """The M-step of one round: fine-tune the teacher's policy on the selected examples."""

    job_id: str = ""
    round: int = 0
    parent: str = ""
    settings: PolicySettings = field(default_factory=PolicySettings)
    examples: tuple[PolicyExample, ...] = ()
    round_mean_reward: float = 0.0
    teacher_model: str = ""


@dataclass(frozen=True)
class PolicyResult:
    policy: PolicyVersion | None = None


@dataclass(frozen=True)
class PolicyTrained:
    round: int = 0
    policy: PolicyVersion | None = None


@dataclass(frozen=True)
class CertifyTask:
    deployment: str = ""
    version: int = 0
    fingerprint: str = ""
    base_fingerprint: str = ""
    layers: tuple[AdapterRef, ...] = ()
    documents: tuple[LearnedDocument, ...] = ()


@dataclass(frozen=True)
class CertifyResult:
    certificate: Certificate | None = None


@dataclass(frozen=True)
class Certified:
    certificate: Certificate | None = None


@dataclass(frozen=True)
class Event:
    """What a service reports to the gateway: exactly one of proposed, trained, audited, policy_trained."""

    job_id: str = ""
    proposed: Proposed | None = None
    trained: Trained | None = None
    audited: Audited | None = None
    policy_trained: PolicyTrained | None = None
    certified: Certified | None = None


@dataclass(frozen=True)
class DeadLetter:
    """A task the work plane gave up on: where it was, what it carried, and why."""

    stream: str = ""
    task_id: str = ""
    payload_json: str = "{}"
    reason: str = ""
    attempts: int = 0


@dataclass(frozen=True)
class SeedRun:
    run: int
    adapter: AdapterRef | None = None
    verdict: Verdict | None = None


@dataclass(frozen=True)
class EditResult:
    self_edit: SelfEdit
    # Training run 0.
    adapter: AdapterRef | None = None
    verdict: Verdict | None = None
    # Runs 1..seeds-1: the same self-edit trained with other seeds.
    more_runs: tuple[SeedRun, ...] = ()
    # Mean and standard deviation of the reward over the audited runs (None before any verdict).
    reward: float | None = None
    reward_std: float = 0.0

    def runs(self) -> tuple[SeedRun, ...]:
        """Every training run, run 0 first."""
        return (SeedRun(0, self.adapter, self.verdict), *self.more_runs)


@dataclass(frozen=True)
class DocumentResult:
    doc_index: int
    title: str
    baseline_accuracy: float | None
    edits: tuple[EditResult, ...]
    best_self_edit_id: str = ""


@dataclass(frozen=True)
class Progress:
    documents: int = 0
    proposed: int = 0
    self_edits: int = 0
    trained: int = 0
    audited: int = 0
    # Policy-training jobs: the round under way (1-based) and how many there are.
    round: int = 0
    rounds: int = 0


@dataclass(frozen=True)
class RoundResult:
    round: int
    job_id: str = ""
    policy_version: str = ""
    contexts: int = 0
    contexts_done: int = 0
    mean_reward: float | None = None
    trained: PolicyVersion | None = None
    selected: int = 0


@dataclass(frozen=True)
class Job:
    id: str
    state: JobState
    spec: JobSpec
    created_at: float
    finished_at: float = 0.0
    error: str = ""
    progress: Progress = field(default_factory=Progress)
    documents: tuple[DocumentResult, ...] = ()
    # Policy-training jobs: one entry per round started, and the last policy a round produced.
    rounds: tuple[RoundResult, ...] = ()
    policy_version: str = ""


# --- JSON round trip -------------------------------------------------------------------------------


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (adapters are content-addressed by it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_dict(record: Any) -> Any:
    """A JSON-ready dict of a record (enums as their values, tuples as lists)."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: to_dict(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, enum.Enum):
        return record.value
    if isinstance(record, (list, tuple)):
        return [to_dict(x) for x in record]
    return record


class RecordError(ValueError):
    """Data that does not fit a record; `path` names where (e.g. "documents[0].questions")."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path or 'record'}: {message}")
        self.path = path
        self.message = message


def from_dict(cls: type[T], data: Any) -> T:
    """Build a record of type `cls` from `to_dict` output; misfits raise RecordError naming the path."""
    return _build(cls, data, "")


def to_json(record: Any) -> str:
    return json.dumps(to_dict(record), sort_keys=True)


def from_json(cls: type[T], text: str | bytes) -> T:
    return from_dict(cls, json.loads(text))


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """A record's resolved field types. Cached: decoding a job touches every record type many times."""
    if cls not in _FIELD_TYPES:
        _FIELD_TYPES[cls] = typing.get_type_hints(cls)
    return _FIELD_TYPES[cls]


def optional_inner(tp: Any) -> Any | None:
    """X for `X | None`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return None


def _build(tp: Any, data: Any, path: str) -> Any:
    inner = optional_inner(tp)
    if inner is not None:
        return None if data is None else _build(inner, data, path)
    if typing.get_origin(tp) is tuple:
        if not isinstance(data, (list, tuple)):
            raise RecordError(path, f"must be a list, got {type(data).__name__} {data!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_build(item, x, f"{path}[{i}]") for i, x in enumerate(data))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in tp)
            raise RecordError(path, f"must be one of {allowed}, got {data!r}") from None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise RecordError(path, f"must be an object, got {type(data).__name__}")
        hints = field_types(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RecordError(
                path, f"{tp.__name__} has no field(s) {unknown}; its fields are {sorted(names)}"
            )
        prefix = f"{path}." if path else ""
        try:
            return tp(**{k: _build(hints[k], v, prefix + k) for k, v in data.items()})
        except TypeError as exc:  # a required field is missing
            raise RecordError(path, str(exc)) from None
    return _scalar(tp, data, path)


def _scalar(tp: Any, data: Any, path: str) -> Any:
    """A JSON scalar checked against its field type: "false" is not a bool, 1.5 not an int."""
    if tp is bool:
        if not isinstance(data, bool):
            raise RecordError(path, f"must be true or false, got {data!r}")
    elif tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise RecordError(path, f"must be an integer, got {data!r}")
    elif tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise RecordError(path, f"must be a number, got {data!r}")
        return float(data)
    elif tp is str:
        if not isinstance(data, str):
            raise RecordError(path, f"must be a string, got {data!r}")
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            raise RecordError(path, "must be valid Unicode text (it holds a lone surrogate)") from None
    return data
