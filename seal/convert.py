"""Translate domain records to and from protobuf messages.

Records and messages share field names, so one pair of generic functions does the work (like TGI's
from_pb / to_pb, without a hand-written pair per message). Rules:
- an unset optional field, an unset message and an empty repeated field take the record's default;
- enums map by name: EditFormat.SELF_QA <-> EDIT_FORMAT_SELF_QA; *_UNSPECIFIED takes the default,
  and a number the enum does not define is InvalidArgument naming the field;
- bytes fields are base64 text in records (records travel as JSON).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import re
import typing
from typing import Any, TypeVar

from google.protobuf.message import Message

from seal.errors import InvalidArgument
from seal.records import field_types, optional_inner

T = TypeVar("T")
M = TypeVar("M", bound=Message)
E = TypeVar("E", bound=enum.Enum)


def to_pb(record: Any, pb_cls: type[M]) -> M:
    msg = pb_cls()
    _fill(msg, record)
    return msg


def from_pb(cls: type[T], msg: Message) -> T:
    hints = field_types(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        fd = msg.DESCRIPTOR.fields_by_name.get(f.name)
        if fd is None:
            continue
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if not _is_set(msg, fd):
            if has_default:
                continue
            if optional_inner(hints[f.name]) is not None:
                kwargs[f.name] = None
                continue
        value = _from_value(hints[f.name], fd, getattr(msg, f.name))
        if value is not _DEFAULT:
            kwargs[f.name] = value
    return cls(**kwargs)


_DEFAULT = object()


def _is_repeated(fd: Any) -> bool:
    return bool(fd.is_repeated)


def _is_set(msg: Message, fd: Any) -> bool:
    if _is_repeated(fd):
        return len(getattr(msg, fd.name)) > 0
    if fd.has_presence:
        return msg.HasField(fd.name)
    return True


def _enum_prefix(enum_cls: type[enum.Enum]) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum_cls.__name__).upper() + "_"


def _from_value(tp: Any, fd: Any, value: Any) -> Any:
    tp = optional_inner(tp) or tp
    if _is_repeated(fd):
        (item_tp,) = typing.get_args(tp)[:1]
        return tuple(_from_scalar_or_message(item_tp, fd, v) for v in value)
    return _from_scalar_or_message(tp, fd, value)


def _from_scalar_or_message(tp: Any, fd: Any, value: Any) -> Any:
    if fd.message_type is not None:
        return from_pb(tp, value)
    if fd.enum_type is not None:
        known = fd.enum_type.values_by_number.get(value)
        if known is None:
            names = ", ".join(v.name for v in fd.enum_type.values)
            raise InvalidArgument(fd.name, f"enum value {value} is not one of {names}")
        return _enum_member(tp, known.name, _DEFAULT)
    if fd.type == fd.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def _fill(msg: Message, record: Any) -> None:
    for f in dataclasses.fields(record):
        fd = msg.DESCRIPTOR.fields_by_name.get(f.name)
        value = getattr(record, f.name)
        if fd is None or value is None:
            continue
        if _is_repeated(fd):
            target = getattr(msg, f.name)
            for item in value:
                if fd.message_type is not None:
                    _fill(target.add(), item)
                else:
                    target.append(_to_scalar(fd, item))
        elif fd.message_type is not None:
            _fill(getattr(msg, f.name), value)
            getattr(msg, f.name).SetInParent()
        else:
            setattr(msg, f.name, _to_scalar(fd, value))


def _to_scalar(fd: Any, value: Any) -> Any:
    if fd.enum_type is not None:
        return fd.enum_type.values_by_name[_enum_prefix(type(value)) + value.name].number
    if fd.type == fd.TYPE_BYTES:
        return base64.b64decode(value, validate=True)
    return value


def enum_from_pb(enum_cls: type[E], wrapper: Any, number: int, default: E) -> E:
    """A proto enum number (e.g. EDIT_FORMAT_REWRITE) as its domain enum; UNSPECIFIED gives `default`."""
    return _enum_member(enum_cls, wrapper.Name(number), default)


def _enum_member(enum_cls: type[enum.Enum], proto_name: str, default: Any) -> Any:
    member = proto_name.removeprefix(_enum_prefix(enum_cls))
    return default if member == "UNSPECIFIED" else enum_cls[member]
