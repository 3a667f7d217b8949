"""The Redis work plane against a real Redis: idempotence, reclaim, retries, dead letters."""

from __future__ import annotations

import json
import threading
import time

import pytest

from seal.errors import PermanentError
from seal.records import DeadLetter
from seal.tasks import decode
from seal.workplane import Task, Worker


def test_enqueue_is_idempotent_per_task_id(plane) -> None:
    assert plane.enqueue(Task("apply", "t1", {"x": 1})) is True
    assert plane.enqueue(Task("apply", "t1", {"x": 2})) is False
    assert plane.enqueue(Task("apply", "t2", {"x": 3})) is True
    assert plane.redis.xlen(plane.stream_key("apply")) == 2


def test_unknown_stream_is_rejected(plane) -> None:
    with pytest.raises(ValueError, match="unknown stream"):
        plane.enqueue(Task("nope", "t1", {}))


def test_worker_stores_result_enqueues_followups_and_acks(plane) -> None:
    calls: list[dict] = []

    def handle(payload: dict) -> dict:
        calls.append(payload)
        return {"doubled": payload["x"] * 2}

    def followups(payload: dict, result: dict) -> list[Task]:
        return [Task("audit", f"a-{payload['x']}", result)]

    worker = Worker(plane, "apply", "student", "w1", handle, followups)
    plane.enqueue(Task("apply", "t1", {"x": 21}))
    assert worker.poll_once(block_ms=100) == 1
    assert calls == [{"x": 21}]
    assert plane.result("apply", "t1") == {"doubled": 42}
    assert plane.pending_count("apply", "student") == 0
    entries = plane.redis.xrange(plane.stream_key("audit"))
    assert len(entries) == 1 and entries[0][1][b"task_id"] == b"a-21"


def test_redelivered_task_is_not_computed_twice(plane) -> None:
    """A worker that stored its result but died before acking: the next delivery reuses the result."""
    calls = []
    worker = Worker(
        plane,
        "apply",
        "student",
        "w1",
        lambda p: calls.append(p) or {"ok": 1},
        lambda p, r: [Task("audit", "follow", r)],
        visibility_timeout_s=0.2,
    )
    plane.enqueue(Task("apply", "t1", {"x": 1}))
    plane.store_result("apply", "t1", {"ok": 1})  # as if computed, then the worker died
    assert worker.poll_once(block_ms=100) == 1
    assert calls == []
    assert plane.redis.xlen(plane.stream_key("audit")) == 1
    # Replaying the follow-up step (a second redelivery) still adds nothing downstream.
    plane.redis.xadd(plane.stream_key("apply"), {"task_id": "t1", "payload": "{}"})
    worker.poll_once(block_ms=100)
    assert plane.redis.xlen(plane.stream_key("audit")) == 1


def test_stuck_task_of_dead_worker_is_reclaimed(plane) -> None:
    plane.enqueue(Task("apply", "t1", {"x": 1}))
    plane.ensure_group("apply", "student")
    # A worker reads the task and dies without acking.
    plane.redis.xreadgroup("student", "dead-worker", {plane.stream_key("apply"): ">"}, count=1)
    done = []
    survivor = Worker(
        plane, "apply", "student", "w2", lambda p: done.append(p) or {"ok": 1}, visibility_timeout_s=0.3
    )
    assert survivor.poll_once(block_ms=50) == 0  # not idle long enough yet
    time.sleep(0.4)
    assert survivor.poll_once(block_ms=50) == 1
    assert done == [{"x": 1}]
    assert plane.pending_count("apply", "student") == 0


def test_heartbeat_keeps_a_long_task_from_being_reclaimed(plane) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(payload: dict) -> dict:
        started.set()
        release.wait(5)
        return {"ok": 1}

    plane.enqueue(Task("apply", "t1", {}))
    busy = Worker(plane, "apply", "student", "busy", slow, visibility_timeout_s=0.3)
    thread = threading.Thread(target=busy.poll_once, kwargs={"block_ms": 100})
    thread.start()
    started.wait(5)
    time.sleep(0.8)  # well past the visibility timeout
    other = Worker(plane, "apply", "student", "other", lambda p: {"stolen": 1}, visibility_timeout_s=0.3)
    assert other.reclaim_stuck_tasks() == []
    release.set()
    thread.join(5)
    assert plane.result("apply", "t1") == {"ok": 1}


def test_failing_task_is_retried_then_dead_lettered(plane) -> None:
    attempts = []

    def flaky(payload: dict) -> dict:
        attempts.append(1)
        raise RuntimeError("boom")

    plane.enqueue(Task("apply", "t1", {"x": 1}))
    worker = Worker(
        plane, "apply", "student", "w1", flaky, visibility_timeout_s=0.5, max_attempts=2, retry_backoff_s=0.1
    )
    worker.poll_once(block_ms=100)
    assert plane.pending_count("apply", "student") == 1  # kept for a retry
    time.sleep(0.2)
    worker.poll_once(block_ms=100)
    assert len(attempts) == 2
    assert plane.pending_count("apply", "student") == 0
    (entry,) = plane.redis.xrange(plane.stream_key("dead"))
    assert b"RuntimeError: boom" in entry[1][b"payload"]


def test_permanent_error_goes_straight_to_dead_letters(plane) -> None:
    def bad(payload: dict) -> dict:
        raise PermanentError("document 3 has no questions")

    plane.enqueue(Task("audit", "t1", {}))
    Worker(plane, "audit", "auditor", "w1", bad, max_attempts=5).poll_once(block_ms=100)
    (entry,) = plane.redis.xrange(plane.stream_key("dead"))
    assert b"document 3 has no questions" in entry[1][b"payload"]
    assert plane.pending_count("audit", "auditor") == 0
    # The dead letter is a message of the contract (tasks.proto DeadLetter), parsed strictly.
    letter = decode(DeadLetter, json.loads(entry[1][b"payload"]))
    assert (letter.stream, letter.task_id, letter.attempts) == ("audit", "t1", 1)
    assert json.loads(letter.payload_json) == {} and "PermanentError" in letter.reason


def test_unreadable_task_is_dead_lettered_and_the_worker_goes_on(plane) -> None:
    plane.ensure_group("apply", "student")
    plane.redis.xadd(plane.stream_key("apply"), {"task_id": "bad", "payload": "{not json"})
    plane.enqueue(Task("apply", "good", {"x": 1}))
    worker = Worker(plane, "apply", "student", "w1", lambda p: {"ok": p["x"]})
    assert worker.poll_once(block_ms=100) == 1
    assert worker.poll_once(block_ms=100) == 1
    (entry,) = plane.redis.xrange(plane.stream_key("dead"))
    assert b"JSONDecodeError" in entry[1][b"payload"]
    assert plane.result("apply", "good") == {"ok": 1}
    assert plane.pending_count("apply", "student") == 0


def test_failing_followups_are_retried_like_the_task_itself(plane) -> None:
    calls = []

    def broken_followups(payload: dict, result: dict) -> list[Task]:
        calls.append(1)
        raise KeyError("self_edit")

    plane.enqueue(Task("apply", "t1", {"x": 1}))
    worker = Worker(
        plane,
        "apply",
        "student",
        "w1",
        lambda p: {"ok": 1},
        broken_followups,
        visibility_timeout_s=0.5,
        max_attempts=2,
        retry_backoff_s=0.1,
    )
    worker.poll_once(block_ms=100)
    time.sleep(0.2)
    worker.poll_once(block_ms=100)
    assert len(calls) == 2
    assert plane.redis.xlen(plane.stream_key("dead")) == 1
    assert plane.pending_count("apply", "student") == 0


def test_a_task_that_kills_its_workers_runs_out_of_attempts(plane) -> None:
    """Attempts count deliveries, so a task that crashes every worker that takes it cannot loop forever."""
    plane.enqueue(Task("apply", "t1", {"x": 1}))
    plane.ensure_group("apply", "student")
    ran = []
    worker = Worker(
        plane,
        "apply",
        "student",
        "w",
        lambda p: ran.append(p) or {"ok": 1},
        visibility_timeout_s=0.2,
        max_attempts=2,
    )
    for crashed in range(2):  # a worker takes it and dies (counts its attempt, never acks)
        worker.consumer = f"doomed-{crashed}"
        time.sleep(0.25)
        messages = (
            worker.reclaim_stuck_tasks()
            or plane.redis.xreadgroup("student", worker.consumer, {plane.stream_key("apply"): ">"}, count=1)[
                0
            ][1]
        )
        assert messages
        plane.redis.incr(plane.key("attempts", "apply", "t1"))
    worker.consumer = "survivor"
    time.sleep(0.25)
    assert worker.poll_once(block_ms=50) == 1
    assert ran == []  # not run a third time
    (entry,) = plane.redis.xrange(plane.stream_key("dead"))
    assert b"gave up after 2 deliveries" in entry[1][b"payload"]
    assert plane.pending_count("apply", "student") == 0


def test_a_task_redelivered_once_after_a_crash_still_runs(plane) -> None:
    plane.enqueue(Task("apply", "t1", {"x": 1}))
    plane.ensure_group("apply", "student")
    plane.redis.xreadgroup("student", "doomed", {plane.stream_key("apply"): ">"}, count=1)
    plane.redis.incr(plane.key("attempts", "apply", "t1"))
    time.sleep(0.25)
    worker = Worker(
        plane, "apply", "student", "w2", lambda p: {"ok": 1}, visibility_timeout_s=0.2, max_attempts=2
    )
    assert worker.poll_once(block_ms=50) == 1
    assert plane.result("apply", "t1") == {"ok": 1}


def test_on_bound_runs_before_workers_take_queued_tasks(plane) -> None:
    """A student that starts with tasks already queued must name its address in the first adapter."""
    from seal.server import ServiceProcess

    seen: dict[str, str] = {}
    plane.enqueue(Task("apply", "queued-before-start", {}))
    worker = Worker(plane, "apply", "student", "w1", lambda p: {"address": seen.get("address", "")})
    process = ServiceProcess(
        "student",
        "127.0.0.1:0",
        lambda server: [],
        [worker],
        on_bound=lambda port: seen.update(address=f"127.0.0.1:{port}"),
    )
    process.start()
    try:
        deadline = time.monotonic() + 10
        while plane.result("apply", "queued-before-start") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert plane.result("apply", "queued-before-start") == {"address": f"127.0.0.1:{process.port}"}
    finally:
        process.drain(grace_s=1)


def test_a_finished_task_leaves_no_stream_entry_and_every_key_expires(plane) -> None:
    """Bounded state: the acked entry is deleted and attempts/enqueued/result keys all carry a TTL."""
    worker = Worker(
        plane, "apply", "student", "w1", lambda p: {"ok": 1}, lambda p, r: [Task("audit", "a1", r)]
    )
    plane.enqueue(Task("apply", "t1", {"x": 1}))
    assert worker.poll_once(block_ms=100) == 1
    assert plane.redis.xlen(plane.stream_key("apply")) == 0
    assert plane.pending_count("apply", "student") == 0
    keys = [k.decode() for k in plane.redis.scan_iter(f"{plane.namespace}:*")]
    written = [k for k in keys if not k.startswith(plane.key("stream"))]
    assert {k.split(":")[1] for k in written} == {"enqueued", "result"}  # attempts: deleted on success
    assert all(plane.redis.ttl(k) > 0 for k in written), {k: plane.redis.ttl(k) for k in written}


def test_an_attempts_counter_left_by_a_crash_expires(plane) -> None:
    plane.enqueue(Task("apply", "t1", {"x": 1}))
    worker = Worker(plane, "apply", "student", "w1", lambda p: 1 / 0, visibility_timeout_s=5)
    worker.poll_once(block_ms=100)  # failed once, kept for a retry: its counter stays, with a TTL
    assert plane.redis.ttl(plane.key("attempts", "apply", "t1")) > 0
    assert plane.redis.xlen(plane.stream_key("apply")) == 1  # not done: the entry stays


def test_dead_letters_are_kept_after_the_gateway_acks_them(plane) -> None:
    plane.dead_letter("apply", "t1", {"x": 1}, "boom", 3)
    Worker(plane, "dead", "gateway", "g1", lambda p: {"failed": p["task_id"]}).poll_once(block_ms=100)
    assert plane.result("dead", "apply/t1") == {"failed": "t1"}
    assert plane.pending_count("dead", "gateway") == 0
    assert plane.redis.xlen(plane.stream_key("dead")) == 1  # kept for operators; only capped


def test_events_and_dead_letters_are_capped(plane, monkeypatch: pytest.MonkeyPatch) -> None:
    from seal import workplane

    monkeypatch.setitem(workplane.STREAM_CAPS, "events", 10)
    monkeypatch.setitem(workplane.STREAM_CAPS, "dead", 10)
    for i in range(600):
        plane.enqueue(Task("events", f"e{i}", {}))
        plane.dead_letter("apply", f"t{i}", {}, "boom", 1)
    # MAXLEN ~ trims whole macro nodes (100 entries by default), so "about" the cap.
    assert plane.redis.xlen(plane.stream_key("events")) <= 200
    assert plane.redis.xlen(plane.stream_key("dead")) <= 200
    assert plane.redis.xlen(plane.stream_key("propose")) == 0  # task streams are never trimmed
    for i in range(300):
        plane.enqueue(Task("propose", f"p{i}", {}))
    assert plane.redis.xlen(plane.stream_key("propose")) == 300


def test_workers_recreate_their_group_after_redis_restarts_empty(tmp_path) -> None:
    """A Redis that comes back without its data (no AOF) has no consumer groups: the worker makes
    its group again and takes new work, instead of logging NOGROUP forever."""
    import redis

    from seal.embedded_redis import start_redis
    from seal.workplane import WorkPlane

    server = start_redis()  # throwaway: a restart loses everything, groups included
    port = server.port
    plane = WorkPlane(redis.Redis.from_url(server.url, socket_timeout=5), "seal")
    done: list[dict] = []
    worker = Worker(plane, "apply", "student", "w1", lambda p: done.append(p) or {"ok": 1})
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"block_ms": 100}, daemon=True)
    thread.start()
    try:
        plane.enqueue(Task("apply", "before", {"n": 1}))
        _wait_until(lambda: done == [{"n": 1}])
        server.process.kill()
        server.process.wait()
        time.sleep(1.5)  # the worker sees Redis gone and keeps retrying
        server = start_redis(port=port)
        plane.enqueue(Task("apply", "after", {"n": 2}))
        _wait_until(lambda: done == [{"n": 1}, {"n": 2}], timeout_s=15)
        assert plane.redis.xinfo_groups(plane.stream_key("apply"))[0]["name"] == b"student"
    finally:
        stop.set()
        thread.join(10)
        server.stop()


def _wait_until(condition, timeout_s: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_idle_consumers_that_hold_no_task_are_forgotten(plane) -> None:
    """Each process joins its group under its own name; restarts must not grow the group forever."""
    key = plane.stream_key("apply")
    plane.enqueue(Task("apply", "t1", {}))
    plane.ensure_group("apply", "student")
    plane.redis.xreadgroup("student", "dead-holding-a-task", {key: ">"}, count=1)
    plane.redis.xgroup_createconsumer(key, "student", "dead-idle")  # joined, never got a task
    time.sleep(0.3)
    plane.redis.xgroup_createconsumer(key, "student", "alive")  # polled just now
    assert plane.forget_idle_consumers("apply", "student", idle_s=0.2) == 1
    names = {c["name"] for c in plane.redis.xinfo_consumers(key, "student")}
    assert names == {b"dead-holding-a-task", b"alive"}  # its task is kept for XAUTOCLAIM
    assert plane.pending_count("apply", "student") == 1


# --- several tasks in one call (the student trains their adapters in one batched pass) ---------------


def _batch_worker(plane, calls: list, batch: list, **kwargs) -> Worker:
    def handle(payload: dict) -> dict:
        calls.append(payload["x"])
        if payload["x"] < 0:
            raise PermanentError(f"x={payload['x']} is negative")
        return {"alone": payload["x"]}

    def handle_batch(payloads: list[dict]) -> list[dict]:
        batch.append([p["x"] for p in payloads])
        if any(p["x"] < 0 for p in payloads):
            raise ValueError("a negative x spoils the batch")
        return [{"together": p["x"]} for p in payloads]

    return Worker(
        plane,
        "apply",
        "student",
        "w1",
        handle,
        lambda payload, result: [Task("audit", f"a-{payload['x']}", result)],
        handle_batch=handle_batch,
        batch_size=3,
        **kwargs,
    )


def test_waiting_tasks_are_handled_together_up_to_the_batch_size(plane) -> None:
    calls: list = []
    batch: list = []
    worker = _batch_worker(plane, calls, batch)
    for x in (1, 2, 3, 4):
        plane.enqueue(Task("apply", f"t{x}", {"x": x}))
    assert worker.poll_once(block_ms=100) == 3
    assert batch == [[1, 2, 3]] and calls == []
    assert [plane.result("apply", f"t{x}") for x in (1, 2, 3)] == [{"together": x} for x in (1, 2, 3)]
    # The fourth waits for the next poll, and alone it takes the single path.
    assert plane.redis.xlen(plane.stream_key("apply")) == 1
    assert worker.poll_once(block_ms=100) == 1
    assert calls == [4] and plane.result("apply", "t4") == {"alone": 4}
    assert plane.pending_count("apply", "student") == 0
    follow = [e[1][b"task_id"] for e in plane.redis.xrange(plane.stream_key("audit"))]
    assert follow == [b"a-1", b"a-2", b"a-3", b"a-4"]


def test_a_failed_batch_falls_back_to_one_at_a_time_and_only_the_bad_task_fails(plane) -> None:
    calls: list = []
    batch: list = []
    worker = _batch_worker(plane, calls, batch)
    for x in (5, -1, 6):
        plane.enqueue(Task("apply", f"t{x}", {"x": x}))
    assert worker.poll_once(block_ms=100) == 3
    assert batch == [[5, -1, 6]] and calls == [5, -1, 6]
    assert plane.result("apply", "t5") == {"alone": 5} and plane.result("apply", "t6") == {"alone": 6}
    assert plane.result("apply", "t-1") is None
    (entry,) = plane.redis.xrange(plane.stream_key("dead"))
    letter = decode(DeadLetter, json.loads(entry[1][b"payload"]))
    assert (letter.task_id, letter.attempts) == ("t-1", 1) and "x=-1 is negative" in letter.reason
    assert plane.pending_count("apply", "student") == 0


def test_a_batch_skips_tasks_already_computed_and_unreadable_ones(plane) -> None:
    calls: list = []
    batch: list = []
    worker = _batch_worker(plane, calls, batch)
    plane.store_result("apply", "t7", {"earlier": 7})  # computed by a delivery that died before acking
    plane.enqueue(Task("apply", "t7", {"x": 7}))
    plane.redis.xadd(plane.stream_key("apply"), {"task_id": "bad", "payload": "{not json"})
    for x in (8, 9):
        plane.enqueue(Task("apply", f"t{x}", {"x": x}))
    # Four waiting, batch size 3: t7 (done), bad, t8 in the first poll; t8 alone is not a batch.
    assert worker.poll_once(block_ms=100) == 3
    assert batch == [] and calls == [8]
    assert plane.result("apply", "t7") == {"earlier": 7}
    assert b"JSONDecodeError" in plane.redis.xrange(plane.stream_key("dead"))[0][1][b"payload"]
    assert worker.poll_once(block_ms=100) == 1 and calls == [8, 9]
    assert plane.pending_count("apply", "student") == 0


def test_a_batch_waits_briefly_for_tasks_enqueued_just_after_the_first(plane) -> None:
    calls: list = []
    batch: list = []
    worker = _batch_worker(plane, calls, batch, batch_linger_s=2.0)
    plane.enqueue(Task("apply", "t1", {"x": 1}))
    later = threading.Timer(0.1, lambda: plane.enqueue(Task("apply", "t2", {"x": 2})))
    later.start()
    assert worker.poll_once(block_ms=100) == 2
    later.join()
    assert batch == [[1, 2]] and calls == []


def test_batch_size_must_be_positive(plane) -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Worker(plane, "apply", "student", "w1", lambda p: {}, batch_size=0)
