"""Fetch an adapter's bytes from a registered student that holds it, verified against its manifest.

No address from a task or request is ever dialled: the adapter names the student that trained it by
id, and addresses come from the registry (`seal.registry`). A student that is briefly away (restarting,
or back on another port) delays the fetch, with backoff for up to `wait_s`, instead of failing it.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from seal.errors import InvalidArgument, PermanentError
from seal.records import AdapterRef
from seal.registry import StudentRegistry
from seal.server import GRPC_OPTIONS
from seal.tls import TlsFiles, channel
from seal.v1 import student_pb2, student_pb2_grpc
from student.artifacts import TransferLimitError, adapter_path, verify_adapter, write_adapter_chunks

log = logging.getLogger(__name__)


class AdapterTooLarge(PermanentError):
    """The adapter is over the receiver's byte or file cap: fetching it again will not help."""


class StudentUnavailable(RuntimeError):
    """No registered student served the adapter within the wait; the task is retried later."""


def fetch_adapter(
    address: str,
    sha256: str,
    adapters_root: Path,
    max_bytes: int = 512 * 1024 * 1024,
    max_files: int = 8,
    timeout_s: float = 300.0,
    tls: TlsFiles | None = None,
) -> Path:
    """Download adapter `sha256` from the student at `address` (a registered one), within the caps."""
    with channel(address, tls, options=GRPC_OPTIONS) as ch:
        stub = student_pb2_grpc.StudentStub(ch)
        chunks = stub.FetchAdapter(student_pb2.FetchAdapterRequest(sha256=sha256), timeout=timeout_s)
        return write_adapter_chunks(
            ((c.filename, c.offset, c.data) for c in chunks), adapters_root, sha256, max_bytes, max_files
        )


def fetch_registered(
    registry: StudentRegistry,
    adapter: AdapterRef,
    adapters_root: Path,
    max_bytes: int,
    max_files: int,
    wait_s: float = 600.0,
    sleep: Callable[[float], None] = time.sleep,
    tls: TlsFiles | None = None,
) -> Path:
    """The verified local copy of `adapter`, fetched from any registered student that holds it."""
    try:
        local = adapter_path(adapters_root, adapter.sha256)
    except ValueError as exc:
        raise InvalidArgument("adapter.sha256", str(exc)) from None
    if local.is_dir():
        try:
            verify_adapter(local)
            return local
        except ValueError:  # a damaged copy (disk, or edited by hand): fetch it again
            log.warning(
                "local copy of the adapter is damaged; fetching it again", extra={"sha256": adapter.sha256}
            )
            shutil.rmtree(local, ignore_errors=True)
    declared = sum(f.size for f in adapter.files)
    if declared > max_bytes or len(adapter.files) > max_files:
        raise AdapterTooLarge(
            f"adapter {adapter.sha256[:16]}… declares {len(adapter.files)} files, {declared} bytes; "
            f"this auditor accepts at most {max_files} files, {max_bytes} bytes"
        )
    deadline = time.monotonic() + wait_s
    delay = 1.0
    while True:
        failures = []
        for student_id in dict.fromkeys([adapter.student_id, *registry.holders(adapter.sha256)]):
            address = registry.address(student_id)
            if address is None:
                failures.append(f"{student_id or '(none)'}: not registered")
                continue
            try:
                return fetch_adapter(address, adapter.sha256, adapters_root, max_bytes, max_files, tls=tls)
            except TransferLimitError as exc:
                raise AdapterTooLarge(str(exc)) from None
            except (grpc.RpcError, ValueError) as exc:  # away, not holding it, or a corrupt transfer
                failures.append(f"{student_id} at {address}: {_describe(exc)}")
        if time.monotonic() + delay > deadline:
            raise StudentUnavailable(
                f"no registered student served adapter {adapter.sha256[:16]}… within {wait_s:.0f} s: "
                + "; ".join(failures)
            )
        log.warning("adapter not fetched yet, retrying", extra={"delay_s": delay, "tried": failures})
        sleep(delay)
        delay = min(delay * 2, 30.0)


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name} {exc.details()}"  # type: ignore[attr-defined]
    return str(exc)
