"""Teacher policy versions on disk: LoRA adapters addressed by their manifest, with their lineage.

root/<version>/ holds what `PeftModel.save_pretrained` writes (adapter_model.safetensors and
adapter_config.json) and lineage.json (the PolicyVersion record). The version is the manifest sha256
of the adapter files alone (`seal.digests.manifest_sha256`), so the address names the weights and
their config, not the bookkeeping. Each version is written in a hidden staging directory and appears
under its final name with one atomic rename: a half-written version is never visible.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from seal.digests import directory_manifest, manifest_sha256
from seal.errors import NotFound
from seal.records import PolicyVersion, from_json, to_dict

LINEAGE = "lineage.json"
# PEFT writes a model card beside the adapter; it says nothing about the weights, so it is dropped.
_MODEL_CARD = "README.md"
STAGING_PREFIX = ".staging-"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class PolicyStore:
    """Saved teacher policies under `root`, one directory per version."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def save(self, peft_model: Any, lineage: PolicyVersion) -> PolicyVersion:
        """Write the adapter and its lineage; returns the lineage with `version` (and `created_at`) filled.

        Equal weights and config give the same version; the one written first is kept.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        try:
            peft_model.save_pretrained(staging, safe_serialization=True)
            (staging / _MODEL_CARD).unlink(missing_ok=True)
            version = manifest_sha256(directory_manifest(staging))
            record = dataclasses.replace(
                lineage, version=version, created_at=lineage.created_at or time.time()
            )
            (staging / LINEAGE).write_text(json.dumps(to_dict(record), indent=2, sort_keys=True) + "\n")
            # mkdtemp makes the directory private (0700); the teacher's other processes read versions too.
            staging.chmod(0o755)
            try:
                os.rename(staging, self.root / version)
            except OSError:
                # Another writer published the same version first (ENOTEMPTY / EEXIST): same weights.
                if not (self.root / version / LINEAGE).is_file():
                    raise
                return self.lineage(version)
            return record
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def get(self, version: str) -> Path:
        """The directory of `version` (loadable with PeftModel.from_pretrained)."""
        if not isinstance(version, str) or not _SHA256.fullmatch(version):
            raise NotFound(f"policy version must be a 64-character lowercase hex digest, got {version!r}")
        path = self.root / version
        if not (path / LINEAGE).is_file():
            raise NotFound(
                f"no policy version {version} in {self.root}; list the saved ones with PolicyStore.list()"
            )
        return path

    def lineage(self, version: str) -> PolicyVersion:
        path = self.get(version) / LINEAGE
        try:
            return from_json(PolicyVersion, path.read_text())
        except ValueError as exc:  # bad JSON, or a record that does not fit (RecordError)
            raise ValueError(f"policy version {version} has an unreadable {LINEAGE}: {exc}") from exc

    def list(self) -> builtins.list[PolicyVersion]:
        """Every saved version, newest first."""
        if not self.root.is_dir():
            return []
        versions = [self.lineage(p.name) for p in self.root.iterdir() if _SHA256.fullmatch(p.name)]
        return sorted(versions, key=lambda v: v.created_at, reverse=True)
