"""Language-neutral digests of records: sha256 over the protobuf message, serialized deterministically.

A verifier in any language recomputes these from the proto contract; JSON key order or float
formatting never enters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from seal import convert
from seal.gate import DEFAULT_MIN_HITS
from seal.records import AdapterFile, Document, SelfEdit, file_sha256
from seal.v1 import types_pb2


def message_sha256(message: object) -> str:
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()  # type: ignore[attr-defined]


def self_edit_sha256(self_edit: SelfEdit) -> str:
    """Digest of everything a self-edit trains on and directs (text, lines, format, LoRA settings).

    The LoRA gate at its default is left out, as if unset (an unset gate reads as the default): a
    self-edit recorded before gates existed keeps its digest, and its verdicts still verify."""
    msg = convert.to_pb(self_edit, types_pb2.SelfEdit)
    if msg.lora.HasField("gate") and msg.lora.gate == DEFAULT_MIN_HITS:
        msg.lora.ClearField("gate")
    return message_sha256(msg)


def document_sha256(doc: Document) -> str:
    """Digest of a document as scored: title, context, and every question with its answer."""
    return message_sha256(convert.to_pb(doc, types_pb2.Document))


def manifest_sha256(files: Iterable[AdapterFile]) -> str:
    """An adapter's address: the digest of its manifest (every file's name, sha256 and size, by name)."""
    manifest = types_pb2.AdapterManifest()
    for f in sorted(files, key=lambda f: f.name):
        manifest.files.add(name=f.name, sha256=f.sha256, size=f.size)
    return message_sha256(manifest)


def directory_manifest(path: Path) -> tuple[AdapterFile, ...]:
    """The manifest of every regular file directly in `path`, sorted by name."""
    return tuple(
        AdapterFile(name=p.name, sha256=file_sha256(p), size=p.stat().st_size)
        for p in sorted(path.iterdir())
        if p.is_file()
    )
