"""Work-plane payloads as proto messages (seal/v1/tasks.proto), in the proto3 JSON mapping.

The work plane carries JSON objects; every one a service writes is a message of the contract, and
every one it reads is parsed strictly against that message before any work starts: an unknown
field, a value of the wrong type or an enum number the contract does not define is InvalidArgument,
which the work plane dead-letters at once instead of retrying. No service reads a payload by string
keys.
"""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from seal import convert
from seal.errors import InvalidArgument
from seal.records import (
    ApplyResult,
    ApplyTask,
    AuditResult,
    AuditTask,
    CertifyResult,
    CertifyTask,
    DeadLetter,
    Event,
    PolicyResult,
    PolicyTask,
    ProposeResult,
    ProposeTask,
)
from seal.v1 import tasks_pb2

T = TypeVar("T")

MESSAGES: dict[type, type[Message]] = {
    ProposeTask: tasks_pb2.ProposeTask,
    ProposeResult: tasks_pb2.ProposeResult,
    ApplyTask: tasks_pb2.ApplyTask,
    ApplyResult: tasks_pb2.ApplyResult,
    AuditTask: tasks_pb2.AuditTask,
    AuditResult: tasks_pb2.AuditResult,
    Event: tasks_pb2.Event,
    DeadLetter: tasks_pb2.DeadLetter,
    PolicyTask: tasks_pb2.PolicyTask,
    PolicyResult: tasks_pb2.PolicyResult,
    CertifyTask: tasks_pb2.CertifyTask,
    CertifyResult: tasks_pb2.CertifyResult,
}

# What each task stream carries (the gateway reads dead letters by it).
TASK_TYPES: dict[str, type] = {
    "propose": ProposeTask,
    "apply": ApplyTask,
    "audit": AuditTask,
    "policy": PolicyTask,
    "certify": CertifyTask,
    "events": Event,
}


def run_task_id(self_edit_id: str, run: int) -> str:
    """The task id of one training run of a self-edit: the self-edit's id for run 0, "<id>#<run>" after."""
    return self_edit_id if run == 0 else f"{self_edit_id}#{run}"


def encode(record: Any) -> dict[str, Any]:
    """A payload record as the JSON object of its proto message."""
    message = convert.to_pb(record, MESSAGES[type(record)])
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def decode(cls: type[T], payload: Any) -> T:
    """The payload record of type `cls`, parsed strictly; InvalidArgument (never retried) if it is not one."""
    try:
        message = json_format.ParseDict(payload, MESSAGES[cls]())
    except (json_format.ParseError, TypeError, AttributeError) as exc:
        raise InvalidArgument("payload", f"is not a valid {cls.__name__} message: {exc}") from None
    return convert.from_pb(cls, message)
