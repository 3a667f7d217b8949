"""Process-level helpers shared by the composition roots (no work happens at import time)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import redis

from seal.config import ServiceConfig
from seal.killswitch import KillSwitchWatch
from seal.models import load_model, model_fingerprint, resolve_model
from seal.workplane import BatchHandler, Followups, Handler, Worker, WorkPlane, wait_for_redis

log = logging.getLogger(__name__)


# Connections one process may hold: its RPC threads (the gateway runs max_watchers + 8 of them), its
# workers and heartbeats, with room to spare. A burst beyond waits for a free connection.
def redis_pool_size(config: ServiceConfig) -> int:
    return config.max_watchers + 64


def connect_plane(config: ServiceConfig) -> WorkPlane:
    """The work plane over a blocking connection pool: a burst of requests waits (up to 20 s) for a
    connection instead of failing with "Too many connections", as redis-py's default pool of 100 did
    when 200 jobs were submitted at once (benchmarks/load.py)."""
    pool = redis.BlockingConnectionPool.from_url(
        config.redis_url, max_connections=redis_pool_size(config), timeout=20, health_check_interval=30
    )
    client = redis.Redis(connection_pool=pool)
    wait_for_redis(client)
    return WorkPlane(client, config.namespace)


def consumer_name(config: ServiceConfig) -> str:
    """Unique per process, so the group can tell whose pending tasks are whose."""
    return f"{config.kind}-{socket.gethostname()}-{os.getpid()}"


def set_threads(config: ServiceConfig) -> None:
    if config.threads > 0:
        import torch

        torch.set_num_threads(config.threads)


def load_base_model(config: ServiceConfig) -> tuple[Any, Any, Path, str]:
    """(model, tokenizer, model_dir, fingerprint) of the configured base model."""
    set_threads(config)
    model_dir = resolve_model(config.model)
    fingerprint = model_fingerprint(model_dir)
    model, tokenizer = load_model(model_dir, device=config.device, dtype=config.dtype)
    log.info("model loaded", extra={"model": config.model, "fingerprint": fingerprint[:16]})
    return model, tokenizer, model_dir, fingerprint


def make_worker(
    config: ServiceConfig,
    plane: WorkPlane,
    stream: str,
    handle: Handler,
    followups: Followups | None = None,
    pausable: bool = True,
    handle_batch: BatchHandler | None = None,
    batch_size: int = 1,
) -> Worker:
    """This service's worker on `stream`, in the consumer group named after the service kind.

    A `pausable` worker (every adaptation task) stops taking tasks while the kill switch is on; the
    gateway's events and dead letters are not pausable: results of work in flight still land.
    """
    return Worker(
        plane,
        stream,
        group=config.kind,
        consumer=consumer_name(config),
        handle=handle,
        followups=followups or (lambda payload, result: []),
        visibility_timeout_s=config.visibility_timeout_s,
        max_attempts=config.max_attempts,
        paused=KillSwitchWatch(plane).on if pausable else None,
        handle_batch=handle_batch,
        batch_size=batch_size,
    )
