"""Adapter artifacts on disk: content addressed, self-describing, moved between hosts in chunks.

An adapter directory is what `PeftModel.save_pretrained` writes (adapter_model.safetensors and a
PEFT-compatible adapter_config.json) plus provenance.json saying how it was made. It lives at
adapters_root/<manifest sha256>/, the digest of every file's name, sha256 and size
(`seal.digests.manifest_sha256`): editing the rank in adapter_config.json changes the address as
surely as editing a weight. Every write goes to a hidden staging directory inside adapters_root and
appears with one atomic rename, so readers never see half an adapter; a directory that already
exists is kept, since equal names mean equal files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from seal.digests import directory_manifest, manifest_sha256
from seal.records import AdapterFile

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PROVENANCE = "provenance.json"
# Staging directories start with this, so listings of adapters_root can skip them.
STAGING_PREFIX = ".staging-"

_SHA256 = re.compile(r"[0-9a-f]{64}")


def save_adapter(
    peft_model: Any, adapters_root: Path, provenance: dict
) -> tuple[str, Path, tuple[AdapterFile, ...]]:
    """Write the adapter (safetensors + config + provenance); returns (manifest sha256, path, manifest)."""
    with _staging_dir(adapters_root) as staging:
        peft_model.save_pretrained(staging, safe_serialization=True)
        (staging / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        files = directory_manifest(staging)
        sha = manifest_sha256(files)
        return sha, _publish(staging, adapter_path(adapters_root, sha)), files


def adapter_path(adapters_root: Path, sha256: str) -> Path:
    """Where the adapter with this sha256 lives; rejects anything but 64 lowercase hex digits."""
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ValueError(f"adapter sha256 must be 64 lowercase hex characters, got {sha256!r}")
    return adapters_root / sha256


def verify_adapter(path: Path) -> tuple[AdapterFile, ...]:
    """Recompute the adapter's manifest; raise ValueError unless its digest matches the dir name."""
    files = directory_manifest(path)
    sha = manifest_sha256(files)
    if sha != path.name:
        raise ValueError(f"adapter at {path} is corrupt or altered: its files hash to {sha}")
    return files


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


class TransferLimitError(ValueError):
    """An adapter transfer larger than the receiver accepts."""


def write_adapter_chunks(
    chunks: Iterable[tuple[str, int, bytes]],
    adapters_root: Path,
    expected_sha256: str,
    max_bytes: int = 512 * 1024 * 1024,
    max_files: int = 8,
) -> Path:
    """Reassemble an adapter sent by `iter_adapter_chunks` within the byte and file caps, verify its
    manifest digest, then publish it atomically. Nothing of a refused transfer stays on disk."""
    final = adapter_path(adapters_root, expected_sha256)
    with _staging_dir(adapters_root) as staging:
        names: set[str] = set()
        total = 0
        for name, offset, data in chunks:
            names.add(name)
            total += len(data)
            if len(names) > max_files:
                raise TransferLimitError(f"adapter transfer has more than {max_files} files")
            if total > max_bytes:
                raise TransferLimitError(f"adapter transfer exceeds {max_bytes} bytes")
            _append_chunk(staging, name, offset, data)
        for required in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            if not (staging / required).is_file():
                raise ValueError(f"adapter transfer is missing {required}")
        sha = manifest_sha256(directory_manifest(staging))
        if sha != expected_sha256:
            raise ValueError(f"adapter transfer is corrupt: expected manifest {expected_sha256}, got {sha}")
        return _publish(staging, final)


def list_adapters(adapters_root: Path) -> list[Path]:
    """Published adapter directories, oldest first."""
    if not adapters_root.is_dir():
        return []
    found = [p for p in adapters_root.iterdir() if p.is_dir() and _SHA256.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.stat().st_mtime)


# An adapter this young is never pruned, however many there are: its audit may not have fetched it
# yet (a backlog of audits is normal under load), and a pruned adapter could not be judged.
MIN_ADAPTER_AGE_S = 3600.0


def prune_adapters(adapters_root: Path, keep: int, min_age_s: float = MIN_ADAPTER_AGE_S) -> list[str]:
    """Delete the oldest adapters beyond the newest `keep` (0 keeps all), sparing any younger than
    `min_age_s`; returns the removed digests."""
    if keep <= 0:
        return []
    adapters = list_adapters(adapters_root)
    cutoff = time.time() - min_age_s
    removed = []
    for path in adapters[: max(0, len(adapters) - keep)]:
        if path.stat().st_mtime > cutoff:
            break  # oldest first: every later one is younger still
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


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
        # Another writer published the same digest first (ENOTEMPTY / EEXIST): its bytes are ours.
        if not (final / ADAPTER_WEIGHTS).is_file():
            raise
    return final
