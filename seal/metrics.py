"""Prometheus metrics of every service: queue depth, task latency, retries, dead letters, training
speed, verdicts and submitted jobs.

The metrics live in prometheus_client's default registry, so the gateway's HTTP app (which mounts
prometheus_client's ASGI app at /metrics) and the standalone `/metrics` server that `expose` starts
on `metrics_listen` serve the same numbers. Worker metrics carry the service kind (the consumer
group) and the stream; queue depth is read from Redis at scrape time, so it is exact even while a
worker is busy with a long task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# From a few milliseconds (a replayed event) to half an hour (a backlog of real-model trainings).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

TASKS_COMPLETED = Counter(
    "seal_tasks_completed",
    "Tasks acknowledged after success (a redelivered task whose result was stored counts again).",
    ["service", "stream"],
)
TASK_LATENCY = Histogram(
    "seal_task_latency_seconds",
    "From enqueue (the stream entry's id) to acknowledgement, retries included.",
    ["service", "stream"],
    buckets=LATENCY_BUCKETS,
)
TASK_DURATION = Histogram(
    "seal_task_duration_seconds",
    "Time the handler spent computing a result; its count is how many results were computed, "
    "so a count above the tasks enqueued means work was done twice.",
    ["service", "stream"],
    buckets=LATENCY_BUCKETS,
)
TASK_RETRIES = Counter(
    "seal_task_retries", "Failed deliveries scheduled to be tried again.", ["service", "stream"]
)
DEAD_LETTERS = Counter(
    "seal_dead_letters", "Tasks given up on and moved to the dead-letter stream.", ["service", "stream"]
)
TRAINING_STEPS = Counter("seal_training_steps", "Optimizer steps taken by LoRA updates (student).")
TRAINING_STEPS_PER_SECOND = Gauge(
    "seal_training_steps_per_second", "Optimizer steps per second of the latest LoRA update (student)."
)
VERDICTS = Counter("seal_verdicts", "Signed verdicts by outcome (auditor).", ["outcome"])
JOBS_SUBMITTED = Counter("seal_jobs_submitted", "Jobs accepted and queued (gateway).")


# --- one-line hooks for the work plane and the services -------------------------------------------


def task_completed(service: str, stream: str, message_id: Any) -> None:
    """A task was acknowledged after success; its latency runs from the enqueue time in its id."""
    TASKS_COMPLETED.labels(service, stream).inc()
    enqueued = enqueue_time(message_id)
    if enqueued is not None:
        TASK_LATENCY.labels(service, stream).observe(max(0.0, time.time() - enqueued))


@contextmanager
def handling(service: str, stream: str) -> Iterator[None]:
    """Time a handler; only a handler that returns is observed (a failure is counted as a retry)."""
    started = time.perf_counter()
    yield
    TASK_DURATION.labels(service, stream).observe(time.perf_counter() - started)


def task_retried(service: str, stream: str) -> None:
    TASK_RETRIES.labels(service, stream).inc()


def task_dead_lettered(service: str, stream: str) -> None:
    DEAD_LETTERS.labels(service, stream).inc()


def training_done(steps: int, seconds: float) -> None:
    TRAINING_STEPS.inc(steps)
    if seconds > 0:
        TRAINING_STEPS_PER_SECOND.set(steps / seconds)


def verdict_signed(passed: bool) -> None:
    VERDICTS.labels("passed" if passed else "failed").inc()


def job_submitted() -> None:
    JOBS_SUBMITTED.inc()


def enqueue_time(message_id: Any) -> float | None:
    """Unix time (s) a stream entry was added: Redis ids are "<milliseconds>-<sequence>"."""
    raw = message_id.decode() if isinstance(message_id, bytes) else str(message_id)
    millis, _, _ = raw.partition("-")
    return int(millis) / 1000 if millis.isdigit() else None


# --- queue depth, read at scrape time ------------------------------------------------------------


class QueueDepthCollector(Collector):
    """Backlog of the streams a service consumes, from XINFO GROUPS when Prometheus scrapes.

    `seal_queue_depth` = entries the group has not yet read (lag) + entries read but not yet
    acknowledged (in flight); `seal_queue_in_flight` is the second part alone.
    """

    def __init__(self, client: redis.Redis, queues: Iterable[tuple[str, str, str]]) -> None:
        self.client = client
        self.queues = list(queues)
        """(stream name, its Redis key, consumer group)"""

    def describe(self) -> list[Any]:
        return []  # registering must not touch Redis (the default would call collect)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "seal_queue_depth", "Tasks waiting or in flight for a consumer group.", labels=["stream", "group"]
        )
        in_flight = GaugeMetricFamily(
            "seal_queue_in_flight", "Tasks delivered but not yet acknowledged.", labels=["stream", "group"]
        )
        for stream, key, group in self.queues:
            try:
                info = _group_info(self.client, key, group)
            except redis.RedisError as exc:  # a scrape must answer even while Redis is away
                log.warning("queue depth unavailable", extra={"stream": stream, "error": str(exc)})
                continue
            if info is None:
                continue
            pending = int(info["pending"])
            lag = info.get("lag")
            if lag is None:  # Redis < 7, or a lag Redis cannot tell (entries deleted mid-range)
                lag = _unread_count(self.client, key, info["last-delivered-id"])
            depth.add_metric([stream, group], int(lag) + pending)
            in_flight.add_metric([stream, group], pending)
        yield depth
        yield in_flight


def _group_info(client: redis.Redis, key: str, group: str) -> dict[str, Any] | None:
    try:
        groups = client.xinfo_groups(key)
    except redis.ResponseError:  # the stream does not exist (yet)
        return None
    for info in groups:
        name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
        if name == group:
            return info
    return None


def _unread_count(client: redis.Redis, key: str, last_delivered: Any, cap: int = 10_000) -> int:
    """Entries after the group's last delivered one, counted up to `cap` (a scrape must stay cheap)."""
    start = last_delivered.decode() if isinstance(last_delivered, bytes) else str(last_delivered)
    entries: Any = client.xrange(key, min="(" + start, max="+", count=cap)
    return len(entries)


# --- exposing them --------------------------------------------------------------------------------


def expose(service: str, listen: str, workers: Iterable[Any], registry: Any = REGISTRY) -> Callable[[], None]:
    """Publish `service`'s metrics: queue depth of its workers' streams, their label sets at zero,
    and a `/metrics` HTTP server on `listen` (host:port; empty: none). Returns the stop callback."""
    workers = list(workers)
    for w in workers:  # known series show up as 0 before the first task, not as absent
        TASKS_COMPLETED.labels(w.group, w.stream)
        TASK_LATENCY.labels(w.group, w.stream)
        TASK_DURATION.labels(w.group, w.stream)
        TASK_RETRIES.labels(w.group, w.stream)
        DEAD_LETTERS.labels(w.group, w.stream)
    collector = None
    if workers:
        client = workers[0].plane.redis
        collector = QueueDepthCollector(
            client, [(w.stream, w.plane.stream_key(w.stream), w.group) for w in workers]
        )
        registry.register(collector)
    server = None
    if listen:
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
        log.info("metrics served", extra={"service": service, "port": server.server_port})

    def stop() -> None:
        if server is not None:
            server.shutdown()
            server.server_close()
        if collector is not None:
            registry.unregister(collector)

    return stop
