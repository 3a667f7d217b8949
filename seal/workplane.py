"""The Redis work plane: task streams, consumer groups, idempotent results, reclaim and dead letters.

Each service kind reads one stream through one consumer group, so any number of hosts of a kind
share the work. Delivery is at least once; these rules make it safe:
- a task's result is stored under its task id before the message is acknowledged, so a redelivered
  task finds its result and is not computed twice;
- follow-up tasks are enqueued with an atomic "set marker if absent, then XADD", keyed by task id,
  so replaying a follow-up step never duplicates work downstream;
- a worker that dies leaves its message pending; after the visibility timeout another worker takes
  it over (XAUTOCLAIM). Long tasks keep their claim fresh with a heartbeat (XCLAIM ... JUSTID);
- a task that fails `max_attempts` times, or raises PermanentError, goes to the dead-letter stream
  with its reason.

State stays bounded: an acknowledged entry is deleted from its stream (each stream has one consumer
group, so nobody else still needs it), every key written here expires, and the events and
dead-letter streams are capped. A worker whose consumer group vanished (Redis restarted without its
data) re-creates it and goes on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis

from seal import metrics
from seal.errors import PermanentError
from seal.records import DeadLetter
from seal.tasks import encode

log = logging.getLogger(__name__)

STREAMS = ("propose", "apply", "audit", "policy", "certify", "events", "dead")
RESULT_TTL_S = 7 * 24 * 3600
# Approximate caps (XADD MAXLEN ~). Task streams are never capped: trimming would drop work. Events
# are deleted once folded, so the cap only bites on a backlog this deep; dead letters are kept for
# operators (not deleted on ack), so the cap is all that bounds them.
STREAM_CAPS = {"events": 100_000, "dead": 10_000}
KEPT_AFTER_ACK = frozenset({"dead"})
CONSUMER_FORGET_AFTER_S = 24 * 3600

# KEYS[1] marker, KEYS[2] stream; ARGV task_id, payload, ttl, cap (0: none). Atomic: a crash cannot
# leave the marker set without the stream entry (which would lose the task) or add an entry twice.
_ENQUEUE_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then
  if tonumber(ARGV[4]) > 0 then
    return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'task_id', ARGV[1], 'payload', ARGV[2])
  end
  return redis.call('XADD', KEYS[2], '*', 'task_id', ARGV[1], 'payload', ARGV[2])
end
return false
"""


@dataclass(frozen=True)
class Task:
    stream: str
    task_id: str
    payload: dict[str, Any]


class WorkPlane:
    """Names and primitive operations over one namespace of Redis keys."""

    def __init__(self, client: redis.Redis, namespace: str = "seal") -> None:
        self.redis = client
        self.namespace = namespace
        self._enqueue_once = client.register_script(_ENQUEUE_ONCE)

    def key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    def stream_key(self, stream: str) -> str:
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}; streams are {', '.join(STREAMS)}")
        return self.key("stream", stream)

    def ensure_group(self, stream: str, group: str) -> None:
        try:
            self.redis.xgroup_create(self.stream_key(stream), group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def enqueue(self, task: Task, pipeline: redis.client.Pipeline | None = None) -> bool:
        """Add a task unless one with the same id was ever added to that stream. True if added.

        With `pipeline`, the enqueue joins the caller's transaction (and the result comes from it).
        """
        marker = self.key("enqueued", task.stream, task.task_id)
        added = self._enqueue_once(
            keys=[marker, self.stream_key(task.stream)],
            args=[task.task_id, json.dumps(task.payload), RESULT_TTL_S, STREAM_CAPS.get(task.stream, 0)],
            client=pipeline,
        )
        return added is not None

    def store_result(self, stream: str, task_id: str, result: dict[str, Any]) -> None:
        self.redis.set(self.key("result", stream, task_id), json.dumps(result), ex=RESULT_TTL_S)

    def result(self, stream: str, task_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(self.key("result", stream, task_id))
        return None if raw is None else json.loads(raw)

    def dead_letter(
        self, stream: str, task_id: str, payload: dict[str, Any], reason: str, attempts: int
    ) -> None:
        self.redis.xadd(
            self.stream_key("dead"),
            {
                "task_id": f"{stream}/{task_id}",
                "payload": json.dumps(
                    encode(
                        DeadLetter(
                            stream=stream,
                            task_id=task_id,
                            payload_json=json.dumps(payload),
                            reason=reason,
                            attempts=attempts,
                        )
                    )
                ),
            },
            maxlen=STREAM_CAPS["dead"],
            approximate=True,
        )

    def pending_count(self, stream: str, group: str) -> int:
        return int(self.redis.xpending(self.stream_key(stream), group)["pending"])

    def forget_idle_consumers(self, stream: str, group: str, idle_s: float = CONSUMER_FORGET_AFTER_S) -> int:
        """Delete the group's consumers that hold no task and were idle `idle_s`: every process
        joins under a name of its own, so without this a group collects one per restart.

        A consumer that still holds tasks is kept: deleting it would drop them unacknowledged."""
        forgotten = 0
        for consumer in self.redis.xinfo_consumers(self.stream_key(stream), group):
            if consumer["pending"] == 0 and consumer["idle"] >= idle_s * 1000:
                self.redis.xgroup_delconsumer(self.stream_key(stream), group, consumer["name"])
                forgotten += 1
        return forgotten


Handler = Callable[[dict[str, Any]], dict[str, Any]]
BatchHandler = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
Followups = Callable[[dict[str, Any], dict[str, Any]], list[Task]]


@dataclass
class Worker:
    """Consumes one stream for one consumer group: handle -> store result -> enqueue follow-ups -> ack."""

    plane: WorkPlane
    stream: str
    group: str
    consumer: str
    handle: Handler
    followups: Followups = field(default=lambda payload, result: [])
    visibility_timeout_s: float = 120.0
    max_attempts: int = 3
    retry_backoff_s: float = 2.0
    paused: Callable[[], bool] | None = None
    """While this says True (the kill switch), the worker takes no new task; one in flight finishes."""
    handle_batch: BatchHandler | None = None
    """Handles several tasks in one call and returns one result per payload, in order (the student
    trains their adapters in one batched pass). Used when `batch_size` > 1 and more than one task is
    waiting; if it raises, each task of the batch is handled alone by `handle`, so a bad task fails
    only itself and is retried or dead-lettered on its own attempts."""
    batch_size: int = 1
    """Most tasks taken at once for `handle_batch`."""
    batch_linger_s: float = 0.25
    """After the first task of a batch arrives, how long to wait for more to fill it (the tasks of
    one round are enqueued one after another); short against the training a batch saves."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self._stream_key = self.plane.stream_key(self.stream)
        self.plane.ensure_group(self.stream, self.group)

    def run(self, stop: threading.Event, block_ms: int = 1000) -> None:
        log.info(
            "worker started", extra={"stream": self.stream, "group": self.group, "consumer": self.consumer}
        )
        try:
            self.plane.forget_idle_consumers(self.stream, self.group)
        except redis.RedisError as exc:  # housekeeping only: the next start tries again
            log.warning("could not forget idle consumers", extra={"error": str(exc)})
        while not stop.is_set():
            try:
                if self.paused is not None and self.paused():
                    stop.wait(1.0)
                    continue
                self.poll_once(block_ms)
            except redis.RedisError as exc:
                log.warning("redis unavailable, retrying", extra={"error": str(exc)})
                stop.wait(1.0)
        log.info("worker stopped", extra={"stream": self.stream, "consumer": self.consumer})

    def poll_once(self, block_ms: int = 1000) -> int:
        """Process the tasks waiting, up to `batch_size` with a `handle_batch` (else one): reclaimed
        stuck ones first, else new ones. Returns how many.

        A missing consumer group (Redis came back without its data) is re-created from the start of
        the stream, which holds only unacknowledged entries, so nothing done is delivered again.
        """
        try:
            count = self.batch_size if self.handle_batch is not None else 1
            messages: Any = self.reclaim_stuck_tasks(count=count)
            if not messages:
                reply: Any = self.plane.redis.xreadgroup(
                    self.group, self.consumer, {self._stream_key: ">"}, count=count, block=block_ms
                )
                messages = reply[0][1] if reply else []
            if messages and len(messages) < count:
                messages += self._linger(count - len(messages))
            if len(messages) > 1:
                self._process_batch(messages)
            elif messages:
                self._process(*messages[0])
        except redis.ResponseError as exc:
            if _is_nogroup(exc):
                log.warning(
                    "consumer group missing (Redis lost its data?); re-creating it",
                    extra={"stream": self.stream, "group": self.group},
                )
                self.plane.ensure_group(self.stream, self.group)
                return 0
            raise
        return len(messages)

    def _linger(self, room: int) -> list[Any]:
        """Up to `room` more new tasks, waiting at most `batch_linger_s` for them."""
        more: list[Any] = []
        deadline = time.monotonic() + self.batch_linger_s
        while len(more) < room and (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            reply: Any = self.plane.redis.xreadgroup(
                self.group, self.consumer, {self._stream_key: ">"}, count=room - len(more), block=left_ms
            )
            if not reply:
                break
            more += reply[0][1]
        return more

    def reclaim_stuck_tasks(self, count: int = 1) -> list[tuple[str, dict[str, str]]]:
        """Take over tasks whose worker went quiet for longer than the visibility timeout."""
        reply = self.plane.redis.xautoclaim(
            self._stream_key,
            self.group,
            self.consumer,
            min_idle_time=int(self.visibility_timeout_s * 1000),
            start_id="0-0",
            count=count,
        )
        claimed = [(mid, f) for mid, f in reply[1] if f]  # entries deleted meanwhile come back empty
        for mid, _ in claimed:
            log.info("reclaimed stuck task", extra={"stream": self.stream, "message_id": mid.decode()})
        return claimed

    def _process(self, msg_id: Any, fields: dict[bytes, bytes]) -> None:
        attempts = self._count_attempt(msg_id, fields)
        if attempts is not None:
            self._run(msg_id, fields, attempts)

    def _process_batch(self, messages: list[tuple[Any, dict[bytes, bytes]]]) -> None:
        """Hand the tasks that still need computing to `handle_batch` in one call; a task already
        computed (its result stored) or unreadable takes the single path, and so does every task of
        a batch whose call failed."""
        waiting: list[tuple[Any, dict[bytes, bytes], int, dict[str, Any]]] = []
        for msg_id, fields in messages:
            attempts = self._count_attempt(msg_id, fields)
            if attempts is None:
                continue
            payload = _loads_or_none(fields)
            task_id = fields.get(b"task_id", b"").decode()
            if payload is None or self.plane.result(self.stream, task_id) is not None:
                self._run(msg_id, fields, attempts)
            else:
                waiting.append((msg_id, fields, attempts, payload))
        if len(waiting) < 2 or self.handle_batch is None:
            for msg_id, fields, attempts, _ in waiting:
                self._run(msg_id, fields, attempts)
            return
        try:
            with self._heartbeat(*(m for m, *_ in waiting)), metrics.handling(self.group, self.stream):
                results = self.handle_batch([payload for *_, payload in waiting])
            if len(results) != len(waiting):
                raise RuntimeError(f"handle_batch gave {len(results)} results for {len(waiting)} tasks")
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # Redis is gone: the tasks stay pending and are retried once it is back
        except Exception as exc:  # noqa: BLE001 - one bad task must not fail the others: one at a time
            log.warning(
                "batch failed; handling its tasks one at a time",
                extra={"stream": self.stream, "tasks": len(waiting), "error": f"{type(exc).__name__}: {exc}"},
            )
            for msg_id, fields, attempts, _ in waiting:
                self._run(msg_id, fields, attempts)
            return
        for (msg_id, fields, attempts, _), result in zip(waiting, results, strict=True):
            self._run(msg_id, fields, attempts, computed=result)

    def _count_attempt(self, msg_id: Any, fields: dict[bytes, bytes]) -> int | None:
        """Count this delivery; None (the task dead-lettered and acked) once it has had too many."""
        task_id = fields.get(b"task_id", b"").decode()
        # Counted before the work, so a task that crashes its worker every time still runs out of tries.
        attempts = int(self.plane.redis.incr(self._attempts_key(task_id)))
        self.plane.redis.expire(self._attempts_key(task_id), RESULT_TTL_S)
        if attempts > self.max_attempts:  # every earlier delivery died with its worker
            reason = f"gave up after {attempts - 1} deliveries whose workers died mid-task"
            self.plane.dead_letter(self.stream, task_id, _loads_or_empty(fields), reason, attempts - 1)
            self._ack(msg_id, task_id)
            metrics.task_dead_lettered(self.group, self.stream)
            return None
        return attempts

    def _run(
        self,
        msg_id: Any,
        fields: dict[bytes, bytes],
        attempts: int,
        computed: dict[str, Any] | None = None,
    ) -> None:
        """Handle (unless `computed` by a batch, or stored by an earlier delivery), store the result,
        enqueue the follow-ups, ack; a failure is retried later or dead-lettered."""
        task_id = fields.get(b"task_id", b"").decode()
        payload: dict[str, Any] = {}
        try:
            payload = json.loads(fields[b"payload"])
            result = computed
            if result is None:
                result = self.plane.result(self.stream, task_id)
            if result is None:
                with self._heartbeat(msg_id), metrics.handling(self.group, self.stream):
                    result = self.handle(payload)
                computed = result
            if computed is not None:
                self.plane.store_result(self.stream, task_id, result)
            for task in self.followups(payload, result):
                self.plane.enqueue(task)
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # Redis is gone: the task stays pending and is retried once it is back
        except Exception as exc:  # noqa: BLE001 - a failed task is recorded, never fatal to the worker
            self._fail(msg_id, task_id, payload, exc, attempts)
            return
        self._ack(msg_id, task_id)
        metrics.task_completed(self.group, self.stream, msg_id)

    def _ack(self, msg_id: Any, task_id: str = "") -> None:
        """Acknowledge, and delete the entry so the stream holds only work not yet done."""
        pipe = self.plane.redis.pipeline(transaction=True)
        pipe.xack(self._stream_key, self.group, msg_id)
        if self.stream not in KEPT_AFTER_ACK:
            pipe.xdel(self._stream_key, msg_id)
        if task_id:
            pipe.delete(self._attempts_key(task_id))
        pipe.execute()

    def _fail(
        self, msg_id: Any, task_id: str, payload: dict[str, Any], exc: Exception, attempts: int
    ) -> None:
        """Retry after a short backoff, or dead-letter: at the last attempt, or at once if it can never work."""
        log.exception("task failed", extra={"stream": self.stream, "task_id": task_id, "attempt": attempts})
        unreadable = isinstance(exc, (KeyError, json.JSONDecodeError)) and not payload
        if isinstance(exc, PermanentError) or unreadable or attempts >= self.max_attempts:
            self.plane.dead_letter(self.stream, task_id, payload, f"{type(exc).__name__}: {exc}", attempts)
            self._ack(msg_id, task_id)
            metrics.task_dead_lettered(self.group, self.stream)
        else:
            metrics.task_retried(self.group, self.stream)
            self._retry_later(msg_id)

    def _retry_later(self, msg_id: Any) -> None:
        # Make the message look idle for almost the whole visibility timeout, so any worker's next
        # XAUTOCLAIM retries it after `retry_backoff_s` instead of a full timeout.
        self._touch(msg_id, idle_ms=max(0, int((self.visibility_timeout_s - self.retry_backoff_s) * 1000)))

    def _touch(self, *msg_ids: Any, idle_ms: int = 0) -> None:
        """Keep `msg_ids` claimed by this consumer and set how long they have looked idle (0: fresh)."""
        self.plane.redis.xclaim(
            self._stream_key,
            self.group,
            self.consumer,
            min_idle_time=0,
            message_ids=list(msg_ids),
            idle=idle_ms,
            justid=True,
        )

    def _attempts_key(self, task_id: str) -> str:
        return self.plane.key("attempts", self.stream, task_id)

    @contextmanager
    def _heartbeat(self, *msg_ids: Any) -> Iterator[None]:
        """Keep the claim on `msg_ids` fresh while a long task runs, so no one reclaims them."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.visibility_timeout_s / 3):
                try:
                    self._touch(*msg_ids)
                except redis.RedisError as exc:
                    log.warning("heartbeat failed", extra={"error": str(exc)})

        thread = threading.Thread(target=beat, name=f"heartbeat-{self.stream}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def _is_nogroup(exc: redis.ResponseError) -> bool:
    return "NOGROUP" in str(exc)


def _loads_or_none(fields: dict[bytes, bytes]) -> dict[str, Any] | None:
    try:
        payload = json.loads(fields[b"payload"])
    except (KeyError, ValueError, TypeError):
        return None
    return payload if isinstance(payload, dict) else None


def _loads_or_empty(fields: dict[bytes, bytes]) -> dict[str, Any]:
    return _loads_or_none(fields) or {}


def wait_for_redis(client: redis.Redis, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
