"""The auditor fetches adapters only from registered students, within caps, and waits out an outage.

Real Redis (the registry), real gRPC student servers on loopback serving a real adapter directory.
The foundation dialled whatever address a task named; these cases had no answer there.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from seal.digests import directory_manifest, manifest_sha256
from seal.records import AdapterRef
from seal.registry import StudentRegistry
from seal.server import ServiceProcess
from seal.v1 import student_pb2, student_pb2_grpc
from seal.validation import Limits
from student.client import AdapterTooLarge, StudentUnavailable, fetch_registered
from student.service import StudentEngine, StudentServicer


def _adapter_dir(root: Path) -> tuple[str, Path]:
    staging = root / "staging"
    staging.mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(b"\x00weights" * 1000)
    (staging / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (staging / "provenance.json").write_text("{}")
    sha = manifest_sha256(directory_manifest(staging))
    staging.rename(root / sha)
    return sha, root / sha


def _ref(sha: str, path: Path, student_id: str) -> AdapterRef:
    files = directory_manifest(path)
    return AdapterRef(sha, "e1", "tiny", "f" * 64, sum(f.size for f in files), 1.0, 1, 0.1, student_id, files)


def _student(adapters_root: Path) -> ServiceProcess:
    engine = StudentEngine(None, None, "tiny", "f" * 64, adapters_root, Limits())

    def register(server: grpc.Server) -> list[str]:
        student_pb2_grpc.add_StudentServicer_to_server(StudentServicer(engine), server)
        return [student_pb2.DESCRIPTOR.services_by_name["Student"].full_name]

    process = ServiceProcess("student", "127.0.0.1:0", register)
    process.start()
    return process


@pytest.fixture()
def held(tmp_path: Path, plane):
    """An adapter held by a running student whose registration the test controls."""
    sha, path = _adapter_dir(tmp_path / "student")
    server = _student(tmp_path / "student")
    yield StudentRegistry(plane), _ref(sha, path, "student-a"), f"127.0.0.1:{server.port}"
    server.drain(grace_s=0)


def test_the_adapter_comes_from_the_registered_address_and_is_verified(held, tmp_path: Path) -> None:
    registry, ref, address = held
    registry.register("student-a", address)
    local = fetch_registered(registry, ref, tmp_path / "auditor", 10**6, 8, wait_s=5)
    assert local == tmp_path / "auditor" / ref.sha256
    assert manifest_sha256(directory_manifest(local)) == ref.sha256


def test_an_unregistered_student_is_never_dialled_and_the_fetch_gives_up_clearly(
    held, tmp_path: Path
) -> None:
    registry, ref, _ = held
    slept: list[float] = []
    with pytest.raises(StudentUnavailable, match="student-a: not registered"):
        fetch_registered(registry, ref, tmp_path / "auditor", 10**6, 8, wait_s=3.5, sleep=slept.append)
    assert slept == [1.0, 2.0]  # backoff doubles
    assert not (tmp_path / "auditor").exists() or not any((tmp_path / "auditor").iterdir())


def test_a_student_away_then_back_on_another_address_delays_the_fetch_but_does_not_fail_it(
    held, tmp_path: Path
) -> None:
    registry, ref, address = held
    registry.register("student-a", "127.0.0.1:1")  # registered, but nothing answers there (it died)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:  # back, on another port
            registry.register("student-a", address)

    local = fetch_registered(registry, ref, tmp_path / "auditor", 10**6, 8, wait_s=600, sleep=sleep)
    assert local.name == ref.sha256 and slept == [1.0, 2.0, 4.0]


def test_any_registered_holder_can_serve_the_adapter(held, tmp_path: Path) -> None:
    registry, ref, address = held
    registry.register("student-b", address)  # the trainer (student-a) is gone; b holds a copy
    registry.add_holder(ref.sha256, "student-b")
    local = fetch_registered(registry, ref, tmp_path / "auditor", 10**6, 8, wait_s=5, sleep=lambda s: None)
    assert local.name == ref.sha256


def test_an_adapter_over_the_caps_is_refused_before_and_during_transfer(held, tmp_path: Path) -> None:
    registry, ref, address = held
    registry.register("student-a", address)
    with pytest.raises(AdapterTooLarge, match="at most 2 files"):
        fetch_registered(registry, ref, tmp_path / "auditor", 10**6, 2, wait_s=5)
    # A reference that understates its size is caught while the bytes arrive.
    small = ref.__class__(**{**ref.__dict__, "files": ref.files[:1]})
    with pytest.raises(AdapterTooLarge, match="exceeds 100 bytes"):
        fetch_registered(registry, small, tmp_path / "auditor", 100, 8, wait_s=5)
    assert not any((tmp_path / "auditor").iterdir())


def test_a_registration_lapses_without_renewal(plane) -> None:
    registry = StudentRegistry(plane, ttl_s=1)
    registry.register("student-x", "127.0.0.1:5")
    assert registry.address("student-x") == "127.0.0.1:5"
    assert 0 < plane.redis.ttl(plane.key("students", "student-x")) <= 1
    registry.unregister("student-x")
    assert registry.address("student-x") is None


def test_a_damaged_local_copy_is_fetched_again(held, tmp_path: Path) -> None:
    registry, ref, address = held
    registry.register("student-a", address)
    local = fetch_registered(registry, ref, tmp_path / "auditor", 10**6, 8, wait_s=5)
    (local / "adapter_config.json").write_text('{"r": 64, "lora_alpha": 512}')  # altered on disk
    again = fetch_registered(registry, ref, tmp_path / "auditor", 10**6, 8, wait_s=5)
    assert manifest_sha256(directory_manifest(again)) == ref.sha256


def test_a_malformed_adapter_digest_is_invalid_argument_not_retried(held, tmp_path: Path) -> None:
    from seal.errors import InvalidArgument

    registry, ref, _ = held
    bad = ref.__class__(**{**ref.__dict__, "sha256": "../../etc"})
    with pytest.raises(InvalidArgument, match="adapter.sha256"):
        fetch_registered(registry, bad, tmp_path / "auditor", 10**6, 8, wait_s=5)
