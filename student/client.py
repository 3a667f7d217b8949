"""Fetch an adapter's bytes from the student that trained it, verified against its sha256."""

from __future__ import annotations

from pathlib import Path

import grpc

from seal.server import GRPC_OPTIONS
from seal.v1 import student_pb2, student_pb2_grpc
from student.artifacts import adapter_path, write_adapter_chunks


def fetch_adapter(address: str, sha256: str, adapters_root: Path, timeout_s: float = 300.0) -> Path:
    """The local directory of adapter `sha256`, downloading it from `address` if not here yet."""
    local = adapter_path(adapters_root, sha256)
    if local.is_dir():
        return local
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = student_pb2_grpc.StudentStub(channel)
        chunks = stub.FetchAdapter(student_pb2.FetchAdapterRequest(sha256=sha256), timeout=timeout_s)
        return write_adapter_chunks(((c.filename, c.offset, c.data) for c in chunks), adapters_root, sha256)
