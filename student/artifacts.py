"""Adapter artifacts on disk: content addressed, self-describing, moved between hosts in chunks.

An adapter directory is what `PeftModel.save_pretrained` writes (adapter_model.safetensors and a
PEFT-compatible adapter_config.json) plus provenance.json saying how it was made. It lives at
adapters_root/<sha256 of adapter_model.safetensors>/. Every write goes to a hidden staging
directory inside adapters_root and appears with one atomic rename, so readers never see half an
adapter; a directory that already exists is kept, since equal names mean equal weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from seal.records import file_sha256

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PROVENANCE = "provenance.json"
# Staging directories start with this, so listings of adapters_root can skip them.
STAGING_PREFIX = ".staging-"

_SHA256 = re.compile(r"[0-9a-f]{64}")


def save_adapter(peft_model: Any, adapters_root: Path, provenance: dict) -> tuple[str, Path]:
    """Write the adapter (safetensors + config + provenance) under its sha256; returns (sha256, path)."""
    with _staging_dir(adapters_root) as staging:
        peft_model.save_pretrained(staging, safe_serialization=True)
        (staging / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        sha = file_sha256(staging / ADAPTER_WEIGHTS)
        return sha, _publish(staging, adapter_path(adapters_root, sha))


def adapter_path(adapters_root: Path, sha256: str) -> Path:
    """Where the adapter with this sha256 lives; rejects anything but 64 lowercase hex digits."""
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ValueError(f"adapter sha256 must be 64 lowercase hex characters, got {sha256!r}")
    return adapters_root / sha256


def verify_adapter(path: Path) -> str:
    """Recompute the sha256 of the adapter's weights; raise ValueError unless it matches the dir name."""
    sha = file_sha256(path / ADAPTER_WEIGHTS)
    if sha != path.name:
        raise ValueError(f"adapter at {path} is corrupt: its weights hash to {sha}")
    return sha


def iter_adapter_chunks(path: Path, chunk_size: int = 1 << 20) -> Iterator[tuple[str, int, bytes]]:
    """(filename, offset, bytes) for every file of the adapter dir, sorted by name; empty files included."""
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        with open(file, "rb") as fh:
            offset = 0
            while True:
                data = fh.read(chunk_size)
                if data or offset == 0:
                    yield file.name, offset, data
                if len(data) < chunk_size:
                    break
                offset += len(data)


def write_adapter_chunks(
    chunks: Iterable[tuple[str, int, bytes]], adapters_root: Path, expected_sha256: str
) -> Path:
    """Reassemble an adapter sent by `iter_adapter_chunks`, verify its sha256, then publish it atomically."""
    final = adapter_path(adapters_root, expected_sha256)
    with _staging_dir(adapters_root) as staging:
        for name, offset, data in chunks:
            _append_chunk(staging, name, offset, data)
        for required in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            if not (staging / required).is_file():
                raise ValueError(f"adapter transfer is missing {required}")
        sha = file_sha256(staging / ADAPTER_WEIGHTS)
        if sha != expected_sha256:
            raise ValueError(f"adapter transfer is corrupt: expected sha256 {expected_sha256}, got {sha}")
        return _publish(staging, final)


def _append_chunk(staging: Path, name: str, offset: int, data: bytes) -> None:
    # The names come from another host: only plain file names, never paths out of the staging dir.
    if not name or name != os.path.basename(name) or name.startswith("."):
        raise ValueError(f"adapter transfer has a bad file name {name!r}")
    target = staging / name
    written = target.stat().st_size if target.exists() else 0
    if offset != written:
        raise ValueError(f"adapter transfer of {name} jumps to offset {offset}; expected {written}")
    with open(target, "ab") as fh:
        fh.write(data)


@contextlib.contextmanager
def _staging_dir(adapters_root: Path) -> Iterator[Path]:
    """A fresh hidden directory in adapters_root, removed on exit (a no-op once it was published)."""
    adapters_root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=adapters_root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _publish(staging: Path, final: Path) -> Path:
    """Atomically rename staging to final; if final already exists (same content) keep it."""
    # mkdtemp makes the directory private (0700); adapters are meant to be read by other services.
    staging.chmod(0o755)
    try:
        os.rename(staging, final)
    except OSError:
        # Another writer published the same sha256 first (ENOTEMPTY / EEXIST): its bytes are ours.
        if not (final / ADAPTER_WEIGHTS).is_file():
            raise
    return final
