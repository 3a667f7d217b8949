"""The gateway's side of the work plane: fold service events and dead letters into job state."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc

from auditor.signing import verify_verdict
from gateway.core import job_id_of_task
from gateway.jobs import JobStore
from seal.records import JobState, Verdict, from_dict
from seal.server import GRPC_OPTIONS
from seal.v1 import auditor_pb2, auditor_pb2_grpc

log = logging.getLogger(__name__)

KeyFetcher = Callable[[], tuple[str, bytes]]


class SigningKeys:
    """The auditor's public keys by key id, fetched on first sight of a new id."""

    def __init__(self, fetch: KeyFetcher) -> None:
        self._fetch = fetch
        self._keys: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def verify(self, verdict: Verdict) -> bool:
        with self._lock:
            if verdict.auditor_key_id not in self._keys:
                key_id, public_key = self._fetch()
                self._keys[key_id] = public_key
            key = self._keys.get(verdict.auditor_key_id)
        return key is not None and verify_verdict(verdict, key)


def auditor_key_fetcher(address: str, timeout_s: float = 10.0) -> KeyFetcher:
    def fetch() -> tuple[str, bytes]:
        with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
            key = auditor_pb2_grpc.AuditorStub(channel).GetSigningKey(
                auditor_pb2.GetSigningKeyRequest(), timeout=timeout_s, wait_for_ready=True
            )
        return key.key_id, key.public_key

    return fetch


def event_handler(store: JobStore, keys: SigningKeys) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def proposed(event: dict[str, Any]) -> None:
        for se in event["self_edits"]:
            store.record(event["job_id"], se["id"], "self_edit", se)
        store.set_state(event["job_id"], JobState.RUNNING)

    def trained(event: dict[str, Any]) -> None:
        store.record(event["job_id"], event["self_edit_id"], "adapter", event["adapter"])

    def verdict(event: dict[str, Any]) -> None:
        record = from_dict(Verdict, event["verdict"])
        if not keys.verify(record):
            log.error("verdict signature invalid", extra={"self_edit_id": record.self_edit_id})
            store.set_state(
                event["job_id"],
                JobState.FAILED,
                error=f"verdict for {record.self_edit_id} is not signed by the auditor; refused",
            )
            return
        store.record(event["job_id"], event["self_edit_id"], "verdict", event["verdict"])
        store.finish_if_complete(event["job_id"])

    handlers = {"proposed": proposed, "trained": trained, "verdict": verdict}

    def handle(event: dict[str, Any]) -> dict[str, Any]:
        handlers[event["type"]](event)
        return {"applied": event["type"]}

    return handle


def dead_letter_handler(store: JobStore) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A task that kept failing fails its job, with the reason the service gave."""

    def handle(letter: dict[str, Any]) -> dict[str, Any]:
        job_id = job_id_of_task(letter["stream"], letter["payload"])
        if job_id:
            reason = f"{letter['stream']} task {letter['task_id']} failed ({letter['attempts']} attempts): {letter['reason']}"
            store.set_state(job_id, JobState.FAILED, error=reason)
        return {"job_id": job_id}

    return handle
